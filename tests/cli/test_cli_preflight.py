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
    ("stats", (rankcut.cli.stats, "collect_stats"), DATA),
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


# --- weights a user brings (issue 18, item 6) -------------------------------------------------------------------------

def test_a_pickled_whole_model_gets_advice_not_torchs_message(run_cli, tmp_path):
    pickled = tmp_path / "model.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), pickled)
    message = run_cli(["init", "--arch", "rankcut:mnist-cnn", "--weights", pickled, "-o", tmp_path / "m.safetensors"],
                      fails=True).message
    assert "pickled torch.nn.modules.container.Sequential object" in message, message
    assert "will not unpickle" in message and "torch.save(model.state_dict(), 'weights.pth')" in message, message
    assert "\x1b" not in message and "add_safe_globals" not in message, message


@pytest.mark.parametrize("legacy", [False, True])
def test_info_on_a_pth_file_points_to_init(run_cli, tmp_path, legacy):
    weights = tmp_path / "bn.pth"
    torch.save({"weight": torch.ones(3)}, weights, _use_new_zipfile_serialization=not legacy)
    message = run_cli(["info", weights], fails=True).message
    assert message == (f"error: {weights} is a PyTorch torch.save file, not a rankcut checkpoint; make one from its "
                       f"weights with: rankcut init --arch ARCH --weights {weights} -o OUT.safetensors")
