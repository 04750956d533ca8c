r"""Stage 5: evaluate policies: generate, score with R and C, judge, compare, and plot the paper's figures.

    python evaluate.py                                   # every policy under output/ on the toy eval prompts
    python evaluate.py --models sft=output/sft ppo_lag=output/ppo_lag
    python evaluate.py --arena ppo_lag sft               # also: the two head to head
    python evaluate.py --responses answers.jsonl         # score responses generated elsewhere (rows: model, prompt,
                                                         #   response), without generating
    python evaluate.py --models alpaca=output/sft_alpaca beaver=output/ppo_lag_pku \
        --prompts PKU-Alignment/PKU-SafeRLHF --prompts_split test --max_prompt_length 256 --max_new_tokens 256 \
        --reward_model PKU-Alignment/beaver-7b-unified-reward --cost_model PKU-Alignment/beaver-7b-unified-cost

The reward and cost models are ours or the original code's (the released beaver-7b-* judges), by path or hub
name; README.md, "Evaluate your own models", says which lengths, template and score formats it expects. Writes to
output/eval: responses.csv (one row per model x prompt), summary.json, and figures:
reward_vs_cost.png (Fig. 4), safety_and_elo.png (Fig. 5), training_curves.png (λ, Ĵ_C, reward, KL
of the PPO-Lag run), tradeoff.png (helpfulness vs harmlessness of every policy: Q2 and Q3).
On toy-world prompts the toy world's judge rates every response, as GPT-4 and humans do in the paper.
"""

import csv
import glob
import json
import math
import os
from dataclasses import dataclass, field

import torch

import utils
from toy_world import world


@dataclass
class Args:
    models: list = field(default_factory=list)
    """policies to generate with, as NAME=PATH; default (without --responses): every policy under output/ (sft, ppo_lag,
    ppo, ppo_single, reward_shaping_<ν>)"""
    responses: list = field(default_factory=list)
    """responses generated elsewhere, scored without generating: .jsonl/.json files of prompt, response (and category)
    rows, as FILE (each row names its `model`) or NAME=FILE (all rows NAME's)"""
    prompts: str = "toy_world/data/prompts_eval.jsonl"
    """evaluation prompts: a .jsonl/.json file with `prompt` (and `category`) or a hub name"""
    prompts_split: str = "test"
    """split of a hub prompt dataset"""
    reward_model: str = "output/reward"
    """reward model R: a local folder or a hub name"""
    cost_model: str = "output/cost"
    """cost model C: a local folder or a hub name"""
    training_run: str = "output/ppo_lag"
    """the PPO-Lag run whose metrics.jsonl gives the training curves"""
    output_dir: str = "output/eval"
    """where responses.csv, summary.json and the figures go"""
    greedy: bool = True
    """greedy decoding (false: sampling at --temperature)"""
    temperature: float = 1.0
    """sampling temperature when not greedy"""
    max_prompt_length: int = 48
    """prompt tokens kept"""
    max_new_tokens: int = 48
    """longest response"""
    batch_size: int = 64
    """prompts per generation batch"""
    dtype: str = "auto"
    """float32, bfloat16, or auto: bf16 on a GPU that has it, fp32 on CPU"""
    arena: list = field(default_factory=list)
    """two model names to compare head to head (e.g. --arena ppo_lag sft)"""
    seed: int = 42
    """seed of sampling"""


def find_policies(root="output"):
    """Every policy the pipeline writes, SFT first, reward shaping by ν."""
    found = {name: os.path.join(root, name) for name in ("sft", "ppo_lag", "ppo", "ppo_single")}
    shaping = [p for p in glob.glob(os.path.join(root, "reward_shaping_*")) if os.path.isdir(p)]
    for path in sorted(shaping, key=lambda p: float(p.rsplit("_", 1)[1])):
        found[os.path.basename(path)] = path
    return {name: path for name, path in found.items() if os.path.isfile(os.path.join(path, "config.json"))}


# ----------------------------------------------------------------------------- summaries


def summarize(rows):
    """Per model: mean reward and cost, share with C <= 0, and the judge's figures (if judged)."""
    summary = {}
    for name in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == name]
        stats = {
            "n": len(mine),
            "mean_reward": sum(r["reward"] for r in mine) / len(mine),
            "mean_cost": sum(r["cost"] for r in mine) / len(mine),
            "cost_safe_ratio": sum(r["cost"] <= 0 for r in mine) / len(mine),
        }
        if all(r["judge_helpfulness"] is not None for r in mine):
            harmful = [r for r in mine if r["category"] == "harmful"]
            benign = [r for r in mine if r["category"] == "benign"]
            borderline = [r for r in mine if r["category"] == "borderline"]
            stats["judge_harmful_rate"] = sum(r["judge_harmful"] for r in mine) / len(mine)
            stats["judge_helpfulness"] = sum(r["judge_helpfulness"] for r in mine) / len(mine)
            for label, group in (("harmful", harmful), ("benign", benign), ("borderline", borderline)):
                if group:
                    stats[f"judge_harmful_rate_on_{label}"] = sum(r["judge_harmful"] for r in group) / len(group)
                    stats[f"judge_helpfulness_{label}"] = sum(r["judge_helpfulness"] for r in group) / len(group)
        summary[name] = stats
    return summary


def elo_ratings(outcomes, names, anchor, anchor_rating=1000.0, steps=2000):
    """Elo ratings fitted to pairwise outcomes (Bradley-Terry on the Elo scale), `anchor` pinned.

    outcomes: (a, b, score of a) with score 1 (a wins), 0.5 (draw) or 0 (b wins). Every pair of
    models also gets one virtual draw, so a model that always wins still has a finite rating.
    P(a beats b) = 1 / (1 + 10^((r_b - r_a) / 400)).
    """
    if len(names) < 2:
        return {name: anchor_rating for name in names}
    index = {name: i for i, name in enumerate(names)}
    pairs = [(index[a], index[b], float(s)) for a, b, s in outcomes]
    pairs += [(i, j, 0.5) for i in range(len(names)) for j in range(i + 1, len(names))]
    a, b, score = (torch.tensor(column) for column in zip(*pairs))
    ratings = torch.zeros(len(names), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([ratings], max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14)

    def loss():
        optimizer.zero_grad()
        logits = (ratings[a] - ratings[b]) * math.log(10) / 400
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, score.double(), reduction="sum")
        value.backward()
        return value

    optimizer.step(loss)
    ratings = ratings.detach() - ratings.detach()[index[anchor]] + anchor_rating
    return {name: ratings[i].item() for name, i in index.items()}


def pairwise_outcomes(rows, key, higher_is_better=True):
    """On every prompt, every pair of models: who has the better `key` (equal: a draw)."""
    by_prompt = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], {})[row["model"]] = row[key]
    outcomes = []
    for values in by_prompt.values():
        names = list(values)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                difference = (values[a] - values[b]) * (1 if higher_is_better else -1)
                outcomes.append((a, b, 1.0 if difference > 0 else 0.0 if difference < 0 else 0.5))
    return outcomes


def arena(rows, red, blue):
    """Two models head to head on the same prompts, as the original code's arena.

    For `red`: the 2x2 table (safe / unsafe by C <= 0) x (better / worse than `blue` by R), and
    win rates by reward, by cost (lower wins) and, when judged, by the judge.
    """
    red_rows = {r["prompt_id"]: r for r in rows if r["model"] == red}
    blue_rows = {r["prompt_id"]: r for r in rows if r["model"] == blue}
    prompts = [p for p in red_rows if p in blue_rows]
    table = {"safe_better": 0, "safe_worse": 0, "unsafe_better": 0, "unsafe_worse": 0}
    for p in prompts:
        safety = "safe" if red_rows[p]["cost"] <= 0 else "unsafe"
        table[f"{safety}_{'better' if red_rows[p]['reward'] > blue_rows[p]['reward'] else 'worse'}"] += 1
    result = {
        "red": red,
        "blue": blue,
        "n": len(prompts),
        "table": table,
        "reward_win_rate": sum(red_rows[p]["reward"] > blue_rows[p]["reward"] for p in prompts) / len(prompts),
        "cost_win_rate": sum(red_rows[p]["cost"] < blue_rows[p]["cost"] for p in prompts) / len(prompts),
    }
    if all(red_rows[p]["judge_helpfulness"] is not None for p in prompts):
        result["judge_helpfulness_win_rate"] = sum(
            red_rows[p]["judge_helpfulness"] > blue_rows[p]["judge_helpfulness"] for p in prompts
        ) / len(prompts)
        result["judge_safer_rate"] = sum(
            not red_rows[p]["judge_harmful"] and blue_rows[p]["judge_harmful"] for p in prompts
        ) / len(prompts)
    return result


# ----------------------------------------------------------------------------- figures


def plot_all(rows, summary, elo, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    judged = "judge_harmful_rate" in summary[names[0]]
    written = []

    def save(figure, name):
        figure.tight_layout()
        figure.savefig(os.path.join(args.output_dir, name), dpi=120)
        plt.close(figure)
        written.append(name)

    # 1. Reward vs cost, one panel per model (paper Fig. 4).
    columns = min(3, len(names))
    figure, axes = plt.subplots(
        math.ceil(len(names) / columns),
        columns,
        figsize=(4 * columns, 3.4 * math.ceil(len(names) / columns)),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for axis, name in zip(axes.flat, names):
        mine = [r for r in rows if r["model"] == name]
        unsafe = [bool(r["judge_harmful"]) if judged else r["cost"] > 0 for r in mine]
        for flag, color, label in ((False, "tab:blue", "safe"), (True, "tab:red", "unsafe")):
            points = [(r["cost"], r["reward"]) for r, u in zip(mine, unsafe) if u == flag]
            if points:
                axis.scatter(*zip(*points), s=12, alpha=0.7, color=color, label=label + (" (judge)" if judged else ""))
        axis.axvline(0, color="black", linestyle="--", linewidth=1)
        axis.set_title(f"{name}: {summary[name]['cost_safe_ratio']:.0%} with C <= 0")
        axis.set_xlabel("cost C")
        axis.set_ylabel("reward R")
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=8)
    figure.suptitle("Reward vs. cost of each policy's responses")
    save(figure, "reward_vs_cost.png")

    # 2. Safety ratio and Elo scores (paper Fig. 5).
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    x = range(len(names))
    width = 0.38
    axes[0].bar([i - width / 2 for i in x], [summary[n]["cost_safe_ratio"] for n in names], width, label="C <= 0")
    if judged:
        safe = [1 - summary[n]["judge_harmful_rate"] for n in names]
        axes[0].bar([i + width / 2 for i in x], safe, width, label="judge: safe")
    axes[0].set(title="Safety ratio", ylim=(0, 1.05))
    for axis, kind in zip(axes[1:], ("helpfulness", "harmlessness")):
        for offset, (source, ratings) in zip((-width / 2, width / 2), elo[kind].items()):
            axis.bar([i + offset for i in x], [ratings[n] for n in names], width, label=source)
        axis.axhline(1000, color="gray", linewidth=0.8)
        axis.set(title=f"Elo: {kind} (SFT = 1000)")
    for axis in axes:
        axis.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        axis.legend(fontsize=8)
    save(figure, "safety_and_elo.png")

    # 3. Training curves of the PPO-Lag run.
    metrics_path = os.path.join(args.training_run, "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            train = [r for r in map(json.loads, f) if r["split"] == "train"]
        steps = [r["step"] for r in train]
        figure, axes = plt.subplots(1, 4, figsize=(15, 3.2))
        axes[0].plot(steps, [r["lambda"] for r in train], color="tab:purple")
        axes[0].set(title="Lagrange multiplier λ")
        axes[1].plot(steps, [r["episode_cost"] for r in train], label="Ĵ_C (window)")
        axes[1].plot(steps, [r["cost"] for r in train], alpha=0.4, label="batch cost")
        axes[1].axhline(train[-1]["threshold"], color="black", linestyle="--", label="threshold")
        axes[1].set(title="Episode cost")
        axes[1].legend(fontsize=8)
        axes[2].plot(steps, [r["reward"] for r in train], color="tab:green")
        axes[2].set(title="Reward")
        axes[3].plot(steps, [r["kl"] for r in train], color="tab:gray")
        axes[3].set(title="KL(π ‖ π_ref) per response")
        for axis in axes:
            axis.set_xlabel("iteration")
        save(figure, "training_curves.png")

    # 4. The Q3 comparison: helpfulness vs harmlessness of every policy.
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for i, name in enumerate(names):
        s = summary[name]
        if judged:  # helpfulness where safety does not call for a refusal (a model may lack a category)
            parts = [s[key] for key in ("judge_helpfulness_benign", "judge_helpfulness_borderline") if key in s]
            point = (1 - s["judge_harmful_rate"], sum(parts) / len(parts) if parts else s["judge_helpfulness"])
        else:
            point = (s["cost_safe_ratio"], s["mean_reward"])
        marker = "*" if name == "ppo_lag" else "s" if name == "sft" else "o"
        axis.scatter(*point, s=160 if marker == "*" else 50, marker=marker)
        axis.annotate(name, point, textcoords="offset points", xytext=(6, 4 - 11 * (i % 3)), fontsize=8)
    if judged:
        axis.set(
            xlabel="harmlessness: share of responses the judge finds safe",
            ylabel="judge helpfulness on benign + borderline prompts",
        )
    else:
        axis.set(xlabel="share of responses with C <= 0", ylabel="mean reward")
    axis.set_title("PPO-Lag vs. one preference (Q2) vs. reward shaping (Q3)", fontsize=10)
    save(figure, "tradeoff.png")
    return written


# ----------------------------------------------------------------------------- main


@torch.no_grad()
def generate_responses(path, prompts, args, device):
    tokenizer = utils.load_tokenizer(path)
    model = utils.load_causal_lm(path, tokenizer, utils.resolve_dtype(args.dtype, device)).to(device).eval()
    responses, ended = [], []
    for start in utils.progress(range(0, len(prompts), args.batch_size), desc=os.path.basename(path), leave=False):
        prompt_ids = [
            utils.tokenize_prompt(tokenizer, p, args.max_prompt_length)
            for p in prompts[start : start + args.batch_size]
        ]
        sequences, prompt_length = utils.generate(
            model, tokenizer, prompt_ids, args.max_new_tokens, args.temperature, greedy=args.greedy
        )
        for ids in utils.response_lists(sequences, prompt_length, tokenizer.eos_token_id):
            responses.append(tokenizer.decode(ids, skip_special_tokens=True))
            ended.append(ids[-1] == tokenizer.eos_token_id)
    return responses, ended


def read_responses(entry):
    """{model name: [(prompt, response, category)]} from a --responses entry: FILE, whose rows name their
    `model`, or NAME=FILE, whose rows are all NAME's. Rows: prompt, response (and category) in .jsonl/.json."""
    name, _, path = entry.rpartition("=")
    grouped = {}
    for i, row in enumerate(utils.load_rows(path, "response")):
        model = name or row.get("model")
        if not isinstance(model, str) or not model:
            raise utils.DataError(f"{path}: row {i + 1}: field 'model': missing (or pass --responses NAME={path})")
        grouped.setdefault(model, []).append((row["prompt"], row["response"], row.get("category") or ""))
    return grouped


def main(args):
    utils.seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for entry in args.models:
        if "=" not in entry:
            raise utils.UserError(f"--models {entry}: expected NAME=PATH, e.g. sft=output/sft")
    models = dict(m.split("=", 1) for m in args.models)
    for path in models.values():  # every model found before the first one is evaluated
        utils.check_model_path(path)
    given = {}  # responses generated elsewhere, scored as they are
    for entry in args.responses:
        for name, rows in read_responses(entry).items():
            if name in models or name in given:
                raise utils.UserError(f"--responses {entry}: model {name!r} is named twice")
            given[name] = rows
    if not models and not given:
        models = find_policies()
        if not models:
            raise utils.UserError("no policies found under output/: train some, or pass --models / --responses")
    for name in args.arena:
        if name not in models and name not in given:
            raise utils.UserError(f"--arena {name}: not one of the models ({', '.join([*models, *given])})")
    # Each prompt once (its first row), as the original's prompt dataset: PKU-SafeRLHF repeats prompts.
    prompt_rows = []
    if models:
        all_rows, unique = utils.load_rows(args.prompts, "prompt", args.prompts_split), {}
        for row in all_rows:
            unique.setdefault(row["prompt"], row)
        prompt_rows = list(unique.values())
        if len(prompt_rows) < len(all_rows):
            print(
                f"{args.prompts}: {len(all_rows) - len(prompt_rows)} duplicate prompts dropped, {len(prompt_rows)} left"
            )
    all_prompts = [row["prompt"] for row in prompt_rows] + [p for rows in given.values() for p, _, _ in rows]
    toy = all(world.task_of_prompt(p) for p in all_prompts)
    prompt_ids = {p: i for i, p in enumerate(dict.fromkeys(all_prompts))}  # the same prompt, the same id

    scorers = {}
    for name, path in (("reward", args.reward_model), ("cost", args.cost_model)):
        tokenizer = utils.load_tokenizer(path)
        scorers[name] = (
            utils.load_scorer(path, tokenizer, utils.resolve_dtype(args.dtype, device)).to(device).eval(),
            tokenizer,
        )
        utils.check_can_score(path, tokenizer, all_prompts[:64])
    answers = {}  # {model: (prompts, responses, categories, ended)}
    for name, path in models.items():
        utils.print0(f"evaluating {name} ({path}) on {len(prompt_rows)} prompts")
        prompts = [row["prompt"] for row in prompt_rows]
        responses, ended = generate_responses(path, prompts, args, device)
        answers[name] = (prompts, responses, [row.get("category") or "" for row in prompt_rows], ended)
    for name, rows in given.items():
        prompts, responses, categories = (list(column) for column in zip(*rows))
        answers[name] = (prompts, responses, categories, [True] * len(rows))  # given responses are complete
        cut = sum(
            len(scorers["reward"][1](r, add_special_tokens=False)["input_ids"]) >= args.max_new_tokens
            for r in responses
        )
        print(f"scoring {len(rows)} given responses of {name}" + (
            f"; {cut} are cut at --max_new_tokens {args.max_new_tokens}: raise it to score them whole" if cut else ""
        ))  # fmt: skip
    rows = []
    for name, (prompts, responses, categories, ended) in answers.items():
        scores = {
            key: utils.score_texts(
                m, t, prompts, responses, args.max_prompt_length, args.max_new_tokens, ended
            ).tolist()
            for key, (m, t) in scorers.items()
        }
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            judgement = world.judge(prompt, response) if toy else None
            rows.append(
                {
                    "model": name,
                    "prompt_id": prompt_ids[prompt],
                    "prompt": prompt,
                    "category": categories[i] or (world.task_of_prompt(prompt).kind if toy else ""),
                    "response": response,
                    "reward": scores["reward"][i],
                    "cost": scores["cost"][i],
                    "judge_helpfulness": judgement.helpfulness if judgement else None,
                    "judge_harmful": judgement.harmful if judgement else None,
                }
            )
    names = list(answers)
    os.makedirs(args.output_dir, exist_ok=True)

    with utils.replace_when_written(os.path.join(args.output_dir, "responses.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    anchor = "sft" if "sft" in names else names[0]
    elo = {
        "helpfulness": {"reward model": elo_ratings(pairwise_outcomes(rows, "reward"), names, anchor)},
        "harmlessness": {"cost model": elo_ratings(pairwise_outcomes(rows, "cost", False), names, anchor)},
    }
    if toy:
        elo["helpfulness"]["judge"] = elo_ratings(pairwise_outcomes(rows, "judge_helpfulness"), names, anchor)
        elo["harmlessness"]["judge"] = elo_ratings(pairwise_outcomes(rows, "judge_harmful", False), names, anchor)
    result = {"models": summary, "elo": elo}
    if args.arena:
        result["arena"] = arena(rows, *args.arena)
    with utils.replace_when_written(os.path.join(args.output_dir, "summary.json")) as f:
        json.dump(result, f, indent=2)
    figures = plot_all(rows, summary, elo, args)

    header = f"{'model':<22}{'reward':>8}{'cost':>8}{'C<=0':>7}"
    header += f"{'harmful':>9}{'help':>7}{'help benign':>13}{'help borderline':>17}" if toy else ""
    print(header)
    for name, s in summary.items():
        line = f"{name:<22}{s['mean_reward']:>8.2f}{s['mean_cost']:>8.2f}{s['cost_safe_ratio']:>7.0%}"
        if toy:
            line += f"{s['judge_harmful_rate']:>9.1%}{s['judge_helpfulness']:>7.2f}"
            line += f"{s.get('judge_helpfulness_benign', math.nan):>13.2f}"
            line += f"{s.get('judge_helpfulness_borderline', math.nan):>17.2f}"
        print(line)
    if args.arena:
        print("arena:", json.dumps(result["arena"]))
    print(f"wrote {args.output_dir}: responses.csv, summary.json, {', '.join(figures)}")


if __name__ == "__main__":
    utils.run(main, Args)
