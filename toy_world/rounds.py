"""Rounds of Safe RLHF, as the paper ran them (its Fig. 5, Beaver-v1 -> v2 -> v3): each round's policy answers the
training prompts, the toy world's raters annotate its answers, R and C are retrained on every round's data so far, and
PPO-Lag runs again from that policy. Not part of the default pipeline: run it after the Quick start (it starts from
output/sft).

    python -m toy_world.rounds                          # 3 rounds, seed 42 -> output/rounds/seed_42/round_{1,2,3}
    python -m toy_world.rounds --seeds 42 1 2           # three chains, two at a time; then output/rounds/rounds.png
    python -m toy_world.rounds --seeds 42 --rounds 2    # a kill in between? run the same command again: it resumes

Round 1 is today's pipeline: R_1 and C_1 on the shipped pairs, PPO-Lag from SFT. Round k >= 2:
1. annotate: the previous round's policy samples ANSWERS answers per training prompt at the training temperature (1),
   paired in the order sampled (4 pairs per prompt); `generate.annotate` labels each pair exactly as the shipped data
   was labelled (same raters, same 3% noise); pairs that tie on helpfulness or harm level are dropped (counted);
2. R_k and C_k: trained from SFT, with the stages' defaults (2 epochs: more steps as the data grows), on the shipped
   pairs plus every later round's;
3. PPO-Lag from the previous round's policy, which is also its KL reference (the original loads actor and reference
   from one checkpoint), against R_k and C_k, its critics initialised from them; λ starts again at --lambda_init
   (each of the paper's rounds is a new run with its own λ_init); the threshold follows C_k's scale: it moves by as
   much as the mean cost C_k gives the shipped test set's safe answers differs from C_1's.
No red-team prompts: the paper's later rounds added new prompts that elicit harm; all 240 toy prompts are in use and
new phrasings would add words to the vocabulary.

Each round also measures R and C on the current policy's answers (ANSWERS fresh answers per evaluation prompt, from
the previous round's policy: SFT's for round 1, annotated the same way) before and after retraining: does round k's C
catch what round k-1's policy learned? Then `evaluate.py` rates SFT and every round's policy (greedy) with the judge.
Writes round_k/summary.json and, over all seeds, output/rounds/summary.json and rounds.png.
"""

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
import ppo_lagrangian  # noqa: E402
import train_cost  # noqa: E402
import train_reward  # noqa: E402
import utils  # noqa: E402
from toy_world import generate  # noqa: E402

ANSWERS = 8  # answers sampled per prompt and round, paired in order: 4 pairs
DATA = os.path.join(ROOT, "toy_world", "data")


def sample_answers(policy, prompts, seed, answers):
    """`answers` answers of `policy` to each prompt, sampled at temperature 1 (as in training): {prompt: [answers]}."""
    torch.manual_seed(seed)
    options = SimpleNamespace(batch_size=96, max_prompt_length=48, max_new_tokens=48, temperature=1.0)
    options.samples_per_prompt = answers
    texts, _ = evaluate.generate_responses(policy, prompts * answers, options, utils.setup_distributed("float32"))
    return {prompt: texts[i :: len(prompts)] for i, prompt in enumerate(prompts)}


def annotate_answers(answers, categories, seed):
    """The raters' labels on pairs of each prompt's answers (1st with 2nd, 3rd with 4th, ...), in the shipped schema;
    and how many pairs tied (dropped)."""
    rng, rows, ties = random.Random(seed), [], 0
    for prompt, texts in answers.items():
        for pair in zip(texts[0::2], texts[1::2]):
            row = generate.annotate(rng, prompt, list(pair), categories[prompt])
            rows.append(row) if row else None
            ties += row is None
    return rows, ties


def accuracies(reward_path, cost_path, rows):
    """R's pairwise accuracy and C's pairwise and sign accuracy on annotated pairs."""
    process, found = utils.setup_distributed("float32"), {}
    for name, path in (("reward", reward_path), ("cost", cost_path)):
        tokenizer = utils.load_tokenizer(path)
        model = utils.load_model(path, tokenizer, score=True).eval()
        if name == "reward":
            pairs = train_reward.reward_pairs(tokenizer, rows, 128)
            found["reward_accuracy"] = train_reward.evaluate_reward(model, pairs, tokenizer, 64, process)["accuracy"]
        else:
            pairs = train_cost.cost_pairs(tokenizer, rows, 128, "skip", "annotated answers")
            metrics = train_cost.evaluate_cost(model, pairs, tokenizer, 64, process)[0]
            found.update(cost_accuracy=metrics["accuracy"], cost_sign_accuracy=metrics["accuracy_sign"])
    return found


def mean_safe_cost(cost_path):
    """The mean cost C gives the safe answers of the shipped test pairs: where C's scale puts a safe answer."""
    rows = utils.load_rows(os.path.join(DATA, "preference_test.jsonl"), "preference")
    safe = [(r["prompt"], r[f"response_{i}"]) for r in rows for i in (0, 1) if r[f"is_response_{i}_safe"]]
    tokenizer = utils.load_tokenizer(cost_path)
    model = utils.load_model(cost_path, tokenizer, score=True).eval()
    return evaluate.score_texts(model, tokenizer, *zip(*safe), 128).mean().item()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    """Whole or not at all."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


def stage(log, module, *flags):
    """Run a stage in this process, its output appended to `log`; with --resume if a kill left a checkpoint of it."""
    output_dir = flags[flags.index("--output_dir") + 1]
    resume = ["--resume"] if os.path.exists(os.path.join(output_dir, "training_state.pt")) else []
    with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        module.main(utils.parse_args(module.Args, [*flags, *resume]))


def annotate_policy(policy, prompts, categories, seed, answers, path):
    """Sample the policy's answers to `prompts`, annotate them and write the pairs to `path`; their counts."""
    rows, ties = annotate_answers(sample_answers(policy, prompts, seed, answers), categories, seed)
    write_jsonl(path, rows)
    return {"pairs": len(rows), "tied_pairs_dropped": ties}


def chain(seed, rounds, root, threshold, sft="output/sft", answers=ANSWERS, extra=None):
    """One seed's rounds from the SFT model `sft`; each step is skipped if the chain's progress.json says it is done
    (a kill resumes there). `extra`: more flags per stage, {"train_reward": [...], ...} (a test's tiny runs)."""
    folder = os.path.join(root, f"seed_{seed}")
    os.makedirs(folder, exist_ok=True)
    progress_path = os.path.join(folder, "progress.json")
    done = json.load(open(progress_path)) if os.path.exists(progress_path) else {}

    def step(name, function, *arguments):
        if name not in done:
            done[name] = function(*arguments)
            with open(progress_path + ".tmp", "w") as f:
                json.dump(done, f, indent=1)
            os.replace(progress_path + ".tmp", progress_path)
        return done[name]

    prompts = {split: read_jsonl(os.path.join(DATA, f"prompts_{split}.jsonl")) for split in ("train", "eval")}
    categories = {row["prompt"]: row["category"] for rows in prompts.values() for row in rows}
    prompts = {split: [row["prompt"] for row in rows] for split, rows in prompts.items()}
    extra, policy, data = extra or {}, os.path.join(ROOT, sft), [os.path.join(DATA, "preference_train.jsonl")]
    for k in range(1, rounds + 1):
        here, log = os.path.join(folder, f"round_{k}"), os.path.join(folder, f"round_{k}.log")
        os.makedirs(os.path.join(here, "data"), exist_ok=True)
        summary = {"round": k, "seed": seed, "starts_from": os.path.relpath(policy, ROOT)}
        # What the policy this round starts from says on the evaluation prompts, annotated: R and C are measured on it.
        current = os.path.join(here, "data", "policy_eval.jsonl")
        summary["current_policy_pairs"] = step(
            f"{k}: annotate eval answers",
            annotate_policy,
            policy,
            prompts["eval"],
            categories,
            seed * 100 + k,
            answers,
            current,
        )
        current = read_jsonl(current)
        if k > 1:
            new = os.path.join(here, "data", "policy_train.jsonl")
            summary["new_train_pairs"] = step(
                f"{k}: annotate train answers",
                annotate_policy,
                policy,
                prompts["train"],
                categories,
                seed * 100 + k + 50,
                answers,
                new,
            )
            data.append(new)
            previous = os.path.join(folder, f"round_{k - 1}")
            summary["before_retraining"] = step(
                f"{k}: R, C of round {k - 1} on the current answers",
                accuracies,
                f"{previous}/reward",
                f"{previous}/cost",
                current,
            )
        all_rounds = os.path.join(here, "data", "preference_all.jsonl")
        write_jsonl(all_rounds, [row for path in data for row in read_jsonl(path)])
        summary["train_pairs"] = {os.path.relpath(path, ROOT): len(read_jsonl(path)) for path in data}
        for name, module in (("reward", train_reward), ("cost", train_cost)):
            flags = ["--model_name_or_path", os.path.join(ROOT, sft), "--dataset", all_rounds, "--seed", str(seed)]
            flags += ["--output_dir", f"{here}/{name}"]
            flags += ["--reward_model", f"{here}/reward"] if name == "cost" else []
            step(f"{k}: train {name}", stage, log, module, *flags, *extra.get(module.__name__, []))
        summary["after_retraining"] = step(
            f"{k}: R, C of round {k} on the current answers", accuracies, f"{here}/reward", f"{here}/cost", current
        )
        safe_cost = step(f"{k}: C's mean cost of safe test answers", mean_safe_cost, f"{here}/cost")
        summary["threshold"] = threshold + safe_cost - done["1: C's mean cost of safe test answers"]
        flags = ["--actor_model_name_or_path", policy, "--reward_model", f"{here}/reward"]
        flags += ["--cost_model", f"{here}/cost", "--threshold", str(summary["threshold"])]
        flags += ["--seed", str(seed), "--output_dir", f"{here}/ppo_lag"]
        step(f"{k}: PPO-Lag", stage, log, ppo_lagrangian, *flags, *extra.get("ppo_lagrangian", []))
        policy = f"{here}/ppo_lag"
        models = [f"sft={os.path.join(ROOT, sft)}"] + [f"round_{i}={folder}/round_{i}/ppo_lag" for i in range(1, k + 1)]
        flags = ["--models", *models, "--reward_model", f"{here}/reward", "--cost_model", f"{here}/cost"]
        flags += ["--output_dir", f"{here}/eval", *extra.get("evaluate", [])]
        step(f"{k}: evaluate", stage, log, evaluate, *flags)
        evaluation = json.load(open(os.path.join(here, "eval", "summary.json")))
        summary["policy"] = evaluation["models"][f"round_{k}"]
        summary["elo_by_judge"] = {kind: by["judge"] for kind, by in evaluation["elo"].items()}
        train = [r for r in read_jsonl(f"{here}/ppo_lag/metrics.jsonl") if r["split"] == "train"]
        summary["lambda_final"], summary["episode_cost_final"] = train[-1]["lambda"], train[-1]["episode_cost"]
        with open(os.path.join(here, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)


def plot(chains, path):
    """Fig. 5 in miniature: Elo in helpfulness and in harmlessness by the judge (SFT = 1000) and the share of answers
    the judge finds harmful, for SFT and each round's policy, one line per seed, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for seed, rounds in chains.items():
        last = json.load(open(os.path.join(rounds[-1]["folder"], "eval", "summary.json")))
        names = list(last["models"])
        panels = [last["elo"]["helpfulness"]["judge"], last["elo"]["harmlessness"]["judge"]]
        panels.append({name: [100 * x for x in last["models"][name]["judge_harmful_rate"]] for name in names})
        for axis, values in zip(axes, panels):
            value, low, high = torch.tensor([values[name] for name in names]).T
            axis.errorbar(range(len(names)), value, yerr=(value - low, high - value), capsize=3, label=f"seed {seed}")
    titles = ("Elo: helpfulness, by the judge", "Elo: harmlessness, by the judge", "harmful answers (%), by the judge")
    for axis, title in zip(axes, titles):
        axis.set_xticks(range(len(names)), ["SFT"] + [f"round {k}" for k in range(1, len(names))])
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.suptitle("Rounds of Safe RLHF in the toy world (the paper's Fig. 5: Beaver-v1, v2, v3); SFT = 1000")
    figure.tight_layout()
    figure.savefig(path + ".tmp", dpi=120, format="png")
    os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one chain of rounds per seed")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per chain")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "output", "rounds"))
    parser.add_argument("--threshold", type=float, default=-5.5, help="round 1's PPO-Lag threshold (the default)")
    parser.add_argument("--sft", default="output/sft", help="the SFT model every chain starts from")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(ROOT, args.sft, "config.json")):
        raise SystemExit(f"error: {args.sft} not found: the rounds start from the SFT model (run `bash pipeline.sh`)")
    if len(args.seeds) == 1:
        chain(args.seeds[0], args.rounds, args.output_dir, args.threshold, args.sft)
    else:  # one process per chain, two at a time, one thread each (the in-process sampling draws from torch's RNG)

        def one(seed):
            command = [sys.executable, "-m", "toy_world.rounds", "--seeds", str(seed), "--rounds", str(args.rounds)]
            command += ["--output_dir", args.output_dir, "--threshold", str(args.threshold), "--sft", args.sft]
            log = os.path.join(args.output_dir, f"seed_{seed}.log")
            os.makedirs(args.output_dir, exist_ok=True)
            with open(log, "w") as out:
                environment = {**os.environ, "OMP_NUM_THREADS": "1"}
                failed = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=environment)
            if failed.returncode:
                raise SystemExit(f"the chain of seed {seed} failed: see {log}")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, args.seeds))
    chains = {}
    for seed in args.seeds:
        folder = os.path.join(args.output_dir, f"seed_{seed}")
        rounds = [
            json.load(open(os.path.join(folder, f"round_{k}", "summary.json"))) for k in range(1, args.rounds + 1)
        ]
        chains[seed] = [dict(r, folder=os.path.join(folder, f"round_{r['round']}")) for r in rounds]
    sft = json.load(open(os.path.join(chains[args.seeds[0]][-1]["folder"], "eval", "summary.json")))["models"]["sft"]
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"sft": sft, "chains": chains}, f, indent=1)
    plot(chains, os.path.join(args.output_dir, "rounds.png"))
    print(f"wrote {args.output_dir}/summary.json and rounds.png")


if __name__ == "__main__":
    main()
