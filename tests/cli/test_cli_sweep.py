"""``rankcut sweep``: its points are what separate ``project`` + ``eval`` give; the JSON is a cache; plots; refusals."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from xml.etree import ElementTree

import numpy as np
import pytest
from builders import digits_npz, hand_chain_profile, hand_profile, logits_of
from cli_helpers import run
from safetensors import safe_open

import rankcut
import rankcut.api as sweep_module
from rankcut.cli import plots
from rankcut.cli.plots import frontier_figure
from rankcut.files.checkpoint import load_with_meta
from rankcut.run.data import open_data
from rankcut.run.frontier import label, pareto

DATA = "synthetic:64"
CPU = ["--device", "cpu"]
FIGURES = ("top1", "topk", "loss", "agreement", "kl", "macs", "params", "samples", "labeled", "nonfinite", "ratios")


def _tensors(path) -> dict[str, bytes]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def _meta_without_times(path) -> dict:
    meta = rankcut.read_meta(path)
    return {"edits": meta.edits, "input": meta.input, "arch": meta.arch,
            "history": [{k: v for k, v in h.items() if k != "time"} for h in meta.history]}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """mnist-cnn, statistics for every method and structure, and a sweep of 3 x 3 points with their checkpoints.

    Made once for the module: tests copy what they change.
    """
    root = tmp_path_factory.mktemp("swept")
    ckpt, stats, out = root / "mnist.safetensors", root / "s.npz", root / "sweep.json"
    run(["init", "--arch", "rankcut:mnist-cnn", "--seed", "0", "-o", ckpt, "-q"])
    run(["stats", ckpt, "--data", DATA, "--grad", "kl", "--structure", "channels", *CPU, "-o", stats, "-q"])
    data = run(["sweep", ckpt, "--stats", stats, "--data", DATA, "--methods", "pca,fisher",
                "--structures", "pair,channels", "--macs", "0.5,0.3,0.2", "--keep-dir", root / "kept", *CPU,
                "-o", out, "--json"]).data
    return {"ckpt": ckpt, "stats": stats, "out": out, "data": data, "root": root}


def test_sweep_points_are_what_project_and_eval_give(swept, run_cli):
    """Every point: the kept checkpoint equals project's file bit for bit, the figures equal eval's."""
    data, root = swept["data"], swept["root"]
    assert json.loads(swept["out"].read_text()) == data  # the file is the --json object
    assert [(p["structure"], p["method"], p["fraction"]) for p in data["points"]] == [
        (s, m, f) for s, m in (("pair", "pca"), ("pair", "fisher"), ("channels", None)) for f in (0.5, 0.3, 0.2)]
    assert data["computed"] == 9 and data["reused"] == 0 and data["complete"]
    for i, p in enumerate(data["points"]):
        out = root / f"p{i}.safetensors"
        how = ["--method", p["method"]] if p["method"] else []
        run_cli(["project", swept["ckpt"], "--stats", swept["stats"], "--structure", p["structure"], *how,
                 "--macs", p["fraction"], "-o", out, "-q"])
        assert _tensors(out) == _tensors(p["checkpoint"]), p
        assert _meta_without_times(out) == _meta_without_times(p["checkpoint"]), p
        evaluated = run_cli(["eval", out, "--data", DATA, "--reference", swept["ckpt"], *CPU, "--json"]).data
        figures = evaluated["results"][0]
        assert {k: p[k] for k in FIGURES} == {k: figures[k] for k in FIGURES}, p
        assert data["original"]["top1"] == figures["reference"]["top1"]
        assert data["original"]["macs"] == figures["reference"]["macs"]


def test_a_rerun_computes_only_the_new_point(swept, run_cli, monkeypatch, tmp_path):
    out, kept = tmp_path / "sweep.json", tmp_path / "kept"
    shutil.copy(swept["out"], out)
    shutil.copytree(swept["root"] / "kept", kept)
    calls = []
    real = sweep_module.project

    def counted(model, contract, stats, config, *args, **kwargs):
        calls.append((config.structure, config.method, config.budget.fraction))
        return real(model, contract, stats, config, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "project", counted)
    again = run_cli(["sweep", swept["ckpt"], "--stats", swept["stats"], "--data", DATA, "--methods", "pca,fisher",
                     "--structures", "pair,channels", "--macs", "0.5,0.3,0.2,0.1", "--keep-dir", kept,
                     *CPU, "-o", out, "--json"]).data
    assert again["computed"] == 3 and again["reused"] == 9
    assert sorted(calls, key=str) == sorted([("pair", "pca", 0.1), ("pair", "fisher", 0.1), ("channels", "pca", 0.1)],
                                            key=str)
    before = {(p["structure"], p["method"], p["fraction"]): p for p in swept["data"]["points"]}
    for p in again["points"]:
        old = before.get((p["structure"], p["method"], p["fraction"]))
        if old is not None:
            assert {k: p[k] for k in FIGURES} == {k: old[k] for k in FIGURES}
    calls.clear()  # other inputs (here a data subset): nothing is reused, and the user is told why
    result = run_cli(["sweep", swept["ckpt"], "--stats", swept["stats"], "--data", DATA, "--samples", "32",
                      "--macs", "0.5", *CPU, "-o", out, "--json"])
    assert result.data["computed"] == 1 and len(calls) == 1
    assert "its points are not reused" in result.stderr and "samples" in result.stderr


def test_sweep_recommends_and_marks_the_frontier(swept):
    data = swept["data"]
    original, points = data["original"], data["points"]
    for p in points:  # marked Pareto-optimal iff no point is as cheap and as accurate, and better in one
        beaten = any(q["ratios"]["macs"] <= p["ratios"]["macs"] and q["top1"] >= p["top1"] and
                     (q["ratios"]["macs"] < p["ratios"]["macs"] or q["top1"] > p["top1"]) for q in points)
        assert p["pareto"] is not beaten
    fits = [p for p in points if p["top1"] >= original["top1"] - 0.01 - 1e-12]
    if fits:
        assert data["recommendation"]["ratios"]["macs"] == min(p["ratios"]["macs"] for p in fits)
    else:
        assert data["recommendation"] is None


def test_sweep_plot_png_and_svg(tmp_path, mnist_ckpt, run_cli):
    stats = tmp_path / "s.npz"
    run_cli(["stats", mnist_ckpt, "--data", DATA, *CPU, "-o", stats, "-q"])
    for name, magic in (("f.png", b"\x89PNG\r\n\x1a\n"), ("f.svg", b"<?xml")):
        run_cli(["sweep", mnist_ckpt, "--stats", stats, "--data", DATA, "--keep", "0.5,0.25", *CPU,
                 "-o", tmp_path / "sw.json", "--plot", tmp_path / name, "-q"])
        content = (tmp_path / name).read_bytes()
        assert content.startswith(magic)
        if name.endswith(".svg"):
            assert b"<svg" in content and content.rstrip().endswith(b"</svg>")
    assert json.loads((tmp_path / "sw.json").read_text())["plot"] == str(tmp_path / "f.svg")


@pytest.mark.parametrize("plot, message", [
    ("nowhere/f.png", "output folder does not exist"),
    ("f.jpg", "--plot writes .png, .svg or .html"),
    ("folder.png", "is a folder"),
])
def test_a_bad_plot_path_is_refused_before_any_work(tmp_path, mnist_ckpt, run_cli, monkeypatch, plot, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.png").mkdir()
    monkeypatch.setattr(sweep_module, "project", lambda *a, **k: pytest.fail("projected before refusing"))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd", "--keep", "0.5", *CPU,
                      "-o", "sw.json", "--plot", plot], fails=True)
    assert message in result.message
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_plot_without_matplotlib_says_how_to_install(tmp_path, mnist_ckpt, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure raises ImportError
    monkeypatch.chdir(tmp_path)
    result = run_cli(["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd", "--keep", "0.5", *CPU, "-o", "sw.json",
                      "--plot", "f.png"], fails=True)
    assert "pip install 'rankcut[plot]'" in result.message
    assert not (tmp_path / "sw.json").exists() and not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--macs", "0.5", "--methods", "random"], "predicts no loss"),
    (["--macs", "0.5,x"], "--macs takes comma-separated fractions"),
    (["--macs", "1.5"], "--macs must be in (0, 1)"),
    ([], "say which budgets to sweep"),
    (["--keep", "0.5", "--structures", "pair,rows"], "--structure must be one of"),
    (["--keep", "0.5", "--methods", "fisher"], "needs --stats"),
    (["--keep", "0.5", "--structures", "channels"], "needs channel statistics"),
    (["--keep", "0.5", "--within", "-1"], "--within must be 0 or more"),
])
def test_sweep_refusals(tmp_path, mnist_ckpt, run_cli, args, message):
    result = run_cli(["sweep", mnist_ckpt, "--data", DATA, *args, *CPU, "-o", tmp_path / "sw.json"], fails=True)
    assert message in result.message
    assert not (tmp_path / "sw.json").exists()


def test_info_plots_the_spectra_of_statistics(tmp_path, mnist_ckpt, run_cli):
    stats = tmp_path / "s.npz"
    run_cli(["stats", mnist_ckpt, "--data", DATA, *CPU, "-o", stats, "-q"])
    run_cli(["info", stats, "--plot", tmp_path / "spectra.png", "-q"])
    assert (tmp_path / "spectra.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "--plot writes .png or .svg" in run_cli(["info", stats, "--plot", tmp_path / "s.pdf"], fails=True).message


def test_info_plots_a_checkpoints_widths_before_and_after(tmp_path, mnist_ckpt, run_cli, monkeypatch):
    """A checkpoint pruned (conv2) then projected (fc1): the rows hold each layer's original width next to what
    it keeps, the PNG is written; a bad plot path is refused in one line before anything is read or written."""
    stats, pruned, both = tmp_path / "s.npz", tmp_path / "pruned.safetensors", tmp_path / "both.safetensors"
    run_cli(["stats", mnist_ckpt, "--data", DATA, "--structure", "channels", *CPU, "-o", stats, "-q"])
    run_cli(["project", mnist_ckpt, "--stats", stats, "--structure", "channels", "--layers", "conv2", "--keep", "0.25",
             "-o", pruned, "-q"])
    run_cli(["project", pruned, "--method", "svd", "--layers", "fc1", "--keep", "0.25", "-o", both, "-q"])
    data = run_cli(["info", both, "--plot", tmp_path / "widths.png", "--json"]).data
    assert (tmp_path / "widths.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    rows = {r["name"]: (r["structure"], r["original_width"], r["width"], r["rank"]) for r in data["layers"]}
    assert rows == {"conv1": ("whole", 32, 32, None), "conv2": ("channels", 64, 16, None),
                    "fc1": ("pair", 128, 128, 32), "fc2": ("whole", 10, 10, None)}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.png").mkdir()
    for plot, message in (("nowhere/c.png", "output folder does not exist"), ("c.jpg", "--plot writes .png or .svg"),
                          ("folder.png", "is a folder")):
        before = sorted(p.name for p in tmp_path.iterdir())
        assert message in run_cli(["info", both, "--plot", plot], fails=True).message
        assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.fixture
def own_labels(mnist_ckpt, tmp_path):
    """48 real digits labelled with the model's own predictions: the original's top-1 is 100%, and every
    prediction a compressed layer changes is a top-1 drop, so layers differ in sensitivity."""
    x = open_data("mnist5k:test", load_with_meta(mnist_ckpt)[1].input).x[:48].numpy()
    np.savez(tmp_path / "own.npz", x=x)
    np.savez(tmp_path / "own.npz", x=x, y=logits_of(mnist_ckpt, str(tmp_path / "own.npz")).argmax(1))
    return tmp_path / "own.npz"


def test_per_layer_points_are_project_layers_keep_and_eval_sorted_by_drop(tmp_path, mnist_ckpt, own_labels,
                                                                          run_cli):
    """Each per-layer point is `project --layers L --keep F` + `eval` (same figures, same rank), and the layers
    come sorted by their largest top-1 drop."""
    sweep = ["sweep", mnist_ckpt, "--data", own_labels, "--methods", "svd", "--per-layer", *CPU, "-o",
             tmp_path / "pl.json", "--json"]
    data = run_cli([*sweep, "--keep", "0.5,0.125"]).data
    assert data["per_layer"] and data["original"]["top1"] == 1.0 and data["computed"] == 6
    points = data["points"]
    assert sorted((p["layer"], p["fraction"]) for p in points) == [
        (layer, f) for layer in ("conv1", "conv2", "fc1") for f in (0.125, 0.5)]
    for i, p in enumerate(points):
        out = tmp_path / f"p{i}.safetensors"
        projected = run_cli(["project", mnist_ckpt, "--method", "svd", "--layers", p["layer"], "--keep",
                             p["fraction"], "-o", out, "--json"]).data
        row = next(r for r in projected["layers"] if r["layer"] == p["layer"])
        assert (p["before"], p["after"], p["status"]) == (row["old_rank"], row["new_rank"], row["status"])
        figures = run_cli(["eval", out, "--data", own_labels, "--reference", mnist_ckpt, *CPU,
                           "--json"]).data["results"][0]
        assert {k: p[k] for k in FIGURES} == {k: figures[k] for k in FIGURES}, p
        assert p["change"] == p["top1"] - 1.0
    worst = [max(1.0 - p["top1"] for p in points if p["layer"] == entry["layer"]) for entry in data["layers"]]
    assert [e["drop"] for e in data["layers"]] == worst
    assert worst == sorted(worst, reverse=True) and len(set(worst)) > 1, worst  # sorted, and not all ties
    assert [p["layer"] for p in points] == [e["layer"] for e in data["layers"] for _ in range(2)]
    again = run_cli([*sweep, "--keep", "0.5,0.25,0.125"]).data
    assert again["computed"] == 3 and again["reused"] == 6  # cached like the frontier's points


@pytest.mark.parametrize("args, message", [
    (["--macs", "0.5"], "--per-layer keeps each layer alone at --keep fractions"),
    (["--plot", "p.png"], "a --per-layer sweep is shown as a table"),
])
def test_per_layer_refusals(tmp_path, mnist_ckpt, run_cli, args, message):
    result = run_cli(["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd", "--per-layer", *args, *CPU,
                      "-o", tmp_path / "sw.json"], fails=True)
    assert message in result.message
    assert not (tmp_path / "sw.json").exists()


TRAIN = "synthetic:32"
CONV2 = ["--layers", "conv2"]  # svd of fc1 (128 x 9216) takes seconds on a busy machine; conv2 is 64 x 288


def _history(path) -> list[str]:
    return [h["command"] for h in rankcut.read_meta(path).history]


@pytest.mark.slow
def test_refit_and_finetune_points_are_what_the_commands_give(tmp_path, mnist_ckpt, run_cli):
    """A point with --refit and --finetune-epochs is `project`, `refit`, `finetune`, then `eval`: the kept file
    bit for bit, the figures, and the top-1 before each step."""
    small = ["-b", "16", *CPU]
    point = run_cli(["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd", *CONV2, "--keep", "0.5", "--refit",
                     "--refit-samples", "16", "--finetune-epochs", "1", "--train-data", TRAIN, "--keep-dir",
                     tmp_path / "kept", *small, "-o", tmp_path / "sw.json", "--json"]).data["points"][0]
    projected, refitted, tuned = (tmp_path / f"{n}.safetensors" for n in ("p", "r", "f"))
    run_cli(["project", mnist_ckpt, "--method", "svd", *CONV2, "--keep", "0.5", "-o", projected, "-q"])
    run_cli(["refit", projected, "--teacher", mnist_ckpt, "--data", TRAIN, "--samples", "16", *small, "-o",
             refitted, "-q"])
    run_cli(["finetune", refitted, "--data", TRAIN, "--epochs", "1", *small, "-o", tuned, "-q"])
    assert _tensors(point["checkpoint"]) == _tensors(tuned)
    assert _history(point["checkpoint"]) == _history(tuned) == ["init", "project", "refit", "finetune"]

    def figures(path):
        return run_cli(["eval", path, "--data", DATA, "--reference", mnist_ckpt, *small, "--json"]).data["results"][0]

    assert {k: point[k] for k in FIGURES} == {k: figures(tuned)[k] for k in FIGURES}
    assert point["refit"]["top1_before"] == figures(projected)["top1"]
    assert point["finetune"]["top1_before"] == figures(refitted)["top1"]
    assert point["refit"]["samples"] == 16 and point["refit"]["layers"] >= 1
    assert point["finetune"]["epochs"] == 1 and point["finetune"]["samples"] == 32


@pytest.mark.slow
def test_a_rerun_recomputes_only_what_the_new_options_change(tmp_path, mnist_ckpt, run_cli, monkeypatch):
    """The fingerprint holds --refit, --refit-samples, --finetune-epochs and the profile's digest: changing
    one recomputes every point; adding a budget (--keep or --latency) computes only that point."""
    calls = []
    real = sweep_module.project

    def counted(model, contract, stats, config, *args, **kwargs):
        calls.append(config.keep or config.budget.fraction)
        return real(model, contract, stats, config, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "project", counted)
    out = tmp_path / "sw.json"
    profile = hand_profile(mnist_ckpt, tmp_path)

    def sweep(*args):
        calls.clear()
        result = run_cli(["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd", *CONV2, "-b", "16", *CPU, "-o", out,
                          "--json", *args])
        return result.data["computed"], result.data["reused"], sorted(calls), result.stderr

    assert sweep("--keep", "0.5")[:3] == (1, 0, [0.5])
    refit = ("--refit", "--train-data", TRAIN)
    computed, reused, _, warned = sweep("--keep", "0.5", *refit)
    assert (computed, reused) == (1, 0) and "refit" in warned and "not reused" in warned
    assert sweep("--keep", "0.5,0.25", *refit)[:3] == (1, 1, [0.25])
    assert sweep("--keep", "0.5,0.25", *refit, "--refit-samples", "8")[:2] == (2, 0)
    assert sweep("--keep", "0.5,0.25", *refit, "--refit-samples", "8", "--finetune-epochs", "1")[:2] == (2, 0)
    assert sweep("--latency", "0.8", "--profile", profile)[:3] == (1, 0, [0.8])
    assert sweep("--latency", "0.8,0.6", "--profile", profile)[:3] == (1, 1, [0.6])
    hand_profile(mnist_ckpt, tmp_path, conv1_pair_ms=0.5)  # the same file, other figures
    assert sweep("--latency", "0.8,0.6", "--profile", profile)[:2] == (2, 0)


def test_latency_budget_points_are_what_project_with_the_profile_gives(tmp_path, mnist_ckpt, run_cli):
    """A --latency point is project --latency --profile, and a --keep point is project --keep --profile (conv2
    at rank 48 is timed slower than the layer, so it stays whole): the kept files bit for bit."""
    profile = hand_profile(mnist_ckpt, tmp_path)
    data = run_cli(["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd", *CONV2, "--latency", "0.6", "--keep",
                    "0.75", "--profile", profile, "--keep-dir", tmp_path / "kept", *CPU, "-o", tmp_path / "sw.json",
                    "--json"]).data
    assert [(p["kind"], p["fraction"]) for p in data["points"]] == [("keep", 0.75), ("latency", 0.6)]
    for i, (p, how) in enumerate(zip(data["points"], (["--keep", "0.75"], ["--latency", "0.6"]))):
        out = tmp_path / f"p{i}.safetensors"
        run_cli(["project", mnist_ckpt, "--method", "svd", *CONV2, *how, "--profile", profile, "-o", out, "-q"])
        assert _tensors(out) == _tensors(p["checkpoint"]), p
        assert _meta_without_times(out) == _meta_without_times(p["checkpoint"]), p


@pytest.fixture
def quick_timing(monkeypatch):
    """The latency comparison in a few short rounds (the real one takes seconds per point)."""
    monkeypatch.setattr(sweep_module, "compare_runtime", functools.partial(
        sweep_module.compare_runtime, rounds=3, min_rounds=1, warmup=1, round_seconds=0.002))


def test_measured_latency_is_recorded_and_can_be_the_cost(tmp_path, mnist_ckpt, run_cli, quick_timing):
    """--measure-latency times each point against the original (its ratio in the JSON and the table), --cost
    latency marks the frontier and recommends by it, and the figure has a second axes: top-1 vs that ratio."""
    args = ["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd,random", *CONV2, "--keep", "0.5,0.125",
            "--measure-latency", "--threads", "1", "-b", "8", *CPU, "-o", tmp_path / "sw.json"]
    data = run_cli([*args, "--cost", "latency", "--within", "100", "--json"]).data
    points = data["points"]
    for p in points:
        assert p["ratios"]["latency"] == p["latency"]["ratio"] > 0
        assert (p["latency"]["threads"], p["latency"]["batch_size"]) == (1, 8)
    latency = [p["ratios"]["latency"] for p in points]
    assert data["cost"] == "latency" and [p["pareto"] for p in points] == pareto(latency, [p["top1"] for p in points])
    assert data["recommendation"]["ratios"]["latency"] == min(latency)  # --within 100: every point fits
    figure = frontier_figure(data)
    macs_axes, latency_axes = figure.axes
    assert macs_axes.get_xlabel() == "MACs, fraction of the original"
    assert latency_axes.get_xlabel() == "measured latency, ratio to the original"
    drawn = sorted(x for line in latency_axes.get_lines() if line.get_marker() == "o" for x in line.get_xdata())
    assert drawn == sorted(latency)
    again = run_cli([*args, "--json"]).data  # the same points, reused (the cost is not in the fingerprint)
    assert (again["computed"], again["cost"]) == (0, "macs")
    assert [p["pareto"] for p in again["points"]] == pareto([p["ratios"]["macs"] for p in points],
                                                             [p["top1"] for p in points])
    assert "latency" in run_cli(args).stdout.splitlines()[2]  # the table's header


def test_seconds_sets_how_long_each_point_is_timed_and_enters_the_cache_fingerprint(tmp_path, mnist_ckpt, run_cli,
                                                                                   quick_timing, monkeypatch):
    timed = []
    compare = sweep_module.compare_runtime

    def recorded(*args, **kwargs):
        timed.append(kwargs["max_seconds"])
        return compare(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "compare_runtime", recorded)
    args = ["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd", *CONV2, "--keep", "0.5,0.25", "--measure-latency",
            "--threads", "1", "-b", "8", *CPU, "-o", tmp_path / "sw.json", "--json"]
    assert run_cli(args).data["computed"] == 2 and timed == [20.0, 20.0]
    assert run_cli([*args, "--seconds", "3"]).data["computed"] == 2 and timed[2:] == [3.0, 3.0]
    assert run_cli([*args, "--seconds", "3"]).data["computed"] == 0 and len(timed) == 4


@pytest.mark.parametrize("args, message", [
    (["--latency", "0.5"], "--latency needs --profile"),
    (["--keep", "0.5", "--cost", "latency"], "--cost latency ranks points by their measured latency"),
    (["--keep", "0.5", "--cost", "params"], "--cost must be one of macs, latency"),
    (["--keep", "0.5", "--refit"], "need --train-data"),
    (["--keep", "0.5", "--finetune-epochs", "1"], "need --train-data"),
    (["--keep", "0.5", "--refit-samples", "8"], "--refit-samples is a positive number of samples for --refit"),
    (["--keep", "0.5", "--finetune-epochs", "-1"], "--finetune-epochs must be 0 or more"),
    (["--keep", "0.5", "--plot", "f.htm"], "--plot writes .png, .svg or .html"),
    (["--keep", "0.5", "--threads", "1"], "add --measure-latency"),
    (["--keep", "0.5", "--seconds", "5"], "add --measure-latency"),
    (["--keep", "0.5", "--measure-latency", "--seconds", "0"], "--seconds must be a positive number"),
    (["--keep", "0.5", "--measure-latency", "--threads", "0"], "--threads must be at least 1"),
])
def test_sweep_refusals_of_the_new_options(tmp_path, mnist_ckpt, run_cli, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_module, "project", lambda *a, **k: pytest.fail("projected before refusing"))
    result = run_cli(["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd", *args, *CPU, "-o", "sw.json"],
                     fails=True)
    assert message in result.message
    assert not (tmp_path / "sw.json").exists()


def test_refit_takes_unlabelled_training_data_and_finetuning_refuses_it(tmp_path, mnist_ckpt, run_cli):
    train = digits_npz(tmp_path / "unlabelled.npz", 16, labels=False)
    args = ["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd", *CONV2, "--keep", "0.5", "--train-data", train,
            *CPU, "-o", tmp_path / "sw.json"]
    assert run_cli([*args, "--refit", "--json"]).data["points"][0]["refit"]["samples"] == 16
    message = run_cli([*args, "--finetune-epochs", "1"], fails=True).message
    assert message == ("error: the training data has unlabelled samples; --finetune-epochs trains on labels "
                       "(--refit alone needs none)")


def test_html_plot_is_one_valid_self_contained_page(tmp_path, mnist_ckpt, run_cli):
    """The page parses as XML, holds the frontier as an inline <svg> and one table row per point (Pareto rows
    marked), and refers to nothing outside itself."""
    page = tmp_path / "sweep.html"
    data = run_cli(["sweep", mnist_ckpt, "--data", DATA, "--methods", "svd,random", *CONV2, "--keep", "0.5,0.25,0.125",
                    *CPU, "-o", tmp_path / "sw.json", "--plot", page, "--json"]).data
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    root = ElementTree.fromstring(text)  # well-formed: every tag closed, the SVG included
    svg = "{http://www.w3.org/2000/svg}svg"
    body = root.find("body")
    assert [child.tag for child in body if child.tag in (svg, "table")] == [svg, "table"]
    rows = body.find("table").find("tbody").findall("tr")
    assert len(rows) == len(data["points"]) == 6
    shown = {(r[0].text, r[1].text): r.get("class") == "pareto" for r in rows}
    assert shown == {(label(p), f"keep {p['fraction']:g}"): p["pareto"] for p in data["points"]}
    assert any(shown.values())
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        assert tag not in ("script", "link", "img", "iframe", "object"), tag
        for name, value in element.attrib.items():
            if name.endswith("href") or name == "src":
                assert value.startswith("#"), (tag, name, value)
    assert "url(http" not in text and "@import" not in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_info_marks_the_chosen_ranks_on_the_spectra(tmp_path, mnist_ckpt, run_cli, monkeypatch):
    """info S.npz --plot --checkpoint P: a diamond per cut layer at (its rank, the variance dropped there), as
    the drawn curve says; a checkpoint not projected with these statistics is refused in one line."""
    stats, projected = tmp_path / "s.npz", tmp_path / "p.safetensors"
    run_cli(["stats", mnist_ckpt, "--data", DATA, *CPU, "-o", stats, "-q"])
    run_cli(["project", mnist_ckpt, "--stats", stats, "--layers", "conv2,fc1", "--keep", "0.25", "-o", projected,
             "-q"])
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.append(figure))
    run_cli(["info", stats, "--plot", tmp_path / "spectra.png", "--checkpoint", projected, "-q"])
    right = drawn[0].axes[1]
    curves = {line.get_label(): dict(zip(line.get_xdata(), line.get_ydata())) for line in right.get_lines()}
    marks = [c for c in right.collections if c.get_label() == "chosen rank"]
    assert len(marks) == 1
    assert sorted(map(tuple, marks[0].get_offsets().tolist())) == sorted(
        [(16.0, curves["conv2"][16]), (32.0, curves["fc1"][32])])  # conv1 is whole: no mark
    other = tmp_path / "other.safetensors"
    run_cli(["project", mnist_ckpt, "--method", "svd", "--keep", "0.25", "-o", other, "-q"])
    for checkpoint in (other, mnist_ckpt):
        message = run_cli(["info", stats, "--plot", tmp_path / "s2.png", "--checkpoint", checkpoint],
                          fails=True).message
        assert "was not projected with" in message
    assert not (tmp_path / "s2.png").exists()
    assert "give S.npz and --plot" in run_cli(["info", stats, "--checkpoint", projected], fails=True).message


def test_channels_latency_points_are_what_project_with_the_chain_profile_gives(tmp_path, mnist_ckpt, run_cli):
    """A channels point of a --latency budget is project --structure channels --latency --profile, bit for bit."""
    stats = tmp_path / "c.npz"
    run_cli(["stats", mnist_ckpt, "--data", DATA, "--structure", "channels", "-o", stats, "-q"])
    profile = hand_chain_profile(mnist_ckpt, tmp_path, 14.0)
    data = run_cli(["sweep", mnist_ckpt, "--stats", stats, "--data", DATA, "--structures", "channels", "--latency",
                    "0.5", "--profile", profile, "--keep-dir", tmp_path / "kept", *CPU, "-o", tmp_path / "sw.json",
                    "--json"]).data
    assert [(p["structure"], p["kind"], p["fraction"]) for p in data["points"]] == [("channels", "latency", 0.5)]
    out = tmp_path / "p.safetensors"
    run_cli(["project", mnist_ckpt, "--stats", stats, "--structure", "channels", "--latency", "0.5", "--profile",
             profile, "-o", out, "-q"])
    assert _tensors(out) == _tensors(data["points"][0]["checkpoint"])
