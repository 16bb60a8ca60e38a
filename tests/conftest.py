"""Shared fixtures: small galleries on disk and built artifacts (data helpers live in helpers.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import clustered_data, write_gallery
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams

# Hypothesis: the default profile ("ci") is what `python3 -m pytest` (the README's and CI's
# command) runs: derandomize=True makes every run draw the same examples, so a red CI run is
# red again on a developer's machine and a green one does not turn red by chance; database=None
# keeps no example database. Hypothesis' other files (its cache of constants, failure patches)
# go to the temporary directory, never into the checkout. `--hypothesis-profile=explore`
# draws fresh random examples (still no database) to look for new failures; a failure prints
# its @reproduce_failure blob. Tests' own @settings override single values (max_examples, ...).
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, deadline=None, print_blob=True)
settings.load_profile("ci")
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "aqe-retrieval-hypothesis")


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
