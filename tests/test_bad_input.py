"""Bad input as a new user would give it: one line on stderr, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import rankcut
from rankcut.model import archs
from rankcut.files import checkpoint
from rankcut.files.checkpoint import CheckpointMeta, save, state_tensors
from rankcut.errors import RankcutError

RANKCUT = Path(sys.executable).with_name("rankcut")


def rewrite_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of checkpoint ``src`` with some metadata entries replaced (keys without the ``rankcut.``)."""
    model, meta = checkpoint.load_with_meta(src)
    metadata = meta.to_metadata()
    metadata.update({f"rankcut.{k}": v for k, v in changes.items()})
    save_file(state_tensors(model), str(dst), metadata=metadata)
    return dst


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- files that are not (good) checkpoints ------------------------------------------------------------------------

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
    path = rewrite_metadata(mnist_ckpt, tmp_path / "bad.safetensors", **changes)
    assert message in run_cli(["info", path], fails=True).message
    with pytest.raises(RankcutError, match="."):
        rankcut.load(path)


def test_recorded_input_that_the_model_cannot_take(run_cli, mnist_ckpt, tmp_path):
    contract = {"shape": [1, 5, 5], "mean": [0.0], "std": [1.0]}
    path = rewrite_metadata(mnist_ckpt, tmp_path / "bad.safetensors", input=json.dumps(contract))
    assert "cannot run on its recorded input" in run_cli(["info", path], fails=True).message


def test_absurd_arch_kwargs_fail_fast_without_allocating(run_cli, mnist_ckpt, tmp_path, monkeypatch):
    path = rewrite_metadata(mnist_ckpt, tmp_path / "huge.safetensors", arch_kwargs='{"num_classes": 1000000000000}')
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


# --- user code named by a checkpoint ---------------------------------------------------------------------------------

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


# --- init: architectures, weights, options, outputs --------------------------------------------------------------------

@pytest.mark.parametrize("arch, message", [
    ("resnet18", "unknown architecture"),
    ("torchvision:resnet19", "not a torchvision classification model"),
    ("rankcut:mnist", "built-ins are"),
    ("no_such_pkg_rc:build", "cannot import no_such_pkg_rc"),
])
def test_init_unknown_architecture(run_cli, tmp_path, arch, message):
    out = tmp_path / "out.safetensors"
    assert message in run_cli(["init", "-a", arch, "-o", out], fails=True).message
    assert folder_listing(tmp_path) == []


@pytest.mark.parametrize("arch, args, message", [
    ("rankcut:small-resnet", ["--kwargs", "{width: 4}"], "--kwargs is not valid JSON"),
    ("rankcut:small-resnet", ["--kwargs", "[4]"], "--kwargs must be a JSON object"),
    ("rankcut:small-resnet", ["--kwargs", '{"widht": 4}'], "cannot build rankcut:small-resnet"),
    ("rankcut:small-resnet", ["--kwargs", '{"width": 1000000000}'], "cannot build"),  # overflows even on meta
    ("rankcut:small-resnet", ["--kwargs", '{"width": 100000}'], "GiB for its weights"),  # refused before allocating
    ("torchvision:resnet18", ["--num-classes", "10000000000"], "GiB for its weights"),
    ("rankcut:small-resnet", ["--num-classes", "0"], "--num-classes must be at least 1"),
    ("rankcut:small-resnet", ["--num-classes", "-3"], "--num-classes must be at least 1"),
    ("rankcut:small-resnet", ["--input", "1,28"], "C,H,W"),
    ("rankcut:small-resnet", ["--input", "1,2.5,28"], "whole numbers"),
    ("rankcut:mnist-cnn", ["--input", "1,8,8"], "cannot run on input"),
    ("rankcut:mnist-cnn", ["--input", "3,28,28"], "cannot run on input"),
    ("rankcut:small-resnet", ["--input", "1,100000,100000"], "implausibly large"),
    ("rankcut:small-resnet", ["--mean", "0.1,0.2"], "one value per channel"),
    ("rankcut:small-resnet", ["--std", "0"], "std values must be positive"),
    ("rankcut:small-resnet", ["--std", "abc"], "--std must be comma-separated numbers"),
])
def test_init_bad_options(run_cli, tmp_path, arch, args, message):
    out = tmp_path / "out.safetensors"
    assert message in run_cli(["init", "-a", arch, *args, "-o", out], fails=True).message
    assert folder_listing(tmp_path) == []


def test_init_output_folder_missing(run_cli, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.safetensors"
    assert "output folder does not exist" in run_cli(["init", "-a", "rankcut:mnist-cnn", "-o", out], fails=True).message
    assert folder_listing(tmp_path) == []
    assert "is a folder" in run_cli(["init", "-a", "rankcut:mnist-cnn", "-o", tmp_path], fails=True).message


def test_init_missing_weights(run_cli, tmp_path):
    args = ["init", "-a", "rankcut:mnist-cnn", "-w", tmp_path / "w.pth", "-o", tmp_path / "out.safetensors"]
    assert "weights file not found" in run_cli(args, fails=True).message
    assert folder_listing(tmp_path) == []


def test_init_weights_for_another_model(run_cli, tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    out = tmp_path / "out.safetensors"
    message = run_cli(["init", "-a", "rankcut:mnist-cnn", "-w", weights, "-o", out], fails=True).message
    assert "do not fit the architecture" in message and "missing conv1.bias" in message
    # the right family, the wrong head
    message = run_cli(["init", "-a", "torchvision:resnet18", "-w", weights, "-o", out], fails=True).message
    assert "fc.weight: file (10, 512) vs model (1000, 512)" in message
    assert folder_listing(tmp_path) == ["resnet18.pth"]


@pytest.mark.parametrize("name, content, message", [
    ("junk.pth", os.urandom(1000), "cannot read weights"),
    ("empty.pt", b"", "cannot read weights"),
    ("junk.safetensors", os.urandom(1000), "not a readable safetensors file"),
])
def test_init_unreadable_weights(run_cli, tmp_path, name, content, message):
    weights = tmp_path / name
    weights.write_bytes(content)
    args = ["init", "-a", "rankcut:mnist-cnn", "-w", weights, "-o", tmp_path / "out.safetensors"]
    assert message in run_cli(args, fails=True).message
    assert folder_listing(tmp_path) == [name]


def test_init_weights_that_are_not_a_state_dict(run_cli, tmp_path):
    weights = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), weights)
    args = ["init", "-a", "rankcut:mnist-cnn", "-w", weights, "-o", tmp_path / "out.safetensors"]
    assert "does not hold a state dict of tensors" in run_cli(args, fails=True).message


class _Payload:
    """Unpickling this would run ``Path(marker).touch()``: a stand-in for arbitrary code in a .pth."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickled_payload(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(str(marker))}, weights)
    assert not marker.exists()
    return weights, marker


def test_init_refuses_pickled_code(run_cli, tmp_path):
    weights, marker = _pickled_payload(tmp_path)
    out = tmp_path / "out.safetensors"
    message = run_cli(["init", "-a", "rankcut:mnist-cnn", "-w", weights, "-o", out], fails=True).message
    assert "weights_only=True" in message
    assert not marker.exists() and not out.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(weights, weights_only=False)
    assert marker.exists()


def test_output_equal_to_input_needs_force(run_cli, tmp_path):
    import torchvision

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet18(num_classes=3).state_dict().items()},
              str(weights))
    before = weights.read_bytes()
    args = ["init", "-a", "torchvision:resnet18", "--num-classes", 3, "-w", weights, "-o", weights]
    assert "--force" in run_cli(args, fails=True).message
    assert weights.read_bytes() == before and folder_listing(tmp_path) == ["w.safetensors"]
    run_cli([*args, "--force"])
    assert rankcut.read_meta(weights).arch == "torchvision:resnet18"
    assert folder_listing(tmp_path) == ["w.safetensors"]


def test_usage_errors_exit_non_zero(run_cli, tmp_path):
    from typer.testing import CliRunner

    from rankcut.cli import app

    result = CliRunner().invoke(app, ["init", "-o", str(tmp_path / "x.safetensors")])  # --arch missing
    assert result.exit_code == 2 and "--arch" in result.stderr and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert folder_listing(tmp_path) == []


# --- the real executable, as a shell sees it ----------------------------------------------------------------------------

def test_real_executable_bad_input(mnist_ckpt, tmp_path):
    weights, marker = _pickled_payload(tmp_path)
    out = tmp_path / "out.safetensors"
    env = {k: v for k, v in os.environ.items() if k not in ("RANKCUT_DEBUG", "RANKCUT_TRUST")}
    for args in (["info", str(tmp_path / "missing.safetensors")],
                 ["init", "-a", "rankcut:mnist-cnn", "-w", str(weights), "-o", str(out)]):
        proc = subprocess.run([str(RANKCUT), *args], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert proc.stdout == ""
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists() and not out.exists()


def test_one_line_errors_decorator(capsys, monkeypatch):
    import typer

    from rankcut.cli.errors import one_line_errors

    def raiser(exc):
        @one_line_errors
        def command():
            raise exc
        return command

    for exc, expected in [(RankcutError("first line\n  frame #0: c10::Error\n"), "error: first line"),
                          (PermissionError(13, "Permission denied", "/x"), "error: PermissionError: [Errno 13]"),
                          (MemoryError(), "error: MemoryError")]:
        with pytest.raises(typer.Exit) as info:
            raiser(exc)()
        assert info.value.exit_code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(expected), err
    with pytest.raises(ValueError):  # not a user error: a bug, which keeps its traceback
        raiser(ValueError("bug"))()
    monkeypatch.setenv("RANKCUT_DEBUG", "1")
    with pytest.raises(RankcutError):
        raiser(RankcutError("shown with its traceback"))()
