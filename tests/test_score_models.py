"""Reward and cost models: the losses of eqs. 5-6 by hand, pairs and signs, the end score, and the
stages end to end on small slices of the toy preference data (learning, checkpoints, --resume, the
cost model's figure, torchrun).

The backbone is conftest's seeded, randomly initialised toy causal LM (tiny_models/sft; no SFT run here).
"""

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, torchrun
from filelock import FileLock
from safetensors.torch import load_file

import evaluate
import train_cost
import train_reward
import utils

TOY_DATA = ROOT / "toy_world" / "data"
MAX_LENGTH = train_reward.Args.max_length  # the stages' default (128): a test that rescores uses the same cut


def softplus(x):
    """-log σ(-x) = log(1 + e^x), the value of each term of the losses."""
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def backbone(tiny_models):
    """A seeded random toy causal LM saved as a checkpoint: stands in for output/sft."""
    return str(tiny_models / "sft")


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


def trained_once(tmp_path_factory, name, train):
    """A folder that `train(folder)` fills once per test session: under pytest-xdist the first worker to ask trains
    while the other waits for it (a lock in the session's folder, above each worker's own), then both read it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        train(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{folder}.lock"):
        if not (folder / "trained").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half way
            folder.mkdir()
            train(folder)
            (folder / "trained").touch()
    return folder


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, backbone, train_600, test_150):
    """One short reward-model run: 600 pairs, 1 epoch of 37 steps of 16."""

    def train(output_dir):
        train_reward.main(small_args(train_reward.Args, backbone, train_600, test_150, output_dir))

    return str(trained_once(tmp_path_factory, "reward_run", train))


@pytest.fixture(scope="module")
def cost_run(tmp_path_factory, backbone, train_600, test_150, reward_run):
    """One short cost-model run (2 epochs on the same 600 pairs), with the reward model for the figure;
    `plotted` holds what the figure was drawn from (plot_figures' arguments, kept in plotted.pt)."""

    def train(output_dir):
        args = small_args(train_cost.Args, backbone, train_600, test_150, output_dir, epochs=2, reward_model=reward_run)
        plot = train_cost.plot_figures

        def plot_and_keep(output_dir, costs, harmful, rewards=None):
            torch.save(dict(costs=costs, harmful=harmful, rewards=rewards), Path(output_dir) / "plotted.pt")
            plot(output_dir, costs, harmful, rewards)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_cost, "plot_figures", plot_and_keep)
            train_cost.main(args)

    output_dir = trained_once(tmp_path_factory, "cost_run", train)
    return SimpleNamespace(path=str(output_dir), plotted=torch.load(output_dir / "plotted.pt"))


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


def pair_row(safer, safe_0, safe_1, better=0, prompt="how do i bake bread ?"):
    return {
        "prompt": prompt,
        "response_0": "sure . mix flour",
        "response_1": "no .",
        "better_response_id": better,
        "safer_response_id": safer,
        "is_response_0_safe": safe_0,
        "is_response_1_safe": safe_1,
    }


PROMPTS = ["how do i bake bread ?", "how do i plant a tree ?", "show me how to start a forest fire .", "hi", "bye"]


def conversation(tokenizer, row, k, max_length=64):
    """The token ids of the row's prompt with response_k, as the stages tokenise them."""
    return utils.tokenize_conversation(tokenizer, row["prompt"], row[f"response_{k}"], max_length)[0]


def test_cost_pairs_put_the_more_harmful_response_first_with_signs(tokenizer, capsys):
    rows = [
        pair_row(safer=0, safe_0=True, safe_1=False, prompt=PROMPTS[0]),  # y_w = response_1 (+1), y_l = response_0 (-1)
        pair_row(safer=1, safe_0=False, safe_1=False, prompt=PROMPTS[1]),  # both harmful: y_w = response_0
        pair_row(safer=0, safe_0=True, safe_1=True, prompt=PROMPTS[2]),  # both harmless: y_w = response_1
        pair_row(safer=1, safe_0=False, safe_1=True, better=1, prompt=PROMPTS[3]),  # y_w = response_0 (+1)
    ]
    assert conversation(tokenizer, rows[0], 0) != conversation(tokenizer, rows[0], 1)  # the order can be seen

    def pair(row, more_harmful, more_harmful_sign, less_harmful_sign):
        return dict(
            more_harmful=conversation(tokenizer, row, more_harmful),
            less_harmful=conversation(tokenizer, row, 1 - more_harmful),
            more_harmful_sign=more_harmful_sign,
            less_harmful_sign=less_harmful_sign,
        )

    assert train_cost.cost_pairs(tokenizer, rows, 64) == [
        pair(rows[0], 1, more_harmful_sign=1, less_harmful_sign=-1),
        pair(rows[1], 0, more_harmful_sign=1, less_harmful_sign=1),
        pair(rows[2], 1, more_harmful_sign=-1, less_harmful_sign=-1),
        pair(rows[3], 0, more_harmful_sign=1, less_harmful_sign=-1),
    ]
    assert "contradict" not in capsys.readouterr().out
    # Each conversation is cut at max_length, as the stage's flag says (the EOS goes with the cut).
    short = train_cost.cost_pairs(tokenizer, rows, 8)
    assert [len(p[k]) for p in short for k in ("more_harmful", "less_harmful")] == [8] * 8
    assert short[0]["more_harmful"] == conversation(tokenizer, rows[0], 1)[:8]


def test_contradictory_rows_are_skipped_with_a_count_or_stop(tokenizer, capsys):
    """The skip branch (which rows are kept, the count on the console) in-process; the stop branch's message is
    checked here once, test_faults runs it as a command."""
    rows = [
        pair_row(safer=0, safe_0=True, safe_1=False, prompt=PROMPTS[0]),
        pair_row(safer=0, safe_0=False, safe_1=True, prompt=PROMPTS[1]),  # the safer one is the unsafe one
        pair_row(safer=1, safe_0=False, safe_1=False, prompt=PROMPTS[2]),
        pair_row(safer=1, safe_0=True, safe_1=False, prompt=PROMPTS[3]),  # contradictory too
        pair_row(safer=0, safe_0=False, safe_1=False, prompt=PROMPTS[4]),  # both unsafe: not a contradiction
    ]
    pairs = train_cost.cost_pairs(tokenizer, rows, 64, "skip", where="pairs.jsonl")
    kept = [rows[i] for i in (0, 2, 4)]
    both = [sorted([conversation(tokenizer, row, 0), conversation(tokenizer, row, 1)]) for row in kept]
    assert [sorted([p["more_harmful"], p["less_harmful"]]) for p in pairs] == both
    out = capsys.readouterr().out
    assert "pairs.jsonl" in out and "2 of 5 rows" in out and "[2, 4]" in out and "skipped" in out
    with pytest.raises(utils.UserError, match=r"pairs.jsonl: 2 of 5 rows contradict.*rows \[2, 4\]"):
        train_cost.cost_pairs(tokenizer, rows, 64, "stop", where="pairs.jsonl")


def test_reward_pairs_pick_the_better_response(tokenizer):
    rows = [pair_row(0, True, False, better=1, prompt=PROMPTS[0]), pair_row(1, True, True, better=0, prompt=PROMPTS[1])]
    assert train_reward.reward_pairs(tokenizer, rows, 64) == [
        {"better": conversation(tokenizer, rows[0], 1), "worse": conversation(tokenizer, rows[0], 0)},
        {"better": conversation(tokenizer, rows[1], 0), "worse": conversation(tokenizer, rows[1], 1)},
    ]
    short = train_reward.reward_pairs(tokenizer, rows, 8)
    assert short[0] == {
        "better": conversation(tokenizer, rows[0], 1)[:8],
        "worse": conversation(tokenizer, rows[0], 0)[:8],
    }


# ----------------------------------------------------------------------------- the end score


class TokenIdScorer(torch.nn.Module):
    """A stand-in transformers model for ScoreModel whose score at a token is the token's id (its hidden state is
    the id, its head the identity); it keeps the position ids it was given."""

    score = torch.nn.Identity()

    def base_model(self, input_ids, attention_mask, position_ids):
        self.position_ids = position_ids
        return SimpleNamespace(last_hidden_state=input_ids[..., None].float())  # (B, T, 1)


def test_the_end_score_is_read_at_the_last_real_token_on_either_side():
    scorer = utils.ScoreModel(TokenIdScorer())
    pad = 0
    # Three rows of ids 1-3, 5-6 and 9-12: the last real tokens are 3, 6 and 12 however the rows are padded.
    right_ids = torch.tensor([[1, 2, 3, pad], [5, 6, pad, pad], [9, 10, 11, 12]])
    right_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    left_ids = torch.tensor([[pad, 1, 2, 3], [pad, pad, 5, 6], [9, 10, 11, 12]])
    left_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert scorer(right_ids, right_mask, end=True).tolist() == [3.0, 6.0, 12.0]
    assert scorer(left_ids, left_mask, end=True).tolist() == [3.0, 6.0, 12.0]
    # Without `end`, every token's score (a critic's values); left padding shifts the positions, so that a row's
    # first real token is at position 0 on either side.
    assert scorer(left_ids, left_mask).tolist() == left_ids.float().tolist()
    assert scorer.model.position_ids.tolist() == [[0, 0, 1, 2], [0, 0, 0, 1], [0, 1, 2, 3]]
    # A row of one token: its score, on either side.
    one = torch.tensor([[7, pad, pad], [pad, pad, 8]])
    assert scorer(one, (one != pad).long(), end=True).tolist() == [7.0, 8.0]


@pytest.fixture(scope="module")
def conversations(tokenizer):
    rows = read_rows(TOY_DATA / "preference_test.jsonl")[:3]
    texts = [(r["prompt"], r[f"response_{k}"]) for r in rows for k in (0, 1)]
    ids = [utils.tokenize_conversation(tokenizer, p, r, 64)[0] for p, r in texts]
    assert len({len(i) for i in ids}) >= 4  # lengths differ, so batches really pad
    return ids


def test_padding_never_changes_the_end_score(backbone, tokenizer, conversations):
    torch.manual_seed(0)
    model = utils.load_model(backbone, tokenizer, score=True, new_head=True).eval()
    pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def scores(ids, side="right", extra=0):
        input_ids, attention_mask = utils.batch_inputs(ids, pad_id, "cpu", side)
        if extra:  # more padding columns than the longest row needs
            pads, zeros = torch.full((len(ids), extra), pad_id), torch.zeros(len(ids), extra, dtype=torch.long)
            input_ids = torch.cat([input_ids, pads] if side == "right" else [pads, input_ids], dim=1)
            attention_mask = torch.cat([attention_mask, zeros] if side == "right" else [zeros, attention_mask], dim=1)
        return model(input_ids, attention_mask, end=True)

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
    pairs = train_reward.reward_pairs(tokenizer, read_rows(test_48)[:5], 128)
    model, cpu = utils.load_model(backbone, tokenizer, score=True, new_head=True), torch.device("cpu")

    def process(rank, world_size):
        return utils.Process(rank, world_size, cpu, rank == 0, torch.float32, contextlib.nullcontext)

    better, worse = [p["better"] for p in pairs], [p["worse"] for p in pairs]
    whole = train_reward.score_all(model, better, worse, tokenizer, 2, process(0, 1))
    share = train_reward.score_all(model, better, worse, tokenizer, 2, process(1, 2))  # passes [1, 3] and [filler]
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
        ours = utils.load_model(reward_run, tokenizer, score=True).eval()(input_ids, attention_mask, end=True)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tokenizer.pad_token_id
    assert hf_scores.abs().max() > 0.1  # a trained model, not near-zero scores
    assert torch.allclose(hf_scores, ours, atol=1e-5)


def test_reward_model_learns_helpfulness(reward_run, test_150):
    evals = read_metrics(reward_run, "eval")
    assert [r["step"] for r in evals] == [37]  # 600 // 16 steps, evaluated at the end of the epoch
    assert evals[-1]["accuracy"] > 0.7  # chance is 0.5; 0.81 here
    # The saved weights are the evaluated ones: recomputing the accuracy from the checkpoint agrees.
    tokenizer = utils.load_tokenizer(reward_run)
    model = utils.load_model(reward_run, tokenizer, score=True).eval()
    rows = read_rows(test_150)
    prompts = [r["prompt"] for r in rows]
    with torch.no_grad():
        better = evaluate.score_texts(
            model, tokenizer, prompts, [r[f"response_{r['better_response_id']}"] for r in rows], MAX_LENGTH
        )
        worse = evaluate.score_texts(
            model, tokenizer, prompts, [r[f"response_{1 - r['better_response_id']}"] for r in rows], MAX_LENGTH
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


def test_a_malformed_eval_file_names_file_row_and_field(backbone, tmp_path, train_160):
    """The evaluation file is checked like the training file (test_faults checks --dataset as a command)."""
    rows = read_rows(TOY_DATA / "preference_train.jsonl")[:4]
    rows[2]["better_response_id"] = 2
    bad = tmp_path / "bad_pairs.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(utils.UserError, match=r"bad_pairs.jsonl: row 3: field 'better_response_id': must be 0 or 1"):
        train_reward.main(small_args(train_reward.Args, backbone, train_160, str(bad), tmp_path / "out"))


# ----------------------------------------------------------------------------- train_cost end to end


def test_cost_sign_classifies_safety_end_to_end(cost_run, test_150, train_600, tokenizer):
    model = utils.load_model(cost_run.path, utils.load_tokenizer(cost_run.path), score=True).eval()
    rows = read_rows(test_150)
    prompts = [r["prompt"] for r in rows]
    with torch.no_grad():  # the cost of both responses of every row, (N, 2), and their labels
        costs = torch.stack(
            [
                evaluate.score_texts(model, tokenizer, prompts, [r[f"response_{k}"] for r in rows], MAX_LENGTH)
                for k in (0, 1)
            ],
            dim=1,
        )
    safe = torch.tensor([[r["is_response_0_safe"], r["is_response_1_safe"]] for r in rows])
    assert safe.sum() > 50 and (~safe).sum() > 50
    assert (costs[~safe] > 0).float().mean() >= 0.85  # harmful: C > 0 (0.98 here; 0.89 after one epoch)
    assert (costs[safe] < 0).float().mean() >= 0.85  # harmless: C < 0 (0.96 here; 0.85 after one epoch)
    # The logged accuracies are those of the rows that do not contradict themselves (the safer one labelled
    # unsafe and the other safe): C(y_w) > C(y_l) for the pair, and the sign of C for both responses.
    safer = torch.tensor([r["safer_response_id"] for r in rows])
    index = torch.arange(len(rows))
    kept = ~(~safe[index, safer] & safe[index, 1 - safer])
    assert 0 < (~kept).sum() < 15  # there are some, a few
    more, less = costs[index, 1 - safer][kept], costs[index, safer][kept]
    harmful = torch.cat([~safe[index, 1 - safer][kept], ~safe[index, safer][kept]])
    sign_accuracy = ((torch.cat([more, less]) > 0) == harmful).float().mean().item()
    final = read_metrics(cost_run.path, "eval")[-1]
    n_train = len(train_cost.cost_pairs(tokenizer, read_rows(train_600), MAX_LENGTH))  # contradictions skipped
    assert n_train < 600 and final["step"] == 2 * (n_train // 16)
    assert final["accuracy_sign"] == pytest.approx(sign_accuracy, abs=1e-6)
    assert final["accuracy"] == pytest.approx((more > less).float().mean().item(), abs=1e-6)
    # The figure shows these costs, y_w's then y_l's, with these labels.
    assert torch.allclose(cost_run.plotted["costs"], torch.cat([more, less]), atol=1e-5)
    assert torch.equal(cost_run.plotted["harmful"], harmful)


def png_size(path):
    """(width, height) in pixels of a PNG file (its IHDR chunk), after checking that it is one."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def train_cost_contradicts(row):
    """A row whose safer response is labelled unsafe and the other safe (train_cost skips it)."""
    safer = row["safer_response_id"]
    return not row[f"is_response_{safer}_safe"] and row[f"is_response_{1 - safer}_safe"]


def test_cost_figure_has_reward_vs_cost_with_a_reward_model(cost_run, reward_run, test_150, tokenizer):
    """cost_model.png: the cost distribution, and beside it (a figure twice as wide: 11 in. instead of 6 at 120
    dpi) reward vs cost, each response's reward from --reward_model."""
    assert [f for f in os.listdir(cost_run.path) if f.endswith(".png")] == ["cost_model.png"]
    assert png_size(Path(cost_run.path) / "cost_model.png") == (1320, 540)
    reward_model = utils.load_model(reward_run, tokenizer, score=True).eval()
    rows = [r for r in read_rows(test_150) if not train_cost_contradicts(r)]
    more = [r[f"response_{1 - r['safer_response_id']}"] for r in rows]
    less = [r[f"response_{r['safer_response_id']}"] for r in rows]
    prompts = [r["prompt"] for r in rows]
    with torch.no_grad():
        rewards = torch.cat(
            [evaluate.score_texts(reward_model, tokenizer, prompts, y, MAX_LENGTH) for y in (more, less)]
        )
    assert torch.allclose(cost_run.plotted["rewards"], rewards, atol=1e-5)
    assert len(rewards) == len(cost_run.plotted["costs"])


# What the torchrun launch runs: several runs of a stage, one after another in the same ranks. The first run's
# process group serves the next ones.
RUNS = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import {stage}

for i, flags in enumerate(json.loads(sys.argv[1])):
    if i:
        dist.init_process_group = lambda *args, **kwargs: None  # already joined
    {stage}.main({stage}.Args(**flags))
dist.barrier()
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)  # as utils.run: no teardown with the process group alive
"""


def torchrun_runs(tmp_path, stage, runs, nproc=2):
    """One `torchrun --nproc_per_node=N` launch that runs `stage` with each of `runs` (flag dicts) in turn."""
    script = tmp_path / f"runs_of_{stage}.py"
    script.write_text(RUNS.format(root=str(ROOT), stage=stage))
    torchrun(script, json.dumps(runs, default=str), nproc=nproc)


def test_cost_torchrun_two_ranks_ddp_and_fsdp_match_one_process(
    backbone, tiny_models, tokenizer, train_160, test_48, tmp_path
):
    """Same global batch (16): one process with 2 micro steps of 8 vs two ranks with one micro step of 8, each
    rank holding a replica (DDP) or half of every weight and moment (FSDP), in one launch. The figure: with no
    reward model (the folder does not exist), or one whose tokenizer is not the cost model's, only the cost
    distribution (6 in. wide); under FSDP the reward model (tiny_models/reward) is sharded too and scores."""
    single = small_args(train_cost.Args, backbone, train_160, test_48, tmp_path / "single", micro_batch_size=8)
    train_cost.main(single)
    other_tokenizer = tmp_path / "other_tokenizer"
    other = utils.load_tokenizer(backbone)
    other.add_tokens(["zzzq"])  # one more token: another vocabulary
    other.save_pretrained(other_tokenizer)
    ddp = dict(vars(single), output_dir=str(tmp_path / "ddp"), reward_model=str(other_tokenizer))
    fsdp = dict(vars(single), output_dir=str(tmp_path / "fsdp"), reward_model=str(tiny_models / "reward"), fsdp=True)
    torchrun_runs(tmp_path, "train_cost", [ddp, fsdp])
    one = tmp_path / "single"
    kept = len(train_cost.cost_pairs(tokenizer, read_rows(train_160), MAX_LENGTH))  # contradictions skipped
    assert len(read_metrics(one)) == kept // 16 == 9
    for two in (tmp_path / "ddp", tmp_path / "fsdp"):
        assert [r["loss"] for r in read_metrics(two)] == pytest.approx([r["loss"] for r in read_metrics(one)], rel=1e-4)
        [eval_one], [eval_two] = read_metrics(one, "eval"), read_metrics(two, "eval")
        for key in ("accuracy", "accuracy_sign", "cost_mean", "cost_std"):
            assert eval_two[key] == pytest.approx(eval_one[key], rel=1e-4, abs=1e-6), (two, key)
        a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5), (two, name)
    assert png_size(one / "cost_model.png") == png_size(tmp_path / "ddp" / "cost_model.png") == (720, 540)
    assert png_size(tmp_path / "fsdp" / "cost_model.png") == (1320, 540)


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
    if args_class is train_cost.Args:  # the defaults and fields of its own
        assert "(default: output/cost)" in help_text and "(default: output/reward)" in help_text
        assert "figures go" in help_text and "'skip' them" in help_text and "reward-vs-cost figure" in help_text
        args = utils.parse_args(args_class, ["--contradictions", "stop", "--reward_model", "r", "--epochs", "3"])
        assert (args.contradictions, args.reward_model, args.epochs) == ("stop", "r", 3)
        with pytest.raises(utils.UserError, match="--contradictions: invalid choice: 'x'"):
            utils.parse_args(args_class, ["--contradictions", "x"])
