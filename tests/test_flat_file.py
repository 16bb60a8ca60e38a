"""The streamed flat index against FAISS's own: the same bytes, mapped, searched alike."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from helpers import random_data

from aqe_retrieval.faiss_search import exact_knn
from index_builder.flat_file import write_flat_index


@pytest.mark.parametrize(("n", "block"), [(1, 1), (257, 64), (1000, 1000), (1000, 7)])
def test_streamed_flat_index_is_faiss_own_file(tmp_path, n, block) -> None:
    x = random_data(n, 24, seed=n)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "u.npy", u)
    rows = np.load(tmp_path / "u.npy", mmap_mode="r")
    index = write_flat_index(tmp_path / "flat.faiss", rows, block)
    reference = faiss.IndexFlatIP(24)
    reference.add(u)
    assert (tmp_path / "flat.faiss").read_bytes() == faiss.serialize_index(reference).tobytes()
    xq = u[: min(n, 20)] + 0.01
    k = min(n, 5)
    sims, ids = index.search(xq, k)
    want_sims, want_ids = exact_knn(xq, u, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, rtol=1e-6)
    assert not list(tmp_path.glob(".flat.faiss.*"))  # the temporary name is gone


def test_an_empty_gallery_writes_an_empty_index(tmp_path) -> None:
    index = write_flat_index(tmp_path / "flat.faiss", np.empty((0, 8), np.float32), 16)
    assert index.ntotal == 0 and index.d == 8
