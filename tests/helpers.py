"""Test data helpers shared by the test modules: seeded rows shaped like re-ID embeddings."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np


def random_data(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Isotropic Gaussian rows (no structure, no ties)."""
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def clustered_data(n: int, d: int, seed: int = 0, per_id: int = 6, dup_every: int = 17) -> np.ndarray:
    """Identities with a few noisy samples each, varied norms, and exact duplicate rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // per_id + 1, d)).astype(np.float32)
    x = centres[np.arange(n) // per_id] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    x *= rng.uniform(0.5, 3.0, size=(n, 1)).astype(np.float32)
    x[dup_every::dup_every] = x[dup_every - 1 : -1 : dup_every][: len(x[dup_every::dup_every])]
    return x.astype(np.float32)


def write_gallery(
    directory: Path, x: np.ndarray, with_ids: bool = True, with_metadata: bool = True
) -> dict[str, Path]:
    """Write a gallery (.npy), ids and a metadata CSV (camera = row % 6, ts = row)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"gallery": directory / "gallery.npy"}
    np.save(paths["gallery"], x)
    if with_ids:
        paths["ids"] = directory / "ids.txt"
        paths["ids"].write_text("".join(f"img-{i:05d}\n" for i in range(len(x))))
    if with_metadata:
        paths["metadata"] = directory / "meta.csv"
        paths["metadata"].write_text(
            "camera,ts,label\n" + "".join(f"{i % 6},{i},p{i // 6}\n" for i in range(len(x)))
        )
    return paths


def search_until(client: Any, x: np.ndarray, stop: Any, seed: int, k: int) -> list[int]:
    """Status codes of ``POST /search`` with random rows of ``x`` until ``stop`` is set (a load thread)."""
    r = np.random.default_rng(seed)
    codes = []
    while not stop.is_set():
        codes.append(
            client.post("/search", json={"embedding": x[r.integers(len(x))].tolist(), "k": k}).status_code
        )
    return codes


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
