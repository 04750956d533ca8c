"""Shared fixtures: the repository as the working directory, offline hub, one thread per test process (the suite
runs on two pytest-xdist workers), tiny random models saved once per worker, and commands as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental hub call fails at once instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("SAFE_RLHF_TRACEBACK", None)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # every command a test starts takes one core, as each worker does
torch.set_num_threads(1)  # also alone: on a shared 2-core machine one thread per test process is fastest

import utils  # noqa: E402


@pytest.fixture(autouse=True)
def run_in_repo_root(monkeypatch):
    """Stages take repo-relative default paths (toy_world/...), as when a user runs them."""
    monkeypatch.chdir(ROOT)


def command(script, *arguments, **flags):
    """argv of `python script arguments --flag value...`."""
    options = [str(item) for name, value in flags.items() for item in (f"--{name}", value)]
    return [sys.executable, str(script), *map(str, arguments), *options]


def run(argv, expect=0, **kwargs):
    """Run a command; fail the test with its stderr unless it exits with `expect`."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=ENV, **kwargs)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def torchrun(script, *arguments, nproc=2, expect=0, **flags):
    """`torchrun --standalone --nproc_per_node=N script ...` on CPU (gloo), one thread per rank; --standalone
    takes a free port, so that tests on parallel workers never collide."""
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return run(
        [launcher, "--standalone", f"--nproc_per_node={nproc}", *command(script, *arguments, **flags)[1:]], expect
    )


def save_model(folder, model, tokenizer):
    """A model and its tokenizer, saved as a stage saves them (a ScoreModel as its transformers model)."""
    (model.model if isinstance(model, utils.ScoreModel) else model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tokenizer():
    return utils.load_tokenizer("toy_world/model")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """Random toy models saved like the stages' outputs: sft/, reward/ and cost/ (seed 0)."""
    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    save_model(root / "sft", utils.load_model("toy_world/model", tokenizer), tokenizer)
    for name in ("reward", "cost"):
        save_model(root / name, utils.load_model("toy_world/model", tokenizer, score=True), tokenizer)
    return root
