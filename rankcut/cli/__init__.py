"""The ``rankcut`` command line. Kept light: signals are set up before the heavy imports in ``commands``."""

from __future__ import annotations

from rankcut.cli.signals import exit_at_once


def main() -> None:
    """Console-script entry point."""
    exit_at_once()  # each command unwinds instead while it runs (``cli.errors.one_line_errors``)
    from rankcut.cli.commands import app

    app()


def __getattr__(name: str):
    """``rankcut.cli.app``, the Typer application, imported on first use."""
    if name == "app":
        from rankcut.cli.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
