"""Tokens per second and peak memory of each stage's training step, with and without gradient checkpointing.

    python bench/throughput.py                                   # the toy model on this machine (CPU here)
    python bench/throughput.py --model huggyllama/llama-7b --batch_size 4 --seq_len 512 --dtype bfloat16

Times the stages' own code on fixed-size batches of random tokens (the numbers do not depend on
the text): SFT (forward + backward + AdamW step of the causal LM), the score model (a pair per row,
as train_reward/train_cost train), and PPO-Lag (one rollout with all six models on one device:
generation, then the reference, scorer and critic passes; then one PPO update of actor and both
critics). Each (stage, checkpointing) runs in its own process, so the peak memory is that run's:
torch.cuda.max_memory_allocated on a GPU; on the CPU, how far the process's peak resident memory
rose above its level after the imports.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ppo_lagrangian  # noqa: E402
import results  # noqa: E402
import sft  # noqa: E402
import train_reward  # noqa: E402
import utils  # noqa: E402


def random_batch(tokenizer, batch_size, seq_len, device):
    """Random ordinary tokens (no pad, BOS or EOS), every row full length."""
    special = set(tokenizer.all_special_ids)
    vocabulary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    ids = vocabulary[torch.randint(len(vocabulary), (batch_size, seq_len))]
    return ids.to(device), torch.ones_like(ids, device=device)


def timed(step, steps, device):
    """Seconds per call of step(), after one warm-up call."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.time() - started) / steps


def trainable(model, args, process):
    """On the device, in training mode, with --gradient_checkpointing as the stages set it (utils.wrap)."""
    return utils.wrap(
        model.train(), process, SimpleNamespace(gradient_checkpointing=args.gradient_checkpointing, fsdp=False)
    )


def bench_sft(args, tokenizer, process):
    model = trainable(utils.load_model(args.model, tokenizer), args, process)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    input_ids, attention_mask = random_batch(tokenizer, args.batch_size, args.seq_len, process.device)
    labels = input_ids.clone()

    def step():
        with process.autocast():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        (sft.sft_loss_sum(logits, labels) / labels.numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rate = args.batch_size * args.seq_len / timed(step, args.steps, process.device)
    result = {"train tokens/s": rate}
    if process.device.type == "cuda":  # model FLOPs utilisation: 6 N FLOPs per trained token
        result["MFU %"] = 100 * 6 * sum(p.numel() for p in model.parameters()) * rate / (args.peak_tflops * 1e12)
    return result


def bench_score(args, tokenizer, process):
    model = trainable(utils.load_model(args.model, tokenizer, score=True, new_head=True), args, process)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    input_ids, _ = random_batch(tokenizer, 2 * args.batch_size, args.seq_len, process.device)
    better_ids, worse_ids = input_ids[::2].tolist(), input_ids[1::2].tolist()

    def step():
        better, worse = train_reward.pair_scores(model, better_ids, worse_ids, tokenizer, process)
        train_reward.reward_loss(better, worse).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"train tokens/s": 2 * args.batch_size * args.seq_len / timed(step, args.steps, process.device)}


def bench_ppo(args, tokenizer, process):
    """One rollout with all six models on one device, then one PPO update of actor and both critics."""
    half = args.seq_len // 2
    ppo_args = ppo_lagrangian.Args(max_prompt_length=half, max_new_tokens=half, minibatch_size=args.batch_size)
    ppo_args.micro_batch_size, ppo_args.gradient_checkpointing = args.batch_size, args.gradient_checkpointing

    def frozen(model):
        return model.to(process.device, process.dtype).eval().requires_grad_(False)

    trained = {"actor": trainable(utils.load_model(args.model, tokenizer), args, process)}
    for name in ("reward_critic", "cost_critic"):
        trained[name] = trainable(utils.load_model(args.model, tokenizer, score=True, new_head=True), args, process)
    models = dict(trained, reference=frozen(utils.load_model(args.model, tokenizer)))
    for name in ("reward", "cost"):
        models[name] = (frozen(utils.load_model(args.model, tokenizer, score=True, new_head=True)), tokenizer)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-6) for name, model in trained.items()}
    schedulers = {name: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0) for name, o in optimizers.items()}
    # Prompts of `half` random tokens; generation runs to max_new_tokens unless EOS comes first.
    prompt_ids, _ = random_batch(tokenizer, args.batch_size, half, process.device)
    prompts = [tokenizer.decode(row) for row in prompt_ids.tolist()]
    rollouts = []

    def rollout():
        rollouts.append(ppo_lagrangian.rollout(ppo_args, models, tokenizer, prompts, process))

    rollout_seconds = timed(rollout, args.steps, process.device)
    generated = [episodes.batch["mask"].sum().item() for episodes in rollouts[1:]]  # the timed ones
    episodes = rollouts[-1]
    for model in trained.values():
        model.train()  # the rollout left the actor in eval mode, where checkpointing is off

    def update():
        rows = list(range(args.batch_size))
        ppo_lagrangian.ppo_update(ppo_args, process, trained, optimizers, schedulers, episodes, rows, 0.5, ([], 0))

    update_seconds = timed(update, args.steps, process.device)
    return {
        "rollout generated tokens/s": sum(generated) / args.steps / rollout_seconds,
        "update tokens/s": episodes.batch["attention_mask"].sum().item() / update_seconds,
        "generated tokens per row": sum(generated) / len(generated) / args.batch_size,
    }


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def one_run(args):
    """One (stage, checkpointing) measurement in this process; prints one JSON line."""
    torch.manual_seed(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # on the CPU: libraries, no model yet
    process = utils.setup_distributed(args.dtype)
    tokenizer = utils.load_tokenizer(args.model)
    result = {"sft": bench_sft, "score": bench_score, "ppo": bench_ppo}[args.stage](args, tokenizer, process)
    result["peak memory GB"] = peak_memory_gb(process.device) - (before if process.device.type == "cpu" else 0)
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy_world/model", help="a causal LM: folder or hub name")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per step (pairs for the score model)")
    parser.add_argument("--seq_len", type=int, default=96, help="tokens per row (PPO: half prompt, half response)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on a GPU that has it)")
    parser.add_argument("--stages", nargs="+", default=["sft", "score", "ppo"])
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="the GPU's peak bf16 TFLOP/s, for MFU (H100)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # set for the child processes
    parser.add_argument("--gradient_checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return one_run(args)

    device = (
        "cuda: " + torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len} tokens, dtype {args.dtype}, {device}\n")
    print(f"{'stage':<7}{'checkpointing':>14}{'peak GB':>9}  tokens/s")
    rows = []
    for stage in args.stages:
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--stage", stage, "--model", args.model, "--dtype", args.dtype]
            command += [
                "--batch_size",
                str(args.batch_size),
                "--seq_len",
                str(args.seq_len),
                "--steps",
                str(args.steps),
            ]
            command += ["--peak_tflops", str(args.peak_tflops)] + ["--gradient_checkpointing"] * checkpointing
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            where = f"{stage:<7}{'on' if checkpointing else 'off':>14}"
            if result.returncode != 0:
                print(f"{where}  failed: {result.stderr.strip().splitlines()[-1]}")
                continue
            numbers = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(dict(stage=stage, checkpointing=checkpointing, **numbers))
            peak = numbers.pop("peak memory GB")
            print(f"{where}{peak:>9.2f}  " + ", ".join(f"{k} {v:,.1f}" for k, v in numbers.items()), flush=True)
    setup = dict(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, device=device)
    results.save("throughput", {**results.stamp(), **setup, "rows": rows})


if __name__ == "__main__":
    main()
