"""Inputs at fsspec URLs: ``file://`` and a test protocol read the rows a local path gives."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import clustered_data

from aqe_retrieval import artifact
from aqe_retrieval.errors import InputError
from index_builder.cli import main
from index_builder.inputs import fingerprint, open_embeddings
from index_builder.urls import Url, location

pytest.importorskip("fsspec")  # comes with the distributed extra (dask)
import rangefs


@pytest.fixture(autouse=True)
def _protocol() -> None:
    rangefs.register()


def _rows(source) -> np.ndarray:
    return np.vstack([b for _, b in source.blocks(7)])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("scheme", ["file", rangefs.PROTOCOL])
def test_a_npy_url_reads_the_rows_of_its_path(tmp_path, dtype, scheme) -> None:
    x = clustered_data(50, 6, seed=1).astype(dtype)
    np.save(tmp_path / "g.npy", x)
    source = open_embeddings(location(f"{scheme}://{tmp_path / 'g.npy'}"))
    assert isinstance(source.paths[0], Url) and (source.n, source.d, source.dtype) == (50, 6, np.dtype(dtype))
    np.testing.assert_array_equal(_rows(source), x.astype(np.float32))
    rows = np.array([0, 1, 2, 9, 30, 31, 49])  # three runs of rows: three ranged reads
    np.testing.assert_array_equal(source.take(rows), x[rows].astype(np.float32))


def test_a_directory_url_of_npy_and_one_of_parquet_shards(tmp_path) -> None:
    x = clustered_data(60, 4, seed=2)
    (tmp_path / "npy").mkdir()
    (tmp_path / "pq").mkdir()
    for i, lo in enumerate((0, 25, 40)):
        hi = (25, 40, 60)[i]
        np.save(tmp_path / "npy" / f"part-{i}.npy", x[lo:hi])
        table = pa.table({"embedding": pa.array(list(x[lo:hi]), pa.list_(pa.float32(), 4))})
        pq.write_table(table, tmp_path / "pq" / f"part-{i}.parquet", row_group_size=8)
    for sub in ("npy", "pq"):
        source = open_embeddings(Url(rangefs.url(tmp_path / sub)))
        assert len(source.shards) == 3
        np.testing.assert_array_equal(_rows(source), x)
        np.testing.assert_array_equal(source.take(np.array([3, 26, 59])), x[[3, 26, 59]])


def test_sidecars_and_fortran_order_are_refused_at_a_url(tmp_path) -> None:
    np.save(tmp_path / "a.npy", clustered_data(10, 3))
    (tmp_path / "a.ids.txt").write_text("".join(f"r{i}\n" for i in range(10)))
    with pytest.raises(InputError, match="sidecars"):
        open_embeddings(Url(f"file://{tmp_path}"))
    np.save(tmp_path / "f.npy", np.asfortranarray(clustered_data(10, 3)))
    with pytest.raises(InputError, match="Fortran"):
        open_embeddings(Url(f"file://{tmp_path / 'f.npy'}"))
    with pytest.raises(InputError, match="no such file"):
        open_embeddings(Url(f"file://{tmp_path / 'missing.npy'}"))


def test_a_build_from_a_url_publishes_what_the_path_does(tmp_path) -> None:
    np.save(tmp_path / "g.npy", clustered_data(300, 16, seed=3))
    common = ["--knn", "exact", "--serving-index", "exact", "--qe-k", "4", "--no-progress"]
    assert main(["build", "--gallery", str(tmp_path / "g.npy"), "--root", str(tmp_path / "a"), *common]) == 0
    url = f"file://{tmp_path / 'g.npy'}"
    assert main(["build", "--gallery", url, "--root", str(tmp_path / "b"), *common]) == 0
    a, b = artifact.load(tmp_path / "a"), artifact.load(tmp_path / "b")
    np.testing.assert_array_equal(np.asarray(a.levels[0].rows), np.asarray(b.levels[0].rows))
    served = [x.serving_index.reconstruct_n(0, 300) for x in (a, b)]
    np.testing.assert_array_equal(*served)
    assert b.manifest.input["gallery"] == url
    assert b.manifest.input["fingerprint"] != a.manifest.input["fingerprint"]  # a URL's: not its bytes


def test_a_url_is_fingerprinted_by_its_size_and_version_without_reading_it(tmp_path) -> None:
    """The client stats a URL gallery (size, mtime here) instead of reading it."""
    path = tmp_path / "g.npy"
    np.save(path, clustered_data(300, 16, seed=3))
    url = Url(rangefs.url(path))
    opened = rangefs.RangeFS.opened
    first = fingerprint([url])
    assert rangefs.RangeFS.opened == opened and fingerprint([url]) == first
    os.utime(path, ns=(1, 1))  # the same bytes with another mtime: another version
    assert fingerprint([url]) != first
    touched = fingerprint([url])
    np.save(path, clustered_data(300, 16, seed=4))
    os.utime(path, ns=(1, 1))  # other bytes, same size and mtime: the store says nothing changed
    assert fingerprint([url]) == touched


def test_an_unknown_protocol_exits_2_naming_what_to_install(tmp_path, capsys, caplog) -> None:
    args = ["build", "--root", str(tmp_path / "r"), "--no-progress", "--gallery"]
    assert main([*args, "nosuchfs://bucket/g.npy"]) == 2
    assert "no fsspec filesystem for protocol 'nosuchfs'" in caplog.text + capsys.readouterr().err
    if importlib.util.find_spec("s3fs") is None:
        assert main([*args, "s3://bucket/g.npy"]) == 2
        assert "s3fs" in caplog.text + capsys.readouterr().err


def test_local_paths_stay_paths() -> None:
    assert location("/data/g.npy") == Path("/data/g.npy")
    assert location("rel/dir") == Path("rel/dir")
    assert location("s3://b/p/") == Url("s3://b/p/")
    assert Url("s3://b/p/g.npy").parent.child("h.npy") == Url("s3://b/p/h.npy")
