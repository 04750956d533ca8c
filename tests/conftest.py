import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental hub call fails at once instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def run_in_repo_root(monkeypatch):
    """Stages take repo-relative default paths (toy_world/...), as when a user runs them."""
    monkeypatch.chdir(ROOT)


@pytest.fixture
def torchrun():
    """run(script, port, flags, nproc=2, positional=()): a script under torchrun on CPU (gloo), one thread
    per rank; flags is a dict of --name value, after the positional arguments. Fails the test with the
    ranks' stderr if the run fails."""

    def run(script, port, flags, nproc=2, positional=()):
        launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
        command = [launcher, f"--nproc_per_node={nproc}", f"--master_port={port}", script, *positional]
        command += [item for name, value in flags.items() for item in (f"--{name}", str(value))]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    return run
