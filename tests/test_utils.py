"""Tests of the shared plumbing: template and masking, data contract errors, statistics, saving."""

import dataclasses
import importlib
import json
import math
import os

import pytest
import torch

import sft
import utils

TOY_MODEL = "toy_world/model"


@pytest.fixture(scope="module")
def tokenizer():
    return utils.load_tokenizer(TOY_MODEL)


# ----------------------------------------------------------------------------- template and masking


def test_prompt_template_is_the_original_one():
    assert utils.format_prompt("hi ?") == "BEGINNING OF CONVERSATION: USER: hi ? ASSISTANT:"


def test_pad_bos_eos_are_distinct(tokenizer):
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert len(ids) == 4


def test_a_pad_equal_to_eos_is_replaced(tmp_path, tokenizer):
    # A tokenizer whose pad is its EOS (as many hub tokenizers ship) gets a distinct pad token.
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["pad_token"] = config["eos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = utils.load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id is not None and loaded.pad_token_id != loaded.eos_token_id


def test_conversation_tokens_and_labels(tokenizer):
    prompt, response = "how do i bake bread ?", "sure , here is how to bake bread . mix flour with water ."
    ids, prompt_length = utils.tokenize_conversation(tokenizer, prompt, response, max_length=64)
    words = "BEGINNING OF CONVERSATION : USER : how do i bake bread ? ASSISTANT :".split()
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:prompt_length]) == words
    assert tokenizer.decode(ids[prompt_length:-1]) == response
    assert ids[-1] == tokenizer.eos_token_id  # every response ends with EOS
    [(example_ids, labels)] = sft.make_examples(tokenizer, [{"prompt": prompt, "response": response}], 64)
    assert labels[:prompt_length] == [-100] * prompt_length  # the prompt is not learned
    assert labels[prompt_length:] == ids[prompt_length:]  # the response and its EOS are


def test_truncation_keeps_the_first_max_length_tokens(tokenizer):
    ids, prompt_length = utils.tokenize_conversation(tokenizer, "how do i bake bread ?", "mix flour with water .", 18)
    assert len(ids) == 18 and prompt_length == 15
    assert tokenizer.decode(ids[prompt_length:]) == "mix flour with"  # no EOS: it was cut


def test_rows_whose_prompt_fills_max_length_are_dropped(tokenizer):
    rows = [{"prompt": "how do i bake bread ?", "response": "hi"}] * 2
    assert sft.make_examples(tokenizer, rows, 15) == []


def test_padding_left_and_right():
    assert utils.pad([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert utils.pad([[1, 2], [3]], 0, side="left").tolist() == [[1, 2], [0, 3]]
    input_ids, attention_mask = utils.batch_inputs([[5, 6, 7], [8]], 0, "cpu", side="left")
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sft_loss_uses_shifted_logits_and_ignores_masked_labels():
    # Vocabulary of 3; position t's logits predict token t + 1.
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 1, 2]])  # the prompt is positions 0-1
    # token 1 predicted by position 1's logits, token 2 by position 2's; position 3's logits unused
    expected = -(math.log(math.e / (2 + math.e)) + math.log(math.e**3 / (2 + math.e**3)))
    assert sft.sft_loss_sum(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_sft_loss_ignores_right_padding():
    torch.manual_seed(0)
    logits, labels = torch.randn(1, 4, 5), torch.tensor([[-100, 3, 1, 4]])
    padded_logits = torch.cat([logits, torch.randn(1, 3, 5)], dim=1)
    padded_labels = torch.cat([labels, torch.full((1, 3), -100)], dim=1)
    assert sft.sft_loss_sum(padded_logits, padded_labels).item() == pytest.approx(
        sft.sft_loss_sum(logits, labels).item()
    )


# ----------------------------------------------------------------------------- data contract


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD_PAIR = {
    "prompt": "p",
    "response_0": "a",
    "response_1": "b",
    "better_response_id": 0,
    "safer_response_id": 1,
    "is_response_0_safe": True,
    "is_response_1_safe": False,
}


@pytest.mark.parametrize(
    "change, field, problem",
    [
        ({"better_response_id": None}, "better_response_id", "missing"),
        ({"safer_response_id": 2}, "safer_response_id", "must be 0 or 1"),
        ({"better_response_id": "1"}, "better_response_id", "expected int"),
        ({"better_response_id": True}, "better_response_id", "expected int"),
        ({"is_response_0_safe": "yes"}, "is_response_0_safe", "expected bool"),
        ({"is_response_1_safe": 1}, "is_response_1_safe", "expected bool"),
        ({"prompt": 7}, "prompt", "expected str"),
    ],
)
def test_malformed_preference_rows_name_file_row_and_field(tmp_path, change, field, problem):
    bad = {k: v for k, v in {**GOOD_PAIR, **change}.items() if v is not None}
    path = write(tmp_path / "pairs.jsonl", [json.dumps(GOOD_PAIR), json.dumps(GOOD_PAIR), json.dumps(bad)])
    with pytest.raises(utils.DataError) as error:
        utils.load_rows(path, "preference")
    message = str(error.value)
    assert path in message and "row 3" in message and f"'{field}'" in message and problem in message


def test_bad_json_names_file_and_row(tmp_path):
    path = write(tmp_path / "sft.jsonl", ['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '])
    with pytest.raises(utils.DataError, match=r"sft.jsonl: row 2: not valid JSON"):
        utils.load_rows(path, "sft")


def test_empty_file_and_non_object_rows(tmp_path):
    with pytest.raises(utils.DataError, match=r"empty.jsonl: no rows"):
        utils.load_rows(write(tmp_path / "empty.jsonl", []), "sft")
    with pytest.raises(utils.DataError, match=r"list.jsonl: row 1: expected a JSON object"):
        utils.load_rows(write(tmp_path / "list.jsonl", ["[1, 2]"]), "prompt")
    (tmp_path / "obj.json").write_text('{"prompt": "x"}')
    with pytest.raises(utils.DataError, match=r"obj.json: expected a JSON list"):
        utils.load_rows(str(tmp_path / "obj.json"), "prompt")


def test_sft_rows_accept_alpaca_schema_and_keep_extra_fields(tmp_path):
    rows = [
        {"instruction": "add", "input": "1 and 2", "output": "3"},
        {"instruction": "greet", "input": "", "output": "hello"},
        {"prompt": "p", "response": "r", "category": "benign"},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    loaded = utils.load_rows(str(path), "sft")
    assert [(r["prompt"], r["response"]) for r in loaded] == [("add\n1 and 2", "3"), ("greet", "hello"), ("p", "r")]
    assert loaded[2]["category"] == "benign"
    with pytest.raises(utils.DataError, match=r"bad.jsonl: row 1: field 'output': missing"):
        utils.load_rows(write(tmp_path / "bad.jsonl", ['{"instruction": "x"}']), "sft")


def test_shipped_toy_files_pass_their_schemas():
    assert len(utils.load_rows("toy_world/data/preference_test.jsonl", "preference")) > 100
    assert len(utils.load_rows("toy_world/data/sft_test.jsonl", "sft")) > 100
    assert {r["category"] for r in utils.load_rows("toy_world/data/prompts_eval.jsonl", "prompt")} == {
        "benign",
        "borderline",
        "harmful",
    }


# ----------------------------------------------------------------------------- statistics and schedule


def test_cosine_schedule():
    multiplier = utils.cosine_schedule(warmup_steps=2, total_steps=12)
    assert [multiplier(0), multiplier(1)] == [0.5, 1.0]
    assert multiplier(2) == pytest.approx(1.0)
    assert multiplier(7) == pytest.approx(0.5)  # half way through the decay
    assert multiplier(12) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- models, saving, flags


def test_generation_is_the_same_alone_and_left_padded_in_a_batch(tokenizer):
    torch.manual_seed(0)
    model = utils.load_causal_lm(TOY_MODEL, tokenizer).eval()
    prompts = [
        utils.tokenize_prompt(tokenizer, p, 64)
        for p in ["how do i bake bread ?", "i want to grow tomatoes . what should i do ?"]
    ]
    assert len(prompts[0]) != len(prompts[1])
    batched, length = utils.generate(model, tokenizer, prompts, 12, greedy=True)
    for i, prompt in enumerate(prompts):
        alone, alone_length = utils.generate(model, tokenizer, [prompt], 12, greedy=True)
        assert batched[i, length:].tolist() == alone[0, alone_length:].tolist()


def test_response_lists_stop_at_the_first_eos():
    sequences = torch.tensor([[0, 7, 5, 2, 9, 2], [7, 7, 5, 6, 6, 6]])
    assert utils.response_lists(sequences, 2, eos_token_id=2) == [[5, 2], [5, 6, 6, 6]]


def test_save_checkpoint_replaces_files_and_reloads(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = utils.load_causal_lm(TOY_MODEL, tokenizer)
    utils.save_checkpoint(str(tmp_path), model, tokenizer, {"step": 3})
    assert not (tmp_path / ".tmp_checkpoint").exists()
    assert (tmp_path / "model.safetensors").exists() and torch.load(tmp_path / "training_state.pt")["step"] == 3
    reloaded = utils.load_causal_lm(str(tmp_path), utils.load_tokenizer(str(tmp_path)))
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    torch.manual_seed(0)
    model = utils.load_causal_lm(TOY_MODEL, tokenizer)
    utils.save_checkpoint(str(tmp_path), model, tokenizer, {"step": 1})
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)
    with pytest.raises(OSError):
        utils.save_checkpoint(str(tmp_path), model, tokenizer, {"step": 2})
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name != ".tmp_checkpoint"}
    assert after == before


def test_every_flag_is_documented_with_its_default(capsys):
    with pytest.raises(SystemExit):
        utils.parse_args(sft.Args, ["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name, value in vars(sft.Args()).items():
        assert f"--{name}" in help_text
        assert f"(default: {value})" in help_text
    args = utils.parse_args(sft.Args, ["--resume", "--epochs", "2", "--gradient_checkpointing", "false"])
    assert args.resume is True and args.epochs == 2 and args.gradient_checkpointing is False


@pytest.mark.parametrize("stage", ["sft", "train_reward", "train_cost", "ppo_lagrangian"])
def test_no_flag_is_swallowed_by_torchrun(stage):
    """torchrun expands abbreviations of its own options even after the script's name, so a flag that
    starts one of them (--nu for --numa-binding) would stop `torchrun ... stage.py --flag` with an error."""
    from torch.distributed.run import get_args_parser

    options = [o for action in get_args_parser()._actions for o in action.option_strings if o.startswith("--")]
    for field in dataclasses.fields(importlib.import_module(stage).Args):
        assert not any(option.startswith(f"--{field.name}") for option in options), field.name


FSDP_PROBE = """
import sys
sys.path.insert(0, {repo!r})
import torch
from torch.distributed.tensor import DTensor
import utils

process = utils.setup_distributed()
tokenizer = utils.load_tokenizer("toy_world/model")
frozen = utils.shard(utils.load_causal_lm("toy_world/model", tokenizer).requires_grad_(False))
trained = utils.shard(utils.load_causal_lm("toy_world/model", tokenizer))
ids = torch.tensor([[5, 6, 7]])
with torch.no_grad():
    frozen(input_ids=ids), trained(input_ids=ids)
sharded = isinstance(frozen.lm_head.weight, DTensor), isinstance(trained.lm_head.weight, DTensor)
sys.stdout.write(f"rank {{process.rank}}: head sharded after forward: {{sharded}}\\n")  # one write: lines stay whole
utils.cleanup_distributed()
"""


def test_a_frozen_sharded_model_frees_its_root_after_forward(tmp_path, torchrun):
    """FSDP keeps the root unit (embeddings, head) gathered after forward for the backward to come;
    a frozen model never runs one, so it gives its gathered root back like its blocks."""
    probe = tmp_path / "probe.py"
    probe.write_text(FSDP_PROBE.format(repo=os.getcwd()))
    result = torchrun(str(probe), 29537, {})
    for rank in (0, 1):
        assert f"rank {rank}: head sharded after forward: (True, False)" in result.stdout


# ----------------------------------------------------------------------------- batches over ranks


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("stage", ["sft", "train_reward", "train_cost", "ppo_lagrangian"])
def test_every_stage_splits_its_default_batches_over(stage, ranks):
    """With its defaults a stage runs at 1, 2, 4 and 8 ranks: each rank takes batch / ranks items, in
    micro-batches of at most micro_batch_size that together are exactly its share."""
    args = importlib.import_module(stage).Args()
    global_batches = [args.rollout_batch_size, args.minibatch_size] if stage == "ppo_lagrangian" else [args.batch_size]
    for global_batch in global_batches:
        share = utils.rank_share(global_batch, ranks, "batch")
        assert share * ranks == global_batch
        chunks = utils.micro_batches(list(range(share)), args.micro_batch_size)
        assert sum(chunks, []) == list(range(share)) and all(len(c) <= args.micro_batch_size for c in chunks)


def test_micro_batches_and_a_batch_that_cannot_be_split():
    assert utils.micro_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert utils.micro_batches([4, 5], 8) == [[4, 5]]
    with pytest.raises(ValueError, match=r"--rollout_batch_size 48 cannot be split evenly over 5 ranks: .*45 or 50"):
        utils.rank_share(48, 5, "rollout_batch_size")


# ----------------------------------------------------------------------------- optimizer and training state


def test_optimizer_as_the_original_no_decay_on_biases_and_norms(tmp_path):
    model = utils.load_score_model(TOY_MODEL, utils.load_tokenizer(TOY_MODEL))
    optimizer, scheduler = utils.optimizer_and_scheduler(model, 1e-3, 0.01, 0.1, 20)
    decayed, not_decayed = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.01 and not_decayed["weight_decay"] == 0.0
    assert decayed["betas"] == (0.9, 0.95)
    assert {names[id(p)] for p in not_decayed["params"]} == {
        n for n, p in model.named_parameters() if "norm" in n or n.endswith("bias")
    }
    assert any("norm" in names[id(p)] for p in not_decayed["params"])
    assert all(p.dim() == 2 for p in decayed["params"])  # projections, embeddings, the score head
    # cosine: 2 warmup steps (10% of 20), then decay to 0; constant: the rate from the first step
    rates = []
    for _ in range(20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and rates[-1] < 1e-5
    optimizer, scheduler = utils.optimizer_and_scheduler(model, 1e-3, 0.0, 0.1, 20, "constant")
    assert scheduler.get_last_lr()[0] == 1e-3


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    utils.seed_everything(3)
    random.random(), np.random.rand(), torch.rand(1)
    torch.save({"rng": utils.rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    utils.seed_everything(99)
    utils.set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
