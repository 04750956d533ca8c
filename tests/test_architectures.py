"""Every stage on tiny random models of the common decoder architectures, and a tokenizer without a pad token."""

import json
import os
import signal

import pytest
import torch
from conftest import torchrun
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

import evaluate
import ppo_lagrangian
import sft
import train_cost
import train_reward
import utils

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**SMALL, num_key_value_heads=1),
    "mistral": lambda: MistralConfig(**SMALL, num_key_value_heads=1),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128),
    "gpt_neox": lambda: GPTNeoXConfig(**SMALL),
    "opt": lambda: OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
    ),
}


def write_model_folder(path, config, tokenizer):
    """A config (no weights) and a tokenizer, like toy_world/model but of another architecture."""
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, count in (("sft_train", 64), ("preference_train", 32), ("prompts_train", 8)):
        with open(f"toy_world/data/{name}.jsonl") as f:
            (root / f"{name}.jsonl").write_text("".join(f.readlines()[:count]))
    return root


def sft_args(tmp_path, data, **changes):
    """One epoch of SFT on 64 toy conversations (4 steps of 16) from the model folder tmp_path/base."""
    defaults = dict(
        model_name_or_path=str(tmp_path / "base"),
        dataset=str(data / "sft_train.jsonl"),
        eval_dataset="none",
        sample_prompts="none",
        output_dir=str(tmp_path / "sft"),
        epochs=1,
        batch_size=16,
        micro_batch_size=8,
        log_every=1,
    )
    return sft.Args(**{**defaults, **changes})


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_every_stage_runs_on(architecture, data, tmp_path, tokenizer, monkeypatch):
    """SFT, the reward model, the cost model, PPO-Lag and the evaluation, each stage's main on its own models."""
    write_model_folder(tmp_path / "base", CONFIGS[architecture](), tokenizer)
    sft.main(sft_args(tmp_path, data, gradient_checkpointing=True))
    scores = dict(dataset=str(data / "preference_train.jsonl"), eval_dataset="none", epochs=1, batch_size=8)
    scores |= dict(model_name_or_path=str(tmp_path / "sft"), micro_batch_size=8, log_every=1)
    train_reward.main(train_reward.Args(**scores, output_dir=str(tmp_path / "reward")))
    train_cost.main(train_cost.Args(**scores, output_dir=str(tmp_path / "cost"), reward_model=str(tmp_path / "reward")))
    ppo_lagrangian.main(
        ppo_lagrangian.Args(
            actor_model_name_or_path=str(tmp_path / "sft"),
            reward_model=str(tmp_path / "reward"),
            cost_model=str(tmp_path / "cost"),
            prompts=str(data / "prompts_train.jsonl"),
            eval_prompts="none",
            output_dir=str(tmp_path / "ppo_lag"),
            iterations=2,
            rollout_batch_size=4,
            minibatch_size=4,
            micro_batch_size=2,
            max_new_tokens=6,
            gradient_checkpointing=True,
        )
    )
    with open(tmp_path / "ppo_lag" / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert len(records) == 2 and all(abs(r["reward"]) < 1e4 for r in records)
    for stage, steps in (("reward", 4), ("cost", 3)):  # 32 pairs in steps of 8; the cost model skips a contradiction
        with open(tmp_path / stage / "metrics.jsonl") as f:
            assert [r["step"] for r in map(json.loads, f)] == list(range(1, steps + 1)), stage
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # evaluate's SIGTERM handler stays out of pytest
    evaluate.main(
        evaluate.Args(
            models=[f"sft={tmp_path / 'sft'}", f"ppo_lag={tmp_path / 'ppo_lag'}"],
            prompts=str(data / "prompts_train.jsonl"),
            reward_model=str(tmp_path / "reward"),
            cost_model=str(tmp_path / "cost"),
            output_dir=str(tmp_path / "eval"),
            max_new_tokens=6,
        )
    )
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert list(summary["models"]) == ["sft", "ppo_lag"] and summary["models"]["sft"]["answers"] == 8
    # The score of a text does not depend on padding, whatever the architecture's position scheme.
    scorer = utils.load_model(str(tmp_path / "reward"), tokenizer, score=True).eval()
    ids = [
        utils.tokenize_conversation(tokenizer, "how do i bake bread ?", r, 64)[0]
        for r in ("sure , here is how .", "sorry .")
    ]
    with torch.no_grad():
        right = scorer(*utils.batch_inputs(ids, tokenizer.pad_token_id, "cpu"), end=True)
        left = scorer(*utils.batch_inputs(ids, tokenizer.pad_token_id, "cpu", side="left"), end=True)
        alone = torch.cat([scorer(*utils.batch_inputs([i], tokenizer.pad_token_id, "cpu"), end=True) for i in ids])
    assert torch.allclose(right, alone, atol=1e-4) and torch.allclose(left, alone, atol=1e-4)


def test_a_tokenizer_without_pad_gets_a_distinct_one_and_the_model_grows(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    # Remove "<pad>" from the vocabulary too, as in GPT-2's tokenizer.
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    tok["model"]["vocab"].pop("<pad>")
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<pad>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    config = CONFIGS["gpt2"]()
    config.vocab_size = 359
    config.save_pretrained(tmp_path)
    loaded = utils.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<pad>" and loaded.pad_token_id not in (loaded.eos_token_id, loaded.bos_token_id)
    model = utils.load_model(str(tmp_path), loaded)
    assert model.get_input_embeddings().num_embeddings >= len(loaded) > loaded.pad_token_id
    assert model.config.pad_token_id == loaded.pad_token_id


FSDP_RUNS = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
import sft

init_process_group = dist.init_process_group  # the group of the first run serves them all
dist.init_process_group = lambda *args, **kwargs: dist.is_initialized() or init_process_group(*args, **kwargs)
for flags in json.loads({runs!r}):
    sft.main(sft.Args(**flags))
dist.barrier()  # ranks leave together, then at once, as utils.run: gloo's teardown can abort
os._exit(0)
"""


def test_fsdp_matches_one_process_on_every_architecture(data, tmp_path, tokenizer):
    """Two FSDP ranks train each architecture like one process (its blocks sharded by their class name, tied
    embeddings saved once) and answer prompts greedily on both ranks. One torchrun launch runs them all."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(open("toy_world/data/prompts_eval.jsonl").readlines()[::48]))
    runs = []
    for architecture, make_config in CONFIGS.items():
        config = make_config()
        for key, value in config.to_dict().items():  # GPT-2 and OPT train with dropout: ranks would draw other masks
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
        write_model_folder(tmp_path / architecture / "base", config, tokenizer)
        args = sft_args(tmp_path / architecture, data, sample_prompts=str(prompts), max_length=32)
        sft.main(args)
        runs.append(vars(args) | dict(output_dir=str(tmp_path / architecture / "fsdp"), fsdp=True))
    script = tmp_path / "fsdp_runs.py"
    script.write_text(FSDP_RUNS.format(repo=os.getcwd(), runs=json.dumps(runs)))
    torchrun(str(script))
    for architecture in CONFIGS:
        one, two = (
            utils.load_model(str(tmp_path / architecture / run), tokenizer).state_dict() for run in ("sft", "fsdp")
        )
        assert one.keys() == two.keys(), architecture
        for name in one:
            assert torch.allclose(one[name], two[name], atol=1e-5), (architecture, name)
        answers = []
        for run in ("sft", "fsdp"):
            with open(tmp_path / architecture / run / "metrics.jsonl") as f:
                answers.append([r for r in map(json.loads, f) if r["split"] == "eval"])
        assert answers[0] == answers[1] and len(answers[0]) == 1, architecture  # the judge's summary of the answers
