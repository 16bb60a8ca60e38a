"""A flat inner-product FAISS index written block by block from memory-mapped rows, then mapped back.

An ``IndexFlatIP`` over n rows is ``4 n d`` bytes: built with ``add`` it holds them all in
anonymous memory. Out of core (and on a cluster worker) the serving index is written straight
into FAISS's file layout instead: the header FAISS itself serialises for an empty index of
dimension d, with its two counts (``ntotal`` rows, ``n d`` floats of codes) set to n, then the
rows in blocks. The file is read back with ``IO_FLAG_MMAP_IFC``, so the index's codes are file
pages (page cache, reclaimable), not anonymous memory, and checked against the rows it came
from. Memory: one block, ``block_size * d * 4`` bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

FOURCC = b"IxFI"
"""FAISS's tag of an ``IndexFlatIP`` in its file format."""
NTOTAL_AT = 8
"""Byte offset of ``ntotal`` (int64) in the header: after the tag and ``d`` (int32)."""


def _header(n: int, d: int) -> bytes:
    """FAISS's own header of an empty ``IndexFlatIP(d)`` with its row and code counts set to n."""
    empty = bytearray(faiss.serialize_index(faiss.IndexFlatIP(d)).tobytes())
    count_at = len(empty) - 8  # the codes' length (size_t, in floats) ends the empty index
    layout_ok = (
        empty[:4] == FOURCC
        and int.from_bytes(empty[4:8], "little") == d
        and int.from_bytes(empty[NTOTAL_AT : NTOTAL_AT + 8], "little") == 0
        and int.from_bytes(empty[count_at:], "little") == 0
    )
    if not layout_ok:  # a FAISS release that lays the flat index out otherwise: refuse, never guess
        raise RuntimeError(f"faiss {faiss.__version__}: unexpected IndexFlatIP file layout {empty.hex()}")
    empty[NTOTAL_AT : NTOTAL_AT + 8] = n.to_bytes(8, "little")
    empty[count_at:] = (n * d).to_bytes(8, "little")
    return bytes(empty)


def write_flat_index(path: Path, rows: np.ndarray, block_size: int) -> Any:
    """Write ``IndexFlatIP`` over ``rows`` (n, d) float32 to ``path`` in blocks; return it, mapped.

    The file is written under a temporary name and renamed. The returned index maps its codes
    from ``path`` (keep the file while the index is used); its first and last rows are checked
    against ``rows``.
    """
    n, d = rows.shape
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(_header(n, d))
        for lo in range(0, n, max(1, block_size)):
            f.write(np.ascontiguousarray(rows[lo : lo + block_size], dtype="<f4").tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    if not isinstance(index, faiss.IndexFlatIP) or index.ntotal != n or index.d != d:
        raise RuntimeError(f"{path}: read back as {type(index).__name__} {index.ntotal} x {index.d}")
    for row in {0, n - 1} if n else set():
        if not np.array_equal(index.reconstruct(row), np.asarray(rows[row], dtype=np.float32)):
            raise RuntimeError(f"{path}: row {row} reads back differently")
    return index
