"""Every command checks what it can before any work: the output folder, the weights it is given (issue 18, items 5, 6)."""

from __future__ import annotations

import pytest
import torch

import rankcut.cli.finetune
import rankcut.cli.project
import rankcut.cli.stats

DATA = ["--data", "synthetic:32", "--device", "cpu"]


def _no_work(*_, **__):
    raise AssertionError("the command started its work before checking its output")


@pytest.mark.parametrize("command, work, extra", [
    ("stats", (rankcut.cli.stats, "collect_moments"), DATA),
    ("project", (rankcut.cli.project, "project_model"), ["--method", "svd", "--keep", "0.5"]),
    ("finetune", (rankcut.cli.finetune, "fit"), DATA),
])
def test_a_missing_output_folder_is_refused_before_any_work(command, work, extra, run_cli, mnist_ckpt, tmp_path,
                                                            monkeypatch):
    monkeypatch.setattr(*work, _no_work)
    missing = tmp_path / "nonexistent" / "dir" / "out.file"
    message = run_cli([command, mnist_ckpt, *extra, "-o", missing], fails=True).message
    assert message == f"error: output folder does not exist: {missing.parent}"
    assert not missing.parent.exists()


def test_init_refuses_a_missing_output_folder(run_cli, tmp_path):
    missing = tmp_path / "no" / "base.safetensors"
    message = run_cli(["init", "--arch", "rankcut:mnist-cnn", "-o", missing], fails=True).message
    assert message == f"error: output folder does not exist: {missing.parent}"
