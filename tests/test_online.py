"""Serving mode (``aqe_retrieval.online``): the online query expansion equals the reference's row
for that query, over levels made here from the reference and over a built artifact."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import clustered_data, random_data
from reference import normalize, reference_aqe

from aqe_retrieval import artifact
from aqe_retrieval.aqe import normalize_rows
from aqe_retrieval.faiss_search import exact_knn
from aqe_retrieval.online import expand_batch, expand_online, gallery_level
from aqe_retrieval.searcher import Searcher
from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams


def _level(rows: np.ndarray, index=None, nprobe=None):
    u, norms = normalize_rows(rows)
    return gallery_level(u, norms, index, nprobe)


@pytest.mark.parametrize(("qe_k", "alpha", "qe_times"), [(6, 3.0, 1), (4, 0.5, 2), (3, 1.0, 3)])
def test_expand_online_over_reference_levels_follows_the_contract(qe_k, alpha, qe_times):
    g = clustered_data(300, 16, seed=qe_k)
    levels, gallery = [], g
    for _ in range(qe_times):  # level t is the gallery expanded t times over itself
        levels.append(_level(gallery))
        _, gallery, _ = reference_aqe(gallery[:0], gallery, 1, qe_k, alpha)
    queries = random_data(6, 16, seed=1) * 0.2 + g[:6]
    ours = expand_online(queries, levels, qe_k, alpha)
    one_by_one = np.concatenate([expand_online(q[None], levels, qe_k, alpha) for q in queries])
    for i, q in enumerate(queries):
        want, level = q[None], g
        for _ in range(qe_times):  # round t: the query against level t - 1
            (want, _, _), (_, level, _) = (
                reference_aqe(want, level, 1, qe_k, alpha),
                reference_aqe(level[:0], level, 1, qe_k, alpha),
            )
        np.testing.assert_allclose(ours[i], want[0], rtol=0, atol=1e-5 * np.linalg.norm(want[0]))
        np.testing.assert_allclose(one_by_one[i], want[0], rtol=0, atol=1e-5 * np.linalg.norm(want[0]))


@pytest.mark.parametrize(
    ("qe_k", "alpha", "qe_times", "dtype"),
    [(6, 3.0, 1, np.float32), (4, 0.5, 2, np.float32), (2, 1.0, 3, np.float16), (10, 2.5, 1, np.float16)],
)
def test_one_query_expands_as_it_does_in_a_batch(qe_k, alpha, qe_times, dtype):
    """The one-row path (``expand_one``) against the batch path, row by row: float16 levels,
    non-integer alpha with negative cosines (weight 0), several rounds."""
    g = random_data(400, 24, seed=qe_k)  # random rows: many neighbours have negative cosines
    levels, gallery = [], g
    for _ in range(qe_times):
        u, norms = normalize_rows(gallery)
        levels.append(gallery_level(u.astype(dtype), norms))
        _, gallery, _ = reference_aqe(gallery[:0], gallery, 1, qe_k, alpha)
    queries = random_data(40, 24, seed=7) * 3.0
    batch = expand_online(queries, levels, qe_k, alpha)
    for i, q in enumerate(queries):
        one = expand_online(q[None], levels, qe_k, alpha)
        alone = expand_batch(q[None], levels, qe_k, alpha)[0]  # the batch path, one row
        np.testing.assert_allclose(alone, batch[i], rtol=0, atol=1e-7 * np.linalg.norm(batch[i]))
        assert one.shape == (1, 24) and one.dtype == np.float32
        np.testing.assert_allclose(one[0], batch[i], rtol=0, atol=1e-6 * np.linalg.norm(batch[i]))


def test_qe_k_1_leaves_the_query_as_it_is():
    g = random_data(50, 8, seed=2)
    q = random_data(3, 8, seed=3)
    np.testing.assert_array_equal(expand_online(q, [_level(g), _level(g)], 1, 3.0), q)


def test_no_levels_no_expansion():
    q = random_data(2, 8, seed=4)
    np.testing.assert_array_equal(expand_online(q, [], 10, 3.0), q)


def test_an_approximate_level_that_comes_back_short_is_searched_exactly():
    import faiss

    g = random_data(64, 8, seed=5)
    u, norms = normalize_rows(g)
    index = faiss.index_factory(8, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(u)
    index.add(u)
    level = gallery_level(u, norms, index, nprobe=1)  # one list of ~4 rows: 9 neighbours do not fit
    q, _ = normalize_rows(random_data(5, 8, seed=6))
    assert (index.search(q, 9)[1] < 0).any()
    np.testing.assert_array_equal(level.search(q, 9), exact_knn(q, u, 9)[1])
    full = gallery_level(u, norms, index, nprobe=16)  # every list probed: exact already
    np.testing.assert_array_equal(full.search(q, 5), exact_knn(q, u, 5)[1])
    assert index.nprobe == 1  # per-call parameters only


def _searcher(tmp_path, g, qe_k, alpha, qe_times) -> Searcher:
    np.save(tmp_path / "g.npy", g)
    build(
        BuildConfig(
            gallery=tmp_path / "g.npy",
            root=tmp_path / "root",
            params=AqeParams(qe_k=qe_k, alpha=alpha, qe_times=qe_times),
            show_progress=False,
        )
    )
    return Searcher(artifact.load(tmp_path / "root"))


@pytest.mark.parametrize(("qe_k", "alpha"), [(10, 3.0), (2, 1.0), (5, 0.5), (1, 3.0)])
def test_expanded_query_equals_the_reference_row(tmp_path, qe_k, alpha):
    g = clustered_data(800, 24, seed=qe_k)
    s = _searcher(tmp_path, g, qe_k, alpha, 1)
    queries = random_data(20, 24, seed=99) + g[:20]  # near gallery items, not copies
    ours = s.expand(queries)
    for i, q in enumerate(queries):
        ref_q, _, _ = reference_aqe(q[None], g, 1, qe_k, alpha)
        np.testing.assert_allclose(ours[i], ref_q[0], rtol=0, atol=1e-5 * np.linalg.norm(ref_q[0]))


def test_two_rounds_follow_the_serving_contract(tmp_path):
    g = clustered_data(500, 16, seed=4)
    s = _searcher(tmp_path, g, 6, 3.0, 2)
    q = g[7:8] * 1.1 + 0.05
    # round 1 against the raw gallery, round 2 against the gallery expanded once (no queries)
    _, g1, _ = reference_aqe(g[:0], g, 1, 6, 3.0)
    q1, _, _ = reference_aqe(q, g, 1, 6, 3.0)
    q2, _, _ = reference_aqe(q1, g1, 1, 6, 3.0)
    np.testing.assert_allclose(s.expand(q), q2, rtol=0, atol=1e-5 * np.linalg.norm(q2))


def test_ranking_equals_brute_force_over_the_expanded_gallery(tmp_path):
    g = clustered_data(900, 32, seed=8)
    s = _searcher(tmp_path, g, 10, 3.0, 1)
    _, g_exp, _ = reference_aqe(g[:0], g, 1, 10, 3.0)
    queries = g[::50] + 0.02
    hits = s.search(queries, k=15)
    expanded = s.expand(queries)
    sims = normalize(expanded) @ normalize(g_exp).T
    for i, row in enumerate(hits):
        expected = np.argsort(-sims[i], kind="stable")[:15]
        got = [h.row for h in row]
        np.testing.assert_allclose([h.score for h in row], sims[i, expected], atol=1e-5)
        # equal up to exact ties (duplicate gallery rows score the same)
        assert sorted(np.round(sims[i, got], 5)) == sorted(np.round(sims[i, expected], 5))
