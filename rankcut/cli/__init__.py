"""The ``rankcut`` command line. Kept light: signals are set up before the heavy imports in ``commands``."""

from __future__ import annotations

from rankcut.cli.signals import exit_while_starting, unwind_on_signals


def main() -> None:
    """Console-script entry point."""
    exit_while_starting()
    from rankcut.cli.commands import app

    unwind_on_signals()
    app()


def __getattr__(name: str):
    """``rankcut.cli.app``, the Typer application, imported on first use."""
    if name == "app":
        from rankcut.cli.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
