"""Parquet shards read in blocks: exact rows across row groups, and memory of one row group."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import random_data

from aqe_retrieval.errors import InputError
from index_builder.inputs import open_embeddings


def _write(path, x, row_group_size, kind="fixed", first_id=0):
    values = pa.array(x.ravel())
    d = x.shape[1]
    if kind == "fixed":
        emb = pa.FixedSizeListArray.from_arrays(values, d)
    else:
        emb = pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, d, dtype=np.int32)), values)
    table = pa.table({"embedding": emb, "id": pa.array([f"r{first_id + i}" for i in range(len(x))])})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.mark.parametrize("kind", ["fixed", "variable"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_blocks_cut_across_row_groups_and_return_every_row_once(tmp_path, kind, dtype):
    x = random_data(1000, 12, seed=1).astype(dtype)
    source = open_embeddings(_write(tmp_path / "g.parquet", x, 130, kind))
    assert (source.n, source.d, source.dtype) == (1000, 12, np.dtype(dtype))
    blocks = list(source.blocks(300))
    assert [start for start, _ in blocks] == [0, 300, 600, 900]
    assert [len(b) for _, b in blocks] == [300, 300, 300, 100]
    assert all(b.dtype == np.float32 for _, b in blocks)
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), x.astype(np.float32))
    rows = np.array([0, 129, 130, 131, 777, 999])
    np.testing.assert_array_equal(source.take(rows), x[rows].astype(np.float32))


def test_blocks_of_a_directory_follow_file_order(tmp_path):
    x = random_data(500, 8, seed=2)
    (tmp_path / "g").mkdir()
    for i, (lo, hi) in enumerate([(0, 200), (200, 210), (210, 500)]):
        _write(tmp_path / "g" / f"part-{i:03d}.parquet", x[lo:hi], 64, first_id=lo)
    (tmp_path / "g" / "_SUCCESS").write_text("")
    source = open_embeddings(tmp_path / "g")
    assert len(source.paths) == 3 and source.n == 500
    got = dict(source.blocks(128))
    assert sorted(got) == [0, 128, 200, 210, 338, 466]  # blocks never span two files
    np.testing.assert_array_equal(np.concatenate([got[k] for k in sorted(got)]), x)
    assert source.ids() == [f"r{i}" for i in range(500)]


def test_reading_in_blocks_holds_one_row_group_and_one_block(tmp_path):
    """Arrow memory stays at about one row group, numpy memory at about one block, of 20 groups."""
    n, d, group, block = 20_000, 64, 1000, 700
    x = random_data(n, d, seed=3)
    source = open_embeddings(_write(tmp_path / "big.parquet", x, group))
    group_bytes, block_bytes, file_bytes = group * d * 4, block * d * 4, n * d * 4
    arrow_before = pa.total_allocated_bytes()
    arrow_peak = 0
    tracemalloc.start()
    try:
        for start, b in source.blocks(block):
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_before)
            assert np.array_equal(b, x[start : start + len(b)])
            del b
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert group_bytes <= arrow_peak < 1.2 * group_bytes, (arrow_peak, group_bytes)
    assert numpy_peak < 1.5 * block_bytes, (numpy_peak, block_bytes)
    assert arrow_peak + numpy_peak < file_bytes / 10  # the file has 20 row groups


def test_ragged_and_null_rows_are_named_while_reading(tmp_path):
    rows = [[1.0, 2.0]] * 150 + [[1.0, 2.0, 3.0]] + [[1.0, 2.0]] * 49
    pq.write_table(
        pa.table({"embedding": pa.array(rows, pa.list_(pa.float32()))}),
        tmp_path / "r.parquet",
        row_group_size=100,
    )
    source = open_embeddings(tmp_path / "r.parquet")
    with pytest.raises(
        InputError, match=r"r\.parquet: column 'embedding': ragged lists: row 150 has 3 values, expected 2"
    ):
        list(source.blocks(64))
    rows = [[1.0, 2.0]] * 120 + [None] + [[1.0, None]] + [[1.0, 2.0]] * 10
    pq.write_table(
        pa.table({"embedding": pa.array(rows, pa.list_(pa.float32()))}),
        tmp_path / "n.parquet",
        row_group_size=50,
    )
    with pytest.raises(InputError, match=r"n\.parquet: column 'embedding': null embedding in rows 120"):
        list(open_embeddings(tmp_path / "n.parquet").blocks(64))
