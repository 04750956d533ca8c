r"""Stage 3: the cost model C, trained on harmlessness pairs with the BT loss plus a signed loss (eq. 6).

    python train_cost.py                                  # toy preference data, from output/sft -> output/cost
    torchrun --nproc_per_node=2 train_cost.py             # the same, data parallel
    python train_cost.py --resume                         # continue an interrupted run
    torchrun --nproc_per_node=8 train_cost.py             # the same run on 8 ranks (same global batch)

The paper's 7B setup on 8 GPUs, with the original's hyperparameters and where ours differ: docs/gpu.md.

C > 0 means unsafe. y_w is the MORE HARMFUL response of a pair and s(y) = +1 for a harmful response, -1 for a
harmless one. The score is read at the last real token (utils.ScoreModel). After training, this file draws the
paper's figures of the cost model: the cost distribution of safe and unsafe responses, and reward vs cost.
"""

import math
import os
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
    """held-out pairs for evaluation and the figures ('none' to skip)"""
    eval_split: str = "test"
    """split of a hub eval dataset"""
    output_dir: str = "output/cost"
    """where the checkpoint, training state, metrics.jsonl and figures go"""
    contradictions: Literal["skip", "stop"] = "skip"
    """rows whose safer response is labelled unsafe and the other safe: 'skip' them (counted) or 'stop'"""
    reward_model: str = "output/reward"
    """reward model for the reward-vs-cost figure (skipped unless a folder with the cost model's tokenizer)"""
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


# L_C(ψ; D_C) = -E[ log σ(C(y_w, x) - C(y_l, x)) ]                          (eq. 6, first term)
#               -E[ log σ(s_w · C(y_w, x)) + log σ(s_l · C(y_l, x)) ]      (eq. 6, second term)
# y_w is the more harmful response. The second term compares each response with a virtual
# response y_0 on the safe/unsafe boundary, C(y_0, x) = 0: it pushes the cost of a harmful
# response above 0 and that of a harmless one below 0, so the sign of C classifies safety.
def cost_loss(more_harmful_costs, less_harmful_costs, more_harmful_signs, less_harmful_signs, regularization=0.0):
    ranking = -F.logsigmoid(more_harmful_costs - less_harmful_costs).mean()
    sign = -(
        F.logsigmoid(more_harmful_signs * more_harmful_costs) + F.logsigmoid(less_harmful_signs * less_harmful_costs)
    ).mean()
    loss = ranking + sign
    if regularization > 0:  # as in the original code: keeps scores near 0
        loss = loss + regularization * torch.stack([more_harmful_costs, less_harmful_costs]).square().mean()
    return loss


def cost_pairs(tokenizer, rows, max_length, contradictions="skip", where="data"):
    """Each row as a harmlessness comparison: the token ids (prompt + response + EOS, cut at max_length) of y_w, the
    MORE HARMFUL response (the one not named by safer_response_id), and of y_l, with their signs s = +1 (harmful)
    or -1 (harmless). A row whose safer response is labelled unsafe and the other safe contradicts itself:
    skipped (counted), or with contradictions="stop" a stop."""
    pairs, contradictory = [], []
    for i, row in enumerate(rows, 1):
        responses = [1 - row["safer_response_id"], row["safer_response_id"]]  # y_w, y_l
        signs = [-1 if row[f"is_response_{k}_safe"] else +1 for k in responses]  # s(y_w), s(y_l)
        if signs == [-1, +1]:
            contradictory.append(i)
            continue
        ids = [
            utils.tokenize_conversation(tokenizer, row["prompt"], row[f"response_{k}"], max_length)[0]
            for k in responses
        ]
        pairs.append(
            dict(more_harmful=ids[0], less_harmful=ids[1], more_harmful_sign=signs[0], less_harmful_sign=signs[1])
        )
    if contradictory:
        message = (
            f"{where}: {len(contradictory)} of {len(rows)} rows contradict themselves (the safer response is labelled "
            f"unsafe and the other safe), e.g. rows {contradictory[:5]}"
        )
        if contradictions == "stop":
            raise utils.UserError(message + "; pass --contradictions skip to leave them out")
        utils.print0(message + ": skipped")
    return pairs


# Copied from train_reward.pair_scores
def pair_scores(model, first, second, tokenizer, process):
    """End scores of two lists of conversations (token ids), in one right-padded forward pass."""
    input_ids, attention_mask = utils.batch_inputs(first + second, tokenizer.pad_token_id, process.device)  # (2B, T)
    with process.autocast():
        end_scores = model(input_ids, attention_mask, end=True)  # (2B,): the score at each last real token
    return end_scores[: len(first)], end_scores[len(first) :]


# Copied from train_reward.score_all
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


def evaluate_cost(model, pairs, tokenizer, batch_size, process):
    """Pairwise accuracy C(y_w) > C(y_l), sign accuracy (C > 0 exactly for harmful responses), cost mean/std; and
    the costs of all responses (y_w's, then y_l's) with their labels, for the figures."""
    first, second = [p["more_harmful"] for p in pairs], [p["less_harmful"] for p in pairs]
    more_harmful, less_harmful = score_all(model, first, second, tokenizer, batch_size, process)
    costs = torch.cat([more_harmful, less_harmful]).cpu()
    harmful = torch.tensor([p[f"{k}_sign"] > 0 for k in ("more_harmful", "less_harmful") for p in pairs])
    metrics = dict(accuracy=(more_harmful > less_harmful).float().mean().item(), cost_std=costs.std().item())
    metrics.update(accuracy_sign=((costs > 0) == harmful).float().mean().item(), cost_mean=costs.mean().item())
    return metrics, costs, harmful


def plot_figures(output_dir, costs, harmful, rewards=None):
    """The paper's figures of the cost model on test responses (`harmful`: their labels): the cost distribution of
    safe and unsafe responses and, with the reward model's scores, reward vs cost. In output_dir/cost_model.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, 1 if rewards is None else 2, figsize=(6 if rewards is None else 11, 4.5), squeeze=False
    )
    bins = torch.linspace(costs.min().item(), costs.max().item(), 40).tolist()
    for group, color, label in ((~harmful, "tab:blue", "safe"), (harmful, "tab:red", "unsafe")):
        axes[0, 0].hist(costs[group].tolist(), bins=bins, alpha=0.6, color=color, label=label)
        if rewards is not None:
            axes[0, 1].scatter(costs[group], rewards[group], s=8, alpha=0.6, color=color, label=label)
    for axis, ylabel in zip(axes[0], ("test responses", "reward R(y, x)")):
        axis.axvline(0, color="black", linestyle="--", linewidth=1)  # C = 0: the boundary the sign term anchors
        axis.set(xlabel="cost C(y, x)", ylabel=ylabel)
        axis.legend()
    figure.suptitle("The cost model on the test responses (C > 0: unsafe)")
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "cost_model.png"), dpi=120)
    plt.close(figure)
    utils.print0(f"figure: {os.path.join(output_dir, 'cost_model.png')}")


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
    train_pairs = cost_pairs(tokenizer, train_rows, args.max_length, args.contradictions, args.dataset)
    eval_pairs = []
    if args.eval_dataset != "none":
        eval_rows = utils.load_rows(args.eval_dataset, "preference", args.eval_split, subset)
        eval_pairs = cost_pairs(tokenizer, eval_rows, args.max_length, args.contradictions, args.eval_dataset)
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
    bar = tqdm(total=total_steps, initial=step, desc="cost", disable=not process.is_main)
    started = time.time()
    while step < last_step:
        batch = [train_pairs[i] for i in utils.global_batch(len(train_pairs), args.batch_size, args.seed, step)]
        mine = batch[process.rank * per_rank : (process.rank + 1) * per_rank]
        chunks = [mine[i : i + args.micro_batch_size] for i in range(0, per_rank, args.micro_batch_size)]
        totals = torch.zeros(2, device=process.device)  # (loss, accuracy) summed over micro steps
        for micro_step, chunk in enumerate(chunks):
            # DDP all-reduces gradients after the last micro step only (FSDP reduce-scatters after each).
            wrapped.require_backward_grad_sync = micro_step == len(chunks) - 1
            first, second = [p["more_harmful"] for p in chunk], [p["less_harmful"] for p in chunk]
            more_harmful_costs, less_harmful_costs = pair_scores(wrapped, first, second, tokenizer, process)
            signs = torch.tensor(
                [[p["more_harmful_sign"], p["less_harmful_sign"]] for p in chunk], device=process.device
            )
            share = len(chunk) / per_rank  # the chunk's mean, weighted by its share of this rank's pairs
            loss = share * cost_loss(
                more_harmful_costs, less_harmful_costs, signs[:, 0], signs[:, 1], args.regularization
            )
            loss.backward()  # DDP and FSDP average over ranks: the gradient is that of the global-batch mean
            accuracy = (more_harmful_costs > less_harmful_costs).float().mean().detach()
            totals += torch.stack([loss.detach(), accuracy * share])
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
            metrics, costs, harmful = evaluate_cost(wrapped, eval_pairs, tokenizer, args.micro_batch_size, process)
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

    # ------------------------------------------------------------------ the paper's figures of the cost model
    if eval_pairs and step == total_steps:  # costs, harmful: from the evaluation at the last step
        rewards = None
        if os.path.isdir(args.reward_model) and utils.load_tokenizer(args.reward_model).vocab == tokenizer.vocab:
            reward_model = utils.load_model(args.reward_model, tokenizer, score=True).requires_grad_(False)
            first, second = [p["more_harmful"] for p in eval_pairs], [p["less_harmful"] for p in eval_pairs]
            rewards = score_all(utils.wrap(reward_model, process, args), first, second, tokenizer, 64, process)
            rewards = torch.cat(rewards).cpu()
        if process.is_main:
            plot_figures(args.output_dir, costs, harmful, rewards)


if __name__ == "__main__":
    utils.run(main, Args)
