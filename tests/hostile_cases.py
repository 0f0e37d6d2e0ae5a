"""Damaged checkpoints and statistics files, each with the message the commands must give for it.

Built from the good files of the ``small_files`` fixture (conftest.py); the hostile tests run every case through
every command that reads such a file.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def rewrite_checkpoint(src: Path, dst: Path, tensors: dict | None = None, **meta: str) -> Path:
    """A copy of ``src`` with some tensors and ``rankcut.*`` metadata entries replaced (keys without the prefix)."""
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


# --- checkpoints ------------------------------------------------------------------------------------------------------

def bad_checkpoints(files: dict) -> dict[str, tuple[Path, str]]:
    """Damaged checkpoints: name -> (path, expected message)."""
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


# --- statistics files ---------------------------------------------------------------------------------------------------

Case = tuple[Path, str, "dict | None"]  # (path, expected message, environment)


def bad_statistics(files: dict, root: Path) -> dict[str, Case]:
    """Damaged statistics files: name -> (path, expected message, environment)."""
    arrays, meta = stats_arrays(files["stats"])
    cases: dict[str, Case] = {}
    cases.update(_bad_contents(arrays, meta, root))
    cases.update(_not_npz(files, root))
    cases.update(_bad_zips(arrays, root))
    return cases


def _bad_contents(arrays: dict, meta: dict, root: Path) -> dict[str, Case]:
    """Readable .npz files whose metadata or arrays are wrong."""
    layer = meta["layers"][0]
    cases: dict[str, Case] = {}

    def add(name, message, arrays_=None, meta_=None, env=None):
        path = root / f"contents{len(cases)}.npz"
        cases[name] = (write_npz(path, arrays if arrays_ is None else arrays_, meta_), message, env)

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
    return cases


def _not_npz(files: dict, root: Path) -> dict[str, Case]:
    """Bytes that are not an .npz at all."""
    cases: dict[str, Case] = {}
    for name, content, message in [("truncated", files["stats"].read_bytes()[:3000], "not a readable .npz file"),
                                    ("random bytes", os.urandom(3000), "not a readable .npz file"),
                                    ("empty", b"", "not a readable .npz file"),
                                    ("a checkpoint", files["ckpt"].read_bytes(), "not a readable .npz file")]:
        path = root / f"bytes{len(cases)}.npz"
        path.write_bytes(content)
        cases[name] = (path, message, None)
    empty_zip = root / "emptyzip.npz"
    zipfile.ZipFile(empty_zip, "w").close()
    cases["empty zip"] = (empty_zip, "not a rankcut statistics file", None)
    return cases


def _patch_central_sizes(path: Path, size: int) -> None:
    """Make every member of the zip at ``path`` declare ``size`` uncompressed bytes in the central directory."""
    data = bytearray(path.read_bytes())
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        struct.pack_into("<I", data, at + 24, size)  # uncompressed size field of a central directory entry
        at += 4
    path.write_bytes(bytes(data))


def _bad_zips(arrays: dict, root: Path) -> dict[str, Case]:
    """Zips that lie about their sizes, decompress to too much, are damaged, or hold what is not an array."""
    cases: dict[str, Case] = {}

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
