r"""Stage 1: supervised fine-tuning on conversations (the paper's Alpaca-7B starting point).

    python sft.py                                     # toy model from its config, toy data -> output/sft
    torchrun --nproc_per_node=2 sft.py                # the same, data parallel (gloo on CPU, NCCL on GPU)
    python sft.py --resume                            # continue an interrupted run in output/sft
    torchrun --nproc_per_node=8 sft.py                # the same run on 8 ranks (same global batch)

The paper's 7B setup on 8 GPUs, with the original's hyperparameters and where ours differ: docs/gpu.md.

The loss is the next-token cross-entropy on response tokens only (the prompt is masked); every
response ends with EOS so the model learns to stop. `python sft.py --help` lists every flag.
"""

import json
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import utils


@dataclass
class Args:
    model_name_or_path: str = "toy_world/model"
    """model to fine-tune: a local folder or a hub name; a folder with a config but no weights is initialised"""
    dataset: str = "toy_world/data/sft_train.jsonl"
    """SFT data (prompt/response, or Alpaca's instruction/input/output): a .jsonl/.json file or a hub name"""
    dataset_split: str = "train"
    """split of a hub dataset"""
    eval_dataset: str = "toy_world/data/sft_test.jsonl"
    """held-out SFT data for the eval loss ('none' to skip)"""
    eval_split: str = "test"
    """split of a hub eval dataset"""
    sample_prompts: str = "toy_world/data/prompts_eval.jsonl"
    """prompts answered greedily after training; judged when they are toy-world prompts ('none' to skip)"""
    output_dir: str = "output/sft"
    """where the checkpoint, training state and metrics.jsonl go"""
    max_length: int = 64
    """tokens per conversation (prompt + response + EOS); longer ones are cut on the right, as the original"""
    epochs: int = 4
    """passes over the data"""
    batch_size: int = 32
    """conversations per optimizer step, over all ranks"""
    micro_batch_size: int = 32
    """most conversations per forward pass on one rank; each rank takes batch_size / ranks and accumulates gradients"""
    learning_rate: float = 2e-3
    """peak AdamW learning rate (the paper's 7B runs use 2e-5)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.03
    """share of steps with linear warmup before the cosine decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """float32, bfloat16 (mixed precision), or auto: bf16 on a GPU that has it, fp32 on CPU"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    fsdp: bool = False
    """under torchrun, shard weights, gradients and optimizer state over the ranks (PyTorch FSDP) instead of
    replicating them (DDP): for models one GPU cannot hold with their optimizer state"""
    seed: int = 42
    """seed of initialisation and data order"""
    eval_every: int = 100
    """optimizer steps between evaluations (and at the end)"""
    save_every: int = 100
    """optimizer steps between checkpoints (and at the end)"""
    log_every: int = 10
    """optimizer steps between log lines"""
    max_steps: int = -1
    """stop after this many optimizer steps, e.g. to split a run with --resume (the schedule still spans all epochs)"""
    resume: bool = False
    """continue from the checkpoint in output_dir (weights, optimizer, schedule, step, RNG)"""


def sft_loss_sum(logits, labels):
    """Summed next-token cross-entropy over the tokens whose label is not -100 (the response).

    Logits at position t predict token t + 1, hence the shift.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")


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


def collate(examples, pad_token_id, device):
    input_ids, attention_mask = utils.batch_inputs([ids for ids, _ in examples], pad_token_id, device)
    labels, _ = utils.batch_inputs([labels for _, labels in examples], -100, device)
    return input_ids, attention_mask, labels


@torch.no_grad()
def evaluate_loss(model, examples, pad_token_id, batch_size, process):
    """Mean response-token loss over the eval set; each rank takes a slice, sums are all-reduced."""
    model.eval()
    totals = torch.zeros(2, device=process.device)  # (summed loss, token count)
    # Every rank runs as many batches (FSDP gathers weights in each forward): fillers have no label.
    mine = list(range(process.rank, len(examples), process.world_size))
    mine += [-1] * (math.ceil(len(examples) / process.world_size) - len(mine))
    mine = [examples[i] if i >= 0 else (examples[0][0], [-100] * len(examples[0][0])) for i in mine]
    for start in range(0, len(mine), batch_size):
        input_ids, attention_mask, labels = collate(mine[start : start + batch_size], pad_token_id, process.device)
        with process.autocast():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        totals += torch.stack([sft_loss_sum(logits, labels), (labels[:, 1:] != -100).sum().float()])
    utils.all_reduce_sum(totals)
    model.train()
    return (totals[0] / totals[1]).item()


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


def main(args):
    # ------------------------------------------------------------------ setup
    process = utils.setup_distributed(args.dtype)
    # The same global batch at any number of ranks: each rank takes its share.
    per_rank = utils.rank_share(args.batch_size, process.world_size, "batch_size")
    transformers.set_seed(args.seed)
    saved = utils.check_resume(args, args.output_dir)  # {}, or a checkpoint of this run to continue

    # ------------------------------------------------------------------ data
    tokenizer = utils.load_tokenizer(args.model_name_or_path)
    train = make_examples(tokenizer, utils.load_rows(args.dataset, "sft", args.dataset_split), args.max_length)
    evaluation = []
    if args.eval_dataset != "none":
        rows = utils.load_rows(args.eval_dataset, "sft", args.eval_split)
        evaluation = make_examples(tokenizer, rows, args.max_length)
    sample_rows = utils.load_rows(args.sample_prompts, "prompt") if args.sample_prompts != "none" else []
    total_steps = len(train) // args.batch_size * args.epochs  # the last partial batch is dropped
    if total_steps == 0:
        raise utils.UserError(f"{args.dataset}: {len(train)} conversations, fewer than one batch of {args.batch_size}")
    utils.print0(f"{len(train)} conversations, {total_steps} steps of {args.batch_size}, {process.world_size} rank(s)")

    # ------------------------------------------------------------------ model and optimizer
    model = utils.load_model(args.output_dir if saved else args.model_name_or_path, tokenizer).train()
    wrapped = utils.wrap(model, process, args)  # on the device; DDP or FSDP under torchrun
    optimizer, scheduler = utils.optimizer_and_scheduler(
        model, args.learning_rate, args.weight_decay, args.warmup_ratio, total_steps
    )
    trained = dict(models={"model": model}, optimizers={"model": optimizer}, schedulers={"model": scheduler})
    metrics_path = utils.start_run(args.output_dir, saved, process, **trained)
    step = saved.get("step", 0)

    # ------------------------------------------------------------------ training loop
    last_step = total_steps if args.max_steps < 0 else min(total_steps, args.max_steps)
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not process.is_main)
    started, tokens_seen = time.time(), 0
    while step < last_step:
        batch = [train[i] for i in utils.global_batch(len(train), args.batch_size, args.seed, step)]
        # The loss is the mean over all response tokens of the global batch, however it is split.
        n_tokens = sum(sum(label != -100 for label in labels[1:]) for _, labels in batch)
        mine = batch[process.rank * per_rank : (process.rank + 1) * per_rank]
        chunks = [mine[i : i + args.micro_batch_size] for i in range(0, per_rank, args.micro_batch_size)]
        train_loss = torch.zeros((), device=process.device)
        for micro_step, chunk in enumerate(chunks):
            input_ids, attention_mask, labels = collate(chunk, tokenizer.pad_token_id, process.device)
            # DDP all-reduces gradients after the last micro step only (FSDP reduce-scatters after each).
            wrapped.require_backward_grad_sync = micro_step == len(chunks) - 1
            with process.autocast():
                logits = wrapped(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
            loss = sft_loss_sum(logits, labels) / n_tokens
            # DDP and FSDP average gradients over ranks; undo that so they are of the global-batch mean.
            (loss * process.world_size).backward()
            train_loss += loss.detach()
            tokens_seen += attention_mask.sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        utils.check_finite(grad_norm, f"step {step + 1}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == last_step:
            utils.all_reduce_sum(train_loss)
            record = {"step": step, "split": "train", "loss": train_loss.item(), "lr": scheduler.get_last_lr()[0]}
            record["tokens_per_second"] = tokens_seen * process.world_size / (time.time() - started)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if process.is_main:
                utils.log_metrics(metrics_path, record)
        if evaluation and (step % args.eval_every == 0 or step == last_step):
            eval_loss = evaluate_loss(wrapped, evaluation, tokenizer.pad_token_id, args.micro_batch_size, process)
            if process.is_main:
                bar.write(f"step {step}: eval loss {eval_loss:.4f}")
                utils.log_metrics(metrics_path, {"step": step, "split": "eval", "loss": eval_loss})
        stop = step < last_step and utils.stop_requested(process)  # SIGTERM: save, then stop
        if step % args.save_every == 0 or step == last_step or stop:
            utils.save_checkpoint(args.output_dir, tokenizer, **trained, args=args, step=step)
        if stop:
            raise utils.Preempted(f"after step {step}", args.output_dir)
    bar.close()

    # ------------------------------------------------------------------ a look at what it learned
    if sample_rows and step == total_steps and (process.is_main or args.fsdp):  # FSDP: all ranks
        summary = sample_and_judge(model, tokenizer, sample_rows, args.max_length, args.max_length)
        if summary and process.is_main:
            utils.log_metrics(metrics_path, {"step": step, "split": "eval", **summary})
            utils.print0("judge on greedy answers: " + json.dumps({k: round(v, 3) for k, v in summary.items()}))
    utils.print0(f"saved to {args.output_dir} after {step} steps in {time.time() - started:.0f}s")


if __name__ == "__main__":
    utils.run(main, Args)
