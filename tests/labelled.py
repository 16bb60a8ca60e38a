"""Labelled re-ID data for the quality and gate tests: identities seen by several cameras."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index_builder.quality import Labels


def labelled(
    n_ids: int = 60, per_id: int = 4, d: int = 16, noise: float = 0.6, seed: int = 0
) -> tuple[np.ndarray, Labels]:
    """Identities seen by ``per_id`` cameras; returns features and labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, d))
    pids = np.repeat(np.arange(n_ids), per_id)
    camids = np.tile(np.arange(per_id), n_ids)
    x = centres[pids] + noise * rng.standard_normal((len(pids), d))
    return x.astype(np.float32), Labels(pids, camids)


def write(tmp_path: Path, x: np.ndarray, labels: Labels, name: str = "set") -> tuple[Path, Path]:
    """``x`` as ``<name>.npy`` and its labels as ``<name>.csv`` (pid, camid) under ``tmp_path``."""
    np.save(tmp_path / f"{name}.npy", x)
    (tmp_path / f"{name}.csv").write_text(
        "pid,camid\n" + "".join(f"{p},{c}\n" for p, c in zip(labels.pids, labels.camids, strict=True))
    )
    return tmp_path / f"{name}.npy", tmp_path / f"{name}.csv"
