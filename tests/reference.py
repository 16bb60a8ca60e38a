"""A numpy port of fast-reid's ``aqe`` (``fastreid/evaluation/query_expansion.py``): the tests' oracle.

The semantics it pins down are written out in ``docs/AQE.md``.

Kept as close to the reference as numpy allows: a dense N x N similarity matrix, a per-row loop,
``argpartition(-sim, range(1, qe_k + 1))[:qe_k]`` (self included), weights ``sim ** alpha``,
``np.mean`` of the raw features. It also returns each round's neighbour sets and similarity rows
so tests can tell a tie from a real disagreement.
"""

from __future__ import annotations

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    """torch ``F.normalize(p=2, dim=1)``: ``x / max(||x||, 1e-12)``."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def reference_aqe(query_feat, gallery_feat, qe_times=1, qe_k=10, alpha=3.0):
    """Returns ``(query_out, gallery_out, rounds)``; ``rounds[t] = (nbr_sets (N, qe_k), sims)``."""
    num_query = len(query_feat)
    all_feat = np.concatenate([query_feat, gallery_feat]).astype(np.float32)
    norm_feat = normalize(all_feat)
    rounds = []
    for _ in range(qe_times):
        out = []
        sims = norm_feat @ norm_feat.T
        nbrs = []
        for sim in sims:
            init_rank = np.argpartition(-sim, range(1, qe_k + 1))
            weights = sim[init_rank[:qe_k]].reshape((-1, 1))
            weights = np.power(weights, alpha)
            out.append(np.mean(all_feat[init_rank[:qe_k], :] * weights, axis=0))
            nbrs.append(init_rank[:qe_k])
        rounds.append((np.stack(nbrs), sims))
        all_feat = np.stack(out, axis=0)
        norm_feat = normalize(all_feat)
    return all_feat[:num_query], all_feat[num_query:], rounds
