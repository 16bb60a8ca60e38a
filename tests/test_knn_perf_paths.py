"""The fast kNN paths against brute force: the symmetric exact kernel, batch search over inverted
lists, and the serving index that ``auto`` picks."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from helpers import clustered_data, random_data
from parity import assert_parity
from reference import reference_aqe

from aqe_retrieval.aqe import normalize_rows
from aqe_retrieval.errors import KnnConfigError
from index_builder import build as build_mod
from index_builder import knn
from index_builder.build import ServingSpec, build_serving_index, choose_serving_method
from index_builder.expansion import AqeParams, expand_source
from index_builder.inputs import as_source
from index_builder.knn import KnnSpec, self_knn, set_recall

TIE = 1e-5


def brute_force(u: np.ndarray) -> np.ndarray:
    return u.astype(np.float64) @ u.T.astype(np.float64)


def assert_exact_topk(u: np.ndarray, ids: np.ndarray, sims: np.ndarray, k: int) -> None:
    """Valid exact top-k of every row: any member of a tie at the boundary is allowed."""
    s = brute_force(u)
    n = len(u)
    assert ids.shape == sims.shape == (n, k)
    assert (ids >= 0).all() and (ids < n).all()
    assert all(len(set(row)) == k for row in ids.tolist()), "a row repeats a neighbour"
    # the returned similarity is the neighbour's true cosine (the GEMM's float32 value)
    np.testing.assert_allclose(sims, np.take_along_axis(s, ids, axis=1), atol=TIE)
    # sorted best first, and the k best values are exactly brute force's k best values
    assert (np.diff(sims, axis=1) <= 0).all()
    np.testing.assert_allclose(sims, -np.sort(-s, axis=1)[:, :k], atol=TIE)


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def workers(request, monkeypatch):
    monkeypatch.setattr(knn, "_workers", lambda: request.param)
    return request.param


@pytest.mark.parametrize(
    ("n", "d", "k", "tile"),
    [
        (1, 4, 1, 1),  # a single row
        (40, 4, 3, 1),  # tiles of one row
        (37, 8, 37, 5),  # k = n, n not divisible by the tile
        (101, 16, 1, 7),  # k = 1: each row's own
        (257, 24, 10, 64),  # odd n, last tile of one row
        (500, 24, 7, 33),
        (300, 12, 10, 1000),  # one tile holds everything
        (64, 8, 20, 4),  # k larger than the tile
    ],
)
def test_symmetric_kernel_equals_brute_force(n, d, k, tile, workers):
    u, _ = normalize_rows(random_data(n, d, seed=n + d))
    sims, ids = knn.symmetric_self_knn(u, k, tile)
    assert_exact_topk(u, ids, sims, k)
    if k == 1:
        np.testing.assert_array_equal(ids[:, 0], np.arange(n))  # no ties in random data
    if k == n:
        assert all(set(row) == set(range(n)) for row in ids.tolist())


@pytest.mark.parametrize("tile", [5, 9, 128])
def test_symmetric_kernel_with_duplicates_differs_only_inside_ties(tile, workers):
    x = clustered_data(400, 16, seed=4)  # exact duplicate rows: ties at the k-th place
    x[100:120] = x[99]  # and a block of 21 identical rows (k = 10 inside it)
    u, _ = normalize_rows(x)
    sims, ids = knn.symmetric_self_knn(u, 10, tile)
    assert_exact_topk(u, ids, sims, 10)
    assert set(ids[105].tolist()) <= set(range(99, 120))


def test_self_knn_uses_the_symmetric_kernel_by_size(monkeypatch):
    calls = []
    real = knn.symmetric_self_knn
    monkeypatch.setattr(knn, "symmetric_self_knn", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert not knn.use_symmetric(knn.SYMMETRIC_MIN_N - 1) and knn.use_symmetric(knn.SYMMETRIC_MIN_N)
    assert knn.use_symmetric(10, "symmetric") and not knn.use_symmetric(10**7, "faiss")
    u, _ = normalize_rows(random_data(300, 16, seed=5))
    faiss_path = self_knn(u, 5, KnnSpec(exact_kernel="faiss"), 64)
    assert not calls
    sym_path = self_knn(u, 5, KnnSpec(exact_kernel="symmetric"), 64)
    assert calls and sym_path.recall is None
    np.testing.assert_array_equal(sym_path.ids, faiss_path.ids)
    np.testing.assert_allclose(sym_path.sims, faiss_path.sims, atol=1e-6)
    with pytest.raises(ValueError, match="exact_kernel"):
        KnnSpec(exact_kernel="fast")


def test_symmetric_kernel_reports_progress_of_every_row():
    u, _ = normalize_rows(random_data(333, 8, seed=6))
    seen = []
    self_knn(u, 4, KnnSpec(exact_kernel="symmetric"), 50, seen.append)
    assert sum(seen) == 333 and all(s > 0 for s in seen)


def test_worker_errors_reach_the_caller(monkeypatch):
    monkeypatch.setattr(knn, "_workers", lambda: 2)

    def boom(task, slot):
        raise RuntimeError(f"tile {task}")

    with pytest.raises(RuntimeError, match="tile"):
        knn._run([1, 2, 3], boom, 2, lambda t: None)


@pytest.mark.parametrize(
    ("kind", "n", "d", "qe_k", "alpha", "qe_times"),
    [
        ("random", 400, 512, 10, 3.0, 2),
        ("clustered", 1000, 64, 10, 3.0, 2),
        ("clustered", 300, 64, 10, 0.5, 2),
    ],
)
def test_aqe_parity_through_the_symmetric_kernel(kind, n, d, qe_k, alpha, qe_times):
    make = clustered_data if kind == "clustered" else random_data
    x = make(n, d, seed=n + d)
    nq = n // 10
    ref_q, ref_g, rounds = reference_aqe(x[:nq], x[nq:], qe_times, qe_k, alpha)
    sets: list[np.ndarray] = []
    ours, _ = expand_source(
        as_source(x),
        AqeParams(qe_k=qe_k, alpha=alpha, qe_times=qe_times),
        KnnSpec(exact_kernel="symmetric"),
        block_size=97,
        on_level=lambda t, u, norms, r: sets.append(r.ids.copy()),
        show_progress=False,
    )
    assert_parity(ours, sets, np.concatenate([ref_q, ref_g]), rounds)


# -- batch search over inverted lists -----------------------------------------------------------


@pytest.mark.parametrize(("nprobe", "workers"), [(1, 2), (4, 1), (32, 2)])
def test_batch_lists_finds_what_row_by_row_ivf_search_finds(nprobe, workers, monkeypatch):
    monkeypatch.setattr(knn, "_workers", lambda: workers)
    u, _ = normalize_rows(clustered_data(2000, 32, seed=2))
    plain = self_knn(u, 10, KnnSpec(method="IVF32,Flat", nprobe=nprobe, recall_sample=500), 512)
    batch = self_knn(
        u, 10, KnnSpec(method="IVF32,Flat", nprobe=nprobe, recall_sample=500, batch_lists=True), 512
    )
    # same candidates (the nprobe nearest lists), so the same top-k values row by row...
    np.testing.assert_allclose(batch.sims, plain.sims, atol=TIE)
    # ...and the same sets except inside ties
    differ = [i for i in range(len(u)) if set(batch.ids[i]) != set(plain.ids[i])]
    s = brute_force(u)
    for i in differ:
        extra = np.setdiff1d(batch.ids[i], plain.ids[i])
        assert np.abs(s[i, extra] - batch.sims[i, -1]).max() <= TIE
    assert batch.recall == pytest.approx(plain.recall, abs=0.002)
    assert batch.index is not None and batch.index.ntotal == len(u)
    if nprobe == 32:  # all lists probed: exact
        assert_exact_topk(u, batch.ids, batch.sims, 10)


def test_batch_lists_sorted_exact_cosines_and_chunked_lists(monkeypatch):
    monkeypatch.setattr(knn, "SYMMETRIC_TILE", 8)  # lists split into chunks of 64 / size rows
    u, _ = normalize_rows(random_data(800, 16, seed=8))
    res = self_knn(u, 5, KnnSpec(method="IVF4,Flat", nprobe=4, batch_lists=True, train_size=800), 100)
    assert_exact_topk(u, res.ids, res.sims, 5)
    assert res.recall == 1.0


def test_batch_lists_refuses_what_it_cannot_search():
    u, _ = normalize_rows(random_data(2000, 16, seed=9))
    with pytest.raises(KnnConfigError, match="IVF<nlist>,Flat"):
        self_knn(u, 5, KnnSpec(method="IVF16,PQ4", batch_lists=True), 500)
    with pytest.raises(KnnConfigError, match="IVF<nlist>,Flat"):
        self_knn(u, 5, KnnSpec(method="HNSW8", batch_lists=True), 500)
    with pytest.raises(ValueError, match="batch_lists"):
        KnnSpec(batch_lists=True)


# -- serving index: auto ------------------------------------------------------------------------

GIB = 2**30


def test_auto_serves_small_galleries_exactly():
    method, reason = choose_serving_method(50_000, 256, 4.0)
    assert method == "exact" and "50000" in reason
    assert choose_serving_method(build_mod.AUTO_EXACT_MAX_N, 512, 4.0)[0] == "exact"


def test_auto_serves_large_galleries_with_ivf_near_4_sqrt_n():
    method, reason = choose_serving_method(1_000_000, 256, 4.0)
    assert method == "IVF4096,Flat" and "GiB" in reason
    assert choose_serving_method(300_000, 128, 4.0)[0] == "IVF2048,Flat"
    assert choose_serving_method(10_000_000, 64, 16.0)[0] == "IVF16384,Flat"


@pytest.mark.parametrize(
    ("n", "d", "budget"),
    [
        (1_000_000, 256, 4.0),
        (1_000_000, 256, 0.5),
        (1_000_000, 256, 0.1),
        (5_000_000, 768, 2.0),
        (100_000, 4096, 1.0),  # small, but flat (1.5 GiB) does not fit: approximate
    ],
)
def test_auto_stays_within_the_memory_budget(n, d, budget):
    method, _ = choose_serving_method(n, d, budget)
    assert method != "exact"
    nlist, storage = method.removeprefix("IVF").split(",")
    row = {"Flat": 4 * d, "SQ8": d}.get(storage) or int(storage.removeprefix("PQ"))
    assert n * (row + 16) + int(nlist) * d * 4 <= budget * GIB
    # and it is the finest storage that fits: the next finer one would not
    finer = {"Flat": None, "SQ8": 4 * d}.get(storage, d)
    if finer is not None:
        assert n * (finer + 16) + int(nlist) * d * 4 > budget * GIB
    index = faiss.index_factory(d, method, faiss.METRIC_INNER_PRODUCT)  # a valid factory string
    assert faiss.extract_index_ivf(index).nlist == int(nlist)


def test_auto_refuses_a_budget_nothing_fits():
    with pytest.raises(ValueError, match="too small"):
        choose_serving_method(10_000_000, 256, 0.1)
    with pytest.raises(ValueError, match="memory_budget_gib"):
        ServingSpec(method="auto", memory_budget_gib=0)


def test_auto_builds_records_and_measures_the_chosen_index(monkeypatch):
    u, _ = normalize_rows(clustered_data(4000, 32, seed=12))
    index, entry = build_serving_index(
        u, ServingSpec(method="auto", recall_sample=300), 1024, show_progress=False
    )
    assert entry.spec == "exact" and entry.index_type.startswith("IndexFlat")
    assert entry.recall_at_k is None and index.ntotal == 4000
    monkeypatch.setattr(build_mod, "AUTO_EXACT_MAX_N", 1000)
    index, entry = build_serving_index(
        u, ServingSpec(method="auto", recall_sample=300), 1024, show_progress=False
    )
    assert entry.spec == "IVF64,Flat" and entry.index_type == "IndexIVFFlat"
    assert entry.nprobe in (*build_mod.AUTO_NPROBE_LADDER, 64)
    assert entry.recall_at_k >= 0.95 and entry.recall_sample == 300
    # the smallest nprobe of the ladder that reaches the target: the one before it does not
    xq = u[knn.sample_rows(4000, 300, 0)]
    truth = knn.exact_knn(xq, u, 10)[1]
    assert set_recall(
        index.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=entry.nprobe))[1], truth
    ) == pytest.approx(entry.recall_at_k)
    smaller = [p for p in build_mod.AUTO_NPROBE_LADDER if p < entry.nprobe]
    if smaller:
        below = set_recall(
            index.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=smaller[-1]))[1], truth
        )
        assert below < 0.95
    # the service's exact fallback under filters reconstructs rows: IVF needs the direct map
    np.testing.assert_allclose(index.reconstruct_batch(np.array([0, 5, 3999])), u[[0, 5, 3999]])
    # a given nprobe is kept, not tuned
    _, entry = build_serving_index(
        u, ServingSpec(method="auto", nprobe=2, recall_sample=300), 1024, show_progress=False
    )
    assert entry.nprobe == 2 and entry.recall_at_k < 1


def test_cli_serving_index_auto_and_fast_knn_flags(tmp_path, small_gallery):
    from aqe_retrieval import artifact
    from index_builder.cli import main

    _, paths = small_gallery
    root = tmp_path / "root"
    args = [
        "build",
        "--gallery",
        str(paths["gallery"]),
        "--root",
        str(root),
        "--no-progress",
        "--serving-index",
        "auto",
        "--serving-memory-budget-gib",
        "1",
    ]
    assert main([*args, "--exact-kernel", "symmetric"]) == 0
    assert main([*args, "--knn", "IVF8,Flat", "--nprobe", "8", "--batch-lists"]) == 0
    first, second = artifact.version_ids(root)
    m1, m2 = artifact.read_manifest(root, first), artifact.read_manifest(root, second)
    assert m1.serving_index.spec == "exact" and m1.graph_recall is None
    assert m2.graph_recall > 0.99  # all 8 lists probed: only ties between duplicates differ
    assert main([*args, "--knn", "HNSW8", "--batch-lists"]) == 2
    with pytest.raises(SystemExit):
        main([*args, "--exact-kernel", "nope"])
