"""Run the stages under torchrun with 1, 2 and 4 ranks (and PPO-Lag with 8), with DDP and with FSDP, and
compare with one process.

    python bench/scale_out.py                 # tiny runs on the toy data, gloo on CPU; prints a table
    python bench/scale_out.py --ranks 1 2 4 8

Each stage trains on a small slice of the toy data with the same global batch for every rank
count, each rank holding a full copy of the model (DDP) or a shard of it (--fsdp); the logged
training losses must match the single-process run (SFT, reward, cost). PPO-Lag samples differently on
each rank count, so for it the script times 3 iterations (tests/test_ppo_lagrangian.py pins 2 ranks to one
process with --top_k 1). Uses the checkpoints of the default pipeline (output/sft, reward, cost);
writes results/scale_out.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import results  # noqa: E402


def run(ranks, script, flags):
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", script] if ranks > 1 else [sys.executable, script]
    started = time.time()
    result = subprocess.run(command + flags, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{script} with {ranks} rank(s) failed:\n{result.stderr[-3000:]}")
    return time.time() - started


def losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--ppo_ranks", type=int, default=8)
    args = parser.parse_args()
    for checkpoint in ("output/sft", "output/reward", "output/cost"):
        if not os.path.isdir(os.path.join(ROOT, checkpoint)):
            raise SystemExit(
                f"{checkpoint} not found: this script starts from the pipeline's checkpoints (run pipeline.sh)"
            )
    tmp = tempfile.mkdtemp()
    for name, count in (("sft_train", 256), ("preference_train", 256)):
        with open(os.path.join(ROOT, f"toy_world/data/{name}.jsonl")) as f, open(f"{tmp}/{name}.jsonl", "w") as out:
            out.writelines(f.readlines()[:count])
    common = ["--epochs", "1", "--batch_size", "32", "--micro_batch_size", "8", "--log_every", "1"]
    stages = {
        "sft.py": ["--dataset", f"{tmp}/sft_train.jsonl", "--eval_dataset", "none", "--sample_prompts", "none"],
        "train_reward.py": ["--dataset", f"{tmp}/preference_train.jsonl", "--eval_dataset", "none"],
        "train_cost.py": ["--dataset", f"{tmp}/preference_train.jsonl", "--eval_dataset", "none"],
    }
    rows = []
    print(f"{'stage':<18}{'ranks':>6}{'mode':>7}{'seconds':>9}{'max |Δ loss| vs 1 rank':>26}")
    for script, flags in stages.items():
        reference = None
        for ranks in args.ranks:
            for mode in ["ddp", "fsdp"] if ranks > 1 else ["single"]:
                output_dir = f"{tmp}/{script}_{ranks}_{mode}"
                extra = ["--output_dir", output_dir] + (["--fsdp"] if mode == "fsdp" else [])
                seconds = run(ranks, script, flags + common + extra)
                current = losses(output_dir)
                reference = reference or current
                gap = max(abs(a - b) for a, b in zip(current, reference))
                rows.append(dict(script=script, ranks=ranks, mode=mode, seconds=seconds, max_loss_gap=gap))
                print(f"{script:<18}{ranks:>6}{mode:>7}{seconds:>9.1f}{gap:>26.2e}", flush=True)
    for mode in ("ddp", "fsdp"):
        output_dir = f"{tmp}/ppo_{args.ppo_ranks}_{mode}"
        flags = ["--eval_prompts", "none", "--output_dir", output_dir, "--iterations", "3"]
        flags += ["--rollout_batch_size", "32", "--minibatch_size", "16", "--micro_batch_size", "2"]
        seconds = run(args.ppo_ranks, "ppo_lagrangian.py", flags + (["--fsdp"] if mode == "fsdp" else []))
        rows.append(dict(script="ppo_lagrangian.py", ranks=args.ppo_ranks, mode=mode, seconds=seconds))
        print(f"{'ppo_lagrangian.py':<18}{args.ppo_ranks:>6}{mode:>7}{seconds:>9.1f}   3 iterations", flush=True)
    results.save("scale_out", {**results.stamp(), "rows": rows})


if __name__ == "__main__":
    main()
