"""Shared fixtures: small galleries on disk and built artifacts (data helpers live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import clustered_data, write_gallery

from index_builder.build import BuildConfig, build
from index_builder.expansion import AqeParams


@pytest.fixture(scope="session")
def small_gallery(tmp_path_factory) -> tuple[np.ndarray, dict[str, Path]]:
    """600 x 32 clustered rows with ids and metadata on disk."""
    x = clustered_data(600, 32, seed=3)
    return x, write_gallery(tmp_path_factory.mktemp("gallery"), x)


@pytest.fixture(scope="session")
def built_root(tmp_path_factory, small_gallery) -> Path:
    """An index root with one exact version built from ``small_gallery``."""
    _, paths = small_gallery
    root = tmp_path_factory.mktemp("root")
    build(
        BuildConfig(
            gallery=paths["gallery"],
            ids=paths["ids"],
            metadata=paths["metadata"],
            root=root,
            params=AqeParams(qe_k=5),
            show_progress=False,
        )
    )
    return root
