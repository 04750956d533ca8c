"""The per-prompt constraint (--constraint per_prompt, RePO's rectified cost): its equation by hand, λ's window and
threshold, the cost stream of the rollout, and a run at two ranks, stopped and resumed, against one process."""

import math

import pytest
import torch
from conftest import torchrun
from test_ppo_lagrangian import PROCESS, PROMPTS, read, saved_and_loaded, stand_ins, tiny_args

import ppo_lagrangian as ppo
import utils


def test_rectified_cost_by_hand():
    """{C}⁺ = max(0, C): a safe answer (C <= 0, the boundary included) costs nothing, an unsafe one its cost."""
    costs = torch.tensor([-3.0, 0.0, 2.5, 60.0, -0.25])
    assert ppo.rectified_cost(costs).tolist() == [0.0, 0.0, 2.5, 60.0, 0.0]


def test_per_prompt_lambda_sees_only_violations_against_zero():
    """Ĵ is the window's mean of {C}⁺ and the threshold is C's boundary 0 whatever --threshold says, so λ never
    falls: it rises while any answer in the window is unsafe and holds once all are safe. The expected-cost λ on the
    same costs falls (their mean is below its threshold)."""
    step = dict(lambda_init=0.5, lambda_lr=0.1, lambda_max=5.0, episode_cost_window=4, threshold=-0.5)
    per_prompt, expected = (ppo.LagrangeMultiplier(ppo.Args(constraint=c, **step)) for c in ("per_prompt", "expected"))
    assert per_prompt.threshold == 0.0 and expected.threshold == -0.5
    # Costs -4 and 2: the expected constraint sees Ĵ_C = -1 < -0.5 (λ falls); the per-prompt one sees (0 + 2) / 2 = 1.
    assert per_prompt.update([-4.0, 2.0], 0) == pytest.approx(1.0)
    assert per_prompt.value == pytest.approx(0.5 * math.exp(0.1 * 0.5 * 1.0))
    assert expected.update([-4.0, 2.0], 0) == pytest.approx(-1.0)
    assert expected.value == pytest.approx(0.5 * math.exp(0.1 * 0.5 * -0.5))
    # Two very safe answers cannot pay for the unsafe one: the window [0, 2, 0, 0] still violates, λ still rises.
    lagrange_multiplier = per_prompt.value
    assert per_prompt.update([-10.0, -10.0], 1) == pytest.approx(0.5)
    assert per_prompt.value == pytest.approx(lagrange_multiplier * math.exp(0.1 * lagrange_multiplier * 0.5))
    resumed = saved_and_loaded(per_prompt, ppo.Args(constraint="per_prompt", **step))
    assert list(resumed.episode_costs) == [0.0, 2.0, 0.0, 0.0] and resumed.value == per_prompt.value
    # Every answer in the window safe: Ĵ = 0, on the boundary; λ holds.
    for one in (per_prompt, resumed):
        before = one.value
        assert one.update([-1.0, -2.0, -3.0, -4.0], 2) == 0.0
        assert one.value == pytest.approx(before)


def test_per_prompt_cost_stream_takes_the_rectified_cost(tiny_models, tokenizer, tmp_path):
    """With β = 0, γ = λ_GAE = 1 the cost stream's return at every response token is the response's terminal cost:
    {C}⁺ with --constraint per_prompt, C itself with the expected constraint. The reward stream and the logged (raw)
    costs do not change."""
    cost = [-3.0, 2.0, 0.5]
    returns = {}
    for constraint in ("expected", "per_prompt"):
        args = tiny_args(tiny_models, tmp_path, constraint=constraint, kl_coef=0.0, gamma=1.0, gae_lambda=1.0)
        actor = utils.load_model(args.actor_model_name_or_path, tokenizer)
        torch.manual_seed(0)
        episodes = ppo.rollout(args, stand_ins(actor, tokenizer, [1.0, 1.0, 1.0], cost), tokenizer, PROMPTS, PROCESS)
        mask = episodes.batch["mask"].bool()
        terminal = [episodes.batch["cost_returns"][row][mask[row]].unique().tolist() for row in range(3)]
        returns[constraint] = (terminal, episodes.batch["reward_returns"])
        assert episodes.cost.tolist() == cost
    assert returns["expected"][0] == [[-3.0], [2.0], [0.5]]
    assert returns["per_prompt"][0] == [[0.0], [2.0], [0.5]]
    assert torch.equal(returns["expected"][1], returns["per_prompt"][1])


def test_per_prompt_at_two_ranks_stopped_and_resumed_matches_one_process(tiny_models, tmp_path):
    """--constraint per_prompt under torchrun: two ranks (stopped after 2 iterations, then --resume) log the costs,
    Ĵ (the mean of {C}⁺ over every rank's episodes), λ and losses of one process on the same global batches (--top_k
    1 makes the sampling independent of each rank's seed) and end with its λ. Its own defaults: output folder and
    one constraint per algorithm."""
    changes = dict(constraint="per_prompt", top_k=1, rollout_batch_size=8, minibatch_size=8, micro_batch_size=2)
    changes.update(lambda_lr=0.5, lambda_init=0.5, save_every=1)
    ppo.main(tiny_args(tiny_models, tmp_path / "one", **changes))
    flags = vars(tiny_args(tiny_models, tmp_path / "two", **changes))
    torchrun("ppo_lagrangian.py", **dict(flags, max_iterations=2))
    torchrun("ppo_lagrangian.py", **dict(flags, resume=True))
    one, two = read(tmp_path / "one"), read(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("reward", "cost", "episode_cost", "lambda", "actor_loss", "cost_value_loss", "threshold"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert all(r["threshold"] == 0.0 and r["episode_cost"] >= 0 for r in one)
    assert any(r["cost"] < r["episode_cost"] for r in one)  # some answers were safe: the rectification acted
    assert [r["lambda"] for r in one] == sorted(r["lambda"] for r in one)  # λ never falls
    assert ppo.default_output_dir(ppo.Args(constraint="per_prompt")) == "output/ppo_lag_per_prompt"
    with pytest.raises(utils.UserError, match="--constraint per_prompt is PPO-Lag's"):
        ppo.main(tiny_args(tiny_models, tmp_path / "ppo", constraint="per_prompt", algorithm="ppo"))
