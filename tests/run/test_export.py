"""``rankcut export``: ONNX graphs that ONNX Runtime runs like PyTorch, with the input contract in their metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_helpers import rankcut

from rankcut.files.checkpoint import load_with_meta, save
from rankcut.files.fileio import file_digest


@pytest.fixture
def projected(mnist_ckpt, tmp_path):
    out = tmp_path / "small.safetensors"
    rankcut("project", mnist_ckpt, "--method", "svd", "--keep", "0.25", "-o", out)
    return out


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_exported_projected_model_matches_torch(projected, tmp_path):
    out = tmp_path / "small.onnx"
    result = rankcut("export", projected, "-o", out, "--dynamic-batch", "--json")
    assert result["max_rel"] < 1e-5 and result["batches"] == [1, 3]
    model, meta = load_with_meta(projected)
    x = torch.randn(5, *meta.input.shape, generator=torch.Generator().manual_seed(1))  # a batch it was not traced at
    with torch.inference_mode():
        want = model(x).numpy()
    got = _run(out, x)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-5, f"ONNX Runtime vs torch: relative error {rel:.3g}"
    graph = onnx.load(str(out))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("Conv") == 3 and ops.count("Gemm") == 3, f"conv2 and fc1 should each be two layers: {ops}"
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["rankcut.input"]) == meta.input.to_dict()
    assert props["rankcut.checkpoint_sha256"] == file_digest(projected)
    assert json.loads(props["rankcut.edits"]) == ["low_rank", "low_rank"]


def test_fixed_batch_graph_refuses_other_batches(projected, tmp_path):
    out = tmp_path / "fixed.onnx"
    rankcut("export", projected, "-o", out, "-b", "2")
    with pytest.raises(Exception):
        _run(out, torch.zeros(3, 1, 28, 28))
    assert _run(out, torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_mismatch_writes_nothing(projected, tmp_path):
    out = tmp_path / "never.onnx"
    message = rankcut("export", projected, "-o", out, "--tolerance", "0", fails=True)
    assert "disagrees with PyTorch" in message and "nothing written" in message
    assert not out.exists()
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


def test_bad_input_is_one_line(mnist_ckpt, tmp_path):
    model, meta = load_with_meta(mnist_ckpt)
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    broken = tmp_path / "nan.safetensors"
    save(model, meta, broken)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    out = tmp_path / "m.onnx"
    assert "NaN" in rankcut("export", broken, "-o", out, fails=True)
    assert "--opset" in rankcut("export", mnist_ckpt, "-o", out, "--opset", "7", fails=True)
    assert "not found" in rankcut("export", tmp_path / "none.safetensors", "-o", out, fails=True)
    assert rankcut("export", garbage, "-o", out, fails=True).startswith("error: ")
    assert "folder" in rankcut("export", mnist_ckpt, "-o", tmp_path, fails=True)
    assert "also an input" in rankcut("export", mnist_ckpt, "-o", mnist_ckpt, fails=True)
    assert not out.exists()


def test_without_the_extra_says_how_to_install(mnist_ckpt, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    message = rankcut("export", mnist_ckpt, "-o", tmp_path / "m.onnx", fails=True)
    assert "pip install 'rankcut[onnx]'" in message
