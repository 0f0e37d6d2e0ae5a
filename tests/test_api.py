"""The Python API (``rankcut.api``): the CLI's own core, so a Python caller gets exactly what the CLI writes."""

from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import rankcut
from cli_helpers import rankcut as cli
from rankcut.errors import RankcutError
from rankcut.files.fileio import file_digest
from rankcut.files.statsfile import load_stats, save_stats

DATA = "synthetic:96"


def _tensors(path: Path) -> dict[str, bytes]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def _meta_without_times(path: Path) -> dict:
    meta = rankcut.read_meta(path)
    return {"edits": meta.edits, "input": meta.input, "arch": meta.arch,
            "history": [{k: v for k, v in h.items() if k != "time"} for h in meta.history]}


@pytest.fixture
def trained(tmp_path) -> Path:
    """mnist-cnn after a few steps on synthetic data, so ranks and losses are not degenerate."""
    path = tmp_path / "base.safetensors"
    cli("init", "--arch", "rankcut:mnist-cnn", "-o", path)
    cli("finetune", path, "--data", DATA, "--epochs", "1", "-b", "32", "--device", "cpu", "-o", path, "--force")
    return path


@pytest.mark.parametrize("how", [["--keep", "0.5"], ["--macs", "0.4"], ["--params", "0.3", "--method", "fisher"]])
def test_api_steps_write_what_the_cli_writes(trained, tmp_path, how):
    """stats -> project -> eval through the API equal the CLI's files bit for bit (tensors; metadata but times)."""
    stats_cli, out_cli = tmp_path / "cli.npz", tmp_path / "cli.safetensors"
    cli("stats", trained, "--data", DATA, "--grad", "kl", "--device", "cpu", "-o", stats_cli)
    projected = cli("project", trained, "--stats", stats_cli, *how, "-o", out_cli, "--json")
    evaluated = cli("eval", out_cli, "--data", DATA, "--reference", trained, "--device", "cpu", "--json")["results"][0]

    model, meta = rankcut.load_with_meta(trained)
    data = rankcut.open_data(DATA, meta.input)
    stats = rankcut.collect_stats(model, meta.input, data, rankcut.StatsConfig(grad="kl"),
                                  checkpoint=file_digest(trained), info={"data": DATA})
    save_stats(stats, tmp_path / "api.npz")
    a, b = np.load(stats_cli), np.load(tmp_path / "api.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        assert a[key].tobytes() == b[key].tobytes(), key

    options = dict(zip(how[::2], how[1::2]))
    budget = next((rankcut.Budget(k.strip("-"), float(options[k])) for k in ("--macs", "--params") if k in options),
                  None)
    config = rankcut.ProjectConfig(method=options.get("--method", "pca"), budget=budget,
                                   keep=float(options["--keep"]) if "--keep" in options else None)
    small = copy.deepcopy(model)
    result = rankcut.project(small, meta.input, load_stats(stats_cli), config)
    history = {**result.history(), "stats": file_digest(stats_cli)[:16]}
    rankcut.save(small, meta.with_edits(*result.edits).with_history("project", **history), tmp_path / "api.safetensors")
    assert _tensors(tmp_path / "api.safetensors") == _tensors(out_cli)
    assert _meta_without_times(tmp_path / "api.safetensors") == _meta_without_times(out_cli)
    assert json.loads(json.dumps(result.to_dict())) == {k: v for k, v in projected.items() if k not in ("output", "version")}

    figures = rankcut.evaluate([small], meta.input, data, 10, rankcut.EvalConfig(), reference=model)[0]
    for key in ("top1", "topk", "loss", "agreement", "kl", "macs", "params", "samples"):
        assert figures[key] == evaluated[key], key
    assert figures["ratios"] == evaluated["ratios"]


@pytest.mark.parametrize("make, message", [
    (lambda: rankcut.ProjectConfig(method="nope", keep=0.5), "unknown method 'nope'"),
    (lambda: rankcut.ProjectConfig(method="pca"), "say how much to keep"),
    (lambda: rankcut.ProjectConfig(keep=0.5, budget=rankcut.Budget("macs", 0.5)), "alternatives"),
    (lambda: rankcut.ProjectConfig(keep=1.5), "--keep must be in (0, 1]"),
    (lambda: rankcut.ProjectConfig(method="random", budget=rankcut.Budget("macs", 0.5)), "predicts no loss"),
    (lambda: rankcut.ProjectConfig(method="pca", keep=0.5, damping=0.1), "--damping is an option of --method fisher"),
    (lambda: rankcut.ProjectConfig(method="fisher", keep=0.5, damping=-1.0), "non-negative"),
    (lambda: rankcut.Budget("flops", 0.5), "unknown budget kind"),
    (lambda: rankcut.Budget("macs", 1.0), "--macs must be in (0, 1)"),
    (lambda: rankcut.StatsConfig(grad="l2"), "--grad must be one of kl, mse"),
    (lambda: rankcut.StatsConfig(probes=0), "--probes must be at least 1"),
    (lambda: rankcut.EvalConfig(batch_size=0), "--batch-size must be at least 1"),
    (lambda: rankcut.EvalConfig(latency=True, threads=0), "--threads must be at least 1"),
    (lambda: rankcut.EvalConfig(latency=True, runtime="tvm"), "unknown runtime 'tvm'"),
    (lambda: rankcut.EvalConfig(latency=True, seconds=0.0), "--seconds must be a positive number"),
    (lambda: rankcut.EvalConfig(latency=True, seconds=float("nan")), "--seconds must be a positive number"),
])
def test_configs_validate_themselves(make, message):
    with pytest.raises(RankcutError, match=re.escape(message)):
        make()


def test_the_method_registry_drives_the_help_and_the_budget_errors(run_cli):
    """Every registered method is offered by --method, and each budgetable one names its loss currency."""
    from rankcut.compress.methods import METHODS

    text = re.sub(r"[│\s]+", " ", run_cli(["project", "--help"], env={"COLUMNS": "400"}).stdout)
    for m in METHODS.values():
        assert f"{m.name}: {m.summary}" in text
        if m.budget:
            assert f"{m.name}: {m.budget_units}" in text


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python section, run as written (on an untrained model, so only that it works)."""
    blocks = re.findall(r"```python\n(.*?)```", Path(__file__).parents[1].joinpath("README.md").read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    Path("rankcut-mnist").mkdir()
    cli("init", "--arch", "rankcut:mnist-cnn", "-o", "rankcut-mnist/trained.safetensors")
    for block in blocks[:2]:
        exec(compile(block, "README.md", "exec"), {})
    assert rankcut.read_meta("rankcut-mnist/budget.safetensors").edits


def test_info_on_a_huge_recorded_input_counts_macs_without_running_the_model(tmp_path, monkeypatch):
    """3x4096x4096 input: the real forward pass would need GiBs of activations; MACs come from fake tensors."""
    path = tmp_path / "wide.safetensors"
    cli("init", "--arch", "rankcut:small-resnet", "--kwargs", '{"in_channels": 3}', "--input", "3,4096,4096",
        "-o", path)

    def no_real_convolution(*args, **kwargs):
        raise AssertionError("a real convolution ran")

    real = torch.nn.functional.conv2d

    def guarded(x, *args, **kwargs):
        if not isinstance(x, torch._subclasses.fake_tensor.FakeTensor):
            no_real_convolution()
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", guarded)
    start = time.perf_counter()
    info = cli("info", path, "--json")
    assert time.perf_counter() - start < 5
    assert info["input"]["shape"] == [3, 4096, 4096] and info["macs"] > 1e9


def test_stats_metadata_cannot_shadow_the_fields_info_reports(tmp_path, mnist_ckpt):
    """Extra keys in a statistics file's metadata (written by anyone) never replace the real fields."""
    path = tmp_path / "s.npz"
    cli("stats", mnist_ckpt, "--data", "synthetic:8", "--device", "cpu", "-o", path)
    arrays = dict(np.load(path))
    meta = json.loads(str(arrays["__meta__"][0]))
    arrays["__meta__"] = np.array([json.dumps({"file": "forged", "output": "forged", **meta})])
    np.savez(path, **arrays)
    stats = load_stats(path)
    info = cli("info", path, "--json")
    assert info["samples"] == 8 and info["checkpoint"] == file_digest(mnist_ckpt) and info["file"] == str(path)
    assert [r["layer"] for r in info["layers"]] == list(stats.layers)


def test_python_dash_m_rankcut_runs_the_cli():
    run = subprocess.run([sys.executable, "-m", "rankcut", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "stats" in run.stdout and "project" in run.stdout


LAYERS = {"errors": 0, "dist": 0, "model": 1, "stats": 2, "files": 3, "compress": 4, "run": 5, "api": 6, "cli": 7}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if parts[0] == "rankcut" and len(parts) > 1 else None


def test_imports_only_point_down_the_layers():
    """errors/dist < model < stats < files < compress < run < api < cli: no module imports one above it."""
    root = Path(rankcut.__file__).parent
    wrong = []
    for path in root.rglob("*.py"):
        module = "rankcut." + ".".join(path.relative_to(root).with_suffix("").parts)
        own = _layer(module)
        if own is None:  # the package's lazy __init__ and __main__ sit on top
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                target = _layer(name)
                if target is not None and target > own:
                    wrong.append(f"{module} imports {name}")
    assert wrong == []


def test_a_sweep_config_names_each_point_once_in_order():
    config = rankcut.SweepConfig(methods=("pca", "fisher", "pca"), structures=("pair", "channels"),
                                 budgets=(("macs", 0.5), ("macs", 0.25), ("macs", 0.5), ("keep", 0.5)))
    keys = [key for key, _ in config.configs()]
    assert keys == [("pair", "pca", "macs", 0.5, None), ("pair", "pca", "macs", 0.25, None),
                    ("pair", "pca", "keep", 0.5, None), ("pair", "fisher", "macs", 0.5, None),
                    ("pair", "fisher", "macs", 0.25, None), ("pair", "fisher", "keep", 0.5, None),
                    ("channels", None, "macs", 0.5, None), ("channels", None, "macs", 0.25, None),
                    ("channels", None, "keep", 0.5, None)]
    project = dict(config.configs())
    assert project[("pair", "fisher", "macs", 0.25, None)].budget.fraction == 0.25
    assert project[("channels", None, "keep", 0.5, None)].structure == "channels"


def test_a_per_layer_sweep_config_takes_each_layer_alone():
    config = rankcut.SweepConfig(methods=("pca",), structures=("pair", "channels"), per_layer=True,
                                 exclude=("fc*",))
    assert config.budgets == (("keep", 0.75), ("keep", 0.5), ("keep", 0.25))  # the default fractions
    configs = config.configs({"pair": ["conv1", "fc1"], "channels": ["conv1"]})
    assert [key for key, _ in configs][:4] == [("pair", "pca", "keep", 0.75, "conv1"), ("pair", "pca", "keep", 0.5, "conv1"),
                                               ("pair", "pca", "keep", 0.25, "conv1"), ("pair", "pca", "keep", 0.75, "fc1")]
    assert len(configs) == 9
    one = dict(configs)[("channels", None, "keep", 0.5, "conv1")]
    assert (one.layers, one.exclude, one.keep, one.structure) == (("conv1",), None, 0.5, "channels")


@pytest.mark.parametrize("make, message", [
    (lambda: rankcut.SweepConfig(budgets=()), "say which budgets to sweep"),
    (lambda: rankcut.SweepConfig(budgets=(("flops", 0.5),)), "a sweep budget is one of keep, macs, params, latency"),
    (lambda: rankcut.SweepConfig(budgets=(("keep", 0.5),), cost="latency"), "add --measure-latency"),
    (lambda: rankcut.SweepConfig(methods=("random",), budgets=(("params", 0.5),)), "predicts no loss"),
    (lambda: rankcut.SweepConfig(structures=(), budgets=(("keep", 0.5),)), "--structures names no structure"),
    (lambda: rankcut.SweepConfig(budgets=(("keep", 0.5),), within=-0.5), "--within must be 0 or more"),
    (lambda: rankcut.SweepConfig(budgets=(("keep", 0.5),), damping=0.1), "--damping is an option of --method fisher"),
    (lambda: rankcut.SweepConfig(budgets=(("macs", 0.5),), per_layer=True), "--per-layer keeps each layer alone"),
])
def test_sweep_configs_validate_themselves(make, message):
    with pytest.raises(RankcutError, match=re.escape(message)):
        make()

