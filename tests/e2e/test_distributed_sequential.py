"""``torchrun --nproc_per_node 2 rankcut project --sequential`` (gloo, CPU) equals the single-process run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankcut.files.checkpoint import load_with_meta

from cli_helpers import launch

pytestmark = pytest.mark.timeout(600)  # a few torchrun jobs (each limited to 300 s)


@pytest.mark.slow
def test_two_process_sequential_projection_equals_single_process(tmp_path):
    """37 samples (uneven shards and batches): each layer's moments are all-reduced. pca, since the gradient
    statistics of fisher/hessian draw their probes per process (as ``stats --grad`` does), so they agree only
    in expectation. fc1 keeps rank 19 of 128, below the data's rank (36), so its basis is unique."""
    base, stats = tmp_path / "base.safetensors", tmp_path / "s.npz"
    assert launch("init", "--arch", "rankcut:mnist-cnn", "--seed", "0", "-o", base).returncode == 0
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "data.npz", x=torch.rand(37, 1, 28, 28, generator=g).numpy())
    data = ["--data", tmp_path / "data.npz", "--device", "cpu", "-b", "5"]
    r = launch("stats", base, *data, "-o", stats)
    assert r.returncode == 0, r.stderr
    states = {}
    for nproc in (1, 2):
        out = tmp_path / f"seq{nproc}.safetensors"
        r = launch("project", base, "--stats", stats, "--method", "pca", "--keep", "0.15", "--layers", "conv2,fc1",
                   "--sequential", *data, "-o", out, nproc=nproc)
        assert r.returncode == 0, r.stderr
        states[nproc] = load_with_meta(out)[0].state_dict()
    for key, value in states[1].items():
        err = ((states[2][key].double() - value.double()).norm() / value.double().norm().clamp_min(1e-30)).item()
        assert err < 1e-6, f"{key}: relative difference {err:.2e}"
    assert not list(tmp_path.glob("*.part")), "only rank 0 writes, atomically"
