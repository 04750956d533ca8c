"""sft.py end to end on a small slice of the toy data: learning, --resume, torchrun."""

import json
import os
import shutil
import subprocess
import sys

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


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun missing",
)
def test_torchrun_two_ranks_matches_one_process(small_data, tmp_path):
    # Same global batch (16): one process with 2 micro steps of 8 vs two ranks with one micro step of 8.
    sft.main(small_args(small_data, tmp_path / "single", epochs=1))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [
        torchrun,
        "--nproc_per_node=2",
        "--master_port=29531",
        "sft.py",
        "--dataset",
        small_data,
        "--eval_dataset",
        small_data,
        "--sample_prompts",
        "none",
        "--output_dir",
        str(tmp_path / "ddp"),
        "--epochs",
        "1",
        "--batch_size",
        "16",
        "--micro_batch_size",
        "8",
        "--log_every",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert len(ddp) == len(single) == 12
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    assert read_metrics(tmp_path / "ddp", "eval")[0]["loss"] == pytest.approx(
        read_metrics(tmp_path / "single", "eval")[0]["loss"], rel=1e-4
    )
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
