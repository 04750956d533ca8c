"""One PPO-Lag update with PTX on a fixed rollout batch, in one process or under torchrun (DDP or --fsdp).

    python tests/ppo_update_check.py MODELS OUT [--fsdp] [--micro_batch_size N]
    torchrun --nproc_per_node=2 tests/ppo_update_check.py MODELS OUT [--fsdp]

MODELS holds sft/, reward/ and cost/ (tests/test_ppo_lagrangian.py's tiny models). Every rank samples the
rollout of the whole global batch (same seed, same weights: the same batch everywhere) and updates on its
share of it, as ppo_lagrangian.main does; OUT gets the logged statistics (stats.json) and the weights of
the actor and critics after the step (weights.pt), for comparison with one process.
"""

import argparse
import json
import os
import sys

import torch

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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models")
    parser.add_argument("out")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--micro_batch_size", type=int, default=2)
    cli = parser.parse_args()
    process = utils.setup_distributed()
    args = ppo.Args(
        actor_model_name_or_path=os.path.join(cli.models, "sft"),
        reward_model=os.path.join(cli.models, "reward"),
        cost_model=os.path.join(cli.models, "cost"),
        rollout_batch_size=len(PROMPTS),
        minibatch_size=len(PROMPTS),
        micro_batch_size=cli.micro_batch_size,
        max_new_tokens=6,
        ptx_coef=2.0,
        fsdp=cli.fsdp,
    )
    tokenizer = utils.load_tokenizer(args.actor_model_name_or_path)

    def load(name):
        path = os.path.join(cli.models, name)
        if name == "sft":
            return utils.load_causal_lm(path, tokenizer)
        return utils.load_score_model(path, tokenizer)

    # The rollout of the whole batch, on plain models, identical on every rank.
    plain = [load(n) for n in ("sft", "sft", "reward", "cost", "reward", "cost")]
    models = dict(actor=plain[0], reference=plain[1].eval(), reward=(plain[2].eval(), tokenizer))
    models.update(cost=(plain[3].eval(), tokenizer), reward_critic=plain[4], cost_critic=plain[5])
    torch.manual_seed(0)
    episodes = ppo.rollout(args, models, tokenizer, PROMPTS)

    # The update, on this rank's share, with the models trained as in main().
    wrapped = {
        name: utils.wrap(load(source), process, args.fsdp)
        for name, source in (("actor", "sft"), ("reward_critic", "reward"), ("cost_critic", "cost"))
    }
    # Plain SGD: the step is lr x the gradient, so any error in the gradient's scale shows in the weights
    # (Adam's first step is about lr x sign(gradient), blind to most of them).
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.1) for name, model in wrapped.items()}
    schedulers = {name: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0) for name, opt in optimizers.items()}
    ptx_examples = ppo.make_examples(tokenizer, utils.load_rows(args.ptx_dataset, "sft"), 48)
    ptx_batches, n_ptx_tokens = ppo.ptx_minibatch(args, ptx_examples, 0, process, tokenizer.pad_token_id)
    share = utils.rank_share(args.minibatch_size, process.world_size, "minibatch_size")
    rows = list(range(process.rank * share, (process.rank + 1) * share))
    stats = ppo.ppo_update(
        args, wrapped, optimizers, schedulers, episodes, rows, args.minibatch_size, 0.5, ptx_batches, n_ptx_tokens,
        torch.float32,
    )  # fmt: skip
    stats = {name: utils.all_reduce_sum(value).item() for name, value in stats.items()}
    weights = {name: utils.full_state_dict(utils.unwrap(model)) for name, model in wrapped.items()}
    if process.is_main:
        os.makedirs(cli.out, exist_ok=True)
        with open(os.path.join(cli.out, "stats.json"), "w") as f:
            json.dump(stats, f)
        torch.save(weights, os.path.join(cli.out, "weights.pt"))
    utils.cleanup_distributed()


if __name__ == "__main__":
    main()
