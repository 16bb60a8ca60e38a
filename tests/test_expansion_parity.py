"""Blockwise FAISS AQE against the dense reference port, both modes, the issue's grid."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import clustered_data, random_data
from parity import assert_parity
from reference import reference_aqe

from index_builder.expansion import AqeParams, Expansion, aqe_expand
from index_builder.inputs import as_source


def ours_with_sets(x: np.ndarray, qe_k: int, alpha: float, qe_times: int, block_size: int = 97):
    expansion = Expansion(
        as_source(x),
        AqeParams(qe_k=qe_k, alpha=alpha, qe_times=qe_times),
        block_size=block_size,
        show_progress=False,
    )
    sets = [level.knn.ids.copy() for level in expansion]
    return expansion.expanded, sets, expansion.report


GRID = [
    # (kind, n, d, qe_k, alpha, qe_times)
    ("random", 20, 8, 1, 3.0, 1),
    ("random", 20, 8, 2, 1.0, 2),
    ("clustered", 200, 8, 10, 3.0, 1),
    ("clustered", 300, 64, 10, 0.5, 2),
    ("clustered", 500, 64, 2, 1.0, 1),
    ("random", 400, 512, 10, 3.0, 2),
    ("clustered", 1000, 64, 10, 3.0, 2),
    ("clustered", 5000, 64, 10, 3.0, 1),
    ("random", 2000, 512, 10, 0.5, 1),
]


@pytest.mark.parametrize(("kind", "n", "d", "qe_k", "alpha", "qe_times"), GRID)
def test_transductive_matches_reference(kind, n, d, qe_k, alpha, qe_times):
    make = clustered_data if kind == "clustered" else random_data
    x = make(n, d, seed=n + d)
    nq = max(1, n // 10)
    ref_q, ref_g, rounds = reference_aqe(x[:nq], x[nq:], qe_times, qe_k, alpha)
    ours, sets, _ = ours_with_sets(x, qe_k, alpha, qe_times)
    exempt = assert_parity(ours, sets, np.concatenate([ref_q, ref_g]), rounds)
    if kind == "random":
        assert exempt == 0
    # and through the public drop-in, queries first as in the reference
    q_out, g_out = aqe_expand(x[:nq], x[nq:], qe_times, qe_k, alpha)
    np.testing.assert_allclose(np.concatenate([q_out, g_out]), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("kind", "n", "d", "qe_k", "alpha", "qe_times"), GRID[:7])
def test_serving_gallery_matches_reference_without_queries(kind, n, d, qe_k, alpha, qe_times):
    make = clustered_data if kind == "clustered" else random_data
    g = make(n, d, seed=2 * n + d)
    _, ref_g, rounds = reference_aqe(g[:0], g, qe_times, qe_k, alpha)
    ours, sets, _ = ours_with_sets(g, qe_k, alpha, qe_times)
    assert_parity(ours, sets, ref_g, rounds)
    _, g_out = aqe_expand(None, g, qe_times, qe_k, alpha)
    np.testing.assert_allclose(g_out, ours, rtol=0, atol=1e-5)


def test_block_size_never_changes_the_result():
    x = clustered_data(700, 32, seed=11)
    results = [ours_with_sets(x, 10, 3.0, 2, block_size=b)[0] for b in (1, 7, 128, 10_000)]
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=0, atol=1e-6)


def test_float16_input_gives_the_float32_result_of_the_same_values():
    x16 = clustered_data(400, 48, seed=5).astype(np.float16)
    a, _, _ = ours_with_sets(x16, 10, 3.0, 1)
    b, _, _ = ours_with_sets(x16.astype(np.float32), 10, 3.0, 1)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32


def test_qe_k_is_clamped_to_n_and_reported():
    x = random_data(5, 8, seed=1)
    out, sets, report = ours_with_sets(x, 10, 3.0, 1)
    assert report.effective_qe_k == 5
    assert sets[0].shape == (5, 5)
    # with every row as a neighbour the expansion is the weighted mean over all rows
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = ((u @ u.T) ** 3) @ x / 5
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_non_integer_alpha_gives_negative_cosines_weight_zero():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.05]], dtype=np.float32)
    out, _, _ = ours_with_sets(x, 3, 0.5, 1)
    assert np.isfinite(out).all()
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T
    w = np.where(s < 0, 0.0, np.abs(s) ** 0.5)
    np.testing.assert_allclose(out, w @ x / 3, rtol=0, atol=1e-6)


def test_self_is_always_a_neighbour_without_ties():
    x = random_data(300, 16, seed=9)
    _, sets, _ = ours_with_sets(x, 4, 3.0, 1)
    assert (sets[0] == np.arange(300)[:, None]).any(axis=1).all()
