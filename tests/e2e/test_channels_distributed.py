"""``torchrun --nproc_per_node 2 rankcut stats --structure channels`` gives the consumer-input moments of one process."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from rankcut.files.safenpz import read_npz

from cli_helpers import launch

pytestmark = pytest.mark.timeout(600)  # each test starts a few torchrun jobs (each limited to 300 s)


@pytest.mark.slow
def test_two_process_chain_stats_equal_single_process(tmp_path):
    ckpt = tmp_path / "base.safetensors"
    assert launch("init", "--arch", "rankcut:mnist-cnn", "-o", ckpt).returncode == 0
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "data.npz", x=torch.rand(37, 1, 28, 28, generator=g).numpy())  # shards and batches uneven
    single, double = tmp_path / "one.npz", tmp_path / "two.npz"
    common = ["--data", tmp_path / "data.npz", "-b", "5", "--device", "cpu", "--structure", "channels"]
    r = launch("stats", ckpt, *common, "-o", single)
    assert r.returncode == 0, r.stderr
    r = launch("stats", ckpt, *common, "-o", double, nproc=2)
    assert r.returncode == 0, r.stderr
    a, b = read_npz(single), read_npz(double)
    chain_keys = [k for k in a if "/in_" in k]
    assert len(chain_keys) == 9 and a.keys() == b.keys()  # conv1, conv2, fc1: in_count, in_mean, in_m2
    assert a["conv2/in_count"] == b["conv2/in_count"] == 37 * 144  # fc1 reads conv2's 12x12 blocks
    for key in chain_keys:
        err = np.linalg.norm(a[key] - b[key]) / max(np.linalg.norm(a[key]), 1e-30)
        assert err < 1e-6, f"{key}: relative difference {err:.2e}"
