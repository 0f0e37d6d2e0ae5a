"""``torchrun --nproc_per_node 2 rankcut project --sequential`` (gloo, CPU) equals the single-process run."""

from __future__ import annotations

import pytest

from rankcut.files.checkpoint import load_with_meta

from cli_helpers import launch, random_digits_setup

pytestmark = pytest.mark.timeout(600)  # a few torchrun jobs (each limited to 300 s)


@pytest.mark.slow
def test_two_process_sequential_projection_equals_single_process(tmp_path):
    """37 samples (uneven shards and batches): each layer's moments are all-reduced. pca, since the gradient
    statistics of fisher/hessian draw their probes per process (as ``stats --grad`` does), so they agree only
    in expectation. fc1 keeps rank 19 of 128, below the data's rank (36), so its basis is unique. The sums
    differ from one process's in rounding only, but fc1 then sees conv2's pair, rounded to float32, and an
    eigenvector moves by rounding over its eigenvalue gap: 1e-4, where a wrong shard or a missing all-reduce
    moves the bases by 1e-2 or more."""
    base, stats, data = random_digits_setup(tmp_path)
    states = {}
    for nproc in (1, 2):
        out = tmp_path / f"seq{nproc}.safetensors"
        r = launch("project", base, "--stats", stats, "--method", "pca", "--keep", "0.15", "--layers", "conv2,fc1",
                   "--sequential", *data, "-o", out, nproc=nproc)
        assert r.returncode == 0, r.stderr
        states[nproc] = load_with_meta(out)[0].state_dict()
    for key, value in states[1].items():
        err = ((states[2][key].double() - value.double()).norm() / value.double().norm().clamp_min(1e-30)).item()
        assert err < 1e-4, f"{key}: relative difference {err:.2e}"
    assert not list(tmp_path.glob("*.part")), "only rank 0 writes, atomically"
