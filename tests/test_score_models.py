"""Reward and cost models: the losses of eqs. 5-6 by hand, pairs and signs, the end score, and the
stages end to end on small slices of the toy preference data (learning, checkpoints, --resume, torchrun).

The backbone is a seeded, randomly initialised toy causal LM saved as a checkpoint (no SFT run here).
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_cost
import train_reward
import utils

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = str(ROOT / "toy_world" / "model")
TOY_DATA = ROOT / "toy_world" / "data"


def softplus(x):
    """-log σ(-x) = log(1 + e^x), the value of each term of the losses."""
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tokenizer():
    return utils.load_tokenizer(TOY_MODEL)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, tokenizer):
    """A seeded random toy causal LM saved as a checkpoint: stands in for output/sft."""
    path = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    model = utils.load_causal_lm(TOY_MODEL, tokenizer)
    utils.save_checkpoint(str(path), model, tokenizer)
    return str(path)


def slice_of(tmp_path_factory, name, start, stop):
    path = tmp_path_factory.mktemp("data") / f"{name}_{start}_{stop}.jsonl"
    with open(TOY_DATA / f"{name}.jsonl") as f:
        path.write_text("".join(f.readlines()[start:stop]))
    return str(path)


@pytest.fixture(scope="module")
def train_600(tmp_path_factory):
    return slice_of(tmp_path_factory, "preference_train", 0, 600)


@pytest.fixture(scope="module")
def train_160(tmp_path_factory):
    return slice_of(tmp_path_factory, "preference_train", 0, 160)


@pytest.fixture(scope="module")
def test_150(tmp_path_factory):
    return slice_of(tmp_path_factory, "preference_test", 0, 150)


@pytest.fixture(scope="module")
def test_48(tmp_path_factory):
    return slice_of(tmp_path_factory, "preference_test", 150, 198)


def small_args(args_class, backbone, data, eval_data, output_dir, **changes):
    defaults = dict(
        model_name_or_path=backbone,
        dataset=data,
        eval_dataset=eval_data,
        output_dir=str(output_dir),
        epochs=1,
        batch_size=16,
        micro_batch_size=16,
        save_every=1000,
        log_every=1,
    )
    if args_class is train_cost.Args:
        defaults["reward_model"] = str(Path(output_dir) / "no_such_reward_model")
    return args_class(**{**defaults, **changes})


def read_metrics(output_dir, split="train"):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, backbone, train_600, test_150):
    """One short reward-model run: 600 pairs, 1 epoch of 37 steps of 16."""
    output_dir = tmp_path_factory.mktemp("reward")
    train_reward.main(small_args(train_reward.Args, backbone, train_600, test_150, output_dir))
    return str(output_dir)


@pytest.fixture(scope="module")
def cost_run(tmp_path_factory, backbone, train_600, test_150, reward_run):
    """One short cost-model run (2 epochs on the same 600 pairs), with the reward model for the scatter."""
    output_dir = tmp_path_factory.mktemp("cost")
    args = small_args(train_cost.Args, backbone, train_600, test_150, output_dir, epochs=2, reward_model=reward_run)
    train_cost.main(args)
    return str(output_dir)


# ----------------------------------------------------------------------------- eq. 5: the reward loss


def test_reward_loss_by_hand():
    loss = train_reward.reward_loss(torch.tensor([2.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(softplus(-2), rel=1e-6)  # -log σ(2) = log(1 + e^-2) = 0.126928
    # A batch: differences 2, 0, -2 -> mean of log(1 + e^-2), log 2, log(1 + e^2) = 0.982334
    better, worse = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = (softplus(-2) + math.log(2) + softplus(2)) / 3
    assert expected == pytest.approx(0.982334, abs=1e-6)
    assert train_reward.reward_loss(better, worse).item() == pytest.approx(expected, rel=1e-6)
    # Regularization 0.1 x mean of the squares of all six scores: (4 + 0 + 1 + 0 + 0 + 1) / 6 = 1 -> + 0.1
    assert train_reward.reward_loss(better, worse, regularization=0.1).item() == pytest.approx(expected + 0.1, rel=1e-6)
    # The loss is a mean over pairs: the batch does not scale it.
    assert train_reward.reward_loss(better.repeat(4), worse.repeat(4)).item() == pytest.approx(expected, rel=1e-6)


def test_reward_loss_gradient_pushes_the_better_response_up():
    better = torch.tensor([0.0, 1.0], requires_grad=True)
    worse = torch.tensor([0.0, 3.0], requires_grad=True)
    train_reward.reward_loss(better, worse).backward()
    # d/dR_w [-log σ(R_w - R_l)] / n = -σ(R_l - R_w) / n: -0.5 / 2 and -σ(2) / 2 = -0.440399
    assert better.grad.tolist() == pytest.approx([-0.25, -sigmoid(2) / 2], rel=1e-6)
    assert worse.grad.tolist() == pytest.approx([0.25, sigmoid(2) / 2], rel=1e-6)
    assert (better.grad < 0).all() and (worse.grad > 0).all()  # descent raises R(y_w), lowers R(y_l)


# ----------------------------------------------------------------------------- eq. 6: the cost loss


def test_cost_loss_by_hand():
    one = torch.tensor
    # y_w harmful (s_w = +1) with C = 1, y_l harmless (s_l = -1) with C = -1:
    # -log σ(1 - (-1)) - log σ(+1 · 1) - log σ(-1 · -1) = log(1 + e^-2) + 2 log(1 + e^-1) = 0.753452
    clear = softplus(-2) + 2 * softplus(-1)
    assert clear == pytest.approx(0.753452, abs=1e-6)
    loss = train_cost.cost_loss(one([1.0]), one([-1.0]), one([1.0]), one([-1.0]))
    assert loss.item() == pytest.approx(clear, rel=1e-6)
    # The more harmful response is labelled safe too (s_w = -1): its term becomes -log σ(-1) = log(1 + e)
    # = 1 + log(1 + e^-1), so the loss is exactly 1 more: 1.753452
    both_safe = softplus(-2) + softplus(1) + softplus(-1)
    assert both_safe == pytest.approx(clear + 1, abs=1e-9)
    loss = train_cost.cost_loss(one([1.0]), one([-1.0]), one([-1.0]), one([-1.0]))
    assert loss.item() == pytest.approx(both_safe, rel=1e-6)
    # Both in one batch: the mean over pairs, (0.753452 + 1.753452) / 2 = 1.253452
    costs_w, costs_l, signs_w, signs_l = one([1.0, 1.0]), one([-1.0, -1.0]), one([1.0, -1.0]), one([-1.0, -1.0])
    batch = train_cost.cost_loss(costs_w, costs_l, signs_w, signs_l)
    assert batch.item() == pytest.approx((clear + both_safe) / 2, rel=1e-6)
    # Regularization 0.01 x mean of the squares of all four costs (all 1): + 0.01
    regularized = train_cost.cost_loss(costs_w, costs_l, signs_w, signs_l, regularization=0.01)
    assert regularized.item() == pytest.approx((clear + both_safe) / 2 + 0.01, rel=1e-6)
    # The model ranks the pair the wrong way and both are harmful: C_w = 0.5, C_l = 2, s = +1, +1:
    # log(1 + e^1.5) + log(1 + e^-0.5) + log(1 + e^-2) = 1.701413 + 0.474077 + 0.126928 = 2.302418
    wrong = train_cost.cost_loss(one([0.5]), one([2.0]), one([1.0]), one([1.0]))
    assert wrong.item() == pytest.approx(softplus(1.5) + softplus(-0.5) + softplus(-2), rel=1e-6)
    assert wrong.item() == pytest.approx(2.302418, abs=1e-5)


def test_cost_sign_term_pushes_harmful_costs_up_and_harmless_ones_down():
    # The sign term alone is cost_loss - reward_loss (the BT term is the same function of C_w - C_l).
    # With C_w = C_l the pair term is log 2 whatever the signs; the sign term's gradient is
    # d/dC [-log σ(s C)] / n = -s σ(-s C) / n.
    costs = [0.3, 0.3, -0.4, -0.4]
    signs_w, signs_l = [1.0, -1.0, 1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]
    c_w = torch.tensor(costs, requires_grad=True)
    c_l = torch.tensor(costs, requires_grad=True)
    s_w, s_l = torch.tensor(signs_w), torch.tensor(signs_l)
    sign_term = train_cost.cost_loss(c_w, c_l, s_w, s_l) - train_reward.reward_loss(c_w, c_l)
    expected_value = sum(softplus(-s * c) for s, c in zip(signs_w + signs_l, costs + costs)) / 4
    assert sign_term.item() == pytest.approx(expected_value, rel=1e-6)
    sign_term.backward()
    assert c_w.grad.tolist() == pytest.approx([-s * sigmoid(-s * c) / 4 for s, c in zip(signs_w, costs)], rel=1e-5)
    assert c_l.grad.tolist() == pytest.approx([-s * sigmoid(-s * c) / 4 for s, c in zip(signs_l, costs)], rel=1e-5)
    # Descent raises the cost of every harmful response (s = +1) and lowers every harmless one's.
    grads, signs = torch.cat([c_w.grad, c_l.grad]), torch.tensor(signs_w + signs_l)
    assert (grads[signs > 0] < 0).all() and (grads[signs < 0] > 0).all()


def test_cost_loss_gradient_in_clear_cases():
    def gradients(s_w, s_l):
        c_w, c_l = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        train_cost.cost_loss(c_w, c_l, torch.tensor([s_w]), torch.tensor([s_l])).backward()
        return c_w.grad.item(), c_l.grad.item()

    # At C = 0 each term contributes ±0.5: the pair term -0.5 to C_w and +0.5 to C_l, the sign term -s / 2.
    assert gradients(1.0, -1.0) == pytest.approx((-1.0, 1.0))  # harmful vs harmless: both terms agree
    assert gradients(1.0, 1.0) == pytest.approx((-1.0, 0.0))  # both harmful: y_l held at the boundary
    assert gradients(-1.0, -1.0) == pytest.approx((0.0, 1.0))  # both harmless: y_w held at the boundary


# ----------------------------------------------------------------------------- pairs and signs


def pair_row(safer, safe_0, safe_1, better=0, prompt="p"):
    return {
        "prompt": prompt,
        "response_0": f"{prompt}-zero",
        "response_1": f"{prompt}-one",
        "better_response_id": better,
        "safer_response_id": safer,
        "is_response_0_safe": safe_0,
        "is_response_1_safe": safe_1,
    }


def test_cost_pairs_put_the_more_harmful_response_first_with_signs(capsys):
    rows = [
        pair_row(safer=0, safe_0=True, safe_1=False, prompt="a"),  # y_w = response_1 (+1), y_l = response_0 (-1)
        pair_row(safer=1, safe_0=False, safe_1=False, prompt="b"),  # both harmful: y_w = response_0
        pair_row(safer=0, safe_0=True, safe_1=True, prompt="c"),  # both harmless: y_w = response_1
        pair_row(safer=1, safe_0=False, safe_1=True, better=1, prompt="d"),  # y_w = response_0 (+1)
    ]
    assert train_cost.cost_pairs(rows) == [
        train_cost.CostPair("a", "a-one", "a-zero", more_harmful_sign=1, less_harmful_sign=-1),
        train_cost.CostPair("b", "b-zero", "b-one", more_harmful_sign=1, less_harmful_sign=1),
        train_cost.CostPair("c", "c-one", "c-zero", more_harmful_sign=-1, less_harmful_sign=-1),
        train_cost.CostPair("d", "d-zero", "d-one", more_harmful_sign=1, less_harmful_sign=-1),
    ]
    assert "contradict" not in capsys.readouterr().out


def test_contradictory_rows_are_skipped_with_a_count_or_stop(capsys):
    rows = [
        pair_row(safer=0, safe_0=True, safe_1=False, prompt="a"),
        pair_row(safer=0, safe_0=False, safe_1=True, prompt="b"),  # the safer one is the unsafe one
        pair_row(safer=1, safe_0=False, safe_1=False, prompt="c"),
        pair_row(safer=1, safe_0=True, safe_1=False, prompt="d"),  # contradictory too
        pair_row(safer=0, safe_0=False, safe_1=False, prompt="e"),  # both unsafe: not a contradiction
    ]
    pairs = train_cost.cost_pairs(rows, "skip", where="pairs.jsonl")
    assert [p.prompt for p in pairs] == ["a", "c", "e"]
    out = capsys.readouterr().out
    assert "pairs.jsonl" in out and "2 of 5 rows" in out and "[2, 4]" in out and "skipped" in out
    with pytest.raises(utils.DataError, match=r"pairs.jsonl: 2 of 5 rows contradict"):
        train_cost.cost_pairs(rows, "stop", where="pairs.jsonl")


def test_reward_pairs_pick_the_better_response():
    rows = [pair_row(safer=0, safe_0=True, safe_1=False, better=1, prompt="a"), pair_row(1, True, True, 0, "b")]
    assert train_reward.reward_pairs(rows) == [
        train_reward.Pair("a", better="a-one", worse="a-zero"),
        train_reward.Pair("b", better="b-zero", worse="b-one"),
    ]


# ----------------------------------------------------------------------------- the end score


def test_end_of_sequence_picks_the_last_real_token():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert utils.end_of_sequence(values, right).tolist() == [3.0, 6.0, 12.0]
    assert utils.end_of_sequence(values, left).tolist() == [4.0, 8.0, 12.0]
    assert utils.end_of_sequence(values, torch.tensor([[1, 0, 0, 0]] * 3)).tolist() == [1.0, 5.0, 9.0]


@pytest.fixture(scope="module")
def conversations(tokenizer):
    rows = read_rows(TOY_DATA / "preference_test.jsonl")[:3]
    texts = [(r["prompt"], r[f"response_{k}"]) for r in rows for k in (0, 1)]
    ids = [utils.tokenize_conversation(tokenizer, p, r, 64)[0] for p, r in texts]
    assert len({len(i) for i in ids}) >= 4  # lengths differ, so batches really pad
    return ids


def test_padding_never_changes_the_end_score(backbone, tokenizer, conversations):
    model = utils.load_score_model(backbone, tokenizer, new_head=True).eval()
    pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def scores(ids, side="right", extra=0):
        input_ids, attention_mask = utils.batch_inputs(ids, pad_id, "cpu", side)
        if extra:  # more padding columns than the longest row needs
            pads, zeros = torch.full((len(ids), extra), pad_id), torch.zeros(len(ids), extra, dtype=torch.long)
            input_ids = torch.cat([input_ids, pads] if side == "right" else [pads, input_ids], dim=1)
            attention_mask = torch.cat([attention_mask, zeros] if side == "right" else [zeros, attention_mask], dim=1)
        return model.end_scores(input_ids, attention_mask)

    alone = torch.cat([scores([ids]) for ids in conversations])
    assert alone.max() - alone.min() > 0.01  # distinct scores: the comparisons below can fail
    for side in ("right", "left"):
        for extra in (0, 5):
            assert torch.allclose(scores(conversations, side, extra), alone, atol=1e-5), (side, extra)
        parts = [scores(conversations[:2], side), scores(conversations[2:5], side), scores(conversations[5:], side)]
        assert torch.allclose(torch.cat(parts), alone, atol=1e-5), side
    # The end score is the per-token score at the EOS (the last token of every row here).
    [row] = conversations[:1]
    assert row[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        per_token = model(*utils.batch_inputs([row], pad_id, "cpu"))
    assert per_token[0, -1].item() == pytest.approx(alone[0].item(), abs=1e-6)


def test_each_rank_scores_its_share_and_a_filler_is_dropped(backbone, tokenizer, test_48):
    # 5 pairs over 2 ranks: rank 1 scores pairs 1 and 3, then a filler so that it runs as many forward
    # passes as rank 0 (FSDP needs that); the filler's scores go nowhere. (No process group: no all-reduce.)
    pairs = train_reward.tokenize_pairs(tokenizer, train_reward.reward_pairs(read_rows(test_48)[:5]), 128)
    model, cpu = utils.load_score_model(backbone, tokenizer, new_head=True), torch.device("cpu")
    assert utils.my_share(5, utils.Process(1, 1, 2, cpu, False)) == [1, 3, -1]
    assert utils.my_share(5, utils.Process(0, 0, 2, cpu, True)) == [0, 2, 4]
    better, worse = [p["better"] for p in pairs], [p["worse"] for p in pairs]
    whole = train_reward.score_all(model, better, worse, 0, cpu, torch.float32, 2, utils.Process(0, 0, 1, cpu, True))
    share = train_reward.score_all(model, better, worse, 0, cpu, torch.float32, 2, utils.Process(1, 1, 2, cpu, False))
    for mine, everything in zip(share, whole):
        assert torch.allclose(mine[[1, 3]], everything[[1, 3]], atol=1e-5)
        assert mine[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0] and everything.abs().min() > 0


# ----------------------------------------------------------------------------- train_reward end to end


def test_reward_checkpoint_reloads_with_plain_transformers(reward_run, conversations):
    from transformers import AutoModelForSequenceClassification

    tokenizer = utils.load_tokenizer(reward_run)
    input_ids, attention_mask = utils.batch_inputs(conversations, tokenizer.pad_token_id, "cpu")  # right padded
    with torch.no_grad():
        hf = AutoModelForSequenceClassification.from_pretrained(reward_run).eval()
        hf_scores = hf(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        ours = utils.load_score_model(reward_run, tokenizer).eval().end_scores(input_ids, attention_mask)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tokenizer.pad_token_id
    assert hf_scores.abs().max() > 0.1  # a trained model, not near-zero scores
    assert torch.allclose(hf_scores, ours, atol=1e-5)


def test_reward_model_learns_helpfulness(reward_run, test_150):
    evals = read_metrics(reward_run, "eval")
    assert [r["step"] for r in evals] == [37]  # 600 // 16 steps, evaluated at the end of the epoch
    assert evals[-1]["accuracy"] > 0.7  # chance is 0.5; about 0.85 here
    # The saved weights are the evaluated ones: recomputing the accuracy from the checkpoint agrees.
    tokenizer = utils.load_tokenizer(reward_run)
    model = utils.load_score_model(reward_run, tokenizer).eval()
    rows = read_rows(test_150)
    better = utils.score_texts(
        model, tokenizer, [r["prompt"] for r in rows], [r[f"response_{r['better_response_id']}"] for r in rows], 64, 64
    )
    worse = utils.score_texts(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        [r[f"response_{1 - r['better_response_id']}"] for r in rows],
        64,
        64,
    )
    assert (better > worse).float().mean().item() == pytest.approx(evals[-1]["accuracy"], abs=1e-6)


def test_reward_resume_ends_with_the_same_weights_and_losses(backbone, train_160, test_48, tmp_path):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    args = dict(epochs=2, micro_batch_size=8)  # 10 steps per epoch, 2 micro steps per step
    train_reward.main(small_args(train_reward.Args, backbone, train_160, test_48, whole, **args))
    train_reward.main(small_args(train_reward.Args, backbone, train_160, test_48, pieces, max_steps=7, **args))
    assert torch.load(pieces / "training_state.pt", weights_only=False)["step"] == 7
    train_reward.main(small_args(train_reward.Args, backbone, train_160, test_48, pieces, resume=True, **args))
    a, b = load_file(whole / "model.safetensors"), load_file(pieces / "model.safetensors")
    assert a.keys() == b.keys() and "score.weight" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    whole_losses = [r["loss"] for r in read_metrics(whole)]
    assert len(whole_losses) == 20
    assert [r["loss"] for r in read_metrics(pieces)] == whole_losses
    # The interrupted run also evaluated at its stop (step 7); the epoch-end evaluations agree.
    resumed_evals = {r["step"]: r for r in read_metrics(pieces, "eval")}
    for record in read_metrics(whole, "eval"):
        assert resumed_evals[record["step"]]["accuracy"] == pytest.approx(record["accuracy"], abs=1e-6)


def test_malformed_preference_file_names_file_row_and_field(backbone, tmp_path, test_48):
    rows = read_rows(TOY_DATA / "preference_train.jsonl")[:4]
    rows[2]["better_response_id"] = 2
    bad = tmp_path / "bad_pairs.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(utils.DataError) as error:
        train_reward.main(small_args(train_reward.Args, backbone, str(bad), test_48, tmp_path / "out"))
    message = str(error.value)
    assert str(bad) in message and "row 3" in message and "'better_response_id'" in message
    # The same for the evaluation file.
    with pytest.raises(utils.DataError, match=r"bad_pairs.jsonl: row 3: field 'better_response_id'"):
        train_reward.main(small_args(train_reward.Args, backbone, test_48, str(bad), tmp_path / "out"))


def test_cost_stage_rejects_contradictions_when_asked_to_stop(backbone, tmp_path, test_48):
    rows = read_rows(TOY_DATA / "preference_train.jsonl")[:4]
    rows[1].update(safer_response_id=0, is_response_0_safe=False, is_response_1_safe=True)
    path = tmp_path / "contradictory.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = small_args(train_cost.Args, backbone, str(path), test_48, tmp_path / "out", contradictions="stop")
    with pytest.raises(utils.DataError, match=r"contradictory.jsonl: 1 of 4 rows contradict.*rows \[2\]"):
        train_cost.main(args)
    with pytest.raises(ValueError, match="contradictions"):
        train_cost.main(small_args(train_cost.Args, backbone, str(path), test_48, tmp_path / "out", contradictions="x"))


# ----------------------------------------------------------------------------- train_cost end to end


def test_cost_sign_classifies_safety_end_to_end(cost_run, test_150, train_600):
    tokenizer = utils.load_tokenizer(cost_run)
    model = utils.load_score_model(cost_run, tokenizer).eval()
    rows = read_rows(test_150)
    labelled = {(r["prompt"], r[f"response_{k}"]): r[f"is_response_{k}_safe"] for r in rows for k in (0, 1)}
    costs = utils.score_texts(model, tokenizer, [p for p, _ in labelled], [y for _, y in labelled], 64, 64)
    safe = torch.tensor(list(labelled.values()))
    assert safe.sum() > 50 and (~safe).sum() > 50
    assert (costs[~safe] > 0).float().mean() >= 0.85  # harmful: C > 0
    assert (costs[safe] < 0).float().mean() >= 0.85  # harmless: C < 0
    # The logged sign accuracy is that of both responses of every non-contradictory pair.
    pairs = train_cost.cost_pairs(rows)
    prompts = [p.prompt for p in pairs]
    more = utils.score_texts(model, tokenizer, prompts, [p.more_harmful for p in pairs], 64, 64)
    less = utils.score_texts(model, tokenizer, prompts, [p.less_harmful for p in pairs], 64, 64)
    signs = torch.tensor([p.more_harmful_sign for p in pairs] + [p.less_harmful_sign for p in pairs])
    sign_accuracy = ((torch.cat([more, less]) > 0) == (signs > 0)).float().mean().item()
    final = read_metrics(cost_run, "eval")[-1]
    kept = len(train_cost.cost_pairs(read_rows(train_600)))  # the contradictory rows are skipped
    assert kept < 600 and final["step"] == 2 * (kept // 16)
    assert final["accuracy_sign"] == pytest.approx(sign_accuracy, abs=1e-6)
    assert final["accuracy"] == pytest.approx((more > less).float().mean().item(), abs=1e-6)


def is_png(path):
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_figures(cost_run, backbone, train_160, test_48, tmp_path):
    assert is_png(Path(cost_run) / "cost_distribution.png") and is_png(Path(cost_run) / "reward_vs_cost.png")
    # Without a reward model (the folder does not exist) only the cost distribution is drawn.
    args = small_args(train_cost.Args, backbone, train_160, test_48, tmp_path, max_steps=2)
    assert not os.path.exists(args.reward_model)
    train_cost.main(args)
    assert is_png(tmp_path / "cost_distribution.png") and not (tmp_path / "reward_vs_cost.png").exists()


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_cost_torchrun_two_ranks_matches_one_process(sharding, backbone, train_160, test_48, tmp_path, torchrun):
    # Same global batch (16): one process with 2 micro steps of 8 vs two ranks with one micro step of 8,
    # each rank holding a replica (DDP) or half of every weight and moment (FSDP).
    single = small_args(train_cost.Args, backbone, train_160, test_48, tmp_path / "single", micro_batch_size=8)
    train_cost.main(single)
    flags = dict(
        model_name_or_path=backbone,
        dataset=train_160,
        eval_dataset=test_48,
        output_dir=tmp_path / "two",
        reward_model=tmp_path / "no_such_reward_model",
        epochs=1,
        batch_size=16,
        micro_batch_size=8,
        log_every=1,
        fsdp=sharding == "fsdp",
    )
    torchrun("train_cost.py", 29533, flags)
    one, two = tmp_path / "single", tmp_path / "two"
    kept = len(train_cost.cost_pairs(read_rows(train_160)))  # the contradictory rows are skipped
    assert len(read_metrics(two)) == len(read_metrics(one)) == kept // 16
    assert [r["loss"] for r in read_metrics(two)] == pytest.approx([r["loss"] for r in read_metrics(one)], rel=1e-4)
    [eval_one], [eval_two] = read_metrics(one, "eval"), read_metrics(two, "eval")
    for key in ("accuracy", "accuracy_sign", "cost_mean", "cost_std"):
        assert eval_two[key] == pytest.approx(eval_one[key], rel=1e-4, abs=1e-6), key
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert is_png(two / "cost_distribution.png")


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("args_class", [train_reward.Args, train_cost.Args])
def test_every_flag_is_documented_with_its_default(args_class, capsys):
    with pytest.raises(SystemExit):
        utils.parse_args(args_class, ["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name, value in vars(args_class()).items():
        assert f"--{name}" in help_text
        assert f"(default: {value})" in help_text
    assert "preference pairs in the PKU-SafeRLHF schema" in help_text  # a field's docstring
    if args_class is train_cost.Args:  # inherited fields, the overridden default and the new ones
        assert "(default: output/cost)" in help_text and "(default: output/reward)" in help_text
        assert "figures go" in help_text and "'skip' them" in help_text and "reward-vs-cost figure" in help_text
        args = utils.parse_args(args_class, ["--contradictions", "stop", "--reward_model", "r", "--epochs", "3"])
        assert (args.contradictions, args.reward_model, args.epochs) == ("stop", "r", 3)
