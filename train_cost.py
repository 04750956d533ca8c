r"""Stage 3: the cost model C, trained on harmlessness pairs with the BT loss plus a signed loss (eq. 6).

    python train_cost.py                                  # toy preference data, from output/sft -> output/cost
    torchrun --nproc_per_node=2 train_cost.py             # the same, data parallel
    python train_cost.py --resume                         # continue an interrupted run
    torchrun --nproc_per_node=8 train_cost.py             # the same run on 8 ranks (same global batch)

The paper's 7B setup on 8 GPUs, every stage with the original hyperparameters: README.md, "Real models and data".

Sign convention: C > 0 means unsafe. `y_w` is the MORE HARMFUL response of a pair (the one not
named by `safer_response_id`) and s(y) = +1 for a harmful response, -1 for a harmless one (from
`is_response_k_safe`). The training loop is train_reward.train; this file brings the cost loss,
its evaluation (pairwise and sign accuracy) and the paper's two figures of the cost model.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import train_reward
import utils


@dataclass
class Args(train_reward.Args):
    output_dir: str = "output/cost"
    """where the checkpoint, training state, metrics.jsonl and figures go"""
    contradictions: str = "skip"
    """rows whose safer response is labelled unsafe while the other is labelled safe: 'skip' them (counted and reported) or 'stop'"""
    reward_model: str = "output/reward"
    """reward model for the reward-vs-cost figure (skipped if the folder does not exist)"""


# L_C(ψ; D_C) = -E[ log σ(C(y_w, x) - C(y_l, x)) ]                          (eq. 6, first term)
#               -E[ log σ(s_w · C(y_w, x)) + log σ(s_l · C(y_l, x)) ]      (eq. 6, second term)
# y_w is the more harmful response. The second term compares each response with a virtual
# response y_0 on the safe/unsafe boundary, C(y_0, x) = 0: it pushes the cost of a harmful
# response above 0 and that of a harmless one below 0, so the sign of C classifies safety.
def cost_loss(more_harmful_costs, less_harmful_costs, more_harmful_signs, less_harmful_signs, regularization=0.0):
    loss = -F.logsigmoid(more_harmful_costs - less_harmful_costs).mean()
    loss = (
        loss
        - (
            F.logsigmoid(more_harmful_signs * more_harmful_costs)
            + F.logsigmoid(less_harmful_signs * less_harmful_costs)
        ).mean()
    )
    if regularization > 0:  # as in the original code: keeps scores near 0
        loss = loss + regularization * torch.stack([more_harmful_costs, less_harmful_costs]).square().mean()
    return loss


def is_contradictory(row):
    """The safer response is labelled unsafe while the other one is labelled safe."""
    safer = row["safer_response_id"]
    return not row[f"is_response_{safer}_safe"] and row[f"is_response_{1 - safer}_safe"]


def cost_pairs(rows, contradictions="skip", where="data"):
    """(prompt, y_w, y_l, s_w, s_l) per row: y_w the more harmful response, s = +1 harmful / -1 harmless."""
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
    for i, row in enumerate(rows):
        if i in skip:
            continue
        harmful_id = 1 - row["safer_response_id"]
        sign = {True: -1, False: +1}  # is safe -> s
        pairs.append(
            (
                row["prompt"],
                row[f"response_{harmful_id}"],
                row[f"response_{1 - harmful_id}"],
                sign[row[f"is_response_{harmful_id}_safe"]],
                sign[row[f"is_response_{1 - harmful_id}_safe"]],
            )
        )
    return pairs


@torch.no_grad()
def evaluate_cost(model, pairs, pad_token_id, device, dtype, batch_size, ctx):
    """Pairwise accuracy C(y_w) > C(y_l), sign accuracy (C > 0 exactly for harmful responses), cost mean/std."""
    more_harmful, less_harmful = train_reward.score_all(model, pairs, pad_token_id, device, dtype, batch_size, ctx)
    costs = torch.cat([more_harmful, less_harmful])
    signs = torch.tensor([p[2] for p in pairs] + [p[3] for p in pairs], device=costs.device)
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
        reward_model = utils.load_score_model(args.reward_model, reward_tokenizer).to(device).eval()
        rewards = utils.score_texts(
            reward_model, reward_tokenizer, prompts, responses, args.max_length, args.max_length
        ).cpu()
        figure, axis = plt.subplots(figsize=(5.5, 4.5))
        axis.scatter(costs[safe], rewards[safe], s=8, alpha=0.6, color="tab:blue", label="safe")
        axis.scatter(costs[~safe], rewards[~safe], s=8, alpha=0.6, color="tab:red", label="unsafe")
        save(figure, axis, "reward_vs_cost.png", "Reward vs. cost of test responses", "reward R(y, x)")
    utils.print0(f"figures: {', '.join(os.path.join(args.output_dir, f) for f in written)}")


def main(args):
    if args.contradictions not in ("skip", "stop"):
        raise ValueError(f"--contradictions must be 'skip' or 'stop', got {args.contradictions!r}")

    def make_pairs(rows, where):
        return cost_pairs(rows, args.contradictions, where)

    def loss(costs_w, costs_l, signs_w, signs_l):
        return cost_loss(costs_w, costs_l, signs_w, signs_l, args.regularization)

    ctx, model, tokenizer, eval_pairs, _ = train_reward.train(args, make_pairs, loss, evaluate_cost, "cost")
    if ctx.is_main and eval_pairs:
        # Rank 0 alone: a sharded model would wait for the other ranks, so it reads the saved one.
        cost_model = utils.load_score_model(args.output_dir, tokenizer).to(ctx.device) if args.fsdp else model
        plot_figures(args, utils.unwrap(cost_model), tokenizer)
    utils.cleanup_distributed()


if __name__ == "__main__":
    main(utils.parse_args(Args))
