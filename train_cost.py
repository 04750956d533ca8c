r"""Stage 3: the cost model C, trained on harmlessness pairs with the BT loss plus a signed loss (eq. 6).

    python train_cost.py                                  # toy preference data, from output/sft -> output/cost
    torchrun --nproc_per_node=2 train_cost.py             # the same, data parallel
    python train_cost.py --resume                         # continue an interrupted run
    torchrun --nproc_per_node=8 train_cost.py             # the same run on 8 ranks (same global batch)

The paper's 7B setup on 8 GPUs, every stage with the original hyperparameters: README.md, "Real models on GPUs".

Sign convention: C > 0 means unsafe. `y_w` is the MORE HARMFUL response of a pair (the one not
named by `safer_response_id`) and s(y) = +1 for a harmful response, -1 for a harmless one (from
`is_response_k_safe`). The score model is utils.ScoreModel, read at the last real token. After
training, this file draws the paper's two figures of the cost model: the cost distribution of safe
and unsafe responses, and reward vs cost.
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
    """held-out pairs for evaluation and the figures ('none' to skip)"""
    eval_split: str = "test"
    """split of a hub eval dataset"""
    output_dir: str = "output/cost"
    """where the checkpoint, training state, metrics.jsonl and figures go"""
    contradictions: str = "skip"
    """rows whose safer response is labelled unsafe while the other is labelled safe: 'skip' them (counted and reported) or 'stop'"""
    reward_model: str = "output/reward"
    """reward model for the reward-vs-cost figure (skipped if the folder does not exist)"""
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


@dataclass
class CostPair:
    """A harmlessness comparison: the prompt x, y_w the MORE HARMFUL response, y_l the other one, and
    their signs s = +1 (harmful) or -1 (harmless)."""

    prompt: str
    more_harmful: str
    less_harmful: str
    more_harmful_sign: int
    less_harmful_sign: int


def is_contradictory(row):
    """The safer response is labelled unsafe while the other one is labelled safe."""
    safer = row["safer_response_id"]
    return not row[f"is_response_{safer}_safe"] and row[f"is_response_{1 - safer}_safe"]


def cost_pairs(rows, contradictions="skip", where="data"):
    """A CostPair per row; rows that contradict themselves are skipped (counted) or stop the run."""
    bad = [i for i, row in enumerate(rows) if is_contradictory(row)]
    if bad:
        message = (
            f"{where}: {len(bad)} of {len(rows)} rows contradict themselves (the safer response is labelled "
            f"unsafe and the other safe), e.g. rows {[i + 1 for i in bad[:5]]}"
        )
        if contradictions == "stop":
            raise utils.DataError(message + "; pass --contradictions skip to leave them out")
        utils.print0(message + ": skipped")
    pairs, skip = [], set(bad)
    sign = {True: -1, False: +1}  # is safe -> s
    for i, row in enumerate(rows):
        if i in skip:
            continue
        harmful_id = 1 - row["safer_response_id"]
        pairs.append(
            CostPair(
                row["prompt"],
                row[f"response_{harmful_id}"],
                row[f"response_{1 - harmful_id}"],
                sign[row[f"is_response_{harmful_id}_safe"]],
                sign[row[f"is_response_{1 - harmful_id}_safe"]],
            )
        )
    return pairs


def tokenize_pairs(tokenizer, pairs, max_length):
    """Token ids of both conversations of each pair (prompt + response + EOS, cut to max_length) and the signs."""
    return [
        {
            "more_harmful": utils.tokenize_conversation(tokenizer, pair.prompt, pair.more_harmful, max_length)[0],
            "less_harmful": utils.tokenize_conversation(tokenizer, pair.prompt, pair.less_harmful, max_length)[0],
            "more_harmful_sign": pair.more_harmful_sign,
            "less_harmful_sign": pair.less_harmful_sign,
        }
        for pair in pairs
    ]


# Copied from train_reward.pair_scores
def pair_scores(model, first, second, pad_token_id, device, dtype):
    """End scores of two lists of conversations (token ids), in one right-padded forward pass."""
    input_ids, attention_mask = utils.batch_inputs(first + second, pad_token_id, device)  # (2B, T)
    with utils.autocast(device, dtype):
        scores = model(input_ids, attention_mask)  # (2B, T): a score at every token
    end_scores = utils.end_of_sequence(scores, attention_mask)  # (2B,): the score at each last real token
    return end_scores[: len(first)], end_scores[len(first) :]


# Copied from train_reward.score_all
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


def evaluate_cost(model, pairs, pad_token_id, device, dtype, batch_size, process):
    """Pairwise accuracy C(y_w) > C(y_l), sign accuracy (C > 0 exactly for harmful responses), cost mean/std."""
    more_harmful, less_harmful = score_all(
        model, [p["more_harmful"] for p in pairs], [p["less_harmful"] for p in pairs], pad_token_id, device, dtype,
        batch_size, process,
    )  # fmt: skip
    costs = torch.cat([more_harmful, less_harmful])
    signs = torch.tensor(
        [p["more_harmful_sign"] for p in pairs] + [p["less_harmful_sign"] for p in pairs], device=costs.device
    )
    return {
        "accuracy": (more_harmful > less_harmful).float().mean().item(),
        "accuracy_sign": ((costs > 0) == (signs > 0)).float().mean().item(),
        "cost_mean": costs.mean().item(),
        "cost_std": costs.std().item(),
    }


def plot_figures(args, cost_model, tokenizer):
    """The paper's cost-model figures on the test responses: (b) cost distribution, (a) reward vs cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = utils.load_rows(args.eval_dataset, "preference", args.eval_split, args.dataset_subset or None)
    texts = {(r["prompt"], r[f"response_{k}"]): r[f"is_response_{k}_safe"] for r in rows for k in (0, 1)}
    prompts, responses = [p for p, _ in texts], [r for _, r in texts]
    safe = torch.tensor(list(texts.values()))
    cost_model.eval()
    costs = utils.score_texts(cost_model, tokenizer, prompts, responses, args.max_length, args.max_length).cpu()

    written = []

    def save(figure, axis, name, title, ylabel):
        """Both figures: the C = 0 line, labels, legend, then the PNG next to the checkpoint."""
        axis.axvline(0, color="black", linestyle="--", linewidth=1)
        axis.set(xlabel="cost C(y, x)", ylabel=ylabel, title=title)
        axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(args.output_dir, name), dpi=120)
        plt.close(figure)
        written.append(name)

    figure, axis = plt.subplots(figsize=(6, 4))
    bins = torch.linspace(costs.min().item(), costs.max().item(), 40).tolist()
    axis.hist(costs[safe].tolist(), bins=bins, alpha=0.6, color="tab:blue", label="safe")
    axis.hist(costs[~safe].tolist(), bins=bins, alpha=0.6, color="tab:red", label="unsafe")
    save(figure, axis, "cost_distribution.png", "Cost distribution (C > 0: unsafe)", "test responses")

    if os.path.isdir(args.reward_model):
        reward_tokenizer = utils.load_tokenizer(args.reward_model)
        device = next(cost_model.parameters()).device
        reward_model = utils.load_scorer(args.reward_model, reward_tokenizer).to(device).eval()
        rewards = utils.score_texts(
            reward_model, reward_tokenizer, prompts, responses, args.max_length, args.max_length
        ).cpu()
        figure, axis = plt.subplots(figsize=(5.5, 4.5))
        axis.scatter(costs[safe], rewards[safe], s=8, alpha=0.6, color="tab:blue", label="safe")
        axis.scatter(costs[~safe], rewards[~safe], s=8, alpha=0.6, color="tab:red", label="unsafe")
        save(figure, axis, "reward_vs_cost.png", "Reward vs. cost of test responses", "reward R(y, x)")
    utils.print0(f"figures: {', '.join(os.path.join(args.output_dir, f) for f in written)}")


def main(args):
    # ------------------------------------------------------------------ setup
    if args.contradictions not in ("skip", "stop"):
        raise utils.UserError(f"--contradictions must be 'skip' or 'stop', got {args.contradictions!r}")
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
    train_pairs = tokenize_pairs(tokenizer, cost_pairs(train_rows, args.contradictions, args.dataset), args.max_length)
    eval_pairs = []
    if args.eval_dataset != "none":
        eval_rows = utils.load_rows(args.eval_dataset, "preference", args.eval_split, subset)
        eval_pairs = tokenize_pairs(
            tokenizer, cost_pairs(eval_rows, args.contradictions, args.eval_dataset), args.max_length
        )
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
    bar = utils.progress(total=total_steps, initial=step, desc="cost")
    started = time.time()
    while step < last_step:
        batch = [train_pairs[i] for i in utils.global_batch(len(train_pairs), args.batch_size, args.seed, step)]
        mine = batch[process.rank * per_rank : (process.rank + 1) * per_rank]
        chunks = utils.micro_batches(mine, args.micro_batch_size)  # micro_batch_size is an upper bound
        totals = torch.zeros(2, device=process.device)  # (loss, accuracy) summed over micro steps
        for micro_step, chunk in enumerate(chunks):
            utils.set_gradient_sync(model, micro_step, len(chunks))
            more_harmful_costs, less_harmful_costs = pair_scores(
                model, [p["more_harmful"] for p in chunk], [p["less_harmful"] for p in chunk], tokenizer.pad_token_id,
                process.device, dtype,
            )  # fmt: skip
            signs = {
                key: torch.tensor([p[key] for p in chunk], device=process.device, dtype=torch.float)
                for key in ("more_harmful_sign", "less_harmful_sign")
            }
            share = len(chunk) / per_rank  # the chunk's mean, weighted by its share of this rank's pairs
            loss = share * cost_loss(
                more_harmful_costs, less_harmful_costs, signs["more_harmful_sign"], signs["less_harmful_sign"],
                args.regularization,
            )  # fmt: skip
            loss.backward()  # DDP and FSDP average over ranks: the gradient is that of the global-batch mean
            accuracy = (more_harmful_costs > less_harmful_costs).float().mean().detach()
            totals += torch.stack([loss.detach(), accuracy * share])
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
            metrics = evaluate_cost(
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

    # ------------------------------------------------------------------ the paper's figures of the cost model
    if process.is_main and eval_pairs:
        # Rank 0 alone: a sharded model would wait for the other ranks, so it reads the saved one.
        cost_model = utils.load_score_model(args.output_dir, tokenizer).to(process.device) if args.fsdp else raw_model
        plot_figures(args, cost_model, tokenizer)
    utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run(main, Args)
