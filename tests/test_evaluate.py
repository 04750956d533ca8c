"""evaluate.py: summaries with their bootstrap intervals, CVaR, per-prompt safety, Elo and the arena against
hand-computed values; tiny end-to-end runs with every figure; SIGTERM and a missing judge stop cleanly."""

import csv
import json
import math
import os
import signal
import subprocess
import time

import matplotlib.figure
import pytest
import torch
from conftest import ENV, ROOT, command

import evaluate
import utils
from toy_world import world


def row(model, prompt, category, reward, cost, helpfulness, harmful, sample=0, cluster=None):
    return dict(
        prompt_id=int(prompt[1:]),
        model=model,
        sample=sample,
        prompt=prompt,
        category=category,
        response="",
        reward=reward,
        cost=cost,
        judge_helpfulness=helpfulness,
        judge_harmful=harmful,
        cluster=cluster or prompt,
    )


HAND_TABLE = [
    row("a", "p1", "benign", 2.0, -1.0, 5.0, False),
    row("a", "p2", "harmful", 1.0, 3.0, 4.0, True),
    row("a", "p3", "borderline", 0.0, 0.0, 3.0, False),
    row("b", "p1", "benign", -1.0, -2.0, 0.0, False),
    row("b", "p2", "harmful", -2.0, -4.0, 1.0, False),
    row("b", "p3", "borderline", -1.0, -3.0, 0.0, False),
]


def test_summary_figures_by_hand():
    """Each figure is [estimate, low, high]; the estimates are plain means over the answers (C = 0 counts as safe)."""
    summary = evaluate.summarize(HAND_TABLE)
    a, b = summary["a"], summary["b"]
    assert a["answers"] == a["prompts"] == 3
    assert all(len(value) == 3 for value in list(a.values())[2:] + list(b.values())[2:])
    assert a["mean_reward"][0] == pytest.approx(1.0) and a["mean_cost"][0] == pytest.approx(2 / 3)
    assert a["cost_safe_ratio"][0] == pytest.approx(2 / 3)  # C <= 0 on p1 and p3 (0 counts as safe)
    assert a["cost_cvar_10"][0] == pytest.approx(3.0) and b["cost_cvar_10"][0] == pytest.approx(-2.0)  # the worst 10%
    assert a["judge_harmful_rate"][0] == pytest.approx(1 / 3)
    assert a["judge_harmful_rate_on_harmful"][0] == 1.0 and a["judge_harmful_rate_on_benign"][0] == 0.0
    assert a["judge_helpfulness"][0] == pytest.approx(4.0) and a["judge_helpfulness_benign"][0] == 5.0
    assert b["cost_safe_ratio"][0] == 1.0 and b["judge_harmful_rate"][0] == 0.0
    assert b["judge_helpfulness"][0] == pytest.approx(1 / 3) and b["judge_helpfulness_harmful"][0] == 1.0
    # One answer per prompt: no per-prompt safety figures.
    assert not [key for key in a if key.startswith("prompts_")]


def test_summary_intervals_by_hand():
    """The 95% interval resamples the three tasks: each is drawn three times in 1/27 of the resamples (with seed 42,
    41 of 1000 for p1, 41 for p2), more than the 25 that each end of a 95% interval leaves out. So a's mean cost
    (-1, 3, 0 on p1, p2, p3) has the interval [-1, 3] and its safe share [0, 1]. Where every answer agrees (b is
    always safe; a's one harmful prompt) it collapses onto the estimate."""
    weights = evaluate.resample(["p1", "p2", "p3"], 42)[1:]
    assert (weights[:, 0] == 3).sum() == (weights[:, 1] == 3).sum() == 41
    a, b = evaluate.summarize(HAND_TABLE).values()
    assert a["mean_cost"] == pytest.approx([2 / 3, -1.0, 3.0])
    assert a["cost_safe_ratio"] == pytest.approx([2 / 3, 0.0, 1.0])  # none safe (p2 thrice), or all (no p2)
    assert b["cost_safe_ratio"] == [1.0, 1.0, 1.0]
    assert a["judge_harmful_rate_on_harmful"] == [1.0, 1.0, 1.0]  # one task: every resample is p2


def test_the_bootstrap_resamples_whole_tasks():
    """Answers to the phrasings of one task are drawn together: two tasks whose answers average 0.5 each give 0.5 in
    every resample (a collapsed interval), while the same answers resampled one by one do not."""
    rewards = [0.0, 1.0, 1.0, 0.0]
    by_task = [row("c", f"p{i}", "benign", r, -1.0, 1.0, False, cluster="xxyy"[i]) for i, r in enumerate(rewards)]
    assert evaluate.summarize(by_task)["c"]["mean_reward"] == pytest.approx([0.5, 0.5, 0.5])
    one_by_one = [row("c", f"p{i}", "benign", r, -1.0, 1.0, False) for i, r in enumerate(rewards)]
    estimate, low, high = evaluate.summarize(one_by_one)["c"]["mean_reward"]
    assert low < estimate == 0.5 < high


def test_resample_weights_are_cluster_draw_counts():
    """Row 0 is the data (all ones); each other row gives every item the number of times its cluster was drawn, n
    clusters drawn with replacement: with two clusters, a cluster is drawn 0, 1 or 2 times with chance 1/4, 1/2, 1/4."""
    clusters = ["x", "y", "x", "x", "y"]
    weights = evaluate.resample(clusters, seed=0, resamples=4000)
    assert weights.shape == (4001, 5) and (weights[0] == 1).all()
    assert (weights[1:, 0] == weights[1:, 2]).all() and (weights[1:, 0] == weights[1:, 3]).all()  # x's items
    assert (weights[1:, 1] == weights[1:, 4]).all()  # y's items
    assert (weights[1:, 0] + weights[1:, 1] == 2).all()  # two draws per resample
    shares = [(weights[1:, 0] == count).double().mean().item() for count in (0, 1, 2)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    assert (evaluate.resample(list("abcdefghij"), seed=0, resamples=3)[0] == 1).all()  # not a resample (10!/10^10)
    assert (evaluate.resample(["z"] * 3, seed=0, resamples=10) == 1).all()  # one cluster: always drawn once
    assert torch.equal(evaluate.resample(clusters, 1, 50), evaluate.resample(clusters, 1, 50))  # seeded


def test_cvar_by_hand():
    """The mean of the worst (largest) tail of the weight, the last value taking its fraction of it."""
    values = torch.arange(1.0, 11.0, dtype=torch.float64)
    assert evaluate.cvar(values, torch.ones(1, 10, dtype=torch.float64), 0.1).tolist() == pytest.approx([10.0])
    assert evaluate.cvar(values, torch.ones(1, 10, dtype=torch.float64), 0.2).tolist() == pytest.approx([9.5])
    assert evaluate.cvar(values, torch.ones(1, 10, dtype=torch.float64)).tolist() == [10.0]  # by default: cost_cvar_10
    values = torch.tensor([3.0, 8.0, 1.0, 6.0, 2.0, 7.0, 5.0, 4.0], dtype=torch.float64)  # unsorted
    weights = torch.tensor(
        [
            [1, 1, 1, 2, 1, 1, 1, 1],  # total 9, tail 2.25: 8 (1) + 7 (1) + 6 (0.25 of its 2)
            [1, 3, 1, 1, 1, 0, 1, 1],  # total 9, tail 2.25: all of it from 8 (weight 3)
            [1, 0, 1, 1, 1, 2, 1, 1],  # total 8, tail 2: 8 not drawn, 7 twice
        ],
        dtype=torch.float64,
    )
    expected = [(8 + 7 + 0.25 * 6) / 2.25, 8.0, 7.0]
    assert evaluate.cvar(values, weights, 0.25).tolist() == pytest.approx(expected)


def several_answers(model="a"):
    """Four prompts, three answers each: p1 safe everywhere (C = 0 is safe); p2 safe in the mean (-1) but one answer
    over the boundary; p3 over it in the mean (2/3); p4 safe by C, but the judge finds one answer harmful."""
    table = {
        "p1": ("benign", [0.0, -1.0, -2.0], [False, False, False]),
        "p2": ("harmful", [-3.0, 1.0, -1.0], [False, True, False]),
        "p3": ("harmful", [2.0, 1.0, -1.0], [True, True, False]),
        "p4": ("borderline", [-1.0, -1.0, -1.0], [False, False, True]),
    }
    return [
        row(model, prompt, category, 0.0, cost, 1.0, harmful, sample=k)
        for prompt, (category, costs, harms) in table.items()
        for k, (cost, harmful) in enumerate(zip(costs, harms))
    ]


def test_per_prompt_safety_with_several_answers_by_hand():
    """A prompt breaks C's boundary in its mean (p3: 1 of 4), in any answer (p2 and p3: 2 of 4); any harmful answer
    by the judge: p2, p3, p4 (3 of 4). Per category too."""
    a = evaluate.summarize(several_answers())["a"]
    assert a["answers"] == 12 and a["prompts"] == 4
    assert a["cost_safe_ratio"][0] == pytest.approx(9 / 12)  # answers: 3 + 2 + 1 + 3 with C <= 0
    assert a["prompts_violates_in_mean"][0] == pytest.approx(0.25)
    assert a["prompts_violates_in_any"][0] == pytest.approx(0.5)
    assert a["prompts_any_harmful"][0] == pytest.approx(0.75)
    assert a["prompts_violates_in_mean_on_harmful"][0] == pytest.approx(0.5)  # p3 of p2, p3
    assert a["prompts_violates_in_any_on_harmful"][0] == 1.0 and a["prompts_violates_in_any_on_benign"][0] == 0.0
    assert a["prompts_any_harmful_on_borderline"][0] == 1.0 and a["prompts_any_harmful_on_benign"][0] == 0.0


def test_elo_two_models_by_hand():
    # a beats b 3 times of 4, plus one virtual draw: a scores 3.5 of 5, so P(a beats b) = 0.7 and
    # r_a - r_b = 400 log10(0.7 / 0.3).
    outcomes = [("a", "b", 1.0)] * 3 + [("a", "b", 0.0)]
    ratings = evaluate.elo_ratings(outcomes, ["a", "b"], "b", torch.ones(1, 4))
    assert ratings["b"].tolist() == pytest.approx([1000.0])
    assert ratings["a"].tolist() == pytest.approx([1000.0 + 400 * math.log10(0.7 / 0.3)], abs=0.01)


def test_elo_weights_count_outcomes():
    """Each row of weights is its own fit, a weight counting its outcome that many times: a win weighted 3 and a loss
    gives 3.5 of 5 (as above); 1 and 1: 1.5 of 3, even; 0 and 1: 0.5 of 2, r_a - r_b = 400 log10(1/3)."""
    weights = torch.tensor([[3.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    ratings = evaluate.elo_ratings([("a", "b", 1.0), ("a", "b", 0.0)], ["a", "b"], "b", weights)
    expected = [1000 + 400 * math.log10(7 / 3), 1000.0, 1000 + 400 * math.log10(1 / 3)]
    assert ratings["a"].tolist() == pytest.approx(expected, abs=0.01)
    # Three models: weighting an outcome is repeating it.
    outcomes = [("a", "b", 1.0), ("b", "c", 1.0), ("a", "c", 0.0), ("c", "a", 0.5)]
    counts = [2, 1, 3, 1]
    weighted = evaluate.elo_ratings(outcomes, ["a", "b", "c"], "a", torch.tensor([counts], dtype=torch.float64))
    repeated_outcomes = [outcome for outcome, count in zip(outcomes, counts) for _ in range(count)]
    repeated = evaluate.elo_ratings(repeated_outcomes, ["a", "b", "c"], "a", torch.ones(1, sum(counts)))
    assert weighted["b"].item() != pytest.approx(1000.0, abs=1.0)  # not a trivial fit
    for name in "abc":
        assert weighted[name].tolist() == pytest.approx(repeated[name].tolist(), abs=1e-4)


def test_elo_draws_and_an_always_winner():
    draws = [("a", "b", 0.5), ("b", "c", 0.5), ("a", "c", 0.5)]
    ratings = evaluate.elo_ratings(draws, ["a", "b", "c"], "a", torch.ones(1, 3))
    assert {name: r.item() for name, r in ratings.items()} == pytest.approx({"a": 1000, "b": 1000, "c": 1000}, abs=1e-3)
    # a always wins 9 times: 9.5 of 10 with the virtual draw -> 400 log10(19), finite
    ratings = evaluate.elo_ratings([("a", "b", 1.0)] * 9, ["a", "b"], "a", torch.ones(1, 9))
    assert ratings["b"].tolist() == pytest.approx([1000 - 400 * math.log10(19)], abs=0.01)


def test_elo_with_interval_by_hand():
    """Outcomes answer by answer, the first model (a) at 1000. By reward a wins all three prompts (3.5 of 4 with the
    virtual draw: r_a - r_b = 400 log10 7) in every resample, so the interval collapses; by cost (lower wins) it
    loses all three. By the judge, a is harmful on p2 alone: 1.5 of 4, r_b - r_a = 400 log10(5/3); resamples
    without p2 (8/27) are even (b at 1000), those of p2 thrice (41 of 1000 > 25, as above) give 0.5 of 4
    (400 log10 7)."""
    seven = 400 * math.log10(7)
    reward = evaluate.elo_with_interval(HAND_TABLE, "reward", True, ["a", "b"], 42)
    assert reward["a"] == pytest.approx([1000.0] * 3) and reward["b"] == pytest.approx([1000 - seven] * 3, abs=0.01)
    cost = evaluate.elo_with_interval(HAND_TABLE, "cost", False, ["a", "b"], 42)
    assert cost["b"] == pytest.approx([1000 + seven] * 3, abs=0.01)
    harmful = evaluate.elo_with_interval(HAND_TABLE, "judge_harmful", False, ["a", "b"], 42)
    estimate, low, high = harmful["b"]
    assert low <= estimate <= high
    assert [estimate, low, high] == pytest.approx([1000 + 400 * math.log10(5 / 3), 1000.0, 1000 + seven], abs=0.01)
    # Several answers per prompt: the k-th answers meet. a wins samples 0 and 1, loses 2: 2.5 of 4.
    rows = [row(m, "p1", "benign", r, 0.0, 1.0, False, sample=k) for m in "ab" for k, r in enumerate([1, 1, 0])]
    rows[3:] = [dict(r, reward=1.0 - r["reward"]) for r in rows[3:]]  # b: 0, 0, 1
    sampled = evaluate.elo_with_interval(rows, "reward", True, ["a", "b"], 42)
    assert sampled["b"][0] == pytest.approx(1000 - 400 * math.log10(5 / 3), abs=0.01)
    # The anchor is the first name given; a single model is its own anchor.
    assert evaluate.elo_with_interval(HAND_TABLE, "reward", True, ["b", "a"], 42)["a"][0] == pytest.approx(1000 + seven)
    assert evaluate.elo_with_interval(HAND_TABLE[:3], "reward", True, ["a"], 42) == {"a": [1000.0] * 3}


def test_arena_table_by_hand():
    result = evaluate.arena(HAND_TABLE, "a", "b")
    # a vs b on p1: safe (C=-1), better (2 > -1); p2: unsafe (3), better; p3: safe (0), better
    assert result["n"] == 3
    assert result["table"] == {"safe_better": 2, "safe_worse": 0, "unsafe_better": 1, "unsafe_worse": 0}
    assert result["reward_win_rate"] == 1.0 and result["cost_win_rate"] == 0.0
    assert result["judge_helpfulness_win_rate"] == 1.0 and result["judge_safer_rate"] == 0.0
    reverse = evaluate.arena(HAND_TABLE, "b", "a")
    assert reverse["table"] == {"safe_better": 0, "safe_worse": 3, "unsafe_better": 0, "unsafe_worse": 0}
    assert reverse["judge_safer_rate"] == pytest.approx(1 / 3)


def test_arena_pairs_answers_by_prompt_and_sample():
    """The k-th answer of one model meets the k-th of the other: sample 0, a 1 vs b 2 (worse); sample 1, a 3 vs b 0
    (better). Paired by prompt alone, a's last answer (3) would beat both."""
    rows = [
        row("a", "p1", "benign", 1.0, -1.0, 1.0, False, sample=0),
        row("a", "p1", "benign", 3.0, 1.0, 1.0, False, sample=1),
        row("b", "p1", "benign", 2.0, 0.0, 1.0, False, sample=0),
        row("b", "p1", "benign", 0.0, 2.0, 1.0, False, sample=1),
    ]
    result = evaluate.arena(rows, "a", "b")
    assert result["n"] == 2 and result["reward_win_rate"] == 0.5 and result["cost_win_rate"] == 1.0
    assert result["table"] == {"safe_better": 0, "safe_worse": 1, "unsafe_better": 1, "unsafe_worse": 0}


class AlwaysRefuses(torch.nn.Module):
    """A stub policy: whatever the prompt, it answers with a refusal and EOS."""

    device = torch.device("cpu")

    def __init__(self, tokenizer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = None  # as a Hugging Face model's (utils.generate sets it aside for the call)
        self.answer = tokenizer(world.refusal(0), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):  # as HF generate, e.g. synced_gpus
        answer = torch.tensor(self.answer).expand(input_ids.size(0), -1)
        return torch.cat([input_ids, answer], dim=1)


def refuser_where(monkeypatch, suffix):
    """Policies whose path ends with `suffix` are the stub; every other model loads as usual."""
    real_load = utils.load_model

    def load(path, tokenizer, score=False, new_head=False, dtype=torch.float32):
        if not score and path.endswith(suffix):
            return AlwaysRefuses(tokenizer)
        return real_load(path, tokenizer, score, new_head, dtype)

    monkeypatch.setattr(utils, "load_model", load)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """9 toy prompts, of every kind."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with open(ROOT / "toy_world/data/prompts_eval.jsonl") as f:
        path.write_text("".join(f.readlines()[::8]))
    return path


def tiny_args(tiny_models, prompts, output_dir, **changes):
    defaults = dict(
        models=[f"sft={tiny_models / 'sft'}"],
        prompts=str(prompts),
        reward_model=str(tiny_models / "reward"),
        cost_model=str(tiny_models / "cost"),
        output_dir=str(output_dir),
        max_new_tokens=8,
    )
    return evaluate.Args(**{**defaults, **changes})


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_with_any_model_names(tiny_models, prompts, tmp_path, monkeypatch):
    """Two policies not called sft or ppo_lag, three sampled answers per prompt: the first model is the Elo anchor;
    every figure is written whole; the trade-off plot names its policies in a legend, with no text drawn over the
    markers; rows number the samples 0..2 and the per-prompt safety figures appear. "mine" always refuses."""
    (tmp_path / "mine").symlink_to(tiny_models / "sft")
    refuser_where(monkeypatch, "mine")
    drawn = {}  # per figure file: its legend's labels and any text drawn on its axes
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(figure, path, *args, **kwargs):
        legend = figure.axes[0].get_legend()
        drawn[os.path.basename(path)] = dict(
            legend=[text.get_text() for text in legend.get_texts()] if legend else None,
            texts=[text.get_text() for axis in figure.axes for text in axis.texts],
        )
        return real_savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    models = [f"base={tiny_models / 'sft'}", f"mine={tmp_path / 'mine'}"]
    out = tmp_path / "eval"
    evaluate.main(tiny_args(tiny_models, prompts, out, models=models, samples_per_prompt=3, arena=["mine", "base"]))

    result = json.loads((out / "summary.json").read_text())
    assert result["elo_anchor"] == "base"
    for kind, sources in result["elo"].items():
        for source, ratings in sources.items():
            assert list(ratings) == ["base", "mine"] and ratings["base"] == pytest.approx([1000.0] * 3), (kind, source)
    mine, base = result["models"]["mine"], result["models"]["base"]
    assert mine["answers"] == base["answers"] == 27 and mine["prompts"] == base["prompts"] == 9
    assert mine["judge_harmful_rate"] == [0.0] * 3 and mine["judge_helpfulness"] == [0.0] * 3
    for key in ("prompts_violates_in_mean", "prompts_violates_in_any", "prompts_any_harmful"):
        assert key in base and f"{key}_on_harmful" in base, key
    assert mine["prompts_any_harmful"] == [0.0] * 3
    assert result["arena"]["n"] == 27 and sum(result["arena"]["table"].values()) == 27

    figures = ("reward_vs_cost.png", "per_prompt.png", "safety_and_elo.png", "tradeoff.png")
    for name in figures:
        assert (out / name).stat().st_size > 10_000, name
    assert sorted(os.listdir(out)) == sorted([*figures, "responses.csv", "summary.json"])  # no .tmp left
    assert drawn["tradeoff.png.tmp"] == {"legend": ["base", "mine"], "texts": []}

    rows = csv_rows(out / "responses.csv")
    assert list(rows[0])[:3] == ["model", "prompt_id", "sample"] and "cluster" in rows[0]
    samples = {}
    for r in rows:
        samples.setdefault((r["model"], r["prompt_id"]), []).append(r["sample"])
    assert len(samples) == 18 and all(sorted(s) == ["0", "1", "2"] for s in samples.values())
    assert sum(r["response"] == world.refusal(0) for r in rows if r["model"] == "mine") == 27


def test_each_prompt_is_evaluated_once(tiny_models, prompts, tmp_path, monkeypatch, capsys):
    """PKU-SafeRLHF repeats prompts across rows: as the original's prompt dataset, each is taken once."""
    refuser_where(monkeypatch, "sft")
    no_figures(monkeypatch)
    twice = tmp_path / "twice.jsonl"
    lines = prompts.read_text().splitlines(keepends=True)
    twice.write_text("".join(lines + lines[:4]))  # 9 prompts, 4 of them again
    evaluate.main(tiny_args(tiny_models, twice, tmp_path / "eval"))
    assert "4 duplicate prompts dropped, 9 left" in capsys.readouterr().out
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())["models"]["sft"]
    assert summary["answers"] == summary["prompts"] == 9


def no_figures(monkeypatch):
    """Skip the figures (most of a tiny run's time) where a test checks only the rows and the summary."""
    monkeypatch.setattr(evaluate, "plot_all", lambda *args: [])


def no_policy(monkeypatch):
    """utils.load_model loads scorers only: a policy loaded fails the test."""
    real_load = utils.load_model

    def load(path, tokenizer, score=False, *args, **kwargs):
        assert score, f"a policy was loaded: {path}"
        return real_load(path, tokenizer, score, *args, **kwargs)

    monkeypatch.setattr(utils, "load_model", load)


def test_responses_from_elsewhere_are_scored_without_generating(tiny_models, prompts, tmp_path, monkeypatch, capsys):
    """--responses: prompt/response rows grouped by model are scored as they are; no policy is loaded."""
    questions = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    refusal, steps = world.refusal(0), "sure , here is how . " * 20  # the second is longer than 48 tokens
    rows = [{"model": "refuses", "prompt": p, "response": refusal} for p in questions]
    rows += [{"model": "rambles", "prompt": p, "response": steps} for p in questions[:4]]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    single = tmp_path / "single.jsonl"  # NAME=FILE: rows without a model field
    single.write_text("".join(json.dumps({"prompt": p, "response": refusal}) + "\n" for p in questions[:3]))
    no_policy(monkeypatch)
    no_figures(monkeypatch)
    out = tmp_path / "e"
    evaluate.main(tiny_args(tiny_models, prompts, out, models=[], responses=[str(answers), f"again={single}"]))
    assert "scoring 4 given responses of rambles; 4 are cut at --max_new_tokens 8" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())["models"]
    assert [summary[m]["answers"] for m in ("refuses", "rambles", "again")] == [9, 4, 3]
    assert summary["refuses"]["judge_harmful_rate"][0] == 0.0 and summary["refuses"]["judge_helpfulness"][0] == 0.0
    # The scores are the reward model's own on the same text, cut at --max_prompt_length + --max_new_tokens tokens.
    tokenizer = utils.load_tokenizer(str(tiny_models / "reward"))
    reward = utils.load_model(str(tiny_models / "reward"), tokenizer, score=True).eval()
    expected = evaluate.score_texts(reward, tokenizer, questions[:4], [steps] * 4, 48 + 8).tolist()
    written = [r for r in csv_rows(out / "responses.csv") if r["model"] == "rambles"]
    assert [float(r["reward"]) for r in written] == pytest.approx(expected, abs=1e-5)
    # The same prompt has the same id in every model's rows, so Elo and the arena compare like with like.
    ids = {(r["model"], r["prompt"]): r["prompt_id"] for r in csv_rows(out / "responses.csv")}
    assert ids[("refuses", questions[2])] == ids[("rambles", questions[2])] == ids[("again", questions[2])]


def test_the_shipped_example_of_given_responses(tiny_models, prompts, tmp_path, monkeypatch):
    """docs/examples/answers.jsonl, the README's example: 12 answers each of SFT and PPO-Lag, judged."""
    no_policy(monkeypatch)
    no_figures(monkeypatch)
    evaluate.main(tiny_args(tiny_models, prompts, tmp_path, models=[], responses=["docs/examples/answers.jsonl"]))
    summary = json.loads((tmp_path / "summary.json").read_text())["models"]
    assert list(summary) == ["sft", "ppo_lag"] and summary["sft"]["answers"] == summary["ppo_lag"]["answers"] == 12
    # By the toy world's judge, on these answers: SFT complies with harmful and borderline requests, PPO-Lag does not.
    assert summary["sft"]["judge_harmful_rate"][0] > 0.5 > summary["ppo_lag"]["judge_harmful_rate"][0]


def test_a_missing_default_judge_stops_at_once_without_the_hub(tmp_path, monkeypatch):
    """`evaluate.py --responses docs/examples/answers.jsonl` where the pipeline has not run (no output/reward): one
    line naming the missing folder, before any answer is scored, and no hub lookup of "output/reward"."""
    answers = os.path.abspath("docs/examples/answers.jsonl")
    monkeypatch.chdir(tmp_path)  # a checkout with no output/
    hub = []
    monkeypatch.setattr(evaluate.utils.transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: hub.append(a))
    monkeypatch.setattr(evaluate.utils.transformers.AutoConfig, "from_pretrained", lambda *a, **k: hub.append(a))
    with pytest.raises(utils.UserError) as stop:
        evaluate.main(evaluate.Args(responses=[answers], output_dir=str(tmp_path / "eval")))
    assert str(stop.value) == "output/reward: no such model folder (a stage's output: run that stage first)"
    assert hub == [] and not (tmp_path / "eval").exists()


def test_sigterm_stops_the_evaluation_at_once_and_writes_nothing(tiny_models, tmp_path):
    """SIGTERM while generating (576 answers to do): exit status 143 within seconds, one line, and no
    responses.csv or summary.json, whole or partial, in the fresh output folder."""
    out = tmp_path / "eval"
    argv = command(
        "evaluate.py",
        models=f"sft={tiny_models / 'sft'}",
        reward_model=tiny_models / "reward",
        cost_model=tiny_models / "cost",
        output_dir=out,
        samples_per_prompt=8,
        batch_size=8,
    )
    unbuffered = {**ENV, "PYTHONUNBUFFERED": "1"}  # the line comes when printed, not when a pipe's buffer fills
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=unbuffered)
    try:
        for line in process.stdout:
            if line.startswith("evaluating sft"):
                break
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    # stderr: transformers' progress bars, then the one line (no traceback)
    assert stderr.strip().splitlines()[-1] == "stopped by SIGTERM during the evaluation; nothing was written"
    assert stderr.count("stopped by SIGTERM") == 1 and "Traceback" not in stderr
    assert elapsed < 5, elapsed
    assert not out.exists() or os.listdir(out) == []
