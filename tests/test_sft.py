"""sft.py end to end on a small slice of the toy data: learning, --resume, torchrun."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import sft
import utils


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 192 toy SFT conversations (enough to see learning, fast to train on)."""
    path = tmp_path_factory.mktemp("data") / "sft_small.jsonl"
    with open("toy_world/data/sft_train.jsonl") as f:
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


def test_sft_loss_falls(small_data, tmp_path):
    sft.main(small_args(small_data, tmp_path, epochs=6))
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 72  # 192 // 16 steps per epoch, 6 epochs
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    [final_eval] = read_metrics(tmp_path, "eval")
    assert final_eval["loss"] < 0.5 * losses[0]
    # The output is a Hugging Face checkpoint that reloads with its tokenizer.
    model = utils.load_causal_lm(str(tmp_path), utils.load_tokenizer(str(tmp_path)))
    assert model.config.pad_token_id == 0


def test_resume_ends_with_the_same_weights(small_data, tmp_path):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    sft.main(small_args(small_data, whole))
    sft.main(small_args(small_data, pieces, max_steps=9))  # interrupted mid-epoch 1 (12 steps/epoch)
    assert torch.load(pieces / "training_state.pt", weights_only=False)["step"] == 9
    sft.main(small_args(small_data, pieces, resume=True))
    a, b = load_file(whole / "model.safetensors"), load_file(pieces / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["loss"] for r in read_metrics(pieces)] == [r["loss"] for r in read_metrics(whole)]


def test_gradient_checkpointing_gives_the_same_losses(small_data, tmp_path):
    sft.main(small_args(small_data, tmp_path / "plain", epochs=1))
    sft.main(small_args(small_data, tmp_path / "ckpt", epochs=1, gradient_checkpointing=True))
    plain, ckpt = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ckpt")
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], rel=1e-4)


def test_torchrun_two_ranks_matches_one_process(small_data, tmp_path, torchrun):
    # Same global batch (16): one process with 2 micro steps of 8 vs two ranks with one micro step of 8.
    sft.main(small_args(small_data, tmp_path / "single", epochs=1))
    flags = dict(dataset=small_data, eval_dataset=small_data, sample_prompts="none", epochs=1, batch_size=16)
    torchrun("sft.py", 29531, dict(flags, output_dir=tmp_path / "ddp", micro_batch_size=8, log_every=1))
    single, ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert len(ddp) == len(single) == 12
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    assert read_metrics(tmp_path / "ddp", "eval")[0]["loss"] == pytest.approx(
        read_metrics(tmp_path / "single", "eval")[0]["loss"], rel=1e-4
    )
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_fsdp_two_ranks_match_one_process_and_resume(small_data, tmp_path, torchrun):
    """--fsdp shards weights, gradients and Adam moments over the ranks; the run must be the same as one
    process. It stops after 5 steps and resumes, with FSDP (moments gathered to the checkpoint, then
    sharded again) and also in one process (the checkpoint does not depend on the sharding); it evaluates 17 conversations (ranks get 9 and 8: a filler keeps their forward passes in step) and
    answers prompts greedily on both ranks (generation with sharded weights)."""
    eval_17, prompts_6 = tmp_path / "eval_17.jsonl", tmp_path / "prompts_6.jsonl"
    eval_17.write_text("".join(open("toy_world/data/sft_test.jsonl").readlines()[:17]))
    prompts_6.write_text("".join(open("toy_world/data/prompts_eval.jsonl").readlines()[::12]))
    changes = dict(epochs=1, eval_dataset=str(eval_17), sample_prompts=str(prompts_6), eval_every=4, save_every=3)
    sft.main(small_args(small_data, tmp_path / "single", **changes))
    flags = dict(vars(small_args(small_data, tmp_path / "fsdp", **changes)), micro_batch_size=8, fsdp=True)
    torchrun("sft.py", 29536, dict(flags, max_steps=5))
    assert torch.load(tmp_path / "fsdp" / "training_state.pt", weights_only=False)["step"] == 5
    shutil.copytree(tmp_path / "fsdp", tmp_path / "fsdp_then_one")
    torchrun("sft.py", 29536, dict(flags, resume=True))
    sft.main(small_args(small_data, tmp_path / "fsdp_then_one", resume=True, **changes))
    one, two = tmp_path / "single", tmp_path / "fsdp"
    assert [r["loss"] for r in read_metrics(two)] == pytest.approx([r["loss"] for r in read_metrics(one)], rel=1e-4)
    evals_one = read_metrics(one, "eval")
    evals_two = [r for r in read_metrics(two, "eval") if r["step"] != 5]  # also evaluated where it stopped
    assert [r["step"] for r in evals_two] == [4, 8, 12, 12]  # three eval losses, then the judge's summary
    for a, b in zip(evals_one, evals_two):
        assert {k: v for k, v in b.items() if k != "split"} == pytest.approx(
            {k: v for k, v in a.items() if k != "split"}, rel=1e-4
        )
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    c = load_file(tmp_path / "fsdp_then_one" / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5) and torch.allclose(a[name], c[name], atol=1e-5), name


def test_default_batch_flags_at_eight_ranks_match_one_process(small_data, tmp_path, torchrun):
    """`torchrun --nproc_per_node=8 sft.py` with the default --batch_size 32 and --micro_batch_size 32:
    each rank takes 4 conversations of the same global batch of 32, and the steps are one process's."""
    defaults = sft.Args()
    changes = dict(batch_size=defaults.batch_size, micro_batch_size=defaults.micro_batch_size, max_steps=3)
    sft.main(small_args(small_data, tmp_path / "single", **changes))
    flags = dict(vars(small_args(small_data, tmp_path / "eight", **changes)))
    torchrun("sft.py", 29538, flags, nproc=8)
    single, eight = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "eight")
    assert len(eight) == len(single) == 3
    assert [r["loss"] for r in eight] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "eight" / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
