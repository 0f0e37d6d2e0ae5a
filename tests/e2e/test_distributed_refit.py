"""``torchrun --nproc_per_node 2 rankcut refit`` (gloo, CPU) equals the single-process refit."""

from __future__ import annotations

import json

import pytest
import torch

from rankcut.files.checkpoint import load_with_meta

from cli_helpers import launch, random_digits_setup

pytestmark = pytest.mark.timeout(600)  # a few torchrun jobs (each limited to 300 s)


@pytest.mark.slow
def test_two_process_refit_equals_single_process(tmp_path):
    """37 samples (uneven shards and batches): conv2's sums are all-reduced Gram matrices (37 x 576 rows > 289
    inputs), fc1's the rows gathered from both processes (37 rows < 9,217 inputs). fc1 keeps rank 19, below
    the data's rank, so its pair is unique (with a rank above it, the factors are not, only their product)."""
    small = tmp_path / "small.safetensors"
    base, stats, data = random_digits_setup(tmp_path)
    r = launch("project", base, "--stats", stats, "--keep", "0.15", "--layers", "conv2,fc1", "-o", small)
    assert r.returncode == 0, r.stderr
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"refit{nproc}.safetensors"
        r = launch("refit", small, "--teacher", base, *data, "--damping", "1e-2", "-o", out, "--json", nproc=nproc)
        assert r.returncode == 0, r.stderr
        outputs[nproc] = (load_with_meta(out)[0].state_dict(), json.loads(r.stdout))
    (one, report1), (two, report2) = outputs[1], outputs[2]
    assert [x["layer"] for x in report1["layers"]] == ["conv2", "fc1"]
    assert report1["layers"][1]["status"] == "refit"  # conv2 sees the teacher's inputs: pca may already be best
    for a, b in zip(report1["layers"], report2["layers"]):
        assert a["status"] == b["status"], a["layer"]
        assert a["error_after"] == pytest.approx(b["error_after"], rel=1e-6), a["layer"]
    for key, value in one.items():
        err = ((two[key].double() - value.double()).norm() / value.double().norm().clamp_min(1e-30)).item()
        assert err < 1e-6, f"{key}: relative difference {err:.2e}"
    small_state = load_with_meta(small)[0].state_dict()
    changed = sum(not torch.equal(small_state[k], v) for k, v in one.items())
    assert changed >= 3, "the refit changed fc1's pair"
    assert not list(tmp_path.glob("*.part")), "only rank 0 writes, atomically"
