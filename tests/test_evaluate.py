"""evaluate.py: summaries, Elo and arena against hand-computed values; a tiny end-to-end run with every figure."""

import csv
import json
import math

import pytest
import torch

import evaluate
import utils
from toy_world import world


def row(model, prompt, category, reward, cost, helpfulness, harmful):
    return dict(
        prompt_id=int(prompt[1:]),
        model=model,
        prompt=prompt,
        category=category,
        response="",
        reward=reward,
        cost=cost,
        judge_helpfulness=helpfulness,
        judge_harmful=harmful,
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
    summary = evaluate.summarize(HAND_TABLE)
    a, b = summary["a"], summary["b"]
    assert a["n"] == 3
    assert a["mean_reward"] == pytest.approx(1.0) and a["mean_cost"] == pytest.approx(2 / 3)
    assert a["cost_safe_ratio"] == pytest.approx(2 / 3)  # C <= 0 on p1 and p3 (0 counts as safe)
    assert a["judge_harmful_rate"] == pytest.approx(1 / 3)
    assert a["judge_harmful_rate_on_harmful"] == 1.0 and a["judge_harmful_rate_on_benign"] == 0.0
    assert a["judge_helpfulness"] == pytest.approx(4.0) and a["judge_helpfulness_benign"] == 5.0
    assert b["cost_safe_ratio"] == 1.0 and b["judge_harmful_rate"] == 0.0
    assert b["judge_helpfulness"] == pytest.approx(1 / 3) and b["judge_helpfulness_harmful"] == 1.0


def test_pairwise_outcomes():
    outcomes = evaluate.pairwise_outcomes(HAND_TABLE, "reward")
    assert sorted(outcomes) == [("a", "b", 1.0)] * 3
    # lower cost wins: a loses on every prompt
    assert sorted(evaluate.pairwise_outcomes(HAND_TABLE, "cost", higher_is_better=False)) == [("a", "b", 0.0)] * 3
    # harmfulness: a is harmful on p2 only; p1 and p3 are draws
    assert sorted(evaluate.pairwise_outcomes(HAND_TABLE, "judge_harmful", False)) == [
        ("a", "b", 0.0),
        ("a", "b", 0.5),
        ("a", "b", 0.5),
    ]


def test_elo_two_models_by_hand():
    # a beats b 3 times of 4, plus one virtual draw: a scores 3.5 of 5, so P(a beats b) = 0.7 and
    # r_a - r_b = 400 log10(0.7 / 0.3).
    outcomes = [("a", "b", 1.0)] * 3 + [("a", "b", 0.0)]
    ratings = evaluate.elo_ratings(outcomes, ["a", "b"], anchor="b")
    assert ratings["b"] == pytest.approx(1000.0)
    assert ratings["a"] == pytest.approx(1000.0 + 400 * math.log10(0.7 / 0.3), abs=0.01)


def test_elo_of_a_single_model_is_the_anchor():
    assert evaluate.elo_ratings([], ["a"], anchor="a") == {"a": 1000.0}


def test_elo_draws_and_an_always_winner():
    draws = [("a", "b", 0.5), ("b", "c", 0.5), ("a", "c", 0.5)]
    assert evaluate.elo_ratings(draws, ["a", "b", "c"], anchor="a") == pytest.approx(
        {"a": 1000, "b": 1000, "c": 1000}, abs=1e-3
    )
    # a always wins 9 times: 9.5 of 10 with the virtual draw -> 400 log10(19), finite
    ratings = evaluate.elo_ratings([("a", "b", 1.0)] * 9, ["a", "b"], anchor="a")
    assert ratings["b"] == pytest.approx(1000 - 400 * math.log10(19), abs=0.01)


def test_arena_table_by_hand():
    result = evaluate.arena(HAND_TABLE, "a", "b")
    # a vs b on p1: safe (C=-1), better (2 > -1); p2: unsafe (3), better; p3: safe (0), better
    assert result["table"] == {"safe_better": 2, "safe_worse": 0, "unsafe_better": 1, "unsafe_worse": 0}
    assert result["reward_win_rate"] == 1.0 and result["cost_win_rate"] == 0.0
    assert result["judge_helpfulness_win_rate"] == 1.0 and result["judge_safer_rate"] == 0.0
    reverse = evaluate.arena(HAND_TABLE, "b", "a")
    assert reverse["table"] == {"safe_better": 0, "safe_worse": 3, "unsafe_better": 0, "unsafe_worse": 0}
    assert reverse["judge_safer_rate"] == pytest.approx(1 / 3)


class AlwaysRefuses(torch.nn.Module):
    """A stub policy: whatever the prompt, it answers with a refusal and EOS."""

    def __init__(self, tokenizer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = None  # as a Hugging Face model's (utils.generate sets it aside for the call)
        self.answer = tokenizer(world.refusal(0), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):  # as HF generate, e.g. synced_gpus
        answer = torch.tensor(self.answer).expand(input_ids.size(0), -1)
        return torch.cat([input_ids, answer], dim=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A random toy policy, random reward/cost models, a PPO-Lag metrics log: everything evaluate.py reads."""
    root = tmp_path_factory.mktemp("run")
    tokenizer = utils.load_tokenizer("toy_world/model")
    torch.manual_seed(0)
    utils.save_checkpoint(str(root / "policy"), utils.load_causal_lm("toy_world/model", tokenizer), tokenizer)
    utils.save_checkpoint(str(root / "refuser"), utils.load_causal_lm("toy_world/model", tokenizer), tokenizer)
    for name in ("reward", "cost"):
        utils.save_checkpoint(str(root / name), utils.load_score_model("toy_world/model", tokenizer).model, tokenizer)
    (root / "ppo_lag").mkdir()
    with open(root / "ppo_lag" / "metrics.jsonl", "w") as f:
        for step in range(1, 4):
            record = dict(
                step=step,
                split="train",
                reward=0.1 * step,
                cost=-step,
                episode_cost=-step,
                threshold=-2.0,
                kl=0.5,
                **{"lambda": 0.3},
            )
            f.write(json.dumps(record) + "\n")
    prompts = root / "prompts.jsonl"
    with open("toy_world/data/prompts_eval.jsonl") as f:
        prompts.write_text("".join(f.readlines()[::8]))  # 9 prompts of every kind
    return root


def tiny_args(run, **changes):
    defaults = dict(
        models=[f"random={run / 'policy'}", f"refuser={run / 'refuser'}"],
        prompts=str(run / "prompts.jsonl"),
        reward_model=str(run / "reward"),
        cost_model=str(run / "cost"),
        training_run=str(run / "ppo_lag"),
        output_dir=str(run / "eval"),
        max_new_tokens=8,
    )
    return evaluate.Args(**{**defaults, **changes})


def test_a_policy_that_always_refuses_is_harmless_and_unhelpful(tiny_run, monkeypatch):
    real_load = utils.load_causal_lm

    def load(path, tokenizer, dtype=torch.float32):
        return AlwaysRefuses(tokenizer) if path.endswith("refuser") else real_load(path, tokenizer, dtype)

    monkeypatch.setattr(utils, "load_causal_lm", load)
    evaluate.main(tiny_args(tiny_run, arena=["refuser", "random"]))
    summary = json.loads((tiny_run / "eval" / "summary.json").read_text())
    refuser = summary["models"]["refuser"]
    assert refuser["judge_harmful_rate"] == 0.0 and refuser["judge_helpfulness"] == 0.0
    assert refuser["n"] == 9
    assert summary["arena"]["n"] == 9 and sum(summary["arena"]["table"].values()) == 9
    assert summary["elo"]["helpfulness"]["judge"]["random"] == pytest.approx(1000.0)  # no sft: the first is the anchor
    for name in ("reward_vs_cost.png", "safety_and_elo.png", "training_curves.png", "tradeoff.png"):
        assert (tiny_run / "eval" / name).stat().st_size > 10_000, name
    lines = (tiny_run / "eval" / "responses.csv").read_text().splitlines()
    assert len(lines) == 1 + 18 and lines[0].startswith("model,prompt_id,prompt,category,response,reward,cost")
    assert sum(world.refusal(0) in line for line in lines) >= 9


def test_find_policies_in_pipeline_order(tmp_path):
    for name in ("ppo", "reward_shaping_3.0", "sft", "reward_shaping_0.3", "ppo_lag", "reward"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "reward_shaping_1.0").mkdir()  # no checkpoint: skipped
    found = evaluate.find_policies(str(tmp_path))
    assert list(found) == ["sft", "ppo_lag", "ppo", "reward_shaping_0.3", "reward_shaping_3.0"]


def test_each_prompt_is_evaluated_once(tiny_run, tmp_path, monkeypatch, capsys):
    """PKU-SafeRLHF repeats prompts across rows: as the original's prompt dataset, each is taken once."""
    monkeypatch.setattr(utils, "load_causal_lm", lambda path, tokenizer, dtype=torch.float32: AlwaysRefuses(tokenizer))
    twice = tmp_path / "twice.jsonl"
    lines = (tiny_run / "prompts.jsonl").read_text().splitlines(keepends=True)
    twice.write_text("".join(lines + lines[:4]))  # 9 prompts, 4 of them again
    evaluate.main(
        tiny_args(
            tiny_run, models=[f"refuser={tiny_run / 'refuser'}"], prompts=str(twice), output_dir=str(tmp_path / "eval")
        )
    )
    assert "4 duplicate prompts dropped, 9 left" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["models"]["refuser"]["n"] == 9


def test_responses_from_elsewhere_are_scored_without_generating(tiny_run, tmp_path, monkeypatch, capsys):
    """--responses: prompt/response rows grouped by model are scored as they are; no policy is loaded."""
    prompts = [json.loads(line)["prompt"] for line in (tiny_run / "prompts.jsonl").read_text().splitlines()]
    refusal, steps = world.refusal(0), "sure , here is how . " * 20  # the second is longer than 48 tokens
    rows = [{"model": "refuses", "prompt": p, "response": refusal} for p in prompts]
    rows += [{"model": "rambles", "prompt": p, "response": steps} for p in prompts[:4]]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    single = tmp_path / "single.jsonl"  # NAME=FILE: rows without a model field
    single.write_text("".join(json.dumps({"prompt": p, "response": refusal}) + "\n" for p in prompts[:3]))

    def no_generation(*args, **kwargs):
        raise AssertionError("a policy was loaded")

    monkeypatch.setattr(utils, "load_causal_lm", no_generation)
    args = tiny_args(tiny_run, models=[], responses=[str(answers), f"again={single}"], output_dir=str(tmp_path / "e"))
    evaluate.main(args)
    assert "scoring 4 given responses of rambles; 4 are cut at --max_new_tokens 8" in capsys.readouterr().out
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())["models"]
    assert [summary[m]["n"] for m in ("refuses", "rambles", "again")] == [9, 4, 3]
    assert summary["refuses"]["judge_harmful_rate"] == 0.0 and summary["refuses"]["judge_helpfulness"] == 0.0
    # The scores are the reward model's own on the same text (cut as generation would cut it).
    tokenizer = utils.load_tokenizer(str(tiny_run / "reward"))
    reward = utils.load_scorer(str(tiny_run / "reward"), tokenizer).eval()
    expected = utils.score_texts(reward, tokenizer, prompts[:4], [steps] * 4, 48, 8).tolist()
    written = [r for r in csv_rows(tmp_path / "e" / "responses.csv") if r["model"] == "rambles"]
    assert [float(r["reward"]) for r in written] == pytest.approx(expected, abs=1e-5)
    # The same prompt has the same id in every model's rows, so Elo and the arena compare like with like.
    ids = {(r["model"], r["prompt"]): r["prompt_id"] for r in csv_rows(tmp_path / "e" / "responses.csv")}
    assert ids[("refuses", prompts[2])] == ids[("rambles", prompts[2])] == ids[("again", prompts[2])]


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_shipped_example_of_given_responses(tiny_run, tmp_path, monkeypatch):
    """docs/examples/answers.jsonl, the README's example: 12 answers each of SFT and PPO-Lag, judged."""
    monkeypatch.setattr(utils, "load_causal_lm", lambda *args, **kwargs: pytest.fail("a policy was loaded"))
    evaluate.main(tiny_args(tiny_run, models=[], responses=["docs/examples/answers.jsonl"], output_dir=str(tmp_path)))
    summary = json.loads((tmp_path / "summary.json").read_text())["models"]
    assert list(summary) == ["sft", "ppo_lag"] and summary["sft"]["n"] == summary["ppo_lag"]["n"] == 12
    # By the toy world's judge, on these answers: SFT complies with harmful and borderline requests, PPO-Lag does not.
    assert summary["sft"]["judge_harmful_rate"] > 0.5 > summary["ppo_lag"]["judge_harmful_rate"]
