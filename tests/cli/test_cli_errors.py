"""How every command fails: one ``error:`` line and exit 1 for user errors, 130 with what was written on Ctrl-C."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import pickled_payload
from typer.testing import CliRunner

from rankcut.cli import app
from rankcut.errors import RankcutError

RANKCUT = Path(sys.executable).with_name("rankcut")


def test_one_line_errors_decorator(capsys, monkeypatch):
    import typer

    from rankcut.cli.errors import one_line_errors

    def raiser(exc):
        @one_line_errors
        def command():
            raise exc
        return command

    for exc, expected in [(RankcutError("first line\n  frame #0: c10::Error\n"), "error: first line"),
                          (PermissionError(13, "Permission denied", "/x"), "error: PermissionError: [Errno 13]"),
                          (MemoryError(), "error: MemoryError")]:
        with pytest.raises(typer.Exit) as info:
            raiser(exc)()
        assert info.value.exit_code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(expected), err
    with pytest.raises(ValueError):  # not a user error: a bug, which keeps its traceback
        raiser(ValueError("bug"))()
    monkeypatch.setenv("RANKCUT_DEBUG", "1")
    with pytest.raises(RankcutError):
        raiser(RankcutError("shown with its traceback"))()


def test_real_executable_bad_input(mnist_ckpt, tmp_path):
    weights, marker = pickled_payload(tmp_path)
    out = tmp_path / "out.safetensors"
    env = {k: v for k, v in os.environ.items() if k not in ("RANKCUT_DEBUG", "RANKCUT_TRUST")}
    for args in (["info", str(tmp_path / "missing.safetensors")],
                 ["init", "-a", "rankcut:mnist-cnn", "-w", str(weights), "-o", str(out)]):
        proc = subprocess.run([str(RANKCUT), *args], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert proc.stdout == ""
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists() and not out.exists()


def test_interrupt_after_the_write_says_so(tmp_path, monkeypatch):
    """Ctrl-C after the output was renamed into place: the message must not claim nothing was written."""
    from rankcut.cli.console import Reporter

    def interrupted(self, data, *renderables):
        raise KeyboardInterrupt

    monkeypatch.setattr(Reporter, "result", interrupted)
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(app, ["init", "-a", "rankcut:mnist-cnn", "-o", str(out)])
    assert result.exit_code == 130 and out.exists()
    assert result.stderr.splitlines() == [f"error: interrupted; {out} had already been written"]
    import rankcut.cli.init

    def no_save(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(rankcut.cli.init, "save", no_save)
    result = CliRunner().invoke(app, ["init", "-a", "rankcut:mnist-cnn", "-o", str(tmp_path / "x.safetensors")])
    # The next command in the same process reports its own writes only.
    assert result.exit_code == 130 and result.stderr.splitlines() == ["error: interrupted; no output was written"]


def test_a_command_unwinds_on_sigterm_and_gives_the_callers_handlers_back(tmp_path, monkeypatch):
    """In-process callers (tests, notebooks) keep their own handlers; inside, SIGTERM unwinds as ``terminated``."""
    import signal

    import rankcut.cli.init

    def mine(signum, frame):
        raise AssertionError("the caller's handler ran inside the command")

    def terminated_while_saving(*args):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(rankcut.cli.init, "save", terminated_while_saving)
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        result = CliRunner().invoke(app, ["init", "-a", "rankcut:mnist-cnn", "-o", str(tmp_path / "m.safetensors")])
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143 and result.stderr.splitlines() == ["error: terminated; no output was written"]
