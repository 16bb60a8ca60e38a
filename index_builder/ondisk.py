"""IVF indexes whose inverted lists live on disk (``OnDiskInvertedLists``), filled in bounded memory.

FAISS's own recipe (``contrib/ondisk.py``): add the rows shard by shard to empty clones of the
trained index, write each shard, map them back (``IO_FLAG_MMAP``) and merge all their lists into
one ``OnDiskInvertedLists`` file with ``merge_from_multiple``, which sizes every list exactly
before it copies. Anonymous memory: one shard's codes and ids, ``shard_rows * (code_size + 8)``
bytes, plus the clone's quantizer; the merge itself works on mapped files (a shard is written
with an empty quantizer, so the mapped shards hold their lists only). Ids are passed
explicitly (``merge_from_multiple``'s ``shift_ids`` numbers rows wrongly in faiss 1.15: 19,000
distinct ids for 20,000 rows in three shards).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss import swig_ptr

from aqe_retrieval.faiss_search import has_ondisk_lists
from index_builder.pool import Progress

_faiss: Any = faiss
"""faiss, untyped: the wheel's stubs lack the SWIG helpers used here (pointer vectors, ``this``)."""


@dataclass(frozen=True)
class OnDiskLists:
    """Where an IVF index's lists go (``ivfdata``), its shards' scratch directory, shard size."""

    ivfdata: Path
    scratch: Path
    shard_rows: int


def fill_ondisk(
    index: Any,
    u: np.ndarray,
    lists: OnDiskLists,
    coarse: np.ndarray | None = None,
    progress: Progress | None = None,
) -> None:
    """Add every row of ``u`` (n, d) float32 (ids 0 .. n-1) to the trained, empty IVF ``index``.

    Its inverted lists become an ``OnDiskInvertedLists`` at ``lists.ivfdata``. ``coarse`` (n,)
    int: each row's list, when already known (no second quantizer pass).
    """
    ivf = faiss.extract_index_ivf(index)
    if index.ntotal:
        raise ValueError(f"fill_ondisk needs an empty index, this one holds {index.ntotal} rows")
    n = u.shape[0]
    shard_files = []
    try:
        for number, lo in enumerate(range(0, n, lists.shard_rows)):
            hi = min(n, lo + lists.shard_rows)
            shard = faiss.clone_index(index)
            xb, ids = np.ascontiguousarray(u[lo:hi], dtype=np.float32), np.arange(lo, hi, dtype=np.int64)
            if coarse is None:
                shard.add_with_ids(xb, ids)
            else:
                near = np.ascontiguousarray(coarse[lo:hi], dtype=np.int64)
                shard_ivf = faiss.extract_index_ivf(shard)
                shard_ivf.add_core(len(xb), swig_ptr(xb), swig_ptr(ids), swig_ptr(near))
                shard.ntotal = shard_ivf.ntotal
            path = lists.scratch / f"{lists.ivfdata.stem}.shard{number}.faiss"
            _drop_quantizer(shard)
            faiss.write_index(shard, str(path))
            shard_files.append(path)
            del shard
            if progress:
                progress(hi - lo)
        merge_shards(index, shard_files, lists.ivfdata)
    finally:
        for path in shard_files:
            path.unlink(missing_ok=True)
    if index.ntotal != n or ivf.ntotal != n:
        raise RuntimeError(f"on-disk lists hold {ivf.ntotal} rows, expected {n}")


def _drop_quantizer(shard: Any) -> None:
    """Give ``shard`` an empty flat quantizer in place of its clone of the trained one.

    The merge maps every shard's lists at once and reads each shard's quantizer into memory:
    ``N / shard_rows`` shards of ``nlist x d`` floats would grow with N (measured: 27 MiB at
    800,000 rows, 1,333 lists, d = 128). Only the lists of a shard are ever read back.
    """
    ivf = faiss.extract_index_ivf(shard)
    trained: Any = ivf.quantizer  # untyped: the stubs lack SWIG's ownership handle (``this``)
    empty: Any = faiss.IndexFlat(ivf.d, trained.metric_type)
    ivf.quantizer = empty
    empty.this.disown()  # the shard owns it now (``own_fields``)...
    trained.this.acquire()  # ...and Python the clone it owned, freed here
    del trained


def merge_shards(index: Any, shard_files: list[Path], ivfdata: Path) -> None:
    """Replace the empty ``index``'s lists by the merged lists of the shard files, on disk."""
    ivf = faiss.extract_index_ivf(index)
    shards, sources = [], _faiss.InvertedListsPtrVector()
    for path in shard_files:
        shard = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)  # lists mapped, not read
        shards.append(shard)
        sources.push_back(faiss.extract_index_ivf(shard).invlists)
    ivfdata.unlink(missing_ok=True)
    lists = _faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    with c_stdout_to_stderr():  # FAISS printf()s "resizing ..." on stdout, the CLI's JSON channel
        total = lists.merge_from_multiple(sources.data(), sources.size(), False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    ivf.ntotal = total
    index.ntotal = total
    del shards


@contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for the block (C library output included)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def is_ondisk(index: Any) -> bool:
    """Whether ``index`` is an IVF index with on-disk inverted lists."""
    return has_ondisk_lists(index)
