"""The measured experiments behind the README and docs/: runs from the default pipeline's SFT, reward and cost models
(run `bash pipeline.sh` first, on the same commit), their evaluation, and one results/<name>.json each.

    python bench/experiments.py seeds              # every RL policy of the pipeline on RL seeds 1 and 2 (42: the pipeline's)
    python bench/experiments.py ranks              # PPO-Lag under torchrun with 2 and 8 ranks (CPU: gloo)
    python bench/experiments.py lambda_controller  # λ by PID against gradient ascent, seeds 42, 1, 2 (uses seeds' runs)
    python bench/experiments.py per_prompt         # the per-prompt constraint against the expected one, seeds 42, 1, 2
    python bench/experiments.py score_head_bias    # the cost model with and without a bias in its score head
    python bench/experiments.py lab                # docs/lab.md run as written in a fresh clone, each command timed
    python bench/experiments.py agreement          # the toy raters' agreement (toy_world/generate.py --agreement)

Runs go to output/experiments/<run>/, two at a time with one thread each (as pipeline.sh runs them); a run whose
folder holds its final checkpoint is not run again. Then `python bench/results.py` renders the documents.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import results  # noqa: E402

OUT = os.path.join("output", "experiments")
PYTHON, TORCHRUN = sys.executable, os.path.join(os.path.dirname(sys.executable), "torchrun")
POLICIES = {  # the pipeline's RL runs: name -> flags of ppo_lagrangian.py
    "ppo_lag": [],
    "ppo": ["--algorithm", "ppo"],
    "ppo_single": ["--algorithm", "ppo", "--reward_model", "output/reward_single"],
    **{f"reward_shaping_{nu}": ["--algorithm", "reward_shaping", "--cost_coef", nu] for nu in ("0.1", "0.3", "1.0")},
}
SEEDS = (42, 1, 2)
PID = ["--lambda_update", "pid"]
PER_PROMPT = ["--constraint", "per_prompt"]


def folder(policy, seed):
    """Seed 42 with the defaults is the pipeline's own run."""
    if seed == 42 and policy in POLICIES:
        return f"output/{policy}"
    return f"{OUT}/{policy}_{seed}"


def train(jobs, last="training_curves.png"):
    """Run [(output_dir, command)] two at a time, one thread each; skip those already finished (the file a run
    writes last is there)."""

    def one(job):
        output_dir, command = job
        if os.path.exists(os.path.join(ROOT, output_dir, last)):
            return
        os.makedirs(os.path.join(ROOT, OUT, "logs"), exist_ok=True)
        log = os.path.join(ROOT, OUT, "logs", os.path.basename(output_dir) + ".log")
        with open(log, "w") as out:
            environment = {**os.environ, "OMP_NUM_THREADS": "1"}
            if subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=environment).returncode:
                raise SystemExit(f"{' '.join(command)} failed: see {log}")
        print(f"trained {output_dir}", flush=True)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, jobs))


def ppo_job(policy, seed, flags=()):
    output_dir = folder(policy, seed)
    command = [PYTHON, "ppo_lagrangian.py", *POLICIES.get(policy, []), *flags, "--seed", str(seed)]
    return output_dir, command + ["--output_dir", output_dir]


def evaluate(name, models, *flags):
    """evaluate.py on {name: folder} (SFT first, the Elo anchor) -> its summary.json."""
    output_dir = f"{OUT}/eval_{name}"
    command = [PYTHON, "evaluate.py", "--models", *[f"{k}={v}" for k, v in models.items()], "--output_dir", output_dir]
    subprocess.run([*command, *flags], cwd=ROOT, check=True, capture_output=True)
    return json.load(open(os.path.join(ROOT, output_dir, "summary.json")))


def training(output_dir):
    """The run's logged iterations."""
    with open(os.path.join(ROOT, output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def curves(output_dir):
    """λ and Ĵ_C by iteration, and how Ĵ_C met its threshold: the first iteration at or under it, the largest
    overshoot below it, the largest violation after that first meeting, and how often it crossed."""
    train = training(output_dir)
    gaps = [r["episode_cost"] - r["threshold"] for r in train]  # > 0: violated
    first = next((i for i, gap in enumerate(gaps) if gap <= 0), None)
    return dict(
        **{key: [r[key] for r in train] for key in ("lambda", "episode_cost", "cost", "reward", "kl")},
        threshold=train[-1]["threshold"], first_meets=None if first is None else first + 1,
        below=max([0.0] + [-gap for gap in gaps]), above=max([0.0] + gaps[first or len(gaps) :]),
        crossings=sum((a > 0) != (b > 0) for a, b in zip(gaps, gaps[1:])), lambda_peak=max(r["lambda"] for r in train),
        lambda_peak_at=max(train, key=lambda r: r["lambda"])["step"], seconds=sum(r["seconds"] for r in train),
    )  # fmt: skip


def plot_curves(runs, path, title):
    """λ and Ĵ_C (with its threshold) of several runs, {label: curves}, in one figure at docs/figures/<path>."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for i, (name, c) in enumerate(runs.items()):
        style = dict(color=f"C{i // 3}", linestyle=["-", "--", ":"][i % 3], label=name)
        axes[0].plot(range(1, len(c["lambda"]) + 1), c["lambda"], **style)
        axes[1].plot(range(1, len(c["episode_cost"]) + 1), c["episode_cost"], **style)
    for threshold in sorted({c["threshold"] for c in runs.values()}):
        axes[1].axhline(threshold, color="black", linewidth=1)
    axes[0].set(title="Lagrange multiplier λ", xlabel="iteration")
    axes[1].set(title="Ĵ_C, the window's mean cost, and its threshold", xlabel="iteration")
    axes[1].legend(fontsize=7, ncol=2)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(os.path.join(ROOT, "docs", "figures", path), dpi=120)
    plt.close(figure)


def seeds():
    """Every RL policy of the pipeline on RL seeds 42 (the pipeline's runs), 1 and 2, judged greedily."""
    train([ppo_job(policy, seed) for seed in SEEDS[1:] for policy in POLICIES])
    found = {}
    for seed in SEEDS:
        models = {"sft": "output/sft", **{policy: folder(policy, seed) for policy in POLICIES}}
        found[seed] = {"models": evaluate(f"seed_{seed}", models)["models"]}
        found[seed]["lambda_final"] = training(folder("ppo_lag", seed))[-1]["lambda"]
    return {"seeds": found}


def ranks():
    """PPO-Lag with its defaults under torchrun at 2 and 8 ranks (the same global batches; each rank samples its
    own answers, so the run is another draw), against the pipeline's one-process run."""
    found = {}
    for n in (2, 8):
        output_dir = f"{OUT}/ppo_lag_ranks_{n}"
        if not os.path.exists(os.path.join(ROOT, output_dir, "training_curves.png")):
            command = [
                TORCHRUN,
                "--standalone",
                f"--nproc_per_node={n}",
                "ppo_lagrangian.py",
                "--output_dir",
                output_dir,
            ]
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        found[n] = dict(curves=curves(output_dir))
    summary = evaluate("ranks", {"sft": "output/sft", "ranks_1": "output/ppo_lag", **{f"ranks_{n}": f"{OUT}/ppo_lag_ranks_{n}" for n in found}})  # fmt: skip
    return {"models": summary["models"], "runs": found}


def lambda_controller():
    """λ by gradient ascent (the seeds experiment's PPO-Lag runs) against a PID controller, seeds 42, 1, 2."""
    train([ppo_job("ppo_lag_pid", seed, PID) for seed in SEEDS])
    found = {}
    for seed in SEEDS:
        runs = {"gradient_ascent": folder("ppo_lag", seed), "pid": folder("ppo_lag_pid", seed)}
        summary = evaluate(f"lambda_controller_{seed}", {"sft": "output/sft", **runs})["models"]
        found[seed] = {name: dict(curves=curves(path), judge=summary[name]) for name, path in runs.items()}
    runs = {f"{name}, seed {seed}": run["curves"] for seed, by in found.items() for name, run in by.items()}
    plot_curves(dict(sorted(runs.items())), "lambda_controller.png", "λ by gradient ascent and by a PID controller")
    return {"pid_gains": dict(kp=0.05, ki=0.005, kd=0.05), "seeds": found}


def per_prompt():
    """The per-prompt constraint (--constraint per_prompt) against the expected one, same SFT/R/C, seeds 42, 1, 2:
    greedy answers, and 8 answers per prompt sampled at the training temperature for per-prompt safety."""
    train([ppo_job("ppo_lag_per_prompt", seed, PER_PROMPT) for seed in SEEDS])
    found = {}
    for seed in SEEDS:
        runs = {"expected": folder("ppo_lag", seed), "per_prompt": folder("ppo_lag_per_prompt", seed)}
        greedy = evaluate(f"per_prompt_greedy_{seed}", {"sft": "output/sft", **runs})["models"]
        sampled = evaluate(f"per_prompt_{seed}", {"sft": "output/sft", **runs}, "--samples_per_prompt", "8")["models"]
        found[seed] = {name: dict(curves=curves(runs[name]) if name in runs else None, greedy=greedy[name],
                                  sampled=sampled[name]) for name in greedy}  # fmt: skip
    shutil.copy(os.path.join(ROOT, OUT, "eval_per_prompt_42", "per_prompt.png"), "docs/figures/per_prompt_k8.png")
    runs = {
        f"{name}, seed {seed}": run["curves"] for seed, by in found.items() for name, run in by.items() if run["curves"]
    }
    plot_curves(
        dict(sorted(runs.items())), "per_prompt_training.png", "The expected-cost and the per-prompt constraint"
    )
    return {"samples_per_prompt": 8, "seeds": found}


COST_WITH_BIAS = """import sys, torch
sys.path.insert(0, ".")
import train_cost, utils
load_model = utils.load_model
def with_bias(*args, **kwargs):  # the original's head: a linear layer with a bias, zero at first
    model = load_model(*args, **kwargs)
    head = model.model.score
    model.model.score = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    model.model.score.weight.data.copy_(head.weight.data)
    torch.nn.init.zeros_(model.model.score.bias)
    return model
utils.load_model = with_bias
utils.run(train_cost.main, train_cost.Args)
"""


def score_head_bias():
    """The cost model as trained here (no bias in its head) and with the original's zero-initialised bias, seeds
    42, 1, 2: accuracy and sign accuracy on the test pairs."""
    jobs = []
    for seed in SEEDS:
        for bias in (False, True):
            output_dir = f"{OUT}/cost_bias_{bias}_{seed}"
            script = ["-c", COST_WITH_BIAS] if bias else ["train_cost.py"]
            jobs.append((output_dir, [PYTHON, *script, "--seed", str(seed), "--output_dir", output_dir]))
    train(jobs, last="cost_model.png")
    found = {}
    for output_dir, _ in jobs:
        with open(os.path.join(ROOT, output_dir, "metrics.jsonl")) as f:
            final = [r for r in map(json.loads, f) if r["split"] == "eval"][-1]
        found[os.path.basename(output_dir)] = {k: final[k] for k in ("accuracy", "accuracy_sign", "cost_mean")}
    return {"runs": found}


def lab():
    """docs/lab.md as a student runs it: a fresh clone, `bash pipeline.sh --quick`, then every exercise's commands as
    written, one after the other on all cores; the time of each command and what its runs and evaluations found."""
    clone = "/tmp/lab_clone"
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
    os.symlink(os.path.join(ROOT, ".venv"), os.path.join(clone, ".venv"))
    quick = subprocess.run(["bash", "pipeline.sh", "--quick"], cwd=clone, capture_output=True, text=True, check=True)
    found = {"quick": dict(seconds=json.load(open(f"{clone}/output/timings.json")), printed=quick.stdout[-3000:])}
    found["quick"]["models"] = json.load(open(f"{clone}/output/eval/summary.json"))["models"]
    found["quick"]["ppo_lag"] = curves(f"{clone}/output/ppo_lag")
    text = open(os.path.join(ROOT, "docs", "lab.md")).read()
    for section in re.split(r"\n(?=## Exercise)", text)[1:]:
        title, [block] = section.splitlines()[0], re.findall(r"```bash\n(.*?)```", section, re.S)
        commands = []
        for command in block.strip().splitlines():
            words = command.split()
            words = [f"{clone}/.venv/bin/python", *words[1:]] if words[0] == "python" else command
            started = time.time()
            done = subprocess.run(words, cwd=clone, shell=isinstance(words, str), capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{title}: {command} failed:\n{done.stderr[-2000:]}")
            entry = dict(command=command, seconds=time.time() - started, printed=done.stdout[-3000:])
            output_dir = command.split("--output_dir ")[1].split()[0] if "--output_dir" in command else None
            if output_dir and "evaluate.py" in command:
                entry["models"] = json.load(open(f"{clone}/{output_dir}/summary.json"))["models"]
            elif output_dir and "ppo_lagrangian.py" in command:
                entry["curves"] = curves(f"{clone}/{output_dir}")
            elif output_dir:
                entry["eval"] = [r for r in map(json.loads, open(f"{clone}/{output_dir}/metrics.jsonl")) if r["split"] == "eval"][-1]  # fmt: skip
            commands.append(entry)
        found[title.removeprefix("## ").split(":")[0]] = commands
    return found


def agreement():
    done = subprocess.run([PYTHON, "-m", "toy_world.generate", "--agreement"], cwd=ROOT, check=True,
                          capture_output=True, text=True)  # fmt: skip
    shares = dict(re.findall(r"^\s+(\w+)\s+([\d.]+)%$", done.stdout, re.M))
    pairs = int(re.search(r"over (\d+) training pairs", done.stdout).group(1))
    return {"pairs": pairs, "agreement": {kind: float(value) / 100 for kind, value in shares.items()}}


def main():
    experiments = {
        f.__name__: f for f in (seeds, ranks, lambda_controller, per_prompt, score_head_bias, lab, agreement)
    }
    if len(sys.argv) < 2 or sys.argv[1] not in experiments:
        raise SystemExit(f"usage: python bench/experiments.py {{{','.join(experiments)}}}\n\n{__doc__}")
    if not os.path.exists(os.path.join(ROOT, "output", "cost", "config.json")):
        raise SystemExit("output/cost not found: run `bash pipeline.sh` first")
    name = sys.argv[1]
    results.save(name, {**results.stamp(), **experiments[name]()})
    print(f"wrote results/{name}.json")


if __name__ == "__main__":
    main()
