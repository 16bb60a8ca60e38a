"""The row view of a version made by ``add``/``delete``: base rows not deleted, then appended rows.

Pure numpy, no I/O (:mod:`aqe_retrieval.artifact` reads the files). A version's *view* numbers
its rows as a full build over the same gallery would: the base's surviving rows in base order
(positions ``0 .. alive - 1``), then the appended rows in the order they were added. Deleted
rows are compacted away rather than kept as tombstones, so nothing downstream (the searcher,
online expansion, filters, the service) needs a mask: a deleted row is simply not there. Only
the base's approximate indexes still number base rows: :mod:`aqe_retrieval.overlay` masks and
renumbers them. Memory: a view materialises each array it presents (``n * d`` values a level)
instead of memory-mapping it; the next full build returns to memory-mapped files.
"""

from __future__ import annotations

import numpy as np


class View:
    """Positions of a delta version's rows: ``base_n`` base rows minus ``dead``, plus ``appended``."""

    def __init__(self, base_n: int, dead: np.ndarray, appended: int) -> None:
        dead = np.asarray(dead, dtype=np.int64)
        if dead.size and (dead.min() < 0 or dead.max() >= base_n or np.unique(dead).size != dead.size):
            raise ValueError(f"dead rows must be distinct rows of 0 .. {base_n - 1}")
        keep = np.ones(base_n, dtype=bool)
        keep[dead] = False
        self.base_n, self.appended = base_n, appended
        self.alive = np.flatnonzero(keep)  # (alive,) base rows in the view, in order
        self.n = len(self.alive) + appended

    def apply(self, base: np.ndarray, pos: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``base`` (base_n, ...) as the view (n, ...): surviving rows, then ``values`` at ``pos``.

        ``pos`` must cover every appended position (they have no base value).
        """
        out = np.empty((self.n, *base.shape[1:]), dtype=base.dtype)
        out[: len(self.alive)] = base[self.alive]
        out[np.asarray(pos, dtype=np.int64)] = values
        return out

    def append(self, base: np.ndarray, extra: np.ndarray) -> np.ndarray:
        """A per-row column (ids, metadata): surviving base values, then the appended ``extra``."""
        return np.concatenate([np.asarray(base[self.alive]), np.asarray(extra)])

    def renumber(self, base_rows: np.ndarray) -> np.ndarray:
        """Base row numbers (any shape) -> view positions; a deleted row becomes -1."""
        lookup = np.full(self.base_n, -1, dtype=np.int64)
        lookup[self.alive] = np.arange(len(self.alive))
        return lookup[np.asarray(base_rows, dtype=np.int64)]
