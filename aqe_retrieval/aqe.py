"""Alpha-weighted query expansion (AQE): the pure numpy math.

Semantics are those of fast-reid's ``aqe`` (see ``docs/AQE.md``):

* rows are compared by cosine: ``U = X / max(||X||, 1e-12)``;
* a row's neighbour set is its top ``qe_k`` rows by cosine, **itself included**;
* each neighbour gets the weight ``cos ** alpha`` (a negative cosine with a non-integer
  ``alpha`` is NaN in the reference; here it gets weight 0);
* the expanded row is ``sum_j w_j * X_j / qe_k``: raw features, divided by ``qe_k``
  (not by the sum of the weights), not normalised.

Nothing here touches FAISS or the disk: callers find the neighbours and pass them in.
"""

from __future__ import annotations

import numpy as np

NORM_EPS = 1e-12
"""Floor of a row norm, as in ``torch.nn.functional.normalize``."""


def normalize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise rows: ``x`` (n, d) any float -> ``(u (n, d) float32, norms (n,) float32)``.

    ``u = x / max(norm, 1e-12)``, so a raw row is recovered as ``norms[i] * u[i]``.
    """
    x32 = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x32, x32, dtype=np.float64)).astype(np.float32)
    u = x32 / np.maximum(norms, NORM_EPS)[:, None]
    return u.astype(np.float32, copy=False), norms


def normalize_rows_inplace(
    x: np.ndarray, block_size: int = 16384, out: np.ndarray | None = None
) -> np.ndarray:
    """L2-normalise the rows of ``x`` (n, d) float32 in place, block by block; returns the norms.

    ``out``: a (n,) float32 array (e.g. a memmap) that receives the norms.
    """
    norms = np.empty(x.shape[0], dtype=np.float32) if out is None else out
    for lo in range(0, x.shape[0], block_size):
        x[lo : lo + block_size], norms[lo : lo + block_size] = normalize_rows(x[lo : lo + block_size])
    return norms


def aqe_weights(sims: np.ndarray, alpha: float) -> np.ndarray:
    """Neighbour weights ``sims ** alpha``: ``sims`` (..., k) float32 -> same shape float32.

    Where the reference is defined (``alpha`` integer-valued, or a non-negative cosine) this is
    exactly ``numpy.power``; a negative cosine with a non-integer ``alpha`` gets weight 0 instead
    of the reference's NaN.
    """
    s = np.asarray(sims, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.power(s, np.float32(alpha))
    if float(alpha) != int(alpha):
        w = np.where(s < 0, np.float32(0.0), w)
    return w.astype(np.float32, copy=False)


def expand_rows(neighbour_feats: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """Expand rows from their full neighbour sets (self included).

    ``neighbour_feats`` (b, k, d) float32 raw features of each row's ``k = qe_k`` neighbours,
    ``sims`` (b, k) their cosines to the row. Returns (b, d) float32
    ``sum_j w_j * X_j / k``.
    """
    k = neighbour_feats.shape[1]
    w = aqe_weights(sims, alpha)
    out = np.matmul(w[:, None, :], neighbour_feats)[:, 0, :]
    out /= np.float32(k)
    return out.astype(np.float32, copy=False)


def expand_queries(
    queries: np.ndarray, neighbour_feats: np.ndarray, sims: np.ndarray, alpha: float, qe_k: int
) -> np.ndarray:
    """Expand queries online against a gallery (serving mode).

    ``queries`` (b, d) raw, ``neighbour_feats`` (b, qe_k - 1, d) raw gallery rows of the query's
    top ``qe_k - 1`` gallery neighbours, ``sims`` (b, qe_k - 1) their cosines to the query.
    The query is its own first neighbour with weight ``1 ** alpha = 1``:
    ``q' = (q + sum_j s_j ** alpha * G_j) / qe_k``. Returns (b, d) float32.
    """
    q = np.asarray(queries, dtype=np.float32)
    if neighbour_feats.shape[1] == 0:
        return (q / np.float32(qe_k)).astype(np.float32)
    w = aqe_weights(sims, alpha)
    out = q + np.matmul(w[:, None, :], neighbour_feats)[:, 0, :]
    out /= np.float32(qe_k)
    return out.astype(np.float32, copy=False)


def effective_qe_k(qe_k: int, n_rows: int) -> int:
    """The ``qe_k`` actually used over ``n_rows`` rows: clamped to ``n_rows`` (the reference raises)."""
    if qe_k < 1:
        raise ValueError(f"qe_k must be >= 1, got {qe_k}")
    return min(qe_k, n_rows)
