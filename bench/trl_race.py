"""Our PPO loop against TRL 1.12's PPOTrainer (trl.experimental.ppo, the last TRL with PPO), side by side.

    python3 -m venv .venv-trl && .venv-trl/bin/pip install -r bench/requirements-trl.txt    # TRL apart from ours
    python bench/trl_race.py --trl_python .venv-trl/bin/python     # after bash pipeline.sh; results/trl.json

TRL has no cost model, so ours runs `ppo_lagrangian.py --algorithm ppo`. Both train the pipeline's SFT model as the
policy (its copy as the reference) against its reward model (also the value model's start), on the first 48 training
prompts in the conversation template: 48 rollouts of at most 48 new tokens per iteration, 1 PPO epoch over 2
minibatches of 24, fp32, one thread, each run a fresh process. Rounds interleave TRL as shipped, TRL with its two
gc.collect() calls per iteration turned off, and ours; a run's seconds per iteration is the median over its
iterations after the first. What still differs: TRL takes the old log-probs from generate's logits (ours: a second
forward pass, as the original), whitens the advantages, trains policy and value with one optimizer and no gradient
clipping, and decays the learning rate linearly (ours: cosine for the actor, constant for the critic).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
ROLLOUTS, NEW_TOKENS, MINIBATCHES = 48, 48, 2


def trl_run(args):
    """One TRL run in this process (the TRL environment): seconds of each iteration."""
    import gc
    import types

    import torch

    torch.set_num_threads(1)
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.gc == "off":  # the module's own name `gc`: only TRL's two collect() calls become no-ops
        trl_ppo.gc = types.SimpleNamespace(collect=lambda *a, **k: 0)
    sft, reward = os.path.join(ROOT, "output", "sft"), os.path.join(ROOT, "output", "reward")
    tokenizer = AutoTokenizer.from_pretrained(sft, padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in open(args.prompts)]
    template = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
    dataset = Dataset.from_dict({"input_ids": [tokenizer(template.format(prompt=p))["input_ids"] for p in prompts]})
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=ROLLOUTS // MINIBATCHES,
        gradient_accumulation_steps=MINIBATCHES, num_mini_batches=MINIBATCHES, local_rollout_forward_batch_size=ROLLOUTS,
        num_ppo_epochs=1, response_length=NEW_TOKENS, temperature=1.0, stop_token="eos", kl_coef=0.1,
        total_episodes=ROLLOUTS * args.iterations, num_sample_generations=0, learning_rate=5e-5, seed=42,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip
    times = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            times.append(time.perf_counter())

        on_step_end = on_train_begin

    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(sft),
        ref_model=AutoModelForCausalLM.from_pretrained(sft), train_dataset=dataset, callbacks=[Clock()],
        reward_model=AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1),
    )  # fmt: skip
    gc.collect()
    trainer.train()
    return [b - a for a, b in zip(times, times[1:])]


def ours_run(args, prompts, output_dir):
    """One run of our PPO (a fresh process, one thread): seconds of each iteration, from its metrics.jsonl."""
    flags = ["--algorithm", "ppo", "--prompts", prompts, "--iterations", str(args.iterations), "--eval_prompts", "none"]
    flags += ["--rollout_batch_size", str(ROLLOUTS), "--minibatch_size", str(ROLLOUTS // MINIBATCHES)]
    flags += ["--max_new_tokens", str(NEW_TOKENS), "--output_dir", output_dir, "--dtype", "float32"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "ppo_lagrangian.py", *flags], cwd=ROOT, env=environment, check=True,
                   capture_output=True)  # fmt: skip
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r["seconds"] for r in map(json.loads, f) if r["split"] == "train"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl_python", default=".venv-trl/bin/python", help="the python of the TRL environment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # a TRL run, in the TRL environment
    parser.add_argument("--gc", default="on", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return print(json.dumps(trl_run(args)))

    import results

    scratch = tempfile.mkdtemp()
    prompts = os.path.join(scratch, "prompts.jsonl")
    with open(os.path.join(ROOT, "toy_world", "data", "prompts_train.jsonl")) as f, open(prompts, "w") as out:
        out.writelines(f.readlines()[:ROLLOUTS])  # one rollout batch: one optimizer step per minibatch in TRL too
    runs = {"trl": [], "trl_without_gc_collect": [], "ours": []}
    for round_ in range(args.rounds):
        for name in runs:
            if name == "ours":
                seconds = ours_run(args, prompts, os.path.join(scratch, f"ours_{round_}"))
            else:
                command = [args.trl_python, __file__, "--child", "--prompts", prompts]
                command += ["--iterations", str(args.iterations), "--gc", "off" if "without" in name else "on"]
                environment = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
                done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, check=True)
                seconds = json.loads(done.stdout.strip().splitlines()[-1])
            runs[name].append(statistics.median(seconds[1:]))  # the first iteration warms up
            print(f"round {round_ + 1}: {name:<24} {runs[name][-1]:.3f} s per iteration", flush=True)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratios = {f"{name} / ours": medians[name] / medians["ours"] for name in runs if name != "ours"}
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    versions = subprocess.run([args.trl_python, "-c", "import trl, transformers, torch, accelerate; print(trl.__version__,"
                               " accelerate.__version__)"], capture_output=True, text=True).stdout.split()  # fmt: skip
    setup = dict(rollouts=ROLLOUTS, new_tokens=NEW_TOKENS, minibatches=MINIBATCHES, iterations=args.iterations)
    results.save("trl", {**results.stamp(), "trl": versions[0], "accelerate": versions[1], **setup, "threads": 1,
                         "seconds_per_iteration": runs, "medians": medians, "ratios": ratios})  # fmt: skip


if __name__ == "__main__":
    main()
