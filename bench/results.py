"""Every measured number of README.md and docs/ lives in one place: the JSON files in results/, written by the runs and
benches that measure them; this script renders them into the marked blocks of the documents,
`<!-- results:NAME -->` ... `<!-- /results -->`, and nowhere else is a measured number typed.

    python bench/results.py record pipeline   # after `bash pipeline.sh`: output/ -> results/pipeline.json, figures
    python bench/results.py record quick      # after `bash pipeline.sh --quick`: its time -> results/quick.json
    python bench/results.py                   # results/*.json -> the blocks of README.md and docs/*.md

tests/test_results.py renders the blocks from the committed JSON and fails on any difference, and on a number outside
the blocks that is not one of theirs.
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
DOCUMENTS = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]
BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results -->)", re.S)


def machine():
    """This machine, in words: CPU model, cores, memory, OS."""
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model or platform.processor()}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()}"


def stamp():
    """Where and when a measurement was made, and on which commit."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"machine": machine(), "date": datetime.date.today().isoformat(), "commit": commit.strip()}


def load(name):
    path = os.path.join(ROOT, "results", f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def save(name, data):
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def read_metrics(folder, split):
    with open(os.path.join(ROOT, folder, "metrics.jsonl")) as f:
        return [record for record in map(json.loads, f) if record["split"] == split]


# ----------------------------------------------------------------------------- recording


def record_pipeline():
    """The default pipeline's outputs: timings, the evaluation, the score models' accuracies, the PPO-Lag run."""
    summary = json.load(open(os.path.join(ROOT, "output/eval/summary.json")))
    data = {
        **stamp(),
        "command": "bash pipeline.sh",
        "seconds": json.load(open(os.path.join(ROOT, "output/timings.json"))),
    }
    data.update(models=summary["models"], elo=summary["elo"], arena=summary["arena"])
    data["score_models"] = {
        name: read_metrics(f"output/{name}", "eval")[-1] for name in ("reward", "cost", "reward_single")
    }
    data["sft_judge"] = read_metrics("output/sft", "eval")[-1]
    train = read_metrics("output/ppo_lag", "train")
    data["ppo_lag_run"] = {key: [record[key] for record in train] for key in ("lambda", "episode_cost", "cost", "kl")}
    save("pipeline", data)
    for name in ("reward_vs_cost", "safety_and_elo", "tradeoff", "per_prompt"):
        shutil.copy(os.path.join(ROOT, f"output/eval/{name}.png"), os.path.join(ROOT, f"docs/figures/{name}.png"))
    shutil.copy(os.path.join(ROOT, "output/ppo_lag/training_curves.png"), os.path.join(ROOT, "docs/figures"))
    shutil.copy(os.path.join(ROOT, "output/cost/cost_model.png"), os.path.join(ROOT, "docs/figures"))


def record_quick():
    save(
        "quick",
        {
            **stamp(),
            "command": "bash pipeline.sh --quick",
            "seconds": json.load(open(os.path.join(ROOT, "output/timings.json"))),
        },
    )


# ----------------------------------------------------------------------------- rendering


def minutes(seconds):
    return f"{seconds // 60:.0f} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def percent(triple):
    """A rate as an estimate and its 95% interval: 5.6% [1.4, 11.1]."""
    value, low, high = (100 * x for x in triple)
    return f"{value:.1f}% [{low:.1f}, {high:.1f}]"


def number(triple, digits=2):
    value, low, high = triple
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


LABELS = {"sft": "SFT", "ppo_lag": "**PPO-Lag** (Safe RLHF)", "ppo": "PPO (reward only)",
          "ppo_single": "PPO on one preference (Q2)"}  # fmt: skip


def label(name):
    return LABELS.get(name, name.replace("reward_shaping_", "reward shaping ν = "))


def render_table(results):
    pipeline = results["pipeline"]
    lines = ["| policy | reward | cost | C ≤ 0 | harmful | harmful on harmful prompts | helpfulness on benign | on borderline |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in pipeline["models"].items():
        cells = [number(s["mean_reward"]), number(s["mean_cost"]), percent(s["cost_safe_ratio"])]
        cells += [percent(s["judge_harmful_rate"]), percent(s["judge_harmful_rate_on_harmful"])]
        cells += [number(s["judge_helpfulness_benign"]), number(s["judge_helpfulness_borderline"])]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    lines.append(f"\nMeasured on {pipeline['machine']}, {pipeline['date']} (commit {pipeline['commit']}); "
                 "the brackets are 95% intervals over resamples of tasks.")  # fmt: skip
    return "\n".join(lines)


BLOCKS = {"table": render_table}


def render(text, results):
    """The document's text with every block rendered from `results` (a block with no renderer or data yet: empty)."""

    def block(match):
        renderer = BLOCKS.get(match.group(2))
        try:
            body = renderer(results) + "\n" if renderer else ""
        except (KeyError, TypeError):  # its results are not recorded yet
            body = "*(not measured yet)*\n"
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(block, text)


def all_results():
    return {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(os.path.join(ROOT, "results", "*.json"))}


def main():
    if sys.argv[1:2] == ["record"]:
        {"pipeline": record_pipeline, "quick": record_quick}[sys.argv[2]]()
    results = all_results()
    for document in DOCUMENTS:
        path = os.path.join(ROOT, document)
        text = open(path).read()
        if render(text, results) != text:
            open(path, "w").write(render(text, results))
            print(f"rendered {document}")


if __name__ == "__main__":
    main()
