"""Tests of the shared plumbing: template and masking, data contract errors, schedule, flags, saving and resuming."""

import dataclasses
import importlib
import json
import math
import os
import sys

import pytest
import torch
from conftest import torchrun

import sft
import utils

TOY_MODEL = "toy_world/model"


# ----------------------------------------------------------------------------- template and masking


def test_prompt_template_is_the_original_one():
    assert utils.PROMPT_TEMPLATE.format(prompt="hi ?") == "BEGINNING OF CONVERSATION: USER: hi ? ASSISTANT:"


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
    assert example_ids == ids
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
    input_ids, attention_mask = utils.batch_inputs([[5, 6, 7], [8]], 0, "cpu")
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
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
    with pytest.raises(utils.UserError) as error:
        utils.load_rows(path, "preference")
    message = str(error.value)
    assert path in message and "row 3" in message and f"'{field}'" in message and problem in message


def test_bad_json_names_file_and_row(tmp_path):
    path = write(tmp_path / "sft.jsonl", ['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '])
    with pytest.raises(utils.UserError, match=r"sft.jsonl: row 2: not valid JSON"):
        utils.load_rows(path, "sft")


def test_empty_file_and_non_object_rows(tmp_path):
    with pytest.raises(utils.UserError, match=r"empty.jsonl: no rows"):
        utils.load_rows(write(tmp_path / "empty.jsonl", []), "sft")
    with pytest.raises(utils.UserError, match=r"list.jsonl: row 1: expected a JSON object"):
        utils.load_rows(write(tmp_path / "list.jsonl", ["[1, 2]"]), "prompt")
    (tmp_path / "obj.json").write_text('{"prompt": "x"}')
    with pytest.raises(utils.UserError, match=r"obj.json: expected a JSON list"):
        utils.load_rows(str(tmp_path / "obj.json"), "prompt")


def test_sft_rows_accept_alpaca_schema_and_keep_extra_fields(tmp_path):
    """Alpaca's instruction and input are joined with a space, as the original's Alpaca dataset does."""
    rows = [
        {"instruction": "add", "input": "1 and 2", "output": "3"},
        {"instruction": "greet", "input": "", "output": "hello"},
        {"prompt": "p", "response": "r", "category": "benign"},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    loaded = utils.load_rows(str(path), "sft")
    assert [(r["prompt"], r["response"]) for r in loaded] == [("add 1 and 2", "3"), ("greet", "hello"), ("p", "r")]
    assert loaded[2]["category"] == "benign"
    with pytest.raises(utils.UserError, match=r"bad.jsonl: row 1: field 'output': missing"):
        utils.load_rows(write(tmp_path / "bad.jsonl", ['{"instruction": "x"}']), "sft")


def test_a_jsonl_file_with_a_bom_and_crlf_line_ends_loads_as_its_rows(tmp_path):
    """As Windows editors save it: a UTF-8 byte order mark, then lines ending in \\r\\n (one blank)."""
    rows = [{"prompt": "héllo", "response": "a"}, {"prompt": "two", "response": "b"}]
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join([json.dumps(rows[0]), "", json.dumps(rows[1]), ""]).encode())
    assert utils.load_rows(str(path), "sft") == rows
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())  # the BOM before a JSON list too
    assert utils.load_rows(str(path), "sft") == rows


def test_a_json_list_loads_from_a_json_or_a_jsonl_file(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    for name in ("prompts.json", "prompts.jsonl"):
        (tmp_path / name).write_text(json.dumps(rows, indent=2))  # over several lines, as json.dump writes it
        assert utils.load_rows(str(tmp_path / name), "prompt") == rows


def test_shipped_toy_files_pass_their_schemas():
    assert len(utils.load_rows("toy_world/data/preference_test.jsonl", "preference")) > 100
    assert len(utils.load_rows("toy_world/data/sft_test.jsonl", "sft")) > 100
    assert {r["category"] for r in utils.load_rows("toy_world/data/prompts_eval.jsonl", "prompt")} == {
        "benign",
        "borderline",
        "harmful",
    }


# ----------------------------------------------------------------------------- optimizer and schedule


def learning_rates(optimizer, scheduler, steps):
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_cosine_schedule_starts_at_zero_warms_up_then_decays_to_zero():
    """transformers' cosine with warmup: lr · s / W for s < W, then lr · (1 + cos(π (s - W) / (T - W))) / 2.
    Here lr 1e-3, T = 10 steps, W = ceil(0.2 · 10) = 2: 0, 5e-4, then 1e-3 · (1 + cos(π k / 8)) / 2."""
    model = torch.nn.Linear(2, 2)
    rates = learning_rates(*utils.optimizer_and_scheduler(model, 1e-3, 0.0, 0.2, 10), 11)
    cosine = [1.0, 0.9619398, 0.8535534, 0.6913417, 0.5, 0.3086583, 0.1464466, 0.0380602, 0.0]  # (1 + cos(πk/8))/2
    assert rates == pytest.approx([0.0, 5e-4] + [1e-3 * c for c in cosine], abs=1e-9)
    rates = learning_rates(*utils.optimizer_and_scheduler(model, 1e-3, 0.0, 0.2, 10, "constant"), 3)
    assert rates == [1e-3] * 3  # constant: no warmup


def test_optimizer_as_the_original_no_decay_on_biases_and_norms(tokenizer):
    model = utils.load_model(TOY_MODEL, tokenizer, score=True)
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
    # cosine: 2 warmup steps (10% of 20) from 0, then decay to 0
    rates = learning_rates(optimizer, scheduler, 20)
    assert rates[:3] == pytest.approx([0.0, 5e-4, 1e-3]) and rates[-1] < 1e-5


# ----------------------------------------------------------------------------- models, flags


def test_generation_is_the_same_alone_and_left_padded_in_a_batch(tokenizer):
    torch.manual_seed(0)
    model = utils.load_model(TOY_MODEL, tokenizer).eval()
    prompts = [
        utils.tokenize_conversation(tokenizer, p, None, 64)[0]
        for p in ["how do i bake bread ?", "i want to grow tomatoes . what should i do ?"]
    ]
    assert len(prompts[0]) != len(prompts[1])
    batched, length = utils.generate(model, tokenizer, prompts, 12, greedy=True)
    for i, prompt in enumerate(prompts):
        alone, alone_length = utils.generate(model, tokenizer, [prompt], 12, greedy=True)
        assert batched[i, length:].tolist() == alone[0, alone_length:].tolist()


def test_the_decoding_bench_compares_the_same_tokens(tokenizer):
    """bench/decoding.py times utils.generate against a hand-written KV-cache loop: both give the same tokens, greedy
    and sampled from the same seed (so the two sample the same distribution), with padding after an EOS."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    import decoding

    torch.manual_seed(0)
    model = utils.load_model(TOY_MODEL, tokenizer).eval()
    favour_eos = torch.zeros(len(tokenizer))
    favour_eos[tokenizer.eos_token_id] = 4.0  # p(EOS) about 1/7 a step: answers end at different steps
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + favour_eos)
    prompts = [[tokenizer.bos_token_id, 5, 6, 7], [tokenizer.bos_token_id, 8, 9, 10, 11, 12], [tokenizer.bos_token_id]]
    ended = 0
    for greedy, temperature in ((True, 1.0), (False, 1.0), (False, 0.5)):
        torch.manual_seed(1)
        ours, length = utils.generate(model, tokenizer, prompts, 40, temperature, greedy)
        torch.manual_seed(1)
        hand, hand_length = decoding.hand_generate(model, tokenizer, prompts, 40, temperature, greedy)
        assert torch.equal(ours, hand) and length == hand_length
        ended += (ours[:, length:] == tokenizer.eos_token_id).any(1).sum().item()
    assert ended >= 3, "too few answers ended: the padding after an EOS was hardly compared"


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


def run_stage(module, argv, monkeypatch, capsys):
    """`python stage.py argv` in this process: (exit status, stderr). utils.run leaves by os._exit on an error."""

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    monkeypatch.setattr(os, "_exit", leave)
    monkeypatch.setattr(utils.signal, "signal", lambda *args: None)  # leave pytest's handlers alone
    with pytest.raises(SystemExit) as stopped:
        utils.run(module.main, module.Args)
    return stopped.value.code, capsys.readouterr().err


def test_an_output_dir_that_is_a_file_stops_with_one_line(tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    status, stderr = run_stage(sft, ["--output_dir", str(notes)], monkeypatch, capsys)
    assert status == 1
    assert stderr == f"error: --output_dir {notes} is a file; name a folder (it is created if missing)\n"
    assert notes.read_text() == "mine"


# ----------------------------------------------------------------------------- batches over ranks


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("stage", ["sft", "train_reward", "train_cost", "ppo_lagrangian"])
def test_every_stage_splits_its_default_batches_over(stage, ranks):
    """With its defaults a stage runs at 1, 2, 4 and 8 ranks: each rank takes batch / ranks items."""
    args = importlib.import_module(stage).Args()
    global_batches = [args.rollout_batch_size, args.minibatch_size] if stage == "ppo_lagrangian" else [args.batch_size]
    for global_batch in global_batches:
        share = utils.rank_share(global_batch, ranks, "batch")
        assert share >= 1 and share * ranks == global_batch


def test_a_batch_that_cannot_be_split_stops_with_what_to_change():
    with pytest.raises(utils.UserError, match=r"^--rollout_batch_size 48 cannot be split evenly over 5 ranks: make"):
        utils.rank_share(48, 5, "rollout_batch_size")


# ----------------------------------------------------------------------------- checkpoints and resuming


def test_save_check_resume_and_start_run_round_trip(tmp_path, tokenizer):
    """A checkpoint holds all a run needs to continue: the weights (saved over an earlier checkpoint, nothing left
    half moved), the optimizer keyed by parameter names, the schedule, the step, the RNG; check_resume finds it and
    start_run puts it back, and keeps the metrics up to its step (a line cut by a kill goes too)."""
    args = sft.Args(output_dir=str(tmp_path), resume=True)
    process = utils.setup_distributed("float32")
    torch.manual_seed(0)
    model = utils.load_model(TOY_MODEL, tokenizer)
    optimizer, scheduler = utils.optimizer_and_scheduler(model, 1e-3, 0.01, 0.5, 4)
    trained = dict(models={"model": model}, optimizers={"model": optimizer}, schedulers={"model": scheduler})
    ids = torch.tensor([utils.tokenize_conversation(tokenizer, "how do i bake bread ?", "mix flour .")[0]])
    for step in (1, 2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        utils.save_checkpoint(str(tmp_path), tokenizer, **trained, args=args, step=step)  # the second replaces
    expected_draws = torch.rand(3)  # what the run draws next
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "training_state.pt"]
        + ["tokenizer.json", "tokenizer_config.json"]
    )  # no temporary folder left
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')

    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert (state["format"], state["stage"], state["step"], len(state["rng"])) == (2, "sft.py", 2, 1)
    saved_optimizer = state["optimizers"]["model"]
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(saved_optimizer["state"]) == sorted(names)  # keyed by name, not by position
    assert saved_optimizer["state"]["model.embed_tokens.weight"]["step"] == 2  # tied to lm_head: saved once

    torch.manual_seed(123)  # another RNG state, another model and optimizer: all restored below
    saved = utils.check_resume(args, str(tmp_path))
    resumed = utils.load_model(str(tmp_path), utils.load_tokenizer(str(tmp_path)))
    new_optimizer, new_scheduler = utils.optimizer_and_scheduler(resumed, 1e-3, 0.01, 0.5, 4)
    metrics = utils.start_run(
        str(tmp_path), saved, process, {"model": resumed}, {"model": new_optimizer}, {"model": new_scheduler}
    )
    assert torch.equal(torch.rand(3), expected_draws)
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert new_scheduler.get_last_lr() == scheduler.get_last_lr() and new_scheduler.last_epoch == 2
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(new_optimizer.state[q][key], optimizer.state[p][key]), (name, key)
    assert open(metrics).read() == '{"step": 1}\n{"step": 2}\n'


def test_a_checkpoint_of_an_earlier_version_stops_with_one_line(tmp_path, monkeypatch, capsys):
    torch.save({"step": 3, "iteration": 3, "args": {}}, tmp_path / "training_state.pt")  # no "format": 2
    status, stderr = run_stage(sft, ["--output_dir", str(tmp_path), "--resume"], monkeypatch, capsys)
    assert status == 1
    assert stderr == (
        f"error: --resume: {tmp_path} holds a checkpoint of an earlier version of this code (start a new run), "
        "not of sft.py\n"
    )


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    torch.manual_seed(0)
    model = utils.load_model(TOY_MODEL, tokenizer)
    utils.save_checkpoint(str(tmp_path), tokenizer, {"model": model})
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)
    with pytest.raises(OSError):
        utils.save_checkpoint(str(tmp_path), tokenizer, {"model": model})
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name != ".tmp_checkpoint"}
    assert after == before


FSDP_PROBE = """
import os, sys
sys.path.insert(0, {repo!r})
from types import SimpleNamespace
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import sft, utils

process = utils.setup_distributed()
tokenizer = utils.load_tokenizer("toy_world/model")
flags = SimpleNamespace(fsdp=True, gradient_checkpointing=False)
frozen = utils.wrap(utils.load_model("toy_world/model", tokenizer).requires_grad_(False), process, flags)
trained = utils.wrap(utils.load_model("toy_world/model", tokenizer), process, flags)
optimizer, scheduler = utils.optimizer_and_scheduler(trained, 1e-3, 0.0, 0.0, 2)  # before a forward gathers a root
ids = torch.tensor([[5, 6, 7]])
with torch.no_grad():
    frozen(input_ids=ids), trained(input_ids=ids)
sharded = isinstance(frozen.lm_head.weight, DTensor), isinstance(trained.lm_head.weight, DTensor)
trained(input_ids=ids, labels=ids).loss.backward()
optimizer.step()
torch.manual_seed(process.rank)  # each rank's own RNG
utils.save_checkpoint({out!r}, tokenizer, {{"model": trained}}, {{"model": optimizer}}, {{"model": scheduler}},
                      args=sft.Args(output_dir={out!r}), step=1)
state = torch.load(os.path.join({out!r}, "training_state.pt"), weights_only=True)
moments = state["optimizers"]["model"]["state"]["model.embed_tokens.weight"]["exp_avg"]
rngs = [torch.equal(rng, torch.manual_seed(rank).get_state()) for rank, rng in enumerate(state["rng"])]
full = type(moments).__name__, tuple(moments.shape) == tuple(trained.model.embed_tokens.weight.shape)
sys.stdout.write(f"rank {{process.rank}}: head sharded after forward: {{sharded}}; saved moments {{full}}; "
                 f"each rank's RNG: {{rngs}}\\n")  # one write: lines stay whole
dist.destroy_process_group()
"""


def test_fsdp_frees_a_frozen_root_and_saves_whole_state_with_every_ranks_rng(tmp_path):
    """FSDP keeps the root unit (embeddings, head) gathered after forward for the backward to come; a frozen model
    never runs one, so it gives its gathered root back like its blocks. A sharded model's checkpoint holds its
    optimizer moments whole (gathered, keyed by name) and the RNG state of every rank."""
    probe = tmp_path / "probe.py"
    probe.write_text(FSDP_PROBE.format(repo=os.getcwd(), out=str(tmp_path / "checkpoint")))
    result = torchrun(str(probe))
    for rank in (0, 1):
        assert (
            f"rank {rank}: head sharded after forward: (True, False); saved moments ('Tensor', True); "
            "each rank's RNG: [True, True]" in result.stdout
        ), result.stdout
