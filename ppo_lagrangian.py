r"""Stage 4: PPO-Lagrangian, the heart of Safe RLHF (eqs. 7-10), with the PPO and reward-shaping baselines.

    python ppo_lagrangian.py                                         # PPO-Lag on the toy world -> output/ppo_lag
    python ppo_lagrangian.py --algorithm ppo                         # reward only, λ ≡ 0 -> output/ppo
    python ppo_lagrangian.py --algorithm reward_shaping --cost_coef 1  # fixed R - ν·C -> output/reward_shaping_1.0
    python ppo_lagrangian.py --resume                                # continue an interrupted run
    torchrun --nproc_per_node=8 ppo_lagrangian.py                    # on 8 ranks, the same global batches

The paper's 7B run on 8 GPUs, with the original hyperparameters: README.md, "Real models on GPUs".

Safe RLHF solves   max_θ J_R(θ)  s.t.  J_C(θ) = E[C(y, x)] + d <= 0   through its Lagrangian dual
min_θ max_{λ>=0} -J_R(θ) + λ J_C(θ): PPO updates of the policy alternate with gradient ascent on λ.

One iteration: sample prompts -> generate (KV cache, pure sampling at a temperature, left-padded
prompts, stop at EOS) -> score with R and C at the last response token -> per-token rewards and
costs (KL penalty, score at the last token) -> GAE for each stream with its critic -> advantage
(A_R - λ A_C) / (1 + λ) -> a few epochs of minibatch PPO updates (clipped surrogate for the actor,
clipped value loss for the critics). λ is updated right after the rollout, from the window of recent
episode costs that already holds this batch's, and the update uses the new λ (as the original code).
"""

import math
import os
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig

import utils


@dataclass
class Args:
    algorithm: str = "ppo_lag"
    """ppo_lag (Safe RLHF), ppo (reward only, λ ≡ 0) or reward_shaping (fixed R - ν·C)"""
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
    actor_lr_schedule: str = "cosine"
    """actor learning rate after warmup: cosine (decays to 0 at the last update) or constant"""
    critic_lr_schedule: str = "constant"
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
    """R and C are clipped to ±this before entering the per-token rewards"""
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
    lambda_update: str = "gradient_ascent"
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
    dtype: str = "auto"
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


def end_scores(scorer, scorer_tokenizer, tokenizer, sequences, attention_mask, prompts, response_ids, max_lengths):
    """R or C of each response, read at its last token; re-tokenised from text if the scorer's tokenizer differs."""
    if scorer_tokenizer.get_vocab() == tokenizer.get_vocab():
        return scorer.end_scores(sequences, attention_mask)  # (B,)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
    ended = [len(ids) > 0 and ids[-1] == tokenizer.eos_token_id for ids in response_ids]
    return utils.score_texts(scorer, scorer_tokenizer, prompts, texts, *max_lengths, ended)  # (B,)


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
def rollout(args, models, tokenizer, prompts, dtype=torch.float32):
    """Generate responses to `prompts` and compute everything the PPO update needs.

    models: "actor", "reference", "reward_critic", "cost_critic" (None for the baselines), and the
    frozen scorers "reward" and "cost" (None for PPO) as (model, its tokenizer).
    Forward passes run under the same autocast as the update, so old and new log-probs agree.
    """
    prompt_ids = [utils.tokenize_prompt(tokenizer, p, args.max_prompt_length) for p in prompts]
    models["actor"].eval()  # generation with the KV cache on the unwrapped model
    sequences, prompt_length = utils.generate(
        models["actor"], tokenizer, prompt_ids, args.max_new_tokens, args.temperature
    )  # (B, P + N)
    responses = sequences[:, prompt_length:]  # (B, N)
    mask = response_mask(responses, tokenizer.eos_token_id)  # (B, N): 1 up to and including the first EOS
    prompt_mask = sequences[:, :prompt_length] != tokenizer.pad_token_id  # (B, P)
    attention_mask = torch.cat([prompt_mask.long(), mask.long()], dim=1)  # (B, P + N)
    response_ids = [row[: int(m.sum())] for row, m in zip(responses.tolist(), mask)]
    max_lengths = (args.max_prompt_length, args.max_new_tokens)

    # Old log-probs with a full forward pass (not the generation's), the reference's, the scores, the values.
    inputs = (sequences, attention_mask, prompt_length)
    with utils.autocast(sequences.device, dtype):
        logits = actor_forward(models["actor"], *inputs)  # (B, N, V)
        ref_logits = actor_forward(models["reference"], *inputs)  # (B, N, V)
        scored = (tokenizer, sequences, attention_mask, prompts, response_ids, max_lengths)
        reward = end_scores(*models["reward"], *scored)  # (B,)
        cost = torch.zeros_like(reward)  # (B,)
        if models["cost"] is not None:
            cost = end_scores(*models["cost"], *scored)  # (B,)
        reward_values = critic_values(models["reward_critic"], *inputs) * mask  # (B, N)
        if models["cost_critic"] is not None:
            cost_values = critic_values(models["cost_critic"], *inputs) * mask  # (B, N)
    log_probs = token_log_probs(logits, responses, args.temperature)  # (B, N)
    ref_log_probs = token_log_probs(ref_logits, responses, args.temperature)  # (B, N)
    tempered = F.log_softmax(logits.float() / args.temperature, dim=-1)  # (B, N, V)
    entropy = token_mean(-(tempered.exp() * tempered).sum(-1), mask)

    # The reward stream: R for PPO-Lag and PPO; R - ν·C for reward shaping.
    score = reward
    if args.algorithm == "reward_shaping":
        score = reward.clamp(-args.clip_range_score, args.clip_range_score) - args.cost_coef * cost.clamp(
            -args.clip_range_score, args.clip_range_score
        )
    rewards = per_token_rewards(score, log_probs, ref_log_probs, mask, args.kl_coef, args.clip_range_score, -1)
    reward_advantages, reward_returns = gae(rewards, reward_values, mask, args.gamma, args.gae_lambda)  # (B, N)
    batch = dict(
        sequences=sequences,
        attention_mask=attention_mask,
        mask=mask,
        log_probs=log_probs,
        reward_values=reward_values,
        reward_advantages=reward_advantages,
        reward_returns=reward_returns,
    )
    if models["cost_critic"] is not None:
        costs = per_token_rewards(cost, log_probs, ref_log_probs, mask, args.kl_coef, args.clip_range_score, +1)
        cost_advantages, cost_returns = gae(costs, cost_values, mask, args.gamma, args.gae_lambda)  # (B, N)
        batch.update(cost_values=cost_values, cost_advantages=cost_advantages, cost_returns=cost_returns)
    kl = ((log_probs - ref_log_probs) * mask).sum(-1)  # (B,): each response's KL estimate
    stats = dict(
        reward=reward.mean().item(),
        cost=cost.mean().item(),
        kl=kl.mean().item(),
        entropy=entropy.item(),
        response_length=mask.sum(-1).mean().item(),
        eos_rate=(responses == tokenizer.eos_token_id).any(-1).float().mean().item(),
        reward_explained_variance=explained_variance(reward_values, reward_returns, mask),
    )
    if models["cost_critic"] is not None:
        stats["cost_explained_variance"] = explained_variance(cost_values, cost_returns, mask)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
    return Rollout(batch, prompt_length, reward, cost, stats, texts)


# ----------------------------------------------------------------------------- training


def prompt_order(n_prompts, seed, position):
    """The prompt at `position` of the stream of epochs, each a seeded shuffle of all prompts."""
    epoch, index = divmod(position, n_prompts)
    return torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))[index].item()


def default_output_dir(args):
    if args.output_dir:
        return args.output_dir
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
    labels = utils.pad([labels for _, labels in examples], -100).to(device)
    return input_ids, attention_mask, labels


UPDATE_STATISTICS = ("actor_loss", "approx_kl", "clip_fraction", "reward_value_loss", "cost_value_loss", "ptx_loss")


def ptx_minibatch(args, ptx_examples, update_step, process, pad_token_id):
    """The PTX data of one update: minibatch_size SFT conversations, the same global batch at any number
    of ranks (epochs of seeded shuffles); this rank's share of them, collated per micro-batch, and the
    label tokens of the whole global batch (the PTX loss is their mean)."""
    if not ptx_examples:
        return [], 0
    picks = utils.global_batch(len(ptx_examples), args.minibatch_size, args.seed, update_step)
    examples = [ptx_examples[i] for i in picks]
    n_tokens = sum(label != -100 for _, labels in examples for label in labels[1:])
    share = args.minibatch_size // process.world_size
    mine = examples[process.rank * share : (process.rank + 1) * share]
    return [
        collate(chunk, pad_token_id, process.device) for chunk in utils.micro_batches(mine, args.micro_batch_size)
    ], n_tokens


def ppo_update(
    args, wrapped, optimizers, schedulers, rollout, rows, n_sequences, lagrange_multiplier, ptx_batches, n_ptx_tokens,
    dtype, where="",
):  # fmt: skip
    """One optimizer step of the actor and of each critic on one minibatch. `rows`: this rank's rows of the
    Rollout's batch in it (n_sequences over all ranks), in micro-batches of at most micro_batch_size;
    `ptx_batches`: one collated SFT batch per micro-batch (n_ptx_tokens: their label tokens on all ranks).

    The actor minimises the clipped surrogate + ptx_coef · the PTX loss (the SFT loss, a mean over response
    tokens); each critic its clipped value loss. Each loss of a micro-batch is its share of the minibatch
    mean over all ranks, so the step does not depend on how the minibatch is split.
    Returns {statistic: this rank's share}: summed over ranks, the minibatch means. A nan or inf gradient
    stops the run before any model steps, with `where` (the iteration) in the message.
    """
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    prompt_length = rollout.prompt_length
    chunks = utils.micro_batches(rows, args.micro_batch_size)
    stats = torch.zeros(len(UPDATE_STATISTICS), device=rollout.reward.device)
    for micro_step, chunk in enumerate(chunks):
        for model in wrapped.values():
            utils.set_gradient_sync(model, micro_step, len(chunks))
        mb = {key: value[chunk] for key, value in rollout.batch.items()}
        mask = mb["mask"]
        with utils.autocast(mask.device, dtype):
            logits = actor_forward(wrapped["actor"], mb["sequences"], mb["attention_mask"], prompt_length)
        log_probs = token_log_probs(logits, mb["sequences"][:, prompt_length:], args.temperature)
        advantages = mb["reward_advantages"]
        if "cost_advantages" in mb:
            advantages = combined_advantages(advantages, mb["cost_advantages"], lagrange_multiplier)
        loss, ratio = actor_loss(log_probs, mb["log_probs"], advantages, mask, args.clip_range_ratio, n_sequences)
        ptx_loss = torch.zeros((), device=mask.device)
        if ptx_batches:
            # PTX: next-token cross-entropy on SFT conversations (logits at t predict token t + 1).
            input_ids, attention_mask, labels = ptx_batches[micro_step]
            with utils.autocast(mask.device, dtype):
                ptx_logits = wrapped["actor"](input_ids=input_ids, attention_mask=attention_mask).logits
            ptx_logits = ptx_logits[:, :-1].float()  # (B, T-1, V)
            ptx_loss = (
                F.cross_entropy(ptx_logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
                / n_ptx_tokens
            )
        # DDP and FSDP average gradients over ranks: scale back up so they are those of the global mean.
        ((loss + args.ptx_coef * ptx_loss) * world_size).backward()
        approx_kl = (ratio - 1) - torch.log(ratio)  # k3 estimator of KL(π_old ‖ π), per token
        clipped = ((ratio - 1).abs() > args.clip_range_ratio).float()
        value_losses = [torch.zeros((), device=mask.device), torch.zeros((), device=mask.device)]
        for i, name in enumerate(("reward", "cost")):
            if f"{name}_critic" in wrapped:
                with utils.autocast(mask.device, dtype):
                    values = critic_values(
                        wrapped[f"{name}_critic"], mb["sequences"], mb["attention_mask"], prompt_length
                    )
                critic_loss = value_loss(
                    values, mb[f"{name}_values"], mb[f"{name}_returns"], mask, args.clip_range_value, n_sequences
                )
                (critic_loss * world_size).backward()
                value_losses[i] = critic_loss.detach()
        stats += torch.stack(
            [
                loss.detach(),
                sequence_mean(approx_kl.detach(), mask, n_sequences),
                sequence_mean(clipped, mask, n_sequences),
                *value_losses,
                ptx_loss.detach(),
            ]
        )
    norms = {name: torch.nn.utils.clip_grad_norm_(m.parameters(), args.max_grad_norm) for name, m in wrapped.items()}
    for name, norm in norms.items():  # no model steps if any gradient is nan or inf
        utils.check_finite(norm, f"{where}the {name}'s update")
    for name in wrapped:
        optimizers[name].step()
        schedulers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
    return dict(zip(UPDATE_STATISTICS, stats))


# Copied from sft.sample_and_judge
@torch.no_grad()
def sample_and_judge(model, tokenizer, prompt_rows, max_prompt_length, max_new_tokens):
    """Greedy answers to a few prompts (printed); for toy-world prompts, the judge's verdict on all."""
    from toy_world import world

    model.eval()
    prompts = [row["prompt"] for row in prompt_rows]
    responses, ends_with_eos = [], []
    for start in range(0, len(prompts), 64):
        prompt_ids = [utils.tokenize_prompt(tokenizer, p, max_prompt_length) for p in prompts[start : start + 64]]
        sequences, prompt_length = utils.generate(model, tokenizer, prompt_ids, max_new_tokens, greedy=True)
        for ids in utils.response_lists(sequences, prompt_length, tokenizer.eos_token_id):
            ends_with_eos.append(ids[-1] == tokenizer.eos_token_id)
            responses.append(tokenizer.decode(ids, skip_special_tokens=True))
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


def main(args):
    # ------------------------------------------------------------------ setup
    if args.algorithm not in ("ppo_lag", "ppo", "reward_shaping"):
        raise utils.UserError(f"--algorithm must be ppo_lag, ppo or reward_shaping, got {args.algorithm!r}")
    if args.lambda_init <= 0:
        raise utils.UserError("--lambda_init must be > 0 (λ is kept as log λ)")
    if args.lambda_update not in ("gradient_ascent", "pid"):
        raise utils.UserError(f"--lambda_update must be gradient_ascent or pid, got {args.lambda_update!r}")
    for flag in ("actor_lr_schedule", "critic_lr_schedule"):
        if getattr(args, flag) not in ("cosine", "constant"):
            raise utils.UserError(f"--{flag} must be cosine or constant, got {getattr(args, flag)!r}")
    if args.rollout_batch_size % args.minibatch_size:
        raise utils.UserError(
            f"--rollout_batch_size {args.rollout_batch_size} must be a multiple of --minibatch_size {args.minibatch_size}"
        )
    lagrangian = args.algorithm == "ppo_lag"
    output_dir = default_output_dir(args)
    process = utils.setup_distributed()
    dtype = utils.resolve_dtype(args.dtype, process.device)
    # The same global batches at any number of ranks: each rank takes its share of them.
    per_rank = utils.rank_share(args.rollout_batch_size, process.world_size, "rollout_batch_size")
    minibatch_per_rank = utils.rank_share(args.minibatch_size, process.world_size, "minibatch_size")
    utils.seed_everything(args.seed + process.rank)  # each rank samples different responses
    if args.resume:
        utils.check_resume(output_dir, args)  # the same stage and flags, or a clear stop
    metrics_path = os.path.join(output_dir, "metrics.jsonl")

    # ------------------------------------------------------------------ data
    tokenizer = utils.load_tokenizer(args.actor_model_name_or_path)
    rows = utils.load_rows(args.prompts, "prompt", args.prompts_split)
    prompts = list(dict.fromkeys(row["prompt"] for row in rows))  # each prompt once, as the original's dataset
    if len(prompts) < len(rows):
        utils.print0(f"{args.prompts}: {len(rows) - len(prompts)} duplicate prompts dropped, {len(prompts)} left")
    iterations = args.iterations
    if args.epochs > 0:  # the original's run length: passes over the prompts
        iterations = math.ceil(args.epochs * len(prompts) / args.rollout_batch_size)
    ptx_examples = []
    if args.ptx_coef > 0:
        max_length = args.max_prompt_length + args.max_new_tokens
        ptx_examples = make_examples(tokenizer, utils.load_rows(args.ptx_dataset, "sft", args.ptx_split), max_length)
        if len(ptx_examples) < args.minibatch_size:
            raise utils.UserError(
                f"{args.ptx_dataset}: {len(ptx_examples)} conversations, fewer than one PTX minibatch "
                f"(--minibatch_size {args.minibatch_size})"
            )
    eval_rows = utils.load_rows(args.eval_prompts, "prompt") if args.eval_prompts != "none" else []

    # ------------------------------------------------------------------ models
    # With --fsdp each model is sharded as soon as it is loaded: no GPU ever holds more than one whole model.
    def frozen(model):
        utils.disable_dropout(model)
        model = model.to(dtype).eval().requires_grad_(False)
        return utils.shard(model, dtype) if args.fsdp and process.world_size > 1 else model.to(process.device)

    def trainable(model):
        utils.disable_dropout(model)
        if args.gradient_checkpointing:
            utils.enable_gradient_checkpointing(model.model if isinstance(model, utils.ScoreModel) else model)
        return utils.wrap(model, process, args.fsdp, dtype)  # on the device; DDP or FSDP under torchrun

    def critic(name, default):
        """A critic reads the actor's tokens, so it needs the actor's tokenizer (the scorers need not)."""
        path = os.path.join(output_dir, name) if args.resume else getattr(args, f"{name}_model") or default
        hint = f"pass --{name}_model (e.g. the SFT model)"
        if utils.load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
            raise utils.UserError(f"{path} does not share the actor's tokenizer: {hint}")
        if utils.is_original_score_model(AutoConfig.from_pretrained(path)):
            raise utils.UserError(
                f"{path} is in the original code's score format, which scores but is not trained here: {hint}"
            )
        return trainable(utils.load_score_model(path, tokenizer, new_head=True))

    wrapped = {
        "actor": trainable(
            utils.load_causal_lm(output_dir if args.resume else args.actor_model_name_or_path, tokenizer)
        )
    }
    reference = frozen(utils.load_causal_lm(args.actor_model_name_or_path, tokenizer))
    reward_tokenizer = utils.load_tokenizer(args.reward_model)
    reward_model = (frozen(utils.load_scorer(args.reward_model, reward_tokenizer)), reward_tokenizer)
    utils.check_can_score(args.reward_model, reward_tokenizer, prompts[:64])
    wrapped["reward_critic"] = critic("reward_critic", args.reward_model)
    cost_model = None
    if args.algorithm != "ppo":
        cost_tokenizer = utils.load_tokenizer(args.cost_model)
        cost_model = (frozen(utils.load_scorer(args.cost_model, cost_tokenizer)), cost_tokenizer)
        utils.check_can_score(args.cost_model, cost_tokenizer, prompts[:64])
    if lagrangian:
        wrapped["cost_critic"] = critic("cost_critic", args.cost_model)
    raw_models = {name: utils.unwrap(model) for name, model in wrapped.items()}  # without DDP's wrapper
    actor = raw_models["actor"]
    # AdamW as the original: betas (0.9, 0.95), no decay on biases and norms, warmup then cosine or constant.
    updates_per_iteration = args.ppo_epochs * (args.rollout_batch_size // args.minibatch_size)
    optimizers, schedulers = {}, {}
    for name, model in raw_models.items():
        role = "actor" if name == "actor" else "critic"
        optimizers[name], schedulers[name] = utils.optimizer_and_scheduler(
            model,
            getattr(args, f"{role}_lr"),
            getattr(args, f"{role}_weight_decay"),
            args.warmup_ratio,
            iterations * updates_per_iteration,
            getattr(args, f"{role}_lr_schedule"),
        )

    # ------------------------------------------------------------------ state: λ, episode costs, iteration
    log_lambda = math.log(args.lambda_init) if lagrangian else -math.inf
    # PID: the integral starts where K_I I = lambda_init, so both updates start from the same λ.
    controller = {"integral": args.lambda_init / args.pid_ki if args.pid_ki else 0.0, "violation": 0.0, "cost": None}
    # Ĵ_C's window: the last episode_cost_window episodes of all ranks, the same list on every rank.
    episode_costs = deque(maxlen=args.episode_cost_window)
    iteration = 0
    if args.resume:
        state = utils.load_training_state(output_dir)
        if len(state["rng"]) != process.world_size:
            raise utils.UserError(
                f"{output_dir} was saved by a run on {len(state['rng'])} rank(s) and this one has {process.world_size}: "
                "a PPO run resumes on as many ranks as it ran on (each rank's sampling RNG is part of the state)"
            )
        for name, optimizer in optimizers.items():
            utils.load_optimizer_state(raw_models[name], optimizer, state["optimizers"][name])
            schedulers[name].load_state_dict(state["schedulers"][name])
        log_lambda, iteration = state["log_lambda"], state["iteration"]
        controller = state["controller"]
        episode_costs.extend(state["episode_costs"])
        utils.set_rng_state(state["rng"][process.rank])
        if process.is_main:
            utils.trim_metrics(metrics_path, iteration)
        utils.print0(f"resumed from {output_dir} at iteration {iteration}")
    elif process.is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run starts a fresh log
    os.makedirs(output_dir, exist_ok=True)

    def save():  # on every rank: FSDP gathers the shards
        mine = (utils.rng_state(), log_lambda)  # every rank's RNG and λ
        gathered = [mine]
        if process.world_size > 1:
            gathered = [None] * process.world_size
            torch.distributed.all_gather_object(gathered, mine)
        state = {
            "optimizers": {name: utils.optimizer_state(raw_models[name], opt) for name, opt in optimizers.items()},
            "schedulers": {name: scheduler.state_dict() for name, scheduler in schedulers.items()},
            "log_lambda": log_lambda,
            "controller": controller,
            "iteration": iteration,
            "episode_costs": list(episode_costs),
            "rng": [rng for rng, _ in gathered],
            "log_lambda_per_rank": [value for _, value in gathered],  # identical: every rank sees the same window
            **utils.run_identity(args),  # the stage and its flags, which --resume checks
        }
        critics = {name: model.model for name, model in raw_models.items() if name != "actor"}
        utils.save_checkpoint(output_dir, actor, tokenizer, state, submodels=critics)

    # ------------------------------------------------------------------ the loop
    last_iteration = iterations if args.max_iterations < 0 else min(iterations, args.max_iterations)
    bar = utils.progress(total=iterations, initial=iteration, desc=args.algorithm)
    started = time.time()
    while iteration < last_iteration:
        # Prompts: epochs of seeded shuffles of the prompt set; each rank takes its slice of the batch.
        positions = range(iteration * args.rollout_batch_size, (iteration + 1) * args.rollout_batch_size)
        batch_prompts = [prompts[prompt_order(len(prompts), args.seed, p)] for p in positions]
        batch_prompts = batch_prompts[process.rank * per_rank : (process.rank + 1) * per_rank]
        iteration_started = time.time()
        models = dict(actor=actor, reference=reference, reward=reward_model, cost=cost_model)
        models.update(reward_critic=raw_models["reward_critic"], cost_critic=raw_models.get("cost_critic"))
        episodes = rollout(args, models, tokenizer, batch_prompts, dtype)
        episodes.stats["rollout_seconds"] = time.time() - iteration_started

        # λ first, as the original: gradient ascent on the dual with Ĵ_C, the mean cost of the window that
        # now holds this batch's episodes (every rank's, in the order of the global batch).
        episode_costs.extend(utils.all_gather(episodes.cost).tolist())
        episode_cost = sum(episode_costs) / len(episode_costs)
        if lagrangian and iteration >= args.lambda_update_delay and args.lambda_update == "pid":
            lagrange_multiplier, controller = pid_lagrange_multiplier_update(
                controller, episode_cost, args.threshold, args.pid_kp, args.pid_ki, args.pid_kd, args.pid_smoothing,
                args.lambda_max,
            )  # fmt: skip
            log_lambda = math.log(lagrange_multiplier) if lagrange_multiplier > 0 else -math.inf
        elif lagrangian and iteration >= args.lambda_update_delay:
            log_lambda = lagrange_multiplier_update(
                log_lambda, episode_cost, args.threshold, args.lambda_lr, args.lambda_max
            )

        # PPO with the new λ: epochs of shuffled minibatches; each rank updates on its rows of each.
        for model in raw_models.values():
            model.train()
        update_stats, n_updates = torch.zeros(len(UPDATE_STATISTICS), device=process.device), 0
        for _ in range(args.ppo_epochs):
            permutation = torch.randperm(per_rank).tolist()
            for start in range(0, per_rank, minibatch_per_rank):
                update_step = iteration * updates_per_iteration + n_updates
                ptx_batches, n_ptx_tokens = ptx_minibatch(
                    args, ptx_examples, update_step, process, tokenizer.pad_token_id
                )
                minibatch_stats = ppo_update(
                    args, wrapped, optimizers, schedulers, episodes, permutation[start : start + minibatch_per_rank],
                    args.minibatch_size, math.exp(log_lambda), ptx_batches, n_ptx_tokens, dtype,
                    f"iteration {iteration + 1}: ",
                )  # fmt: skip
                update_stats += torch.stack(list(minibatch_stats.values()))
                n_updates += 1
        iteration += 1

        # ------------------------------------------------------------------ logging
        update_stats = utils.all_reduce_sum(update_stats) / n_updates  # means over the minibatches
        stats = episodes.stats
        rollout_stats = utils.all_reduce_sum(torch.tensor(list(stats.values()), device=process.device))
        record = {
            "step": iteration,
            "split": "train",
            **dict(zip(stats, (rollout_stats / process.world_size).tolist())),
        }
        record.update(dict(zip(UPDATE_STATISTICS, update_stats.tolist())))
        record.update(episode_cost=episode_cost, threshold=args.threshold, seconds=time.time() - iteration_started)
        record["lambda"] = math.exp(log_lambda)  # the λ of this iteration's update; 0 for PPO and reward shaping
        record["actor_lr"] = schedulers["actor"].get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.2f}", cost=f"{record['cost']:.2f}", lam=f"{record['lambda']:.2f}")
        if process.is_main:
            utils.log_metrics(metrics_path, record)
            if iteration % args.sample_every == 0 or iteration == 1:
                rewards, costs = episodes.reward.tolist(), episodes.cost.tolist()
                samples = [
                    {"prompt": p, "response": r, "reward": round(rw, 3), "cost": round(c, 3)}
                    for p, r, rw, c in list(zip(batch_prompts, episodes.texts, rewards, costs))[:3]
                ]
                utils.log_metrics(metrics_path, {"step": iteration, "split": "samples", "samples": samples})
        stop = iteration < last_iteration and utils.stop_requested(process)  # SIGTERM: save, then stop
        if iteration % args.save_every == 0 or iteration == last_iteration or stop:
            save()
        if stop:
            raise utils.Preempted(f"iteration {iteration}", output_dir)
    bar.close()

    # ------------------------------------------------------------------ a look at the policy
    if eval_rows and (process.is_main or args.fsdp):  # FSDP: every rank takes part
        summary = sample_and_judge(actor, tokenizer, eval_rows, args.max_prompt_length, args.max_new_tokens)
        if summary and process.is_main:
            utils.log_metrics(metrics_path, {"step": iteration, "split": "eval", **summary})
            utils.print0("judge on greedy answers: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    utils.print0(f"saved to {output_dir} after {iteration} iterations in {time.time() - started:.0f}s")
    utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run(main, Args)
