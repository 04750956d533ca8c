"""Score models in the original code's format (config `LlamaForScore`, a `score_head`, an optional
normaliser), as the released PKU-Alignment/beaver-7b-* reward and cost models: written here in that exact
format at a tiny size, loaded with utils.load_model(..., score=True) (the normaliser folded into the head), and
checked against the original's formula."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaModel

import evaluate
import ppo_lagrangian as ppo
import utils

CONVERSATIONS = [
    ("how do i bake bread ?", "mix flour and water . bake it ."),
    ("how do i steal a parked car ?", "i can not help with that ."),
    ("how do i plant a tree ?", "dig a hole ."),
]


def write_original(folder, tokenizer, score_type="reward", normalizer=None, buffers=None, keep=lambda key: True):
    """A tiny score model saved as the original code saves one; returns (backbone, head) to compute with."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    folder.mkdir(exist_ok=True)
    torch.manual_seed(0)
    backbone = LlamaModel(config).eval()
    head = torch.nn.Linear(32, 1)
    torch.nn.init.normal_(head.weight, std=0.5)
    torch.nn.init.constant_(head.bias, 0.75)  # trained biases are not 0: the bias must be read
    state = {f"model.{key}": value for key, value in backbone.state_dict().items()}
    state.update({"score_head.weight": head.weight.detach(), "score_head.bias": head.bias.detach()})
    state.update({f"normalizer.{key}": torch.tensor(value) for key, value in (buffers or {}).items()})
    save_file({key: value.contiguous() for key, value in state.items() if keep(key)}, str(folder / "model.safetensors"))
    fields = config.to_dict()
    fields.update(architectures=["LlamaForScore"], score_dim=1, score_type=score_type, score_bias=True, bias=False)
    fields.update(do_normalize=normalizer is not None, normalizer_type="ExponentialMovingAverage", momentum=0.9)
    fields.update(normalizer or {})
    (folder / "config.json").write_text(json.dumps(fields))
    tokenizer.save_pretrained(folder)
    return backbone, head


@torch.no_grad()
def original_end_scores(backbone, head, tokenizer, rows):
    """The original's computation: BOS + template + response + EOS, right-padded; the head's output at
    the last position whose attention mask is 1."""
    ids = [utils.tokenize_conversation(tokenizer, prompt, response, 64)[0] for prompt, response in rows]
    input_ids, attention_mask = utils.batch_inputs(ids, tokenizer.pad_token_id, "cpu")
    scores = head(backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)[..., 0]
    end_index = torch.stack([m.nonzero()[-1, 0] for m in attention_mask])
    return scores[torch.arange(len(rows)), end_index]


def test_the_released_format_scores_as_the_original(tokenizer, tmp_path):
    backbone, head = write_original(tmp_path, tokenizer)
    scorer = utils.load_model(str(tmp_path), utils.load_tokenizer(str(tmp_path)), score=True)
    assert isinstance(scorer, utils.ScoreModel) and scorer.model.score.bias.item() == 0.75  # no normaliser: as saved
    expected = original_end_scores(backbone, head, tokenizer, CONVERSATIONS)
    prompts, responses = zip(*CONVERSATIONS)
    got = evaluate.score_texts(scorer, tokenizer, list(prompts), list(responses), 64)
    assert torch.allclose(got, expected, atol=1e-5) and expected.std() > 0
    # Padding never changes a score: left-padded, as a rollout's sequences are.
    ids = [utils.tokenize_conversation(tokenizer, p, r, 64)[0] for p, r in CONVERSATIONS]
    left = scorer(*utils.batch_inputs(ids, tokenizer.pad_token_id, "cpu", side="left"), end=True)
    assert torch.allclose(left, expected, atol=1e-5)


@pytest.mark.parametrize("score_type", ["reward", "cost"])
def test_the_normaliser_applies_only_when_asked(tokenizer, tmp_path, score_type):
    backbone, head = write_original(tmp_path / "off", tokenizer, score_type, normalizer=None)
    raw = original_end_scores(backbone, head, tokenizer, CONVERSATIONS)
    ids = [utils.tokenize_conversation(tokenizer, p, r, 64)[0] for p, r in CONVERSATIONS]
    off = utils.load_model(str(tmp_path / "off"), tokenizer, score=True)(*utils.batch_inputs(ids, 0, "cpu"), end=True)
    assert torch.allclose(off, raw, atol=1e-5)
    # do_normalize: reward (s - mean) / (std + 1e-8), cost s / (std + 1e-8); the stored buffers win over config.
    for name, buffers, mean, var in (
        ("config", None, 0.5, 4.0),
        ("buffers", {"mean": [-1.0], "var": [0.25]}, -1.0, 0.25),
    ):
        folder = tmp_path / name
        write_original(folder, tokenizer, score_type, normalizer={"mean": [0.5], "var": [4.0]}, buffers=buffers)
        scorer = utils.load_model(str(folder), tokenizer, score=True)
        got = scorer(*utils.batch_inputs(ids, tokenizer.pad_token_id, "cpu"), end=True)
        expected = (raw - mean) / (var**0.5 + 1e-8) if score_type == "reward" else raw / (var**0.5 + 1e-8)
        assert torch.allclose(got, expected, atol=1e-5), name


def test_a_score_model_without_its_head_stops_instead_of_scoring_at_random(tokenizer, tiny_models, tmp_path):
    write_original(tmp_path / "headless", tokenizer, keep=lambda key: not key.startswith("score_head"))
    with pytest.raises(utils.UserError, match=r"headless: a LlamaForScore checkpoint without score_head.weight"):
        utils.load_model(str(tmp_path / "headless"), tokenizer, score=True)
    # Our own format too: a reward checkpoint whose score weights were lost.
    ours = shutil.copytree(tiny_models / "reward", tmp_path / "ours")
    weights = load_file(ours / "model.safetensors")
    assert "score.weight" in weights
    save_file({k: v for k, v in weights.items() if not k.startswith("score")}, str(ours / "model.safetensors"))
    with pytest.raises(utils.UserError, match=r"ours: the score head's weights \(score.weight\) are missing"):
        utils.load_model(str(ours), tokenizer, score=True)


def test_a_language_model_is_not_a_scorer(tokenizer, tiny_models):
    """An SFT checkpoint passed as R or C stops; a new head on it is only for training one."""
    lm = str(tiny_models / "sft")
    assert isinstance(utils.load_model(lm, tokenizer, score=True, new_head=True), utils.ScoreModel)
    with pytest.raises(utils.UserError, match=r"sft is a language model \(LlamaForCausalLM\), not a reward or cost"):
        utils.load_model(lm, tokenizer, score=True)


def test_ppo_lag_runs_against_released_format_scorers(tokenizer, tiny_models, tmp_path):
    """Frozen R and C in the original format; the critics need a trainable start (here the SFT model)."""
    write_original(tmp_path / "reward", tokenizer, "reward")
    write_original(tmp_path / "cost", tokenizer, "cost")
    flags = dict(
        actor_model_name_or_path=str(tiny_models / "sft"), reward_model=str(tmp_path / "reward"),
        cost_model=str(tmp_path / "cost"), eval_prompts="none", output_dir=str(tmp_path / "run"), iterations=1,
        rollout_batch_size=4, minibatch_size=4, micro_batch_size=4, max_new_tokens=4,
    )  # fmt: skip
    with pytest.raises(utils.UserError, match=r"original code's score format.*pass --reward_critic_model"):
        ppo.main(ppo.Args(**flags))
    critics = dict(reward_critic_model=str(tiny_models / "sft"), cost_critic_model=str(tiny_models / "sft"))
    ppo.main(ppo.Args(**flags, **critics))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 1 and record["cost"] != 0.0 and record["reward"] != 0.0
