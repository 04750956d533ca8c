"""A user's mistake gets one clear line; a killed or preempted run loses nothing.

What runs how:
- The bad-input table (BAD_INPUTS: 41 mistakes across the five stages) runs IN-PROCESS, each case through the
  very function a stage's `if __name__ == "__main__"` calls, `utils.run(main, Args)`, with `sys.argv` set to
  the case's command line and `os._exit` caught: the exit status and stderr a command would give, without
  the ~3 s interpreter start-up of one per case. Each case must print one line `error: ...` naming the file,
  row and field where there is one, exit with status 1, show no traceback, and leave every file of the
  fixture (an existing output folder among them) byte for byte as it was.
- Three representative cases of that table also run as real commands (`python stage.py ...`, subprocesses),
  as does the traceback with SAFE_RLHF_TRACEBACK=1 (`--help`'s mention of it is parsed in-process); one bad
  input runs under `torchrun --nproc_per_node=2` (a real launch), where the line must appear once.
- A JSONL file saved by a Windows tool (UTF-8 BOM, CRLF) loads, and a stage trains on it (in-process).
- A nan gradient, in-process: SFT (through its command line) and PPO-Lag (`main`) stop before the update,
  the last good checkpoint kept and no model stepped after it. A run stopped mid-training (nan, SIGTERM;
  in-process command line) ends with its line.
- The drills run as real commands (subprocesses), since they need signals: kill -9 of SFT at two seeded
  random moments (while it runs, before its last step) and inside a checkpoint write, then --resume, ends
  with the weights of an uninterrupted run (run in-process, one thread, as the commands); SIGTERM saves a
  checkpoint and exits 143, on every rank together under torchrun; PPO-Lag killed at a seeded random moment
  and resumed ends as an uninterrupted run.
"""

import hashlib
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import ENV, command, run, torchrun
from safetensors.torch import load_file, save_file

import ppo_lagrangian as ppo
import sft
import train_reward
import utils


def snapshot(folder):
    """Every file under `folder` and a hash of its bytes."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def as_argv(flags):
    return [item for name, value in flags.items() for item in (f"--{name}", str(value))]


@contextmanager
def one_thread():
    """An in-process run computes as the commands of the drills do (one thread each: conftest.ENV), so that the
    two can be compared bit for bit also when this file runs outside pytest-xdist."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    """The tiny random SFT and cost models, a reward model trained for one step with its training
    state (and a copy of it, `existing`, the output folder every case of the table writes to), and data files."""
    root = tmp_path_factory.mktemp("faults")
    for name in ("sft", "cost"):
        shutil.copytree(tiny_models / name, root / name)
    pairs = [json.loads(line) for line in open("toy_world/data/preference_train.jsonl").readlines()[:16]]
    good = write_jsonl(root / "pairs.jsonl", pairs)
    with one_thread():
        train_reward.main(
            train_reward.Args(
                model_name_or_path=str(root / "sft"), dataset=str(good), eval_dataset="none",
                output_dir=str(root / "reward"), batch_size=8, micro_batch_size=8, epochs=1, max_steps=1,
            )
        )  # fmt: skip
    shutil.copytree(root / "reward", root / "existing")
    # A score checkpoint that lost its head, an empty folder, and a file where a folder belongs.
    shutil.copytree(root / "cost", root / "headless")
    tensors = weights(root / "headless")
    save_file({k: v for k, v in tensors.items() if not k.startswith("score.")}, root / "headless" / "model.safetensors")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("my notes on the runs\n")
    conversations = [json.loads(line) for line in open("toy_world/data/sft_train.jsonl").readlines()[:32]]
    write_jsonl(root / "conversations.jsonl", conversations)  # 4 steps of 8 per epoch

    data = root / "data"
    data.mkdir()
    write_jsonl(
        data / "not_json.jsonl", [*conversations[:2], '{"prompt": "hi", "response": "hello"', *conversations[2:]]
    )
    (data / "latin1.jsonl").write_bytes(
        (json.dumps(conversations[0]) + "\n").encode() + '{"prompt": "café ?", "response": "oui"}\n'.encode("latin-1")
    )
    write_jsonl(data / "no_response.jsonl", [{"prompt": "how do i bake bread ?", "answer": "sure ."}])
    (data / "empty.jsonl").write_text("\n")
    bad_id = [dict(row) for row in pairs[:8]]
    bad_id[5]["better_response_id"] = 2
    write_jsonl(data / "bad_better_id.jsonl", bad_id)
    bad_safe = [dict(row) for row in pairs[:8]]
    bad_safe[2]["is_response_0_safe"] = "yes"
    write_jsonl(data / "bad_safe.jsonl", bad_safe)
    string_id = [dict(row) for row in pairs[:8]]
    string_id[2]["safer_response_id"] = str(string_id[2]["safer_response_id"])  # "0" or "1", as a CSV export has it
    write_jsonl(data / "string_id.jsonl", string_id)
    contradiction = next(row for row in pairs if not row["is_response_0_safe"] and row["is_response_1_safe"])
    write_jsonl(data / "contradiction.jsonl", [*pairs[:3], {**contradiction, "safer_response_id": 0}])
    (data / "dict.json").write_text(json.dumps({"prompt": "how do i bake bread ?"}))
    write_jsonl(data / "list_row.jsonl", [{"prompt": "how do i bake bread ?"}, '["how do i plant a tree ?"]'])
    write_jsonl(data / "chinese.jsonl", [{"prompt": "如何在家里烤面包？请一步一步地告诉我。"}] * 4)
    write_jsonl(data / "no_model.jsonl", [{"prompt": "how do i bake bread ?", "response": "sure ."}])
    # A .json edited by hand: pretty-printed, a trailing comma after the last row; JSON expects a value on line 12.
    trailing = json.dumps(conversations[:2], indent=2).removesuffix("\n]") + ",\n]"
    assert trailing.splitlines()[10:] == ["  },", "]"]
    (data / "trailing_comma.json").write_text(trailing)
    write_jsonl(data / "number_prompt.jsonl", [{"prompt": "how do i bake bread ?"}, {"prompt": 7}])
    write_jsonl(data / "empty_prompt.jsonl", [{"prompt": "how do i bake bread ?"}, {"prompt": " "}])
    # Rows written with Python's str(dict) instead of json.dumps: single quotes.
    write_jsonl(data / "python_repr.jsonl", [conversations[0], str(conversations[1])])
    (data / "answers.csv").write_text("prompt,response\nhow do i bake bread ?,sure .\n")
    return root


# ----------------------------------------------------------------------------- the bad-input table

# (stage, flags, what the one line must say). {root} is the fixture's folder; every command writes to
# {root}/existing, a copy of a finished run that must come out unchanged, unless it names another --output_dir.
BAD_INPUTS = [
    # data files
    ("sft.py", ["--dataset", "{root}/data/not_json.jsonl"], "not_json.jsonl: row 3: not valid JSON"),
    ("sft.py", ["--dataset", "{root}/data/latin1.jsonl"], "latin1.jsonl: row 2: not UTF-8 text"),
    ("sft.py", ["--dataset", "{root}/data/no_response.jsonl"], "no_response.jsonl: row 1: field 'response': missing"),
    ("sft.py", ["--dataset", "toy_world/data/sft_trian.jsonl"], "toy_world/data/sft_trian.jsonl: no such file"),
    ("sft.py", ["--dataset", "{root}/data/empty.jsonl"], "empty.jsonl: no rows"),
    ("sft.py", ["--dataset", "{root}/data"], "{root}/data: a folder, not a data file"),
    ("sft.py", ["--eval_dataset", "{root}/data/no_response.jsonl"], "no_response.jsonl: row 1: field 'response'"),
    (
        "train_reward.py",
        ["--dataset", "{root}/data/bad_better_id.jsonl"],
        "bad_better_id.jsonl: row 6: field 'better_response_id': must be 0 or 1, got 2",
    ),
    (
        "train_cost.py",
        ["--dataset", "{root}/data/bad_safe.jsonl"],
        "bad_safe.jsonl: row 3: field 'is_response_0_safe': expected bool, got 'yes'",
    ),
    (
        "train_cost.py",
        ["--dataset", "{root}/data/contradiction.jsonl", "--contradictions", "stop"],
        "contradiction.jsonl: 1 of 4 rows contradict themselves (the safer response is labelled unsafe and the other safe), e.g. rows [4]",
    ),
    ("train_reward.py", ["--dataset", "{root}/data/dict.json"], "dict.json: expected a JSON list of objects, got dict"),
    ("ppo_lagrangian.py", ["--prompts", "{root}/data/list_row.jsonl"], "list_row.jsonl: row 2: expected a JSON object"),
    # data files as users have them (issue 20, item 7)
    ("sft.py", ["--dataset", "{root}/data/trailing_comma.json"], "trailing_comma.json: line 12: not valid JSON"),
    (
        "train_cost.py",
        ["--dataset", "{root}/data/string_id.jsonl"],
        "string_id.jsonl: row 3: field 'safer_response_id': expected int, got '",
    ),
    (
        "evaluate.py",
        ["--models", "sft={root}/sft", "--prompts", "{root}/data/number_prompt.jsonl"],
        "number_prompt.jsonl: row 2: field 'prompt': expected str, got 7",
    ),
    (
        "ppo_lagrangian.py",
        ["--prompts", "{root}/data/empty_prompt.jsonl"],
        "empty_prompt.jsonl: row 2: field 'prompt': empty",
    ),
    (
        "sft.py",
        ["--dataset", "{root}/data/python_repr.jsonl"],
        "python_repr.jsonl: row 2: not valid JSON (Expecting property name enclosed in double quotes)",
    ),
    (
        "sft.py",
        ["--dataset", "toy_world/data/preference_train.jsonl"],
        "preference_train.jsonl: row 1: field 'response': missing",
    ),
    ("sft.py", ["--dataset", "{root}/data/answers.csv"], "answers.csv: row 1: not valid JSON"),
    # flags
    ("sft.py", ["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    ("sft.py", ["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    ("sft.py", ["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    ("sft.py", ["--output_dir", ""], "--output_dir is empty"),
    ("sft.py", ["--output_dir", "{root}/notes.txt"], "--output_dir {root}/notes.txt is a file; name a folder"),
    ("sft.py", ["--resume", "flase"], "argument --resume: Truthy value expected: got flase"),
    (
        "sft.py",
        ["--num_train_epochs", "3"],
        "Some specified arguments are not used by the HfArgumentParser: ['--num_train_epochs', '3']",
    ),
    ("sft.py", ["--epoch", "1"], "not used by the HfArgumentParser: ['--epoch', '1']"),  # no abbreviations of --epochs
    (
        "sft.py",
        ["--dtype", "float16"],
        "argument --dtype: invalid choice: 'float16' (choose from 'auto', 'float32', 'bfloat16')",
    ),
    ("sft.py", ["--batch_size", "5000"], "sft_train.jsonl: 2688 conversations, fewer than one batch of 5000"),
    (
        "ppo_lagrangian.py",
        ["--algorithm", "ppo_lagg"],
        "argument --algorithm: invalid choice: 'ppo_lagg' (choose from 'ppo_lag', 'ppo', 'reward_shaping')",
    ),
    ("ppo_lagrangian.py", ["--temperature", "0"], "--temperature must be above 0, got 0.0"),
    ("evaluate.py", ["--models", "{root}/sft"], "--models {root}/sft: expected NAME=PATH"),
    ("evaluate.py", ["--responses", "{root}/data/no_model.jsonl"], "no_model.jsonl: row 1: field 'model': missing"),
    # model folders
    ("sft.py", ["--model_name_or_path", "./ouput/sft"], "./ouput/sft: no such model folder"),
    ("train_reward.py", ["--model_name_or_path", "{root}/empty"], "empty: no config.json, so not a model folder"),
    ("sft.py", ["--model_name_or_path", "toy_world/data"], "toy_world/data: no config.json, so not a model folder"),
    (
        "evaluate.py",
        ["--models", "sft={root}/sft", "ppo_lag=output/ppo_lagg"],
        "output/ppo_lagg: no such model folder (a stage's output: run that stage first)",
    ),
    ("ppo_lagrangian.py", ["--reward_model", "{root}/sft"], "sft is a language model (LlamaForCausalLM)"),
    ("ppo_lagrangian.py", ["--cost_model", "{root}/headless"], "headless: the score head's weights (score.weight)"),
    ("ppo_lagrangian.py", ["--prompts", "{root}/data/chinese.jsonl"], "its tokenizer reads 100% of the prompt tokens"),
    # checkpoints and --resume
    ("train_reward.py", ["--output_dir", "{root}/empty", "--resume"], "empty holds no checkpoint to continue"),
    (
        "train_cost.py",
        ["--output_dir", "{root}/reward", "--resume"],
        "holds a checkpoint of train_reward.py, not of train_cost.py",
    ),
    (
        "train_reward.py",
        ["--output_dir", "{root}/reward", "--resume", "--epochs", "1", "--learning_rate", "0.5"],
        "holds a run with other flags (--learning_rate 0.001 there, 0.5 here)",
    ),
]


def stage_defaults(stage, root):
    """Flags that point a stage at the fixture's models and at the existing output folder."""
    flags = {"--output_dir": f"{root}/existing"}
    if stage in ("train_reward.py", "train_cost.py"):
        flags.update({"--model_name_or_path": f"{root}/sft", "--dataset": f"{root}/pairs.jsonl"})
        flags.update({"--eval_dataset": "none", "--max_steps": "1", "--batch_size": "8", "--reward_model": "none"})
        if stage == "train_reward.py":
            flags.pop("--reward_model")
    if stage == "ppo_lagrangian.py":
        flags.update({"--actor_model_name_or_path": f"{root}/sft", "--reward_model": f"{root}/reward"})
        flags.update({"--cost_model": f"{root}/cost", "--iterations": "1", "--eval_prompts": "none"})
    if stage == "evaluate.py":
        flags.update({"--reward_model": f"{root}/reward", "--cost_model": f"{root}/cost"})
    return flags


def run_in_process(stage, argv, monkeypatch, capsys):
    """The stage's command line (`utils.run`, as its `__main__` calls it) in this process: exit status and stderr,
    as a command would give them, without the interpreter start-up of one."""
    module = importlib.import_module(stage.removesuffix(".py"))

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(sys, "argv", [stage, *argv])
    monkeypatch.setattr(os, "_exit", leave)
    monkeypatch.setattr(utils.signal, "signal", lambda *args: None)  # leave pytest's handlers alone
    with pytest.raises(SystemExit) as stopped:
        utils.run(module.main, module.Args)
    return stopped.value.code, capsys.readouterr().err


def assert_one_clear_line(status, stderr, message):
    last_line = stderr.strip().splitlines()[-1]
    assert status == 1, stderr[-2000:]
    assert last_line.startswith("error: ") and message in last_line, last_line
    assert "Traceback" not in stderr and stderr.count("error: ") == 1


def case_id(case):
    stage, _, message = case.values if hasattr(case, "values") else case
    return f"{stage}:{message[:40]}"


@pytest.mark.parametrize("stage, flags, message", BAD_INPUTS, ids=map(case_id, BAD_INPUTS))
def test_a_bad_input_stops_with_one_clear_line(world, stage, flags, message, monkeypatch, capsys):
    flags = [flag.format(root=world) for flag in flags]
    defaults = stage_defaults(stage, world)
    for name in flags[::2]:
        defaults.pop(name, None)
    before = snapshot(world)  # the existing output folder, the models, the data files
    argv = [item for pair in defaults.items() for item in pair] + flags
    assert_one_clear_line(*run_in_process(stage, argv, monkeypatch, capsys), message.format(root=world))
    assert snapshot(world) == before


def test_a_jsonl_saved_by_a_windows_tool_loads(world, tmp_path, monkeypatch, capsys):
    """Notepad and Excel save UTF-8 with a byte-order mark and CRLF line ends: the rows are those of the plain
    file, and a stage trains on it (its command line, in-process: exit status 0)."""
    plain = "toy_world/data/sft_train.jsonl"
    lines = open(plain).read().splitlines()[:16]
    windows = tmp_path / "sft_windows.jsonl"
    windows.write_bytes("\ufeff".encode() + "".join(line + "\r\n" for line in lines).encode())
    assert windows.read_bytes().startswith(b"\xef\xbb\xbf{") and b"}\r\n{" in windows.read_bytes()
    assert utils.load_rows(str(windows), "sft") == [json.loads(line) for line in lines]
    argv = as_argv(
        dict(model_name_or_path=world / "sft", dataset=windows, eval_dataset="none", sample_prompts="none",
             output_dir=tmp_path / "run", batch_size=16, micro_batch_size=16, epochs=1)
    )  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
    monkeypatch.setattr(utils.signal, "signal", lambda *args: None)
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail(f"exit status {code}: {capsys.readouterr().err}"))
    utils.run(sft.main, sft.Args)  # returns (no os._exit) when the run succeeds
    assert "error" not in capsys.readouterr().err
    assert torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)["step"] == 1


@pytest.mark.parametrize(
    "stage, flags, message",
    [
        ("train_reward.py", ["--output_dir", "{root}/empty", "--resume"], "empty holds no checkpoint to continue"),
        ("sft.py", ["--model_name_or_path", "./ouput/sft"], "./ouput/sft: no such model folder"),
        ("sft.py", ["--dataset", "{root}/data/latin1.jsonl"], "latin1.jsonl: row 2: not UTF-8 text"),
    ],
)
def test_the_issues_three_cases_as_commands(world, stage, flags, message):
    """What a user saw as a hub error, a model-type error and a bare UnicodeDecodeError, run as real commands."""
    argv = [flag.format(root=world) for flag in flags] + ["--output_dir", str(world / "unused")] * (
        "--resume" not in flags
    )
    result = run(command(stage, *argv), expect=1)
    assert_one_clear_line(result.returncode, result.stderr, message)
    assert not (world / "unused").exists()


def test_the_traceback_is_there_when_asked_for(world, capsys):
    flags = ["--dataset", f"{world}/data/not_json.jsonl", "--output_dir", f"{world}/unused"]
    result = subprocess.run(
        command("sft.py", *flags), capture_output=True, text=True, timeout=300, env={**ENV, "SAFE_RLHF_TRACEBACK": "1"}
    )
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert "utils.UserError: " in result.stderr and "not_json.jsonl: row 3: not valid JSON" in result.stderr
    with pytest.raises(SystemExit) as stopped:  # --help says so (in-process: argparse prints it and exits 0)
        utils.parse_args(sft.Args, ["--help"])
    help_text = capsys.readouterr().out
    assert stopped.value.code == 0 and "SAFE_RLHF_TRACEBACK=1" in help_text and "--resume" in help_text


def test_under_torchrun_the_line_appears_once_and_every_rank_exits(world):
    flags = dict(
        dataset=f"{world}/data/string_id.jsonl", output_dir=f"{world}/unused", model_name_or_path=f"{world}/sft",
        eval_dataset="none", reward_model="none",
    )  # fmt: skip
    result = torchrun("train_cost.py", expect=1, **flags)
    output = result.stdout + result.stderr
    assert output.count("error: ") == 1 and "row 3: field 'safer_response_id': expected int, got '" in output
    assert 'File "' + os.path.abspath("train_cost.py") not in output  # no traceback of ours (torchrun adds its report)
    assert not os.path.exists(f"{world}/unused")


# ----------------------------------------------------------------------------- nan gradients


def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch, capsys):
    """A learning rate of 1e30 blows the weights up within the first steps (the warmup starts at 0): the gradient
    of the next step is nan or inf, and the run stops before that update, its last checkpoint kept."""
    output_dir = tmp_path
    argv = as_argv(
        dict(model_name_or_path=world / "sft", dataset=world / "conversations.jsonl", eval_dataset="none",
             sample_prompts="none", output_dir=output_dir, batch_size=8, micro_batch_size=8, epochs=2, save_every=1,
             learning_rate=1e30)
    )  # fmt: skip
    trained = []  # the model as the run left it in memory
    real_optimizer = utils.optimizer_and_scheduler

    def optimizer_and_scheduler(model, *settings):
        trained.append(model)
        return real_optimizer(model, *settings)

    monkeypatch.setattr(utils, "optimizer_and_scheduler", optimizer_and_scheduler)
    status, stderr = run_in_process("sft.py", argv, monkeypatch, capsys)
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert status == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    found = re.fullmatch(r"error: step (\d+): the gradient norm is (nan|inf): stopped before this update.*", lines[0])
    assert found, lines[0]
    failed_step = int(found.group(1))
    assert 1 < failed_step < 8  # a checkpoint was saved before it, and the run had steps left
    state = torch.load(output_dir / "training_state.pt", weights_only=True)
    assert state["step"] == failed_step - 1  # the last update that was finite, saved; the bad one never ran:
    saved, in_memory = weights(output_dir), trained[0].state_dict()
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())
    assert all(torch.equal(in_memory[name], tensor) for name, tensor in saved.items())


@pytest.mark.parametrize("stop", ["a nan gradient", "SIGTERM"])
def test_a_run_stopped_mid_training_ends_with_its_line(world, stop, tmp_path, monkeypatch, capsys):
    """The line a user reads last is the error or the SIGTERM notice, not the progress bar (the drills below see
    the line, wherever it is)."""
    output_dir = tmp_path
    flags = dict(model_name_or_path=world / "sft", dataset=world / "conversations.jsonl", eval_dataset="none",
                 sample_prompts="none", output_dir=output_dir, batch_size=8, micro_batch_size=8)  # fmt: skip
    if stop == "SIGTERM":
        monkeypatch.setattr(utils, "_sigterm_received", [signal.SIGTERM])  # as run's handler notes it
    else:
        flags["learning_rate"] = 1e30
    status, stderr = run_in_process("sft.py", as_argv(flags), monkeypatch, capsys)
    last_line = stderr.strip().splitlines()[-1]
    expected = "error: step " if stop != "SIGTERM" else "stopped by SIGTERM after step 1;"
    assert status == (1 if stop != "SIGTERM" else 128 + signal.SIGTERM) and last_line.startswith(expected), last_line


def test_ppo_lag_stops_on_a_nan_gradient_before_any_model_steps(world, tmp_path, monkeypatch):
    """One update per iteration, a checkpoint after each. The critics' learning rate blows them up in the first
    update (finite, so iteration 1's checkpoint is written); in iteration 2 their values overflow and the first
    update's gradients are not finite (all three: the values feed the actor's advantages). The run stops there: the actor and both critics in memory are still
    exactly those of iteration 1's checkpoint, and iteration 2's checkpoint was never written."""
    args = ppo.Args(
        actor_model_name_or_path=str(world / "sft"), reward_model=str(world / "reward"),
        cost_model=str(world / "cost"), eval_prompts="none", iterations=3, rollout_batch_size=4, minibatch_size=4,
        micro_batch_size=4, max_new_tokens=6, save_every=1, warmup_ratio=0.0, critic_lr=1e30,
        output_dir=str(tmp_path),
    )  # fmt: skip
    in_memory = {}
    real_update = ppo.ppo_update

    def update(args, process, wrapped, *rest, **kwargs):
        in_memory.update(wrapped)  # the models as they are trained: after the stop, as the stop left them
        return real_update(args, process, wrapped, *rest, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", update)
    with pytest.raises(utils.UserError, match=r"^iteration 2: the actor's update: the gradient norm is (nan|inf)"):
        ppo.main(args)
    assert torch.load(tmp_path / "training_state.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / ".tmp_checkpoint").exists() and not (tmp_path / utils.INTERRUPTED).exists()
    for name, folder in [("actor", tmp_path), ("reward_critic", tmp_path / "reward_critic"),
                         ("cost_critic", tmp_path / "cost_critic")]:  # fmt: skip
        model = in_memory[name]
        state = (model.model if isinstance(model, utils.ScoreModel) else model).state_dict()
        saved = weights(folder)
        assert saved and all(torch.isfinite(tensor).all() for tensor in saved.values()), name
        for key, tensor in saved.items():
            assert torch.equal(state[key], tensor), f"{name}: {key} stepped after the checkpoint"


# ----------------------------------------------------------------------------- kill -9 and SIGTERM drills

FINAL_STEP = 16


def sft_flags(output_dir, **changes):
    flags = dict(
        dataset="toy_world/data/sft_train.jsonl", eval_dataset="none", sample_prompts="none", output_dir=output_dir,
        epochs=1, batch_size=8, micro_batch_size=8, save_every=1, log_every=1, max_steps=FINAL_STEP,
    )  # fmt: skip
    flags.update(changes)
    return flags


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The weights of the SFT run every drill must end with (in-process, computed as the commands compute)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    with one_thread():
        sft.main(sft.Args(**sft_flags(str(folder))))
    return weights(folder)


def start(argv):
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def last_logged_step(metrics):
    lines = open(metrics).read().splitlines() if os.path.exists(metrics) else []
    return max([json.loads(line)["step"] for line in lines if line.endswith("}")], default=0)


def wait_for_step(folder, step, process, checkpoint=True, timeout=120):
    """Until the run in `folder` has logged `step` and, with `checkpoint`, has one to resume from; it must still
    be running."""
    started = time.time()
    while (
        last_logged_step(folder / "metrics.jsonl") < step or checkpoint and not (folder / "training_state.pt").exists()
    ):
        assert process.poll() is None, f"the run ended before step {step}: {process.stderr.read()[-2000:]}"
        assert time.time() - started < timeout
        time.sleep(0.02)


def kill_while_running(process, final_step, folder):
    """SIGKILL (no handler, no cleanup) a run that is still running; its last checkpoint is one before the end."""
    assert process.poll() is None, "the run finished before the kill"
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    state = torch.load(folder / "training_state.pt", weights_only=True)  # the last checkpoint loads
    assert 1 <= state["step"] < final_step
    return state["step"]


def test_kill_9_at_two_random_moments_then_resume_ends_as_an_uninterrupted_run(uninterrupted, tmp_path):
    """Killed twice (the second time after a resume), each time at a seeded random moment: after a random step
    has been logged, a random fraction of a step later, so that a kill may land anywhere in a step, a
    checkpoint write included."""
    rng = random.Random(14)
    argv = command("sft.py", *as_argv(sft_flags(tmp_path)))
    moments = [(rng.randint(2, 5), rng.uniform(0.0, 0.1)), (rng.randint(8, 11), rng.uniform(0.0, 0.1))]
    killed_at = []
    for i, (step, delay) in enumerate(moments):
        drill = start(argv + ["--resume"] * i)
        wait_for_step(tmp_path, step, drill)
        time.sleep(delay)
        killed_at.append(kill_while_running(drill, FINAL_STEP, tmp_path))
    assert killed_at[0] < killed_at[1]
    run(argv + ["--resume"])
    assert_same_weights(weights(tmp_path), uninterrupted)


# Runs a stage with `target` wrapped: the process kills itself (SIGKILL) on the n-th call that matches.
KILL_AT = """
import os, runpy, signal, sys, torch
calls = []
real = {target}
def dying(*args, **kwargs):
    if {matches}:
        calls.append(args)
        if len(calls) == {n}:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
{target} = dying
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
MOVING_THE_STATE = "str(args[0]).endswith(os.path.join('.checkpoint_to_move', 'training_state.pt'))"


@pytest.mark.parametrize(
    "target, matches, n",
    [
        ("torch.save", "True", 3),  # writing the third checkpoint's training state, in the temporary folder
        ("os.replace", MOVING_THE_STATE, 2),  # the second checkpoint committed, its files half moved into place
    ],
)
def test_kill_9_during_a_checkpoint_write_never_leaves_a_half_written_checkpoint(
    uninterrupted, tmp_path, target, matches, n
):
    flags = sft_flags(tmp_path)
    script = KILL_AT.format(target=target, matches=matches, n=n)
    killed = subprocess.run(
        [sys.executable, "-c", script, "sft.py", *as_argv(flags)], capture_output=True, text=True, env=ENV
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    if target == "torch.save":
        # The kill hit the temporary folder: the checkpoint in place is the previous one, whole.
        assert state["step"] == 2 and (tmp_path / ".tmp_checkpoint").exists()
        assert not (tmp_path / utils.INTERRUPTED).exists()
    else:
        # Committed but not all moved: readers are told, --resume finishes the move first.
        assert (tmp_path / utils.INTERRUPTED).exists()
        with pytest.raises(utils.UserError, match="writing its last checkpoint was interrupted"):
            utils.load_tokenizer(str(tmp_path))
    run(command("sft.py", *as_argv(flags), "--resume"))
    assert_same_weights(weights(tmp_path), uninterrupted)
    assert not (tmp_path / utils.INTERRUPTED).exists() and not (tmp_path / ".tmp_checkpoint").exists()


def test_sigterm_saves_exits_and_resume_ends_as_an_uninterrupted_run(uninterrupted, tmp_path):
    flags = sft_flags(tmp_path, save_every=1000)  # the only checkpoint before the end is SIGTERM's
    drill = start(command("sft.py", *as_argv(flags)))
    wait_for_step(tmp_path, 2, drill, checkpoint=False)
    assert drill.poll() is None
    drill.send_signal(signal.SIGTERM)
    _, stderr = drill.communicate(timeout=120)
    assert drill.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("stopped by SIGTERM")]  # once
    assert line.startswith("stopped by SIGTERM after step ") and "--resume" in line, line
    stopped_at = int(line.split("after step ")[1].split(";")[0])
    assert torch.load(tmp_path / "training_state.pt", weights_only=True)["step"] == stopped_at < FINAL_STEP
    run(command("sft.py", *as_argv(flags), "--resume"))
    assert_same_weights(weights(tmp_path), uninterrupted)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, FINAL_STEP + 1))  # every step logged once


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(uninterrupted, tmp_path):
    """As a cluster does: SIGTERM to the launcher, which passes it to its ranks. Both ranks finish the step,
    save together and exit; resumed on two ranks, the run ends with the one-process run's weights."""
    flags = sft_flags(tmp_path, save_every=1000)
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    drill = subprocess.Popen(
        [launcher, "--standalone", "--nproc_per_node=2", "sft.py", *as_argv(flags)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    wait_for_step(tmp_path, 1, drill, checkpoint=False)
    assert drill.poll() is None
    drill.send_signal(signal.SIGTERM)
    stdout, stderr = drill.communicate(timeout=120)
    assert drill.returncode != 0
    assert (stdout + stderr).count("stopped by SIGTERM after step ") == 1, stderr[-3000:]
    stopped_at = torch.load(tmp_path / "training_state.pt", weights_only=True)["step"]
    assert 1 <= stopped_at < FINAL_STEP
    torchrun("sft.py", "--resume", **flags)
    two_ranks = weights(tmp_path)
    for name in uninterrupted:
        assert torch.allclose(two_ranks[name], uninterrupted[name], atol=1e-5), name


def test_ppo_lag_killed_then_resumed_ends_as_an_uninterrupted_run(world, tmp_path):
    """The RL state too: λ, the PID controller, the episode-cost window, both critics, every RNG. The kill lands
    at a seeded random moment of a run that is still running."""
    flags = dict(
        actor_model_name_or_path=str(world / "sft"), reward_model=str(world / "reward"),
        cost_model=str(world / "cost"), eval_prompts="none", iterations=6, rollout_batch_size=8, minibatch_size=4,
        micro_batch_size=4, max_new_tokens=6, save_every=1, lambda_update="pid", episode_cost_window=12,
    )  # fmt: skip
    with one_thread():
        ppo.main(ppo.Args(**flags, output_dir=str(tmp_path / "whole")))
    folder = tmp_path / "killed"
    argv = command("ppo_lagrangian.py", *as_argv({**flags, "output_dir": folder}))
    rng = random.Random(3)
    drill = start(argv)
    wait_for_step(folder, rng.randint(1, 3), drill)
    time.sleep(rng.uniform(0.0, 0.2))
    kill_while_running(drill, 6, folder)
    run(argv + ["--resume"])
    whole = torch.load(tmp_path / "whole" / "training_state.pt", weights_only=True)
    resumed = torch.load(folder / "training_state.pt", weights_only=True)
    assert resumed["step"] == whole["step"] == 6
    assert resumed["log_lambda"] == whole["log_lambda"] and resumed["controller"] == whole["controller"]
    assert resumed["episode_costs"] == pytest.approx(whole["episode_costs"], abs=1e-6)
    for part in (".", "reward_critic", "cost_critic"):
        a, b = weights(tmp_path / "whole" / part), weights(folder / part)
        assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a), part
