"""Shared fixtures: run the CLI in-process with separate stdout/stderr, small random checkpoints and their files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from builders import logits_of
from cli_helpers import invoke, run

from rankcut.files.checkpoint import load_with_meta
from rankcut.run.data import open_data

CPU = ["--device", "cpu"]


@pytest.fixture
def run_cli():
    """``run_cli(args, fails=False, env=None) -> Result`` (see ``cli_helpers.run``)."""
    return run


@pytest.fixture
def mnist_ckpt(tmp_path) -> Path:
    """A random (seed 0) ``rankcut:mnist-cnn`` checkpoint made with ``rankcut init``."""
    path = tmp_path / "mnist.safetensors"
    run(["init", "--arch", "rankcut:mnist-cnn", "--seed", "0", "-o", path])
    return path


@pytest.fixture(scope="session")
def small_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny small-resnet checkpoint, its statistics (plain and with --grad), and a small data file.

    Made once for the session: tests read these files and must not change them.
    """
    root = tmp_path_factory.mktemp("small")
    f = {"ckpt": root / "sr.safetensors", "stats": root / "sr.npz", "grad": root / "srg.npz", "data": root / "d.npz",
         "root": root}
    assert invoke("init", "-a", "rankcut:small-resnet", "--kwargs", '{"width": 4}', "-o", f["ckpt"]).exit_code == 0
    assert invoke("stats", f["ckpt"], "--data", "synthetic:32", *CPU, "-o", f["stats"]).exit_code == 0
    assert invoke("stats", f["ckpt"], "--data", "synthetic:32", "--grad", "kl", *CPU, "-o", f["grad"]).exit_code == 0
    g = np.random.default_rng(0)
    np.savez(f["data"], x=g.integers(0, 256, (6, 28, 28), dtype=np.uint8), y=g.integers(0, 10, 6))
    return f


@pytest.fixture
def digits(mnist_ckpt, tmp_path):
    """40 real digits labelled so that sample i's label is the model's (i mod 10)-th ranked class."""
    x = open_data("mnist5k:test", load_with_meta(mnist_ckpt)[1].input).x[:40].numpy()
    np.savez(tmp_path / "digits.npz", x=x)
    order = np.argsort(-logits_of(mnist_ckpt, str(tmp_path / "digits.npz")), axis=1)
    np.savez(tmp_path / "digits.npz", x=x, y=order[np.arange(40), np.arange(40) % 10])
    return tmp_path / "digits.npz"


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    """Tests see rankcut as a new user does: no debug tracebacks, no trusted user packages."""
    monkeypatch.delenv("RANKCUT_DEBUG", raising=False)
    monkeypatch.delenv("RANKCUT_TRUST", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _one_thread_for_the_session():
    """One intra-op thread before any fixture runs, so module- and session-scoped fixtures (a sweep made once
    for a module) compute with the same thread count as the tests that compare against them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread(_one_thread_for_the_session):
    """One intra-op thread in every test, restored after: float results (and so the thresholds on them) do not
    depend on the machine's core count, and on a busy 2-core machine one thread is faster than two (a 512 x 512
    eigh, a probe pass)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
