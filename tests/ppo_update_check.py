"""One PPO-Lag update with PTX on a fixed rollout batch, in one process or under torchrun (DDP, then FSDP).

    python tests/ppo_update_check.py MODELS OUT [--micro_batch_size N]   # one process: OUT/stats.json, OUT/weights.pt
    torchrun --nproc_per_node=2 tests/ppo_update_check.py MODELS OUT     # DDP, then FSDP: OUT/ddp/..., OUT/fsdp/...

MODELS holds sft/, reward/ and cost/ (conftest's tiny_models). Every rank samples the rollout of the whole global
batch (same seed, same weights: the same batch everywhere) and updates on its share of it, as ppo_lagrangian.main
does. The statistics summed over ranks and the weights of the actor and critics after the step are what a test
compares with one process (tests/test_ppo_lagrangian.py also calls `update` in-process).
"""

import argparse
import functools
import json
import os
import sys

import torch
import torch.distributed.checkpoint.state_dict as dcp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_lagrangian as ppo  # noqa: E402
import utils  # noqa: E402

PROMPTS = [
    "how do i bake bread ?",
    "i want to grow tomatoes . what should i do ?",
    "how do i steal a parked car ?",
    "how do i clean a kitchen knife ?",
    "how do i make a fake id ?",
    "what is a good way to learn to swim ?",
    "how can i pick a lock ?",
    "how do i plant a tree ?",
]
LAGRANGE_MULTIPLIER = 0.5
LEARNING_RATE = 0.1


def arguments(models, **changes):
    """One minibatch of the eight prompts, PTX on (ptx_coef 2), in micro-batches of 2."""
    settings = dict(
        actor_model_name_or_path=os.path.join(models, "sft"),
        reward_model=os.path.join(models, "reward"),
        cost_model=os.path.join(models, "cost"),
        rollout_batch_size=len(PROMPTS),
        minibatch_size=len(PROMPTS),
        micro_batch_size=2,
        max_new_tokens=6,
        ptx_coef=2.0,
    )
    return ppo.Args(**{**settings, **changes})


def rollout(args, process, tokenizer):
    """The rollout of the whole batch on plain models, identical on every rank."""
    actor = utils.load_model(args.actor_model_name_or_path, tokenizer)
    reference = utils.load_model(args.actor_model_name_or_path, tokenizer).eval()
    scorers = [utils.load_model(p, tokenizer, score=True).eval() for p in (args.reward_model, args.cost_model)]
    critics = [utils.load_model(p, tokenizer, score=True) for p in (args.reward_model, args.cost_model)]
    models = dict(actor=actor, reference=reference, reward=(scorers[0], tokenizer), cost=(scorers[1], tokenizer))
    torch.manual_seed(0)
    return ppo.rollout(
        args, dict(models, reward_critic=critics[0], cost_critic=critics[1]), tokenizer, PROMPTS, process
    )


@functools.cache
def sft_examples(path, tokenizer):
    return ppo.make_examples(tokenizer, utils.load_rows(path, "sft"), 48)


def ptx(args, process, tokenizer):
    """The PTX data of the first update: this rank's micro-batches and the label tokens of the global batch."""
    examples = sft_examples(args.ptx_dataset, tokenizer)
    return ppo.ptx_minibatch(args, examples, 0, process, tokenizer.pad_token_id)


def update(args, process, tokenizer, episodes):
    """One ppo_update of freshly loaded actor and critics on this rank's share of the minibatch (all of it in one
    process). Returns the statistics summed over ranks and the full weights after the step (on rank 0)."""
    sources = dict(actor=args.actor_model_name_or_path, reward_critic=args.reward_model, cost_critic=args.cost_model)
    wrapped = {
        name: utils.wrap(utils.load_model(path, tokenizer, score=name != "actor"), process, args)
        for name, path in sources.items()
    }
    # Plain SGD: the step is lr x the gradient, so any error in the gradient's scale shows in the weights
    # (Adam's first step is about lr x sign(gradient), blind to most of them).
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=LEARNING_RATE) for name, model in wrapped.items()}
    schedulers = {name: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0) for name, opt in optimizers.items()}
    share = utils.rank_share(args.minibatch_size, process.world_size, "minibatch_size")
    rows = list(range(process.rank * share, (process.rank + 1) * share))
    stats = ppo.ppo_update(
        args, process, wrapped, optimizers, schedulers, episodes, rows, LAGRANGE_MULTIPLIER,
        ptx(args, process, tokenizer),
    )  # fmt: skip
    stats = {name: utils.all_reduce_sum(value).item() for name, value in stats.items()}
    full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0
    weights = {name: dcp.get_model_state_dict(model, options=full) for name, model in wrapped.items()}
    return stats, weights


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models")
    parser.add_argument("out")
    parser.add_argument("--micro_batch_size", type=int, default=2)
    cli = parser.parse_args()
    process = utils.setup_distributed("float32")
    tokenizer = utils.load_tokenizer(os.path.join(cli.models, "sft"))
    variants = {"ddp": False, "fsdp": True} if process.world_size > 1 else {"": False}
    for name, fsdp in variants.items():
        args = arguments(cli.models, micro_batch_size=cli.micro_batch_size, fsdp=fsdp)
        stats, weights = update(args, process, tokenizer, rollout(args, process, tokenizer))
        if process.is_main:
            os.makedirs(os.path.join(cli.out, name), exist_ok=True)
            with open(os.path.join(cli.out, name, "stats.json"), "w") as f:
                json.dump(stats, f)
            torch.save(weights, os.path.join(cli.out, name, "weights.pt"))
    if torch.distributed.is_initialized():  # leave together, then at once, as utils.run: gloo's teardown can abort
        torch.distributed.barrier()
        os._exit(0)


if __name__ == "__main__":
    main()
