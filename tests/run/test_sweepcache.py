"""``run.sweepcache``: a sweep's JSON as its cache, for Python callers of ``api.sweep`` as for the CLI."""

from __future__ import annotations

import json

import pytest
from cli_helpers import rankcut as cli

import rankcut
from rankcut.errors import RankcutError, RankcutWarning


def test_a_python_sweep_reuses_its_cache_as_the_cli_does(tmp_path, mnist_ckpt):
    """api.sweep with a SweepCache: the file is written, a rerun computes nothing, one more budget computes one
    point, and another option (refit) recomputes every point; the CLI reuses the file the library wrote."""
    model, meta = rankcut.load_with_meta(mnist_ckpt)
    data = rankcut.open_data("synthetic:32", meta.input)
    out = tmp_path / "sweep.json"
    inputs = rankcut.file_inputs(mnist_ckpt, None, "synthetic:32", None, train_data="synthetic:32")
    cache = rankcut.SweepCache(out, inputs)

    def sweep(*fractions, **options):
        config = rankcut.SweepConfig(methods=("svd",), layers=("conv2",), eval=rankcut.EvalConfig(batch_size=16),
                                     budgets=tuple(("keep", f) for f in fractions), **options)
        result = rankcut.sweep(model, meta.input, None, data, 10, config, cache=cache, train_set=data)
        return result["computed"], result["reused"]

    assert sweep(0.5) == (1, 0)
    assert json.loads(out.read_text())["complete"] is True
    assert sweep(0.5) == (0, 1)
    assert sweep(0.5, 0.25) == (1, 1)
    with pytest.warns(RankcutWarning, match="refit"):
        assert sweep(0.5, 0.25, refit=True) == (2, 0)
    again = cli("sweep", mnist_ckpt, "--data", "synthetic:32", "--methods", "svd", "--layers", "conv2", "--keep",
                "0.5,0.25", "--refit", "--train-data", "synthetic:32", "-b", "16", "--device", "cpu", "-o", out,
                "--json")
    assert (again["computed"], again["reused"]) == (0, 2)


def test_a_keep_dir_needs_the_checkpoints_metadata_and_a_folder(tmp_path, mnist_ckpt):
    meta = rankcut.read_meta(mnist_ckpt)
    with pytest.raises(RankcutError, match="needs the swept checkpoint's metadata"):
        rankcut.SweepCache(tmp_path / "s.json", {}, keep_dir=tmp_path / "kept")
    (tmp_path / "file").write_text("")
    with pytest.raises(RankcutError, match="is not a folder"):
        rankcut.SweepCache(tmp_path / "s.json", {}, keep_dir=tmp_path / "file", meta=meta)
    with pytest.raises(RankcutError, match="folder does not exist"):
        rankcut.SweepCache(tmp_path / "s.json", {}, keep_dir=tmp_path / "no" / "kept", meta=meta)
