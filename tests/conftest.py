import os
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
