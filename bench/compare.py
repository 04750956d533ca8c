"""This commit against an earlier one, back to back on this machine, each from a fresh clone: the README's test command
and `bash pipeline.sh`, with where the pipeline's time goes, stage by stage.

    python bench/compare.py --base 7829859       # about 40 minutes here; results/compare.json

Both clones use this checkout's .venv. Order: the base's tests, ours, the base's pipeline, ours. Each pipeline runs
with PYTHON set to a wrapper that notes when each stage's process starts and ends (the profile), and its evaluation
summary is kept, so that the two results tables can be set side by side. Last, our code with the base's warmup and
pipeline.sh (as_base): where it gives the base's table, those two explain every number that moved. The clones stay in
--scratch.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import results  # noqa: E402

WRAPPER = """#!/usr/bin/env bash
started=$(date +%s.%N)
"{python}" "$@"
status=$?
echo "$started $(date +%s.%N) $*" >> "{profile}"
exit $status
"""


def clone(commit, folder):
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", ROOT, folder], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=folder, check=True)
    os.symlink(os.path.join(ROOT, ".venv"), os.path.join(folder, ".venv"))
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True
    ).stdout.strip()


def tests(folder):
    """The README's test command's run (pytest's own options as the commit's pyproject sets them): its wall time,
    the pass count and the slowest 15 tests."""
    started = time.time()
    done = subprocess.run([".venv/bin/python", "-m", "pytest", "-q", "--durations=15"], cwd=folder,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.time() - started
    slowest = re.findall(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)$", done.stdout, re.M)
    summary = done.stdout.strip().splitlines()[-1]
    return dict(seconds=seconds, summary=summary, status=done.returncode,
                slowest=[dict(seconds=float(s), phase=p, test=t) for s, p, t in slowest])  # fmt: skip


def pipeline(folder):
    """`bash pipeline.sh` with every stage's process timed: wall time, profile, the evaluation's summary."""
    profile = os.path.join(folder, "profile.txt")
    wrapper = os.path.join(folder, "timed_python")
    with open(wrapper, "w") as f:
        f.write(WRAPPER.format(python=os.path.join(folder, ".venv", "bin", "python"), profile=profile))
    os.chmod(wrapper, 0o755)
    started = time.time()
    environment = {**os.environ, "PYTHON": wrapper}
    done = subprocess.run(["bash", "pipeline.sh"], cwd=folder, env=environment, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pipeline.sh failed in {folder}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    seconds = time.time() - started
    stages = []
    for line in open(profile):
        start, end, *command = line.split()
        stages.append(dict(command=" ".join(command), start=float(start) - started, end=float(end) - started))
    summary = json.load(open(os.path.join(folder, "output", "eval", "summary.json")))
    return dict(seconds=seconds, stages=stages, models=summary["models"])


# Our code with the base's learning-rate warmup (lr 1/warmup at the first step, where transformers' schedule has 0) and
# the base's pipeline.sh (stages one after the other on all cores): if it reproduces the base's results table, those two
# are what moved every number.
OURS = "    scheduler = transformers.get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)"
BASE_WARMUP = """    def base(step):
        progress = (step - warmup) / max(1, total_steps - warmup)
        return (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, base if schedule == "cosine" else lambda step: 1.0)"""


def as_base(folder, base):
    """Turn the clone of our code into one with the base's warmup and pipeline.sh."""
    utils_py = open(os.path.join(folder, "utils.py")).read()
    assert OURS in utils_py, "utils.optimizer_and_scheduler changed: update bench/compare.py"
    open(os.path.join(folder, "utils.py"), "w").write(utils_py.replace(OURS, BASE_WARMUP))
    script = subprocess.run(["git", "show", f"{base}:pipeline.sh"], cwd=folder, capture_output=True, text=True).stdout
    open(os.path.join(folder, "pipeline.sh"), "w").write(script)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="7829859", help="the earlier commit")
    parser.add_argument("--scratch", default="/tmp/compare", help="where the two clones go")
    args = parser.parse_args()
    folders = {"base": os.path.join(args.scratch, "base"), "new": os.path.join(args.scratch, "new")}
    commits = {"base": clone(args.base, folders["base"]), "new": clone("HEAD", folders["new"])}
    found = {"tests": {}, "pipeline": {}}
    for what, measure in (("tests", tests), ("pipeline", pipeline)):
        for name in ("base", "new"):
            found[what][name] = measure(folders[name])
            print(f"{what} at {commits[name]}: {found[what][name]['seconds']:.0f} s", flush=True)
    ratios = {what: found[what]["new"]["seconds"] / found[what]["base"]["seconds"] for what in found}
    print(f"ratios (new / base): {ratios}")
    folder = os.path.join(args.scratch, "new_as_base")
    clone("HEAD", folder)
    as_base(folder, args.base)
    found["pipeline"]["new_as_base"] = pipeline(folder)
    base, as_base_models = found["pipeline"]["base"]["models"], found["pipeline"]["new_as_base"]["models"]
    same = all(  # each of the base's figures
        abs(value - results.estimate_of(as_base_models[name][key])) < 1e-4
        for name, figures in base.items() for key, value in figures.items() if key in as_base_models[name]
    )  # fmt: skip
    print(f"our code with the base's warmup and pipeline.sh gives the base's results table: {same}")
    results.save("compare", {**results.stamp(), "commits": commits, **found, "ratios": ratios, "as_base_same": same})


if __name__ == "__main__":
    main()
