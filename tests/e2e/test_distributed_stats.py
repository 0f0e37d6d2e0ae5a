"""``torchrun --nproc_per_node 2 rankcut stats`` (gloo, CPU) equals the single-process statistics, --grad too."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from rankcut.files.safenpz import read_npz

from cli_helpers import launch

pytestmark = pytest.mark.timeout(600)  # each test starts a few torchrun jobs (each limited to 300 s)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ckpt = root / "base.safetensors"
    assert launch("init", "--arch", "rankcut:small-resnet", "-o", ckpt).returncode == 0
    g = torch.Generator().manual_seed(0)
    # 37 samples: neither the two shards nor the batches divide evenly.
    np.savez(root / "data.npz", x=torch.rand(37, 1, 28, 28, generator=g).numpy())
    return ckpt, root / "data.npz"


@pytest.mark.slow
@pytest.mark.parametrize("grad", ["kl", "mse"])
def test_two_process_stats_equal_single_process(tmp_path, model_and_data, grad):
    """Moments and gradient statistics: each sample's probes are drawn from its index in the data, not per process."""
    ckpt, data = model_and_data
    single, double = tmp_path / "one.npz", tmp_path / "two.npz"
    args = ("stats", ckpt, "--data", data, "-b", "5", "--grad", grad, "--device", "cpu")
    r = launch(*args, "-o", single)
    assert r.returncode == 0, r.stderr
    r = launch(*args, "-o", double, nproc=2)
    assert r.returncode == 0, r.stderr
    a, b = read_npz(single), read_npz(double)
    assert a.keys() == b.keys() and "stem/hessian" in a
    assert a["stem/count"] == b["stem/count"] == 37 * 28 * 28
    assert a["stem/grad_count"] == b["stem/grad_count"] == 37
    for key in a:
        if key == "__meta__":
            continue
        err = np.linalg.norm(a[key] - b[key]) / max(np.linalg.norm(a[key]), 1e-30)
        assert err < 1e-6, f"{key}: relative difference {err:.2e}"
    assert not list(tmp_path.glob("*.part")), "only rank 0 writes, atomically"


@pytest.mark.slow
def test_fewer_samples_than_processes_is_one_line_from_rank_0(tmp_path):
    ckpt = tmp_path / "base.safetensors"
    assert launch("init", "--arch", "rankcut:small-resnet", "--kwargs", '{"width": 4}', "-o", ckpt).returncode == 0
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 28, 28), np.uint8))
    out = tmp_path / "s.npz"
    r = launch("stats", ckpt, "--data", tmp_path / "one.npz", "--device", "cpu", "-o", out, nproc=2)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and r.stdout == "", r.stderr
    assert errors == ["error: the data has 1 sample(s), fewer than the 2 processes torchrun started: give every "
                      "process at least one (more data or a smaller --nproc_per_node)"], r.stderr
    assert not out.exists()
