"""The ``rankcut`` commands: one module per command, registered on one Typer application here."""

from __future__ import annotations

import typer

from rankcut.cli import eval as eval_cmd
from rankcut.cli import export, finetune, info, init, profile, project, refit, stats, sweep
from rankcut.cli.errors import one_line_errors

app = typer.Typer(
    name="rankcut",
    help="Compress trained CNNs by rank reduction: init -> stats -> project -> [refit] -> finetune -> eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for name, fn in [("init", init.init), ("info", info.info), ("stats", stats.stats), ("project", project.project),
                 ("finetune", finetune.finetune), ("eval", eval_cmd.evaluate_command), ("export", export.export),
                 ("profile", profile.profile), ("refit", refit.refit), ("sweep", sweep.sweep)]:
    app.command(name)(one_line_errors(fn))

