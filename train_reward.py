r"""Stage 2: the reward model R, trained with the Bradley-Terry loss on helpfulness pairs (eq. 5).

    python train_reward.py                                # toy preference data, from output/sft -> output/reward
    torchrun --nproc_per_node=2 train_reward.py           # the same, data parallel
    python train_reward.py --resume                       # continue an interrupted run
    torchrun --nproc_per_node=8 train_reward.py           # the same run on 8 ranks (same global batch)

The paper's 7B setup on 8 GPUs, every stage with the original hyperparameters: README.md, "Real models on GPUs".

The score model is the SFT backbone with a linear score head (utils.ScoreModel); a response's score
is read at the last real token of `prompt + response` (its EOS). y_w is the response named by
`better_response_id`, y_l the other one.
"""

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    dtype: str = "auto"
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


@dataclass
class Pair:
    """A helpfulness comparison: the prompt x, y_w the more helpful response, y_l the other one."""

    prompt: str
    better: str
    worse: str


def reward_pairs(rows):
    return [
        Pair(
            row["prompt"],
            row[f"response_{row['better_response_id']}"],
            row[f"response_{1 - row['better_response_id']}"],
        )
        for row in rows
    ]


def tokenize_pairs(tokenizer, pairs, max_length):
    """{"better": ids, "worse": ids} of each pair: prompt + response + EOS, cut to max_length."""
    return [
        {
            "better": utils.tokenize_conversation(tokenizer, pair.prompt, pair.better, max_length)[0],
            "worse": utils.tokenize_conversation(tokenizer, pair.prompt, pair.worse, max_length)[0],
        }
        for pair in pairs
    ]


def pair_scores(model, first, second, pad_token_id, device, dtype):
    """End scores of two lists of conversations (token ids), in one right-padded forward pass."""
    input_ids, attention_mask = utils.batch_inputs(first + second, pad_token_id, device)  # (2B, T)
    with utils.autocast(device, dtype):
        scores = model(input_ids, attention_mask)  # (2B, T): a score at every token
    end_scores = utils.end_of_sequence(scores, attention_mask)  # (2B,): the score at each last real token
    return end_scores[: len(first)], end_scores[len(first) :]


@torch.no_grad()
def score_all(model, first, second, pad_token_id, device, dtype, batch_size, process):
    """End scores of every pair of conversations, each rank scoring a slice; gathered in the original order."""
    model.eval()
    mine = utils.my_share(len(first), process)  # -1: a filler, scored and dropped (FSDP needs equal passes)
    scores = torch.zeros(2, len(first), device=device)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        a, b = pair_scores(
            model, [first[max(i, 0)] for i in chunk], [second[max(i, 0)] for i in chunk], pad_token_id, device, dtype
        )
        real = torch.tensor(chunk) >= 0
        kept = [i for i in chunk if i >= 0]
        scores[0, kept], scores[1, kept] = a[real], b[real]
    model.train()
    utils.all_reduce_sum(scores)  # every entry was filled by exactly one rank
    return scores[0], scores[1]


def evaluate_reward(model, pairs, pad_token_id, device, dtype, batch_size, process):
    """Preference accuracy (share of pairs with R(y_w) > R(y_l)) and the mean/std of all rewards."""
    better, worse = score_all(
        model,
        [p["better"] for p in pairs],
        [p["worse"] for p in pairs],
        pad_token_id,
        device,
        dtype,
        batch_size,
        process,
    )
    rewards = torch.cat([better, worse])
    return {
        "accuracy": (better > worse).float().mean().item(),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item(),
    }


def main(args):
    # ------------------------------------------------------------------ setup
    process = utils.setup_distributed()
    dtype = utils.resolve_dtype(args.dtype, process.device)
    # The same global batch at any number of ranks: each rank takes its share.
    per_rank = utils.rank_share(args.batch_size, process.world_size, "batch_size")
    utils.seed_everything(args.seed)
    if args.resume:
        utils.check_resume(args.output_dir, args)  # the same stage and flags, or a clear stop
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")

    # ------------------------------------------------------------------ data
    tokenizer = utils.load_tokenizer(args.model_name_or_path)
    subset = args.dataset_subset or None
    train_rows = utils.load_rows(args.dataset, "preference", args.dataset_split, subset)
    train_pairs = tokenize_pairs(tokenizer, reward_pairs(train_rows), args.max_length)
    eval_pairs = []
    if args.eval_dataset != "none":
        eval_rows = utils.load_rows(args.eval_dataset, "preference", args.eval_split, subset)
        eval_pairs = tokenize_pairs(tokenizer, reward_pairs(eval_rows), args.max_length)
    total_steps = len(train_pairs) // args.batch_size * args.epochs
    if total_steps == 0:
        raise utils.UserError(
            f"{args.dataset}: {len(train_pairs)} pairs, fewer than one batch (--batch_size {args.batch_size})"
        )
    utils.print0(
        f"{len(train_pairs)} training pairs, {total_steps} steps of {args.batch_size}, {process.world_size} rank(s)"
    )

    # ------------------------------------------------------------------ model and optimizer
    source = args.output_dir if args.resume else args.model_name_or_path
    model = utils.load_score_model(source, tokenizer, new_head=True)  # a new head on the SFT model
    if args.gradient_checkpointing:
        utils.enable_gradient_checkpointing(model.model)
    model.train()
    model = utils.wrap(model, process, args.fsdp, dtype)  # on the device; DDP or FSDP under torchrun
    raw_model = utils.unwrap(model)
    optimizer, scheduler = utils.optimizer_and_scheduler(
        raw_model, args.learning_rate, args.weight_decay, args.warmup_ratio, total_steps
    )
    step = utils.restore_training_state(args.output_dir, raw_model, optimizer, scheduler) if args.resume else 0
    if args.resume and process.is_main:
        utils.trim_metrics(metrics_path, step)  # lines logged after that checkpoint are redone
    if not args.resume and process.is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log
    os.makedirs(args.output_dir, exist_ok=True)

    def save():  # on every rank: FSDP gathers the shards
        state = utils.training_state(raw_model, optimizer, scheduler, step, args)
        utils.save_checkpoint(args.output_dir, raw_model.model, tokenizer, state)

    # ------------------------------------------------------------------ training loop
    last_step = total_steps if args.max_steps < 0 else min(total_steps, args.max_steps)
    bar = utils.progress(total=total_steps, initial=step, desc="reward")
    started = time.time()
    while step < last_step:
        batch = [train_pairs[i] for i in utils.global_batch(len(train_pairs), args.batch_size, args.seed, step)]
        mine = batch[process.rank * per_rank : (process.rank + 1) * per_rank]
        chunks = utils.micro_batches(mine, args.micro_batch_size)  # micro_batch_size is an upper bound
        totals = torch.zeros(2, device=process.device)  # (loss, accuracy) summed over micro steps
        for micro_step, chunk in enumerate(chunks):
            utils.set_gradient_sync(model, micro_step, len(chunks))
            better_rewards, worse_rewards = pair_scores(
                model, [p["better"] for p in chunk], [p["worse"] for p in chunk], tokenizer.pad_token_id,
                process.device, dtype,
            )  # fmt: skip
            share = len(chunk) / per_rank  # the chunk's mean, weighted by its share of this rank's pairs
            loss = reward_loss(better_rewards, worse_rewards, args.regularization) * share
            loss.backward()  # DDP and FSDP average over ranks: the gradient is that of the global-batch mean
            totals += torch.stack([loss.detach(), (better_rewards > worse_rewards).float().mean().detach() * share])
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
        utils.check_finite(grad_norm, f"step {step + 1}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == last_step:
            utils.all_reduce_sum(totals)
            loss, accuracy = (totals / process.world_size).tolist()
            bar.set_postfix(loss=f"{loss:.3f}", accuracy=f"{accuracy:.2f}")
            if process.is_main:
                record = {"step": step, "split": "train", "loss": loss, "accuracy": accuracy}
                utils.log_metrics(metrics_path, {**record, "lr": scheduler.get_last_lr()[0]})
        every = args.eval_every or len(train_pairs) // args.batch_size
        if eval_pairs and (step % every == 0 or step == last_step):
            metrics = evaluate_reward(
                model, eval_pairs, tokenizer.pad_token_id, process.device, dtype, args.micro_batch_size, process
            )
            if process.is_main:
                utils.log_metrics(metrics_path, {"step": step, "split": "eval", **metrics})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        stop = step < last_step and utils.stop_requested(process)  # SIGTERM: save, then stop
        if step % args.save_every == 0 or step == last_step or stop:
            save()
        if stop:
            raise utils.Preempted(f"step {step}", args.output_dir)
    bar.close()
    utils.print0(f"saved to {args.output_dir} after {step} steps in {time.time() - started:.0f}s")
    utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run(main, Args)
