"""Parity with the dense reference, with the one allowance ``docs/AQE.md`` grants: exact ties."""

from __future__ import annotations

import numpy as np

TIE_TOL = 1e-5
FEATURE_TOL = 1e-5


def assert_parity(
    ours: np.ndarray,
    ours_sets: list[np.ndarray],
    ref: np.ndarray,
    ref_rounds: list[tuple[np.ndarray, np.ndarray]],
) -> int:
    """Assert our expanded rows equal the reference's wherever the neighbour sets agree.

    ``ours_sets[t]`` (n, k) and ``ref_rounds[t] = (sets (n, k), sims (n, n))`` per round. A row
    whose set differs must differ only inside a tie at the boundary; such rows, and rows that
    averaged them in a later round, are exempt from the feature check. Returns the exempt count.
    """
    n = ours.shape[0]
    tainted = np.zeros(n, dtype=bool)
    for mine, (theirs, sims) in zip(ours_sets, ref_rounds, strict=True):
        touched = tainted[mine].any(axis=1) | tainted[theirs].any(axis=1) | tainted
        for i in range(n):
            a, r = set(mine[i].tolist()), set(theirs[i].tolist())
            if a == r or touched[i]:
                continue
            boundary = sims[i, list(r)].min()
            diff = sorted(a ^ r)
            gap = np.abs(sims[i, diff] - boundary).max()
            assert gap <= TIE_TOL, f"row {i}: sets differ outside a tie ({diff}, gap {gap})"
            touched[i] = True
        tainted = touched
    scale = np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    err = np.abs(ours - ref).max(axis=1) / scale
    # ``not <=`` so that a NaN in our rows fails; rows where the reference itself is NaN (a
    # fractional alpha with a negative cosine: undefined there, weight 0 here) are not compared
    defined = np.isfinite(ref).all(axis=1)
    bad = np.flatnonzero(~(err <= FEATURE_TOL) & ~tainted & defined)
    assert len(bad) == 0, f"rows {bad[:10].tolist()} differ by up to {err[bad].max():.2e}"
    return int(tainted.sum())
