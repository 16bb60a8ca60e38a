"""Properties of the AQE math (``aqe_retrieval.aqe``) and of whole-matrix expansion (``aqe_expand``).

Hypothesis draws the sizes and parameters and a seed; the rows come from a seeded generator
(Gaussian around a drawn common offset, rows of varied norms), so examples are cheap and ties
are rare. Properties that a tie at the ``qe_k`` boundary could break either ``assume`` a clear
gap at every boundary (measured with the reference's own similarities) or judge with
``tests/parity.py``'s tie allowance. The profile (derandomized, no example database) is set in
``conftest.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from parity import assert_parity
from reference import reference_aqe

from aqe_retrieval import aqe
from index_builder.expansion import AqeParams, Expansion, aqe_expand
from index_builder.inputs import as_source

FAST = settings(max_examples=60, deadline=None)
GAP = 1e-4  # a boundary closer than this counts as a (near-)tie

alphas = st.sampled_from([1.0, 2.0, 3.0, 4.0]) | st.floats(0.25, 5.0).map(lambda a: round(a, 2))
fractional = st.floats(0.1, 4.9).filter(lambda a: a != int(a))


def rows(seed: int, n: int, d: int, offset: float = 0.0) -> np.ndarray:
    """``n`` x ``d`` float32 rows: Gaussian around ``offset`` * (1, .., 1), norms from 0.3 to 3."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) + offset
    x *= rng.uniform(0.3, 3.0, size=(n, 1))
    return x.astype(np.float32)


def reference(query_feat, gallery_feat, qe_times, qe_k, alpha):
    """``reference_aqe`` with its NaN weights (fractional alpha, negative cosine) allowed."""
    with np.errstate(invalid="ignore"):
        return reference_aqe(query_feat, gallery_feat, qe_times, qe_k, alpha)


def boundary_gap(rounds: list[tuple[np.ndarray, np.ndarray]], qe_k: int) -> float:
    """Smallest gap, over rows and rounds, between the ``qe_k``-th and the next cosine."""
    gaps = []
    for _, sims in rounds:
        if sims.shape[1] > qe_k:
            top = -np.sort(-sims, axis=1)
            gaps.append((top[:, qe_k - 1] - top[:, qe_k]).min())
    return float(min(gaps, default=np.inf))


def expand_with_sets(x: np.ndarray, qe_k: int, alpha: float, qe_times: int, block_size: int = 7):
    """Our expansion of ``x`` (one graph over all rows) and each round's neighbour sets."""
    expansion = Expansion(
        as_source(x),
        AqeParams(qe_k=qe_k, alpha=alpha, qe_times=qe_times),
        block_size=block_size,
        show_progress=False,
    )
    sets = [level.knn.ids.copy() for level in expansion]
    return expansion.expanded, sets, expansion.report


# ------------------------------------------------------------------ the kernels in aqe.py


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 16))
def test_normalize_rows_floors_the_norm_and_recovers_the_raw_rows(seed, n, d):
    x = rows(seed, n, d)
    x[::5] *= 1e-14  # norms under the 1e-12 floor
    u, norms = aqe.normalize_rows(x)
    assert u.dtype == norms.dtype == np.float32 and u.shape == x.shape and norms.shape == (n,)
    np.testing.assert_allclose(norms, np.linalg.norm(x.astype(np.float64), axis=1), rtol=1e-6)
    np.testing.assert_allclose(u, x / np.maximum(norms, 1e-12)[:, None], rtol=1e-6, atol=0)
    big = norms >= 1e-12
    np.testing.assert_allclose(np.linalg.norm(u[big], axis=1), 1.0, rtol=1e-6)
    # a raw row is norm * u, except under the floor (u = x / 1e-12 there)
    np.testing.assert_allclose((norms[:, None] * u)[big], x[big], rtol=1e-6, atol=1e-6 * norms.max())
    inplace = x.copy()
    np.testing.assert_array_equal(aqe.normalize_rows_inplace(inplace, block_size=3), norms)
    np.testing.assert_array_equal(inplace, u)


@FAST
@given(
    st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=30),
    st.sampled_from([1.0, 2.0, 3.0, 4.0]) | fractional,
)
def test_weights_are_power_where_defined_and_zero_for_negative_cosines_with_fractional_alpha(sims, alpha):
    s = np.array(sims, dtype=np.float32)
    w = aqe.aqe_weights(s, alpha)
    assert w.dtype == np.float32 and np.isfinite(w).all()
    with np.errstate(invalid="ignore"):
        power = np.power(s, np.float32(alpha))
    if alpha == int(alpha):
        np.testing.assert_array_equal(w, power)  # negative cosines give (signed) powers
    else:
        np.testing.assert_array_equal(w[s < 0], 0.0)
        np.testing.assert_array_equal(w[s >= 0], power[s >= 0])


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 8), st.integers(1, 12), alphas)
def test_expand_rows_is_the_weighted_sum_over_qe_k_in_any_neighbour_order(seed, b, k, d, alpha):
    rng = np.random.default_rng(seed)
    feats = rows(seed, b * k, d).reshape(b, k, d)
    sims = rng.uniform(-1, 1, size=(b, k)).astype(np.float32)
    out = aqe.expand_rows(feats, sims, alpha)
    w = aqe.aqe_weights(sims, alpha).astype(np.float64)
    expected = np.einsum("bk,bkd->bd", w, feats.astype(np.float64)) / k
    assert out.dtype == np.float32 and out.shape == (b, d)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(feats).max())
    perm = rng.permutation(k)  # a neighbour set is a set: its order does not matter
    np.testing.assert_allclose(
        aqe.expand_rows(feats[:, perm], sims[:, perm], alpha), out, rtol=1e-5, atol=1e-5
    )


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(1, 12), alphas)
def test_qe_k_1_kernels_return_the_rows_themselves(seed, b, d, alpha):
    x = rows(seed, b, d)
    # a row's only neighbour is itself at cosine 1: weight 1 ** alpha, divided by qe_k = 1
    np.testing.assert_array_equal(aqe.expand_rows(x[:, None, :], np.ones((b, 1), np.float32), alpha), x)
    none = np.empty((b, 0, d), np.float32)
    np.testing.assert_array_equal(aqe.expand_queries(x, none, np.empty((b, 0), np.float32), alpha, 1), x)


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(2, 8), st.integers(1, 12), alphas)
def test_expand_queries_is_expand_rows_with_the_query_first_at_weight_one(seed, b, qe_k, d, alpha):
    rng = np.random.default_rng(seed)
    q = rows(seed, b, d)
    feats = rows(seed + 1, b * (qe_k - 1), d).reshape(b, qe_k - 1, d)
    sims = rng.uniform(-1, 1, size=(b, qe_k - 1)).astype(np.float32)
    got = aqe.expand_queries(q, feats, sims, alpha, qe_k)
    full = aqe.expand_rows(
        np.concatenate([q[:, None, :], feats], axis=1),
        np.concatenate([np.ones((b, 1), np.float32), sims], axis=1),
        alpha,
    )
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


@given(st.integers(-3, 0), st.integers(0, 100))
def test_effective_qe_k_refuses_less_than_one(qe_k, n):
    with pytest.raises(ValueError, match="qe_k must be >= 1"):
        aqe.effective_qe_k(qe_k, n)


@given(st.integers(1, 50), st.integers(1, 50))
def test_effective_qe_k_is_min_of_qe_k_and_n(qe_k, n):
    assert aqe.effective_qe_k(qe_k, n) == min(qe_k, n)


# ------------------------------------------------------------------ whole matrices: aqe_expand


@FAST
@given(
    st.integers(0, 2**32 - 1),
    st.integers(3, 40),
    st.integers(2, 12),
    st.integers(1, 6),
    alphas,
    st.integers(1, 2),
    st.data(),
)
def test_permuting_the_gallery_permutes_the_output(seed, n, d, qe_k, alpha, qe_times, data):
    qe_k = min(qe_k, n - 1)
    g = rows(seed, n, d, offset=0.5)
    _, _, rounds = reference(g[:0], g, qe_times, qe_k, alpha)
    assume(boundary_gap(rounds, qe_k) > GAP)  # no tie that two orders may break differently
    perm = np.array(data.draw(st.permutations(range(n))))
    _, out = aqe_expand(None, g, qe_times, qe_k, alpha)
    _, out_perm = aqe_expand(None, g[perm], qe_times, qe_k, alpha)
    np.testing.assert_allclose(out_perm, out[perm], rtol=1e-5, atol=1e-5 * np.abs(out).max())


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(2, 40), st.integers(2, 12), alphas, st.integers(1, 2))
def test_qe_k_1_is_the_identity_up_to_rounding(seed, n, d, alpha, qe_times):
    # Each row's one neighbour is itself, weight (u.u) ** alpha with u.u = 1 up to float32
    # rounding: the row comes back scaled by a factor within a few ulps of 1. Another row at a
    # cosine within rounding of 1 would tie for the only place: such inputs are left out.
    g = rows(seed, n, d)
    u = g / np.linalg.norm(g.astype(np.float64), axis=1, keepdims=True)
    assume((u @ u.T - 2 * np.eye(n)).max() < 1 - GAP)
    _, out = aqe_expand(None, g, qe_times, 1, alpha)
    np.testing.assert_allclose(out, g, rtol=1e-5, atol=0)
    scale = np.einsum("ij,ij->i", out.astype(np.float64), g) / np.einsum("ij,ij->i", g, g)
    np.testing.assert_allclose(scale, 1.0, atol=1e-5)
    q_out, g_out = aqe_expand(g[:1], g[1:], qe_times, 1, alpha)
    np.testing.assert_allclose(np.concatenate([q_out, g_out]), g, rtol=1e-5, atol=0)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(3, 40),
    st.integers(2, 16),
    st.integers(1, 8),
    alphas,
    st.integers(1, 2),
    st.floats(0.0, 1.5),
    st.integers(0, 5),
)
def test_parity_with_the_reference_in_both_modes(seed, n, d, qe_k, alpha, qe_times, offset, nq):
    qe_k = min(qe_k, n - 1)  # the reference needs N > qe_k
    nq = min(nq, n - 1)
    x = rows(seed, n, d, offset)
    ref_q, ref_g, rounds = reference(x[:nq], x[nq:], qe_times, qe_k, alpha)
    ref = np.concatenate([ref_q, ref_g])
    # a fractional alpha with a negative cosine in a set is NaN in the reference (undefined):
    # parity is judged where the reference is defined; the weight-0 rule is tested on its own
    assume(np.isfinite(ref).all())
    ours, sets, report = expand_with_sets(x, qe_k, alpha, qe_times, block_size=int(seed % 5) + 1)
    assert report.effective_qe_k == qe_k
    assert_parity(ours, sets, ref, rounds)
    # the public drop-in, queries first as in the reference (transductive; serving when nq = 0)
    q_out, g_out = aqe_expand(x[:nq] if nq else None, x[nq:], qe_times, qe_k, alpha)
    assert q_out.shape == (nq, d) and g_out.shape == (n - nq, d)
    np.testing.assert_allclose(np.concatenate([q_out, g_out]), ours, rtol=0, atol=1e-6 * np.abs(ours).max())


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(2, 8), fractional, st.integers(0, 3))
def test_fractional_alpha_gives_negative_cosines_weight_zero(seed, n, d, alpha, extra):
    # qe_k >= n: every row is every row's neighbour (clamped to n, so no tie can matter), and the
    # offset-free rows guarantee negative cosines in the sets
    x = rows(seed, n, d)
    _, out = aqe_expand(None, x, 1, n + extra, alpha)
    assert np.isfinite(out).all()
    x64 = x.astype(np.float64)
    u = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    s = u @ u.T
    assume(np.abs(s).min() > 1e-3)  # no cosine whose sign float32 rounding could flip
    w = np.where(s < 0, 0.0, np.abs(s) ** alpha)
    np.testing.assert_allclose(out, w @ x64 / n, rtol=1e-4, atol=1e-5 * np.abs(x).max())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(2, 8), st.integers(0, 5), alphas)
def test_qe_k_at_least_n_is_clamped_and_reported(seed, n, d, extra, alpha):
    x = rows(seed, n, d)
    out, sets, report = expand_with_sets(x, n + extra, alpha, 1)
    assert report.effective_qe_k == n
    assert sets[0].shape == (n, n) and all(sorted(r) == list(range(n)) for r in sets[0].tolist())
    assert out.shape == x.shape and np.isfinite(out).all()
