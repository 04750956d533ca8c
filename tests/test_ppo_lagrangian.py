"""PPO-Lagrangian: every equation against hand-computed numbers, the masks, and short end-to-end runs."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import ppo_lagrangian as ppo
import utils

# ----------------------------------------------------------------------------- the math, by hand


def test_token_log_probs_divide_by_the_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    tokens = torch.tensor([[0]])
    # softmax([2, 0] / 2) = softmax([1, 0]): log p(0) = -log(1 + e^-1)
    assert ppo.token_log_probs(logits, tokens, 2.0).item() == pytest.approx(-math.log(1 + math.exp(-1)))
    assert ppo.token_log_probs(logits, tokens, 1.0).item() == pytest.approx(-math.log(1 + math.exp(-2)))


def test_response_mask_stops_after_the_first_eos():
    responses = torch.tensor([[5, 2, 7, 2], [5, 5, 5, 5], [2, 0, 0, 0]])
    assert ppo.response_mask(responses, eos_token_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_per_token_rewards_and_costs():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5, -9.0]])
    ref_log_probs = torch.tensor([[-1.5, -1.0, -0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the EOS is token 2; token 3 comes after it
    # log π - log π_ref = [0.5, -1, 0, (masked)]; β = 0.1
    rewards = ppo.per_token_rewards(torch.tensor([3.0]), log_probs, ref_log_probs, mask, 0.1, 50.0, kl_sign=-1)
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1, 3.0, 0.0])  # -β KL, + R at the last token
    costs = ppo.per_token_rewards(torch.tensor([-2.0]), log_probs, ref_log_probs, mask, 0.1, 50.0, kl_sign=+1)
    assert costs.flatten().tolist() == pytest.approx([0.05, -0.1, -2.0, 0.0])  # +β KL, + C at the last token
    clipped = ppo.per_token_rewards(torch.tensor([100.0]), log_probs, ref_log_probs, mask, 0.0, 50.0, kl_sign=-1)
    assert clipped.flatten().tolist() == [0.0, 0.0, 50.0, 0.0]
    # As the original: the clip applies to score + KL term together, on every token (β = 10 here).
    clipped = ppo.per_token_rewards(torch.tensor([49.0]), log_probs, ref_log_probs, mask, 10.0, 50.0, kl_sign=+1)
    assert clipped.flatten().tolist() == pytest.approx([5.0, -10.0, 49.0, 0.0])
    clipped = ppo.per_token_rewards(torch.tensor([-45.0]), log_probs, ref_log_probs, mask, 10.0, 6.0, kl_sign=-1)
    assert clipped.flatten().tolist() == pytest.approx([-5.0, 6.0, -6.0, 0.0])


def test_kl_terms_cancel_into_minus_beta_kl_for_any_lambda():
    torch.manual_seed(0)
    log_probs, ref_log_probs, mask = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
    rewards = ppo.per_token_rewards(torch.zeros(2), log_probs, ref_log_probs, mask, 0.2, 50.0, -1)
    costs = ppo.per_token_rewards(torch.zeros(2), log_probs, ref_log_probs, mask, 0.2, 50.0, +1)
    for lagrange_multiplier in (0.0, 0.5, 4.0):
        combined = ppo.combined_advantages(rewards, costs, lagrange_multiplier)
        assert torch.allclose(combined, -0.2 * (log_probs - ref_log_probs), atol=1e-6)


def test_gae_by_hand():
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]])
    # γ = 1, λ = 0.5: δ = [1 + 1 - 0.5, 0 + 1.5 - 1, 2 + 0 - 1.5] = [1.5, 0.5, 0.5]
    # A_2 = 0.5, A_1 = 0.5 + 0.5 * 0.5 = 0.75, A_0 = 1.5 + 0.5 * 0.75 = 1.875
    advantages, returns = ppo.gae(rewards, values, torch.ones(1, 3), 1.0, 0.5)
    assert advantages.flatten().tolist() == pytest.approx([1.875, 0.75, 0.5])
    assert returns.flatten().tolist() == pytest.approx([2.375, 1.75, 2.0])
    # The episode ends at the EOS (token 1): what comes after it, however large, changes nothing.
    rewards_after, values_after = torch.tensor([[1.0, 0.0, 99.0]]), torch.tensor([[0.5, 1.0, 77.0]])
    advantages, returns = ppo.gae(rewards_after, values_after, torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 0.5)
    # δ_1 = 0 + 0 - 1 = -1, δ_0 = 1 + 1 - 0.5 = 1.5: A = [1.5 - 0.5, -1, 0]
    assert advantages.flatten().tolist() == pytest.approx([1.0, -1.0, 0.0])
    assert returns.flatten().tolist() == pytest.approx([1.5, 0.0, 0.0])


def gae_vectorised(rewards, values, mask, gamma, gae_lambda):
    """An independent version: A_t = Σ_{k>=t} (γλ)^{k-t} δ_k as one matrix product."""
    values, rewards = values * mask, rewards * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    n = rewards.size(1)
    powers = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # k - t
    weights = torch.where(powers >= 0, (gamma * gae_lambda) ** powers.clamp(min=0).double(), 0.0)
    advantages = (deltas.double() @ weights.T).float() * mask
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("gamma, gae_lambda", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_an_independent_vectorised_version(gamma, gae_lambda):
    torch.manual_seed(1)
    rewards, values = torch.randn(6, 9), torch.randn(6, 9)
    lengths = torch.tensor([9, 1, 4, 7, 2, 9])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).float()
    expected = gae_vectorised(rewards, values, mask, gamma, gae_lambda)
    for got, want in zip(ppo.gae(rewards, values, mask, gamma, gae_lambda), expected):
        assert torch.allclose(got, want, atol=1e-5)


def test_combined_advantages():
    # (A_R - λ A_C) / (1 + λ) = (2 - 3 * 1) / 4
    assert ppo.combined_advantages(torch.tensor(2.0), torch.tensor(1.0), 3.0).item() == pytest.approx(-0.25)
    assert ppo.combined_advantages(torch.tensor(2.0), torch.tensor(1.0), 0.0).item() == pytest.approx(2.0)


def test_actor_loss_by_hand():
    old = torch.zeros(1, 4)
    log_probs = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.0]]))  # ratios 1.5, 1.5, 0.5, 1.0
    advantages = torch.tensor([[2.0, -2.0, 2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is after the EOS
    # min(ρA, clip(ρ, 0.8, 1.2) A): min(3, 2.4) = 2.4; min(-3, -2.4) = -3; min(1, 1.6) = 1
    loss, ratio = ppo.actor_loss(log_probs, old, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(-(2.4 - 3 + 1) / 3)
    assert ratio.flatten().tolist() == pytest.approx([1.5, 1.5, 0.5, 1.0])


def test_sequence_mean_weighs_a_short_response_as_much_as_a_long_one():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])  # a long response and a one-token refusal
    # per sequence: 1 and 5; their mean is 3 (a mean over the 5 tokens would give 9/5)
    assert ppo.sequence_mean(values, mask).item() == pytest.approx(3.0)
    # a micro-batch's share of a minibatch of 4 sequences: (1 + 5) / 4
    assert ppo.sequence_mean(values, mask, n_sequences=4).item() == pytest.approx(1.5)
    # the shares of any split add up to the whole minibatch's mean
    halves = ppo.sequence_mean(values[:1], mask[:1], 2) + ppo.sequence_mean(values[1:], mask[1:], 2)
    assert halves.item() == pytest.approx(3.0)


def test_actor_loss_averages_per_sequence_then_over_sequences():
    old = torch.zeros(2, 3)
    log_probs = torch.log(torch.tensor([[1.0, 1.0, 1.0], [1.5, 1.0, 1.0]]))
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # sequence 0: ratios 1, surrogate mean (1 + 2 + 3) / 3 = 2; sequence 1: min(1.5·4, 1.2·4) = 4.8
    loss, _ = ppo.actor_loss(log_probs, old, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(-(2 + 4.8) / 2)


def test_value_loss_by_hand():
    values, old_values, returns = (
        torch.tensor([[3.0, 1.2, 50.0]]),
        torch.tensor([[1.0, 1.0, 0.0]]),
        torch.tensor([[2.0, 3.0, 0.0]]),
    )
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: clipped 1.5; max((3-2)², (1.5-2)²) = 1. token 1: clipped 1.2; (1.2-3)² = 3.24. token 2 masked.
    loss = ppo.value_loss(values, old_values, returns, mask, 0.5)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 3.24) / 2)


def test_lagrange_multiplier_update():
    # log λ ← log λ + α λ (Ĵ_C - threshold): λ = 1, Ĵ_C = -2, threshold = -4, α = 0.1 -> 0.2
    assert ppo.lagrange_multiplier_update(0.0, -2.0, -4.0, 0.1, 10.0) == pytest.approx(0.2)
    # the constraint holds (Ĵ_C below the threshold): λ falls, by λ-proportional steps in log space
    assert ppo.lagrange_multiplier_update(math.log(2), -6.0, -4.0, 0.1, 10.0) == pytest.approx(math.log(2) - 0.4)
    # clamped at λ_max
    assert ppo.lagrange_multiplier_update(0.0, 10.0, -4.0, 0.1, 1.1) == pytest.approx(math.log(1.1))


def test_token_mean():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert ppo.token_mean(values, mask).item() == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- on real (tiny) models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A random toy actor and random toy reward/cost models, saved like the earlier stages' outputs."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = utils.load_tokenizer("toy_world/model")
    torch.manual_seed(0)
    utils.save_checkpoint(str(root / "sft"), utils.load_causal_lm("toy_world/model", tokenizer), tokenizer)
    for name in ("reward", "cost"):
        utils.save_checkpoint(str(root / name), utils.load_score_model("toy_world/model", tokenizer).model, tokenizer)
    return root


def tiny_args(models, output_dir, **changes):
    defaults = dict(
        actor_model_name_or_path=str(models / "sft"),
        reward_model=str(models / "reward"),
        cost_model=str(models / "cost"),
        eval_prompts="none",
        output_dir=str(output_dir),
        iterations=3,
        rollout_batch_size=8,
        minibatch_size=4,
        micro_batch_size=2,
        max_new_tokens=6,
        save_every=1000,
    )
    return ppo.Args(**{**defaults, **changes})


def load_for_rollout(args):
    tokenizer = utils.load_tokenizer(args.actor_model_name_or_path)
    actor = utils.load_causal_lm(args.actor_model_name_or_path, tokenizer)
    reference = utils.load_causal_lm(args.actor_model_name_or_path, tokenizer).eval()
    scorers = [(utils.load_score_model(p, tokenizer).eval(), tokenizer) for p in (args.reward_model, args.cost_model)]
    critics = [utils.load_score_model(p, tokenizer) for p in (args.reward_model, args.cost_model)]
    models = dict(actor=actor, reference=reference, reward=scorers[0], cost=scorers[1])
    return tokenizer, dict(models, reward_critic=critics[0], cost_critic=critics[1])


def test_ratio_is_one_and_approx_kl_zero_on_the_first_minibatch(tiny_models, tmp_path):
    args = tiny_args(tiny_models, tmp_path, temperature=0.7)
    tokenizer, models = load_for_rollout(args)
    torch.manual_seed(0)
    prompts = ["how do i bake bread ?", "i want to grow tomatoes . what should i do ?", "how do i steal a parked car ?"]
    episodes = ppo.rollout(args, models, tokenizer, prompts)
    batch, prompt_length = episodes.batch, episodes.prompt_length
    actor = models["actor"].train()
    rows = [2, 0]  # a minibatch, in another order than the rollout
    logits = ppo.actor_forward(actor, batch["sequences"][rows], batch["attention_mask"][rows], prompt_length)
    log_probs = ppo.token_log_probs(logits, batch["sequences"][rows, prompt_length:], 0.7)
    mask = batch["mask"][rows]
    _, ratio = ppo.actor_loss(log_probs, batch["log_probs"][rows], torch.ones_like(mask), mask, 0.2)
    assert torch.allclose(ratio[mask.bool()], torch.ones(int(mask.sum())), atol=1e-5)
    approx_kl = ppo.token_mean((ratio - 1) - torch.log(ratio), mask)
    assert abs(approx_kl.item()) < 1e-8
    # The old log-probs are at the sampling temperature: log_softmax(logits / T) of the sampled tokens.
    full = actor(
        input_ids=batch["sequences"],
        attention_mask=batch["attention_mask"],
        position_ids=utils.position_ids(batch["attention_mask"]),
    ).logits
    expected = (
        F.log_softmax(full[:, prompt_length - 1 : -1] / 0.7, -1)
        .gather(-1, batch["sequences"][:, prompt_length:, None])
        .squeeze(-1)
    )
    assert torch.allclose(batch["log_probs"] * batch["mask"], expected * batch["mask"], atol=1e-5)


def test_rollout_masks_everything_after_eos(tiny_models, tmp_path):
    args = tiny_args(tiny_models, tmp_path)
    tokenizer, models = load_for_rollout(args)
    torch.manual_seed(3)
    episodes = ppo.rollout(args, models, tokenizer, ["how do i bake bread ?"] * 6)
    batch, prompt_length, reward, cost, texts = (
        episodes.batch, episodes.prompt_length, episodes.reward, episodes.cost, episodes.texts,
    )  # fmt: skip
    responses = batch["sequences"][:, prompt_length:]
    expected_mask = ppo.response_mask(responses, tokenizer.eos_token_id)
    assert torch.equal(batch["mask"], expected_mask)
    for key in (
        "reward_advantages",
        "reward_returns",
        "reward_values",
        "cost_advantages",
        "cost_returns",
        "cost_values",
    ):
        assert (batch[key][expected_mask == 0] == 0).all(), key
    # attention covers the real prompt tokens and the response up to its EOS, nothing else
    assert torch.equal(batch["attention_mask"][:, prompt_length:], expected_mask.long())
    assert len(texts) == 6 and reward.shape == cost.shape == (6,)


def read(output_dir, split="train"):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_lambda_is_updated_first_and_the_update_uses_it(tiny_models, tmp_path, monkeypatch):
    used = []  # the λ each PPO update was given
    real_update = ppo.ppo_update

    def spy(*args):
        used.append(args[7])  # lagrange_multiplier
        return real_update(*args)

    monkeypatch.setattr(ppo, "ppo_update", spy)
    args = tiny_args(
        tiny_models,
        tmp_path,
        iterations=5,
        lambda_update_delay=2,
        episode_cost_window=16,
        lambda_init=0.5,
        lambda_lr=0.3,
        threshold=0.0,
    )
    ppo.main(args)
    records = read(tmp_path)
    assert len(records) == 5
    log_lambda = math.log(0.5)
    for i, record in enumerate(records):
        # The window (16 episodes) holds this iteration's 8 episodes and the previous iteration's 8.
        window = [r["cost"] for r in records[max(0, i - 1) : i + 1]]
        assert record["episode_cost"] == pytest.approx(sum(window) / len(window), abs=1e-5)
        if i >= 2:  # iterations 0 and 1 are the delay
            log_lambda = ppo.lagrange_multiplier_update(log_lambda, record["episode_cost"], 0.0, 0.3, 5.0)
        assert record["lambda"] == pytest.approx(math.exp(log_lambda), rel=1e-6)
        # Both minibatches of iteration i were updated with λ from the window that holds iteration i's costs.
        assert used[2 * i : 2 * i + 2] == pytest.approx([record["lambda"]] * 2, rel=1e-9)
    assert used[4] != used[3]  # λ moved after the delay
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))


def test_baselines_run_with_their_own_critics(tiny_models, tmp_path):
    ppo.main(tiny_args(tiny_models, tmp_path / "ppo", algorithm="ppo", iterations=2))
    assert [r["lambda"] for r in read(tmp_path / "ppo")] == [0.0, 0.0]
    assert os.path.isdir(tmp_path / "ppo" / "reward_critic") and not os.path.exists(tmp_path / "ppo" / "cost_critic")
    ppo.main(tiny_args(tiny_models, tmp_path / "shaping", algorithm="reward_shaping", cost_coef=2.0, iterations=2))
    records = read(tmp_path / "shaping")
    assert [r["lambda"] for r in records] == [0.0, 0.0] and all(r["cost"] != 0 for r in records)
    assert ppo.default_output_dir(ppo.Args(algorithm="reward_shaping", cost_coef=2.0)) == "output/reward_shaping_2.0"
    assert ppo.default_output_dir(ppo.Args()) == "output/ppo_lag"
    assert ppo.default_output_dir(ppo.Args(algorithm="ppo")) == "output/ppo"


def test_resume_continues_an_interrupted_run(tiny_models, tmp_path):
    changes = dict(iterations=4, save_every=2, ptx_coef=1.0)
    ppo.main(tiny_args(tiny_models, tmp_path / "whole", **changes))
    ppo.main(tiny_args(tiny_models, tmp_path / "pieces", max_iterations=2, **changes))
    # The training state loads without pickle: a checkpoint from elsewhere cannot run code.
    state = torch.load(tmp_path / "pieces" / "training_state.pt", weights_only=True)
    assert state["iteration"] == 2 and len(state["episode_costs"]) == 16 and len(state["rng"]) == 1
    ppo.main(tiny_args(tiny_models, tmp_path / "pieces", resume=True, **changes))
    whole, pieces = read(tmp_path / "whole"), read(tmp_path / "pieces")
    assert [r["step"] for r in pieces] == [1, 2, 3, 4]
    for a, b in zip(whole, pieces):
        for key in ("reward", "cost", "lambda", "actor_loss", "ptx_loss", "actor_lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    for part in ("model.safetensors", "reward_critic/model.safetensors", "cost_critic/model.safetensors"):
        a, b = load_file(tmp_path / "whole" / part), load_file(tmp_path / "pieces" / part)
        assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a), part


def test_resume_on_another_number_of_ranks_stops_with_both_counts(tiny_models, tmp_path):
    ppo.main(tiny_args(tiny_models, tmp_path, iterations=2, max_iterations=1))
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    state["rng"] = state["rng"] * 2  # as if saved by a run on 2 ranks
    torch.save(state, tmp_path / "training_state.pt")
    with pytest.raises(ValueError, match=r"saved by a run on 2 rank\(s\) and this one has 1"):
        ppo.main(tiny_args(tiny_models, tmp_path, iterations=2, resume=True))


def test_duplicate_prompts_are_dropped_and_epochs_set_the_run_length(tiny_models, tmp_path, capsys):
    prompts = ["how do i bake bread ?", "how do i steal a parked car ?", "how do i plant a tree ?"]
    rows = [prompts[0], prompts[1], prompts[0], prompts[2], prompts[1], prompts[0]]  # 3 unique of 6
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    ppo.main(tiny_args(tiny_models, tmp_path / "run", prompts=str(path), epochs=2.0, rollout_batch_size=2,
                       minibatch_size=2, micro_batch_size=2))  # fmt: skip
    assert "3 duplicate prompts dropped, 3 left" in capsys.readouterr().out
    assert len(read(tmp_path / "run")) == 3  # 2 passes over 3 unique prompts, 2 per iteration
    # Each pass is a shuffle of the unique prompts: every one once.
    order = [ppo.prompt_order(3, 42, position) for position in range(6)]
    assert sorted(order[:3]) == sorted(order[3:]) == [0, 1, 2]


def test_torchrun_two_ranks_ddp_and_fsdp_agree_and_keep_the_same_lambda(tiny_models, tmp_path, torchrun):
    """Two ranks with a full copy of each model (DDP) and with every model sharded (FSDP, stopped after 2
    iterations and resumed) do the same updates; λ is the same on every rank and rises above its start."""
    prompts = tmp_path / "prompts_6.jsonl"
    prompts.write_text("".join(open("toy_world/data/prompts_eval.jsonl").readlines()[::12]))
    changes = dict(eval_prompts=str(prompts), lambda_lr=0.5, threshold=-100, lambda_init=0.5, save_every=1)
    changes.update(gradient_checkpointing=True, ptx_coef=1.0)  # both with FSDP too
    torchrun("ppo_lagrangian.py", 29535, vars(tiny_args(tiny_models, tmp_path / "ddp", **changes)))
    fsdp = vars(tiny_args(tiny_models, tmp_path / "fsdp", fsdp=True, **changes))
    torchrun("ppo_lagrangian.py", 29535, dict(fsdp, max_iterations=2))
    torchrun("ppo_lagrangian.py", 29535, dict(fsdp, resume=True))
    for run in ("ddp", "fsdp"):
        state = torch.load(tmp_path / run / "training_state.pt", weights_only=False)
        assert len(state["log_lambda_per_rank"]) == 2
        assert state["log_lambda_per_rank"][0] == state["log_lambda_per_rank"][1] == state["log_lambda"]
        assert state["log_lambda"] > math.log(0.5)  # threshold -100 is violated: λ rose from 0.5
    ddp, fsdp = read(tmp_path / "ddp"), read(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == [1, 2, 3]
    for a, b in zip(ddp, fsdp):
        for key in ("reward", "cost", "kl", "lambda", "actor_loss", "reward_value_loss", "cost_value_loss", "ptx_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    judged = [read(tmp_path / run, "eval")[-1] for run in ("ddp", "fsdp")]
    assert judged[0] == judged[1] and judged[0]["step"] == 3
    for part in ("model.safetensors", "reward_critic/model.safetensors", "cost_critic/model.safetensors"):
        a, b = load_file(tmp_path / "ddp" / part), load_file(tmp_path / "fsdp" / part)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5), (part, name)


def test_ptx_loss_is_mixed_into_the_actor_update(tiny_models, tmp_path):
    ppo.main(tiny_args(tiny_models, tmp_path, iterations=2, ptx_coef=1.0))
    # the SFT loss of a random model on toy conversations is near log(vocabulary) ≈ 5.9
    assert all(3.0 < r["ptx_loss"] < 8.0 for r in read(tmp_path))
    ppo.main(tiny_args(tiny_models, tmp_path / "off", iterations=1))
    assert read(tmp_path / "off")[0]["ptx_loss"] == 0.0


def test_rollouts_ignore_the_checkpoints_own_sampling_settings(tiny_models, tmp_path):
    """A checkpoint whose generation_config.json distorts sampling (as Qwen2-Instruct's repetition penalty
    does) samples the very tokens of the same weights without it: the log-probs assume softmax(logits / T)."""
    import shutil

    from transformers import GenerationConfig

    distorted = tmp_path / "sft_with_generation_config"
    shutil.copytree(tiny_models / "sft", distorted)
    settings = dict(repetition_penalty=1.5, top_k=3, top_p=0.5, min_p=0.2, typical_p=0.5, no_repeat_ngram_size=1)
    settings.update(suppress_tokens=[5, 6], bad_words_ids=[[7], [8]], min_new_tokens=4, temperature=0.3)
    GenerationConfig(do_sample=True, **settings).save_pretrained(distorted)
    prompts = ["how do i bake bread ?", "how do i steal a parked car ?"] * 3
    sampled, greedy = {}, {}
    for path in (tiny_models / "sft", distorted):
        args = tiny_args(tiny_models, tmp_path, actor_model_name_or_path=str(path), max_new_tokens=8)
        tokenizer, models = load_for_rollout(args)
        torch.manual_seed(0)
        sampled[path] = ppo.rollout(args, models, tokenizer, prompts).batch["sequences"]
        prompt_ids = [utils.tokenize_prompt(tokenizer, p, 48) for p in prompts]
        greedy[path] = utils.generate(models["actor"], tokenizer, prompt_ids, 8, greedy=True)[0]
        if path == distorted:
            assert models["actor"].generation_config.repetition_penalty == 1.5  # the settings were loaded...
            torch.manual_seed(0)
            input_ids, attention_mask = utils.batch_inputs(prompt_ids, tokenizer.pad_token_id, "cpu", side="left")
            own = models["actor"].generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8)
            assert not torch.equal(own, sampled[path])  # ...and would change what is sampled
    assert torch.equal(sampled[tiny_models / "sft"], sampled[distorted])
    assert torch.equal(greedy[tiny_models / "sft"], greedy[distorted])


def test_one_update_at_two_ranks_matches_one_process(tiny_models, tmp_path, torchrun):
    """One PPO-Lag update with PTX on the same global minibatch: one process (4 micro-batches of 2, and
    3 uneven ones of at most 3) against 2 ranks with DDP and with FSDP. The logged losses and the weights
    after the step must agree: a loss normalised per rank or scaled by the rank count would not."""
    script = "tests/ppo_update_check.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, extra in (("one", []), ("one_uneven", ["--micro_batch_size", "3"])):
        command = [sys.executable, script, str(tiny_models), str(tmp_path / out), *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    for out, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        torchrun(script, 29536, {}, positional=[str(tiny_models), str(tmp_path / out), *extra])
    reference = json.loads((tmp_path / "one" / "stats.json").read_text())
    assert reference["ptx_loss"] > 1.0 and reference["actor_loss"] != 0.0
    weights = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    for out in ("one_uneven", "ddp", "fsdp"):
        stats = json.loads((tmp_path / out / "stats.json").read_text())
        for key, value in reference.items():
            assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (out, key)
        other = torch.load(tmp_path / out / "weights.pt", weights_only=True)
        for model in weights:
            for name in weights[model]:
                assert torch.allclose(weights[model][name], other[model][name], atol=1e-5), (out, model, name)


def test_the_users_command_runs_at_eight_ranks_with_the_default_batches(tiny_models, tmp_path, torchrun):
    """`torchrun --nproc_per_node=8 ppo_lagrangian.py` with the default --rollout_batch_size 48,
    --minibatch_size 24 and --micro_batch_size 24: each rank takes 6 prompts and 3-row minibatches. λ and
    Ĵ_C's window (all 48 episodes of the batch) are the same on every rank."""
    defaults = ppo.Args()
    batches = dict(rollout_batch_size=48, minibatch_size=24, micro_batch_size=24)
    assert batches == {key: getattr(defaults, key) for key in batches}
    changes = dict(iterations=2, lambda_lr=0.5, threshold=-100, **batches)
    torchrun("ppo_lagrangian.py", 29539, vars(tiny_args(tiny_models, tmp_path, **changes)), nproc=8)
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 8 and len(set(state["log_lambda_per_rank"])) == 1
    assert state["log_lambda"] > math.log(defaults.lambda_init)  # threshold -100 is violated: λ rose
    assert len(state["episode_costs"]) == 96  # two batches of 48, every rank's episodes
    records = read(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["episode_cost"] == pytest.approx(sum(state["episode_costs"]) / 96, abs=1e-5)
    assert records[1]["episode_cost"] == pytest.approx((records[0]["cost"] + records[1]["cost"]) / 2, abs=1e-5)


# ----------------------------------------------------------------------------- λ as a PID controller


def test_pid_lagrange_multiplier_update_by_hand():
    update = ppo.pid_lagrange_multiplier_update
    start = {"integral": 25.0, "violation": 0.0, "cost": None}  # K_I I = 0.25: λ_init
    # Δ = -4 - (-5.5) = 1.5, I = 26.5, no rise yet: λ = 0.1·1.5 + 0.01·26.5 = 0.415
    lam, state = update(start, -4.0, -5.5, 0.1, 0.01, 0.1, 0.0, 5.0)
    assert lam == pytest.approx(0.415) and state == pytest.approx({"integral": 26.5, "violation": 1.5, "cost": -4.0})
    # The cost rises by 0.5: Δ = 2, I = 28.5, ∂ = 0.5: λ = 0.2 + 0.285 + 0.05
    lam, state = update(state, -3.5, -5.5, 0.1, 0.01, 0.1, 0.0, 5.0)
    assert lam == pytest.approx(0.535)
    # It falls far below the threshold: no derivative on a fall; P pulls λ down at once, I slowly
    lam, state = update(state, -8.0, -5.5, 0.1, 0.01, 0.1, 0.0, 5.0)
    assert lam == pytest.approx(-0.25 + 0.26) and state["integral"] == pytest.approx(26.0)
    # λ stays in [0, λ_max]; the integral never goes below 0
    lam, state = update(state, -100.0, -5.5, 0.1, 0.01, 0.1, 0.0, 5.0)
    assert lam == 0.0 and state["integral"] == 0.0
    lam, _ = update(state, 100.0, -5.5, 0.1, 0.01, 0.1, 0.0, 1.0)
    assert lam == 1.0
    # Smoothing α = 0.5: Δ̃ = 0.5·2 + 0.5·(-1) = 0.5; J̃ = 0.5·(-3) + 0.5·(-6.5) = -4.75, a fall: no ∂
    lam, state = update({"integral": 10.0, "violation": 2.0, "cost": -3.0}, -6.5, -5.5, 0.2, 0.01, 1.0, 0.5, 5.0)
    assert lam == pytest.approx(0.2 * 0.5 + 0.01 * 9.0) and state["cost"] == pytest.approx(-4.75)


def test_pid_runs_resumes_and_keeps_lambda_identical_on_ranks(tiny_models, tmp_path, torchrun):
    changes = dict(lambda_update="pid", pid_kp=0.5, pid_ki=0.05, pid_kd=0.5, threshold=0.0, iterations=4, save_every=2)
    ppo.main(tiny_args(tiny_models, tmp_path / "whole", **changes))
    ppo.main(tiny_args(tiny_models, tmp_path / "pieces", max_iterations=2, **changes))
    state = torch.load(tmp_path / "pieces" / "training_state.pt", weights_only=True)
    assert set(state["controller"]) == {"integral", "violation", "cost"} and state["controller"]["cost"] is not None
    ppo.main(tiny_args(tiny_models, tmp_path / "pieces", resume=True, **changes))
    whole, pieces = read(tmp_path / "whole"), read(tmp_path / "pieces")
    assert [r["lambda"] for r in pieces] == pytest.approx([r["lambda"] for r in whole], rel=1e-6)
    # λ follows the controller from the logged Ĵ_C, starting from λ_init = 0.25 (K_I I = 0.25)
    controller, expected = {"integral": 0.25 / 0.05, "violation": 0.0, "cost": None}, []
    for record in whole:
        lam, controller = ppo.pid_lagrange_multiplier_update(
            controller, record["episode_cost"], 0.0, 0.5, 0.05, 0.5, 0.0, 1.0
        )
        expected.append(lam)
    assert [r["lambda"] for r in whole] == pytest.approx(expected, rel=1e-6)
    torchrun("ppo_lagrangian.py", 29540, vars(tiny_args(tiny_models, tmp_path / "two", **dict(changes, iterations=2))))
    state = torch.load(tmp_path / "two" / "training_state.pt", weights_only=True)
    assert len(state["log_lambda_per_rank"]) == 2 and len(set(state["log_lambda_per_rank"])) == 1
