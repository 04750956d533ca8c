"""PPO-Lagrangian: every equation against hand-computed numbers, λ's bookkeeping, the rollout's masks and streams,
one update against an independent gradient, short end-to-end runs, and two ranks against one process."""

import io
import json
import math
import os
import shutil

import ppo_update_check as check
import pytest
import torch
import torch.nn.functional as F
from conftest import torchrun
from PIL import Image
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
    # The episode ends at the EOS (token 1): no bootstrap from the value after it, and what comes after it,
    # however large, changes nothing.
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
    # (A_R - λ A_C) / (1 + λ) = (2 - 3 * 1) / 4: a costly action loses advantage as λ grows
    assert ppo.combined_advantages(torch.tensor(2.0), torch.tensor(1.0), 3.0).item() == pytest.approx(-0.25)
    assert ppo.combined_advantages(torch.tensor(2.0), torch.tensor(1.0), 0.0).item() == pytest.approx(2.0)


def test_actor_loss_by_hand():
    old = torch.zeros(1, 5)
    log_probs = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0]]))  # ratios 1.5, 1.5, 0.5, 0.5, 1.0
    advantages = torch.tensor([[2.0, -2.0, 2.0, -2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is after the EOS
    # min(ρA, clip(ρ, 0.8, 1.2) A): min(3, 2.4) = 2.4 (the upper bound); min(-3, -2.4) = -3; min(1, 1.6) = 1;
    # min(-1, 0.8 · -2) = -1.6: the lower bound (a bound of 0.5, 0 or -inf would give -1)
    loss, ratio = ppo.actor_loss(log_probs, old, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(-(2.4 - 3 + 1 - 1.6) / 4)
    assert ratio.flatten().tolist() == pytest.approx([1.5, 1.5, 0.5, 0.5, 1.0])


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
    values = torch.tensor([[3.0, 3.0, 1.2, 50.0]])
    old_values = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[4.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # c = 0.5. token 0: clipped 1 + 0.5 = 1.5; max((3-4)², (1.5-4)²) = 6.25, the CLIPPED term (plain MSE: 1).
    # token 1: clipped 1.5; max((3-2)², (1.5-2)²) = 1, the unclipped term. token 2: within the clip, (1.2-3)² = 3.24.
    # token 3 is masked.
    loss = ppo.value_loss(values, old_values, returns, mask, 0.5)
    assert loss.item() == pytest.approx(0.5 * (6.25 + 1.0 + 3.24) / 3)


def test_lagrange_multiplier_update():
    # log λ ← log λ + α λ (Ĵ_C - threshold): λ = 1, Ĵ_C = -2, threshold = -4, α = 0.1 -> 0.2
    assert ppo.lagrange_multiplier_update(0.0, -2.0, -4.0, 0.1, 10.0) == pytest.approx(0.2)
    # the constraint holds (Ĵ_C below the threshold): λ falls, by λ-proportional steps in log space
    assert ppo.lagrange_multiplier_update(math.log(2), -6.0, -4.0, 0.1, 10.0) == pytest.approx(math.log(2) - 0.4)
    # clamped at λ_max
    assert ppo.lagrange_multiplier_update(0.0, 10.0, -4.0, 0.1, 1.1) == pytest.approx(math.log(1.1))


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


def test_token_mean():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert ppo.token_mean(values, mask).item() == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- λ: the LagrangeMultiplier


def saved_and_loaded(multiplier, args):
    """A fresh multiplier that loaded `multiplier`'s state, saved and read back as training_state.pt is (no pickle)."""
    buffer = io.BytesIO()
    torch.save(multiplier.state_dict(), buffer)
    buffer.seek(0)
    resumed = ppo.LagrangeMultiplier(args)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    return resumed


def test_lagrange_multiplier_by_gradient_ascent_with_its_window_and_delay():
    """λ (the original's update, on log λ) step by step: Ĵ_C is the mean of the last episode_cost_window costs,
    λ rises when Ĵ_C is above the threshold and falls below it, waits lambda_update_delay iterations, stops at
    λ_max, and continues exactly after a save and load; the baselines keep λ = 0."""
    step = dict(lambda_init=0.5, lambda_lr=0.1, threshold=-1.0, lambda_max=2.0)
    args = ppo.Args(episode_cost_window=3, lambda_update_delay=1, **step)
    multiplier = ppo.LagrangeMultiplier(args)
    assert multiplier.value == pytest.approx(0.5) and multiplier.log_lambda == pytest.approx(math.log(0.5))
    # Iteration 0 is the delay: the window fills, λ stays.
    assert multiplier.update([1.0, 3.0], 0) == pytest.approx(2.0)
    assert multiplier.value == pytest.approx(0.5)
    # Iteration 1: the window keeps the last 3 costs, [3, 5, -1]: Ĵ_C = 7/3 is above the threshold -1, so λ rises:
    # log λ = log 0.5 + 0.1 · 0.5 · (7/3 + 1) = log 0.5 + 1/6
    assert multiplier.update([5.0, -1.0], 1) == pytest.approx(7 / 3)
    assert multiplier.value == pytest.approx(0.5 * math.exp(1 / 6))
    # Iteration 2: Ĵ_C = -4 is below the threshold: λ falls, log λ -= 0.1 · λ · 3
    lagrange_multiplier = 0.5 * math.exp(1 / 6)
    assert multiplier.update([-4.0, -4.0, -4.0], 2) == pytest.approx(-4.0)
    assert multiplier.value == pytest.approx(lagrange_multiplier * math.exp(-0.3 * lagrange_multiplier))
    # A resumed multiplier continues exactly: the same window, the same λ.
    resumed = saved_and_loaded(multiplier, args)
    assert resumed.value == multiplier.value and list(resumed.episode_costs) == [-4.0, -4.0, -4.0]
    # Iteration 3: a large violation, Ĵ_C = 92/3: the step would take λ past λ_max = 2, where it is clamped.
    for one in (multiplier, resumed):
        assert one.update([100.0], 3) == pytest.approx(92 / 3)
        assert one.value == pytest.approx(2.0)
    # The baselines have λ ≡ 0, whatever the costs.
    for algorithm in ("ppo", "reward_shaping"):
        baseline = ppo.LagrangeMultiplier(ppo.Args(algorithm=algorithm, threshold=-100.0))
        assert baseline.update([5.0], 0) == pytest.approx(5.0) and baseline.value == 0.0


def test_lagrange_multiplier_as_a_pid_controller_with_its_delay():
    """λ from the PID controller step by step (the numbers of test_pid_lagrange_multiplier_update_by_hand): it
    starts at λ_init, waits lambda_update_delay iterations (the controller too), and a loaded one continues the
    same; λ = 0 is log λ = -inf."""
    gains = dict(pid_kp=0.1, pid_ki=0.01, pid_kd=0.1, lambda_init=0.25, lambda_max=5.0, threshold=-5.5)
    args = ppo.Args(lambda_update="pid", episode_cost_window=1, lambda_update_delay=1, **gains)
    multiplier = ppo.LagrangeMultiplier(args)
    assert multiplier.controller == {"integral": 25.0, "violation": 0.0, "cost": None}  # K_I I = λ_init
    assert multiplier.value == pytest.approx(0.25)
    multiplier.update([-4.0], 0)  # the delay: neither λ nor the controller moves
    assert multiplier.value == pytest.approx(0.25) and multiplier.controller["integral"] == 25.0
    # Δ = 1.5, I = 26.5, no rise yet: λ = 0.15 + 0.265
    multiplier.update([-4.0], 1)
    assert multiplier.value == pytest.approx(0.415)
    # Δ = 2, I = 28.5, a rise of 0.5 from the previous cost: λ = 0.2 + 0.285 + 0.05
    multiplier.update([-3.5], 2)
    assert multiplier.value == pytest.approx(0.535)
    resumed = saved_and_loaded(multiplier, args)
    # Δ = -2.5, I = 26, a fall: λ = -0.25 + 0.26; then far below the threshold: λ = 0 (log λ = -inf)
    for one in (multiplier, resumed):
        one.update([-8.0], 3)
        assert one.value == pytest.approx(0.01) and one.controller["integral"] == pytest.approx(26.0)
        one.update([-100.0], 4)
        assert one.value == 0.0 and one.log_lambda == -math.inf


# ----------------------------------------------------------------------------- the rollout, on tiny models


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


PROCESS = utils.setup_distributed("float32")  # one process, fp32 (what a test outside torchrun runs)
PROMPTS = ["how do i bake bread ?", "i want to grow tomatoes . what should i do ?", "how do i steal a parked car ?"]


def load_for_rollout(args, tokenizer):
    """The models rollout() takes, loaded as plain models (no DDP): actor, reference, scorers, critics."""
    actor = utils.load_model(args.actor_model_name_or_path, tokenizer)
    reference = utils.load_model(args.actor_model_name_or_path, tokenizer).eval()
    scorers = [(utils.load_model(p, tokenizer, score=True).eval(), tokenizer) for p in (args.reward_model, args.cost_model)]  # fmt: skip
    critics = [utils.load_model(p, tokenizer, score=True) for p in (args.reward_model, args.cost_model)]
    models = dict(actor=actor, reference=reference, reward=scorers[0], cost=scorers[1])
    return dict(models, reward_critic=critics[0], cost_critic=critics[1])


class FixedScores(torch.nn.Module):
    """A stand-in reward or cost model: the given score of each response, read at its end."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)

    def forward(self, input_ids, attention_mask, end=False):
        assert end, "a scorer is read at the last token"
        return self.scores


class ConstantCritic(torch.nn.Module):
    """A stand-in critic whose value is 7 everywhere, the padding after the EOS included."""

    def forward(self, input_ids, attention_mask):
        return torch.full(input_ids.shape, 7.0)


def stand_ins(actor, tokenizer, reward, cost, cost_critic=True):
    """rollout()'s models with a real actor and reference (its weights, unbiased) and stand-ins for the rest."""
    reference = utils.load_model(actor.name_or_path, tokenizer).eval()
    models = dict(actor=actor, reference=reference, reward=(FixedScores(reward), tokenizer))
    models.update(cost=(FixedScores(cost), tokenizer), reward_critic=ConstantCritic())
    return dict(models, cost_critic=ConstantCritic() if cost_critic else None)


def favour_eos(actor, eos_token_id, bias=4.8):
    """Add `bias` to the EOS logit (p(EOS) ≈ 1/3 per step on the random tiny model): responses stop at random
    places, so that the rollout has tokens after an EOS. The reference stays unbiased: the KL is not 0."""

    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos_token_id] += bias
        return logits

    actor.lm_head.register_forward_hook(hook)
    return actor


def response_log_probs(model, sequences, attention_mask, prompt_length, temperature=1.0):
    """log π(token) of each response token, written out independently of ppo.actor_forward: the logits at
    position t predict token t + 1."""
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=utils.position_ids(attention_mask)).logits  # fmt: skip
    log_probs = F.log_softmax(logits[:, prompt_length - 1 : -1].float() / temperature, -1)
    return log_probs.gather(-1, sequences[:, prompt_length:, None]).squeeze(-1)


def test_ratio_is_one_and_approx_kl_zero_on_the_first_minibatch(tiny_models, tokenizer, tmp_path):
    args = tiny_args(tiny_models, tmp_path, temperature=0.7)
    models = load_for_rollout(args, tokenizer)
    torch.manual_seed(0)
    episodes = ppo.rollout(args, models, tokenizer, PROMPTS, PROCESS)
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
    expected = response_log_probs(actor, batch["sequences"], batch["attention_mask"], prompt_length, 0.7)
    assert torch.allclose(batch["log_probs"] * batch["mask"], expected * batch["mask"], atol=1e-5)


def test_rollout_masks_after_the_eos_and_builds_both_streams_by_hand(tiny_models, tokenizer, tmp_path):
    """An actor that favours EOS (so that responses do stop early), stand-in scorers with known R and C, critics
    whose value is 7 everywhere. With γ = λ_GAE = 1 each stream's return is the sum of its per-token rewards from
    t on, written here by hand: r_t = -β (log π - log π_ref)_t in the reward stream, +β (...) in the cost stream,
    and R (C) added at the last response token; no value from beyond the EOS is bootstrapped, and everything
    after the first EOS is 0 (values, advantages, returns, attention)."""
    args = tiny_args(tiny_models, tmp_path, kl_coef=0.1, gamma=1.0, gae_lambda=1.0)
    prompts = PROMPTS * 3  # 9 responses
    reward, cost = [float(i) for i in range(1, 10)], [float(-2 * i) for i in range(1, 10)]
    actor = favour_eos(utils.load_model(args.actor_model_name_or_path, tokenizer), tokenizer.eos_token_id)
    models = stand_ins(actor, tokenizer, reward, cost)
    actor, reference = models["actor"], models["reference"]
    torch.manual_seed(3)
    episodes = ppo.rollout(args, models, tokenizer, prompts, PROCESS)
    batch, prompt_length = episodes.batch, episodes.prompt_length
    responses = batch["sequences"][:, prompt_length:]

    # The mask, written out: 1 up to and including the first EOS, 0 after it (and an EOS did come early).
    expected_mask = torch.ones_like(responses, dtype=torch.float)
    for row, tokens in enumerate(responses.tolist()):
        if tokenizer.eos_token_id in tokens:
            expected_mask[row, tokens.index(tokenizer.eos_token_id) + 1 :] = 0
    assert (expected_mask == 0).any(dim=1).sum() >= 3, "no response stopped early: the test would check nothing"
    assert torch.equal(batch["mask"], expected_mask)
    assert torch.equal(batch["attention_mask"][:, prompt_length:], expected_mask.long())
    prompt_ids = [utils.tokenize_conversation(tokenizer, p, None, args.max_prompt_length)[0] for p in prompts]
    assert batch["attention_mask"][:, :prompt_length].sum(1).tolist() == [len(ids) for ids in prompt_ids]
    for key in ("values", "advantages", "returns"):
        for stream in ("reward", "cost"):
            assert (batch[f"{stream}_{key}"][expected_mask == 0] == 0).all(), f"{stream}_{key}"
    assert (batch["reward_values"][expected_mask == 1] == 7.0).all()

    # Both streams by hand.
    log_probs = response_log_probs(actor, batch["sequences"], batch["attention_mask"], prompt_length)
    ref_log_probs = response_log_probs(reference, batch["sequences"], batch["attention_mask"], prompt_length)
    kl = (log_probs - ref_log_probs) * expected_mask
    assert kl.abs().max() > 0.5  # the EOS bias makes the actor differ from the reference
    last = expected_mask.sum(1).long() - 1
    for stream, score, sign in (("reward", reward, -1), ("cost", cost, +1)):
        per_token = sign * 0.1 * kl
        per_token[torch.arange(len(prompts)), last] += torch.tensor(score)
        to_go = per_token.flip(1).cumsum(1).flip(1) * expected_mask
        assert torch.allclose(batch[f"{stream}_returns"], to_go, atol=1e-5), stream
        assert torch.allclose(batch[f"{stream}_advantages"], (to_go - 7.0) * expected_mask, atol=1e-5), stream
    assert episodes.reward.tolist() == reward and episodes.cost.tolist() == cost
    assert episodes.stats["kl"] == pytest.approx(kl.sum(1).mean().item(), rel=1e-5)
    assert len(episodes.texts) == 9


def test_reward_shaping_scores_r_minus_nu_c_then_clips_each_token(tiny_models, tokenizer, tmp_path):
    """Reward shaping's reward stream gets R - ν·C at the last token, from the raw scores (the original's: no clip
    of R and C first); the per-token clip to ±clip_range_score stays. β = 0 so that the score is all there is."""
    args = tiny_args(tiny_models, tmp_path, algorithm="reward_shaping", cost_coef=0.5, kl_coef=0.0)
    reward, cost = [60.0, 45.0, -45.0], [30.0, -20.0, 20.0]
    # 60 - 15 = 45 (clipping R to 50 first would give 35); 45 + 10 = 55 -> 50; -45 - 10 = -55 -> -50
    expected = torch.tensor([45.0, 50.0, -50.0])
    models = stand_ins(utils.load_model(args.actor_model_name_or_path, tokenizer), tokenizer, reward, cost, False)
    torch.manual_seed(0)
    episodes = ppo.rollout(args, models, tokenizer, PROMPTS, PROCESS)
    mask = episodes.batch["mask"]
    # The value 7 of the last token is not bootstrapped past it: its return is its reward; with λ_GAE = 0.95
    # and γ = 1 the earlier tokens' returns mix in the values, so only the last one is exact.
    last = mask.sum(1).long() - 1
    assert episodes.batch["reward_returns"][torch.arange(3), last].tolist() == expected.tolist()
    assert "cost_returns" not in episodes.batch  # one stream: the cost is inside the reward
    assert episodes.reward.tolist() == reward and episodes.cost.tolist() == cost


def test_top_k_samples_only_among_the_k_most_likely_tokens(tiny_models, tokenizer, tmp_path):
    """--top_k 3: every sampled token is one of the 3 most likely at its step; with --top_k 0 (all tokens) some
    are not, so the check can fail."""
    outside = {}
    for top_k in (3, 0):
        args = tiny_args(tiny_models, tmp_path, top_k=top_k, temperature=0.7, max_new_tokens=8)
        models = stand_ins(utils.load_model(args.actor_model_name_or_path, tokenizer), tokenizer, [0.0] * 6, [0.0] * 6)
        torch.manual_seed(0)
        episodes = ppo.rollout(args, models, tokenizer, PROMPTS * 2, PROCESS)
        batch, prompt_length = episodes.batch, episodes.prompt_length
        logits = models["actor"](
            input_ids=batch["sequences"],
            attention_mask=batch["attention_mask"],
            position_ids=utils.position_ids(batch["attention_mask"]),
        ).logits[:, prompt_length - 1 : -1]  # (B, N, V): the logits that chose each response token
        top = logits.topk(3, dim=-1).indices  # (B, N, 3)
        in_top = (top == batch["sequences"][:, prompt_length:, None]).any(-1)  # (B, N)
        outside[top_k] = int((~in_top & batch["mask"].bool()).sum())
        assert batch["mask"].sum() >= 40  # enough samples to tell
    assert outside[3] == 0 and outside[0] > 0, outside


def test_rollouts_ignore_the_checkpoints_own_sampling_settings(tiny_models, tokenizer, tmp_path):
    """A checkpoint whose generation_config.json distorts sampling (as Qwen2-Instruct's repetition penalty
    does) samples the very tokens of the same weights without it: the log-probs assume softmax(logits / T)."""
    from transformers import GenerationConfig

    distorted = tmp_path / "sft_with_generation_config"
    shutil.copytree(tiny_models / "sft", distorted)
    settings = dict(repetition_penalty=1.5, top_k=3, top_p=0.5, min_p=0.2, typical_p=0.5, no_repeat_ngram_size=1)
    settings.update(suppress_tokens=[5, 6], bad_words_ids=[[7], [8]], min_new_tokens=4, temperature=0.3)
    GenerationConfig(do_sample=True, **settings).save_pretrained(distorted)
    prompts = ["how do i bake bread ?", "how do i steal a parked car ?"] * 3
    prompt_ids = [utils.tokenize_conversation(tokenizer, p, None, 48)[0] for p in prompts]
    sampled, greedy = {}, {}
    for path in (tiny_models / "sft", distorted):
        args = tiny_args(tiny_models, tmp_path, actor_model_name_or_path=str(path), max_new_tokens=8)
        models = load_for_rollout(args, tokenizer)
        torch.manual_seed(0)
        sampled[path] = ppo.rollout(args, models, tokenizer, prompts, PROCESS).batch["sequences"]
        greedy[path] = utils.generate(models["actor"], tokenizer, prompt_ids, 8, greedy=True)[0]
        if path == distorted:
            assert models["actor"].generation_config.repetition_penalty == 1.5  # the settings were loaded...
            torch.manual_seed(0)
            input_ids, attention_mask = utils.batch_inputs(prompt_ids, tokenizer.pad_token_id, "cpu", side="left")
            own = models["actor"].generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8)
            assert not torch.equal(own, sampled[path])  # ...and would change what is sampled
    assert torch.equal(sampled[tiny_models / "sft"], sampled[distorted])
    assert torch.equal(greedy[tiny_models / "sft"], greedy[distorted])


# ----------------------------------------------------------------------------- one update (tests/ppo_update_check.py)


def test_ptx_adds_ptx_coef_times_its_gradient_to_the_actors_step(tiny_models, tokenizer):
    """With plain SGD (lr 0.1) and no gradient clipping, the actor after one update with ptx_coef 2 minus the
    actor after the same update with ptx_coef 0 is -lr · 2 · ∇(PTX loss), the gradient computed here on its own:
    the SFT loss of the PTX minibatch, a mean over its label tokens. A PTX term left out of the backward, or
    weighed otherwise, fails."""
    args = check.arguments(str(tiny_models), max_grad_norm=1e9)
    episodes = check.rollout(args, PROCESS, tokenizer)
    weights = {}
    for ptx_coef in (0.0, 2.0):
        args.ptx_coef = ptx_coef
        stats, weights[ptx_coef] = check.update(args, PROCESS, tokenizer, episodes)
        assert stats["ptx_loss"] > 1.0  # computed (and logged) either way; only its weight differs
    actor = utils.load_model(args.actor_model_name_or_path, tokenizer)
    batches, _ = check.ptx(args, PROCESS, tokenizer)
    n_label_tokens = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in batches)
    loss = 0.0
    for input_ids, attention_mask, labels in batches:
        log_probs = F.log_softmax(actor(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1], -1)
        targets = labels[:, 1:]  # the logits at t predict token t + 1
        picked = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        loss = loss - (picked * (targets != -100)).sum() / n_label_tokens
    assert loss.item() == pytest.approx(stats["ptx_loss"], rel=1e-5)
    loss.backward()
    largest = 0.0
    for name, parameter in actor.named_parameters():
        step = weights[2.0]["actor"][name] - weights[0.0]["actor"][name]
        expected = -check.LEARNING_RATE * 2.0 * parameter.grad
        torch.testing.assert_close(step, expected, rtol=1e-3, atol=2e-7, msg=name)
        largest = max(largest, expected.abs().max().item())
    assert largest > 1e-3  # the PTX step is large enough to tell


def test_one_update_at_two_ranks_matches_one_process(tiny_models, tokenizer, tmp_path):
    """One PPO-Lag update with PTX on the same global minibatch: one process (4 micro-batches of 2, and 3 uneven
    ones of at most 3) against 2 ranks with DDP and with FSDP (one torchrun launch). The losses summed over ranks
    and the weights after the step (plain SGD) must agree: a loss normalised per rank, or scaled by the rank count,
    would not."""
    args = check.arguments(str(tiny_models))
    episodes = check.rollout(args, PROCESS, tokenizer)
    reference, weights = check.update(args, PROCESS, tokenizer, episodes)
    assert reference["ptx_loss"] > 1.0 and reference["actor_loss"] != 0.0 and reference["cost_value_loss"] > 0.0
    uneven = check.arguments(str(tiny_models), micro_batch_size=3)
    others = {"one_uneven": check.update(uneven, PROCESS, tokenizer, episodes)}
    torchrun("tests/ppo_update_check.py", tiny_models, tmp_path)
    for out in ("ddp", "fsdp"):
        stats = json.loads((tmp_path / out / "stats.json").read_text())
        others[out] = stats, torch.load(tmp_path / out / "weights.pt", weights_only=True)
    for out, (stats, other) in others.items():
        for key, value in reference.items():
            assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (out, key)
        for model in weights:
            assert weights[model].keys() == other[model].keys()
            for name in weights[model]:
                assert torch.allclose(weights[model][name], other[model][name], atol=1e-5), (out, model, name)


# ----------------------------------------------------------------------------- end to end


def read(output_dir, split="train"):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_lambda_is_updated_first_and_the_update_uses_it(tiny_models, tmp_path, monkeypatch):
    """main() steps λ on the window that already holds this iteration's costs, then gives the new λ to every PPO
    update of the iteration; the delay holds λ; PTX is in the loss; training_curves.png is drawn at the end."""
    used = []  # the λ each PPO update was given
    real_update = ppo.ppo_update

    def spy(*args):
        used.append(args[7])  # lagrange_multiplier
        return real_update(*args)

    monkeypatch.setattr(ppo, "ppo_update", spy)
    changes = dict(iterations=5, lambda_update_delay=2, episode_cost_window=16, lambda_init=0.5, lambda_lr=0.3)
    ppo.main(tiny_args(tiny_models, tmp_path, threshold=0.0, ptx_coef=1.0, **changes))
    records = read(tmp_path)
    assert len(records) == 5
    log_lambda = math.log(0.5)
    for i, record in enumerate(records):
        # The window (16 episodes) holds this iteration's 8 episodes and the previous iteration's 8.
        window = [r["cost"] for r in records[max(0, i - 1) : i + 1]]
        assert record["episode_cost"] == pytest.approx(sum(window) / len(window), abs=1e-5)
        if i >= 2:  # iterations 0 and 1 are the delay
            log_lambda = ppo.lagrange_multiplier_update(log_lambda, record["episode_cost"], 0.0, 0.3, 1.0)
        assert record["lambda"] == pytest.approx(math.exp(log_lambda), rel=1e-6)
        # Both minibatches of iteration i were updated with λ from the window that holds iteration i's costs.
        assert used[2 * i : 2 * i + 2] == pytest.approx([record["lambda"]] * 2, rel=1e-9)
    assert used[4] != used[3]  # λ moved after the delay
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    # the SFT loss of a random model on toy conversations is near log(vocabulary) ≈ 5.9
    assert all(3.0 < r["ptx_loss"] < 8.0 for r in records)
    # The curves: a real PNG, with something drawn on it.
    with Image.open(tmp_path / "training_curves.png") as image:
        assert image.format == "PNG" and image.width > image.height > 100
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 10


def test_baselines_run_with_their_own_critics(tiny_models, tmp_path):
    ppo.main(tiny_args(tiny_models, tmp_path / "ppo", algorithm="ppo", iterations=1))
    [record] = read(tmp_path / "ppo")
    assert record["lambda"] == 0.0 and record["cost"] == 0.0 and record["ptx_loss"] == 0.0  # no PTX by default
    assert os.path.isdir(tmp_path / "ppo" / "reward_critic") and not os.path.exists(tmp_path / "ppo" / "cost_critic")
    ppo.main(tiny_args(tiny_models, tmp_path / "shaping", algorithm="reward_shaping", cost_coef=2.0, iterations=1))
    [record] = read(tmp_path / "shaping")
    assert record["lambda"] == 0.0 and record["cost"] != 0  # reward shaping scores C too
    assert not os.path.exists(tmp_path / "shaping" / "cost_critic")
    assert ppo.default_output_dir(ppo.Args(algorithm="reward_shaping", cost_coef=2.0)) == "output/reward_shaping_2.0"
    assert ppo.default_output_dir(ppo.Args()) == "output/ppo_lag"
    assert ppo.default_output_dir(ppo.Args(algorithm="ppo")) == "output/ppo"


def test_resume_on_another_number_of_ranks_stops_with_both_counts(tiny_models, tmp_path):
    ppo.main(tiny_args(tiny_models, tmp_path, iterations=2, max_iterations=1, rollout_batch_size=4))
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    state["rng"] = state["rng"] * 2  # as if saved by a run on 2 ranks
    torch.save(state, tmp_path / "training_state.pt")
    with pytest.raises(utils.UserError, match=r"saved by a run on 2 rank\(s\) and this one has 1"):
        ppo.main(tiny_args(tiny_models, tmp_path, iterations=2, rollout_batch_size=4, resume=True))


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


def test_two_ranks_match_one_process_through_a_ddp_then_fsdp_resume(tiny_models, tmp_path):
    """The same global batches at 1 and 2 ranks: --top_k 1 makes sampling independent of each rank's seed and
    one minibatch per iteration makes the global minibatch the whole batch. Two ranks with a full copy of each
    model (DDP, stopped after 2 iterations) and resumed with every model sharded (FSDP), gradient checkpointing
    and PTX on, log the losses, Ĵ_C and λ of one process and end with its weights, its λ and its judged answers.
    λ is the same on every rank: a rank with another λ would weigh the cost advantages otherwise and the
    averaged gradients, so the weights, would differ; and Ĵ_C's window holds every rank's episodes."""
    prompts = tmp_path / "prompts_6.jsonl"
    prompts.write_text("".join(open("toy_world/data/prompts_eval.jsonl").readlines()[::12]))
    changes = dict(top_k=1, rollout_batch_size=8, minibatch_size=8, micro_batch_size=2, lambda_lr=0.5, threshold=-100)
    changes.update(lambda_init=0.5, save_every=1, gradient_checkpointing=True, ptx_coef=1.0, eval_prompts=str(prompts))
    ppo.main(tiny_args(tiny_models, tmp_path / "one", **changes))
    flags = vars(tiny_args(tiny_models, tmp_path / "two", **changes))
    torchrun("ppo_lagrangian.py", **dict(flags, max_iterations=2))
    state = torch.load(tmp_path / "two" / "training_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2 and "log_lambda_per_rank" not in state
    assert len(state["episode_costs"]) == 16  # both iterations' 8 episodes, both ranks' 4 each
    torchrun("ppo_lagrangian.py", **dict(flags, fsdp=True, resume=True))
    one, two = read(tmp_path / "one"), read(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    keys = ("reward", "cost", "kl", "episode_cost", "lambda", "actor_loss", "reward_value_loss", "cost_value_loss")
    for a, b in zip(one, two):
        for key in (*keys, "ptx_loss", "actor_lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert one[2]["episode_cost"] == pytest.approx(sum(r["cost"] for r in one) / 3, abs=1e-5)
    states = [torch.load(tmp_path / run / "training_state.pt", weights_only=True) for run in ("one", "two")]
    assert states[1]["log_lambda"] == pytest.approx(states[0]["log_lambda"], rel=1e-6)
    assert states[0]["log_lambda"] > math.log(0.5)  # threshold -100 is violated: λ rose from 0.5
    judged = [read(tmp_path / run, "eval")[-1] for run in ("one", "two")]
    assert judged[0] == judged[1] and judged[0]["step"] == 3
    for part in ("model.safetensors", "reward_critic/model.safetensors", "cost_critic/model.safetensors"):
        a, b = load_file(tmp_path / "one" / part), load_file(tmp_path / "two" / part)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5), (part, name)


def test_the_users_command_at_eight_ranks_with_the_default_batches(tiny_models, tmp_path):
    """`torchrun --nproc_per_node=8 ppo_lagrangian.py` with the default --rollout_batch_size 48, --minibatch_size 24
    and --micro_batch_size 24: each rank takes 6 prompts and minibatches of 3. The first rollout is one process's
    (--top_k 1 makes the sampling independent of each rank's seed): the same rewards, costs, Ĵ_C and λ, and Ĵ_C's
    window holds all eight ranks' episodes. (From the first update on the runs differ: a rank's minibatch of 3 comes
    from its own 6 episodes, so a global minibatch holds other episodes than one process's; the 2-rank tests, with
    one minibatch per iteration, match updates too.)"""
    batches = dict(rollout_batch_size=48, minibatch_size=24, micro_batch_size=24)
    assert batches == {key: getattr(ppo.Args(), key) for key in batches}
    changes = dict(top_k=1, iterations=2, lambda_lr=0.5, threshold=-100, **batches)
    ppo.main(tiny_args(tiny_models, tmp_path / "one", **changes))
    torchrun("ppo_lagrangian.py", nproc=8, **vars(tiny_args(tiny_models, tmp_path / "eight", **changes)))
    one, eight = read(tmp_path / "one"), read(tmp_path / "eight")
    assert [r["step"] for r in eight] == [r["step"] for r in one] == [1, 2]
    for key in ("reward", "cost", "kl", "episode_cost", "lambda"):
        assert eight[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-6), key
    states = [torch.load(tmp_path / run / "training_state.pt", weights_only=True) for run in ("one", "eight")]
    assert len(states[1]["rng"]) == 8 and len(states[1]["episode_costs"]) == 96  # two batches of 48, all ranks'
    first = [sorted(state["episode_costs"][:48]) for state in states]  # the first rollout's 48 episodes
    assert first[1] == pytest.approx(first[0], abs=1e-5)
    assert one[1]["lambda"] > ppo.Args().lambda_init  # threshold -100 is violated: λ rose
