"""Shared fixtures: run the CLI in-process with separate stdout/stderr, and a small random checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run


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


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    """Tests see rankcut as a new user does: no debug tracebacks, no trusted user packages."""
    monkeypatch.delenv("RANKCUT_DEBUG", raising=False)
    monkeypatch.delenv("RANKCUT_TRUST", raising=False)
