"""What the user sees: their own text printed as typed, progress lines in logs, one JSON shape."""

from __future__ import annotations

import io
import shutil

from rankcut.cli.console import Reporter, plain_console

DATA = ["--data", "synthetic:100", "-n", "20", "--device", "cpu"]


# --- user text is never read as rich markup (issue 18, item 1) --------------------------------------------------------

def test_brackets_and_emoji_codes_in_names_print_as_typed(run_cli, mnist_ckpt, tmp_path):
    named = tmp_path / "model[keep50].safetensors"
    out = run_cli(["init", "--arch", "rankcut:mnist-cnn", "-o", named]).stdout
    assert "model[keep50].safetensors" in out, out
    (tmp_path / "d[").mkdir()
    closing = tmp_path / "d[" / "x].safetensors"  # the path reads 'd[/x].safetensors': a rich closing tag
    shutil.copy(mnist_ckpt, closing)
    out = run_cli(["eval", closing, *DATA]).stdout
    assert "d[/x].safetensors" in out and "synthetic:100" in out and "\U0001f4af" not in out, out
    out = run_cli(["info", closing]).stdout
    assert "d[/x].safetensors" in out, out


def test_progress_bar_shows_markup_like_descriptions_literally():
    report = Reporter()
    screen = io.StringIO()
    report.err = plain_console(file=screen, force_terminal=True, width=120)
    report.chatty, report.logging = True, False
    with report.progress() as bar:
        task = bar.add_task("layer[/x] d[keep50] :100:", total=2, info="loss [bold]1")
        bar.update(task, advance=1)
        bar.refresh()
    shown = screen.getvalue()
    assert "layer[/x] d[keep50] :100:" in shown and "loss [bold]1" in shown, shown


# --- plain progress lines when stderr is a log (issue 18, item 7) ------------------------------------------------------

def test_finetune_logs_plain_progress_lines_when_stderr_is_not_a_terminal(run_cli, mnist_ckpt, tmp_path):
    args = ["finetune", mnist_ckpt, "--data", "mnist5k:train", "-n", "64", "-b", "16", "--device", "cpu",
            "-o", tmp_path / "tuned.safetensors"]
    lines = run_cli(args, env={"RANKCUT_PROGRESS_SECONDS": "0"}).stderr.splitlines()
    steps = [line for line in lines if line.startswith("epoch 1/1: step ")]
    assert len(steps) == 4, lines  # every step at interval 0; CliRunner's stderr is not a terminal
    assert all("loss " in line and "img/s" in line and "elapsed 0:00:" in line for line in steps), steps
    assert "ETA" in steps[0] and steps[-1].startswith("epoch 1/1: step 4/4 (100%)"), steps
    assert run_cli([*args, "--quiet"], env={"RANKCUT_PROGRESS_SECONDS": "0"}).stderr == ""
    assert run_cli(args).stderr == ""  # the default interval (30 s): a run this short prints nothing


def test_stats_and_eval_progress_lines_name_their_pass(run_cli, mnist_ckpt, tmp_path):
    env = {"RANKCUT_PROGRESS_SECONDS": "0"}
    out = run_cli(["stats", mnist_ckpt, *DATA, "-b", "10", "-o", tmp_path / "s.npz"], env=env).stderr
    assert "moments: step 1/2 (50%)" in out and "moments: step 2/2 (100%)" in out, out
    out = run_cli(["eval", mnist_ckpt, *DATA, "-b", "10"], env=env).stderr
    assert "evaluating: step 2/2 (100%)" in out, out
