"""Where the build's large arrays live: in RAM, or in memory-mapped ``.npy`` files.

A resident build (:mod:`index_builder.budget`) keeps every array in RAM, as it always has. Out of
core, an :class:`ArrayStore` hands out memory-mapped files instead: in a scratch directory, or at
a final path placed beforehand (a level's rows written where the artifact wants them, so they
are never copied). Mapped pages are written back and evicted by the kernel, so they count as
page cache, not as the process's anonymous memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class ArrayStore:
    """Allocates named arrays: ``np.empty`` without a directory, else memory-mapped ``.npy`` files."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.placed: dict[str, Path] = {}

    @property
    def out_of_core(self) -> bool:
        """Whether arrays are memory-mapped files rather than RAM."""
        return self.directory is not None

    def place(self, name: str, path: Path) -> None:
        """Give array (or file) ``name`` its final path instead of one in the scratch directory."""
        self.placed[name] = path

    def file(self, name: str) -> Path | None:
        """The path of file ``name`` (placed, or in the scratch directory); None when resident."""
        if name in self.placed:
            return self.placed[name]
        return None if self.directory is None else self.directory / name

    def empty(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised array: RAM when resident, else a writable memmap of ``name``."""
        path = self.file(name if name in self.placed else f"{name}.npy")
        if path is None:
            return np.empty(shape, dtype=dtype)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)

    def discard(self, name: str) -> None:
        """Delete scratch array ``name``'s file, if it has one (placed files are kept)."""
        if self.directory is not None and name not in self.placed:
            (self.directory / f"{name}.npy").unlink(missing_ok=True)
