"""Shared fixtures: run the CLI in-process with separate stdout/stderr, and a small random checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rankcut.cli import app


def _run(args, *, fails: bool = False, env: dict | None = None):
    """Run ``rankcut ARGS`` in-process and check the CLI conventions (DESIGN §6) on the way.

    Success: exit 0 and, with ``--json``, stdout is exactly one JSON object (parsed into ``result.data``).
    ``fails=True``: a non-zero exit, nothing on stdout, exactly one ``error: ...`` line on stderr and no
    traceback. An exception escaping the command is a bug in rankcut and is re-raised with its traceback.
    Typer's typer.testing.CliRunner always keeps stdout and stderr apart (``result.stdout``/``.stderr``).
    """
    args = [str(a) for a in args]
    result = CliRunner().invoke(app, args, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    shown = f"rankcut {' '.join(args)}\n--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, shown
    if fails:
        assert result.exit_code != 0, shown
        assert result.stdout == "", shown
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
        result.message = lines[0]
        return result
    assert result.exit_code == 0, shown
    if "--json" in args:
        assert result.stdout.count("\n") == 1, shown
        result.data = json.loads(result.stdout)
        assert isinstance(result.data, dict), shown
    return result


@pytest.fixture
def run_cli():
    """``run_cli(args, fails=False, env=None) -> Result`` (see ``_run``)."""
    return _run


@pytest.fixture
def mnist_ckpt(tmp_path) -> Path:
    """A random (seed 0) ``rankcut:mnist-cnn`` checkpoint made with ``rankcut init``."""
    path = tmp_path / "mnist.safetensors"
    _run(["init", "--arch", "rankcut:mnist-cnn", "--seed", "0", "-o", path])
    return path


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    """Tests see rankcut as a new user does: no debug tracebacks, no trusted user packages."""
    monkeypatch.delenv("RANKCUT_DEBUG", raising=False)
    monkeypatch.delenv("RANKCUT_TRUST", raising=False)
