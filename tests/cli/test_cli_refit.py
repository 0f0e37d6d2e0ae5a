"""``rankcut refit``: writes a loadable checkpoint with the same structure and a history entry; lowers every
refitted layer's error; writes nothing on bad input."""

from __future__ import annotations

from cli_helpers import rankcut

from rankcut.files.checkpoint import load_with_meta, read_meta

CPU = ["--device", "cpu"]


def test_refit_writes_the_same_structure_with_lower_errors(small_files, tmp_path):
    small, out = tmp_path / "small.safetensors", tmp_path / "refit.safetensors"
    rankcut("project", small_files["ckpt"], "-s", small_files["stats"], "--keep", "0.5", "-o", small, "-q")
    data = rankcut("refit", small, "--teacher", small_files["ckpt"], "-d", "synthetic:32", *CPU, "-o", out,
                   "--json")
    assert data["output"] == str(out) and data["samples"] == 32
    rows = data["layers"]
    assert rows and all(r["kind"] == "pair" for r in rows)
    assert all(r["error_after"] <= r["error_before"] for r in rows)
    assert any(r["status"] == "refit" and r["error_after"] < r["error_before"] for r in rows)
    before, _ = load_with_meta(small)
    after, meta = load_with_meta(out)
    assert {k: v.shape for k, v in before.state_dict().items()} == {k: v.shape for k, v in after.state_dict().items()}
    assert meta.edits == read_meta(small).edits
    assert meta.history[-1]["command"] == "refit" and meta.history[-1]["samples"] == 32


def test_refit_writes_nothing_on_bad_input(small_files, mnist_ckpt, tmp_path):
    small, out = tmp_path / "small.safetensors", tmp_path / "out.safetensors"
    rankcut("project", small_files["ckpt"], "-s", small_files["stats"], "--keep", "0.5", "-o", small, "-q")
    base = ["refit", small, "-d", "synthetic:8", *CPU, "-o", out]
    assert "--teacher" in rankcut(*base, fails=True)
    assert "compressed from" in rankcut(*base, "--teacher", mnist_ckpt, fails=True)
    assert "--damping" in rankcut(*base, "--teacher", small_files["ckpt"], "--damping", "-1", fails=True)
    assert "--samples" in rankcut(*base, "--teacher", small_files["ckpt"], "-n", "0", fails=True)
    assert "--rounds" in rankcut(*base, "--teacher", small_files["ckpt"], "--rounds", "0", fails=True)
    assert "--positions" in rankcut(*base, "--teacher", small_files["ckpt"], "--positions", "0", fails=True)
    assert not out.exists()
