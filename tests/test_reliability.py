"""Hostile and broken inputs through every command that reads them, numerical trouble, and data problems.

Every bad input must give exactly one ``error: ...`` line on stderr and a non-zero exit (the ``run_cli``
fixture checks that convention), never a traceback and never code execution. Checkpoint cases already
covered for ``init``/``info`` in test_bad_input.py are repeated here only for the other commands.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from rankcut.files.checkpoint import load, load_with_meta, save
from rankcut.cli import app
from rankcut.run.data import open_data
from rankcut.model.edits import get_module
from rankcut.errors import RankcutError
from rankcut.compress.project import project_model
from rankcut.files.safenpz import _default_cap, read_npz
from rankcut.files.statsfile import load_stats, numerical_rank, rank_warning
from rankcut.stats.collect import hooks
from rankcut.model.targets import Target

CPU = ["--device", "cpu"]


def cli(*args, env: dict | None = None):
    """Run the CLI in-process; return (exit code, stdout, stderr); an escaping exception is re-raised."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# --- shared files, made once per module -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny small-resnet checkpoint, its statistics (plain and with --grad), and a small data file."""
    root = tmp_path_factory.mktemp("reliability")
    f = {"ckpt": root / "sr.safetensors", "stats": root / "sr.npz", "grad": root / "srg.npz", "data": root / "d.npz",
         "root": root}
    assert cli("init", "-a", "rankcut:small-resnet", "--kwargs", '{"width": 4}', "-o", f["ckpt"])[0] == 0
    assert cli("stats", f["ckpt"], "--data", "synthetic:32", *CPU, "-o", f["stats"])[0] == 0
    assert cli("stats", f["ckpt"], "--data", "synthetic:32", "--grad", "kl", *CPU, "-o", f["grad"])[0] == 0
    g = np.random.default_rng(0)
    np.savez(f["data"], x=g.integers(0, 256, (6, 28, 28), dtype=np.uint8), y=g.integers(0, 10, 6))
    return f


def rewrite_checkpoint(src: Path, dst: Path, tensors: dict | None = None, **meta: str) -> Path:
    """A copy of ``src`` with some tensors and ``rankcut.*`` metadata entries replaced."""
    with safe_open(str(src), framework="pt") as f:
        md, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    md.update({f"rankcut.{k}": v for k, v in meta.items()})
    state.update(tensors or {})
    save_file(state, str(dst), metadata=md)
    return dst


def raw_safetensors(dst: Path, header: dict, payload: bytes) -> Path:
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + payload)
    return dst


def npz_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def stats_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    arrays = dict(np.load(path, allow_pickle=False))
    return arrays, json.loads(str(arrays["__meta__"][0]))


def write_npz(path: Path, arrays: dict, meta: dict | None = None) -> Path:
    arrays = dict(arrays)
    if meta is not None:
        arrays["__meta__"] = np.array([json.dumps(meta)])
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def unchanged(files: dict, *keys: str) -> dict[str, bytes]:
    return {k: files[k].read_bytes() for k in keys}


# --- 1. damaged checkpoints through stats, project, finetune, eval -------------------------------------------------

def _bad_checkpoints(files: dict) -> dict[str, tuple[Path, str]]:
    root, ckpt = files["root"] / "bad", files["ckpt"]
    root.mkdir(exist_ok=True)
    data = ckpt.read_bytes()
    with safe_open(str(ckpt), framework="pt") as f:
        md = f.metadata()
    cases = {
        "truncated": (data[: len(data) // 2], "not a readable safetensors file"),
        "random bytes": (os.urandom(3000), "not a readable safetensors file"),
        "empty": (b"", "not a readable safetensors file"),
        "huge header length": (struct.pack("<Q", 1 << 60) + b"{}", "not a readable safetensors file"),
    }
    out = {}
    for name, (content, message) in cases.items():
        path = root / f"{name.replace(' ', '_')}.safetensors"
        path.write_bytes(content)
        out[name] = (path, message)
    plain = root / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    out["no rankcut metadata"] = (plain, "not a rankcut checkpoint")
    w = files["root"] / "bad"
    out["garbled metadata"] = (rewrite_checkpoint(ckpt, w / "garbled.safetensors", input="{oops"), "damaged rankcut metadata")
    out["unknown edit"] = (rewrite_checkpoint(ckpt, w / "edit.safetensors", edits='[{"kind": "prune", "layer": "stem"}]'),
                           "unknown edit 'prune'")
    out["unknown architecture"] = (rewrite_checkpoint(ckpt, w / "arch.safetensors", arch="rankcut:gpt"),
                                   "unknown architecture")
    out["user code architecture"] = (rewrite_checkpoint(ckpt, w / "user.safetensors", arch="os:system"),
                                     "set RANKCUT_TRUST=os")
    out["edit contradicts tensors"] = (
        rewrite_checkpoint(ckpt, w / "contra.safetensors", edits='[{"kind": "low_rank", "layer": "layer2.conv1", "rank": 2}]'),
        "does not match its own description")
    out["huge declared shape"] = (
        raw_safetensors(w / "huge.safetensors", {"__metadata__": md, "stem.weight": {
            "dtype": "F32", "shape": [10 ** 12, 10 ** 6], "data_offsets": [0, 144]}}, b"\0" * 144),
        "not a readable safetensors file")
    out["NaN weights"] = (rewrite_checkpoint(ckpt, w / "nan.safetensors", {"layer1.conv1.weight": torch.full((4, 4, 3, 3), torch.nan)}),
                         "tensor layer1.conv1.weight holds NaN or Inf")
    out["Inf BatchNorm variance"] = (rewrite_checkpoint(ckpt, w / "inf.safetensors", {"bn.running_var": torch.full((4,), torch.inf)}),
                                     "tensor bn.running_var holds NaN or Inf")
    return out


COMMANDS = {
    "stats": lambda ck, f, out: ["stats", ck, "--data", "synthetic:8", *CPU, "-o", out],
    "project": lambda ck, f, out: ["project", ck, "--method", "svd", "--keep", "0.5", "-o", out],
    "project --stats": lambda ck, f, out: ["project", ck, "--stats", f["stats"], "--keep", "0.5", "-o", out],
    "finetune": lambda ck, f, out: ["finetune", ck, "--data", "synthetic:8", "-b", "4", *CPU, "-o", out],
    "finetune --teacher": lambda ck, f, out: ["finetune", f["ckpt"], "--teacher", ck, "--data", "synthetic:8", "-b", "4",
                                              *CPU, "-o", out],
    "eval": lambda ck, f, out: ["eval", ck, "--data", "synthetic:8", *CPU],
    "eval --reference": lambda ck, f, out: ["eval", f["ckpt"], "--reference", ck, "--data", "synthetic:8", *CPU],
}


def test_damaged_checkpoints_through_every_command(run_cli, files, tmp_path):
    """Each damaged checkpoint, as input (and as teacher/reference), in every command: one line, nothing written."""
    before = unchanged(files, "ckpt", "stats")
    tried = 0
    for case, (path, message) in _bad_checkpoints(files).items():
        for command, make in COMMANDS.items():
            out = tmp_path / "out.bin"
            line = run_cli(make(path, files, out), fails=True).message
            assert message in line, f"{case} / {command}: {line}"
            assert not out.exists() and list(tmp_path.iterdir()) == []
            tried += 1
    assert tried >= 70
    assert unchanged(files, "ckpt", "stats") == before


# --- 1. damaged statistics through info and project -----------------------------------------------------------------

class _Payload:
    """Unpickling this would run ``Path(marker).touch()``: a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _patch_central_sizes(path: Path, size: int) -> None:
    """Make every member of the zip at ``path`` declare ``size`` uncompressed bytes in the central directory."""
    data = bytearray(path.read_bytes())
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        struct.pack_into("<I", data, at + 24, size)  # uncompressed size field of a central directory entry
        at += 4
    path.write_bytes(bytes(data))


def _bad_stats(files: dict, root: Path) -> dict[str, tuple[Path, str, dict | None]]:
    """Damaged statistics files: name -> (path, expected message, environment)."""
    arrays, meta = stats_arrays(files["stats"])
    layer = meta["layers"][0]
    cases: dict[str, tuple[Path, str, dict | None]] = {}

    def add(name, message, arrays_=None, meta_=None, env=None):
        cases[name] = (write_npz(root / f"{len(cases)}.npz", arrays if arrays_ is None else arrays_, meta_), message, env)

    add("no metadata", "not a rankcut statistics file", {k: v for k, v in arrays.items() if k != "__meta__"})
    add("metadata not JSON", "damaged metadata", {**arrays, "__meta__": np.array(["{oops"])})
    add("metadata nested a million deep", "damaged metadata", {**arrays, "__meta__": np.array(["[" * 10 ** 6 + "]" * 10 ** 6])})
    add("metadata a list", "not a rankcut-stats/1 statistics file", {**arrays, "__meta__": np.array(["[1]"])})
    add("metadata as bytes", "not a rankcut statistics file", {**arrays, "__meta__": np.array([b"{}"])})
    add("unknown format", "not a rankcut-stats/1", meta_={**meta, "format": "rankcut-stats/99"})
    add("samples infinite", "damaged metadata", meta_={**meta, "samples": 1e400})
    add("channels infinite", "damaged metadata", meta_={**meta, "layers": [{**layer, "channels": 1e400}]})
    add("channels huge", "expected (1000000000000,)", meta_={**meta, "layers": [{**layer, "channels": 10 ** 12}]})
    add("channels zero", "declares 0 channels", meta_={**meta, "layers": [{**layer, "channels": 0}]})
    add("layers not a list", "damaged metadata", meta_={**meta, "layers": 7})
    add("layer entries not objects", "damaged metadata", meta_={**meta, "layers": ["stem"]})
    add("loss not a name", "loss must be a name", meta_={**meta, "loss": [1]})
    add("loss without gradient arrays", "missing the array stem/grad_count", meta_={**meta, "loss": "kl"})
    add("array missing", "missing the array stem/m2", {k: v for k, v in arrays.items() if k != "stem/m2"})
    add("array wrong shape", "stem/m2 has shape (4, 5)", {**arrays, "stem/m2": np.zeros((4, 5))})
    add("array wrong dtype", "(float32), expected (4, 4) (float64)", {**arrays, "stem/m2": arrays["stem/m2"].astype(np.float32)})
    add("array NaN", "stem/m2 holds NaN or Inf", {**arrays, "stem/m2": np.full((4, 4), np.nan)})
    add("array Inf", "stem/mean holds NaN or Inf", {**arrays, "stem/mean": np.full(4, np.inf)})
    add("negative count", "negative sample count", {**arrays, "stem/count": np.array(-5.0)})
    add("strings where numbers belong", "stem/count has shape", {**arrays, "stem/count": np.array(["5"])})

    # Bytes that are not an .npz at all.
    for name, content, message in [("truncated", files["stats"].read_bytes()[:3000], "not a readable .npz file"),
                                    ("random bytes", os.urandom(3000), "not a readable .npz file"),
                                    ("empty", b"", "not a readable .npz file"),
                                    ("a checkpoint", files["ckpt"].read_bytes(), "not a readable .npz file")]:
        path = root / f"{len(cases)}.npz"
        path.write_bytes(content)
        cases[name] = (path, message, None)
    empty_zip = root / "emptyzip.npz"
    zipfile.ZipFile(empty_zip, "w").close()
    cases["empty zip"] = (empty_zip, "not a rankcut statistics file", None)

    # A member declaring a 100 GB array in its .npy header, holding a few bytes.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (120_000, 120_000)})
    path = root / "declared100g.npz"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in arrays.items():
            z.writestr(k + ".npy", header.getvalue() + b"\0" * 128 if k == "stem/m2" else npz_bytes(v))
    cases["member declares 100 GB"] = (path, "declares more data than it holds", None)

    # Members whose declared uncompressed sizes add up to ~21 GB (the zip's own size fields).
    path = root / "zipsizes.npz"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in list(arrays.items())[:5]:
            z.writestr(k + ".npy", npz_bytes(v))
    _patch_central_sizes(path, 0xFFFF_FFF0)
    cases["zip declares 21 GB"] = (path, "would decompress to more than", None)

    # A real deflate bomb: 64 MiB of zeros in a ~64 KiB file, against a 32 MiB cap.
    path = root / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for k, v in arrays.items():
            z.writestr(k + ".npy", npz_bytes(v))
        z.writestr("padding.npy", npz_bytes(np.zeros(8 << 20)))
    assert path.stat().st_size < 1 << 20
    cases["deflate bomb over the cap"] = (path, "would decompress to more than 32 MiB", {"RANKCUT_MAX_NPZ_BYTES": str(32 << 20)})

    # A member whose deflate stream is damaged (zlib.error), and one with an unknown compression method.
    path = root / "baddeflate.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for k, v in arrays.items():
            z.writestr(k + ".npy", npz_bytes(v))
    data = bytearray(path.read_bytes())
    start = data.find(b"__meta__.npy") + len("__meta__.npy")
    data[start + 10:start + 40] = os.urandom(30)
    path.write_bytes(bytes(data))
    cases["damaged deflate stream"] = (path, "not a readable .npz file", None)
    path = root / "method.npz"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in arrays.items():
            z.writestr(k + ".npy", npz_bytes(v))
    data = bytearray(path.read_bytes())
    for sig, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = 0
        while (at := data.find(sig, at)) >= 0:
            struct.pack_into("<H", data, at + offset, 99)  # compression method 99 (AES): unsupported
            at += 4
    path.write_bytes(bytes(data))
    cases["unknown compression method"] = (path, "not a readable .npz file", None)
    path = root / "extra.npz"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in arrays.items():
            z.writestr(k + ".npy", npz_bytes(v))
        z.writestr("run.py", "print('hello')")
    cases["member that is not an array"] = (path, "unexpected member 'run.py'", None)
    return cases


def test_damaged_statistics_through_info_and_project(run_cli, files, tmp_path):
    before = unchanged(files, "ckpt", "stats")
    out = tmp_path / "out.safetensors"
    cases = _bad_stats(files, tmp_path)
    for case, (path, message, env) in cases.items():
        for args in (["info", path], ["project", files["ckpt"], "--stats", path, "--keep", "0.5", "-o", out]):
            line = run_cli(args, fails=True, env=env).message
            assert message in line, f"{case}: {line}"
            assert not out.exists()
    assert len(cases) >= 30
    assert unchanged(files, "ckpt", "stats") == before


@pytest.mark.parametrize("member", ["stem/m2", "__meta__"])
def test_pickled_object_in_statistics_is_refused_not_run(run_cli, files, tmp_path, member):
    marker = tmp_path / "PWNED"
    arrays, _ = stats_arrays(files["stats"])
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(str(marker))
    evil = write_npz(tmp_path / "evil.npz", {**arrays, member: payload})
    for args in (["info", evil], ["project", files["ckpt"], "--stats", evil, "--keep", "0.5", "-o", tmp_path / "o.st"]):
        assert "refusing to unpickle" in run_cli(args, fails=True).message
    # The same file as data (stats, eval, finetune read x/y through the same reader).
    np.savez(tmp_path / "evil_data.npz", x=np.zeros((2, 28, 28), np.uint8), y=payload)
    for args in (["stats", files["ckpt"], "--data", tmp_path / "evil_data.npz", *CPU, "-o", tmp_path / "o.npz"],
                 ["eval", files["ckpt"], "--data", tmp_path / "evil_data.npz", *CPU]):
        assert "refusing to unpickle" in run_cli(args, fails=True).message
    with pytest.raises(RankcutError, match="refusing to unpickle"):
        load_stats(evil)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    np.load(evil, allow_pickle=True)[member]
    assert marker.exists()


def test_raw_pickle_member_is_not_unpickled(run_cli, files, tmp_path):
    import pickle

    marker = tmp_path / "PWNED"
    path = tmp_path / "raw.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("__meta__.npy", pickle.dumps(_Payload(str(marker))))
    assert "not a readable .npz file" in run_cli(["info", path], fails=True).message
    assert not marker.exists()


def test_statistics_that_do_not_fit_the_checkpoint(run_cli, files, tmp_path):
    """Right digest, wrong layers: hand-edited files are refused before any projection."""
    arrays, meta = stats_arrays(files["stats"])
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
        assert message in run_cli(["project", files["ckpt"], "--stats", path, "--keep", "0.5", "-o", out],
                                  fails=True).message
    assert not out.exists()
    other = tmp_path / "other.safetensors"
    run_cli(["init", "-a", "rankcut:small-resnet", "--kwargs", '{"width": 4}', "--seed", "1", "-o", other])
    assert "computed for another checkpoint" in run_cli(
        ["project", other, "--stats", files["stats"], "--keep", "0.5", "-o", out], fails=True).message


def test_npz_size_cap_follows_the_machine(monkeypatch):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.delenv("RANKCUT_MAX_NPZ_BYTES", raising=False)
    assert _default_cap() == min(16 << 30, ram // 2)
    monkeypatch.setenv("RANKCUT_MAX_NPZ_BYTES", "1234")
    assert _default_cap() == 1234


def test_good_statistics_still_load(files):
    assert read_npz(files["grad"])["stem/hessian"].shape == (4, 4)
    assert load_stats(files["grad"]).loss == "kl"


# --- 3. numerical trouble -------------------------------------------------------------------------------------------

def _with_weights(src: Path, dst: Path, **tensors: torch.Tensor) -> Path:
    model, meta = load_with_meta(src)
    with torch.no_grad():
        for name, value in tensors.items():
            model.get_parameter(name).copy_(value)
    save(model, meta, dst)
    return dst


def test_stats_names_the_first_layer_that_overflows(run_cli, mnist_ckpt, tmp_path):
    # Finite weights whose outputs overflow float32 at conv2 (and NaN after): conv1 is fine.
    blown = _with_weights(mnist_ckpt, tmp_path / "blown.safetensors", **{"conv2.weight": torch.full((64, 32, 3, 3), 3e38)})
    line = run_cli(["stats", blown, "--data", "synthetic:8", *CPU, "-o", tmp_path / "s.npz"], fails=True).message
    assert "layer conv2 produced NaN or Inf" in line
    assert not (tmp_path / "s.npz").exists()
    # Outputs that stay finite but whose squares overflow float32: said as such.
    big = _with_weights(mnist_ckpt, tmp_path / "big.safetensors", **{"conv2.weight": torch.full((64, 32, 3, 3), 1e20)})
    line = run_cli(["stats", big, "--data", "synthetic:8", *CPU, "-o", tmp_path / "s.npz"], fails=True).message
    assert "layer conv2 has outputs too large for float32 statistics" in line


def test_stats_names_the_layer_not_its_batchnorm(run_cli, files, tmp_path):
    blown = _with_weights(files["ckpt"], tmp_path / "blown.safetensors",
                          **{"layer2.conv1.weight": torch.full((8, 4, 3, 3), 3e38)})
    line = run_cli(["stats", blown, "--data", "synthetic:8", *CPU, "-o", tmp_path / "s.npz"], fails=True).message
    assert line.startswith("error: layer layer2.conv1 ")


def test_eval_counts_nan_outputs_as_wrong_and_warns(mnist_ckpt, tmp_path):
    blown = _with_weights(mnist_ckpt, tmp_path / "blown.safetensors", **{"fc1.weight": torch.full((128, 9216), 3e38)})
    code, out, err = cli("eval", blown, "--data", "mnist5k:test", "-n", "50", *CPU, "--json")
    assert code == 0, err
    result = json.loads(out)["results"][0]
    assert result["nonfinite"] == 50 and result["top1"] == 0.0 and result["topk"] == 0.0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "gave NaN or Inf outputs for 50 of 50 samples" in lines[0]


def _outputs(model, layer: str, dataset) -> torch.Tensor:
    """The outputs of ``layer`` on every item of ``dataset``, in order."""
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    seen = []
    with hooks(model, {layer: layer}, lambda _, out: seen.append(out.detach().clone())), torch.no_grad():
        model(x)
    return seen[0].double()


def _project_reproduces(run_cli, ckpt: Path, data: str, layer: str, keep: float, tmp_path: Path, warning: str) -> int:
    """stats (checking the rank warning), project --method pca at ``keep``: the layer's outputs on the data return."""
    stats = tmp_path / "s.npz"
    err = run_cli(["stats", ckpt, "--data", data, *CPU, "-o", stats]).stderr
    assert any(warning in line and line.startswith("warning: ") for line in err.splitlines()), err
    s = load_stats(stats).layers[layer]
    rank = numerical_rank(s)
    out = tmp_path / "p.safetensors"
    result = run_cli(["project", ckpt, "--stats", stats, "--layers", layer, "--keep", keep, "-o", out, "--json"]).data
    (row,) = result["layers"]
    assert row["status"] == "projected" and row["new_rank"] >= rank, row
    original, meta = load_with_meta(ckpt)
    projected = load(out)
    assert all(torch.isfinite(p).all() for p in projected.parameters())
    dataset = open_data(data, meta.input)
    before, after = _outputs(original, layer, dataset), _outputs(projected, layer, dataset)
    scale = before.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(after / scale, before / scale, atol=2e-5, rtol=0,
                               msg=f"{layer}: projection to rank {row['new_rank']} >= data rank {rank} is not exact")
    return rank


def test_fewer_samples_than_channels(run_cli, mnist_ckpt, tmp_path):
    """fc1 has 128 channels; 16 samples give a covariance of rank 15: warned, and rank 16 is exact on them."""
    rank = _project_reproduces(run_cli, mnist_ckpt, "synthetic:16", "fc1", 16 / 128, tmp_path,
                               "layer fc1 has 128 channels but the statistics saw only 16 positions")
    assert rank == 15
    err = run_cli(["stats", mnist_ckpt, "--data", "synthetic:16", *CPU, "-o", tmp_path / "s.npz"]).stderr
    assert "use at least 129 samples" in err


def test_dead_channels(run_cli, mnist_ckpt, tmp_path):
    """40 of conv2's 64 filters output a constant: rank 24, warned, and a rank-26 pair is exact on the data."""
    model, meta = load_with_meta(mnist_ckpt)
    with torch.no_grad():
        model.conv2.weight[:40] = 0
        model.conv2.bias[:40] = 0.25
    dead = tmp_path / "dead.safetensors"
    save(model, meta, dead)
    rank = _project_reproduces(run_cli, dead, "synthetic:16", "conv2", 26 / 64, tmp_path,
                               "layer conv2: its covariance has rank 24 < 64")
    assert rank == 24


def test_constant_inputs(run_cli, mnist_ckpt, tmp_path):
    """Every image the same flat grey: conv1's outputs never vary, rank 0; rank 1 still reproduces them."""
    data = tmp_path / "flat.npz"
    np.savez(data, x=np.full((12, 28, 28), 128, np.uint8))
    rank = _project_reproduces(run_cli, mnist_ckpt, str(data), "conv1", 1 / 32, tmp_path,
                               "layer conv1: its covariance has rank 0 < 9 over 8,112 positions (32 of its channels are constant")
    assert rank == 0


def test_rank_warning_library():
    from rankcut.stats.collect import Moments
    from rankcut.files.statsfile import LayerStats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 8, generator=g, dtype=torch.float64)
    rank3 = LayerStats(Target("fc"), Moments.of(x.float()))
    assert numerical_rank(rank3) == 3
    assert rank_warning("fc", rank3, 200, limit=3) is None  # the layer's structure allows no more
    assert "rank 3 < 8 over 200 positions" in rank_warning("fc", rank3, 200)
    few = LayerStats(Target("fc"), Moments.of(torch.randn(5, 8, generator=g)))
    assert "saw only 5 positions (5 samples x 1); its covariance has rank 4 < 8: use at least 9 samples" in \
        rank_warning("fc", few, 5)
    full = LayerStats(Target("fc"), Moments.of(torch.randn(100, 8, generator=g)))
    assert rank_warning("fc", full, 100) is None


def test_project_refuses_to_write_non_finite_pairs(files):
    model, meta = load_with_meta(files["ckpt"])
    with torch.no_grad():
        get_module(model, "layer1.conv1").weight[0, 0, 0, 0] = torch.nan
    with pytest.raises(RankcutError, match="--method svd failed on layer layer1.conv1"):
        project_model(model, [Target("layer1.conv1", "layer1.bn1")], {}, "svd", {"layer1.conv1": 2})
    model, _ = load_with_meta(files["ckpt"])
    with torch.no_grad():
        get_module(model, "layer2.conv1").weight.fill_(3e38)  # finite, but its pair's weights overflow
    with pytest.raises(RankcutError, match="NaN or Inf weights for layer layer2.conv1"):
        project_model(model, [Target("layer2.conv1")], {}, "random", {"layer2.conv1": 2})


def test_divergence_after_a_save_keeps_the_last_good_file(mnist_ckpt, tmp_path, monkeypatch):
    """--save-every 1: epoch 1 is written; epoch 2 diverges; the epoch-1 file stays, finite, and nothing else."""
    import rankcut.run.train

    def schedule(step, total, peak, warmup):
        return 1e-3 if step < 2 else float("inf")  # 2 steps per epoch below: epoch 2 blows up

    monkeypatch.setattr(rankcut.run.train, "lr_at", schedule)
    out = tmp_path / "tuned.safetensors"
    code, stdout, err = cli("finetune", mnist_ckpt, "--data", "synthetic:64", "-b", "32", "--epochs", "2",
                            "--optimizer", "sgd", "--save-every", "1", *CPU, "-o", out)
    assert code == 1 and stdout == "" and len(err.splitlines()) == 1
    assert "NaN or infinite in epoch 2" in err and "Traceback" not in err
    model, meta = load_with_meta(out)  # loading refuses non-finite tensors
    assert meta.history[-1]["epochs_done"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mnist_ckpt.name, out.name])


# --- 4. data problems -----------------------------------------------------------------------------------------------

def _folder(root: Path, files: dict[str, bytes | None]) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(buf, format="PNG")
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue() if content is None else content)
    return root


def test_data_smaller_than_a_batch_works(run_cli, files, tmp_path):
    data = files["data"]  # 6 samples, batch 64
    assert run_cli(["stats", files["ckpt"], "--data", data, *CPU, "-o", tmp_path / "s.npz", "--json"]).data["samples"] == 6
    assert run_cli(["eval", files["ckpt"], "--data", data, *CPU, "--json"]).data["samples"] == 6
    run_cli(["finetune", files["ckpt"], "--data", data, *CPU, "-o", tmp_path / "t.safetensors"])
    one = tmp_path / "one.npz"
    np.savez(one, x=np.zeros((1, 28, 28), np.uint8), y=np.zeros(1, np.int64))
    assert run_cli(["eval", files["ckpt"], "--data", one, *CPU, "--json"]).data["samples"] == 1
    run_cli(["stats", files["ckpt"], "--data", one, *CPU, "-o", tmp_path / "s1.npz"])


def test_bad_data(run_cli, files, tmp_path):
    good = _folder(tmp_path / "png", {"a/0.png": None})
    png = (good / "a" / "0.png").read_bytes()
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG", optimize=True)  # 400 Mpixel declared, ~50 KB
    folders = {
        "empty folder": (tmp_path / "nothing", "not an ImageFolder tree"),
        "class folders without images": (_folder(tmp_path / "noimg", {"a/readme.txt": b"hi"}), "not an ImageFolder tree"),
        "unreadable image later on": (_folder(tmp_path / "later", {"a/0.png": None, "a/1.png": b"not an image", "b/2.png": None}),
                                      "cannot read image " + str(tmp_path / "later" / "a" / "1.png")),
        "truncated image": (_folder(tmp_path / "trunc", {"a/0.png": None, "b/1.png": png[: len(png) // 2]}),
                            "cannot read image " + str(tmp_path / "trunc" / "b" / "1.png")),
        "unreadable first image": (_folder(tmp_path / "first", {"a/0.png": b"junk", "b/1.png": None}),
                                   "cannot read the first image of the data"),
        "decompression bomb": (_folder(tmp_path / "bomb", {"a/0.png": None, "b/1.png": bomb.getvalue()}),
                               "could be decompression bomb"),
    }
    (tmp_path / "nothing").mkdir()
    arrays = {
        "no samples": ({"x": np.zeros((0, 28, 28), np.uint8), "y": np.zeros(0, np.int64)}, "holds no samples"),
        "0-d x": ({"x": np.array(3.0)}, "x must be N,C,H,W or N,H,W"),
        "empty images": ({"x": np.zeros((4, 1, 0, 0), np.uint8)}, "x holds empty images"),
        "NaN pixels": ({"x": np.full((4, 1, 28, 28), np.nan, np.float32), "y": np.zeros(4, np.int64)}, "NaN or Inf"),
        "floats 0..255": ({"x": np.full((4, 1, 28, 28), 200.0, np.float32), "y": np.zeros(4, np.int64)}, "must be in 0..1"),
        "normalised floats": ({"x": np.linspace(-2, 2.5, 4 * 784, dtype=np.float32).reshape(4, 1, 28, 28)}, "must be in 0..1"),
        "wrong channel count": ({"x": np.zeros((4, 4, 28, 28), np.uint8), "y": np.zeros(4, np.int64)},
                                "4-channel images but the model takes 1"),  # 3 (RGB) is fitted: issue 18
        "N,H,W,C layout": ({"x": np.zeros((4, 28, 28, 3), np.uint8)}, "store it as N,C,H,W"),
        "labels and images differ in count": ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.zeros(3, np.int64)},
                                              "x has 4 samples but y has 3 labels"),
        "float labels": ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.zeros(4, np.float32)}, "integer"),
        "no x": ({"images": np.zeros((4, 28, 28), np.uint8)}, "no tensor named x"),
    }
    cases = dict(folders)
    for name, (content, message) in arrays.items():
        path = tmp_path / f"{name.replace(' ', '_').replace(',', '')}.npz"
        np.savez(path, **content)
        cases[name] = (path, message)
    for name, (data, message) in cases.items():
        for args in (["stats", files["ckpt"], "--data", data, "-b", "2", *CPU, "-o", tmp_path / "s.npz"],
                     ["eval", files["ckpt"], "--data", data, "-b", "2", *CPU],
                     ["finetune", files["ckpt"], "--data", data, "-b", "2", *CPU, "-o", tmp_path / "t.safetensors"]):
            line = run_cli(args, fails=True).message
            assert message in line, f"{name} / {args[0]}: {line}"
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "t.safetensors").exists()
    # The file is named also when a DataLoader worker process hits it.
    line = run_cli(["eval", files["ckpt"], "--data", tmp_path / "later", "-b", "1", "--workers", "1", *CPU], fails=True).message
    assert "cannot read image " + str(tmp_path / "later" / "a" / "1.png") in line


def test_labels_outside_the_model(run_cli, files, tmp_path):
    many = _folder(tmp_path / "many", {f"c{i:02d}/0.png": None for i in range(12)})  # 12 classes, model has 10
    outside = tmp_path / "outside.npz"
    np.savez(outside, x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, 1, 2, -7]))
    for data, label in ((many, "label 10"), (outside, "label -7")):
        for args in (["eval", files["ckpt"], "--data", data, *CPU],
                     ["finetune", files["ckpt"], "--data", data, *CPU, "-o", tmp_path / "t.safetensors"]):
            assert f"{label}, outside the model's 10 classes" in run_cli(args, fails=True).message
    # stats needs no labels: the same data is fine there
    run_cli(["stats", files["ckpt"], "--data", many, *CPU, "-o", tmp_path / "s.npz"])


def test_images_of_another_size_are_resized(run_cli, files, tmp_path):
    from PIL import Image

    folder = tmp_path / "sizes"
    for rel, image in {"a/wide.png": Image.new("L", (300, 5)), "b/rgba.png": Image.new("RGBA", (64, 64))}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / rel)
    assert run_cli(["eval", files["ckpt"], "--data", folder, *CPU, "--json"]).data["samples"] == 2
