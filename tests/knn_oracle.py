"""The brute-force oracle of the tiled kNN kernels: dense float64 similarities, tie-aware checks."""

from __future__ import annotations

import numpy as np

TIE = 1e-5


def brute_force(u: np.ndarray) -> np.ndarray:
    """All pairwise inner products of ``u`` (n, d) in float64: (n, n)."""
    return u.astype(np.float64) @ u.T.astype(np.float64)


def assert_exact_topk(u: np.ndarray, ids: np.ndarray, sims: np.ndarray, k: int) -> None:
    """Valid exact top-k of every row: any member of a tie at the boundary is allowed."""
    s = brute_force(u)
    n = len(u)
    assert ids.shape == sims.shape == (n, k)
    assert (ids >= 0).all() and (ids < n).all()
    assert all(len(set(row)) == k for row in ids.tolist()), "a row repeats a neighbour"
    # the returned similarity is the neighbour's true cosine (the GEMM's float32 value)
    np.testing.assert_allclose(sims, np.take_along_axis(s, ids, axis=1), atol=TIE)
    # sorted best first, and the k best values are exactly brute force's k best values
    assert (np.diff(sims, axis=1) <= 0).all()
    np.testing.assert_allclose(sims, -np.sort(-s, axis=1)[:, :k], atol=TIE)
