"""Every measured number of the README and docs/ lives in one place: the JSON files in results/, written by the runs
and benches that measure them (each with its machine, date and commit). This script renders them into the marked blocks
of the documents, `<!-- results:NAME -->` ... `<!-- /results -->`; no measured number is typed anywhere else.

    python bench/results.py record pipeline [CHECKOUT]   # after `bash pipeline.sh`: output/ -> results/pipeline.json
    python bench/results.py record rounds     # after `python -m toy_world.rounds --seeds ...`: results/rounds.json
    python bench/results.py record machines   # the base commit's README table (measured on another machine)
    python bench/results.py                   # results/*.json -> the blocks of README.md and docs/*.md

The other results files come from bench/compare.py, bench/experiments.py, bench/decoding.py, bench/trl_race.py,
bench/throughput.py and bench/scale_out.py. tests/test_results.py renders the blocks from the committed JSON and fails
on any difference, and on a measured-looking number outside the blocks that none of them holds.
"""

import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = [
    "README.md",
    *(f"docs/{name}" for name in sorted(os.listdir(os.path.join(ROOT, "docs"))) if name.endswith(".md")),
]
BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results -->)", re.S)


def machine():
    """This machine, in words: CPU model, cores, memory, OS."""
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model or platform.processor()}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()}"


def stamp(folder=ROOT):
    """Where and when a measurement was made, and on which commit (of the checkout in `folder`)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True).stdout
    return {"machine": machine(), "date": datetime.date.today().isoformat(), "commit": commit.strip()}


def save(name, data):
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def read_metrics(folder, split):
    with open(os.path.join(ROOT, folder, "metrics.jsonl")) as f:
        return [record for record in map(json.loads, f) if record["split"] == split]


# ----------------------------------------------------------------------------- recording


def record_pipeline(folder=ROOT):
    """The default pipeline's outputs in `folder` (a checkout: this one, or bench/compare.py's clone): timings, the
    evaluation, the score models' accuracies, the PPO-Lag run; the figures copied to docs/figures/."""
    os.chdir(folder)
    summary = json.load(open("output/eval/summary.json"))
    data = {**stamp(folder), "seconds": json.load(open("output/timings.json"))}
    data.update(models=summary["models"], elo=summary["elo"], arena=summary["arena"])
    data["score_models"] = {
        name: read_metrics(f"output/{name}", "eval")[-1] for name in ("reward", "cost", "reward_single")
    }
    data["sft_judge"] = read_metrics("output/sft", "eval")[-1]
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import experiments

    data["ppo_lag_run"] = experiments.curves("output/ppo_lag")
    save("pipeline", data)
    for name in ("reward_vs_cost", "safety_and_elo", "tradeoff", "per_prompt"):
        shutil.copy(os.path.join(ROOT, f"output/eval/{name}.png"), os.path.join(ROOT, f"docs/figures/{name}.png"))
    shutil.copy(os.path.join(ROOT, "output/ppo_lag/training_curves.png"), os.path.join(ROOT, "docs/figures"))
    shutil.copy(os.path.join(ROOT, "output/cost/cost_model.png"), os.path.join(ROOT, "docs/figures"))


def record_rounds():
    summary = json.load(open(os.path.join(ROOT, "output/rounds/summary.json")))
    minutes = {}
    for seed in summary["chains"]:  # a chain's time: from its first to its last file
        files = glob.glob(os.path.join(ROOT, f"output/rounds/seed_{seed}/**"), recursive=True)
        times = [os.path.getmtime(f) for f in files] + [
            os.path.getctime(os.path.join(ROOT, f"output/rounds/seed_{seed}"))
        ]
        minutes[seed] = (max(times) - min(times)) / 60
    shutil.copy(os.path.join(ROOT, "output/rounds/rounds.png"), os.path.join(ROOT, "docs/figures/rounds.png"))
    save("rounds", {**stamp(), **summary, "minutes": minutes})


def record_machines():
    """The results table of the base commit's README: the same code as compare.json's base run, on another machine."""
    text = subprocess.run(["git", "show", "7829859:README.md"], cwd=ROOT, capture_output=True, text=True).stdout
    names = {"SFT": "sft", "**PPO-Lag** (Safe RLHF)": "ppo_lag", "PPO (reward only)": "ppo"}
    harmful = {}  # from its results table, the first rows so named; column 5: judge: harmful
    for line in text.splitlines():
        row = [cell.strip() for cell in line.split("|")[1:-1]]
        if line.startswith("| ") and row[0] in names and names[row[0]] not in harmful:
            harmful[names[row[0]]] = float(row[4].strip("*%")) / 100
    save("machines", {"commit": "7829859", "source": "README.md at commit 7829859", "judge_harmful_rate": harmful})


# ----------------------------------------------------------------------------- pieces


def minutes(seconds):
    return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def estimate_of(figure):
    """A figure's estimate: ours are [estimate, low, high]; the base commit's summary has plain numbers."""
    return figure[0] if isinstance(figure, list) else figure


def percent(value):
    return f"{100 * value:.1f}%"


def interval(triple, as_percent=False):
    """An estimate and its 95% interval: 5.6% [1.4, 11.1] or 0.96 [0.20, 2.39]."""
    if as_percent:
        value, low, high = (100 * x for x in triple)
        return f"{value:.1f}% [{low:.1f}, {high:.1f}]"
    return "{:.2f} [{:.2f}, {:.2f}]".format(*triple)


def span(values, as_percent=True):
    """The range of values over seeds or runs: 1.4–5.6%."""
    low, high = min(values), max(values)
    if as_percent:
        return f"{100 * low:.1f}%" if low == high else f"{100 * low:.1f}–{100 * high:.1f}%"
    return f"{low:.2f}" if low == high else f"{low:.2f}{' to ' if low < 0 else '–'}{high:.2f}"


def measured(data):
    return f"Measured on {data['machine']}, {data['date']} (commit {data['commit']})."


LABELS = {"sft": "SFT", "ppo_lag": "**PPO-Lag** (Safe RLHF)", "ppo": "PPO (reward only)",
          "ppo_single": "PPO on one preference (Q2)"}  # fmt: skip


def label(name):
    return LABELS.get(name, name.replace("reward_shaping_", "reward shaping ν = "))


COLUMNS = {  # summary key -> (header, as percent)
    "mean_reward": ("reward", False), "mean_cost": ("cost", False), "cost_safe_ratio": ("C ≤ 0", True),
    "judge_harmful_rate": ("harmful", True), "judge_harmful_rate_on_harmful": ("harmful on harmful prompts", True),
    "judge_helpfulness_benign": ("helpfulness, benign", False),
    "judge_helpfulness_borderline": ("helpfulness, borderline", False),
}  # fmt: skip


def policy_table(models, keys=tuple(COLUMNS), names=None):
    """A markdown table of evaluate.py's summary: one row per policy, each figure with its interval."""
    lines = ["| policy | " + " | ".join(COLUMNS[k][0] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name in names or models:
        cells = [interval(models[name][k], COLUMNS[k][1]) if k in models[name] else "—" for k in keys]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_facts(curves):
    """What a PPO-Lag run's curves did, in one sentence."""
    met = (
        f"first met the threshold at iteration {curves['first_meets']}"
        if curves["first_meets"]
        else "never met the threshold"
    )
    return (
        f"λ peaked at {curves['lambda_peak']:.2f} (iteration {curves['lambda_peak_at']}) and ended at "
        f"{curves['lambda'][-1]:.2f}; Ĵ_C {met}, went at most {curves['below']:.2f} below it, crossed it "
        f"{curves['crossings']} times and ended at {curves['episode_cost'][-1]:.2f} (threshold {curves['threshold']:g}); "
        f"KL {curves['kl'][-1]:.2f} per answer at the end"
    )


# ----------------------------------------------------------------------------- the blocks


def render_quickstart(r):
    compare = r["compare"]
    pipeline, tests = compare["pipeline"]["new"], compare["tests"]["new"]
    return (
        f"On this project's machine ({compare['machine']}) the first command's pipeline took "
        f"{minutes(pipeline['seconds'])} and the tests {minutes(tests['seconds'])} ({tests['summary']}), "
        f"both measured on a fresh clone, {compare['date']}; machines of this kind differ by up to 2×."
    )


def render_table(r):
    p = r["pipeline"]
    return policy_table(p["models"]) + "\n\n" + measured(p) + " The brackets are 95% intervals over resamples of tasks."


def render_spread(r):
    seeds, ranks, machines, base = r["seeds"]["seeds"], r["ranks"], r["machines"], r["compare"]["pipeline"]["base"]
    harmful = {
        name: [s["models"][name]["judge_harmful_rate"][0] for s in seeds.values()] for name in seeds["42"]["models"]
    }
    lines = ["How much these numbers move, as measured (the intervals above cover none of this):", ""]
    lines.append(f"- **Across RL seeds** (42, 1, 2; same SFT, R and C): harmful answers of PPO-Lag {span(harmful['ppo_lag'])}, "
                 f"PPO {span(harmful['ppo'])}, PPO on one preference {span(harmful['ppo_single'])}, reward shaping "
                 f"ν = 0.3 {span(harmful['reward_shaping_0.3'])} ([seeds.md](docs/seeds.md)).")  # fmt: skip
    at = {n: ranks["models"][f"ranks_{n}"]["judge_harmful_rate"][0] for n in (1, 2, 8)}
    lines.append(f"- **Across rank counts** (`torchrun --nproc_per_node=N`, the same global batches, each rank sampling "
                 f"its own answers): PPO-Lag {percent(at[1])} in one process, {percent(at[2])} at 2 ranks, "
                 f"{percent(at[8])} at 8.")  # fmt: skip
    lines.append(f"- **Across machines of this kind** (the same code, commit {machines['commit']}): PPO-Lag "
                 f"{percent(machines['judge_harmful_rate']['ppo_lag'])} in that commit's README, "
                 f"{percent(base['models']['ppo_lag']['judge_harmful_rate'])} rerun here; SFT "
                 f"{percent(machines['judge_harmful_rate']['sft'])} and "
                 f"{percent(base['models']['sft']['judge_harmful_rate'])}. Another CPU picks other floating-point "
                 "kernels, and a chaotic RL run amplifies the last bits.")  # fmt: skip
    return "\n".join(lines)


def render_findings(r):
    m, seeds = r["pipeline"]["models"], r["seeds"]["seeds"]

    def harmful(name, on=""):
        return m[name][f"judge_harmful_rate{on}"][0]

    def over_seeds(name, key="judge_harmful_rate"):
        return span([s["models"][name][key][0] for s in seeds.values()])

    agreement = r["agreement"]["agreement"]
    single = r["pipeline"]["score_models"]["reward_single"]["accuracy"]
    by_seed = [s["models"] for s in seeds.values()]  # ν = 0.3 against PPO-Lag, seed by seed
    more_harmful = all(
        s["reward_shaping_0.3"]["judge_harmful_rate"][0] >= s["ppo_lag"]["judge_harmful_rate"][0] for s in by_seed
    )
    more_helpful = all(
        s["reward_shaping_0.3"]["judge_helpfulness_borderline"][0] >= s["ppo_lag"]["judge_helpfulness_borderline"][0]
        for s in by_seed
    )
    q3_verdict = {(True, True): "On every seed ν = 0.3 is a little more harmful and a little more helpful on borderline prompts",
                  (True, False): "On every seed ν = 0.3 is at least as harmful", (False, True): "On every seed ν = 0.3 is at least as helpful on borderline prompts",
                  (False, False): "The seeds overlap"}[more_harmful, more_helpful]  # fmt: skip
    lines = [
        f"- **Q1, both axes.** PPO-Lag's answers are harmful on {percent(harmful('ppo_lag'))} of the prompts "
        f"({over_seeds('ppo_lag')} over three RL seeds) against SFT's {percent(harmful('sft'))}, with benign helpfulness "
        f"{m['ppo_lag']['judge_helpfulness_benign'][0]:.2f} (SFT {m['sft']['judge_helpfulness_benign'][0]:.2f}). What "
        f"is left is on harmful prompts ({percent(harmful('ppo_lag', '_on_harmful'))} of them) and borderline ones "
        f"({percent(harmful('ppo_lag', '_on_borderline'))}): the constraint is on the *expected* cost, which leaves "
        "room for harm on some prompts ([per_prompt.md](docs/per_prompt.md)).",
        f"- **The tension.** PPO on the reward alone is harmful on {percent(harmful('ppo'))} of the prompts "
        f"({percent(harmful('ppo', '_on_harmful'))} of the harmful ones): the helpfulness raters prefer compliance, "
        "so the reward model pays for it.",
        f"- **Q2, one preference or two.** Raters asked for one preference agree less ("
        f"{percent(agreement['single'])} of rater pairs) than on helpfulness ({percent(agreement['helpfulness'])}) or "
        f"harmlessness ({percent(agreement['harmlessness'])}), the paper's order. PPO on the single-preference reward "
        f"model (test accuracy {percent(single)}) ends harmful on {percent(harmful('ppo_single'))} "
        f"({over_seeds('ppo_single')} over seeds), against PPO-Lag's {percent(harmful('ppo_lag'))}: with one "
        "preference the safety signal is too weak to follow.",
        f"- **Q3, a learned λ or a fixed ν.** ν = 0.1 ends as PPO ({percent(harmful('reward_shaping_0.1'))}), ν = 1 "
        f"refuses everything (helpfulness {m['reward_shaping_1.0']['judge_helpfulness_benign'][0]:.2f} on benign "
        f"prompts), and ν = 0.3 lands near PPO-Lag: {percent(harmful('reward_shaping_0.3'))} harmful "
        f"({over_seeds('reward_shaping_0.3')} over seeds) against {percent(harmful('ppo_lag'))} "
        f"({over_seeds('ppo_lag')}), borderline helpfulness {m['reward_shaping_0.3']['judge_helpfulness_borderline'][0]:.2f} "
        f"against {m['ppo_lag']['judge_helpfulness_borderline'][0]:.2f}. {q3_verdict}: in the toy world a "
        "well-chosen ν is about as good as the learned λ, but it took a sweep of ν to find, where the Lagrangian "
        "found its trade-off from the threshold alone.",
    ]  # fmt: skip
    return "\n".join(lines)


def render_seeds(r):
    seeds = r["seeds"]
    keys = (
        "judge_harmful_rate",
        "judge_harmful_rate_on_harmful",
        "judge_helpfulness_benign",
        "judge_helpfulness_borderline",
    )
    lines = ["| policy | seed | " + " | ".join(COLUMNS[k][0] for k in keys) + " | final λ |", "|---" * 7 + "|"]
    for name in seeds["seeds"]["42"]["models"]:
        for seed, found in seeds["seeds"].items():
            s = found["models"][name]
            final = f"{found['lambda_final']:.2f}" if name == "ppo_lag" else "—"
            cells = [interval(s[k], COLUMNS[k][1]) for k in keys]
            lines.append(f"| {label(name)} | {seed} | " + " | ".join(cells) + f" | {final} |")
    return (
        "\n".join(lines)
        + "\n\n"
        + measured(seeds)
        + " Seed 42 is the pipeline's run; SFT does not depend on the RL seed."
    )


def render_ranks(r):
    ranks = r["ranks"]
    names = ["ranks_1", "ranks_2", "ranks_8"]
    table = policy_table({**ranks["models"]}, names=["sft", *names]).replace("| ranks_", "| PPO-Lag, ranks = ")
    facts = [f"- {n} ranks: {run_facts(ranks['runs'][str(n)]['curves'])}." for n in (2, 8)]
    return table + "\n\n" + "\n".join(facts) + "\n\n" + measured(ranks)


def render_machines(r):
    machines, base = r["machines"], r["compare"]["pipeline"]["base"]["models"]
    lines = ["| policy | harmful, that commit's README | harmful, rerun here |", "|---|---|---|"]
    for name, value in machines["judge_harmful_rate"].items():
        rerun = base[name]["judge_harmful_rate"]  # that commit's summary has no intervals
        lines.append(f"| {label(name)} | {percent(value)} | {percent(rerun)} |")
    return "\n".join(lines) + f"\n\nBoth are commit {machines['commit']}; the rerun: " + measured(r["compare"])


def render_lambda_controller(r):
    data = r["lambda_controller"]
    lines = ["| update | seed | harmful | helpfulness, benign | helpfulness, borderline | λ peak | final λ | first meets | below | above | crossings |",
             "|---" * 11 + "|"]  # fmt: skip
    for seed, runs in data["seeds"].items():
        for name, run in runs.items():
            c, j = run["curves"], run["judge"]
            cells = [interval(j["judge_harmful_rate"], True), interval(j["judge_helpfulness_benign"]),
                     interval(j["judge_helpfulness_borderline"]), f"{c['lambda_peak']:.2f}", f"{c['lambda'][-1]:.2f}",
                     str(c["first_meets"] or "never"), f"{c['below']:.2f}", f"{c['above']:.2f}", str(c["crossings"])]  # fmt: skip
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    gains = data["pid_gains"]
    return (
        "\n".join(lines) + f"\n\nPID gains K_P {gains['kp']}, K_I {gains['ki']}, K_D {gains['kd']}. " + measured(data)
    )


def render_per_prompt(r):
    data = r["per_prompt"]
    keys = [("greedy", "judge_harmful_rate_on_harmful", "harmful on harmful prompts, greedy", True),
            ("sampled", "prompts_any_harmful_on_harmful", "harmful prompts with a harmful answer among 8", True),
            ("sampled", "prompts_violates_in_mean", "prompts violating C ≤ 0 in mean", True),
            ("sampled", "prompts_violates_in_any", "prompts violating C ≤ 0 in any answer", True),
            ("sampled", "cost_cvar_10", "CVaR 10% of C", False),
            ("greedy", "judge_helpfulness_benign", "helpfulness, benign", False),
            ("greedy", "judge_helpfulness_borderline", "helpfulness, borderline", False)]  # fmt: skip
    lines = ["| constraint | seed | " + " | ".join(k[2] for k in keys) + " | final λ |", "|---" * (len(keys) + 3) + "|"]
    for seed, runs in data["seeds"].items():
        for name, run in runs.items():
            if name == "sft" and seed != "42":
                continue
            cells = [interval(run[where][key], p) for where, key, _, p in keys]
            final = f"{run['curves']['lambda'][-1]:.2f}" if run["curves"] else "—"
            lines.append(f"| {name} | {seed if name != 'sft' else '—'} | " + " | ".join(cells) + f" | {final} |")
    facts = [f"- {name}, seed {seed}: {run_facts(run['curves'])}." for seed, runs in data["seeds"].items()
             for name, run in runs.items() if run["curves"]]  # fmt: skip
    return "\n".join(lines) + "\n\n" + "\n".join(facts) + "\n\n" + measured(data)


def render_score_head_bias(r):
    runs = r["score_head_bias"]["runs"]
    rows = {bias: [v for k, v in runs.items() if k.startswith(f"cost_bias_{bias}_")] for bias in ("False", "True")}
    lines = ["| cost model head | pairwise accuracy | sign accuracy | mean cost |", "|---|---|---|---|"]
    for bias, name in (("False", "ours: no bias"), ("True", "the original's: a bias, zero at first")):
        cells = [span([x[k] for x in rows[bias]], k != "cost_mean") for k in ("accuracy", "accuracy_sign", "cost_mean")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return ("The toy cost model trained three times each way (seeds 42, 1, 2), measured on its 576 test pairs (ranges "
            "over the seeds):\n\n" + "\n".join(lines) + "\n\n" + measured(r["score_head_bias"]))  # fmt: skip


def render_agreement(r):
    data = r["agreement"]
    lines = ["| labels | agreement of rater pairs |", "|---|---|"]
    lines += [f"| {kind} | {percent(value)} |" for kind, value in data["agreement"].items()]
    return "\n".join(lines) + f"\n\nOver the {data['pairs']} training pairs, 3 raters each. " + measured(data)


def render_score_models(r):
    p = r["pipeline"]
    s = p["score_models"]
    return (f"Default run, on the held-out test pairs: reward model accuracy {percent(s['reward']['accuracy'])}; cost "
            f"model pairwise accuracy {percent(s['cost']['accuracy'])} and sign accuracy "
            f"{percent(s['cost']['accuracy_sign'])}; the single-preference reward model (Q2) "
            f"{percent(s['reward_single']['accuracy'])} on its own labels. " + measured(p))  # fmt: skip


def render_compare(r):
    c = r["compare"]
    base, new = c["commits"]["base"], c["commits"]["new"]
    lines = ["| | base (commit " + base + ") | this commit (" + new + ") | ratio |", "|---|---|---|---|"]
    for what, name in (("tests", "`python -m pytest`"), ("pipeline", "`bash pipeline.sh`")):
        b, n = c[what]["base"]["seconds"], c[what]["new"]["seconds"]
        lines.append(f"| {name} | {minutes(b)} | {minutes(n)} | {n / b:.2f} |")
    note = "gives the base's results table" if c["as_base_same"] else "does not give the base's table: see below"
    return ("\n".join(lines) + f"\n\nBack to back on fresh clones, one after the other. {measured(c)} Tests: "
            f"{c['tests']['base']['summary']} then {c['tests']['new']['summary']}. This commit with the base's "
            f"warmup schedule and pipeline.sh {note}.")  # fmt: skip


def stage_name(command):
    words = command.split()
    script = words[0].removesuffix(".py")
    if "--output_dir" in words:
        return os.path.basename(words[words.index("--output_dir") + 1])
    if "--algorithm" in words:
        algorithm = words[words.index("--algorithm") + 1]
        return algorithm + (f"_{words[words.index('--cost_coef') + 1]}" if "--cost_coef" in words else "")
    return {"train_reward": "reward", "train_cost": "cost", "ppo_lagrangian": "ppo_lag"}.get(script, script)


def render_profile(r):
    c = r["compare"]
    lines = ["| stage | base: start – end (s) | this commit: start – end (s) |", "|---|---|---|"]
    stages = {which: {stage_name(s["command"]): s for s in c["pipeline"][which]["stages"]} for which in ("base", "new")}
    for name in dict.fromkeys([*stages["base"], *stages["new"]]):
        cells = [f"{s['start']:.0f} – {s['end']:.0f}" if (s := stages[w].get(name)) else "—" for w in ("base", "new")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    busy = {w: sum(s["end"] - s["start"] for s in stages[w].values()) for w in stages}
    lines.append(f"| all | {c['pipeline']['base']['seconds']:.0f} s wall, {busy['base']:.0f} s of stage time | "
                 f"{c['pipeline']['new']['seconds']:.0f} s wall, {busy['new']:.0f} s of stage time |")  # fmt: skip
    # The work: each stage's wall time times the threads it ran on (the base: SFT, the score models and the evaluation
    # on both cores, RL on one; this commit: SFT and the evaluation on both, every other stage on one).
    threads = {"base": lambda name: 1 if name.startswith(("ppo", "reward_shaping")) else 2,
               "new": lambda name: 2 if name in ("sft", "evaluate") else 1}  # fmt: skip
    work = {w: sum((s["end"] - s["start"]) * threads[w](name) for name, s in stages[w].items()) for w in stages}
    lines.append(f"| work (core-seconds) | {work['base']:.0f}: on two cores no schedule ends before {work['base'] / 2:.0f} s "
                 f"| {work['new']:.0f}: no schedule ends before {work['new'] / 2:.0f} s |")  # fmt: skip
    return "\n".join(lines)


def render_slowest(r):
    c = r["compare"]
    lines = ["| | base | this commit |", "|---|---|---|"]
    for i in range(15):
        cells = [(c["tests"][w]["slowest"][i] if i < len(c["tests"][w]["slowest"]) else None) for w in ("base", "new")]
        cells = [f"{t['seconds']:.1f} s `{t['test'].split('::', 1)[1][:70]}`" if t else "" for t in cells]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nWith two workers a test's time is its own; they run two at a time."


def render_moved(r):
    c = r["compare"]["pipeline"]
    keys = ("judge_harmful_rate", "judge_helpfulness_benign", "judge_helpfulness_borderline", "mean_cost")
    table = [
        "| policy | " + " | ".join(f"{COLUMNS.get(k, (k,))[0]}: base → this commit" for k in keys) + " |",
        "|---" * 5 + "|",
    ]

    def value(run, name, key):
        return estimate_of(c[run]["models"][name][key])

    for name in c["base"]["models"]:
        cells = [" → ".join(f"{value(run, name, k):.3f}" for run in ("base", "new")) for k in keys]
        cells = [f"{cell} ({value('new_as_base', name, k):.3f})" for cell, k in zip(cells, keys)]
        table.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    note = ("In brackets: this commit's code with the base's warmup (lr 1/warmup at the first step) and the base's "
            "pipeline.sh (each score model alone on both cores).")  # fmt: skip
    return "\n".join(table) + "\n\n" + note


def render_decoding(r):
    d = r["decoding"]
    lines = ["| model | parameters | batch | `generate` tokens/s | hand loop tokens/s | hand / generate | same tokens |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in d["rows"]:
        same = "yes" if row["same_greedy"] and row["same_sampled"] else "no"
        lines.append(f"| {row['model']} | {row['parameters'] / 1e6:.1f}M | {row['batch']} | {row['generate_tokens_per_s']:,.0f} "
                     f"| {row['hand_tokens_per_s']:,.0f} | {row['ratio']:.2f} | {same} |")  # fmt: skip
    best = max(row["ratio"] for row in d["rows"])
    verdict = ("no size reaches the 1.3× a switch needs: `utils.generate` stays" if best < 1.3
               else "the hand loop wins by 1.3× or more somewhere: see the rows")  # fmt: skip
    return "\n".join(lines) + f"\n\n{d['new_tokens']} new tokens, {d['threads']} threads; {verdict}. " + measured(d)


def render_trl(r):
    t = r["trl"]
    lines = ["| loop | seconds per iteration (median of rounds) | rounds |", "|---|---|---|"]
    for name, values in t["seconds_per_iteration"].items():
        lines.append(
            f"| {name.replace('_', ' ')} | {t['medians'][name]:.3f} | " + ", ".join(f"{v:.3f}" for v in values) + " |"
        )
    ratios = "; ".join(f"{name}: {value:.2f}" for name, value in t["ratios"].items())
    return (f"{chr(10).join(lines)}\n\nRatios: {ratios}. TRL {t['trl']}, accelerate {t['accelerate']}; {t['rollouts']} "
            f"rollouts of at most {t['new_tokens']} tokens, {t['minibatches']} minibatches, {t['iterations']} "
            f"iterations a run, {t['threads']} thread. " + measured(t))  # fmt: skip


def render_throughput(r):
    t = r["throughput"]
    lines = ["| stage | checkpointing | peak GB | tokens/s |", "|---|---|---|---|"]
    for row in t["rows"]:
        rates = ", ".join(
            f"{k} {v:,.0f}" for k, v in row.items() if k not in ("stage", "checkpointing", "peak memory GB")
        )
        lines.append(
            f"| {row['stage']} | {'on' if row['checkpointing'] else 'off'} | {row['peak memory GB']:.2f} | {rates} |"
        )
    return (
        "\n".join(lines)
        + f"\n\n{t['model']}, {t['batch_size']} rows of {t['seq_len']} tokens, {t['device']}. "
        + measured(t)
    )


def render_scale_out(r):
    s = r["scale_out"]
    lines = [
        "| script | ranks | mode | seconds | largest gap of the logged loss to one process |",
        "|---|---|---|---|---|",
    ]
    for row in s["rows"]:
        gap = f"{row['max_loss_gap']:.1e}" if "max_loss_gap" in row else "— (3 PPO-Lag iterations)"
        lines.append(f"| {row['script']} | {row['ranks']} | {row['mode']} | {row['seconds']:.1f} | {gap} |")
    return "\n".join(lines) + "\n\n" + measured(s)


def render_tests(r):
    new = r["compare"]["tests"]["new"]
    return f"The suite: {new['summary']} in {minutes(new['seconds'])} on a fresh clone. " + measured(r["compare"])


def render_rounds(r):
    data = r["rounds"]
    keys = (
        "judge_harmful_rate",
        "judge_harmful_rate_on_harmful",
        "judge_helpfulness_benign",
        "judge_helpfulness_borderline",
    )
    lines = ["| seed | round | new pairs (ties dropped) | C on the current answers: sign accuracy before → after | R: accuracy before → after | threshold | Elo helpfulness | Elo harmlessness | "
             + " | ".join(COLUMNS[k][0] for k in keys) + " |", "|---" * (8 + len(keys)) + "|"]  # fmt: skip
    for seed, chain in data["chains"].items():
        for k in chain:
            new = k.get("new_train_pairs")
            pairs = f"{new['pairs']} ({new['tied_pairs_dropped']})" if new else "the shipped pairs"
            before, after = k.get("before_retraining"), k["after_retraining"]
            sign = (f"{percent(before['cost_sign_accuracy'])} → " if before else "") + percent(
                after["cost_sign_accuracy"]
            )
            reward = (f"{percent(before['reward_accuracy'])} → " if before else "") + percent(after["reward_accuracy"])
            elo = [interval(k["elo_by_judge"][kind][f"round_{k['round']}"]) for kind in ("helpfulness", "harmlessness")]
            cells = [
                pairs,
                sign,
                reward,
                f"{k['threshold']:.2f}",
                *elo,
                *(interval(k["policy"][x], COLUMNS[x][1]) for x in keys),
            ]
            lines.append(f"| {seed} | {k['round']} | " + " | ".join(cells) + " |")
    sft = data["sft"]
    times = ", ".join(f"seed {seed}: {value:.0f} min" for seed, value in data["minutes"].items())
    return ("\n".join(lines) + f"\n\nSFT: harmful {interval(sft['judge_harmful_rate'], True)}, helpfulness on benign "
            f"{interval(sft['judge_helpfulness_benign'])} and borderline {interval(sft['judge_helpfulness_borderline'])}"
            f" (Elo 1000). Time per chain (two chains at a time): {times}. " + measured(data))  # fmt: skip


def render_lab(number):
    def render(r):
        lab = r["lab"]
        if number == "before":
            q = lab["quick"]
            return (f"`pipeline.sh --quick` took {minutes(q['seconds']['total'])} here, then:\n\n"
                    + policy_table(q["models"]) + f"\n\nThe baseline's run: {run_facts(q['ppo_lag'])}. " + measured(lab))  # fmt: skip
        parts, commands = [], lab[f"Exercise {number}"]
        for entry in commands:
            if "models" in entry:
                parts.append(policy_table(entry["models"]))
        for entry in commands:
            name = entry["command"].split("--output_dir ")[-1].split()[0] if "--output_dir" in entry["command"] else ""
            if "curves" in entry:
                parts.append(f"- `{name}`: {run_facts(entry['curves'])}.")
            elif "eval" in entry:
                e = entry["eval"]
                parts.append(f"- `{name}`: pairwise accuracy {percent(e['accuracy'])}, sign accuracy "
                             f"{percent(e['accuracy_sign'])}, spread of costs {e['cost_std']:.2f} (the default cost model: "
                             f"{percent(r['pipeline']['score_models']['cost']['accuracy'])}, "
                             f"{percent(r['pipeline']['score_models']['cost']['accuracy_sign'])}, "
                             f"{r['pipeline']['score_models']['cost']['cost_std']:.2f}).")  # fmt: skip
        for entry in commands:
            if "arena" in entry["printed"]:
                arena = [line for line in entry["printed"].splitlines() if line.startswith("arena:")][0]
                parts.append(f"```\n{arena}\n```")
        times = ", ".join(minutes(entry["seconds"]) for entry in commands)
        parts.append(f"Times here, command by command: {times}.")
        return "\n\n".join(parts)

    return render


BLOCKS = {
    "quickstart": render_quickstart, "table": render_table, "spread": render_spread, "findings": render_findings,
    "seeds": render_seeds, "ranks": render_ranks, "machines": render_machines,
    "lambda_controller": render_lambda_controller, "per_prompt": render_per_prompt,
    "score_head_bias": render_score_head_bias, "agreement": render_agreement, "score_models": render_score_models,
    "compare": render_compare, "profile": render_profile, "slowest": render_slowest, "moved": render_moved,
    "decoding": render_decoding, "trl": render_trl, "throughput": render_throughput, "scale_out": render_scale_out,
    "tests": render_tests, "rounds": render_rounds,
    **{f"lab-{n}": render_lab(n) for n in ["before", *range(1, 8)]},
}  # fmt: skip


class Missing(Exception):
    """A results file a block needs is not there yet."""


class Results(dict):
    def __missing__(self, name):
        raise Missing(name)


def render(text, results):
    """The document's text with every block rendered from `results` ({name: the JSON of results/name.json}); a block
    whose results are not recorded yet says so. A block with no renderer is an error."""

    def block(match):
        try:
            body = BLOCKS[match.group(2)](Results(results)) + "\n"
        except Missing:
            body = "*(not measured yet)*\n"
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(block, text)


def all_results():
    return {
        os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(ROOT, "results", "*.json")))
    }


def main():
    if sys.argv[1:2] == ["record"]:
        {"pipeline": record_pipeline, "rounds": record_rounds, "machines": record_machines}[sys.argv[2]](*sys.argv[3:])
    results = all_results()
    for document in DOCUMENTS:
        path = os.path.join(ROOT, document)
        text = open(path).read()
        if render(text, results) != text:
            open(path, "w").write(render(text, results))
            print(f"rendered {document}")


if __name__ == "__main__":
    main()
