"""``torchrun --nproc_per_node 2 rankcut finetune`` (gloo, CPU): DDP replicas stay identical, rank 0 writes."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from rankcut.files.checkpoint import load_with_meta, read_meta

from cli_helpers import launch

pytestmark = pytest.mark.timeout(600)  # each test starts a few torchrun jobs (each limited to 300 s)
torchrun = partial(launch, nproc=2)


@pytest.fixture
def setup(tmp_path):
    from rankcut.cli import app
    from typer.testing import CliRunner

    ckpt = tmp_path / "base.safetensors"
    assert CliRunner().invoke(app, ["init", "--arch", "rankcut:small-resnet", "-o", str(ckpt)]).exit_code == 0
    g = torch.Generator().manual_seed(0)
    # 150 samples: the two shards and the batches do not divide evenly; labels 0..9.
    np.savez(tmp_path / "data.npz", x=torch.rand(150, 1, 28, 28, generator=g).numpy(),
             y=torch.randint(10, (150,), generator=g).numpy())
    return ckpt, tmp_path / "data.npz"


@pytest.mark.slow
def test_two_process_finetune_keeps_replicas_identical_and_only_rank_0_writes(setup, tmp_path):
    ckpt, data = setup
    out = tmp_path / "tuned.safetensors"
    r = torchrun("finetune", ckpt, "--data", data, "--eval-data", data, "--epochs", "2", "-b", "16",
                 "--device", "cpu", "--save-every", "1", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    # Only rank 0 prints: one JSON object. The parameter digests of both replicas were compared before writing.
    result = json.loads(r.stdout)
    assert result["config"]["processes"] == 2 and [e["epoch"] for e in result["epochs"]] == [1, 2]
    assert result["epochs"][-1]["eval"]["samples"] == 150, "the evaluation shards cover the data exactly once"
    assert result["epochs"][0]["images"] == 2 * 4 * 16, "each process takes 75 samples: 4 full batches of 16"
    model, meta = load_with_meta(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert read_meta(out).history[-1]["epochs_done"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "data.npz", "tuned.safetensors"]


@pytest.mark.slow
def test_two_process_divergence_stops_both_ranks_and_writes_nothing(setup, tmp_path):
    ckpt, data = setup
    out = tmp_path / "nan.safetensors"
    r = torchrun("finetune", ckpt, "--data", data, "--optimizer", "sgd", "--lr", "1e12", "--warmup", "0",
                 "-b", "16", "--device", "cpu", "-o", out)
    assert r.returncode != 0
    assert "NaN or infinite" in r.stderr and "Traceback" not in r.stderr.split("NaN or infinite")[0]
    assert not out.exists()
