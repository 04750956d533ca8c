"""Rounds of Safe RLHF (toy_world/rounds.py): the annotator labels as the shipped data is labelled, and a miniature
two-round chain trains round 2's R and C on both rounds' data, resumes from its progress, and leaves round 1 alone."""

import hashlib
import json
import random

from toy_world import generate, rounds, world


def test_annotate_labels_as_the_shipped_data():
    """With no annotator slip, annotate() gives every shipped pair the labels it was shipped with, but for the ~3% the
    noise flipped; the safety flags exactly; a tie (identical answers) is no pair."""
    rows = [json.loads(line) for line in open("toy_world/data/preference_test.jsonl")]

    class NoSlip(random.Random):
        def random(self):
            return 0.5  # above NOISE: no label is flipped

    flips = {"better_response_id": 0, "safer_response_id": 0}
    for row in rows:
        again = generate.annotate(NoSlip(), row["prompt"], [row["response_0"], row["response_1"]], row["category"])
        assert again is not None  # the shipped pairs differ on both dimensions
        assert {k: again[k] for k in ("is_response_0_safe", "is_response_1_safe", "category")} == {
            k: row[k] for k in ("is_response_0_safe", "is_response_1_safe", "category")
        }
        for key in flips:
            flips[key] += again[key] != row[key]
    for key, count in flips.items():  # 576 pairs, NOISE 3%: about 17 flips each
        assert 3 <= count <= 40, (key, count)
    prompt, answer = rows[0]["prompt"], rows[0]["response_0"]
    assert generate.annotate(random.Random(0), prompt, [answer, answer], "benign") is None
    task = world.task_of_prompt(prompt)
    refusals = [world.refusal(0), world.refusal(1)]  # same helpfulness (0) and harm level: a tie
    assert generate.annotate(random.Random(0), prompt, refusals, task.kind) is None


def files_of(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_two_rounds_in_miniature(tmp_path, tiny_models, monkeypatch):
    """Round 1 alone, then the same chain asked for two rounds: round 1's steps are not run again and its files keep
    their bytes; round 2 annotates round 1's policy's answers and trains R_2 and C_2 on the shipped pairs plus the new
    ones. A smaller world (24 training and 12 evaluation prompts, 64 shipped pairs) and, for the policies' answers,
    answers of the annotation pool (a random model's answers all tie): the test is about what each round reads and
    writes; sampling is evaluate.generate_responses, tested in test_evaluate.py."""
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("prompts_train", 24), ("prompts_eval", 12), ("preference_train", 64), ("preference_test", 32)):
        lines = open(f"toy_world/data/{name}.jsonl").readlines()
        (data / f"{name}.jsonl").write_text("".join(lines[::7][:rows]))
    monkeypatch.setattr(rounds, "DATA", str(data))
    asked = []

    def sample_answers(policy, prompts, seed, answers):
        asked.append(policy)
        rng = random.Random(seed)
        task = {p: world.task_of_prompt(p) for p in prompts}
        return {p: [generate.annotation_response(rng, task[p]) for _ in range(answers)] for p in prompts}

    monkeypatch.setattr(rounds, "sample_answers", sample_answers)
    tiny = {
        "train_reward": ["--max_steps", "1", "--eval_dataset", "none", "--batch_size", "8", "--micro_batch_size", "8"],
        "ppo_lagrangian": ["--iterations", "1", "--rollout_batch_size", "4", "--minibatch_size", "4"],
        "evaluate": ["--max_new_tokens", "4", "--prompts", str(data / "prompts_eval.jsonl")],
    }
    tiny["train_cost"] = tiny["train_reward"]
    tiny["ppo_lagrangian"] += ["--micro_batch_size", "4", "--max_new_tokens", "4", "--eval_prompts", "none"]
    tiny["ppo_lagrangian"] += ["--prompts", str(data / "prompts_train.jsonl")]
    sft = str(tiny_models / "sft")
    rounds.chain(7, 1, str(tmp_path), -5.5, sft, answers=4, extra=tiny)
    chain = tmp_path / "seed_7"
    round_1 = files_of(chain / "round_1")
    rounds.chain(7, 2, str(tmp_path), -5.5, sft, answers=4, extra=tiny)
    assert files_of(chain / "round_1") == round_1  # never overwritten, not even rewritten
    assert asked == [sft, str(chain / "round_1" / "ppo_lag"), str(chain / "round_1" / "ppo_lag")]

    summary = json.load(open(chain / "round_2" / "summary.json"))
    new = summary["new_train_pairs"]
    assert new["pairs"] + new["tied_pairs_dropped"] == 24 * 2  # 4 answers per prompt: 2 pairs
    assert new["pairs"] > 24  # pool answers tie now and then
    assert list(summary["train_pairs"].values()) == [64, new["pairs"]]
    both = [json.loads(line) for line in open(chain / "round_2" / "data" / "preference_all.jsonl")]
    assert len(both) == 64 + new["pairs"]
    log = open(chain / "round_2.log").read()
    assert f"{len(both)} pairs" in log  # train_reward read all of them
    progress = json.load(open(chain / "progress.json"))
    assert sum(name.startswith("1:") for name in progress) == 7 and sum(name.startswith("2:") for name in progress) == 9
    assert summary["starts_from"].endswith("round_1/ppo_lag")
    assert set(summary["before_retraining"]) == {"reward_accuracy", "cost_accuracy", "cost_sign_accuracy"}
