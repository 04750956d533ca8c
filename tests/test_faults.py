"""A user's mistake gets one clear line; a killed or preempted run loses nothing.

The commands run as a user runs them (subprocesses, CPU, fp32): a bad input stops with one line
`error: ...` naming the file, row and field, exit status 1, no traceback, and leaves an existing output
folder as it was; kill -9 at any point, then --resume, ends with the weights of an uninterrupted run;
SIGTERM saves a checkpoint and exits 143, on every rank together under torchrun.
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

import pytest
import torch
from safetensors.torch import load_file, save_file

import ppo_lagrangian as ppo
import train_reward
import utils

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop(utils.TRACEBACK_VARIABLE, None)


def command(script, *flags):
    return [sys.executable, script, *[str(flag) for flag in flags]]


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


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random toy SFT model, a trained-for-a-few-steps reward model with its training state, a random cost
    model, and the data files of the bad-input table."""
    root = tmp_path_factory.mktemp("faults")
    tokenizer = utils.load_tokenizer("toy_world/model")
    torch.manual_seed(0)
    utils.save_checkpoint(str(root / "sft"), utils.load_causal_lm("toy_world/model", tokenizer), tokenizer)
    utils.save_checkpoint(str(root / "cost"), utils.load_score_model("toy_world/model", tokenizer).model, tokenizer)
    pairs = [json.loads(line) for line in open("toy_world/data/preference_train.jsonl").readlines()[:40]]
    good = write_jsonl(root / "pairs.jsonl", pairs)
    train_reward.main(
        train_reward.Args(
            model_name_or_path=str(root / "sft"), dataset=str(good), eval_dataset="none",
            output_dir=str(root / "reward"), batch_size=8, micro_batch_size=8, epochs=1, max_steps=2,
        )
    )  # fmt: skip
    # A score checkpoint that lost its head, and an empty folder.
    shutil.copytree(root / "cost", root / "headless")
    tensors = weights(root / "headless")
    save_file({k: v for k, v in tensors.items() if not k.startswith("score.")}, root / "headless" / "model.safetensors")
    (root / "empty").mkdir()

    data = root / "data"
    data.mkdir()
    conversations = [json.loads(line) for line in open("toy_world/data/sft_train.jsonl").readlines()[:8]]
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
    contradiction = next(row for row in pairs if not row["is_response_0_safe"] and row["is_response_1_safe"])
    write_jsonl(data / "contradiction.jsonl", [*pairs[:3], {**contradiction, "safer_response_id": 0}])
    (data / "dict.json").write_text(json.dumps({"prompt": "how do i bake bread ?"}))
    write_jsonl(data / "list_row.jsonl", [{"prompt": "how do i bake bread ?"}, '["how do i plant a tree ?"]'])
    write_jsonl(data / "chinese.jsonl", [{"prompt": "如何在家里烤面包？请一步一步地告诉我。"}] * 4)
    write_jsonl(data / "no_model.jsonl", [{"prompt": "how do i bake bread ?", "response": "sure ."}])
    return root


# ----------------------------------------------------------------------------- the bad-input table

# (stage, flags, what the one line must say). {root} is the fixture's folder; every command writes to
# {root}/existing, a copy of a finished run that must come out unchanged.
BAD_INPUTS = [
    # data files
    ("sft.py", ["--dataset", "{root}/data/not_json.jsonl"], "not_json.jsonl: row 3: not valid JSON"),
    ("sft.py", ["--dataset", "{root}/data/latin1.jsonl"], "latin1.jsonl: row 2: not UTF-8 text"),
    ("sft.py", ["--dataset", "{root}/data/no_response.jsonl"], "no_response.jsonl: row 1: field 'response': missing"),
    ("sft.py", ["--dataset", "toy_world/data/sft_trian.jsonl"], "toy_world/data/sft_trian.jsonl: no such file"),
    ("sft.py", ["--dataset", "{root}/data/empty.jsonl"], "empty.jsonl: no rows"),
    ("sft.py", ["--dataset", "{root}/data"], "data: a folder, not a .jsonl or .json data file"),
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
    # flags
    ("sft.py", ["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    ("sft.py", ["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    ("sft.py", ["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    ("sft.py", ["--output_dir", ""], "--output_dir is empty"),
    ("sft.py", ["--resume", "flase"], "argument --resume: expected true or false, got 'flase'"),
    ("sft.py", ["--learning-rate", "1e-3"], "unrecognized arguments: --learning-rate 1e-3"),
    ("sft.py", ["--dtype", "float16"], "--dtype must be float32, bfloat16 or auto, got 'float16'"),
    ("sft.py", ["--batch_size", "5000"], "fewer than one batch (--batch_size 5000)"),
    ("ppo_lagrangian.py", ["--algorithm", "ppo_lagg"], "--algorithm must be ppo_lag, ppo or reward_shaping"),
    ("ppo_lagrangian.py", ["--temperature", "0"], "--temperature must be above 0, got 0.0"),
    ("evaluate.py", ["--models", "{root}/sft"], "--models {root}/sft: expected NAME=PATH"),
    ("evaluate.py", ["--responses", "{root}/data/no_model.jsonl"], "no_model.jsonl: row 1: field 'model': missing"),
    # model folders
    ("sft.py", ["--model_name_or_path", "./ouput/sft"], "./ouput/sft: no such model folder"),
    ("train_reward.py", ["--model_name_or_path", "{root}/empty"], "empty: no config.json, so not a model folder"),
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
    """The stage's command line (`utils.run`) in this process: exit status and stderr, as a subprocess
    would give them, without the interpreter start-up of one (the table runs 32 of them)."""
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


@pytest.mark.parametrize("stage, flags, message", BAD_INPUTS, ids=[f"{s}:{m[:40]}" for s, _, m in BAD_INPUTS])
def test_a_bad_input_stops_with_one_clear_line(world, stage, flags, message, monkeypatch, capsys):
    existing = world / "existing"
    if not existing.exists():
        shutil.copytree(world / "reward", existing)
    flags = [flag.format(root=world) for flag in flags]
    defaults = stage_defaults(stage, world)
    for name in flags[::2]:
        defaults.pop(name, None)
    before = {"existing": snapshot(existing), "reward": snapshot(world / "reward")}
    argv = [item for pair in defaults.items() for item in pair] + flags
    assert_one_clear_line(*run_in_process(stage, argv, monkeypatch, capsys), message.format(root=world))
    assert {"existing": snapshot(existing), "reward": snapshot(world / "reward")} == before


@pytest.mark.parametrize(
    "stage, flags, message",
    [
        ("train_reward.py", ["--output_dir", "{root}/empty", "--resume"], "empty holds no checkpoint to continue"),
        ("sft.py", ["--model_name_or_path", "./ouput/sft"], "./ouput/sft: no such model folder"),
        ("sft.py", ["--dataset", "{root}/data/latin1.jsonl"], "latin1.jsonl: row 2: not UTF-8 text"),
    ],
)
def test_the_issues_three_cases_as_commands(world, stage, flags, message):
    """What a user saw as a hub error, a model-type error and a bare UnicodeDecodeError, run as commands."""
    argv = [flag.format(root=world) for flag in flags] + ["--output_dir", str(world / "unused")] * (
        "--resume" not in flags
    )
    result = subprocess.run(command(stage, *argv), capture_output=True, text=True, timeout=300, env=ENV)
    assert_one_clear_line(result.returncode, result.stderr, message)
    assert not (world / "unused").exists()


def test_the_traceback_is_there_when_asked_for(world):
    env = {**ENV, utils.TRACEBACK_VARIABLE: "1"}
    flags = ["--dataset", f"{world}/data/not_json.jsonl", "--output_dir", f"{world}/unused"]
    result = subprocess.run(command("sft.py", *flags), capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert "utils.DataError: " in result.stderr and "not_json.jsonl: row 3: not valid JSON" in result.stderr
    help_text = subprocess.run(command("sft.py", "--help"), capture_output=True, text=True, env=ENV).stdout
    assert f"{utils.TRACEBACK_VARIABLE}=1" in help_text and "--resume" in help_text


def test_under_torchrun_the_line_appears_once_and_every_rank_exits(world):
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    flags = ["--dataset", f"{world}/data/bad_better_id.jsonl", "--output_dir", f"{world}/unused"]
    flags += ["--model_name_or_path", f"{world}/sft", "--eval_dataset", "none", "--reward_model", "none"]
    result = subprocess.run(
        [launcher, "--nproc_per_node=2", "--master_port=29581", "train_cost.py", *flags],
        capture_output=True, text=True, timeout=300, env={**ENV, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("error: ") == 1 and "row 6: field 'better_response_id': must be 0 or 1, got 2" in output
    assert 'File "' + os.path.abspath("train_cost.py") not in output  # no traceback of ours (torchrun adds its report)
    assert not os.path.exists(f"{world}/unused")


def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(world, tmp_path):
    data = "toy_world/data/sft_train.jsonl"
    flags = ["--dataset", data, "--eval_dataset", "none", "--sample_prompts", "none", "--output_dir", tmp_path]
    flags += ["--batch_size", "16", "--micro_batch_size", "16", "--save_every", "1", "--learning_rate", "1e30"]
    result = subprocess.run(command("sft.py", *flags), capture_output=True, text=True, timeout=300, env=ENV)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert last_line.startswith("error: step ") and "the gradient norm is nan" in last_line, last_line
    failed_step = int(last_line.split()[2].rstrip(":"))
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert state["step"] == failed_step - 1  # the last update that was finite, saved; the bad one never ran
    assert all(torch.isfinite(tensor).all() for tensor in weights(tmp_path).values())


# ----------------------------------------------------------------------------- kill -9 and SIGTERM drills


def sft_flags(output_dir, **changes):
    flags = dict(
        dataset="toy_world/data/sft_train.jsonl", eval_dataset="none", sample_prompts="none", output_dir=output_dir,
        epochs=1, batch_size=16, micro_batch_size=16, save_every=1, log_every=1, max_steps=40,
    )  # fmt: skip
    flags.update(changes)
    return flags


def as_argv(flags):
    return [item for name, value in flags.items() for item in (f"--{name}", str(value))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The SFT run every drill must end equal to, run as a command too."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(command("sft.py", *as_argv(sft_flags(folder))), check=True, capture_output=True, env=ENV)
    return weights(folder)


def wait_for(path, process, timeout=120):
    started = time.time()
    while not os.path.exists(path):
        assert process.poll() is None, "the run ended before the drill"
        assert time.time() - started < timeout
        time.sleep(0.05)


def test_kill_9_at_a_random_moment_then_resume_ends_as_an_uninterrupted_run(uninterrupted, tmp_path):
    rng = random.Random(14)
    flags = sft_flags(tmp_path)
    run = subprocess.Popen(command("sft.py", *as_argv(flags)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(tmp_path / "training_state.pt", run)
    time.sleep(rng.uniform(0.0, 1.5))
    run.kill()  # SIGKILL: no handler, no cleanup
    run.wait()
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)  # the last checkpoint loads
    assert 1 <= state["step"] <= 40
    subprocess.run(command("sft.py", *as_argv(flags), "--resume"), check=True, capture_output=True, env=ENV)
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
    run = subprocess.run(
        [sys.executable, "-c", script, "sft.py", *as_argv(flags)], capture_output=True, text=True, env=ENV
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
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
    subprocess.run(command("sft.py", *as_argv(flags), "--resume"), check=True, capture_output=True, env=ENV)
    assert_same_weights(weights(tmp_path), uninterrupted)
    assert not (tmp_path / utils.INTERRUPTED).exists() and not (tmp_path / ".tmp_checkpoint").exists()


def test_sigterm_saves_exits_and_resume_ends_as_an_uninterrupted_run(uninterrupted, tmp_path):
    flags = sft_flags(tmp_path, save_every=1000)  # the only checkpoint before the end is SIGTERM's
    run = subprocess.Popen(
        command("sft.py", *as_argv(flags)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV
    )
    metrics = tmp_path / "metrics.jsonl"
    wait_for(metrics, run)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("stopped by SIGTERM after step ") and "--resume" in last_line, last_line
    stopped_at = int(last_line.split("after step ")[1].split(";")[0])
    assert torch.load(tmp_path / "training_state.pt", weights_only=True)["step"] == stopped_at < 40
    subprocess.run(command("sft.py", *as_argv(flags), "--resume"), check=True, capture_output=True, env=ENV)
    assert_same_weights(weights(tmp_path), uninterrupted)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))  # every step logged once


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(uninterrupted, tmp_path):
    """As a cluster does: SIGTERM to the launcher, which passes it to its ranks. Both ranks finish the step,
    save together and exit; resumed on two ranks, the run ends with the one-process run's weights."""
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    flags = sft_flags(tmp_path, save_every=1000)
    torchrun = [launcher, "--nproc_per_node=2", "--master_port=29583", "sft.py", *as_argv(flags)]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(tmp_path / "metrics.jsonl", run)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode != 0
    assert (stdout + stderr).count("stopped by SIGTERM after step ") == 1, stderr[-3000:]
    stopped_at = torch.load(tmp_path / "training_state.pt", weights_only=True)["step"]
    assert 1 <= stopped_at < 40
    resumed = subprocess.run(
        [*torchrun[:2], "--master_port=29584", *torchrun[3:], "--resume"], capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    two_ranks = weights(tmp_path)
    for name in uninterrupted:
        assert torch.allclose(two_ranks[name], uninterrupted[name], atol=1e-5), name


def test_ppo_lag_killed_then_resumed_ends_as_an_uninterrupted_run(world, tmp_path):
    """The RL state too: λ, the PID controller, the episode-cost window, both critics, every RNG."""
    flags = dict(
        actor_model_name_or_path=str(world / "sft"), reward_model=str(world / "reward"),
        cost_model=str(world / "cost"), eval_prompts="none", iterations=6, rollout_batch_size=8, minibatch_size=4,
        micro_batch_size=4, max_new_tokens=6, save_every=1, lambda_update="pid", episode_cost_window=12,
    )  # fmt: skip
    ppo.main(ppo.Args(**flags, output_dir=str(tmp_path / "whole")))
    folder = tmp_path / "killed"
    argv = as_argv({**flags, "output_dir": folder})
    run = subprocess.Popen(command("ppo_lagrangian.py", *argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(folder / "training_state.pt", run)
    time.sleep(random.Random(3).uniform(0.0, 1.0))
    run.kill()
    run.wait()
    subprocess.run(command("ppo_lagrangian.py", *argv, "--resume"), check=True, capture_output=True, env=ENV)
    whole = torch.load(tmp_path / "whole" / "training_state.pt", weights_only=True)
    resumed = torch.load(folder / "training_state.pt", weights_only=True)
    assert resumed["iteration"] == whole["iteration"] == 6
    assert resumed["log_lambda"] == whole["log_lambda"] and resumed["controller"] == whole["controller"]
    assert resumed["episode_costs"] == pytest.approx(whole["episode_costs"], abs=1e-6)
    for part in (".", "reward_critic", "cost_critic"):
        a, b = weights(tmp_path / "whole" / part), weights(folder / part)
        assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a), part


def test_ppo_lag_stops_on_a_nan_gradient_before_any_model_steps(world, tmp_path):
    args = ppo.Args(
        actor_model_name_or_path=str(world / "sft"), reward_model=str(world / "reward"),
        cost_model=str(world / "cost"), eval_prompts="none", iterations=3, rollout_batch_size=8, minibatch_size=4,
        micro_batch_size=4, max_new_tokens=6, save_every=1, actor_lr=1e30, output_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(utils.UserError, match=r"iteration (\d+): the actor's update: the gradient norm is nan") as e:
        ppo.main(args)
    failed = int(re.search(r"iteration (\d+)", str(e.value)).group(1))
    saved = torch.load(tmp_path / "training_state.pt", weights_only=True)["iteration"] if failed > 1 else 0
    assert saved == failed - 1  # the checkpoint is the last whole iteration's
