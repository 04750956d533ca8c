r"""Stage 4: PPO-Lagrangian, the heart of Safe RLHF (eqs. 7-10), with the PPO and reward-shaping baselines.

    python ppo_lagrangian.py                                         # PPO-Lag on the toy world -> output/ppo_lag
    python ppo_lagrangian.py --algorithm ppo                         # reward only, λ ≡ 0 -> output/ppo
    python ppo_lagrangian.py --algorithm reward_shaping --cost_coef 1  # fixed R - ν·C -> output/reward_shaping_1.0
    python ppo_lagrangian.py --resume                                # continue an interrupted run
    torchrun --nproc_per_node=8 ppo_lagrangian.py                    # on 8 ranks, the same global batches

The paper's 7B run on 8 GPUs, with the original's hyperparameters and where ours differ: docs/gpu.md.

Safe RLHF solves   max_θ J_R(θ)  s.t.  J_C(θ) = E[C(y, x)] + d <= 0   through its Lagrangian dual
min_θ max_{λ>=0} -J_R(θ) + λ J_C(θ): PPO updates of the policy alternate with gradient ascent on λ.

One iteration: sample prompts -> generate (KV cache, sampling at a temperature, left-padded prompts, stop at
EOS) -> score with R and C at the last response token -> per-token rewards and costs (KL penalty, score at
the last token) -> GAE for each stream with its critic -> update λ from the window of recent episode costs
(this batch's included) -> advantage (A_R - λ A_C) / (1 + λ) with the new λ -> minibatch PPO updates (clipped
surrogate for the actor, clipped value loss for the critics). The order is the original code's.
"""

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm
from transformers import AutoConfig

import utils


@dataclass
class Args:
    algorithm: Literal["ppo_lag", "ppo", "reward_shaping"] = "ppo_lag"
    """ppo_lag (Safe RLHF), ppo (reward only, λ ≡ 0) or reward_shaping (fixed R - ν·C)"""
    constraint: Literal["expected", "per_prompt"] = "expected"
    """PPO-Lag's constraint: expected (the paper's: E[C] <= threshold) or per_prompt (RePO's: C(x, y) <= 0 for every
    answer; the cost stream and Ĵ_C take {C}⁺ = max(0, C) and the threshold is C's boundary, 0): docs/per_prompt.md"""
    cost_coef: float = 1.0
    """ν: reward shaping's fixed cost coefficient, the reward is R - ν·C (reward_shaping only)"""
    actor_model_name_or_path: str = "output/sft"
    """the policy's initialisation and the frozen reference"""
    reward_model: str = "output/reward"
    """frozen reward model R; also the reward critic's initialisation"""
    cost_model: str = "output/cost"
    """frozen cost model C; also the cost critic's initialisation"""
    reward_critic_model: str = ""
    """reward critic's initialisation (default: the reward model); must share the actor's tokenizer"""
    cost_critic_model: str = ""
    """cost critic's initialisation (default: the cost model); must share the actor's tokenizer"""
    prompts: str = "toy_world/data/prompts_train.jsonl"
    """RL prompts: a .jsonl/.json file with `prompt` or a hub name"""
    prompts_split: str = "train"
    """split of a hub prompt dataset"""
    eval_prompts: str = "toy_world/data/prompts_eval.jsonl"
    """prompts answered greedily at the end and judged if they are toy prompts ('none' to skip)"""
    output_dir: str = ""
    """default: output/ppo_lag, output/ppo or output/reward_shaping_<ν>"""
    iterations: int = 100
    """rollout + update iterations"""
    epochs: float = 0.0
    """if > 0: passes over the unique prompts instead of --iterations (the original runs one: --epochs 1)"""
    max_iterations: int = -1
    """stop after this many iterations, e.g. to split a run with --resume (the schedule still spans the whole run)"""
    rollout_batch_size: int = 48
    """prompts per iteration, over all ranks"""
    minibatch_size: int = 24
    """sequences per PPO update, over all ranks"""
    micro_batch_size: int = 24
    """most sequences per forward pass on one rank; each rank takes minibatch_size / ranks and accumulates"""
    ppo_epochs: int = 1
    """passes over each rollout batch"""
    actor_lr: float = 5e-5
    """actor AdamW learning rate (paper: 1e-5)"""
    critic_lr: float = 5e-4
    """critics' AdamW learning rate (paper: 5e-6)"""
    actor_weight_decay: float = 0.01
    """actor AdamW weight decay (none on biases and norm weights)"""
    critic_weight_decay: float = 0.0
    """critics' AdamW weight decay"""
    actor_lr_schedule: Literal["cosine", "constant"] = "cosine"
    """actor learning rate after warmup: cosine (decays to 0 at the last update) or constant"""
    critic_lr_schedule: Literal["cosine", "constant"] = "constant"
    """critics' learning rate: cosine (after warmup) or constant (no warmup, as transformers' 'constant')"""
    warmup_ratio: float = 0.03
    """share of the optimizer steps with a linear warmup of the learning rates"""
    max_grad_norm: float = 1.0
    """gradient clipping of actor and critics"""
    kl_coef: float = 0.1
    """β: the KL penalty β(log π - log π_ref), subtracted from the reward and added to the cost per token"""
    clip_range_ratio: float = 0.2
    """PPO ratio clip ε"""
    clip_range_value: float = 5.0
    """value clip of the critics' loss"""
    clip_range_score: float = 50.0
    """each token's reward and cost (score + KL term) is clipped to ±this, as the original"""
    gamma: float = 1.0
    """GAE discount γ"""
    gae_lambda: float = 0.95
    """λ_GAE of the advantage estimate (not the Lagrange multiplier λ)"""
    threshold: float = -5.5
    """-d: the constraint is E[C] <= threshold (C > 0 is unsafe)"""
    lambda_init: float = 0.25
    """initial Lagrange multiplier λ (> 0: it is kept as log λ)"""
    lambda_lr: float = 0.05
    """step size of the gradient ascent on log λ"""
    lambda_max: float = 1.0
    """λ is clamped to [0, lambda_max]"""
    lambda_update_delay: int = 0
    """iterations before λ starts to move"""
    lambda_update: Literal["gradient_ascent", "pid"] = "gradient_ascent"
    """how λ follows the constraint: gradient_ascent (the original's, on log λ) or pid (a PID controller)"""
    pid_kp: float = 0.05
    """PID: proportional gain, λ per unit of Ĵ_C - threshold"""
    pid_ki: float = 0.005
    """PID: integral gain, λ per unit of the accumulated violation"""
    pid_kd: float = 0.05
    """PID: derivative gain, λ per unit of rise of Ĵ_C in one iteration"""
    pid_smoothing: float = 0.0
    """PID: exponential smoothing (0: none) of the violation for P and of the cost for D"""
    episode_cost_window: int = 128
    """Ĵ_C is the mean cost of the last this-many episodes of all ranks together (the original keeps 128 per
    rank: pass 128 x ranks to reproduce it)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""
    top_k: int = 0
    """sample from the top_k most likely tokens only (0: all, the distribution the PPO ratio and KL assume; the
    original samples with transformers' default top-k 50: pass 50 to reproduce it)"""
    max_prompt_length: int = 48
    """prompt tokens kept (the start of longer prompts is cut)"""
    max_new_tokens: int = 48
    """longest response"""
    ptx_coef: float = 0.0
    """weight of the PTX loss (SFT loss on ptx_dataset mixed into the actor update; paper: 16)"""
    ptx_dataset: str = "toy_world/data/sft_train.jsonl"
    """SFT data for the PTX loss: a .jsonl/.json file or a hub name"""
    ptx_split: str = "train"
    """split of a hub PTX dataset"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """float32, bfloat16 (mixed precision), or auto: bf16 on a GPU that has it, fp32 on CPU"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of actor and critics"""
    fsdp: bool = False
    """under torchrun, shard all six models over the ranks (PyTorch FSDP) instead of a full copy per rank:
    how the paper's 7B setup fits on 8 x 80 GB"""
    seed: int = 42
    """seed of sampling and prompt order"""
    save_every: int = 50
    """iterations between checkpoints (and at the end)"""
    sample_every: int = 20
    """iterations between logging a few sampled responses"""
    resume: bool = False
    """continue from the checkpoint in output_dir"""


# ----------------------------------------------------------------------------- the math


def token_log_probs(logits, tokens, temperature):
    """log π(token) under logits / temperature; logits (B, N, V) already aligned with tokens (B, N)."""
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.gather(-1, tokens[..., None]).squeeze(-1)


def per_token_rewards(score, log_probs, ref_log_probs, mask, kl_coef, clip_range_score, kl_sign):
    """r_t = kl_sign · β (log π_θ - log π_ref)(t) on every response token, + the score at the last one,
    then clipped to ±clip_range_score (the whole tensor, as the original code).

    The reward stream takes kl_sign = -1 (KL is a penalty); the cost stream takes +1 (KL is a cost).
    In (A_R - λ A_C) / (1 + λ) the two add up to the same -β·KL for every λ.
    Tokens after the first EOS (mask 0) get nothing.
    """
    rewards = kl_sign * kl_coef * (log_probs - ref_log_probs) * mask  # (B, N)
    last = mask.sum(-1).long() - 1  # index of the last response token (the EOS)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += score
    return rewards.clamp(-clip_range_score, clip_range_score)


def gae(rewards, values, mask, gamma, gae_lambda):
    """Generalised advantage estimation over response tokens, and the critic's targets.

    δ_t = r_t + γ V_{t+1} - V_t ;   A_t = δ_t + γ λ_GAE A_{t+1} ;   returns_t = A_t + V_t
    with V and r zero after the first EOS, so the episode ends at the EOS. (λ_GAE is `gae_lambda`, not
    the Lagrange multiplier.)
    """
    values, rewards = values * mask, rewards * mask  # (B, N)
    advantages = torch.zeros_like(rewards)  # (B, N)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(values[:, t])  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = delta + gamma * gae_lambda * next_advantage  # (B,)
        advantages[:, t] = next_advantage
    return advantages * mask, (advantages + values) * mask  # (B, N) each


def combined_advantages(reward_advantages, cost_advantages, lagrange_multiplier):
    """The policy maximises  J_R - λ J_C, scaled by 1 / (1 + λ) to keep the step size stable:
    A = (A_R - λ A_C) / (1 + λ)."""
    return (reward_advantages - lagrange_multiplier * cost_advantages) / (1 + lagrange_multiplier)


def sequence_mean(values, mask, n_sequences=None):
    """E_t as the original code takes it: the mean over each sequence's response tokens, then over the
    sequences, so a long response weighs as much as a short one. With `n_sequences` (a whole minibatch's,
    over all ranks) a micro-batch gives its share of the minibatch mean: the sum of its sequences' means
    divided by n_sequences, whatever the split over micro-batches and ranks."""
    per_sequence = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    return per_sequence.sum() / (mask.size(0) if n_sequences is None else n_sequences)


def actor_loss(log_probs, old_log_probs, advantages, mask, clip_range_ratio, n_sequences=None):
    """PPO clipped surrogate: -E_t[ min(ρ_t A_t, clip(ρ_t, 1 - ε, 1 + ε) A_t) ],  ρ_t = π_θ / π_old."""
    ratio = torch.exp(log_probs - old_log_probs)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_range_ratio, 1 + clip_range_ratio) * advantages)
    return -sequence_mean(surrogate, mask, n_sequences), ratio


def value_loss(values, old_values, returns, mask, clip_range_value, n_sequences=None):
    """Clipped value loss: ½ E_t[ max((V - R̂)², (V_old + clip(V - V_old, ±c) - R̂)²) ]."""
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    squared_error = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * sequence_mean(squared_error, mask, n_sequences)


def rectified_cost(cost):
    """The per-prompt constraint (RePO, Peng et al. 2024): C(x, y) <= 0 for every answer, not only on average. An
    answer counts only as far as it crosses C's own boundary, {C(x, y)}⁺ = max(0, C(x, y)): a safe answer costs
    nothing however safe it is, so very safe answers to some prompts cannot pay for unsafe answers to others, and
    E[{C}⁺] <= 0 holds only when every answer is safe."""
    return cost.clamp(min=0)


def lagrange_multiplier_update(log_lambda, episode_cost, threshold, lambda_lr, lambda_max):
    """Gradient ascent on the dual:  ∂/∂(log λ) [λ (Ĵ_C - threshold)] = λ (Ĵ_C - threshold),
    log λ ← log λ + α_λ λ (Ĵ_C - threshold); then λ is clamped to [0, λ_max] (log λ <= log λ_max)."""
    log_lambda = log_lambda + lambda_lr * math.exp(log_lambda) * (episode_cost - threshold)
    return min(log_lambda, math.log(lambda_max))


# PID Lagrangian (Stooke, Achiam & Abbeel, 2020, Algorithm 2). Gradient ascent is the integral term
# alone; P reacts to the violation now, D to the cost's rise, and together they damp the overshoot.
#   Δ = Ĵ_C - threshold;   I ← max(0, I + Δ);   ∂ = max(0, J̃_C - J̃_C,previous)
#   λ = clip(K_P Δ̃ + K_I I + K_D ∂, 0, λ_max)
# with Δ̃ and J̃_C exponentially smoothed (α = pid_smoothing; 0: the raw values).
def pid_lagrange_multiplier_update(controller, episode_cost, threshold, kp, ki, kd, smoothing, lambda_max):
    """One step of the controller; `controller` holds integral, violation (Δ̃) and cost (J̃_C, None at
    first). Returns (λ, the new controller state)."""
    violation = episode_cost - threshold
    integral = max(0.0, controller["integral"] + violation)
    smoothed_violation = smoothing * controller["violation"] + (1 - smoothing) * violation
    previous_cost = controller["cost"]
    cost = episode_cost if previous_cost is None else smoothing * previous_cost + (1 - smoothing) * episode_cost
    rise = 0.0 if previous_cost is None else max(0.0, cost - previous_cost)
    lagrange_multiplier = min(max(0.0, kp * smoothed_violation + ki * integral + kd * rise), lambda_max)
    return lagrange_multiplier, {"integral": integral, "violation": smoothed_violation, "cost": cost}


def token_mean(values, mask):
    """Mean of `values` over the tokens where mask is 1 (for the log)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def explained_variance(values, returns, mask):
    """1 - Var(R̂ - V) / Var(R̂) over response tokens: 1 is a perfect critic, 0 no better than a constant."""

    def variance(x):
        return token_mean((x - token_mean(x, mask)) ** 2, mask)

    return (1 - variance(returns - values) / variance(returns).clamp(min=1e-8)).item()


class LagrangeMultiplier:
    """λ and all it depends on, in one place: log λ (kept in log space, as the original) or the PID controller's
    state, and the window of recent episode costs whose mean is Ĵ_C (of {C}⁺ for the per-prompt constraint, whose
    threshold is 0). Every rank holds the same one."""

    def __init__(self, args):
        self.args, self.episode_costs = args, deque(maxlen=args.episode_cost_window)
        self.threshold = 0.0 if args.constraint == "per_prompt" else args.threshold
        self.log_lambda = math.log(args.lambda_init) if args.algorithm == "ppo_lag" else -math.inf  # λ ≡ 0 otherwise
        # PID: the integral starts where K_I I = lambda_init, so both updates start from the same λ.
        self.controller = dict(
            integral=args.lambda_init / args.pid_ki if args.pid_ki else 0.0, violation=0.0, cost=None
        )

    @property
    def value(self):
        return math.exp(self.log_lambda)

    def update(self, costs, iteration):
        """Ĵ_C, the mean cost of the window once it holds `costs` (this iteration's episodes, every rank's), then one
        step of λ on it (PPO-Lag only, after --lambda_update_delay iterations). Returns Ĵ_C."""
        args = self.args
        self.episode_costs.extend(
            rectified_cost(torch.tensor(costs)).tolist() if args.constraint == "per_prompt" else costs
        )
        episode_cost = sum(self.episode_costs) / len(self.episode_costs)
        if args.algorithm == "ppo_lag" and iteration >= args.lambda_update_delay and args.lambda_update == "pid":
            pid = (args.pid_kp, args.pid_ki, args.pid_kd, args.pid_smoothing, args.lambda_max)
            lagrange_multiplier, self.controller = pid_lagrange_multiplier_update(
                self.controller, episode_cost, self.threshold, *pid
            )
            self.log_lambda = math.log(lagrange_multiplier) if lagrange_multiplier > 0 else -math.inf
        elif args.algorithm == "ppo_lag" and iteration >= args.lambda_update_delay:
            step = (self.threshold, args.lambda_lr, args.lambda_max)
            self.log_lambda = lagrange_multiplier_update(self.log_lambda, episode_cost, *step)
        return episode_cost

    def state_dict(self):
        return dict(log_lambda=self.log_lambda, controller=self.controller, episode_costs=list(self.episode_costs))

    def load_state_dict(self, state):
        self.log_lambda, self.controller = state["log_lambda"], state["controller"]
        self.episode_costs.extend(state["episode_costs"])


# ----------------------------------------------------------------------------- rollout


def response_mask(responses, eos_token_id):
    """1 on response tokens up to and including the first EOS, 0 after it (B, N)."""
    is_eos = (responses == eos_token_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).float()


def actor_forward(model, sequences, attention_mask, prompt_length):
    """Logits of the response tokens: the logits at position t predict token t + 1, hence the shift.
    Only the last N + 1 positions go through the LM head (logits_to_keep): the prompt's are never used."""
    n_response = sequences.shape[1] - prompt_length
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=utils.position_ids(attention_mask),
        logits_to_keep=n_response + 1,
    ).logits  # positions prompt_length - 1 .. end (all positions for a model that ignores logits_to_keep)
    return logits[:, -(n_response + 1) : -1]  # (B, N, V), aligned with sequences[:, prompt_length:]


def critic_values(critic, sequences, attention_mask, prompt_length):
    """V(s_t) for each response token: the critic's score at the position just before it."""
    return critic(sequences, attention_mask)[:, prompt_length - 1 : -1]  # (B, N)


def end_scores(scorer, scorer_tokenizer, tokenizer, sequences, attention_mask, prompts, response_ids, max_length):
    """R or C of each response, read at its last token. A scorer with the actor's tokenizer reads the sequences as
    they are (the original's choice); another re-tokenises the text, as the original's batch_retokenize does."""
    if scorer_tokenizer.get_vocab() == tokenizer.get_vocab():
        return scorer(sequences, attention_mask, end=True)  # (B,)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
    ended = [len(ids) > 0 and ids[-1] == tokenizer.eos_token_id for ids in response_ids]
    return score_texts(scorer, scorer_tokenizer, prompts, texts, max_length, ended)  # (B,)


@dataclass
class Rollout:
    """One rollout batch: what the PPO update needs (`batch`) and what the log shows."""

    batch: dict  # tensors with one row per episode: sequences, attention_mask, mask, log_probs, and per stream
    # (reward, cost) its values, advantages and returns; ppo_update takes minibatches of their rows
    prompt_length: int  # P: sequences[:, :P] are the left-padded prompts, sequences[:, P:] the responses
    reward: torch.Tensor  # (B,) R of each response
    cost: torch.Tensor  # (B,) C of each response (0 for PPO, which has no cost model)
    stats: dict  # means over the batch, for the log
    texts: list  # the responses, decoded


@torch.no_grad()
def rollout(args, models, tokenizer, prompts, process):
    """Generate responses to `prompts` and compute everything the PPO update needs.

    models: "actor", "reference", "reward_critic", "cost_critic" (None for the baselines), and the frozen
    scorers "reward" and "cost" (None for PPO) as (model, its tokenizer). Forward passes run under the same
    autocast as the update, so old and new log-probs agree.
    """
    prompt_ids = [utils.tokenize_conversation(tokenizer, p, None, args.max_prompt_length)[0] for p in prompts]
    models["actor"].eval()  # generation with the KV cache on the unwrapped model
    sequences, prompt_length = utils.generate(
        models["actor"], tokenizer, prompt_ids, args.max_new_tokens, args.temperature, top_k=args.top_k
    )  # (B, P + N)
    responses = sequences[:, prompt_length:]  # (B, N)
    mask = response_mask(responses, tokenizer.eos_token_id)  # (B, N): 1 up to and including the first EOS
    prompt_mask = sequences[:, :prompt_length] != tokenizer.pad_token_id  # (B, P)
    attention_mask = torch.cat([prompt_mask.long(), mask.long()], dim=1)  # (B, P + N)
    response_ids = [row[: int(m.sum())] for row, m in zip(responses.tolist(), mask)]

    # Old log-probs with a full forward pass (not the generation's), the reference's, the scores, the values.
    inputs = (sequences, attention_mask, prompt_length)
    with process.autocast():
        logits = actor_forward(models["actor"], *inputs)  # (B, N, V)
        ref_logits = actor_forward(models["reference"], *inputs)  # (B, N, V)
        scored = (
            tokenizer,
            sequences,
            attention_mask,
            prompts,
            response_ids,
            args.max_prompt_length + args.max_new_tokens,
        )
        reward = end_scores(*models["reward"], *scored)  # (B,)
        cost = end_scores(*models["cost"], *scored) if models["cost"] is not None else torch.zeros_like(reward)  # (B,)
        reward_values = critic_values(models["reward_critic"], *inputs) * mask  # (B, N)
        if models["cost_critic"] is not None:
            cost_values = critic_values(models["cost_critic"], *inputs) * mask  # (B, N)
    log_probs = token_log_probs(logits, responses, args.temperature)  # (B, N)
    ref_log_probs = token_log_probs(ref_logits, responses, args.temperature)  # (B, N)
    tempered = F.log_softmax(logits.float() / args.temperature, dim=-1)  # (B, N, V)
    entropy = token_mean(-(tempered.exp() * tempered).sum(-1), mask)

    # The reward stream: R for PPO-Lag and PPO; R - ν·C for reward shaping (on the raw scores, as the original).
    score = reward - args.cost_coef * cost if args.algorithm == "reward_shaping" else reward
    rewards = per_token_rewards(score, log_probs, ref_log_probs, mask, args.kl_coef, args.clip_range_score, -1)
    reward_advantages, reward_returns = gae(rewards, reward_values, mask, args.gamma, args.gae_lambda)  # (B, N)
    batch = dict(sequences=sequences, attention_mask=attention_mask, mask=mask, log_probs=log_probs)
    batch.update(reward_values=reward_values, reward_advantages=reward_advantages, reward_returns=reward_returns)
    if models["cost_critic"] is not None:  # the cost stream: C, or {C}⁺ for the per-prompt constraint
        constrained = rectified_cost(cost) if args.constraint == "per_prompt" else cost
        costs = per_token_rewards(constrained, log_probs, ref_log_probs, mask, args.kl_coef, args.clip_range_score, +1)
        cost_advantages, cost_returns = gae(costs, cost_values, mask, args.gamma, args.gae_lambda)  # (B, N)
        batch.update(cost_values=cost_values, cost_advantages=cost_advantages, cost_returns=cost_returns)
    kl = ((log_probs - ref_log_probs) * mask).sum(-1)  # (B,): each response's KL estimate
    stats = dict(reward=reward.mean().item(), cost=cost.mean().item(), kl=kl.mean().item(), entropy=entropy.item())
    stats.update(response_length=mask.sum(-1).mean().item())
    stats.update(eos_rate=(responses == tokenizer.eos_token_id).any(-1).float().mean().item())
    stats.update(reward_explained_variance=explained_variance(reward_values, reward_returns, mask))
    if models["cost_critic"] is not None:
        stats["cost_explained_variance"] = explained_variance(cost_values, cost_returns, mask)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
    return Rollout(batch, prompt_length, reward, cost, stats, texts)


# ----------------------------------------------------------------------------- the update


UPDATE_STATISTICS = ("actor_loss", "approx_kl", "clip_fraction", "reward_value_loss", "cost_value_loss", "ptx_loss")


def ppo_update(args, process, wrapped, optimizers, schedulers, episodes, rows, lagrange_multiplier, ptx, where=""):
    """One optimizer step of the actor and of each critic on one minibatch: `rows`, this rank's rows of the
    Rollout's batch in it (args.minibatch_size rows over all ranks), in micro-batches of at most micro_batch_size;
    `ptx`: (one collated SFT batch per micro-batch, the label tokens of the whole PTX minibatch on all ranks).

    The actor minimises the clipped surrogate + ptx_coef · the PTX loss (the SFT loss, a mean over label tokens);
    each critic its clipped value loss. Each micro-batch's loss is its share of the minibatch mean over all
    ranks, so the step does not depend on how the minibatch is split. Returns {statistic: this rank's share};
    summed over ranks, the minibatch means. A nan or inf gradient stops the run before any model steps.
    """
    n_sequences, prompt_length, (ptx_batches, n_ptx_tokens) = args.minibatch_size, episodes.prompt_length, ptx
    chunks = [rows[i : i + args.micro_batch_size] for i in range(0, len(rows), args.micro_batch_size)]
    stats = torch.zeros(len(UPDATE_STATISTICS), device=episodes.reward.device)
    for micro_step, chunk in enumerate(chunks):
        for model in wrapped.values():  # DDP all-reduces gradients after the last micro step only
            model.require_backward_grad_sync = micro_step == len(chunks) - 1
        mb = {key: value[chunk] for key, value in episodes.batch.items()}  # this micro-batch's rows
        mask = mb["mask"]  # (b, N): 1 on the response tokens up to the first EOS
        inputs = (mb["sequences"], mb["attention_mask"], prompt_length)  # (b, P + N) twice, and P
        with process.autocast():
            logits = actor_forward(wrapped["actor"], *inputs)  # (b, N, V)
        log_probs = token_log_probs(logits, mb["sequences"][:, prompt_length:], args.temperature)  # (b, N)
        advantages = mb["reward_advantages"]  # (b, N)
        if "cost_advantages" in mb:
            advantages = combined_advantages(advantages, mb["cost_advantages"], lagrange_multiplier)  # (b, N)
        loss, ratio = actor_loss(log_probs, mb["log_probs"], advantages, mask, args.clip_range_ratio, n_sequences)
        ptx_loss = torch.zeros((), device=mask.device)
        if ptx_batches:  # PTX: next-token cross-entropy on SFT conversations (logits at t predict token t + 1)
            input_ids, attention_mask, labels = ptx_batches[micro_step]  # (b', T) each
            with process.autocast():
                ptx_logits = wrapped["actor"](input_ids=input_ids, attention_mask=attention_mask).logits
            ptx_logits = ptx_logits[:, :-1].float()  # (b', T - 1, V)
            ptx_loss = (
                F.cross_entropy(ptx_logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum") / n_ptx_tokens
            )
        # DDP and FSDP average gradients over ranks: scale back up so they are those of the global mean.
        ((loss + args.ptx_coef * ptx_loss) * process.world_size).backward()
        approx_kl = (ratio - 1) - torch.log(ratio)  # (b, N): the k3 estimator of KL(π_old ‖ π), per token
        clipped = ((ratio - 1).abs() > args.clip_range_ratio).float()  # (b, N)
        value_losses = [torch.zeros((), device=mask.device), torch.zeros((), device=mask.device)]
        for i, name in enumerate(("reward", "cost")):
            if f"{name}_critic" in wrapped:
                with process.autocast():
                    values = critic_values(wrapped[f"{name}_critic"], *inputs)  # (b, N)
                targets = (mb[f"{name}_values"], mb[f"{name}_returns"])  # (b, N) each: V_old and the GAE returns
                critic_loss = value_loss(values, *targets, mask, args.clip_range_value, n_sequences)
                (critic_loss * process.world_size).backward()
                value_losses[i] = critic_loss.detach()
        kl_and_clip = [sequence_mean(approx_kl.detach(), mask, n_sequences), sequence_mean(clipped, mask, n_sequences)]
        stats += torch.stack([loss.detach(), *kl_and_clip, *value_losses, ptx_loss.detach()])
    norms = {name: torch.nn.utils.clip_grad_norm_(m.parameters(), args.max_grad_norm) for name, m in wrapped.items()}
    for name, norm in norms.items():  # no model steps if any gradient is nan or inf
        utils.check_finite(norm, f"{where}the {name}'s update")
    for name in wrapped:
        optimizers[name].step()
        schedulers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
    return dict(zip(UPDATE_STATISTICS, stats))


# ----------------------------------------------------------------------------- data and models


def prompt_order(n_prompts, seed, position):
    """The prompt at `position` of the stream of epochs, each a seeded shuffle of all prompts."""
    epoch, index = divmod(position, n_prompts)
    return torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))[index].item()


def default_output_dir(args):
    if args.output_dir:
        return args.output_dir
    if args.constraint == "per_prompt":
        return "output/ppo_lag_per_prompt"
    return {"ppo_lag": "output/ppo_lag", "ppo": "output/ppo"}.get(
        args.algorithm, f"output/reward_shaping_{args.cost_coef}"
    )


# Copied from sft.make_examples
def make_examples(tokenizer, rows, max_length):
    """Token ids and labels (-100 on the prompt) for each row; rows with no response token left are dropped."""
    examples = []
    for row in rows:
        ids, prompt_length = utils.tokenize_conversation(tokenizer, row["prompt"], row["response"], max_length)
        labels = [-100] * prompt_length + ids[prompt_length:]
        if len(ids) > prompt_length:
            examples.append((ids, labels))
    if len(examples) < len(rows):
        utils.print0(f"dropped {len(rows) - len(examples)} rows whose prompt fills max_length={max_length}")
    return examples


# Copied from sft.collate
def collate(examples, pad_token_id, device):
    input_ids, attention_mask = utils.batch_inputs([ids for ids, _ in examples], pad_token_id, device)
    labels, _ = utils.batch_inputs([labels for _, labels in examples], -100, device)
    return input_ids, attention_mask, labels


def ptx_minibatch(args, ptx_examples, update_step, process, pad_token_id):
    """The PTX data of one update: minibatch_size SFT conversations, the same global batch at any number of ranks
    (epochs of seeded shuffles); this rank's share of them, collated per micro-batch, and the label tokens of the
    whole global batch (the PTX loss is their mean)."""
    if not ptx_examples:
        return [], 0
    examples = [ptx_examples[i] for i in utils.global_batch(len(ptx_examples), args.minibatch_size, args.seed, update_step)]  # fmt: skip
    n_tokens = sum(label != -100 for _, labels in examples for label in labels[1:])
    share = args.minibatch_size // process.world_size
    mine = examples[process.rank * share : (process.rank + 1) * share]
    chunks = [mine[i : i + args.micro_batch_size] for i in range(0, share, args.micro_batch_size)]
    return [collate(chunk, pad_token_id, process.device) for chunk in chunks], n_tokens


# Copied from evaluate.score_texts
@torch.no_grad()
def score_texts(model, tokenizer, prompts, responses, max_length, ended=None, batch_size=64):
    """End scores (N,) of texts under a ScoreModel with its own tokenizer, tokenised as the original (one string, cut
    at max_length; EOS after the responses that `ended`, by default all). The original's batch_retokenize."""
    ended = ended or [True] * len(prompts)
    ids = [utils.tokenize_conversation(tokenizer, p, r, max_length, e)[0] for p, r, e in zip(prompts, responses, ended)]
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    batches = [utils.batch_inputs(ids[i : i + batch_size], pad, device) for i in range(0, len(ids), batch_size)]
    return torch.cat([model(*batch, end=True) for batch in batches])


# Copied from sft.sample_and_judge
@torch.no_grad()
def sample_and_judge(model, tokenizer, prompt_rows, max_prompt_length, max_new_tokens):
    """Greedy answers to the prompts (three printed); for toy-world prompts, the judge's verdict on all of them."""
    from toy_world import world

    model.eval()
    prompts, responses, ends_with_eos = [row["prompt"] for row in prompt_rows], [], []
    for start in range(0, len(prompts), 64):
        ids = [utils.tokenize_conversation(tokenizer, p, None, max_prompt_length)[0] for p in prompts[start:][:64]]
        sequences, prompt_length = utils.generate(model, tokenizer, ids, max_new_tokens, greedy=True)
        for row in sequences[:, prompt_length:].tolist():
            ends_with_eos.append(tokenizer.eos_token_id in row)
            responses.append(tokenizer.decode(row, skip_special_tokens=True))
    for prompt, response in list(zip(prompts, responses))[:3]:
        utils.print0(f"  USER: {prompt}\n  ASSISTANT: {response}")
    if not all(world.task_of_prompt(p) for p in prompts):
        return {}
    summary = world.summarize(prompts, responses)
    summary["eos_rate"] = sum(ends_with_eos) / len(ends_with_eos)
    summary["well_formed_with_eos"] = sum(
        e and world.judge(p, r).well_formed for p, r, e in zip(prompts, responses, ends_with_eos)
    ) / len(prompts)
    return summary


def plot_training_curves(metrics_path, output_dir):
    """λ, the episode cost Ĵ_C against the threshold, the reward and the KL of this run, by iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        train = [record for record in map(json.loads, f) if record["split"] == "train"]
    steps = [record["step"] for record in train]
    figure, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    axes[0].plot(steps, [r["lambda"] for r in train], color="tab:purple")
    axes[1].plot(steps, [r["episode_cost"] for r in train], label="Ĵ_C (window)")
    axes[1].plot(steps, [r["cost"] for r in train], alpha=0.4, label="batch cost")
    axes[1].axhline(train[-1]["threshold"], color="black", linestyle="--", label="threshold")
    axes[1].legend(fontsize=8)
    axes[2].plot(steps, [r["reward"] for r in train], color="tab:green")
    axes[3].plot(steps, [r["kl"] for r in train], color="tab:gray")
    for axis, title in zip(axes, ("Lagrange multiplier λ", "Episode cost", "Reward", "KL(π ‖ π_ref) per response")):
        axis.set(title=title, xlabel="iteration")
    figure.suptitle(output_dir)
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "training_curves.png"), dpi=120)
    plt.close(figure)


def load_models(args, process, tokenizer, prompts, resumed_from=None):
    """The six models, dropout off in each: the actor (trained) and its frozen reference from the SFT model; the
    frozen reward and cost models with their own tokenizers (ours or the original's format); the reward and cost
    critics (trained), from R and C or --reward_critic_model / --cost_critic_model, which must share the actor's
    tokenizer. Returns (trained: {name: model}, wrapped: {name: as each rank trains it}, frozen: {name: ...})."""

    def prepared(model, train):  # dropout off (the PPO ratio is 1 before any update), then on this rank's device
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):  # functional dropout in attention
                module.attention_dropout = 0.0
        config = (model.model if isinstance(model, utils.ScoreModel) else model).config  # where a model reads it
        for key in [key for key, value in config.to_dict().items() if "dropout" in key and isinstance(value, float)]:
            setattr(config, key, 0.0)
        model = model if train else model.to(process.dtype).eval().requires_grad_(False)
        return model, utils.wrap(model, process, args)

    trained, wrapped, frozen = {}, {}, {}
    actor = utils.load_model(resumed_from or args.actor_model_name_or_path, tokenizer)
    trained["actor"], wrapped["actor"] = prepared(actor, train=True)
    frozen["reference"] = prepared(utils.load_model(args.actor_model_name_or_path, tokenizer), train=False)[1]
    streams = ("reward", "cost") if args.algorithm == "ppo_lag" else ("reward",)
    for name in ("reward", "cost"):
        if name == "reward" or args.algorithm != "ppo":  # reward shaping scores C too; PPO has no cost
            path = getattr(args, f"{name}_model")
            scorer_tokenizer = utils.load_tokenizer(path, prompts)  # its own tokenizer, which must read the prompts
            scorer = utils.load_model(path, scorer_tokenizer, score=True)
            frozen[name] = (prepared(scorer, train=False)[1], scorer_tokenizer)
        if name in streams:  # a critic reads the actor's tokens, so it needs the actor's tokenizer
            path = os.path.join(resumed_from, f"{name}_critic") if resumed_from else getattr(args, f"{name}_critic_model") or getattr(args, f"{name}_model")  # fmt: skip
            hint = f"pass --{name}_critic_model (e.g. the SFT model)"
            if utils.load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
                raise utils.UserError(f"{path} does not share the actor's tokenizer: {hint}")
            if (AutoConfig.from_pretrained(path).architectures or [""])[0].endswith("ForScore"):
                raise utils.UserError(f"{path} is in the original code's score format, which scores but is not trained here: {hint}")  # fmt: skip
            critic = utils.load_model(path, tokenizer, score=True, new_head=True)
            trained[f"{name}_critic"], wrapped[f"{name}_critic"] = prepared(critic, train=True)
    return trained, wrapped, frozen


def main(args):
    # ------------------------------------------------------------------ setup
    if args.lambda_init <= 0:
        raise utils.UserError("--lambda_init must be > 0 (λ is kept as log λ)")
    if args.constraint == "per_prompt" and args.algorithm != "ppo_lag":
        raise utils.UserError(f"--constraint per_prompt is PPO-Lag's; --algorithm {args.algorithm} has no constraint")
    if args.rollout_batch_size % args.minibatch_size:
        raise utils.UserError(f"--rollout_batch_size {args.rollout_batch_size} must be a multiple of --minibatch_size {args.minibatch_size}")  # fmt: skip
    output_dir = default_output_dir(args)
    process = utils.setup_distributed(args.dtype)
    # The same global batches at any number of ranks: each rank takes its share.
    per_rank = utils.rank_share(args.rollout_batch_size, process.world_size, "rollout_batch_size")
    minibatch_per_rank = utils.rank_share(args.minibatch_size, process.world_size, "minibatch_size")
    transformers.set_seed(args.seed + process.rank)  # each rank samples its own responses
    saved = utils.check_resume(args, output_dir)  # {}, or a checkpoint of this run to continue
    if saved and len(saved["rng"]) != process.world_size:  # each rank's sampling RNG is part of the state
        raise utils.UserError(f"{output_dir} was saved by a run on {len(saved['rng'])} rank(s) and this one has {process.world_size}: a PPO run resumes on as many ranks as it ran on")  # fmt: skip

    # ------------------------------------------------------------------ data
    tokenizer = utils.load_tokenizer(args.actor_model_name_or_path)
    rows = utils.load_rows(args.prompts, "prompt", args.prompts_split)
    prompts = list(dict.fromkeys(row["prompt"] for row in rows))  # each prompt once, as the original's dataset
    if len(prompts) < len(rows):
        utils.print0(f"{args.prompts}: {len(rows) - len(prompts)} duplicate prompts dropped, {len(prompts)} left")
    iterations = math.ceil(args.epochs * len(prompts) / args.rollout_batch_size) if args.epochs > 0 else args.iterations
    ptx_examples = []
    if args.ptx_coef > 0:
        ptx_rows = utils.load_rows(args.ptx_dataset, "sft", args.ptx_split)
        ptx_examples = make_examples(tokenizer, ptx_rows, args.max_prompt_length + args.max_new_tokens)
        if len(ptx_examples) < args.minibatch_size:
            raise utils.UserError(f"{args.ptx_dataset}: {len(ptx_examples)} conversations, fewer than one PTX minibatch of {args.minibatch_size}")  # fmt: skip
    eval_rows = utils.load_rows(args.eval_prompts, "prompt") if args.eval_prompts != "none" else []

    # ------------------------------------------------------------------ models, optimizers, λ
    trained, wrapped, frozen = load_models(args, process, tokenizer, prompts, output_dir if saved else None)
    updates_per_iteration = args.ppo_epochs * (args.rollout_batch_size // args.minibatch_size)
    optimizers, schedulers = {}, {}
    for name, model in trained.items():  # AdamW as the original, each with its warmup and schedule
        role = "actor" if name == "actor" else "critic"
        settings = [getattr(args, f"{role}_{key}") for key in ("lr", "weight_decay")]
        optimizers[name], schedulers[name] = utils.optimizer_and_scheduler(
            model,
            *settings,
            args.warmup_ratio,
            iterations * updates_per_iteration,
            getattr(args, f"{role}_lr_schedule"),
        )
    multiplier = LagrangeMultiplier(args)
    if saved:
        multiplier.load_state_dict(saved)
    metrics_path = utils.start_run(output_dir, saved, process, trained, optimizers, schedulers)
    iteration = saved.get("step", 0)

    # ------------------------------------------------------------------ the loop
    last_iteration = iterations if args.max_iterations < 0 else min(iterations, args.max_iterations)
    bar = tqdm(total=iterations, initial=iteration, desc=args.algorithm, disable=not process.is_main)
    started = time.time()
    while iteration < last_iteration:
        # Prompts: epochs of seeded shuffles of the prompt set; each rank takes its slice of the global batch.
        positions = range(iteration * args.rollout_batch_size, (iteration + 1) * args.rollout_batch_size)
        batch_prompts = [prompts[prompt_order(len(prompts), args.seed, p)] for p in positions]
        batch_prompts = batch_prompts[process.rank * per_rank : (process.rank + 1) * per_rank]
        iteration_started = time.time()
        models = dict(actor=trained["actor"], reward_critic=trained["reward_critic"], **frozen)
        models.update(cost_critic=trained.get("cost_critic"), cost=frozen.get("cost"))
        episodes = rollout(args, models, tokenizer, batch_prompts, process)
        episodes.stats["rollout_seconds"] = time.time() - iteration_started

        # λ first, as the original: one step on Ĵ_C, the mean cost of the window that now holds this batch's
        # episodes (every rank's, in the order of the global batch); the update below uses the new λ.
        costs = torch.zeros(args.rollout_batch_size, device=process.device)
        costs[process.rank * per_rank : (process.rank + 1) * per_rank] = episodes.cost
        episode_cost = multiplier.update(utils.all_reduce_sum(costs).tolist(), iteration)

        # PPO with the new λ: epochs of shuffled minibatches; each rank updates on its rows of each.
        for model in trained.values():
            model.train()
        update_stats, n_updates = torch.zeros(len(UPDATE_STATISTICS), device=process.device), 0
        for _ in range(args.ppo_epochs):
            permutation = torch.randperm(per_rank).tolist()
            for start in range(0, per_rank, minibatch_per_rank):
                update_step = iteration * updates_per_iteration + n_updates
                ptx = ptx_minibatch(args, ptx_examples, update_step, process, tokenizer.pad_token_id)
                rows = permutation[start : start + minibatch_per_rank]
                minibatch_stats = ppo_update(
                    args, process, wrapped, optimizers, schedulers, episodes, rows, multiplier.value, ptx,
                    f"iteration {iteration + 1}: ",
                )  # fmt: skip
                update_stats += torch.stack(list(minibatch_stats.values()))
                n_updates += 1
        iteration += 1

        # ------------------------------------------------------------------ logging
        update_stats = utils.all_reduce_sum(update_stats) / n_updates  # means over the minibatches
        rollout_stats = utils.all_reduce_sum(torch.tensor(list(episodes.stats.values()), device=process.device))
        record = {"step": iteration, "split": "train"}
        record.update(zip(episodes.stats, (rollout_stats / process.world_size).tolist()))
        record.update(zip(UPDATE_STATISTICS, update_stats.tolist()))
        record.update(
            episode_cost=episode_cost, threshold=multiplier.threshold, seconds=time.time() - iteration_started
        )
        record.update(
            {"lambda": multiplier.value, "actor_lr": schedulers["actor"].get_last_lr()[0]}
        )  # λ: 0 but PPO-Lag
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.2f}", cost=f"{record['cost']:.2f}", lam=f"{record['lambda']:.2f}")
        if process.is_main:
            utils.log_metrics(metrics_path, record)
            if iteration % args.sample_every == 0 or iteration == 1:
                samples = zip(batch_prompts, episodes.texts, episodes.reward.tolist(), episodes.cost.tolist())
                samples = [dict(prompt=p, response=r, reward=round(rw, 3), cost=round(c, 3)) for p, r, rw, c in list(samples)[:3]]  # fmt: skip
                utils.log_metrics(metrics_path, {"step": iteration, "split": "samples", "samples": samples})
        stop = iteration < last_iteration and utils.stop_requested(process)  # SIGTERM: save, then stop
        if iteration % args.save_every == 0 or iteration == last_iteration or stop:
            state = dict(step=iteration, **multiplier.state_dict())
            utils.save_checkpoint(output_dir, tokenizer, trained, optimizers, schedulers, args, **state)
        if stop:
            raise utils.Preempted(f"after iteration {iteration}", output_dir)
    bar.close()
    if process.is_main:
        plot_training_curves(metrics_path, output_dir)

    # ------------------------------------------------------------------ a look at the policy
    if eval_rows and (process.is_main or args.fsdp):  # FSDP: every rank takes part
        summary = sample_and_judge(trained["actor"], tokenizer, eval_rows, args.max_prompt_length, args.max_new_tokens)
        if summary and process.is_main:
            utils.log_metrics(metrics_path, {"step": iteration, "split": "eval", **summary})
            utils.print0("judge on greedy answers: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    utils.print0(f"saved to {output_dir} after {iteration} iterations in {time.time() - started:.0f}s")


if __name__ == "__main__":
    utils.run(main, Args)
