"""Reading ``.npz`` files that may be hostile: no pickles, and no member bigger than it says it is.

``np.load(allow_pickle=False)`` already refuses object arrays, but it trusts the sizes in the file: a
small zip can declare a huge array (allocated before reading) or decompress to gigabytes. Here every
member's ``.npy`` header is read first and its declared size is checked against the zip's declared
uncompressed size and a total cap, before any array is materialised.
"""

from __future__ import annotations

import lzma
import math
import os
import struct
import zipfile
import zlib

import numpy as np

from rankcut.errors import RankcutError

MAX_TOTAL_BYTES = 16 << 30


def _default_cap() -> int:
    """How much an ``.npz`` may decompress to: ``RANKCUT_MAX_NPZ_BYTES``, else 16 GiB or half the RAM if less.

    A small deflated file can hold gigabytes of zeros: refusing what the machine could not hold anyway
    turns an out-of-memory kill into a one-line error.
    """
    if os.environ.get("RANKCUT_MAX_NPZ_BYTES"):
        return int(os.environ["RANKCUT_MAX_NPZ_BYTES"])
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return MAX_TOTAL_BYTES
    return min(MAX_TOTAL_BYTES, ram // 2)


def _declared(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> tuple[str, int]:
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported npy version {version}")
    if dtype.hasobject:
        raise RankcutError(f"{path} holds Python objects in {info.filename}; refusing to unpickle")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > info.file_size:
        raise RankcutError(f"{path}: member {info.filename} declares more data than it holds")
    return info.filename, nbytes


def read_npz(path: str | os.PathLike, max_total_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Every array in the ``.npz`` at ``path``, after checking declared sizes; one-line errors otherwise."""
    path = str(path)
    cap = _default_cap() if max_total_bytes is None else max_total_bytes
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if sum(i.file_size for i in infos) > cap:
                raise RankcutError(f"{path} would decompress to more than {cap >> 20} MiB; refusing "
                                   "(set RANKCUT_MAX_NPZ_BYTES to allow more)")
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise RankcutError(f"{path}: unexpected member {info.filename!r}, not an .npz array")
                _declared(zf, info, path)
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except RankcutError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, TypeError, OverflowError, struct.error,
            zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError) as e:
        # Damaged members surface as whatever their decompressor raises (zlib.error for a broken deflate
        # stream, NotImplementedError for an unknown compression method, RuntimeError when encrypted).
        raise RankcutError(f"{path} is not a readable .npz file ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})") from None
