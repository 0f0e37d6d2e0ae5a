"""Property: mutated files never crash a command. Every run either succeeds (exit 0) or fails cleanly (exit 1,
nothing on stdout, exactly one ``error: ...`` line on stderr, no traceback); no exception escapes.

Mutations: bytes flipped, overwritten, inserted, deleted or the file truncated, in a valid checkpoint, a valid
statistics ``.npz`` and a valid data ``.npz`` (biased towards their headers, where the structure is); and
values replaced, removed or garbled inside their JSON metadata. Examples are few (the CLI runs several
commands per example) so the module stays under a minute on two cores.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from rankcut.cli import app

# RANKCUT_FUZZ_EXAMPLES=500 for a deeper local search; the default keeps CI quick.
FUZZ = settings(max_examples=int(os.environ.get("RANKCUT_FUZZ_EXAMPLES", 12)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_cleanly(*args) -> int:
    """Run the CLI in-process and check the success-or-clean-failure property; return the exit code."""
    args = [str(a) for a in args]
    result = CliRunner().invoke(app, args)
    shown = f"rankcut {' '.join(args)}\n--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"exception escaped: {shown}") from result.exception
    assert "Traceback" not in result.stdout + result.stderr, shown
    assert result.exit_code in (0, 1), shown
    if result.exit_code == 1:
        lines = result.stderr.splitlines()
        assert result.stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), shown
    else:
        assert all(line.startswith("warning: ") for line in result.stderr.splitlines()), shown
    return result.exit_code


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    f = {"ckpt": root / "sr.safetensors", "stats": root / "sr.npz", "data": root / "d.npz"}
    assert run_cleanly("init", "-a", "rankcut:small-resnet", "--kwargs", '{"width": 4}', "-o", f["ckpt"]) == 0
    assert run_cleanly("stats", f["ckpt"], "--data", "synthetic:8", "--grad", "kl", "--device", "cpu",
                       "-o", f["stats"]) == 0
    g = np.random.default_rng(0)
    np.savez(f["data"], x=g.integers(0, 256, (4, 28, 28), dtype=np.uint8), y=g.integers(0, 10, 4))
    return f


# --- byte-level mutations ---------------------------------------------------------------------------------------------

def mutate(data, blob: bytes, hot: list[tuple[int, int]]) -> bytes:
    """Apply 1-3 random byte-level mutations, half of them inside the ``hot`` ranges (headers)."""
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        if not out:
            break
        lo, hi = data.draw(st.sampled_from(hot + [(0, len(out))]), label="region")
        lo, hi = min(lo, len(out) - 1), max(min(hi, len(out)), min(lo, len(out) - 1) + 1)
        at = data.draw(st.integers(lo, hi - 1), label="at")
        kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), label="kind")
        if kind == "flip":
            out[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set":
            out[at] = data.draw(st.sampled_from([0, 0xFF, ord("9"), ord("-"), ord('"'), ord("["), ord("{"), 0x7F]))
        elif kind == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[at:at + data.draw(st.integers(1, 64))]
        else:
            del out[at:]
    return bytes(out)


def safetensors_hot(blob: bytes) -> list[tuple[int, int]]:
    header = struct.unpack("<Q", blob[:8])[0]
    return [(0, 8), (8, 8 + header)]


def npz_hot(path: Path) -> list[tuple[int, int]]:
    """The local headers and .npy headers of every member, and the central directory."""
    blob = path.read_bytes()
    ranges = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            ranges.append((info.header_offset, info.header_offset + 30 + len(info.filename) + 128))
    ranges.append((blob.rfind(b"PK\x01\x02", 0, blob.rfind(b"PK\x05\x06")) - 2048, len(blob)))
    return [(max(0, a), b) for a, b in ranges]


def checkpoint_commands(path: Path, tmp: Path, stats: Path) -> list[list]:
    return [["info", path],
            ["stats", path, "--data", "synthetic:4", "-b", "4", "--device", "cpu", "-o", tmp / "s.npz"],
            ["project", path, "--method", "svd", "--keep", "0.5", "-o", tmp / "p.safetensors"],
            ["project", path, "--stats", stats, "--method", "pca", "--keep", "0.5", "-o", tmp / "q.safetensors"],
            ["finetune", path, "--data", "synthetic:4", "-b", "4", "--device", "cpu", "-o", tmp / "f.safetensors"],
            ["eval", path, "--data", "synthetic:4", "--device", "cpu"]]


def stats_commands(ckpt: Path, path: Path, tmp: Path, method: str) -> list[list]:
    return [["info", path], ["project", ckpt, "--stats", path, "--method", method, "--keep", "0.5",
                             "-o", tmp / "p.safetensors"]]


@FUZZ
@given(data=st.data())
def test_mutated_checkpoint_bytes(base, data):
    blob = base["ckpt"].read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "m.safetensors"
        path.write_bytes(mutate(data, blob, safetensors_hot(blob)))
        for args in checkpoint_commands(path, tmp, base["stats"]):
            run_cleanly(*args)


@FUZZ
@given(data=st.data(), method=st.sampled_from(["pca", "fisher", "hessian", "l1"]))
def test_mutated_statistics_bytes(base, data, method):
    blob = base["stats"].read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "m.npz"
        path.write_bytes(mutate(data, blob, npz_hot(base["stats"])))
        for args in stats_commands(base["ckpt"], path, tmp, method):
            run_cleanly(*args)


@FUZZ
@given(data=st.data())
def test_mutated_data_bytes(base, data):
    blob = base["data"].read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "m.npz"
        path.write_bytes(mutate(data, blob, npz_hot(base["data"])))
        for args in (["eval", base["ckpt"], "--data", path, "--device", "cpu"],
                     ["stats", base["ckpt"], "--data", path, "--device", "cpu", "-o", tmp / "s.npz"]):
            run_cleanly(*args)


# --- metadata-level mutations -----------------------------------------------------------------------------------------

# Bounded numbers: a mutated input shape or width must stay small enough to run on a test machine.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.sampled_from([0.5, -1.0, math.nan, math.inf, 1e308])
    | st.text(max_size=12) | st.sampled_from(["stem", "bn", "layer1.conv1", "fc", "low_rank", "fold_bn", "kl",
                                             "rankcut:mnist-cnn", "torchvision:resnet18", "rankcut/1",
                                             "rankcut-stats/1"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["kind", "layer", "rank", "bn", "name", "channels", "shape", "mean", "std", "width"]) | st.text(max_size=6),
        children, max_size=4),
    max_leaves=12)


def mutate_json(data, value):
    """Replace, remove or retype one node of a parsed JSON value (or the whole of it)."""
    if isinstance(value, (dict, list)) and value and data.draw(st.booleans(), label="descend"):
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        key = data.draw(st.sampled_from(keys), label="key")
        action = data.draw(st.sampled_from(["descend", "drop", "replace"]), label="action")
        copy = dict(value) if isinstance(value, dict) else list(value)
        if action == "drop":
            del copy[key]
        elif action == "replace":
            copy[key] = data.draw(json_values, label="value")
        else:
            copy[key] = mutate_json(data, copy[key])
        return copy
    return data.draw(json_values, label="value")


def mutate_text(data, text: str) -> str:
    """Either a JSON-level mutation or raw character damage of the JSON text."""
    if data.draw(st.booleans(), label="as JSON"):
        return json.dumps(mutate_json(data, json.loads(text)))
    at = data.draw(st.integers(0, max(0, len(text) - 1)), label="char")
    return text[:at] + data.draw(st.text(max_size=4), label="junk") + text[at + data.draw(st.integers(0, 4)):]


@FUZZ
@given(data=st.data())
def test_mutated_checkpoint_metadata(base, data):
    with safe_open(str(base["ckpt"]), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = data.draw(st.sampled_from(sorted(metadata)), label="metadata key")
    if key in ("rankcut.arch", "rankcut.format"):
        metadata[key] = data.draw(st.sampled_from(["", "rankcut:mnist-cnn", "torchvision:resnet18", "rankcut/2"])
                                  | st.text(max_size=20), label="text")
    else:
        metadata[key] = mutate_text(data, metadata[key])
    if data.draw(st.booleans(), label="drop a key"):
        del metadata[data.draw(st.sampled_from(sorted(metadata)))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "m.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        for args in checkpoint_commands(path, tmp, base["stats"]):
            run_cleanly(*args)


@FUZZ
@given(data=st.data(), method=st.sampled_from(["pca", "fisher", "hessian", "l1"]))
def test_mutated_statistics_metadata(base, data, method):
    arrays = dict(np.load(base["stats"], allow_pickle=False))
    arrays["__meta__"] = np.array([mutate_text(data, str(arrays["__meta__"][0]))])
    if data.draw(st.booleans(), label="drop an array"):
        del arrays[data.draw(st.sampled_from(sorted(arrays)), label="array")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "m.npz"
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        for args in stats_commands(base["ckpt"], path, tmp, method):
            run_cleanly(*args)
