"""``rankcut finetune``: divergence, interruption and bad input stop it with one line and leave no partial file."""

from __future__ import annotations

import numpy as np
from builders import digits_npz
from cli_helpers import invoke, rankcut
from typer.testing import CliRunner

from rankcut.cli import app
from rankcut.files.checkpoint import load_with_meta

CPU = ["--device", "cpu"]


def test_divergence_stops_with_one_line_and_writes_nothing(mnist_ckpt, tmp_path):
    out = tmp_path / "nan.safetensors"
    line = rankcut("finetune", mnist_ckpt, "--data", "synthetic:256", "--optimizer", "sgd", "--lr", "1e8",
                   "--warmup", "0", "-b", "32", "--device", "cpu", "-o", out, fails=True)
    assert "NaN or infinite" in line
    assert list(tmp_path.iterdir()) == [mnist_ckpt]


def test_interrupt_leaves_no_output(mnist_ckpt, tmp_path, monkeypatch):
    import rankcut.run.train

    def interrupted(step, *args):
        if step == 1:
            raise KeyboardInterrupt
        return 1e-3

    monkeypatch.setattr(rankcut.run.train, "lr_at", interrupted)
    result = CliRunner().invoke(app, ["finetune", str(mnist_ckpt), "--data", "synthetic:128", "-b", "32",
                                      "--device", "cpu", "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert list(tmp_path.iterdir()) == [mnist_ckpt]


def test_bad_inputs_give_one_line_and_write_nothing(mnist_ckpt, tmp_path):
    out = tmp_path / "out.safetensors"
    unlabelled = digits_npz(tmp_path / "unlabelled.npz", 32, labels=False)
    outside = tmp_path / "outside.npz"
    np.savez(outside, x=np.zeros((8, 28, 28), np.uint8), y=np.array([0, 1, 2, 3, 4, 5, 6, 10]))
    three = tmp_path / "three.safetensors"
    rankcut("init", "--arch", "rankcut:mnist-cnn", "--num-classes", "3", "-o", three)
    base = ["--device", "cpu", "-o", out]
    cases = {
        "scores 3 classes, the student 10": ["finetune", mnist_ckpt, "--data", "synthetic:8", "--teacher", three,
                                             *base],
        "checkpoint not found": ["finetune", tmp_path / "missing.safetensors", "--data", "synthetic:8", *base],
        "unlabelled samples": ["finetune", mnist_ckpt, "--data", unlabelled, *base],
        "label 10, outside": ["finetune", mnist_ckpt, "--data", outside, *base],
        "also an input": ["finetune", mnist_ckpt, "--data", "synthetic:8", "--device", "cpu", "-o", mnist_ckpt],
        "needs a --teacher": ["finetune", mnist_ckpt, "--data", "synthetic:8", "--kd-alpha", "0.5", *base],
        "--optimizer must be": ["finetune", mnist_ckpt, "--data", "synthetic:8", "--optimizer", "adam", *base],
    }
    for expected, args in cases.items():
        assert expected in rankcut(*args, fails=True)
    # With a teacher, unlabelled data still needs --kd-alpha 1.
    line = rankcut("finetune", mnist_ckpt, "--data", unlabelled, "--teacher", mnist_ckpt, *base, fails=True)
    assert "--kd-alpha 1" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mnist_ckpt.name, three.name, "unlabelled.npz",
                                                                "outside.npz"])


def test_divergence_after_a_save_keeps_the_last_good_file(mnist_ckpt, tmp_path, monkeypatch):
    """--save-every 1: epoch 1 is written; epoch 2 diverges; the epoch-1 file stays, finite, and nothing else."""
    import rankcut.run.train

    def schedule(step, total, peak, warmup):
        return 1e-3 if step < 2 else float("inf")  # 2 steps per epoch below: epoch 2 blows up

    monkeypatch.setattr(rankcut.run.train, "lr_at", schedule)
    out = tmp_path / "tuned.safetensors"
    result = invoke("finetune", mnist_ckpt, "--data", "synthetic:64", "-b", "32", "--epochs", "2",
                    "--optimizer", "sgd", "--save-every", "1", *CPU, "-o", out)
    code, stdout, err = result.exit_code, result.stdout, result.stderr
    assert code == 1 and stdout == "" and len(err.splitlines()) == 1
    assert "NaN or infinite in epoch 2" in err and "Traceback" not in err
    model, meta = load_with_meta(out)  # loading refuses non-finite tensors
    assert meta.history[-1]["epochs_done"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mnist_ckpt.name, out.name])
