"""sft.py end to end on a small slice of the toy data: learning, --resume, gradient checkpointing, torchrun.

One single-process run (`one_process`: 6 steps of 32) is the reference that the resumed, the checkpointed and
the torchrun runs (DDP and FSDP at 2 ranks, the default batch flags at 8) must reproduce: the same global batch,
so the same losses, evaluations and weights.
"""

import json
import os

import pytest
import torch
import transformers
from conftest import ROOT, torchrun
from safetensors.torch import load_file

import sft
import utils


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 192 toy SFT conversations (enough to see learning, fast to train on)."""
    path = tmp_path_factory.mktemp("data") / "sft_small.jsonl"
    with open(ROOT / "toy_world/data/sft_train.jsonl") as f:
        path.write_text("".join(f.readlines()[:192]))
    return str(path)


def small_args(data, output_dir, **changes):
    defaults = dict(
        dataset=data,
        eval_dataset=data,
        sample_prompts="none",
        output_dir=str(output_dir),
        epochs=2,
        batch_size=16,
        micro_batch_size=8,
        eval_every=1000,
        save_every=1000,
        log_every=1,
    )
    return sft.Args(**{**defaults, **changes})


def read_metrics(output_dir, split="train"):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def same_weights(a, b, exact=False):
    a, b = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]) if exact else torch.allclose(a[name], b[name], atol=1e-5), name
    return True


def without_split(record):
    return {k: v for k, v in record.items() if k != "split"}


@pytest.fixture(scope="module")
def reference_args(small_data, tmp_path_factory):
    """6 steps of 32 conversations (4 micro steps of 8), evaluated on 17 conversations every 2 steps (rank shares 9
    and 8 at two ranks: a filler keeps their forward passes in step), saved every 2, 6 prompts answered greedily
    at the end (generation, with sharded weights under FSDP) and judged."""
    folder = tmp_path_factory.mktemp("reference_inputs")
    eval_17, prompts_6 = folder / "eval_17.jsonl", folder / "prompts_6.jsonl"
    eval_17.write_text("".join(open(ROOT / "toy_world/data/sft_test.jsonl").readlines()[:17]))
    prompts_6.write_text("".join(open(ROOT / "toy_world/data/prompts_eval.jsonl").readlines()[::12][:6]))
    changes = dict(epochs=1, batch_size=32, eval_dataset=str(eval_17), sample_prompts=str(prompts_6))
    return vars(small_args(small_data, "unset", eval_every=2, save_every=2, **changes))


@pytest.fixture(scope="module")
def one_process(reference_args, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one_process")
    sft.main(sft.Args(**dict(reference_args, output_dir=str(output_dir))))
    assert [r["step"] for r in read_metrics(output_dir, "eval")] == [2, 4, 6, 6]  # 3 eval losses, the judge's
    return output_dir


def test_sft_loss_falls(small_data, tmp_path):
    sft.main(small_args(small_data, tmp_path, epochs=6))
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 72  # 192 // 16 steps per epoch, 6 epochs
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    [final_eval] = read_metrics(tmp_path, "eval")
    assert final_eval["loss"] < 0.5 * losses[0]
    # The output is a Hugging Face checkpoint that reloads with its tokenizer.
    model = utils.load_model(str(tmp_path), utils.load_tokenizer(str(tmp_path)))
    assert model.config.pad_token_id == 0


def test_resume_ends_with_the_same_weights(one_process, reference_args, tmp_path):
    args = dict(reference_args, output_dir=str(tmp_path))
    sft.main(sft.Args(**dict(args, max_steps=3)))  # interrupted mid-epoch, between two checkpoints (every 2)
    assert torch.load(tmp_path / "training_state.pt", weights_only=False)["step"] == 3
    sft.main(sft.Args(**dict(args, resume=True)))
    assert same_weights(one_process, tmp_path, exact=True)
    assert [r["loss"] for r in read_metrics(tmp_path)] == [r["loss"] for r in read_metrics(one_process)]


def test_gradient_checkpointing_gives_the_same_losses(one_process, reference_args, tmp_path, monkeypatch):
    """--gradient_checkpointing recomputes every layer's activations in the backward pass (non-reentrant, as
    DESIGN.md §5.10 asks), and the losses stay those of the plain run."""
    recomputed = []

    def checkpoint(function, *args, **kwargs):  # transformers' layers call it when checkpointing is on
        recomputed.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", checkpoint)
    args = dict(reference_args, output_dir=str(tmp_path), gradient_checkpointing=True)
    sft.main(sft.Args(**dict(args, eval_dataset="none", sample_prompts="none")))
    layers = transformers.AutoConfig.from_pretrained(ROOT / "toy_world/model").num_hidden_layers
    assert recomputed == [False] * (6 * 4 * layers)  # each layer in each of 4 micro steps of 6 steps
    plain, checkpointed = read_metrics(one_process), read_metrics(tmp_path)
    assert [r["loss"] for r in checkpointed] == pytest.approx([r["loss"] for r in plain], rel=1e-4)


# What the torchrun launch runs: several runs of sft.py one after another in the same ranks; a "copy" item copies
# a folder on rank 0. The first run's process group serves the next ones.
RUNS = """
import json, os, shutil, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import sft

for i, item in enumerate(json.loads(sys.argv[1])):
    if i:
        dist.init_process_group = lambda *args, **kwargs: None  # already joined
    if "copy" in item:
        if dist.get_rank() == 0:
            shutil.copytree(*item["copy"])
        dist.barrier()
    else:
        sft.main(sft.Args(**item))
dist.barrier()
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)  # as utils.run: no teardown with the process group alive
"""


def test_two_ranks_ddp_and_fsdp_match_one_process_and_fsdp_resumes(one_process, reference_args, tmp_path):
    """Two ranks with one micro step of 16 each vs one process with 4 micro steps of 8, in one launch: DDP (a
    replica per rank), then --fsdp (weights, gradients and Adam moments sharded) stopped after 3 steps and
    resumed. The FSDP checkpoint (moments gathered into it) also resumes in one process (the checkpoint does not
    depend on the sharding), and both end where one process does."""
    ddp, fsdp, fsdp_then_one = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "fsdp_then_one"
    runs = [
        dict(reference_args, output_dir=str(ddp)),
        dict(reference_args, output_dir=str(fsdp), fsdp=True, max_steps=3),
        {"copy": [str(fsdp), str(fsdp_then_one)]},
        dict(reference_args, output_dir=str(fsdp), fsdp=True, resume=True),
    ]
    script = tmp_path / "runs.py"
    script.write_text(RUNS.format(root=str(ROOT)))
    torchrun(script, json.dumps(runs))
    assert torch.load(fsdp_then_one / "training_state.pt", weights_only=False)["step"] == 3
    sft.main(sft.Args(**dict(reference_args, output_dir=str(fsdp_then_one), resume=True)))

    losses, evals = [r["loss"] for r in read_metrics(one_process)], read_metrics(one_process, "eval")
    assert len(losses) == 6
    for run in (ddp, fsdp, fsdp_then_one):
        assert [r["loss"] for r in read_metrics(run)] == pytest.approx(losses, rel=1e-4), run
        resumed_at_3 = [r for r in read_metrics(run, "eval") if r["step"] != 3]  # also evaluated where it stopped
        assert [r["step"] for r in resumed_at_3] == [2, 4, 6, 6], run  # three eval losses, then the judge's summary
        for a, b in zip(evals, resumed_at_3):
            assert without_split(b) == pytest.approx(without_split(a), rel=1e-4), run
        assert same_weights(one_process, run)


def test_default_batch_flags_at_eight_ranks_match_one_process(one_process, reference_args, tmp_path):
    """`torchrun --nproc_per_node=8 sft.py` with the default --batch_size 32 and --micro_batch_size 32: each rank
    takes 4 conversations of the same global batch of 32, and the steps are one process's."""
    assert (sft.Args.batch_size, sft.Args.micro_batch_size) == (32, 32) == (reference_args["batch_size"], 32)
    flags = {k: v for k, v in reference_args.items() if k not in ("batch_size", "micro_batch_size")}
    torchrun("sft.py", nproc=8, **dict(flags, output_dir=tmp_path))
    assert [r["loss"] for r in read_metrics(tmp_path)] == pytest.approx(
        [r["loss"] for r in read_metrics(one_process)], rel=1e-4
    )
    for a, b in zip(read_metrics(one_process, "eval"), read_metrics(tmp_path, "eval"), strict=True):
        assert without_split(b) == pytest.approx(without_split(a), rel=1e-4)
    assert same_weights(one_process, tmp_path)
