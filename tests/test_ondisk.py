"""On-disk inverted lists and the memory-bounded kernels, against in-memory FAISS and brute force."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers import clustered_data, random_data
from reference import reference_aqe

from aqe_retrieval import aqe, artifact
from aqe_retrieval.faiss_search import exact_knn, exact_knn_blocks, search_by_lists
from aqe_retrieval.searcher import Searcher
from index_builder.build import build
from index_builder.config import BuildConfig, ServingSpec
from index_builder.expansion import AqeParams, expand_block, expand_streamed
from index_builder.ivf_batch import batch_list_search
from index_builder.ondisk import OnDiskLists, fill_ondisk, is_ondisk
from index_builder.storage import ArrayStore
from index_builder.symmetric import symmetric_self_knn


def _u(n: int, d: int, seed: int = 0) -> np.ndarray:
    return aqe.normalize_rows(random_data(n, d, seed))[0]


def _trained(u: np.ndarray, method: str = "IVF32,Flat"):
    index = faiss.index_factory(u.shape[1], method, faiss.METRIC_INNER_PRODUCT)
    index.train(u)
    return index


@pytest.mark.parametrize("method", ["IVF32,Flat", "IVF32,SQ8"])
def test_on_disk_lists_search_like_in_memory_lists(tmp_path, method):
    u = _u(5000, 32)
    memory, disk = _trained(u, method), _trained(u, method)
    memory.add(u)
    lists = OnDiskLists(tmp_path / "x.ivfdata", tmp_path, shard_rows=1300)
    fill_ondisk(disk, u, lists)
    assert is_ondisk(disk) and not is_ondisk(memory) and disk.ntotal == 5000
    params = faiss.SearchParametersIVF(nprobe=6)
    np.testing.assert_array_equal(
        disk.search(u[:200], 10, params=params)[1], memory.search(u[:200], 10, params=params)[1]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ivfdata"]  # shards removed


def test_search_by_lists_finds_what_search_finds():
    u = _u(4000, 24, seed=3)
    index = _trained(u)
    index.add(u)
    want = index.search(u[:300], 10, params=faiss.SearchParametersIVF(nprobe=5))
    got = search_by_lists(index, u[:300], 10, 5)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)


def test_striped_kernels_equal_brute_force():
    u = _u(3000, 16, seed=4)
    truth_sims, truth = exact_knn(u, u, 7)
    sims, ids = symmetric_self_knn(u, 7, tile=256, workers=2, stripe=600)
    np.testing.assert_array_equal(ids, truth)
    np.testing.assert_allclose(sims, truth_sims, atol=1e-5)
    index = _trained(u, "IVF16,Flat")
    index.add(u)
    full = batch_list_search(index, u, 7, 4, 512, workers=2)
    striped = batch_list_search(index, u, 7, 4, 512, workers=2, stripe=700)
    np.testing.assert_array_equal(full[1], striped[1])


def test_streamed_expansion_equals_the_per_row_gather():
    x = clustered_data(2000, 16, seed=5)
    u, norms = aqe.normalize_rows(x)
    ids = exact_knn(u, u, 6)[1]
    want = expand_block(u, norms, u, ids, 3.0)
    got = np.empty_like(want)
    expand_streamed(u, norms, ids, 3.0, got, stripe=333, chunk=50)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_float16_gallery_scan_is_blockwise_and_exact():
    xb = _u(3000, 16).astype(np.float16)
    xq = _u(20, 16, seed=9)
    want = exact_knn(xq, xb.astype(np.float32), 5)
    got = exact_knn_blocks(xq, xb, 5, block=700)
    np.testing.assert_array_equal(got[1], want[1])


def test_an_array_store_is_ram_or_a_placed_memmap(tmp_path):
    assert type(ArrayStore().empty("a", (3, 2), np.float32)) is np.ndarray
    store = ArrayStore(tmp_path)
    store.place("level_0", tmp_path / "final.npy")
    a = store.empty("level_0", (4, 2), np.float32)
    b = store.empty("tmp", (4,), np.int64)
    assert isinstance(a, np.memmap) and Path(a.filename) == (tmp_path / "final.npy").resolve()
    assert isinstance(b, np.memmap)
    store.discard("tmp")
    store.discard("level_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.npy"]


@pytest.mark.parametrize("budget", [None, 52 * 2**20])
def test_float16_levels_expand_queries_like_the_float32_oracle(tmp_path, budget):
    g = random_data(3000, 24, seed=6)  # no near-ties that float16 rounding could reorder
    np.save(tmp_path / "g.npy", g)
    build(
        BuildConfig(
            gallery=tmp_path / "g.npy",
            root=tmp_path / "root",
            params=AqeParams(qe_k=5, alpha=3.0, qe_times=2),
            serving=ServingSpec(method="IVF16,Flat", nprobe=16),
            show_progress=False,
            level_dtype="float16",
            memory_budget=budget,
        )
    )
    art = artifact.load(tmp_path / "root")
    assert [lv.entry.dtype for lv in art.levels] == ["float16", "float16"]
    assert all(lv.rows.dtype == np.float16 for lv in art.levels)
    q = g[:12] * 1.1 + 0.05 * random_data(12, 24, seed=7)
    _, g1, _ = reference_aqe(g[:0], g, 1, 5, 3.0)
    q1, _, _ = reference_aqe(q, g, 1, 5, 3.0)
    q2, _, _ = reference_aqe(q1, g1, 1, 5, 3.0)
    ours = Searcher(art).expand(q)
    scale = np.linalg.norm(q2, axis=1, keepdims=True)
    assert (np.abs(ours - q2) / scale).max() < 2e-3  # float16 rows: 11 bits of mantissa


def test_shards_are_written_without_their_quantizer(tmp_path):
    """A shard file holds its lists and an empty quantizer: mapped shards hold no nlist x d each."""
    from index_builder.ondisk import _drop_quantizer

    u = _u(3000, 32)
    index = _trained(u, "IVF64,Flat")
    shard = faiss.clone_index(index)
    shard.add(u[:1000])
    sizes = [faiss.extract_index_ivf(shard).invlists.list_size(i) for i in range(64)]
    _drop_quantizer(shard)
    faiss.write_index(shard, str(tmp_path / "s.faiss"))
    mapped = faiss.read_index(str(tmp_path / "s.faiss"), faiss.IO_FLAG_MMAP)
    back = faiss.extract_index_ivf(mapped)
    assert back.quantizer.ntotal == 0 and faiss.extract_index_ivf(index).quantizer.ntotal == 64
    assert [back.invlists.list_size(i) for i in range(64)] == sizes
