"""docs/lab.md works as written: each exercise's commands, run in miniature (tiny models, two PPO iterations), each
`python` command in this process as its command line would run it.

The commands are read from the lab itself and run in a scratch folder laid out like the repository after
`bash pipeline.sh --quick`; only size flags are appended (a later flag wins), so a renamed flag, a
changed default path or a `sed` that no longer matches its line fails here.
"""

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_model

import utils

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "docs" / "lab.md"
SMALL = {  # appended to each command of a script: a few steps on tiny data
    "ppo_lagrangian.py": "--iterations 2 --rollout_batch_size 8 --minibatch_size 4 --micro_batch_size 4 "
    "--max_new_tokens 6 --eval_prompts none",
    "train_cost": "--dataset {pairs} --eval_dataset {pairs} --batch_size 8 --micro_batch_size 8 --max_steps 2",
    "evaluate.py": "--prompts {prompts} --max_new_tokens 6",
}


def exercises():
    """[(title, [command, ...])] of every exercise in the lab, in order."""
    found = []
    for section in re.split(r"\n(?=## Exercise)", LAB.read_text())[1:]:
        [block] = re.findall(r"```bash\n(.*?)```", section, re.S)
        found.append((section.splitlines()[0], block.strip().splitlines()))
    return found


@pytest.fixture(scope="module")
def after_quick_pipeline(tmp_path_factory):
    """A scratch folder with the stages, the toy world, and tiny stand-ins for output/sft, reward, cost and
    ppo_lag: what the lab starts from."""
    root = tmp_path_factory.mktemp("lab")
    for name in ("sft.py", "train_reward.py", "train_cost.py", "ppo_lagrangian.py", "evaluate.py", "utils.py"):
        (root / name).symlink_to(ROOT / name)
    (root / "toy_world").symlink_to(ROOT / "toy_world")
    tokenizer = utils.load_tokenizer("toy_world/model")
    torch.manual_seed(0)
    for name in ("sft", "ppo_lag"):
        save_model(root / "output" / name, utils.load_model("toy_world/model", tokenizer), tokenizer)
    for name in ("reward", "cost"):
        save_model(root / "output" / name, utils.load_model("toy_world/model", tokenizer, score=True), tokenizer)
    lines = open("toy_world/data/preference_train.jsonl").readlines()
    (root / "pairs.jsonl").write_text("".join(lines[:32]))
    (root / "prompts.jsonl").write_text("".join(open("toy_world/data/prompts_eval.jsonl").readlines()[::12]))
    return root


def test_the_lab_has_its_exercises():
    titles = [title for title, _ in exercises()]
    assert len(titles) == 7 and all(re.match(r"## Exercise \d: .+", t) for t in titles), titles


def run_script(root, script, argv, monkeypatch):
    """`python script argv` in `root`, in this process: the script's main with its flags parsed as the command line
    parses them (a stage file, or a copy of one the lab wrote)."""
    monkeypatch.chdir(root)
    spec = importlib.util.spec_from_file_location(Path(script).stem + "_lab", root / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # where its Args' field docstrings are read from
    spec.loader.exec_module(module)
    module.main(utils.parse_args(module.Args, argv))


@pytest.mark.parametrize("title, commands", exercises(), ids=[t.split(":")[0][3:] for t, _ in exercises()])
def test_each_exercise_runs_as_written(after_quick_pipeline, title, commands, monkeypatch):
    root = after_quick_pipeline
    for command in commands:
        words = shlex.split(command)
        if words[0] == "python":
            script = words[1]
            key = "train_cost" if script.startswith("train_cost") else script
            small = SMALL.get(key, "").format(pairs=root / "pairs.jsonl", prompts=root / "prompts.jsonl")
            run_script(root, script, [*words[2:], *shlex.split(small)], monkeypatch)
        else:  # a shell line of the lab (sed): run as written
            result = subprocess.run(command, shell=True, cwd=root, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        if "--output_dir" in words:
            output_dir = root / words[words.index("--output_dir") + 1]
            if words[1] == "evaluate.py":
                summary = json.loads((output_dir / "summary.json").read_text())
                named = [m.split("=")[0] for m in words[words.index("--models") + 1 :] if "=" in m]
                assert list(summary["models"]) == named
            else:
                assert (output_dir / "model.safetensors").exists() and (output_dir / "training_state.pt").exists()
    if "sed" in " ".join(commands):  # the exercise's one-line change matched its line
        changed = (root / "train_cost_nosign.py").read_text().splitlines()
        original = (ROOT / "train_cost.py").read_text().splitlines()
        differences = [(a, b) for a, b in zip(original, changed) if a != b]
        assert differences == [("    loss = ranking + sign", "    loss = ranking")]
