"""The serving index ``auto`` picks: exact below the limit, else IVF within the memory budget, tuned."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from helpers import clustered_data

from aqe_retrieval.aqe import normalize_rows
from aqe_retrieval.faiss_search import exact_knn
from index_builder.config import AUTO_EXACT_MAX_N, ServingSpec
from index_builder.knn import sample_rows, set_recall
from index_builder.serving import build_serving_index, choose_serving_method

GIB = 2**30


def test_auto_serves_small_galleries_exactly():
    method, reason = choose_serving_method(5_000, 256, 4.0)
    assert method == "exact" and "5000" in reason
    assert choose_serving_method(AUTO_EXACT_MAX_N, 512, 4.0)[0] == "exact"
    assert choose_serving_method(AUTO_EXACT_MAX_N + 1, 512, 4.0)[0] != "exact"
    assert choose_serving_method(4000, 32, 4.0, exact_max_n=1000)[0] == "IVF64,Flat"


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
    with pytest.raises(ValueError, match="exact_max_n"):
        ServingSpec(method="auto", exact_max_n=-1)


def test_auto_builds_records_and_measures_the_chosen_index():
    u, _ = normalize_rows(clustered_data(4000, 32, seed=12))
    index, entry = build_serving_index(
        u, ServingSpec(method="auto", recall_sample=300), 1024, show_progress=False
    )
    assert entry.spec == "exact" and entry.index_type.startswith("IndexFlat")
    assert entry.recall_at_k is None and index.ntotal == 4000
    # above the limit auto measures candidates (tests/test_serving_auto.py); a given nprobe
    # keeps the IVF that fits the budget, measured, not tuned
    index, entry = build_serving_index(
        u,
        ServingSpec(method="auto", nprobe=2, recall_sample=300, exact_max_n=1000),
        1024,
        show_progress=False,
    )
    assert entry.spec == "IVF64,Flat" and entry.index_type == "IndexIVFFlat"
    assert entry.nprobe == 2 and entry.recall_at_k < 1 and entry.recall_sample == 300
    xq = u[sample_rows(4000, 300, 0)]
    truth = exact_knn(xq, u, 10)[1]
    assert set_recall(
        index.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=2))[1], truth
    ) == pytest.approx(entry.recall_at_k)
    # the service's exact fallback under filters reconstructs rows: IVF needs the direct map
    np.testing.assert_allclose(index.reconstruct_batch(np.array([0, 5, 3999])), u[[0, 5, 3999]])
