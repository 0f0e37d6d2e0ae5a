"""``rankcut project``: repeated projection, methods and the statistics they need, budgets, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_helpers import invoke
from torch import nn

from rankcut.compress.methods import METHODS
from rankcut.files.checkpoint import load_with_meta, save
from rankcut.model.cost import count_macs
from rankcut.model.edits import get_module
from rankcut.model.layers import LowRank


def test_cli_iterative_projection_composes(tmp_path, mnist_ckpt, run_cli):
    current, ranks = mnist_ckpt, []
    for step in range(3):
        stats = tmp_path / f"s{step}.npz"
        out = tmp_path / f"p{step}.safetensors"
        run_cli(["stats", current, "--data", "synthetic:64", "-o", stats, "--quiet"])
        report = run_cli(["project", current, "--stats", stats, "--keep", "0.9", "-o", out, "--json"]).data
        assert report["totals"]["macs_after"] < report["totals"]["macs_before"]
        model, meta = load_with_meta(out)
        pair = get_module(model, "fc1")
        assert isinstance(pair, LowRank) and isinstance(pair.down, nn.Linear) and isinstance(pair.up, nn.Linear)
        ranks.append(pair.rank)
        current = out
    assert ranks == [115, 104, 94]
    assert isinstance(get_module(model, "conv2"), nn.Conv2d)  # rank 58 of 64 would not save MACs
    assert [e.kind for e in meta.edits] == ["low_rank"] * 3
    assert [h["command"] for h in meta.history] == ["init", "project", "project", "project"]


@pytest.mark.parametrize("args,message", [
    (["--keep", "1.5"], "--keep must be in (0, 1]"),
    (["--keep", "0"], "--keep must be in (0, 1]"),
    (["--keep", "0.5", "--layers", "nope*"], "matches no layer"),
    (["--keep", "0.5", "--method", "magic"], "unknown method"),
])
def test_cli_project_rejects_bad_input(tmp_path, mnist_ckpt, run_cli, args, message):
    stats = tmp_path / "s.npz"
    run_cli(["stats", mnist_ckpt, "--data", "synthetic:8", "--layers", "conv*", "-o", stats])
    out = tmp_path / "out.safetensors"
    r = run_cli(["project", mnist_ckpt, "--stats", stats, *args, "-o", out], fails=True)
    assert message in r.message and not out.exists()


def test_cli_project_refuses_stats_of_another_checkpoint(tmp_path, mnist_ckpt, run_cli):
    other = tmp_path / "other.safetensors"
    run_cli(["init", "--arch", "rankcut:mnist-cnn", "--seed", "1", "-o", other])
    stats = tmp_path / "s.npz"
    run_cli(["stats", other, "--data", "synthetic:8", "-o", stats])
    out = tmp_path / "out.safetensors"
    r = run_cli(["project", mnist_ckpt, "--stats", stats, "--keep", "0.5", "-o", out], fails=True)
    assert "another checkpoint" in r.message and not out.exists()


def test_cli_project_refuses_layers_missing_from_stats(tmp_path, mnist_ckpt, run_cli):
    stats = tmp_path / "s.npz"
    run_cli(["stats", mnist_ckpt, "--data", "synthetic:8", "--layers", "conv*", "-o", stats])
    out = tmp_path / "out.safetensors"
    r = run_cli(["project", mnist_ckpt, "--stats", stats, "--keep", "0.5", "--layers", "fc1", "-o", out], fails=True)
    assert "matches no layer in" in r.message and not out.exists()


@pytest.mark.parametrize("method", ["hessian", "fisher"])
def test_loss_aware_methods_need_gradient_statistics(tmp_path, mnist_ckpt, run_cli, method):
    stats = tmp_path / "s.npz"
    run_cli(["stats", mnist_ckpt, "--data", "synthetic:8", "-o", stats])
    out = tmp_path / "out.safetensors"
    r = run_cli(["project", mnist_ckpt, "--stats", stats, "--method", method, "--keep", "0.5", "-o", out], fails=True)
    assert "rerun rankcut stats with --grad kl" in r.message and not out.exists()


def test_cli_grad_statistics_feed_every_method(tmp_path, mnist_ckpt, run_cli):
    stats = tmp_path / "g.npz"
    data = run_cli(["stats", mnist_ckpt, "--data", "synthetic:16", "--grad", "mse", "--probes", "2", "-o", stats,
                    "--json"]).data
    assert data["loss"] == "mse" and data["probes"] == 2
    for method in sorted(METHODS):
        out = tmp_path / f"{method}.safetensors"
        report = run_cli(["project", mnist_ckpt, "--stats", stats, "--method", method, "--keep", "0.25", "-o", out,
                          "--json"]).data
        projected = [r for r in report["layers"] if r["status"] == "projected"]
        assert [r["layer"] for r in projected] == ["conv2", "fc1"]
        assert all((r["predicted_loss"] is None) == (method == "random") for r in projected)


@pytest.fixture(scope="module")
def mnist_files(tmp_path_factory):
    """A random rankcut:mnist-cnn checkpoint and its statistics on synthetic data (made once)."""
    folder = tmp_path_factory.mktemp("budget")
    ckpt, stats = folder / "mnist.safetensors", folder / "s.npz"
    for args in (["init", "--arch", "rankcut:mnist-cnn", "-o", ckpt],
                 ["stats", ckpt, "--data", "synthetic:32", "-o", stats, "--quiet"]):
        assert invoke(*args).exit_code == 0
    return ckpt, stats


@pytest.mark.parametrize("args,message", [
    (["--keep", "0.5", "--macs", "0.5"], "--keep and --macs are alternatives"),
    (["--keep", "0.5", "--params", "0.5"], "--keep and --params are alternatives"),
    (["--macs", "0.5", "--params", "0.5"], "not both"),
    (["--macs", "0"], "--macs must be in (0, 1), got 0"),
    (["--macs", "1.2"], "--macs must be in (0, 1), got 1.2"),
    (["--params", "1"], "--params must be in (0, 1)"),
    (["--macs", "0.005"], "below what rank 1 in every selected layer can reach"),
    (["--params", "0.001"], "below what rank 1 in every selected layer can reach"),
    (["--macs", "0.5", "--method", "random"], "random predicts no loss"),
    ([], "say how much to keep"),
])
def test_cli_budget_errors(tmp_path, mnist_files, run_cli, args, message):
    ckpt, stats = mnist_files
    out = tmp_path / "out.safetensors"
    r = run_cli(["project", ckpt, "--stats", stats, *args, "-o", out], fails=True)
    assert message in r.message and not out.exists()


def test_cli_budget_report_and_repeat(tmp_path, mnist_files, run_cli):
    ckpt, stats = mnist_files
    current, sizes = ckpt, []
    for step, (kind, fraction) in enumerate([("macs", 0.3), ("params", 0.6), ("macs", 0.5)]):
        if step:
            stats = tmp_path / f"s{step}.npz"
            run_cli(["stats", current, "--data", "synthetic:32", "-o", stats, "--quiet"])
        out = tmp_path / f"p{step}.safetensors"
        data = run_cli(["project", current, "--stats", stats, f"--{kind}", fraction, "-o", out, "--json"]).data
        budget, totals = data["budget"], data["totals"]
        before = totals[f"{kind}_before"]
        assert budget["target"] == int(fraction * before) and budget["achieved"] == totals[f"{kind}_after"]
        assert budget["achieved"] <= budget["target"] and budget["loss_units"] == "variance fraction"
        assert (budget["achieved"] >= 0.98 * budget["target"]) == (budget["note"] is None)
        if step == 0:
            assert budget["note"] is None
        if step == 1:  # fc1 holds most parameters: one rank of it costs 9,345 of a 217,324 budget
            assert "the cheapest step that lowers the predicted loss (fc1 to rank" in budget["note"]
        rows = data["layers"]
        assert [r["layer"] for r in rows] == ["conv1", "conv2", "fc1"]
        assert all(r["budget_loss"] >= 0 and r["new_rank"] <= r["old_rank"] for r in rows)
        assert sum(r["macs_after"] - r["macs_before"] for r in rows) == totals["macs_after"] - totals["macs_before"]
        model, meta = load_with_meta(out)
        assert meta.history[-1][kind] == fraction and count_macs(model, meta.input)[0] == totals["macs_after"]
        sizes.append(totals[f"{kind}_after"])
        current = out
    table = run_cli(["project", ckpt, "--stats", mnist_files[1], "--macs", "0.4", "-o", tmp_path / "t.safetensors"])
    assert "budget loss" in table.stdout and "macs budget 40.00%" in table.stdout


def _logits(path, x):
    with torch.no_grad():
        return load_with_meta(path)[0](x).double()


def test_cli_fisher_damping_reaches_the_method(tmp_path, small_files, run_cli):
    """A huge --damping makes G a multiple of I, where fisher's pair is pca's; the default damping is not."""
    common = ["--stats", small_files["grad"], "--keep", "0.5"]
    outs = {name: tmp_path / f"{name}.safetensors" for name in ("pca", "huge", "default")}
    run_cli(["project", small_files["ckpt"], *common, "--method", "pca", "-o", outs["pca"], "--quiet"])
    run_cli(["project", small_files["ckpt"], *common, "--method", "fisher", "--damping", "1e12", "-o", outs["huge"],
             "--quiet"])
    run_cli(["project", small_files["ckpt"], *common, "--method", "fisher", "-o", outs["default"], "--quiet"])
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    pca, huge, default = (_logits(outs[n], x) for n in ("pca", "huge", "default"))
    assert (huge - pca).norm() / pca.norm() < 1e-5
    assert (default - pca).norm() / pca.norm() > 1e-3


def test_cli_fisher_without_damping_on_a_singular_g_is_one_clear_line(tmp_path, mnist_ckpt, run_cli):
    """Half of fc1's units are dead (ReLU of a negative constant): no gradient reaches them, G is singular."""
    model, meta = load_with_meta(mnist_ckpt)
    with torch.no_grad():
        model.fc1.weight[:64] = 0
        model.fc1.bias[:64] = -1.0
    dead, stats, out = tmp_path / "dead.safetensors", tmp_path / "g.npz", tmp_path / "p.safetensors"
    save(model, meta, dead)
    run_cli(["stats", dead, "--data", "synthetic:16", "--grad", "kl", "--layers", "fc1", "--device", "cpu", "-o",
             stats, "--quiet"])
    line = run_cli(["project", dead, "--stats", stats, "--method", "fisher", "--damping", "0", "--keep", "0.5",
                    "-o", out], fails=True).message
    assert line == ("error: --method fisher gave a non-finite basis for layer fc1: its output-gradient covariance G "
                    "is singular and --damping 0 cannot invert it; use --damping > 0 (default 0.001); nothing written")
    assert not out.exists()
    run_cli(["project", dead, "--stats", stats, "--method", "fisher", "--keep", "0.5", "-o", out, "--quiet"])
    assert all(torch.isfinite(p).all() for p in load_with_meta(out)[0].parameters())


def test_cli_auto_structure_within_budget_rounded_and_shown_by_info(tmp_path, mnist_ckpt, run_cli):
    """project --structure auto: the budget holds, channel widths are multiples of --round-channels, and info
    shows every layer's chosen structure and width; --keep and other methods are refused in one line."""
    data, stats, out = tmp_path / "x.npz", tmp_path / "s.npz", tmp_path / "auto.safetensors"
    np.savez(data, x=torch.rand(48, 1, 28, 28, generator=torch.Generator().manual_seed(0)).numpy())
    run_cli(["stats", mnist_ckpt, "--data", data, "--grad", "kl", "--structure", "channels", "-o", stats, "-q"])
    result = run_cli(["project", mnist_ckpt, "--stats", stats, "--structure", "auto", "--method", "fisher",
                      "--macs", "0.3", "--round-channels", "4", "-o", out, "--json"]).data
    assert result["totals"]["macs_after"] <= 0.3 * result["totals"]["macs_before"]
    chosen = {r["layer"]: r for r in result["layers"]}
    assert {r["structure"] for r in chosen.values()} - {"whole"}, "auto changed nothing at 30% of the MACs"
    assert all(r["size"] % 4 == 0 for r in chosen.values() if r["structure"] == "channels")
    assert "fc1" in result["refused"] and "fc2" in result["refused"]["fc1"]  # its consumer is the output layer
    info = {r["name"]: r for r in run_cli(["info", out, "--json"]).data["layers"]}
    for name, r in chosen.items():
        assert info[name]["structure"] == r["structure"], name
        width = {"pair": info[name]["rank"], "channels": info[name]["width"], "whole": info[name]["width"]}
        assert width[r["structure"]] == r["size"], name
    for args, message in ((["--keep", "0.5"], "under a budget"), (["--macs", "0.5", "--method", "pca"], "--method fisher")):
        failed = run_cli(["project", mnist_ckpt, "--stats", stats, "--structure", "auto", *args, "-o",
                          tmp_path / "x.safetensors"], fails=True)
        assert message in failed.message


def test_cli_sequential_meets_the_same_budget_with_other_bases_and_records_it(small_files, tmp_path, run_cli):
    """--macs: the ranks come from --stats as without --sequential (same cost); the bases are measured again."""
    plain, sequential = tmp_path / "plain.safetensors", tmp_path / "seq.safetensors"
    budget = ["--stats", small_files["stats"], "--macs", "0.3"]
    a = run_cli(["project", small_files["ckpt"], *budget, "-o", plain, "--json"]).data
    b = run_cli(["project", small_files["ckpt"], *budget, "--sequential", "--data", "synthetic:32", "--device", "cpu",
                 "-o", sequential, "--json"]).data
    assert [(r["layer"], r["new_rank"]) for r in a["layers"]] == [(r["layer"], r["new_rank"]) for r in b["layers"]]
    assert a["totals"]["macs_after"] == b["totals"]["macs_after"]
    first, second = load_with_meta(plain), load_with_meta(sequential)
    assert first[1].edits == second[1].edits
    changed = [k for k, v in first[0].state_dict().items() if not torch.equal(v, second[0].state_dict()[k])]
    assert changed, "the bases after the first projected layer are measured on its output"
    history = second[1].history[-1]
    assert history["sequential"] is True and history["data"] == "synthetic:32" and history["samples"] == 32


@pytest.mark.parametrize("args,message", [
    (["--sequential"], "--sequential needs --data"),
    (["--data", "synthetic:8"], "--data is read only with --sequential"),
    (["--sequential", "--data", "synthetic:8", "--structure", "channels"], "--structure channels is not supported"),
    (["--sequential", "--data", "synthetic:8", "-b", "0"], "--batch-size"),
    (["--sequential", "--data", "synthetic:8", "--calibrate", "1"], "does not combine with --sequential"),
])
def test_cli_sequential_refusals(small_files, tmp_path, run_cli, args, message):
    out = tmp_path / "out.safetensors"
    r = run_cli(["project", small_files["ckpt"], "--stats", small_files["stats"], "--keep", "0.5", *args, "-o", out],
                fails=True)
    assert message in r.message and not out.exists()
