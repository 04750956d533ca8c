r"""Stage 2: the reward model R, trained with the Bradley-Terry loss on helpfulness pairs (eq. 5).

    python train_reward.py                                # toy preference data, from output/sft -> output/reward
    torchrun --nproc_per_node=2 train_reward.py           # the same, data parallel
    python train_reward.py --resume                       # continue an interrupted run
    torchrun --nproc_per_node=8 train_reward.py           # the same run on 8 ranks (same global batch)

The paper's 7B setup on 8 GPUs, with the original's hyperparameters and where ours differ: docs/gpu.md.

The score model is the SFT backbone with a linear score head (utils.ScoreModel); a response's score
is read at the last real token of `prompt + response` (its EOS). y_w is the response named by
`better_response_id`, y_l the other one.
"""

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import utils


@dataclass
class Args:
    model_name_or_path: str = "output/sft"
    """backbone: the SFT checkpoint (a new score head is added) or a score-model checkpoint"""
    dataset: str = "toy_world/data/preference_train.jsonl"
    """preference pairs in the PKU-SafeRLHF schema: a .jsonl/.json file or a hub name"""
    dataset_subset: str = ""
    """subset (config) of a hub dataset, e.g. 'alpaca-7b' for PKU-SafeRLHF"""
    dataset_split: str = "train"
    """split of a hub dataset"""
    eval_dataset: str = "toy_world/data/preference_test.jsonl"
    """held-out pairs for evaluation ('none' to skip)"""
    eval_split: str = "test"
    """split of a hub eval dataset"""
    output_dir: str = "output/reward"
    """where the checkpoint, training state and metrics.jsonl go"""
    max_length: int = 128
    """tokens per prompt + response (+ EOS); longer ones are cut (the longest toy pair has 97)"""
    epochs: int = 2
    """passes over the pairs"""
    batch_size: int = 32
    """pairs per optimizer step, over all ranks"""
    micro_batch_size: int = 32
    """most pairs per forward pass on one rank; each rank takes batch_size / ranks and accumulates gradients"""
    learning_rate: float = 1e-3
    """peak AdamW learning rate (the paper's 7B runs use 2e-5)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.03
    """share of steps with linear warmup before the cosine decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    regularization: float = 0.0
    """L2 penalty on the end scores, keeps them near 0 (the original code uses 0.001 for its 7B models)"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """float32, bfloat16 (mixed precision), or auto: bf16 on a GPU that has it, fp32 on CPU"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    fsdp: bool = False
    """under torchrun, shard weights, gradients and optimizer state over the ranks (PyTorch FSDP) instead of
    replicating them (DDP): for models one GPU cannot hold with their optimizer state"""
    seed: int = 42
    """seed of the score head's initialisation and of data order"""
    eval_every: int = 0
    """optimizer steps between evaluations (0: at the end of every epoch); always at the end"""
    save_every: int = 100
    """optimizer steps between checkpoints (and at the end)"""
    log_every: int = 10
    """optimizer steps between log lines"""
    max_steps: int = -1
    """stop after this many optimizer steps, e.g. to split a run with --resume (the schedule still spans all epochs)"""
    resume: bool = False
    """continue from the checkpoint in output_dir (weights, optimizer, schedule, step, RNG)"""


# L_R(φ; D_R) = -E_(x, y_w, y_l)~D_R [ log σ(R(y_w, x) - R(y_l, x)) ]    (eq. 5)
def reward_loss(better_rewards, worse_rewards, regularization=0.0):
    loss = -F.logsigmoid(better_rewards - worse_rewards).mean()
    if regularization > 0:  # as in the original code: keeps scores near 0
        loss = loss + regularization * torch.stack([better_rewards, worse_rewards]).square().mean()
    return loss


def reward_pairs(tokenizer, rows, max_length):
    """Each row as a helpfulness comparison: the token ids of y_w, the response named by better_response_id, and of
    y_l, the other one, each prompt + response + EOS cut at max_length."""
    pairs = []
    for row in rows:
        better = row["better_response_id"]
        texts = {"better": row[f"response_{better}"], "worse": row[f"response_{1 - better}"]}
        pairs.append(
            {
                key: utils.tokenize_conversation(tokenizer, row["prompt"], text, max_length)[0]
                for key, text in texts.items()
            }
        )
    return pairs


def pair_scores(model, first, second, tokenizer, process):
    """End scores of two lists of conversations (token ids), in one right-padded forward pass."""
    input_ids, attention_mask = utils.batch_inputs(first + second, tokenizer.pad_token_id, process.device)  # (2B, T)
    with process.autocast():
        end_scores = model(input_ids, attention_mask, end=True)  # (2B,): the score at each last real token
    return end_scores[: len(first)], end_scores[len(first) :]


@torch.no_grad()
def score_all(model, first, second, tokenizer, batch_size, process):
    """End scores of every pair of conversations, each rank scoring a slice; gathered in the original order."""
    model.eval()
    mine = list(range(process.rank, len(first), process.world_size))  # this rank's; -1: fillers, so that every rank
    mine += [-1] * (math.ceil(len(first) / process.world_size) - len(mine))  # runs as many passes (FSDP), scored last
    scores = torch.zeros(2, len(first) + 1, device=process.device)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        pair = pair_scores(model, [first[i] for i in chunk], [second[i] for i in chunk], tokenizer, process)
        scores[:, chunk] = torch.stack(pair)
    model.train()
    utils.all_reduce_sum(scores)  # every real entry was filled by exactly one rank
    return scores[0, :-1], scores[1, :-1]


def evaluate_reward(model, pairs, tokenizer, batch_size, process):
    """Preference accuracy (share of pairs with R(y_w) > R(y_l)) and the mean/std of all rewards."""
    better, worse = score_all(
        model, [p["better"] for p in pairs], [p["worse"] for p in pairs], tokenizer, batch_size, process
    )
    rewards = torch.cat([better, worse])
    return {
        "accuracy": (better > worse).float().mean().item(),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item(),
    }


def main(args):
    # ------------------------------------------------------------------ setup
    process = utils.setup_distributed(args.dtype)
    # The same global batch at any number of ranks: each rank takes its share.
    per_rank = utils.rank_share(args.batch_size, process.world_size, "batch_size")
    transformers.set_seed(args.seed)
    saved = utils.check_resume(args, args.output_dir)  # {}, or a checkpoint of this run to continue

    # ------------------------------------------------------------------ data
    tokenizer = utils.load_tokenizer(args.model_name_or_path)
    subset = args.dataset_subset or None
    train_rows = utils.load_rows(args.dataset, "preference", args.dataset_split, subset)
    train_pairs = reward_pairs(tokenizer, train_rows, args.max_length)
    eval_pairs = []
    if args.eval_dataset != "none":
        eval_rows = utils.load_rows(args.eval_dataset, "preference", args.eval_split, subset)
        eval_pairs = reward_pairs(tokenizer, eval_rows, args.max_length)
    total_steps = len(train_pairs) // args.batch_size * args.epochs
    if total_steps == 0:
        raise utils.UserError(f"{args.dataset}: {len(train_pairs)} pairs, fewer than one batch of {args.batch_size}")
    utils.print0(f"{len(train_pairs)} pairs, {total_steps} steps of {args.batch_size}, {process.world_size} rank(s)")

    # ------------------------------------------------------------------ model and optimizer
    # A new score head on the SFT model (or a resumed score model).
    model = utils.load_model(
        args.output_dir if saved else args.model_name_or_path, tokenizer, score=True, new_head=True
    )
    wrapped = utils.wrap(model.train(), process, args)  # on the device; DDP or FSDP under torchrun
    optimizer, scheduler = utils.optimizer_and_scheduler(
        model, args.learning_rate, args.weight_decay, args.warmup_ratio, total_steps
    )
    trained = dict(models={"model": model}, optimizers={"model": optimizer}, schedulers={"model": scheduler})
    metrics_path = utils.start_run(args.output_dir, saved, process, **trained)
    step = saved.get("step", 0)

    # ------------------------------------------------------------------ training loop
    last_step = total_steps if args.max_steps < 0 else min(total_steps, args.max_steps)
    bar = tqdm(total=total_steps, initial=step, desc="reward", disable=not process.is_main)
    started = time.time()
    while step < last_step:
        batch = [train_pairs[i] for i in utils.global_batch(len(train_pairs), args.batch_size, args.seed, step)]
        mine = batch[process.rank * per_rank : (process.rank + 1) * per_rank]
        chunks = [mine[i : i + args.micro_batch_size] for i in range(0, per_rank, args.micro_batch_size)]
        totals = torch.zeros(2, device=process.device)  # (loss, accuracy) summed over micro steps
        for micro_step, chunk in enumerate(chunks):
            # DDP all-reduces gradients after the last micro step only (FSDP reduce-scatters after each).
            wrapped.require_backward_grad_sync = micro_step == len(chunks) - 1
            better = [p["better"] for p in chunk]
            better_rewards, worse_rewards = pair_scores(
                wrapped, better, [p["worse"] for p in chunk], tokenizer, process
            )
            share = len(chunk) / per_rank  # the chunk's mean, weighted by its share of this rank's pairs
            loss = reward_loss(better_rewards, worse_rewards, args.regularization) * share
            loss.backward()  # DDP and FSDP average over ranks: the gradient is that of the global-batch mean
            totals += torch.stack([loss.detach(), (better_rewards > worse_rewards).float().mean().detach() * share])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        utils.check_finite(grad_norm, f"step {step + 1}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == last_step:
            loss, accuracy = (utils.all_reduce_sum(totals) / process.world_size).tolist()
            bar.set_postfix(loss=f"{loss:.3f}", accuracy=f"{accuracy:.2f}")
            if process.is_main:
                record = {"step": step, "split": "train", "loss": loss, "accuracy": accuracy}
                utils.log_metrics(metrics_path, {**record, "lr": scheduler.get_last_lr()[0]})
        every = args.eval_every or len(train_pairs) // args.batch_size
        if eval_pairs and (step % every == 0 or step == last_step):
            metrics = evaluate_reward(wrapped, eval_pairs, tokenizer, args.micro_batch_size, process)
            if process.is_main:
                utils.log_metrics(metrics_path, {"step": step, "split": "eval", **metrics})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        stop = step < last_step and utils.stop_requested(process)  # SIGTERM: save, then stop
        if step % args.save_every == 0 or step == last_step or stop:
            utils.save_checkpoint(args.output_dir, tokenizer, **trained, args=args, step=step)
        if stop:
            raise utils.Preempted(f"after step {step}", args.output_dir)
    bar.close()
    utils.print0(f"saved to {args.output_dir} after {step} steps in {time.time() - started:.0f}s")


if __name__ == "__main__":
    utils.run(main, Args)
