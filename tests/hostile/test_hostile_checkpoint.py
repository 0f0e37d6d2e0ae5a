"""Files that are not (good) checkpoints, through every command that reads one: one line, nothing written.

Every bad input must give exactly one ``error: ...`` line on stderr and a non-zero exit (the ``run_cli``
fixture checks that convention), never a traceback and never code execution.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import pytest
import torch
from hostile_cases import bad_checkpoints, rewrite_checkpoint, unchanged
from safetensors.torch import save_file

import rankcut
from rankcut.errors import RankcutError
from rankcut.files import checkpoint
from rankcut.files.checkpoint import CheckpointMeta, save
from rankcut.model import archs

CPU = ["--device", "cpu"]


def test_missing_checkpoint(run_cli, tmp_path):
    message = run_cli(["info", tmp_path / "nope.safetensors"], fails=True).message
    assert "checkpoint not found" in message
    assert "is not a file" in run_cli(["info", tmp_path], fails=True).message


def test_safetensors_without_rankcut_metadata(run_cli, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    message = run_cli(["info", path], fails=True).message
    assert "not a rankcut checkpoint" in message and "rankcut init" in message


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, os.urandom(4096), b"PK\x03\x04" + os.urandom(200)],
                         ids=["empty", "tiny", "random", "zip-like"])
def test_not_safetensors_at_all(run_cli, tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    assert "not a readable safetensors file" in run_cli(["info", path], fails=True).message


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_checkpoint(run_cli, mnist_ckpt, tmp_path, keep):
    data = mnist_ckpt.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: int(len(data) * keep)])
    assert "not a readable safetensors file" in run_cli(["info", path], fails=True).message


@pytest.mark.parametrize("changes, message", [
    ({"format": "rankcut/99"}, "checkpoint format 'rankcut/99'"),
    ({"arch_kwargs": "{not json"}, "damaged rankcut metadata"),
    ({"arch_kwargs": "[1, 2]"}, "arch_kwargs is not an object"),
    ({"input": '{"shape": [1, 28]}'}, "input"),
    ({"input": '{"shape": [1, 100000, 100000], "mean": [0], "std": [1]}'}, "implausibly large"),
    ({"edits": '{"kind": "low_rank"}'}, "damaged rankcut metadata"),
    ({"edits": '[{"kind": "quantize", "layer": "fc1"}]'}, "unknown edit 'quantize'"),
    ({"edits": '[{"kind": "prune_channels", "layer": "fc1"}]'}, "malformed prune_channels edit"),
    ({"edits": '[{"kind": "prune_channels", "producer": "fc1", "consumer": "fc2", "carried": [], "block": 1, '
               '"kept": [0, true]}]'}, "kept must be a list of int"),
    ({"edits": '[{"kind": "prune_channels", "producer": "fc1", "consumer": "fc2", "carried": [], "block": 1, '
               '"kept": [3, 3]}]'}, "distinct indices in 0..127"),
    ({"edits": '[{"kind": "prune_channels", "producer": "conv2", "consumer": "fc1", "carried": [], "block": 1, '
               '"kept": [0]}]'}, "not 64 x 1"),
    ({"edits": '[{"kind": "low_rank", "layer": "fc1", "rank": "4"}]'}, "malformed low_rank edit"),
    ({"edits": '[{"kind": "low_rank", "layer": "fc9", "rank": 4}]'}, "no layer named 'fc9'"),
    ({"edits": '[{"kind": "low_rank", "layer": "fc1", "rank": 4}]'}, "does not match its own description"),
    ({"edits": '[{"kind": "low_rank", "layer": "fc1", "rank": 1000}]'}, "outside 1..128"),
    ({"edits": '[{"kind": "fold_bn", "layer": "fc1", "bn": "dropout1"}]'}, "cannot fold dropout1"),
    ({"history": "[" * 200_000 + "]" * 200_000}, "damaged rankcut metadata"),
    ({"history": '["not an object"]'}, "history entries must be objects"),
    ({"arch": "resnet18"}, "unknown architecture"),
    ({"arch": "torchvision:not_a_model"}, "unknown architecture"),
    ({"arch": "torchvision:resnet18"}, "does not match its own description"),
    ({"arch_kwargs": '{"num_classes": -5}'}, "cannot build rankcut:mnist-cnn"),
    ({"arch_kwargs": '{"depth": 3}'}, "cannot build rankcut:mnist-cnn"),
])
def test_damaged_or_contradictory_metadata(run_cli, mnist_ckpt, tmp_path, changes, message):
    path = rewrite_checkpoint(mnist_ckpt, tmp_path / "bad.safetensors", **changes)
    assert message in run_cli(["info", path], fails=True).message
    with pytest.raises(RankcutError, match="."):
        rankcut.load(path)


def test_recorded_input_that_the_model_cannot_take(run_cli, mnist_ckpt, tmp_path):
    contract = {"shape": [1, 5, 5], "mean": [0.0], "std": [1.0]}
    path = rewrite_checkpoint(mnist_ckpt, tmp_path / "bad.safetensors", input=json.dumps(contract))
    assert "cannot run on its recorded input" in run_cli(["info", path], fails=True).message


def test_absurd_arch_kwargs_fail_fast_without_allocating(run_cli, mnist_ckpt, tmp_path, monkeypatch):
    path = rewrite_checkpoint(mnist_ckpt, tmp_path / "huge.safetensors", arch_kwargs='{"num_classes": 1000000000000}')
    devices = []
    real_build = checkpoint.build_model

    def spy(meta, trusted=False):
        devices.append(torch.empty(()).device.type)  # the default device the model is being built on
        return real_build(meta, trusted)

    monkeypatch.setattr(checkpoint, "build_model", spy)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    message = run_cli(["info", path], fails=True).message
    assert time.perf_counter() - start < 10
    assert "does not match its own description: fc2.weight: file (10, 128) vs model (1000000000000, 128)" in message
    assert devices == ["meta"], "the absurd model must only ever be built on the meta device"
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 256 * 1024, f"peak memory grew by {grown_kib} KiB"


def test_user_architecture_needs_trust(run_cli, tmp_path, monkeypatch):
    name = "rc_untrusted_arch_mod"
    marker = tmp_path / "imported.marker"
    (tmp_path / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from rankcut.model.archs import MnistCNN as build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    model = archs.build("rankcut:mnist-cnn")
    path = tmp_path / "user.safetensors"
    save(model, CheckpointMeta(f"{name}:build", {}, archs.default_input("rankcut:mnist-cnn", {})), path)

    message = run_cli(["info", path], fails=True).message
    assert f"set RANKCUT_TRUST={name}" in message
    with pytest.raises(RankcutError, match="RANKCUT_TRUST"):
        rankcut.load(path)
    assert not marker.exists() and name not in sys.modules

    trusted = run_cli(["info", path, "--json"], env={"RANKCUT_TRUST": name}).data
    assert trusted["arch"] == f"{name}:build" and trusted["params"] == 1_199_882
    assert marker.exists()
    sys.modules.pop(name, None)


COMMANDS = {
    "stats": lambda ck, f, out: ["stats", ck, "--data", "synthetic:8", *CPU, "-o", out],
    "project": lambda ck, f, out: ["project", ck, "--method", "svd", "--keep", "0.5", "-o", out],
    "project --stats": lambda ck, f, out: ["project", ck, "--stats", f["stats"], "--keep", "0.5", "-o", out],
    "finetune": lambda ck, f, out: ["finetune", ck, "--data", "synthetic:8", "-b", "4", *CPU, "-o", out],
    "finetune --teacher": lambda ck, f, out: ["finetune", f["ckpt"], "--teacher", ck, "--data", "synthetic:8", "-b", "4",
                                              *CPU, "-o", out],
    "eval": lambda ck, f, out: ["eval", ck, "--data", "synthetic:8", *CPU],
    "eval --reference": lambda ck, f, out: ["eval", f["ckpt"], "--reference", ck, "--data", "synthetic:8", *CPU],
    "sweep": lambda ck, f, out: ["sweep", ck, "--methods", "svd", "--keep", "0.5", "--data", "synthetic:8", *CPU,
                                 "-o", out],
    "info --checkpoint": lambda ck, f, out: ["info", f["stats"], "--plot", out.with_suffix(".png"), "--checkpoint", ck],
}


def test_damaged_checkpoints_through_every_command(run_cli, small_files, tmp_path):
    """Each damaged checkpoint, as input (and as teacher/reference), in every command: one line, nothing written."""
    before = unchanged(small_files, "ckpt", "stats")
    tried = 0
    for case, (path, message) in bad_checkpoints(small_files).items():
        for command, make in COMMANDS.items():
            out = tmp_path / "out.bin"
            line = run_cli(make(path, small_files, out), fails=True).message
            assert message in line, f"{case} / {command}: {line}"
            assert not out.exists() and list(tmp_path.iterdir()) == []
            tried += 1
    assert tried >= 70
    assert unchanged(small_files, "ckpt", "stats") == before
