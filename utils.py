"""The one module the five stages share. A reader needs only its first part, the paper's: the conversation template
and its tokenisation (as the original's), the score model read at the last real token, the position ids that make
left padding harmless, and decoding. The rest is plumbing: a stage as a command, ranks, data, models, checkpoints.
"""

import argparse
import ast
import dataclasses
import datetime
import glob
import inspect
import json
import math
import os
import shutil
import signal
import sys
from collections import namedtuple
from contextlib import nullcontext

import safetensors
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dcp
import transformers
from huggingface_hub import snapshot_download
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.rnn import pad_sequence

# ================================================================ the paper's
PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"  # the original's; the response follows


def tokenize_conversation(tokenizer, prompt, response=None, max_length=None, eos=True):
    """(ids, number of prompt tokens) as the original: `template(prompt) + response + EOS` as ONE string, cut on the
    right at max_length; the prompt's tokens are template(prompt)'s alone. response=None: the prompt, to generate
    from (a long one keeps its BOS and last tokens: "ASSISTANT:" stays next to the answer)."""
    text = PROMPT_TEMPLATE.format(prompt=prompt)
    prompt_ids = tokenizer(text)["input_ids"]
    if response is None:
        if len(prompt_ids) > (max_length or math.inf):
            bos = int(prompt_ids[0] == tokenizer.bos_token_id)
            prompt_ids = prompt_ids[:bos] + prompt_ids[len(prompt_ids) - max_length + bos :]
        return prompt_ids, len(prompt_ids)
    ids = tokenizer(text + response + (tokenizer.eos_token if eos else ""))["input_ids"][:max_length]
    return ids, min(len(prompt_ids), len(ids))


def position_ids(attention_mask):
    """Positions that skip left padding, so a left-padded row is computed exactly like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ScoreModel(torch.nn.Module):
    """A reward or cost model, or a critic: a transformer `model` with a linear head `model.score`: a score per token.
    Ours is an AutoModelForSequenceClassification (num_labels=1): it reloads with plain transformers."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, end=False):
        """Scores (B, T) at every token, a critic's values; with `end` each row's score at its last real token (B,),
        the EOS or the last token kept by truncation: a reward's or cost's. Padding on either side is ignored."""
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        ).last_hidden_state  # (B, T, H)
        scores = self.model.score(hidden)[..., 0].float()  # (B, T): the first score dimension
        positions = torch.arange(attention_mask.size(1), device=attention_mask.device)  # (T,)
        last = (positions * attention_mask).argmax(-1)  # (B,): the last position whose mask is 1
        return scores.gather(1, last[:, None]).squeeze(1) if end else scores


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens, temperature=1.0, greedy=False, top_k=0):
    """(sequences (B, P + N), P): left-padded prompts and answers (padded after EOS), sampled with the KV cache from
    softmax(logits / temperature) (its top_k tokens if > 0) or greedy; the checkpoint's own sampling settings unused."""
    sampling = dict(do_sample=not greedy, temperature=None if greedy else temperature, top_k=None if greedy else top_k)
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = transformers.GenerationConfig(max_new_tokens=max_new_tokens, use_cache=True, **sampling, **special)
    input_ids, attention_mask = batch_inputs(prompt_ids, tokenizer.pad_token_id, model.device, "left")
    # FSDP: every rank runs every step (synced_gpus), and the blocks stay gathered for the whole generation.
    blocks = [module for module in model.modules() if isinstance(module, FSDPModule) and module is not model]
    for block in blocks:
        block.set_reshard_after_forward(False, recurse=False)
    own_config, model.generation_config = model.generation_config, transformers.GenerationConfig()
    sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                               synced_gpus=bool(blocks))  # fmt: skip
    model.generation_config = own_config
    for block in blocks:
        block.reshard()
        block.set_reshard_after_forward(True, recurse=False)
    return sequences, input_ids.shape[1]


# ================================================================ plumbing: runs, ranks, data, models, checkpoints
class UserError(ValueError):
    """An expected mistake (data, flags, paths, checkpoints): the command prints one line, no traceback."""


class Preempted(Exception):
    """SIGTERM asked the run to stop (raised once the last finished step's checkpoint is written)."""

    def __init__(self, where, output_dir=None):
        then = f"; its checkpoint is in {output_dir}: run the same command with --resume to continue"
        super().__init__(f"stopped by SIGTERM {where}" + (then if output_dir else "; nothing was written"))


def run(main, args_class):
    """A stage as a command: an expected error is one line and exit status 1 on every rank, SIGTERM's stop 143."""
    signal.signal(signal.SIGTERM, lambda signum, frame: _sigterm_received.append(signum))
    status, line = 0, ""
    try:
        main(parse_args(args_class))
    except (UserError, Preempted) as stop:
        if os.environ.get("SAFE_RLHF_TRACEBACK") == "1":
            raise
        line, status = (f"error: {stop}", 1) if isinstance(stop, UserError) else (str(stop), 128 + signal.SIGTERM)
    if line:  # here, once the block has freed the stage's frames: a progress bar's last print comes before it
        print0(line, file=sys.stderr)
    if status == 0 and dist.is_initialized():
        dist.barrier()  # finished ranks leave together (gloo's thread may still hold a tensor)
    if status or "RANK" in os.environ:  # at once: after an error another rank may be in a collective, and
        sys.stdout.flush(), sys.stderr.flush()  # a teardown with a process group alive can abort in gloo
        os._exit(status)


def parse_args(args_class, argv=None):
    """Flags from an `Args` dataclass (HfArgumentParser; a field's docstring is its help); a bad one is a UserError."""
    epilog = """errors and stops: a mistake in the input stops with one line "error: ..." and status 1
  (SAFE_RLHF_TRACEBACK=1 shows the traceback); SIGTERM finishes the step, saves and exits 143: then --resume."""
    doc, raw = inspect.getmodule(args_class).__doc__, argparse.RawDescriptionHelpFormatter
    parser = transformers.HfArgumentParser(args_class, description=doc, epilog=epilog, formatter_class=raw)
    parser.exit_on_error, parser.allow_abbrev = False, False  # a mistyped flag (--epoch) is a UserError (below)
    body = ast.parse(inspect.getsource(args_class)).body[0].body
    docs = {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:]) if isinstance(b, ast.Expr)}
    for action in parser._actions[1:]:
        action.help = f"{docs.get(action.dest, '')} (default: {action.default})"
    try:
        (args,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except (argparse.ArgumentError, ValueError) as error:
        raise UserError(f"{error} (see --help)") from None
    for name, value in vars(args).items():  # a count that is at least 1 by default stays so (its use divides by it)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
        if type(value) is int and value < 1 <= getattr(args_class, name) and name != "seed":
            raise UserError(f"--{name} must be at least 1, got {value}")
        if name == "temperature" and value <= 0:
            raise UserError(f"--temperature must be above 0, got {value}")
    if getattr(args_class, "output_dir", "") and not args.output_dir.strip():
        raise UserError("--output_dir is empty: name the folder for the checkpoint and logs")
    if os.path.isfile(getattr(args, "output_dir", "")):
        raise UserError(f"--output_dir {args.output_dir} is a file; name a folder (it is created if missing)")
    return args


def stop_requested(process):
    """Whether SIGTERM reached any rank: every rank gets the same answer, so all stop after the same step."""
    return all_reduce_sum(torch.tensor([float(bool(_sigterm_received))], device=process.device)).item() > 0


Process = namedtuple("Process", "rank world_size device is_main dtype autocast")  # is_main: rank 0 logs and saves
_sigterm_received = []  # run's SIGTERM handler notes the signal here; stop_requested reads it


def setup_distributed(dtype="auto"):
    """nanoGPT-style: under torchrun (RANK set) join the process group. dtype auto: bf16 on a GPU that can, or fp32."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    bf16 = dtype == "bfloat16" or dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    if "RANK" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # the ranks of a node share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    autocast = lambda: torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext()  # noqa: E731
    return Process(rank, world_size, device, rank == 0, torch.bfloat16 if bf16 else torch.float32, autocast)


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks, in place (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def rank_share(batch_size, world_size, flag):
    """Items of a global batch each rank takes; a batch that cannot be split evenly stops with what to change."""
    if batch_size % world_size:
        raise UserError(f"--{flag} {batch_size} cannot be split evenly over {world_size} ranks: make it a multiple")
    return batch_size // world_size


def wrap(model, process, args):
    """The model as each rank runs it: itself, a DDP replica if trained, or with --fsdp sharded (FSDP: each block a
    unit gathered just before it runs, then freed; bf16 compute on fp32 shards); --gradient_checkpointing if trained."""
    trained = any(parameter.requires_grad for parameter in model.parameters())
    inner = model.model if isinstance(model, ScoreModel) else model  # the transformers model
    if args.gradient_checkpointing and trained:
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        inner.config.use_cache = False
    if process.world_size > 1 and args.fsdp:
        policy = MixedPrecisionPolicy(param_dtype=process.dtype, reduce_dtype=torch.float32)
        for block in [module for module in model.modules() if type(module).__name__ in inner._no_split_modules]:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        if not trained:  # no backward to keep its root unit (embeddings, head: ~0.5 GB at 7B) gathered for
            model.set_reshard_after_forward(True, recurse=False)
        return model
    model = model.to(process.device)
    return DDP(model) if process.world_size > 1 and trained else model


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def log_metrics(path, record):  # one logging step: a line of metrics.jsonl
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


SCHEMAS = {  # DESIGN.md §3; extra fields are kept and ignored
    "sft": {"prompt": str, "response": str}, "prompt": {"prompt": str},
    "preference": {"prompt": str, "response_0": str, "response_1": str, "better_response_id": int,
                   "safer_response_id": int, "is_response_0_safe": bool, "is_response_1_safe": bool},
}  # fmt: skip


def load_rows(name_or_path, schema, split="train", subset=None):
    """Rows of a .jsonl/.json file (UTF-8, BOM or not, any line ends) or hub dataset, checked against SCHEMAS[schema]
    (a bad row stops the run naming file, row and field); SFT rows may be Alpaca's, joined as the original's."""
    where = name_or_path
    if os.path.isfile(name_or_path):
        data = open(name_or_path, "rb").read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            row = data[: e.start].count(b"\n") + 1
            raise UserError(f"{where}: row {row}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        lines, whole = text.splitlines(), name_or_path.endswith(".json") or text.lstrip().startswith("[")
        try:  # a JSON list (in a .json, or a .jsonl holding one), or a JSON object per line
            rows = (
                [(0, json.loads(text))] if whole else [(i, json.loads(x)) for i, x in enumerate(lines, 1) if x.strip()]
            )
        except json.JSONDecodeError as e:
            at = f"line {e.lineno}" if whole else f"row {lines.index(e.doc) + 1}"
            raise UserError(f"{where}: {at}: not valid JSON ({e.msg})") from None
        if whole and not isinstance(rows[0][1], list):
            raise UserError(f"{where}: expected a JSON list of objects, got {type(rows[0][1]).__name__}")
        rows = list(enumerate(rows[0][1], 1)) if whole else rows
    elif os.path.isdir(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"{where}: " + ("a folder, not a data file" if os.path.isdir(where) else "no such file"))
    else:  # a hub dataset: downloads when the network allows (never in the default run)
        import datasets

        where = f"{name_or_path}[{subset or 'default'}:{split}]"
        try:
            rows = list(enumerate(datasets.load_dataset(name_or_path, subset, split=split)))
        except Exception as error:  # not found, offline, no such split...: all the user's to fix
            message = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise UserError(f"{name_or_path}: not a local file, and as a hub dataset: {message}") from error
    if not rows:
        raise UserError(f"{where}: no rows")
    checked = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: row {i}: expected a JSON object, got {type(row).__name__}")
        if schema == "sft" and "prompt" not in row and "instruction" in row:  # Alpaca's, joined as the original
            prompt = " ".join(filter(None, [row["instruction"], row.get("input")]))
            row = {**row, "prompt": prompt, "response": row.get("output")}
        for field, kind in SCHEMAS[schema].items():
            value, field = row.get(field), "output" if field == "response" and "instruction" in row else field
            if value is None:
                raise UserError(f"{where}: row {i}: field '{field}': missing")
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):  # True is an int too
                raise UserError(f"{where}: row {i}: field '{field}': expected {kind.__name__}, got {value!r}")
            if field == "prompt" and not value.strip():
                raise UserError(f"{where}: row {i}: field 'prompt': empty")
            if field.endswith("_response_id") and value not in (0, 1):
                raise UserError(f"{where}: row {i}: field '{field}': must be 0 or 1, got {value!r}")
        checked.append(row)
    return checked


def batch_inputs(sequences, pad_token_id, device, side="right"):
    """input_ids and attention_mask (B, T) of lists of ids, padded on the right (training) or left (generation)."""
    ids = [torch.tensor(s, dtype=torch.long) for s in sequences]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_token_id, padding_side=side)
    mask = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_side=side)
    return input_ids.to(device), mask.to(device)


def load_tokenizer(path, prompts=()):
    """A model's tokenizer, with a pad distinct from EOS (masking it never hides EOS); with `prompts`, one that can
    read them. A path that cannot be a model stops; a local-looking one (./x, a/b/c, output/x) never goes to the hub."""
    local = path.startswith((".", "/", "~", "output/")) or path.count("/") > 1 or os.path.isdir(path.split("/")[0])
    if os.path.isdir(os.path.join(path, INTERRUPTED)):
        raise UserError(f"{path}: writing its last checkpoint was interrupted: run its stage again with --resume")
    if os.path.isdir(path) and not {"config.json", "tokenizer_config.json"} & set(os.listdir(path)):
        raise UserError(f"{path}: no config.json, so not a model folder (a stage's --output_dir is one)")
    if os.path.isfile(path) or (local and not os.path.exists(path)):
        what = "a file, not a model folder" if os.path.isfile(path) else "no such model folder"
        raise UserError(f"{path}: {what}" + " (a stage's output: run that stage first)" * (path[:7] == "output/"))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except OSError as error:  # a hub name that is not on the hub, no network, or a folder without a tokenizer
        where = "cannot load its tokenizer" if os.path.isdir(path) else "not a local folder, and as a hub model"
        raise UserError(f"{path}: {where}: {(str(error).strip() or type(error).__name__).splitlines()[0]}") from error
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    ids = [i for prompt in prompts[:64] for i in tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    unknown = ids.count(tokenizer.unk_token_id) / max(1, len(ids))
    if prompts and (tokenizer.eos_token_id is None or unknown > 0.05):  # it would score noise
        problem = f"reads {unknown:.0%} of the prompt tokens as unknown" if unknown > 0.05 else "has no EOS"
        raise UserError(f"{path}: its tokenizer {problem}: it cannot score this text (a scorer needs one that can)")
    return tokenizer


def load_model(path, tokenizer, score=False, new_head=False, dtype=torch.float32):
    """A causal LM, or with `score` a ScoreModel: ours, one in the original code's format, or with new_head a new
    head on a causal LM (how reward models and critics start). A config without weights (the toy's) is initialised."""
    one_score = dict(num_labels=1, id2label={0: "score"}) if score else {}
    config = transformers.AutoConfig.from_pretrained(path, **one_score)
    architecture = (config.architectures or ["a model"])[0]
    has_weights = not os.path.isdir(path) or any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
    ours, original = architecture.endswith("ForSequenceClassification"), architecture.endswith("ForScore")
    model_class = transformers.AutoModelForSequenceClassification if score else transformers.AutoModelForCausalLM
    if original and (not score or new_head):
        raise UserError(f"{path} is a score model in the original code's format ({architecture}): it can score "
                        "(--reward_model, --cost_model) but not be trained here")  # fmt: skip
    if score and has_weights and not (new_head or ours or original):
        raise UserError(f"{path} is a language model ({architecture}), not a reward or cost model")
    if original:
        model = original_score_model(path, config, dtype)
    elif has_weights:
        model, info = model_class.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
        if ours and (missing := sorted(key for key in info["missing_keys"] if key.startswith("score."))):
            raise UserError(f"{path}: the score head's weights ({', '.join(missing)}) are missing")
    else:
        print0(f"{path} has no weights: initialising the model from its config")
        model = model_class.from_config(config, dtype=dtype)
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
    model.config.pad_token_id = tokenizer.pad_token_id
    return ScoreModel(model) if score else model


def original_score_model(path, config, dtype):
    """The original's score model (the released PKU-Alignment/beaver-7b-*): a backbone (weights model.*), a linear
    score_head with a bias, and a normaliser (affine: folded into the head when do_normalize)."""
    folder = path if os.path.isdir(path) else snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    head = {}
    for file in glob.glob(os.path.join(folder, "*.safetensors")):  # only the head's tensors are read
        with safetensors.safe_open(file, framework="pt") as shard:
            wanted = [k for k in shard.keys() if k.split(".")[0] in ("score_head", "normalizer")]
            head |= {k: shard.get_tensor(k).float() for k in wanted}
    if "score_head.weight" not in head:
        raise UserError(f"{path}: a {config.architectures[0]} checkpoint without score_head.weight")
    model, info = transformers.AutoModel.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:
        raise UserError(f"{path}: backbone weights missing from the checkpoint: {sorted(info['missing_keys'])[:5]}")
    weight = head["score_head.weight"]  # (score_dim, H)
    bias = head.get("score_head.bias", torch.zeros(len(weight))) * getattr(config, "score_bias", True)
    kind = getattr(config, "score_type", "reward") if getattr(config, "do_normalize", False) else "critic"
    if kind != "critic":  # (s - mean) / (std + 1e-8) for a reward, s / (std + 1e-8) for a cost; buffers before config
        mean = head.get("normalizer.mean", torch.tensor(getattr(config, "mean", None) or [0.0])) * (kind == "reward")
        std = head.get("normalizer.var", torch.tensor(getattr(config, "var", None) or [1.0])).sqrt() + 1e-8
        weight, bias = weight / std[:, None], (bias - mean) / std
    model.score = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=dtype)
    model.score.load_state_dict({"weight": weight, "bias": bias})
    return model


def optimizer_and_scheduler(model, learning_rate, weight_decay, warmup_ratio, total_steps, schedule="cosine"):
    """AdamW as the original (betas 0.9/0.95, no decay on 1-D weights) and transformers' cosine or constant schedule."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95))
    warmup = math.ceil(warmup_ratio * total_steps) if schedule == "cosine" else 0
    scheduler = transformers.get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


def global_batch(n_examples, batch_size, seed, step):
    """The examples of step `step` (epochs of seeded shuffles): (seed, step) decide, so a resumed run sees the same."""
    epoch, position = divmod(step, n_examples // batch_size)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def check_finite(grad_norm, where):
    """Stop before an update whose gradient is nan or inf (the norm is global: every rank stops)."""
    norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: a DTensor
    if not math.isfinite(norm):
        raise UserError(f"{where}: the gradient norm is {norm}: stopped before this update (lower the lr; --resume)")


INTERRUPTED = ".checkpoint_to_move"  # a committed checkpoint whose files are not all in place yet
RESUMABLE = ("resume", "output_dir", "max_steps", "max_iterations", "save_every", "log_every", "eval_every",
             "sample_every", "micro_batch_size", "gradient_checkpointing", "fsdp", "eval_dataset", "eval_split",
             "sample_prompts", "eval_prompts")  # fmt: skip


def check_resume(args, output_dir):
    """{} for a fresh run; with --resume the state in output_dir if this run continues it (same stage and flags but
    RESUMABLE ones: when to stop, log and save, how a batch is split), else a clear stop."""
    if not args.resume:
        return {}
    finish_checkpoint(output_dir)
    if dist.is_initialized():
        dist.barrier()  # until rank 0 has finished it
    if not os.path.isfile(os.path.join(output_dir, "training_state.pt")):
        raise UserError(f"--resume: {output_dir} holds no checkpoint to continue (no training_state.pt); run without "
                        "--resume to start, or pass the --output_dir of the run to continue")  # fmt: skip
    saved = torch.load(os.path.join(output_dir, "training_state.pt"), weights_only=True, mmap=True)
    stage = os.path.basename(inspect.getmodule(type(args)).__file__)
    if saved.get("format") != 2 or saved["stage"] != stage:
        what = saved["stage"] if saved.get("format") == 2 else "an earlier version of this code (start a new run)"
        raise UserError(f"--resume: {output_dir} holds a checkpoint of {what}, not of {stage}")
    changed = [f"--{name} {saved['args'].get(name)!r} there, {value!r} here" for name, value in vars(args).items()
               if name not in RESUMABLE and saved["args"].get(name, value) != value]  # fmt: skip
    if changed:
        hint = "A resumed run continues the same run: pass its flags, or start a new one in another --output_dir"
        raise UserError(f"--resume: {output_dir} holds a run with other flags ({'; '.join(changed)}). {hint}")
    return saved


def start_run(output_dir, saved, process, models, optimizers, schedulers):
    """Restore a resumed run's optimizers, schedules (keyed as `models`) and RNG; start output_dir's metrics.jsonl."""
    for name, optimizer in optimizers.items() if saved else ():
        options = dcp.StateDictOptions(full_state_dict=True)
        dcp.set_optimizer_state_dict(models[name], optimizer, saved["optimizers"][name], options=options)
        schedulers[name].load_state_dict(saved["schedulers"][name])
    if saved:
        torch.set_rng_state(saved["rng"][process.rank % len(saved["rng"])])
        print0(f"resumed from {output_dir} at step {saved['step']}")
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if process.is_main:
        os.makedirs(output_dir, exist_ok=True)
        lines = open(metrics).readlines() if saved and os.path.exists(metrics) else []
        with open(metrics, "w") as f:  # a line a kill cut short goes too
            f.writelines(line for line in lines if line.endswith("}\n") and json.loads(line)["step"] <= saved["step"])
    return metrics


def save_checkpoint(output_dir, tokenizer, models, optimizers=None, schedulers=None, args=None, **state):
    """A transformers checkpoint per model (the first at the root, others in subfolders by key) and, with optimizers,
    training_state.pt (optimizers whole, schedules, every rank's RNG, stage, flags, `state`). Every rank calls it
    (FSDP gathers here); rank 0 writes it all to a temporary folder, flushes it, and commits it by one rename."""
    full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0's CPU
    weights = {n: dcp.get_model_state_dict(m, options=full) for n, m in models.items() if isinstance(m, FSDPModule)}
    if optimizers:
        rng = [torch.get_rng_state()] * (dist.get_world_size() if dist.is_initialized() else 1)
        if dist.is_initialized():
            dist.all_gather_object(rng, torch.get_rng_state())
        state.update(format=2, stage=os.path.basename(inspect.getmodule(type(args)).__file__), rng=rng)
        state.update(args=dataclasses.asdict(args), schedulers={n: s.state_dict() for n, s in schedulers.items()})
        state["optimizers"] = {
            n: dcp.get_optimizer_state_dict(models[n], o, options=full) for n, o in optimizers.items()
        }
    if dist.is_initialized() and dist.get_rank() != 0:
        return dist.barrier()  # until rank 0 has written
    finish_checkpoint(output_dir)  # one a kill left half moved, so that the commit below has its name free
    tmp = os.path.join(output_dir, ".tmp_checkpoint")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, (name, model) in enumerate(models.items()):
        score = isinstance(model, ScoreModel)  # saved as its transformers model, with tied weights once
        folder, inner, model = (
            tmp if i == 0 else os.path.join(tmp, name),
            weights.get(name),
            model.model if score else model,
        )
        inner = inner and {k.removeprefix("model." * score): v for k, v in inner.items()}
        inner = inner and {k: v for k, v in inner.items() if k not in model.all_tied_weights_keys}
        model.save_pretrained(folder, state_dict=inner)
        tokenizer.save_pretrained(folder)
    if optimizers:
        torch.save(state, os.path.join(tmp, "training_state.pt"))
    for folder, _, files in os.walk(tmp):  # on disk before the commit, so that not even a power cut tears it
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
    os.replace(tmp, os.path.join(output_dir, INTERRUPTED))  # the commit: one atomic rename
    finish_checkpoint(output_dir)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait above until the checkpoint is in place


def finish_checkpoint(output_dir):
    """Move a committed checkpoint's files over the previous ones (rank 0); after a kill, again finishes it."""
    ready = os.path.join(output_dir, INTERRUPTED)
    if (not dist.is_initialized() or dist.get_rank() == 0) and os.path.isdir(ready):
        for name in os.listdir(ready):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)  # a folder; a file is replaced below
            os.replace(os.path.join(ready, name), os.path.join(output_dir, name))
        os.rmdir(ready)
