"""The one module the stages share. Skip it on a first reading: it is plumbing, except its first
section, which is the paper's and marked so.

    the paper's   the conversation template; the score model, read at the last real token
    a run         run (a stage as a command: one-line errors, SIGTERM), Process (this rank), setup_distributed,
                  rank_share and micro_batches (a global batch split over ranks), wrap (DDP), seeds and RNG
                  state, dtype, logging, parse_args and check_flags
    data          load_rows: .jsonl/.json files or hub datasets, checked against the data contract
    models        load_tokenizer, load_causal_lm (with clear errors for paths that are not models), dropout
                  off, gradient checkpointing
    training      AdamW and its schedule, the order of batches, check_finite, training state, check_resume,
                  checkpoints committed by one atomic rename
    generation    generate (pure sampling or greedy, left-padded prompts, KV cache)
    FSDP only     shard, and gathering shards into full checkpoints (DDP runs never reach it)
"""

import argparse
import ast
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# ------------------------------------------------------------------ the paper's: the conversation template and the score model
# The paper's, not plumbing: four stages use them, so they live here once rather than in four copies.


# As in the original implementation; the response follows "ASSISTANT:" and ends with EOS.
PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def format_prompt(prompt):
    return PROMPT_TEMPLATE.format(prompt=prompt)


def tokenize_prompt(tokenizer, prompt, max_length):
    """Template + prompt, with the tokenizer's own special tokens (e.g. BOS). A long prompt loses its
    start (after the BOS, which stays) so that "ASSISTANT:" stays next to the response."""
    ids = tokenizer(format_prompt(prompt))["input_ids"]
    if len(ids) <= max_length:
        return ids
    keep_bos = ids[0] == tokenizer.bos_token_id
    return ids[:1] + ids[len(ids) - max_length + 1 :] if keep_bos else ids[-max_length:]


def tokenize_conversation(tokenizer, prompt, response, max_length, max_prompt_length=None, eos=True):
    """Token ids of `prompt + response + EOS`, and the number of prompt tokens.

    The one truncation rule of every stage: the prompt keeps its last `max_prompt_length` tokens
    (default max_length), then the whole is cut to `max_length`. Prompt and response are tokenised
    separately and concatenated, so the boundary is exact and matches what generation produces.
    `eos=False` leaves EOS off (a generated response that did not end).
    """
    prompt_ids = tokenize_prompt(tokenizer, prompt, max_prompt_length or max_length)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + (
        [tokenizer.eos_token_id] if eos else []
    )
    return (prompt_ids + response_ids)[:max_length], len(prompt_ids)


class ScoreModel(torch.nn.Module):
    """A reward or cost model: a causal-LM backbone with a linear score head, one score per token.

    Wraps a Hugging Face `AutoModelForSequenceClassification` (num_labels=1), so checkpoints reload
    with ordinary transformers calls. forward() gives per-token scores (B, T), which a critic uses
    as values; end_scores() reads the score at the last real token of each row (any padding side).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        ).last_hidden_state  # (B, T, H)
        return self.model.score(hidden).squeeze(-1).float()  # (B, T)

    def end_scores(self, input_ids, attention_mask):
        return end_of_sequence(self(input_ids, attention_mask), attention_mask)


def end_of_sequence(values, attention_mask):
    """values (B, T) at each row's last real token: the EOS, or the last token kept by truncation."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)  # (T,)
    last = (positions * attention_mask).argmax(-1)  # (B,): the last position whose mask is 1
    return values.gather(1, last[:, None]).squeeze(1)  # (B,)


def load_score_model(path, tokenizer, dtype=torch.float32, new_head=False):
    """A ScoreModel from one of our score checkpoints, or with new_head, a new score head on a causal LM
    (output/sft: how reward models and critics start). A score checkpoint whose head weights are missing
    stops the run instead of scoring with a random head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = dict(num_labels=1, id2label={0: "score"}, label2id={"score": 0})
    check_model_path(path)
    config = AutoConfig.from_pretrained(path)
    # Our score checkpoints are sequence classifiers; anything else (LlamaForCausalLM, GPT2LMHeadModel...) an LM.
    language_model = not any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    if is_original_score_model(config):
        raise UserError(
            f"{path} is a score model in the original code's format ({config.architectures[0]}): it can score "
            "(--reward_model / --cost_model) but not be trained here; start from a causal LM or one of our checkpoints"
        )
    if language_model and not new_head and has_weights(path):
        raise UserError(f"{path} is a language model ({config.architectures[0]}), not a reward or cost model")
    if has_weights(path):
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **kwargs
        )
        missing_head = [key for key in info["missing_keys"] if key.split(".")[0] == "score"]
        if missing_head and not language_model:
            raise UserError(f"{path}: the score head's weights ({', '.join(sorted(missing_head))}) are missing")
    else:
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, **kwargs), dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return ScoreModel(model)


def load_scorer(path, tokenizer, dtype=torch.float32):
    """A frozen R or C to score with: one of our checkpoints, or one in the original code's format (the
    released PKU-Alignment/beaver-7b-* reward and cost models). By hub name or local folder."""
    from transformers import AutoConfig

    check_model_path(path)
    if is_original_score_model(AutoConfig.from_pretrained(path)):
        return OriginalScoreModel.from_pretrained(path, tokenizer, dtype)
    return load_score_model(path, tokenizer, dtype)


def is_original_score_model(config):
    """The original code's score models name their class `LlamaForScore` (earlier `LlamaModelForScore`)
    and carry `score_dim` in their config."""
    return any(name.endswith("ForScore") for name in config.architectures or []) or hasattr(config, "score_dim")


class OriginalScoreModel(torch.nn.Module):
    """A score model in the original code's format: a backbone (e.g. LlamaModel, weights `model.*`), a
    linear `score_head` (with a bias unless `score_bias` is false), per-token scores read at the last real
    token, and, only when config.do_normalize, a normaliser from the mean and variance it stored:
    (s - mean) / (std + 1e-8) for a reward, s / (std + 1e-8) for a cost, s for a critic.
    The released beaver-7b models have do_normalize false: their score is the head's output."""

    def __init__(self, backbone, score_head, normalize):
        super().__init__()
        self.backbone, self.score_head, self.normalize = backbone, score_head, normalize
        self.config, self._no_split_modules = backbone.config, backbone._no_split_modules  # for dropout and FSDP

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        ).last_hidden_state  # (B, T, H)
        return self.normalize(self.score_head(hidden).float()[..., 0])  # (B, T): the first score dimension

    def end_scores(self, input_ids, attention_mask):
        return end_of_sequence(self(input_ids, attention_mask), attention_mask)

    @classmethod
    def from_pretrained(cls, path, tokenizer, dtype=torch.float32):
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        folder = path if os.path.isdir(path) else _download(path)
        tensors = _read_tensors(folder, ("score_head.", "normalizer."))
        if "score_head.weight" not in tensors:
            raise UserError(f"{path}: a {config.architectures[0]} checkpoint without score_head.weight")
        backbone, info = AutoModel.from_pretrained(folder, dtype=dtype, output_loading_info=True)
        if info["missing_keys"]:
            raise UserError(f"{path}: backbone weights missing from the checkpoint: {sorted(info['missing_keys'])[:5]}")
        weight = tensors["score_head.weight"]  # (score_dim, H)
        has_bias = getattr(config, "score_bias", True) and "score_head.bias" in tensors
        score_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, dtype=dtype)
        score_head.weight.data.copy_(weight)
        if has_bias:
            score_head.bias.data.copy_(tensors["score_head.bias"])
        normalize = _normalizer(config, tensors, path)
        if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:
            backbone.resize_token_embeddings(len(tokenizer))
        return cls(backbone, score_head, normalize).eval()


def _normalizer(config, tensors, path):
    """The original's output normaliser, or the identity when config.do_normalize is false."""
    if not getattr(config, "do_normalize", False):
        return lambda scores: scores
    function = {"reward": "affine", "cost": "scale", "critic": "identity"}.get(getattr(config, "score_type", "reward"))
    if function is None:
        raise UserError(f"{path}: unknown score_type {config.score_type!r} (reward, cost or critic)")
    mean = tensors.get("normalizer.mean", torch.tensor(getattr(config, "mean", None) or [0.0])).float()[0]
    var = tensors.get("normalizer.var", torch.tensor(getattr(config, "var", None) or [1.0])).float()[0]
    std = var.sqrt().item() + 1e-8
    if function == "affine":
        return lambda scores: (scores - mean.item()) / std
    if function == "scale":
        return lambda scores: scores / std
    return lambda scores: scores


def _download(name):
    """A hub model's files (config, tokenizer, weights): downloads when the network allows."""
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"])


def _read_tensors(folder, prefixes):
    """The tensors of a checkpoint folder (safetensors or .bin shards) whose names start with `prefixes`."""
    from safetensors import safe_open

    found = {}
    for name in sorted(os.listdir(folder)):
        file = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            with safe_open(file, framework="pt") as shard:
                found.update({key: shard.get_tensor(key) for key in shard.keys() if key.startswith(prefixes)})
        elif name.endswith(".bin"):
            shard = torch.load(file, map_location="cpu", weights_only=True)
            found.update({key: value for key, value in shard.items() if key.startswith(prefixes)})
    return found


def check_can_score(path, tokenizer, prompts, most_unknown=0.05):
    """Stop if a reward or cost model's tokenizer cannot read the text it is to score (it re-tokenises the
    actor's text when their tokenizers differ): no EOS to end a response with, or many of the prompts'
    tokens unknown to it (a tokenizer made for other text, whose scores would be noise)."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"{path}: its tokenizer has no EOS token, which ends every response it scores")
    if tokenizer.unk_token_id is None:
        return  # byte-level tokenizers read any text
    ids = [i for p in prompts for i in tokenizer(p, add_special_tokens=False)["input_ids"]]
    unknown = sum(i == tokenizer.unk_token_id for i in ids) / max(1, len(ids))
    if unknown > most_unknown:
        raise UserError(
            f"{path}: its tokenizer reads {unknown:.0%} of the prompt tokens as {tokenizer.unk_token!r}: it cannot "
            "score this text; use a reward or cost model trained with the actor's tokenizer, or for this text"
        )


@torch.no_grad()
def score_texts(model, tokenizer, prompts, responses, max_prompt_length, max_new_tokens, ended=None, batch_size=64):
    """End scores (N,) of (prompt, response) texts under a ScoreModel, tokenised with its own tokenizer.

    Cut as generation cuts: the prompt to its last max_prompt_length tokens, the response to
    max_new_tokens; EOS only for responses that ended (`ended`, default all).
    """
    device = next(model.parameters()).device
    ended = [True] * len(prompts) if ended is None else ended
    scores = []
    for start in range(0, len(prompts), batch_size):
        ids = [
            tokenize_conversation(
                tokenizer, prompts[i], responses[i], max_prompt_length + max_new_tokens, max_prompt_length, ended[i]
            )[0]
            for i in range(start, min(start + batch_size, len(prompts)))
        ]
        input_ids, attention_mask = batch_inputs(ids, tokenizer.pad_token_id, device)
        scores.append(model.end_scores(input_ids, attention_mask))
    return torch.cat(scores)


# ------------------------------------------------------------------ a run: processes and ranks, seeds, precision, logging, flags


class UserError(ValueError):
    """An expected mistake (bad data, flags, paths or checkpoints): the command prints one line, no traceback."""


class Preempted(Exception):
    """SIGTERM asked the run to stop; raised once the checkpoint of the last finished step is written."""

    def __init__(self, where, output_dir):
        super().__init__(
            f"stopped by SIGTERM after {where}; its checkpoint is in {output_dir}: "
            "run the same command with --resume to continue"
        )


TRACEBACK_VARIABLE = "SAFE_RLHF_TRACEBACK"  # =1: expected errors show their traceback too
ERRORS_HELP = f"""errors and stops:
  A mistake in the input (data, flags, model folders, checkpoints) stops the run with one line
  "error: ..." naming the file, row and field, and exit status 1; {TRACEBACK_VARIABLE}=1 shows the
  traceback too. SIGTERM (a cluster's notice before it stops a job) lets the current step finish,
  writes a checkpoint and exits with status 143: run the same command with --resume to continue."""
_sigterm_received = []


def run(main, args_class):
    """A stage as a command: flags from `args_class`, then main(args). Expected errors become one line on
    stderr from rank 0, every rank exits 1; a SIGTERM stop exits 143. Bugs keep their traceback."""
    signal.signal(signal.SIGTERM, lambda signum, frame: _sigterm_received.append(signum))
    try:
        main(parse_args(args_class))
        if "RANK" in os.environ:  # a finished torchrun rank leaves without the interpreter's teardown, which
            sys.stdout.flush()  # can abort in gloo's thread when a process group was alive (cleanup_distributed)
            sys.stderr.flush()
            os._exit(0)
    except (UserError, Preempted) as stop:
        if os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {stop}" if isinstance(stop, UserError) else stop, file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Leave at once: another rank may still be inside a collective, and a normal interpreter exit with
        # the process group alive can abort in gloo's thread (see cleanup_distributed).
        os._exit(1 if isinstance(stop, UserError) else 128 + signal.SIGTERM)


def stop_requested(process):
    """Whether SIGTERM reached any rank: all ranks get the same answer, so they stop after the same step."""
    flag = torch.tensor([float(bool(_sigterm_received))], device=process.device)
    return all_reduce_sum(flag).item() > 0


@dataclass
class Process:
    """This process's place in the run (one process, or one rank of a torchrun job)."""

    rank: int  # global rank, 0 .. world_size - 1
    local_rank: int  # rank on this node: picks the GPU
    world_size: int
    device: torch.device
    is_main: bool  # rank 0 logs and saves


def setup_distributed():
    """nanoGPT-style: under torchrun RANK is set and we join the process group; else one process."""
    if int(os.environ.get("RANK", -1)) == -1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Process(0, 0, 1, device, True)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(minutes=30)  # rank 0 alone writes a checkpoint while the others wait
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    # CPU ranks share the machine's cores.
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    return Process(rank, local_rank, world_size, device, rank == 0)


def cleanup_distributed():
    """Leave the process group together. The barrier is also a guard: after a collective on a Python
    tensor, gloo's worker thread must take the GIL to drop its reference to it; if the interpreter is
    already shutting down (under FSDP the group lives on until exit), that kills the thread and aborts
    a finished run ("terminate called without an active exception"). The barrier lets it finish."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks (in place); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(tensor):
    """The ranks' tensors (each the same shape) concatenated along dim 0, in rank order."""
    if not dist.is_initialized():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered)


def rank_share(global_batch_size, world_size, flag):
    """How many items of a global batch each rank takes; stops with the numbers to change when the batch
    cannot be split evenly (every rank must run the same number of forward passes)."""
    if global_batch_size % world_size:
        lower = global_batch_size - global_batch_size % world_size
        raise UserError(
            f"--{flag} {global_batch_size} cannot be split evenly over {world_size} ranks: make it a multiple "
            f"of {world_size} (e.g. {lower or world_size} or {lower + world_size}), or run on a number of ranks "
            f"that divides {global_batch_size}"
        )
    return global_batch_size // world_size


def micro_batches(items, micro_batch_size):
    """Consecutive chunks of `items` of at most micro_batch_size (the last may be shorter): one forward pass each."""
    return [items[i : i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]


def my_share(n_items, process):
    """Indices of the items this rank evaluates (every world_size-th), padded with -1 so that every rank
    gets as many: under FSDP each forward pass is a collective, so all ranks must run the same number."""
    mine = list(range(process.rank, n_items, process.world_size))
    return mine + [-1] * (math.ceil(n_items / process.world_size) - len(mine))


def wrap(model, process, fsdp=False, dtype=torch.float32):
    """The model on this rank's device as each rank trains it: itself in one process; under torchrun a
    DDP replica, or with `fsdp` sharded over the ranks (parameters, gradients and optimizer state take
    1/ranks each). Pass the model still on the CPU: FSDP moves it to the GPU one shard at a time."""
    if process.world_size > 1 and fsdp:
        return shard(model, dtype)
    model = model.to(process.device)
    if process.world_size == 1:
        return model
    return DDP(model, device_ids=[process.local_rank] if process.device.type == "cuda" else None)


def unwrap(model):
    """The model inside a DDP wrapper (FSDP shards the model in place: nothing to unwrap)."""
    return model.module if isinstance(model, DDP) else model


def set_gradient_sync(model, micro_step, micro_steps):
    """DDP all-reduces gradients only after the last micro step of an accumulation. (FSDP reduce-scatters
    after every one: skipping would keep full-size gradients on every rank, which is what FSDP avoids.)"""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = micro_step == micro_steps - 1


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """The Python, NumPy and torch RNG states as tensors and plain lists, so that a checkpoint loads with
    torch.load(weights_only=True): loading it never runs code from the file."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": [version, torch.tensor(python_state, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's GPU only: resumable on fewer GPUs
    return state


def set_rng_state(state):
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state.tolist()), gauss))
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve_dtype(name, device):
    """'auto' is bf16 on a GPU that supports it and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in ("float32", "bfloat16"):
        raise UserError(f"--dtype must be float32, bfloat16 or auto, got {name!r}")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device, dtype):
    """bf16 mixed precision (weights stay fp32) or nothing."""
    if dtype == torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def progress(iterable=None, **kwargs):
    """A tqdm bar on rank 0 only."""
    return tqdm(iterable, disable=int(os.environ.get("RANK", 0)) != 0, dynamic_ncols=True, **kwargs)


@contextmanager
def replace_when_written(path, mode="w", **kwargs):
    """open() for writing a result file that replaces the old one only once it is whole."""
    with open(path + ".tmp", mode, **kwargs) as f:
        yield f
    os.replace(path + ".tmp", path)


def log_metrics(path, record):
    """Append one JSON object (one logging step) to a metrics.jsonl file."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(path, step):
    """On --resume: drop the log lines written after the checkpoint we resume from."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if _step_of(line) <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def _step_of(line):
    """A log line's step; a line a kill cut short counts as after every step (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf


def parse_args(args_class, argv=None):
    """Command-line flags from an `Args` dataclass; the docstring under each field is its --help."""
    docs = {}
    for cls in reversed([c for c in args_class.__mro__ if dataclasses.is_dataclass(c)]):  # a subclass overrides
        try:
            body = ast.parse(inspect.getsource(cls)).body[0].body
        except OSError:  # no source (e.g. run under a profiler): flags without their help text
            continue
        for node, following in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
                docs[node.target.id] = following.value.value
    parser = _Parser(
        description=inspect.getmodule(args_class).__doc__,
        epilog=ERRORS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for field in dataclasses.fields(args_class):
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        help_text = f"{docs.get(field.name, '')} (default: {default})"
        if field.type is bool:
            parser.add_argument(f"--{field.name}", type=_bool, nargs="?", const=True, default=default, help=help_text)
        elif field.type is list:
            parser.add_argument(f"--{field.name}", nargs="*", default=default, help=help_text)
        else:
            parser.add_argument(f"--{field.name}", type=field.type, default=default, help=help_text)
    args = args_class(**vars(parser.parse_args(argv)))
    check_flags(args, args_class)
    return args


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a mistyped flag is a user's mistake like any other: one line, once
        raise UserError(f"{message} (see --help)")


def _bool(value):
    if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() in ("1", "true", "yes")


# Flags that count something and must be at least 1 (0 or less would silently train on nothing or divide by 0).
AT_LEAST_ONE = (
    "max_length", "max_prompt_length", "max_new_tokens", "epochs", "iterations", "batch_size", "micro_batch_size",
    "rollout_batch_size", "minibatch_size", "ppo_epochs", "episode_cost_window", "save_every", "log_every",
    "sample_every",
)  # fmt: skip


def check_flags(args, args_class):
    """Stop on flag values no stage can use: a nan or inf, a count below 1, an empty --output_dir."""
    for field in dataclasses.fields(args_class):
        value = getattr(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{field.name} must be a finite number, got {value}")
        if field.name in AT_LEAST_ONE and isinstance(value, int) and value < 1:
            raise UserError(f"--{field.name} must be at least 1, got {value}")
        if field.name == "temperature" and value <= 0:
            raise UserError(f"--temperature must be above 0, got {value}")
        if field.name == "output_dir" and field.default and not value.strip():
            raise UserError("--output_dir is empty: name the folder for the checkpoint and logs")


# ------------------------------------------------------------------ data: files and hub datasets with schema checks, padding


SCHEMAS = {
    "sft": {"prompt": str, "response": str},
    "preference": {
        "prompt": str,
        "response_0": str,
        "response_1": str,
        "better_response_id": int,
        "safer_response_id": int,
        "is_response_0_safe": bool,
        "is_response_1_safe": bool,
    },
    "prompt": {"prompt": str},
    "response": {"prompt": str, "response": str},
}


class DataError(UserError):
    """A data file or row that breaks the data contract (DESIGN.md §3)."""


def read_local_rows(path):
    """Rows of a local .jsonl (one object per line) or .json (a list of objects) file."""
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, not a .jsonl or .json data file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: row {line}: not UTF-8 text (byte {error.start}); save the file as UTF-8") from None
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
        return [(i + 1, row) for i, row in enumerate(rows)]
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: row {line_number}: not valid JSON ({error.msg})") from None
    return rows


def check_row(row, schema, where):
    """Raise a DataError naming file, row and field if `row` breaks `schema`; return it normalised."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if schema == "sft" and "prompt" not in row and "instruction" in row:  # Alpaca schema
        for field in ("instruction", "output"):
            if not isinstance(row.get(field), str):
                raise DataError(f"{where}: field '{field}': missing or not a string")
        extra = row.get("input") or ""
        row = {**row, "prompt": row["instruction"] + ("\n" + extra if extra else ""), "response": row["output"]}
    for field, kind in SCHEMAS[schema].items():
        if field not in row:
            raise DataError(f"{where}: field '{field}': missing")
        value = row[field]
        # bool is a subclass of int in Python: an id given as true/false is a mistake.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"{where}: field '{field}': expected {kind.__name__}, got {value!r}")
        if field.endswith("_response_id") and value not in (0, 1):
            raise DataError(f"{where}: field '{field}': must be 0 or 1, got {value!r}")
    return row


def load_rows(name_or_path, schema, split="train", subset=None):
    """Rows of a local .jsonl/.json file or a Hugging Face hub dataset, checked against `schema`.

    schema: 'sft' (prompt/response, or Alpaca's instruction/input/output), 'preference' (the
    PKU-SafeRLHF fields) or 'prompt'. Extra fields are kept and ignored by the stages.
    """
    if os.path.exists(name_or_path):
        where = name_or_path
        rows = read_local_rows(name_or_path)
    elif looks_like_a_path(name_or_path):
        raise DataError(f"{name_or_path}: no such file")
    else:  # a hub name: downloads when the network allows (never in the default run)
        import datasets

        where = f"{name_or_path}[{subset or 'default'}:{split}]"
        try:
            rows = list(enumerate(datasets.load_dataset(name_or_path, subset, split=split), start=0))
        except Exception as error:  # not found, offline, no such split...: all the user's to fix
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"{name_or_path}: not a local file, and as a hub dataset: {message}") from error
    if not rows:
        raise DataError(f"{where}: no rows")
    return [check_row(row, schema, f"{where}: row {i}") for i, row in rows]


def pad(sequences, pad_value, side="right"):
    """Stack lists of ids into a (B, T) tensor, padding on the right (training) or left (generation)."""
    length = max(len(s) for s in sequences)
    rows = [
        [pad_value] * (length - len(s)) + list(s) if side == "left" else list(s) + [pad_value] * (length - len(s))
        for s in sequences
    ]
    return torch.tensor(rows, dtype=torch.long)


def batch_inputs(sequences, pad_token_id, device, side="right"):
    """input_ids and attention_mask for a list of id lists."""
    input_ids = pad(sequences, pad_token_id, side).to(device)
    attention_mask = pad([[1] * len(s) for s in sequences], 0, side).to(device)
    return input_ids, attention_mask


# ------------------------------------------------------------------ models


def looks_like_a_path(name):
    """A local path rather than a hub name ("name" or "namespace/name"): ./x, /x, ~/x, a/b/c, x.jsonl."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
        or name.endswith((".json", ".jsonl", "/"))
    )


def has_weights(path):
    """False for a local folder with a config but no weights (the toy model), True otherwise."""
    if not os.path.isdir(path):
        return True  # a hub name
    return any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))


def check_model_path(path, needs=("config.json",)):
    """Stop with a clear line on a model path that cannot load: missing, half-written, or a folder without
    any of the files `needs` (a tokenizer folder needs only its tokenizer_config.json)."""
    if os.path.isdir(os.path.join(path, INTERRUPTED)):
        raise UserError(
            f"{path}: writing its last checkpoint was interrupted; the stage that wrote it, run again with "
            "--resume and the same --output_dir, completes it"
        )
    if os.path.isdir(path) and not set(needs) & set(os.listdir(path)):
        raise UserError(f"{path}: no config.json, so not a model folder (a stage's --output_dir is one)")
    if os.path.isfile(path):
        raise UserError(f"{path}: a file; a model is a folder (or a hub name)")
    if not os.path.exists(path) and (looks_like_a_path(path) or os.path.isdir(path.split("/")[0])):
        raise UserError(f"{path}: no such model folder")


def load_tokenizer(path):
    from transformers import AutoTokenizer

    check_model_path(path, needs=("config.json", "tokenizer_config.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:  # a hub name that is not on the hub, no network, or a folder without a tokenizer
        where = "cannot load its tokenizer" if os.path.isdir(path) else "not a local folder, and as a hub model"
        raise UserError(f"{path}: {where}: {(str(error).strip() or type(error).__name__).splitlines()[0]}") from error
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A pad distinct from EOS, so that masking padding never hides the EOS the model must learn.
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def load_causal_lm(path, tokenizer, dtype=torch.float32, model_class=None):
    """A causal LM (or `model_class`) from a checkpoint, or freshly initialised from a weightless config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    check_model_path(path)
    if has_weights(path):
        model = model_class.from_pretrained(path, dtype=dtype)
    else:
        print0(f"{path} has no weights: initialising the model from its config")
        model = model_class.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def disable_dropout(model):
    """RL needs a deterministic policy forward: the PPO ratio must be exactly 1 before any update."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # functional dropout in attention
            module.attention_dropout = 0.0
    config = model.model.config if isinstance(model, ScoreModel) else model.config
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)


def enable_gradient_checkpointing(model):
    """Recompute activations in backward (non-reentrant, no KV cache while training)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def position_ids(attention_mask):
    """Positions that skip left padding, so a left-padded row is computed exactly like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------ training: optimizer, data order, checkpoints


ADAM_BETAS = (0.9, 0.95)  # as in the original code (and most LLM training since GPT-3)


def cosine_schedule(warmup_steps, total_steps, min_ratio=0.0):
    """Learning-rate multiplier: linear warmup, then cosine decay to `min_ratio`."""

    def multiplier(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def optimizer_and_scheduler(model, learning_rate, weight_decay, warmup_ratio, total_steps, schedule="cosine"):
    """AdamW as in the original code: betas (0.9, 0.95), no weight decay on biases and normalisation
    weights (the 1-D parameters). Schedule 'cosine': linear warmup over `warmup_ratio` of the steps, then
    cosine decay to 0; 'constant': the same rate throughout, no warmup (as transformers' 'constant')."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=ADAM_BETAS)
    multiplier = cosine_schedule(max(1, math.ceil(warmup_ratio * total_steps)), total_steps)
    if schedule == "constant":
        multiplier = lambda step: 1.0  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def global_batch(n_examples, batch_size, seed, step):
    """Indices of the examples of optimizer step `step` (epochs of seeded shuffles, last partial batch dropped).

    The order depends only on (seed, step), so a resumed run sees exactly the batches it would have.
    """
    epoch, position = divmod(step, n_examples // batch_size)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def check_finite(grad_norm, where):
    """Stop before an update whose gradient is nan or inf (the norm is the same on every rank): the weights
    and the last checkpoint stay as they were."""
    norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: a DTensor
    if not math.isfinite(norm):
        raise UserError(
            f"{where}: the gradient norm is {norm} (a loss is nan or inf); stopped before this update, the last "
            "checkpoint is kept. Lower the learning rate or use --dtype float32, then run again with --resume"
        )


def training_state(model, optimizer, scheduler, step, args):
    """What --resume needs besides the weights (every rank calls this: FSDP gathers the optimizer state)."""
    return {
        "optimizer": optimizer_state(model, optimizer),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "rng": rng_state(),
        **run_identity(args),
    }


def run_identity(args):
    """Which stage saved a checkpoint, and with which flags: what --resume checks before continuing."""
    return {"stage": os.path.basename(inspect.getmodule(type(args)).__file__), "args": dataclasses.asdict(args)}


# Flags that may change on --resume: when to stop, log and save, and how a batch is split, not what is computed.
RESUMABLE_FLAGS = (
    "resume", "output_dir", "max_steps", "max_iterations", "save_every", "log_every", "eval_every", "sample_every",
    "micro_batch_size", "gradient_checkpointing", "fsdp", "eval_dataset", "eval_split", "sample_prompts", "eval_prompts",
)  # fmt: skip


def check_resume(output_dir, args):
    """Stop with a clear line unless output_dir holds a checkpoint this run can continue: one saved by the
    same stage with the same flags (apart from RESUMABLE_FLAGS). Finishes a checkpoint write a kill interrupted.
    Every rank calls it."""
    finish_checkpoint(output_dir)
    if dist.is_initialized():
        dist.barrier()  # until rank 0 has finished it
    if not os.path.isfile(os.path.join(output_dir, "training_state.pt")):
        raise UserError(
            f"--resume: {output_dir} holds no checkpoint to continue (no training_state.pt); "
            "run without --resume to start, or pass the --output_dir of the run to continue"
        )
    saved, mine = load_training_state(output_dir), run_identity(args)
    if saved.get("stage", mine["stage"]) != mine["stage"]:
        raise UserError(f"--resume: {output_dir} holds a checkpoint of {saved['stage']}, not of {mine['stage']}")
    changed = [
        f"--{name} {saved['args'].get(name)!r} there, {value!r} here"
        for name, value in mine["args"].items()
        if name not in RESUMABLE_FLAGS and saved["args"].get(name, value) != value
    ]
    if changed:
        raise UserError(
            f"--resume: {output_dir} holds a run with other flags ({'; '.join(changed)}). A resumed run continues "
            "the same run: pass the flags it was started with, or start a new run in another --output_dir"
        )


def load_training_state(output_dir):
    """training_state.pt, memory-mapped: the ranks of a node share its pages instead of a copy each."""
    return torch.load(os.path.join(output_dir, "training_state.pt"), weights_only=True, mmap=True)


def restore_training_state(output_dir, model, optimizer, scheduler):
    """Load optimizer, schedule and RNG saved by a previous run; return its step."""
    state = load_training_state(output_dir)
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    print0(f"resumed from {output_dir} at step {state['step']}")
    return state["step"]


def save_checkpoint(output_dir, model, tokenizer, training_state=None, submodels=None):
    """A Hugging Face checkpoint (safetensors) + tokenizer + optional training state and sub-models
    (e.g. {"reward_critic": model}, each in its own folder), written safely: everything goes to a
    temporary folder first and is renamed over the old files only once all of it is written.

    Under torchrun every rank calls this (FSDP gathers its shards here); rank 0 writes.
    """
    models = {".": model, **(submodels or {})}
    weights = {name: full_state_dict(m) if is_sharded(m) else None for name, m in models.items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()  # until rank 0 has written
        return
    os.makedirs(output_dir, exist_ok=True)
    finish_checkpoint(output_dir)  # one a kill left half moved, so that the commit below has its name free
    tmp = os.path.join(output_dir, ".tmp_checkpoint")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, m in models.items():
        m.save_pretrained(os.path.join(tmp, name), state_dict=weights[name])
        tokenizer.save_pretrained(os.path.join(tmp, name))
    if training_state is not None:
        torch.save(training_state, os.path.join(tmp, "training_state.pt"))
    for folder, _, files in os.walk(tmp):  # on disk before the commit, so that not even a power cut tears it
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
    # The commit: one atomic rename. A kill before it leaves the previous checkpoint as it was; a kill after
    # it leaves a complete checkpoint that finish_checkpoint moves into place (--resume calls it).
    os.replace(tmp, os.path.join(output_dir, INTERRUPTED))
    finish_checkpoint(output_dir)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait above until the checkpoint is in place


INTERRUPTED = ".checkpoint_to_move"  # a committed checkpoint whose files are not all in place yet


def finish_checkpoint(output_dir):
    """Move a committed checkpoint's files over the previous ones (rank 0 only); after a kill, doing it
    again finishes the job."""
    ready = os.path.join(output_dir, INTERRUPTED)
    if (not dist.is_initialized() or dist.get_rank() == 0) and os.path.isdir(ready):
        for name in os.listdir(ready):
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(ready, name), target)
        os.rmdir(ready)


# ------------------------------------------------------------------ generation


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens, temperature=1.0, greedy=False):
    """Responses to left-padded prompts, with the KV cache; pure sampling at `temperature` or greedy.

    Pure means softmax(logits / temperature) and nothing else, the distribution the PPO log-probs assume:
    the checkpoint's own generation_config.json (a repetition penalty, top-k/top-p, min_new_tokens,
    suppressed or bad words...) is set aside for the call, since transformers fills every setting not
    passed from it. Returns (sequences (B, P + N), prompt_length P): row i holds its left-padded prompt
    then its response, padded with pad_token_id after the first EOS.
    """
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=0,  # no top-k truncation (transformers' own default is 50)
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,  # the KV cache, even when training turned it off for gradient checkpointing
    )
    device = next(model.parameters()).device
    input_ids, attention_mask = batch_inputs(prompt_ids, tokenizer.pad_token_id, device, side="left")
    # Under FSDP every rank runs every step (synced_gpus) since a step may gather weights, and the blocks
    # stay gathered for the whole generation instead of being gathered again for every token.
    blocks = [module for module in model.modules() if isinstance(module, FSDPModule) and module is not model]
    for block in blocks:
        block.set_reshard_after_forward(False, recurse=False)
    checkpoint_config, model.generation_config = model.generation_config, GenerationConfig()
    try:
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, synced_gpus=is_sharded(model)
        )
    finally:
        model.generation_config = checkpoint_config
        for block in blocks:
            block.reshard()
            block.set_reshard_after_forward(True, recurse=False)
    return sequences, input_ids.shape[1]


def response_lists(sequences, prompt_length, eos_token_id):
    """Per row, the response ids up to and including the first EOS (all of them if none)."""
    responses = []
    for row in sequences[:, prompt_length:].tolist():
        responses.append(row[: row.index(eos_token_id) + 1] if eos_token_id in row else row)
    return responses


# ------------------------------------------------------------------ FSDP only: sharding, and gathering shards for a checkpoint


def shard(model, dtype=torch.float32):
    """PyTorch FSDP (fully_shard): each transformer block is its own unit, gathered just before it runs
    (the next one is prefetched) and freed after; the embeddings, final norm and head form the root
    unit. Moves the model to this rank's GPU, if any. Works on frozen models too. With bf16 the units
    are gathered and computed in bf16 while the sharded weights and the gradient sums stay fp32."""
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    block_names = set((model.model if isinstance(model, ScoreModel) else model)._no_split_modules or [])
    for block in [module for module in model.modules() if type(module).__name__ in block_names]:
        fully_shard(block, mp_policy=policy)
    model = fully_shard(model, mp_policy=policy)
    if not any(parameter.requires_grad for parameter in model.parameters()):
        # FSDP keeps the root unit gathered after forward, for the backward that follows; a frozen
        # model has none, so free it like the blocks (the embeddings and head of a 7B model are ~0.5 GB).
        model.set_reshard_after_forward(True, recurse=False)
    return model


def is_sharded(model):
    """True when FSDP holds (part of) the model's weights, e.g. the HF model inside a sharded ScoreModel."""
    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        hasattr(parameter, "full_tensor") for parameter in model.parameters()
    )


def full_state_dict(model):
    """The model's weights as plain CPU tensors on rank 0 (None elsewhere), a tied weight once. FSDP
    shards are gathered one tensor at a time, so every rank must call this."""
    keep = not dist.is_initialized() or dist.get_rank() == 0
    state, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # e.g. lm_head.weight tied to the input embeddings
            continue
        seen.add(id(tensor))
        if hasattr(tensor, "full_tensor"):  # a DTensor: this rank's shard
            tensor = tensor.full_tensor()
        if keep:
            state[name] = tensor.detach().cpu()
    return state if keep else None


def optimizer_state(model, optimizer):
    """optimizer.state_dict(), with FSDP's sharded moments gathered in full on rank 0 (every rank must call
    this), so the same checkpoint resumes on any number of ranks, with or without FSDP."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copy, never modify
    if not is_sharded(model):
        return state
    keep = dist.get_rank() == 0
    gathered = {}
    for index, moments in state["state"].items():
        gathered[index] = {}
        for key, value in moments.items():
            if hasattr(value, "full_tensor"):  # a DTensor: this rank's shard
                value = value.full_tensor()
                value = value.cpu() if keep else None
            gathered[index][key] = value
    return {**state, "state": gathered}


def load_optimizer_state(model, optimizer, state):
    """Inverse of optimizer_state: under FSDP each rank keeps its shard of the full moments."""
    if is_sharded(model):
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        for index, moments in state["state"].items():
            parameter = parameters[index]
            for key, value in moments.items():
                if torch.is_tensor(value) and value.shape == parameter.shape:  # not the scalar `step`
                    moments[key] = distribute_tensor(
                        value.to(parameter.device), parameter.device_mesh, parameter.placements
                    )
    optimizer.load_state_dict(state)
