"""After an exact graph, large galleries get an approximate index for online expansion (auto)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import clustered_data, write_gallery

from aqe_retrieval import artifact
from aqe_retrieval.searcher import Searcher
from index_builder.build import build
from index_builder.cli import main as cli
from index_builder.config import AUTO_EXACT_MAX_N, BuildConfig, ServingSpec
from index_builder.expansion import AqeParams

N, D = 5000, 32


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    x = clustered_data(N, D, seed=11)
    return x, write_gallery(tmp_path_factory.mktemp("expansion-gallery"), x)


def built(root, paths, expansion_index: str, exact_max_n: int | None = None):
    return build(
        BuildConfig(
            gallery=paths["gallery"],
            ids=paths["ids"],
            root=root,
            params=AqeParams(qe_k=5),
            show_progress=False,
            expansion_index=expansion_index,
            serving=ServingSpec(method="exact", exact_max_n=exact_max_n or AUTO_EXACT_MAX_N),
        )
    )


def test_auto_builds_a_tuned_index_above_the_exact_limit(tmp_path, gallery):
    x, paths = gallery
    manifest = built(tmp_path / "auto", paths, "auto", exact_max_n=1000)  # 5,000 rows count as large
    level = manifest.levels[0]
    assert level.index == "level_0.faiss" and level.index_type.startswith("IVF")
    assert level.recall_k == 4  # expansion takes the top qe_k - 1
    assert level.nprobe is not None and level.recall_at_k is not None
    nlist = int(level.index_type[3:].split(",")[0])
    assert level.recall_at_k >= 0.95 or level.nprobe == nlist

    exact = built(tmp_path / "exact", paths, "exact", exact_max_n=1000)
    assert exact.levels[0].index is None and exact.levels[0].recall_at_k is None

    # oracle: served answers through the approximate expansion index against the exact build
    fast = Searcher(artifact.load(tmp_path / "auto"))
    slow = Searcher(artifact.load(tmp_path / "exact"))
    assert fast.artifact.levels[0].index is not None
    queries = x[np.random.default_rng(0).choice(N, 200, replace=False)] + 0.01
    overlap = np.mean(
        [
            len({h.row for h in a} & {h.row for h in b}) / 10
            for a, b in zip(fast.search(queries, 10), slow.search(queries, 10), strict=True)
        ]
    )
    assert overlap >= 0.9


def test_small_galleries_and_the_cli_flag(tmp_path, gallery):
    _, paths = gallery
    manifest = built(tmp_path / "small", paths, "auto")  # 5,000 rows <= the real limit
    assert manifest.levels[0].index is None
    assert (
        cli(
            [
                "build",
                "--gallery",
                str(paths["gallery"]),
                "--root",
                str(tmp_path / "cli"),
                "--expansion-index",
                "exact",
                "--no-progress",
            ]
        )
        == 0
    )
    with pytest.raises(SystemExit) as exc:
        cli(
            [
                "build",
                "--gallery",
                str(paths["gallery"]),
                "--root",
                str(tmp_path / "bad"),
                "--expansion-index",
                "hnsw",
            ]
        )
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="expansion_index"):
        BuildConfig(gallery=paths["gallery"], root=tmp_path, expansion_index="flat")
