"""What the user sees: their own text printed as typed, progress lines in logs, one JSON shape."""

from __future__ import annotations

import hashlib
import io
import shutil

from rankcut.cli import progress
from rankcut.cli.console import Reporter, plain_console

DATA = ["--data", "synthetic:100", "-n", "20", "--device", "cpu"]


# --- user text is never read as rich markup (issue 18, item 1) --------------------------------------------------------

def test_brackets_and_emoji_codes_in_names_print_as_typed(run_cli, mnist_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative names, so no table wraps them
    out = run_cli(["init", "--arch", "rankcut:mnist-cnn", "-o", "model[keep50].safetensors"]).stdout
    assert "model[keep50].safetensors" in out, out
    (tmp_path / "d[").mkdir()
    closing = "d[/x].safetensors"  # a file x].safetensors in the folder d[; the path reads as a rich closing tag
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
    assert "moments: step 1/2 (50%)" in out and "moments: step 2/2 (100%)" in out and "batches/s" in out, out
    out = run_cli(["eval", mnist_ckpt, *DATA, "-b", "10"], env=env).stderr
    assert "evaluating: step 2/2 (100%)" in out, out


# --- scripting: one JSON shape, digests, what made a statistics file (issue 18, item 8) ---------------------------------

def test_eval_json_has_one_shape_for_one_checkpoint_or_several(run_cli, mnist_ckpt):
    one = run_cli(["eval", mnist_ckpt, *DATA, "--json"]).data
    two = run_cli(["eval", mnist_ckpt, mnist_ckpt, *DATA, "--json"]).data
    assert one.keys() == two.keys() and one["version"] == 1 and len(one["results"]) == 1
    assert one["results"][0] == two["results"][0] == two["results"][1]
    assert one["results"][0]["k"] == 5 and "topk" in one["results"][0] and "top5" not in one["results"][0]


def test_info_shows_the_checkpoint_digest(run_cli, mnist_ckpt):
    digest = hashlib.sha256(mnist_ckpt.read_bytes()).hexdigest()
    assert run_cli(["info", mnist_ckpt, "--json"]).data["sha256"] == digest
    assert digest in run_cli(["info", mnist_ckpt]).stdout


def test_a_statistics_table_says_which_checkpoint_and_data_made_it_and_whether_it_has_gradients(run_cli, mnist_ckpt,
                                                                                                 tmp_path):
    digest = hashlib.sha256(mnist_ckpt.read_bytes()).hexdigest()[:16]
    plain, grad = tmp_path / "plain.npz", tmp_path / "grad.npz"
    run_cli(["stats", mnist_ckpt, *DATA, "-o", plain])
    run_cli(["stats", mnist_ckpt, *DATA, "--grad", "kl", "-o", grad])
    for path, gradients in ((plain, "gradient statistics: none"), (grad, "gradient statistics: kl, 1 probe")):
        shown = " ".join(run_cli(["info", path]).stdout.split())  # the caption may wrap
        assert f"checkpoint sha256 {digest}" in shown and "data synthetic:100, 20 samples" in shown, shown
        assert gradients in shown, shown


# --- the finetune summary shows the schedule (issue 18, item 10) -------------------------------------------------------

def test_finetune_summary_shows_the_peak_lr_and_the_schedule(run_cli, mnist_ckpt, tmp_path):
    out = run_cli(["finetune", mnist_ckpt, "--data", "synthetic:32", "-b", "8", "--lr", "0.0123", "--device", "cpu",
                   "-o", tmp_path / "t.safetensors"]).stdout
    shown = " ".join(out.split())
    assert "adamw, lr peak 0.0123: linear warm-up over the first 20% of steps, then cosine decay to 0" in shown, out
    header = next(line for line in out.splitlines() if "epoch" in line and "loss" in line)
    assert " lr " not in header, out  # no column of the last, decayed rate


def test_progress_lines_come_at_most_once_per_interval(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    bar = progress.LineProgress(every=30, stream=log)
    task = bar.add_task("epoch 1/1", total=100, info="")
    for _ in range(50):  # 50 steps in 10 s: no line yet
        now[0] += 0.2
        bar.update(task, advance=1, info="loss 0.5000  10 img/s")
    assert log.getvalue() == ""
    now[0] += 21  # 31 s since the start
    bar.update(task, advance=1, info="loss 0.4000  10 img/s")
    assert log.getvalue() == ("epoch 1/1: step 51/100 (51%), loss 0.4000, 10 img/s, elapsed 0:00:31, "
                              "ETA 0:00:30\n")
    for _ in range(49):  # the last step is shown once a line has been printed
        bar.update(task, advance=1)
    assert log.getvalue().splitlines()[-1].startswith("epoch 1/1: step 100/100 (100%)")
    monkeypatch.setenv(progress.INTERVAL_ENV, "2.5")
    assert progress.interval() == 2.5
