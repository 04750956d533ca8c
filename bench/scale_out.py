"""Run the stages under torchrun with 1, 2 and 4 ranks (and PPO-Lag with 8), with DDP and with FSDP, and
compare with one process.

    python bench/scale_out.py                 # tiny runs on the toy data, gloo on CPU; prints a table
    python bench/scale_out.py --ranks 1 2 4 8

Each stage trains on a small slice of the toy data with the same global batch for every rank
count, each rank holding a full copy of the model (DDP) or a shard of it (--fsdp); the logged
training losses must match the single-process run (SFT, reward, cost). PPO-Lag
samples differently on each rank count, so for it the script checks that the run completes and
that λ is identical on every rank. Uses the checkpoints of the default pipeline (output/sft).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def run(ranks, script, flags, port):
    command = (
        [TORCHRUN, f"--nproc_per_node={ranks}", f"--master_port={port}", script]
        if ranks > 1
        else [sys.executable, script]
    )
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
    print(f"{'stage':<18}{'ranks':>6}{'mode':>7}{'seconds':>9}{'max |Δ loss| vs 1 rank':>26}")
    for script, flags in stages.items():
        reference = None
        for ranks in args.ranks:
            for mode in ["ddp", "fsdp"] if ranks > 1 else ["single"]:
                output_dir = f"{tmp}/{script}_{ranks}_{mode}"
                extra = ["--output_dir", output_dir] + (["--fsdp"] if mode == "fsdp" else [])
                seconds = run(ranks, script, flags + common + extra, 29600 + ranks)
                current = losses(output_dir)
                reference = reference or current
                gap = max(abs(a - b) for a, b in zip(current, reference))
                print(f"{script:<18}{ranks:>6}{mode:>7}{seconds:>9.1f}{gap:>26.2e}", flush=True)
    for mode in ("ddp", "fsdp"):
        output_dir = f"{tmp}/ppo_{args.ppo_ranks}_{mode}"
        flags = ["--eval_prompts", "none", "--output_dir", output_dir, "--iterations", "3"]
        flags += ["--rollout_batch_size", "32", "--minibatch_size", "16", "--micro_batch_size", "2"]
        seconds = run(args.ppo_ranks, "ppo_lagrangian.py", flags + (["--fsdp"] if mode == "fsdp" else []), 29700)
        state = torch.load(os.path.join(output_dir, "training_state.pt"), weights_only=False)
        same = len(set(state["log_lambda_per_rank"])) == 1
        print(
            f"{'ppo_lagrangian.py':<18}{args.ppo_ranks:>6}{mode:>7}{seconds:>9.1f}   3 iterations, λ identical on all "
            f"{len(state['log_lambda_per_rank'])} ranks: {same}",
            flush=True,
        )


if __name__ == "__main__":
    main()
