"""Re-ID metrics: hand-computed cases and a loop-based pure-Python oracle."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index_builder.evaluation import ReidMetrics, rank_metrics, topk_metrics

# --- independent brute force: plain Python lists and loops, no numpy ranking ---


def _brute_query(ranked, q_pid, q_cam, g_pids, g_cams, num_pos, k_norm):
    """AP, first-hit rank (None if no hit), INP for one query over a ranked list of indices."""
    kept = [j for j in ranked if j >= 0 and not (g_pids[j] == q_pid and g_cams[j] == q_cam)]
    hits = 0
    precisions = []
    first = None
    last = None
    for rank, j in enumerate(kept, start=1):
        if g_pids[j] == q_pid:
            hits += 1
            precisions.append(hits / rank)
            if first is None:
                first = rank
            last = rank
    ap = sum(precisions) / min(num_pos, k_norm)
    inp = num_pos / last if hits == num_pos else 0.0
    return ap, first, inp


def _brute(order_rows, q_pids, g_pids, q_cams, g_cams, curve_len, k_norm):
    """Average brute-force scores: (mAP, mINP, cmc list, valid, skipped), None if all skipped."""
    aps, inps, firsts, skipped = [], [], [], 0
    for qi, ranked in enumerate(order_rows):
        num_pos = sum(1 for j in range(len(g_pids)) if g_pids[j] == q_pids[qi] and g_cams[j] != q_cams[qi])
        if num_pos == 0:
            skipped += 1
            continue
        ap, first, inp = _brute_query(ranked, q_pids[qi], q_cams[qi], g_pids, g_cams, num_pos, k_norm)
        aps.append(ap)
        inps.append(inp)
        firsts.append(first)
    if not aps:
        return None
    cmc = [sum(1 for f in firsts if f is not None and f <= k) / len(firsts) for k in range(1, curve_len + 1)]
    return sum(aps) / len(aps), sum(inps) / len(inps), cmc, len(aps), skipped


def _python_order(row: list[float]) -> list[int]:
    """Indices by similarity descending, ties by index ascending."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


def _brute_full(sim, q_pids, g_pids, q_cams, g_cams, max_rank=50):
    """Oracle for rank_metrics: sort each row by (-similarity, index) in Python."""
    g = len(g_pids)
    rows = [_python_order(row) for row in sim.tolist()]
    return _brute(rows, q_pids, g_pids, q_cams, g_cams, min(max_rank, g), k_norm=g)


def _assert_matches(m: ReidMetrics, expected) -> None:
    mean_ap, mean_inp, cmc, valid, skipped = expected
    assert m.mean_ap == pytest.approx(mean_ap, abs=1e-12)
    assert m.mean_inp == pytest.approx(mean_inp, abs=1e-12)
    np.testing.assert_allclose(m.cmc, cmc, atol=1e-12)
    assert (m.num_valid, m.num_skipped) == (valid, skipped)


def _random_case(seed, nq, ng, n_pids, n_cams, levels):
    """Seeded labels and a similarity quantised to ``levels`` values so ties are common."""
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, levels, size=(nq, ng)).astype(np.float64) / levels
    return (
        sim,
        rng.integers(0, n_pids, nq),
        rng.integers(0, n_pids, ng),
        rng.integers(0, n_cams, nq),
        rng.integers(0, n_cams, ng),
    )


# --- hand-computed cases ---


def test_hand_case_ap_cmc_inp_with_junk_removed() -> None:
    # Ranked: g0 pos, g1 neg, g2 junk (same pid+cam), g3 pos, g4 neg -> kept ranks 1..4.
    sim = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    m = rank_metrics(sim, [1], [1, 2, 1, 1, 3], [0], [1, 1, 0, 2, 1])
    assert m.mean_ap == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m.mean_inp == pytest.approx(2 / 3)
    np.testing.assert_array_equal(m.cmc, [1, 1, 1, 1, 1])
    assert (m.num_valid, m.num_skipped) == (1, 0)


def test_first_hit_late() -> None:
    sim = np.array([[0.9, 0.8, 0.7, 0.1]])
    m = rank_metrics(sim, [5], [1, 2, 5, 3], [0], [1, 1, 1, 1], max_rank=3)
    assert m.mean_ap == pytest.approx(1 / 3)
    assert m.mean_inp == pytest.approx(1 / 3)
    np.testing.assert_array_equal(m.cmc, [0, 0, 1])
    assert m.rank(1) == 0.0 and m.rank(3) == 1.0


def test_same_camera_junk_does_not_count_but_other_identity_same_camera_does() -> None:
    # Junk (pid 1, cam 0) outranks the positive: ignored. A same-camera other pid is a negative.
    m = rank_metrics(np.array([[0.9, 0.8]]), [1], [1, 1], [0], [0, 1])
    assert (m.mean_ap, m.rank(1)) == (1.0, 1.0)
    m = rank_metrics(np.array([[0.9, 0.8]]), [1], [2, 1], [0], [0, 1])
    assert (m.mean_ap, m.rank(1)) == (0.5, 0.0)


def test_ties_break_by_gallery_index() -> None:
    sim = np.zeros((1, 4))
    m = rank_metrics(sim, [1], [9, 1, 9, 1], [0], [1, 1, 1, 1])
    assert m.mean_ap == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m.mean_inp == pytest.approx(2 / 4)
    m = rank_metrics(sim, [1], [1, 9, 1, 9], [0], [1, 1, 1, 1])
    assert m.mean_ap == pytest.approx((1 + 2 / 3) / 2)


def test_queries_without_positive_are_skipped() -> None:
    sim = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    # q0: only same-cam copy -> skipped; q1: positive at rank 1; q2: pid absent -> skipped.
    m = rank_metrics(sim, [1, 2, 7], [1, 2], [0, 0, 0], [0, 1])
    assert (m.num_valid, m.num_skipped) == (1, 2)
    assert m.mean_ap == 1.0


def test_all_skipped_raises() -> None:
    with pytest.raises(ValueError, match="no query has a positive"):
        rank_metrics(np.ones((1, 2)), [1], [1, 2], [0], [0, 0])


def test_curve_truncated_to_gallery_and_rank_bounds() -> None:
    m = rank_metrics(np.array([[0.1, 0.2]]), [1], [1, 2], [0], [1, 1])
    assert len(m.cmc) == 2
    with pytest.raises(ValueError, match="rank k=5"):
        m.rank(5)


def test_as_dict_is_json_ready() -> None:
    m = rank_metrics(np.eye(12), np.arange(12), np.arange(12), np.zeros(12), np.ones(12))
    d = json.loads(json.dumps(m.as_dict()))
    assert d["mAP"] == 1.0 and d["rank1"] == 1.0 and d["rank10"] == 1.0
    assert len(d["cmc"]) == 12 and d["num_valid"] == 12 and d["num_skipped"] == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sim": np.ones(3)}, "2-D"),
        ({"q_pids": [1, 2]}, "q_pids"),
        ({"g_camids": [0]}, "g_camids"),
        ({"sim": np.array([[np.nan, 1.0]])}, "NaN"),
        ({"max_rank": 0}, "max_rank"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_rank_metrics_rejects_bad_input(kwargs, match) -> None:
    args: dict[str, Any] = {
        "sim": np.ones((1, 2)),
        "q_pids": [1],
        "g_pids": [1, 2],
        "q_camids": [0],
        "g_camids": [1, 1],
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rank_metrics(**args)


# --- oracle comparisons ---


@pytest.mark.parametrize("seed", range(6))
def test_rank_metrics_matches_brute_force(seed: int) -> None:
    sim, qp, gp, qc, gc = _random_case(seed, nq=37, ng=53, n_pids=9, n_cams=3, levels=7)
    m = rank_metrics(sim, qp, gp, qc, gc, max_rank=20, block_size=8)
    _assert_matches(m, _brute_full(sim, qp.tolist(), gp.tolist(), qc.tolist(), gc.tolist(), 20))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    nq=st.integers(1, 12),
    ng=st.integers(1, 15),
    block=st.integers(1, 13),
)
def test_rank_metrics_oracle_and_block_invariance(seed: int, nq: int, ng: int, block: int) -> None:
    sim, qp, gp, qc, gc = _random_case(seed, nq, ng, n_pids=4, n_cams=2, levels=3)
    expected = _brute_full(sim, qp.tolist(), gp.tolist(), qc.tolist(), gc.tolist())
    if expected is None:
        with pytest.raises(ValueError, match="no query has a positive"):
            rank_metrics(sim, qp, gp, qc, gc, block_size=block)
        return
    _assert_matches(rank_metrics(sim, qp, gp, qc, gc, block_size=block), expected)


# --- top-K variant ---


def test_topk_hand_case() -> None:
    # Query pid 1 cam 0, 3 positives in the gallery; K=2 list [pos, neg] -> AP@2 = 1/min(3, 2).
    g_pids, g_cams = [1, 1, 1, 2, 1], [1, 2, 1, 1, 0]
    m = topk_metrics([[0, 3]], [1], g_pids, [0], g_cams)
    assert m.mean_ap == pytest.approx(0.5)
    assert m.mean_inp == 0.0  # hardest positive not listed
    np.testing.assert_array_equal(m.cmc, [1, 1])
    # Junk (row 4) and an empty slot are dropped; positives re-ranked 1, 2.
    m = topk_metrics([[4, 0, -1, 2]], [1], g_pids, [0], g_cams)
    assert m.mean_ap == pytest.approx((1 + 1) / 3)
    # All three positives listed, hardest at kept rank 4.
    m = topk_metrics([[3, 0, 1, 2]], [1], g_pids, [0], g_cams, max_rank=3)
    assert m.mean_ap == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    assert m.mean_inp == pytest.approx(3 / 4)
    np.testing.assert_array_equal(m.cmc, [0, 1, 1])


def test_topk_no_hit_and_skipped() -> None:
    m = topk_metrics([[1], [0]], [1, 5], [1, 2], [0, 0], [1, 1])
    assert (m.num_valid, m.num_skipped) == (1, 1)
    assert (m.mean_ap, m.mean_inp, m.rank(1)) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (np.array([[0, 0]]), "repeats"),
        (np.array([[2]]), "ranked_ids must lie"),
        (np.array([[-2]]), "ranked_ids must lie"),
        (np.array([[0.0]]), "integers"),
        (np.zeros((1, 0), dtype=int), "K >= 1"),
    ],
)
def test_topk_rejects_bad_ids(ids, match) -> None:
    with pytest.raises(ValueError, match=match):
        topk_metrics(ids, [1], [1, 2], [0], [1, 1])


@pytest.mark.parametrize("seed", range(6))
def test_topk_matches_brute_force(seed: int) -> None:
    sim, qp, gp, qc, gc = _random_case(seed, nq=29, ng=41, n_pids=7, n_cams=3, levels=11)
    k = 9
    full = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    rng = np.random.default_rng(seed)
    full[rng.random(full.shape) < 0.1] = -1  # FAISS-style empty slots
    m = topk_metrics(full, qp, gp, qc, gc, max_rank=5)
    expected = _brute(full.tolist(), qp.tolist(), gp.tolist(), qc.tolist(), gc.tolist(), 5, k)
    _assert_matches(m, expected)


@pytest.mark.parametrize("seed", range(4))
def test_topk_over_whole_gallery_equals_rank_metrics(seed: int) -> None:
    sim, qp, gp, qc, gc = _random_case(seed, nq=20, ng=30, n_pids=6, n_cams=3, levels=5)
    ranked = np.argsort(-sim, axis=1, kind="stable")
    full = rank_metrics(sim, qp, gp, qc, gc)
    top = topk_metrics(ranked, qp, gp, qc, gc)
    assert top.mean_ap == pytest.approx(full.mean_ap, abs=1e-12)
    assert top.mean_inp == pytest.approx(full.mean_inp, abs=1e-12)
    np.testing.assert_allclose(top.cmc, full.cmc)
    assert (top.num_valid, top.num_skipped) == (full.num_valid, full.num_skipped)
