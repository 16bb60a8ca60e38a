"""Structured synthetic embeddings that behave like re-ID features, written block by block.

Real re-ID / sentence embeddings have a low intrinsic dimension and several samples per identity.
This generator draws ``n / per_id`` identity centres in an ``rank``-dimensional latent space, maps
them into ``d`` dimensions with a random orthonormal basis, and emits each identity 1 .. 2*per_id
times with latent noise (``spread``, the within-identity variation) plus a little isotropic noise
in all ``d`` dimensions (``floor``). Rows are shuffled, so an identity's samples are not adjacent.
Labels (the identity of each row) are written beside the features when asked.

    python benchmarks/synthetic.py --n 1000000 --d 256 --out /tmp/gallery.npy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def generate(
    out: Path,
    n: int,
    d: int,
    rank: int = 48,
    per_id: int = 6,
    spread: float = 0.45,
    floor: float = 0.05,
    seed: int = 0,
    dtype: str = "float32",
    block: int = 65536,
    labels_out: Path | None = None,
) -> None:
    """Write an (n, d) ``.npy`` of structured embeddings to ``out`` (memory: O(block * d)).

    The latent rank is at most ``d`` (``d`` dimensions hold no more orthonormal directions).
    """
    rank = min(rank, d)
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 2 * per_id + 1, size=n // per_id + n)
    labels = np.repeat(np.arange(len(sizes)), sizes)[:n]
    labels = labels[rng.permutation(n)]
    n_ids = int(labels.max()) + 1
    centres = rng.standard_normal((n_ids, rank)).astype(np.float32)
    basis, _ = np.linalg.qr(rng.standard_normal((d, rank)))
    basis = basis.T.astype(np.float32)  # (rank, d), orthonormal rows
    x = np.lib.format.open_memmap(out, mode="w+", dtype=np.dtype(dtype), shape=(n, d))
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        brng = np.random.default_rng([seed, lo])
        latent = centres[labels[lo:hi]] + spread * brng.standard_normal((hi - lo, rank), dtype=np.float32)
        rows = latent @ basis + floor * brng.standard_normal((hi - lo, d), dtype=np.float32)
        x[lo:hi] = rows.astype(dtype)
    x.flush()
    del x
    if labels_out is not None:
        np.save(labels_out, labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--d", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--labels-out", type=Path)
    p.add_argument("--rank", type=int, default=48)
    p.add_argument("--per-id", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    a = p.parse_args()
    generate(a.out, a.n, a.d, a.rank, a.per_id, seed=a.seed, dtype=a.dtype, labels_out=a.labels_out)


if __name__ == "__main__":
    main()
