"""``rankcut sweep``: its points are what separate ``project`` + ``eval`` give; the JSON is a cache; plots; refusals."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from builders import logits_of
from cli_helpers import run
from safetensors import safe_open

import rankcut
import rankcut.api as sweep_module
from rankcut.files.checkpoint import load_with_meta
from rankcut.run.data import open_data

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
    ("f.jpg", "--plot writes .png or .svg"),
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
