"""Damaged, hostile or mismatched statistics files through ``info`` and ``project``: one line, nothing run."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from builders import Payload
from hostile_cases import bad_statistics, stats_arrays, unchanged, write_npz

from rankcut.errors import RankcutError
from rankcut.files.safenpz import read_npz
from rankcut.files.statsfile import load_stats

CPU = ["--device", "cpu"]


def test_damaged_statistics_through_info_and_project(run_cli, small_files, tmp_path):
    before = unchanged(small_files, "ckpt", "stats")
    out = tmp_path / "out.safetensors"
    cases = bad_statistics(small_files, tmp_path)
    for case, (path, message, env) in cases.items():
        for args in (["info", path], ["project", small_files["ckpt"], "--stats", path, "--keep", "0.5", "-o", out]):
            line = run_cli(args, fails=True, env=env).message
            assert message in line, f"{case}: {line}"
            assert not out.exists()
    assert len(cases) >= 30
    assert unchanged(small_files, "ckpt", "stats") == before


@pytest.mark.parametrize("member", ["stem/m2", "__meta__"])
def test_pickled_object_in_statistics_is_refused_not_run(run_cli, small_files, tmp_path, member):
    marker = tmp_path / "PWNED"
    arrays, _ = stats_arrays(small_files["stats"])
    payload = np.empty(1, dtype=object)
    payload[0] = Payload(str(marker))
    evil = write_npz(tmp_path / "evil.npz", {**arrays, member: payload})
    for args in (["info", evil], ["project", small_files["ckpt"], "--stats", evil, "--keep", "0.5", "-o", tmp_path / "o.st"]):
        assert "refusing to unpickle" in run_cli(args, fails=True).message
    # The same file as data (stats, eval, finetune read x/y through the same reader).
    np.savez(tmp_path / "evil_data.npz", x=np.zeros((2, 28, 28), np.uint8), y=payload)
    for args in (["stats", small_files["ckpt"], "--data", tmp_path / "evil_data.npz", *CPU, "-o", tmp_path / "o.npz"],
                 ["eval", small_files["ckpt"], "--data", tmp_path / "evil_data.npz", *CPU]):
        assert "refusing to unpickle" in run_cli(args, fails=True).message
    with pytest.raises(RankcutError, match="refusing to unpickle"):
        load_stats(evil)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    np.load(evil, allow_pickle=True)[member]
    assert marker.exists()


def test_raw_pickle_member_is_not_unpickled(run_cli, small_files, tmp_path):
    import pickle

    marker = tmp_path / "PWNED"
    path = tmp_path / "raw.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("__meta__.npy", pickle.dumps(Payload(str(marker))))
    assert "not a readable .npz file" in run_cli(["info", path], fails=True).message
    assert not marker.exists()


def test_statistics_that_do_not_fit_the_checkpoint(run_cli, small_files, tmp_path):
    """Right digest, wrong layers: hand-edited files are refused before any projection."""
    arrays, meta = stats_arrays(small_files["stats"])
    out = tmp_path / "out.safetensors"

    def only(name: str, bn, channels: int, source: str = "stem", cut: int | None = None) -> Path:
        a = {"__meta__": arrays["__meta__"], f"{name}/count": arrays[f"{source}/count"],
             f"{name}/mean": arrays[f"{source}/mean"][:cut], f"{name}/m2": arrays[f"{source}/m2"][:cut, :cut]}
        return write_npz(tmp_path / f"{name}-{bn}-{channels}.npz", a,
                         {**meta, "layers": [{"name": name, "bn": bn, "channels": channels}]})

    cases = [(only("nope", None, 4), "layer 'nope' is not a target layer"),
             (only("bn", None, 4), "layer 'bn' is not a target layer"),
             (only("stem", "bn", 3, cut=3), "layer stem has 3 channels in the statistics, 4 in the model"),
             (only("stem", "layer1.bn1", 4), "layer stem was measured at layer1.bn1")]
    for path, message in cases:
        assert message in run_cli(["project", small_files["ckpt"], "--stats", path, "--keep", "0.5", "-o", out],
                                  fails=True).message
    assert not out.exists()
    other = tmp_path / "other.safetensors"
    run_cli(["init", "-a", "rankcut:small-resnet", "--kwargs", '{"width": 4}', "--seed", "1", "-o", other])
    assert "computed for another checkpoint" in run_cli(
        ["project", other, "--stats", small_files["stats"], "--keep", "0.5", "-o", out], fails=True).message


def test_good_statistics_still_load(small_files):
    assert read_npz(small_files["grad"])["stem/hessian"].shape == (4, 4)
    assert load_stats(small_files["grad"]).loss == "kl"
