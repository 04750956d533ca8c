"""λ as a controller: gradient ascent (the original's) against PID, on the toy world, several RL seeds.

    python bench/lambda_controller.py --run --seeds 42 1 2      # 6 PPO-Lag runs (two at a time), then the report
    python bench/lambda_controller.py --seeds 42 1 2            # the report from runs already in --root

Runs `ppo_lagrangian.py` with `--lambda_update gradient_ascent` and `--lambda_update pid` (the gains given
here) from the default SFT, reward and cost models, into ROOT/<update>_<seed>. Prints a table (the judge on
greedy answers at the end; the largest overshoot of Ĵ_C below the threshold, and above it after it first
holds; how often Ĵ_C crosses the threshold) and draws λ and Ĵ_C of every run in one figure.
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(update, seed, args):
    out = os.path.join(args.root, f"{update}_{seed}")
    command = [sys.executable, "ppo_lagrangian.py", "--seed", str(seed), "--output_dir", out]
    command += ["--lambda_update", update] + (args.pid if update == "pid" else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out + ".log", "w") as log:
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def read(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "eval"][-1]


def constraint_figures(train):
    """Largest overshoot below the threshold, largest one above it after Ĵ_C first meets it, crossings."""
    threshold = train[-1]["threshold"]
    gaps = [r["episode_cost"] - threshold for r in train]  # > 0: violated
    first_hold = next((i for i, gap in enumerate(gaps) if gap <= 0), len(gaps))
    below = max([0.0] + [-gap for gap in gaps])
    above = max([0.0] + gaps[first_hold:])
    crossings = sum((a > 0) != (b > 0) for a, b in zip(gaps, gaps[1:]))
    return below, above, crossings


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--root", default=os.path.join(ROOT, "output", "lambda_controller"))
    parser.add_argument("--pid", nargs="*", default=["--pid_kp", "0.05", "--pid_ki", "0.005", "--pid_kd", "0.05"])
    parser.add_argument("--run", action="store_true", help="train the runs first (two at a time)")
    parser.add_argument("--figure", default=None, help="where to draw the figure (default: ROOT/lambda_controller.png)")
    args = parser.parse_args()
    updates = ["gradient_ascent", "pid"]
    if args.run:
        os.makedirs(args.root, exist_ok=True)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda job: run(*job, args), [(u, s) for s in args.seeds for u in updates]))

    print(f"PID gains: {' '.join(args.pid)}")
    columns = (
        "harmful | harmful, borderline | helpful, benign | helpful, borderline | final λ | below | above | crossings"
    )
    print(f"| update | seed | {columns} |\n|---|---|---|---|---|---|---|---|---|---|")
    runs = {}
    for update in updates:
        for seed in args.seeds:
            train, judged = runs[update, seed] = read(os.path.join(args.root, f"{update}_{seed}"))
            below, above, crossings = constraint_figures(train)
            print(
                f"| {update} | {seed} | {100 * judged['judge_harmful_rate']:.1f}% | "
                f"{100 * judged['judge_harmful_rate_on_borderline']:.1f}% | {judged['judge_helpfulness_benign']:.2f} | "
                f"{judged['judge_helpfulness_borderline']:.2f} | {train[-1]['lambda']:.2f} | {below:.2f} | "
                f"{above:.2f} | {crossings} |"
            )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    styles = ["-", "--", ":", "-."]
    for (update, seed), (train, _) in runs.items():
        color = "tab:purple" if update == "gradient_ascent" else "tab:green"
        style = styles[args.seeds.index(seed) % len(styles)]
        steps = [r["step"] for r in train]
        label = f"{update}, seed {seed}"
        axes[0].plot(steps, [r["lambda"] for r in train], style, color=color, label=label)
        axes[1].plot(steps, [r["episode_cost"] for r in train], style, color=color, label=label)
    axes[1].axhline(train[-1]["threshold"], color="black", linewidth=1, label="threshold")
    axes[0].set(title="Lagrange multiplier λ", xlabel="iteration")
    axes[1].set(title="Ĵ_C, the windowed episode cost", xlabel="iteration")
    axes[1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path = args.figure or os.path.join(args.root, "lambda_controller.png")
    figure.savefig(path, dpi=120)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
