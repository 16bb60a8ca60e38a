"""Gallery inputs through ``index-builder build``: Parquet and .npy shards with their own ids and
metadata build exactly what one float32 .npy with ids.txt and metadata.csv builds; every bad input
exits 2 naming the file and the problem, and publishes nothing."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import clustered_data
from labelled import labelled

from aqe_retrieval import artifact
from aqe_retrieval.searcher import Searcher
from index_builder.cli import main

N, D = 240, 16
BUILD = ["--qe-k", "5", "--qe-times", "2", "--block-size", "64", "--no-progress"]


def _ids(lo, hi):
    return [f"img-{i:05d}" for i in range(lo, hi)]


def _id_column(lo, hi):
    return pa.array(_ids(lo, hi), pa.string())


def _columns(lo, hi):
    """Metadata as a CSV types it: int, int, str, float."""
    i = np.arange(lo, hi)
    return {
        "camera": i % 6,
        "ts": i * 1000,
        "label": np.array([f"p{r // 6}" for r in i]),
        "score": i / 4 + 0.5,
    }


def _csv(lo, hi):
    cols = _columns(lo, hi)
    rows = zip(*(cols[c].tolist() for c in cols), strict=True)
    return ",".join(cols) + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows)


def _embedding(x, kind):
    values = pa.array(x.ravel())
    if kind == "fixed":
        return pa.FixedSizeListArray.from_arrays(values, x.shape[1])
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    return (pa.LargeListArray if kind == "large" else pa.ListArray).from_arrays(offsets, values)


def _table(x, lo, kind="fixed", **extra):
    hi = lo + len(x)
    return pa.table({"embedding": _embedding(x, kind), "id": _id_column(lo, hi), **_columns(lo, hi), **extra})


def write_parquet(path, x, files=1, kind="fixed", row_group_size=50):
    """``x`` as one Parquet file (``files=1``) or a directory of ``files`` part files."""
    if files == 1:
        pq.write_table(_table(x, 0, kind), path, row_group_size=row_group_size)
        return path
    path.mkdir()
    bounds = np.linspace(0, len(x), files + 1).astype(int)
    for f, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        pq.write_table(
            _table(x[lo:hi], lo, kind), path / f"part-{f:04d}.parquet", row_group_size=row_group_size
        )
    return path


def write_npy_shards(path, x, files=3, ids=True, metadata=True):
    path.mkdir()
    bounds = np.linspace(0, len(x), files + 1).astype(int)
    for f, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        np.save(path / f"part-{f:04d}.npy", x[lo:hi])
        if ids:
            (path / f"part-{f:04d}.ids.txt").write_text("".join(i + "\n" for i in _ids(lo, hi)))
        if metadata:
            (path / f"part-{f:04d}.metadata.csv").write_text(_csv(lo, hi))
    return path


def build(gallery, root, *extra):
    assert main(["build", "--gallery", str(gallery), "--root", str(root), *BUILD, *map(str, extra)]) == 0
    return artifact.load(root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A build of the float32 .npy + ids.txt + metadata.csv, for float32 and float16-rounded rows."""
    x = clustered_data(N, D, seed=4)
    out = {}
    for name, rows in (("float32", x), ("float16", x.astype(np.float16).astype(np.float32))):
        d = tmp_path_factory.mktemp(name)
        np.save(d / "g.npy", rows)
        (d / "ids.txt").write_text("".join(i + "\n" for i in _ids(0, N)))
        (d / "meta.csv").write_text(_csv(0, N))
        out[name] = build(d / "g.npy", d / "root", "--ids", d / "ids.txt", "--metadata", d / "meta.csv")
    return x, out


def assert_same_build(got, want):
    assert (got.manifest.n, got.manifest.d) == (want.manifest.n, want.manifest.d)
    assert len(got.levels) == len(want.levels) == 2
    for a, b in zip(got.levels, want.levels, strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.norms, b.norms)
    np.testing.assert_array_equal(got.ids, want.ids)
    assert list(got.metadata) == list(want.metadata) == ["camera", "ts", "label", "score"]
    for name, values in want.metadata.items():
        assert got.metadata[name].dtype.kind == values.dtype.kind
        np.testing.assert_array_equal(got.metadata[name], values)
    queries = clustered_data(20, D, seed=9)
    for expand in (True, False):
        hits = Searcher(got).search(queries, 10, expand=expand)
        assert hits == Searcher(want).search(queries, 10, expand=expand)
    filtered = {"camera": 2}
    assert Searcher(got).search(queries, 5, filters=filtered) == Searcher(want).search(
        queries, 5, filters=filtered
    )


@pytest.mark.parametrize(
    ("files", "kind", "dtype"),
    [
        (1, "fixed", np.float32),
        (1, "variable", np.float32),
        (3, "fixed", np.float32),
        (3, "variable", np.float16),
        (4, "large", np.float32),
        (1, "fixed", np.float16),
    ],
)
def test_parquet_builds_what_npy_ids_and_csv_build(tmp_path, reference, files, kind, dtype):
    x, refs = reference
    gallery = write_parquet(tmp_path / "g.parquet", x.astype(dtype), files, kind, row_group_size=37)
    got = build(gallery, tmp_path / "root")  # block size 64 cuts across the row groups of 37
    assert_same_build(got, refs[np.dtype(dtype).name])
    record = got.manifest.input
    assert record["dtype"] == np.dtype(dtype).name and record["shards"] == files
    assert record["columns"] == {
        "embedding": "embedding",
        "id": "id",
        "metadata": ["camera", "ts", "label", "score"],
    }


def test_npy_shards_with_sidecars_build_what_npy_ids_and_csv_build(tmp_path, reference):
    x, refs = reference
    got = build(write_npy_shards(tmp_path / "g", x), tmp_path / "root")
    assert_same_build(got, refs["float32"])
    assert got.manifest.input["columns"] is None


def test_parquet_columns_chosen_by_flag_and_others_skipped(tmp_path, reference, caplog):
    x, refs = reference
    table = pa.table(
        {
            "key": _ids(0, N),
            "feat": _embedding(x, "fixed"),
            "other_list": _embedding(x[:, :2], "fixed"),
            **_columns(0, N),
            "flag": np.arange(N) % 2 == 0,
        }
    )
    pq.write_table(table, tmp_path / "g.parquet", row_group_size=100)
    with caplog.at_level(logging.INFO):
        got = build(
            tmp_path / "g.parquet", tmp_path / "root", "--embedding-column", "feat", "--id-column", "key"
        )
    assert_same_build(got, refs["float32"])
    assert "not read as metadata (not int, float or string): other_list" in caplog.text
    assert "flag (bool)" in caplog.text
    # a subset of metadata columns, and Parquet ids replaced by a --ids file
    (tmp_path / "ids.txt").write_text("".join(f"x{i}\n" for i in range(N)))
    args = ["--embedding-column", "feat", "--id-column", "", "--metadata-columns", "camera,label"]
    got = build(tmp_path / "g.parquet", tmp_path / "root2", *args, "--ids", tmp_path / "ids.txt")
    assert list(got.metadata) == ["camera", "label"] and got.ids[3] == "x3"


def test_integer_ids_and_narrow_types_read_like_the_csv(tmp_path, reference):
    x, refs = reference
    cols = _columns(0, N)
    table = pa.table(
        {
            "embedding": _embedding(x, "variable"),
            "id": pa.array(np.arange(N), pa.int32()),
            "camera": pa.array(cols["camera"], pa.int8()),
            "label": pa.array(cols["label"]).dictionary_encode(),
            "score": pa.array(cols["score"], pa.float32()),
        }
    )
    pq.write_table(table, tmp_path / "g.parquet")
    got = build(tmp_path / "g.parquet", tmp_path / "root")
    assert got.ids.tolist() == [str(i) for i in range(N)]
    assert got.metadata["camera"].dtype == np.int64 and got.metadata["score"].dtype == np.float64
    np.testing.assert_array_equal(got.metadata["label"], refs["float32"].metadata["label"])


def test_npy_sidecars_with_int_and_float_shards_give_a_float_column(tmp_path, reference):
    x, _ = reference
    g = write_npy_shards(tmp_path / "g", x, files=2, ids=False)
    (g / "part-0000.metadata.csv").write_text("w\n" + "1\n" * (N // 2))
    (g / "part-0001.metadata.csv").write_text("w\n" + "0.5\n" * (N // 2))
    got = build(g, tmp_path / "root")
    assert got.ids is None and got.metadata["w"].dtype == np.float64
    assert got.metadata["w"].tolist() == [1.0] * (N // 2) + [0.5] * (N // 2)


def _bad_inputs(tmp_path):
    """name -> (gallery path, extra CLI arguments)."""
    x = clustered_data(60, 8, seed=1)
    cases = {}

    def parquet(name, *tables, extra=(), group=25):
        d = tmp_path / name
        d.mkdir()
        for i, t in enumerate(tables):
            pq.write_table(t, d / f"part-{i}.parquet", row_group_size=group)
        cases[name] = (d if len(tables) > 1 else d / "part-0.parquet", list(extra))

    def listed(rows, value_type=None):
        emb = pa.array(rows, pa.list_(value_type or pa.float32()))
        return pa.table({"embedding": emb, "id": _id_column(0, len(rows))})

    good = [x[i].tolist() for i in range(60)]
    parquet("mixed_schema", _table(x[:30], 0), _table(x[30:], 30).drop_columns(["score"]))
    parquet("mixed_types", _table(x[:30], 0), _table(x[30:], 30).set_column(1, "id", pa.array(range(30, 60))))
    parquet("missing_embedding", _table(x, 0), extra=["--embedding-column", "feat"])
    parquet("no_embedding", _table(x, 0).drop_columns(["embedding"]))
    parquet("missing_id", _table(x, 0), extra=["--id-column", "key"])
    parquet("missing_metadata", _table(x, 0), extra=["--metadata-columns", "camera,site"])
    parquet("ragged", listed([*good[:40], good[40][:5], *good[41:]]))
    parquet("null_embedding", listed([*good[:33], None, *good[34:]]))
    parquet("null_value", listed([*good[:51], [None, *good[51][1:]], *good[52:]]))
    parquet("null_id", _table(x, 0).set_column(1, "id", pa.array([*_ids(0, 7), None, *_ids(8, 60)])))
    parquet("dup_ids_across_shards", _table(x[:30], 0), _table(x[30:], 25))
    parquet("dup_ids_in_file", _table(x, 0).set_column(1, "id", pa.array([*_ids(0, 59), "img-00002"])))
    parquet("float64", listed([[float(v) for v in r] for r in good], pa.float64()))
    parquet("int_list", listed([[1] * 8] * 60, pa.int32()))
    parquet("not_a_list", pa.table({"embedding": pa.array(["a"] * 60)}))
    parquet("empty", _table(x[:0], 0))
    parquet("empty_variable", listed([]))
    parquet("null_metadata", _table(x, 0).set_column(2, "camera", pa.array([1, None] * 30)))
    parquet("unsupported_metadata", _table(x, 0, flag=[True] * 60), extra=["--metadata-columns", "flag"])
    parquet("ids_conflict", _table(x, 0), extra=["--ids", tmp_path / "ids.txt"])
    parquet("metadata_conflict", _table(x, 0), extra=["--metadata", tmp_path / "meta.csv"])
    (tmp_path / "ids.txt").write_text("".join(f"a{i}\n" for i in range(60)))
    (tmp_path / "meta.csv").write_text("camera\n" + "1\n" * 60)

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "g.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    cases["corrupt"] = (tmp_path / "corrupt" / "g.parquet", [])
    mixed = write_npy_shards(tmp_path / "mixed_dir", x, files=2, ids=False, metadata=False)
    pq.write_table(_table(x, 0), mixed / "more.parquet")
    cases["mixed_dir"] = (mixed, [])

    def npy(name, ids=True, metadata=True, extra=()):
        cases[name] = (write_npy_shards(tmp_path / name, x, files=3, ids=ids, metadata=metadata), list(extra))

    npy("partial_ids")
    (tmp_path / "partial_ids" / "part-0001.ids.txt").unlink()
    npy("partial_metadata", ids=False)
    (tmp_path / "partial_metadata" / "part-0000.metadata.csv").unlink()
    npy("stray_sidecar", metadata=False)
    (tmp_path / "stray_sidecar" / "part-0009.ids.txt").write_text("z\n")
    npy("sidecar_dup_ids", metadata=False)
    (tmp_path / "sidecar_dup_ids" / "part-0002.ids.txt").write_text("".join(i + "\n" for i in _ids(0, 20)))
    npy("sidecar_header", ids=False)
    (tmp_path / "sidecar_header" / "part-0001.metadata.csv").write_text("camera,ts\n" + "1,2\n" * 20)
    npy("sidecar_kinds", ids=False)
    kinds = "camera,ts,label,score\n" + "".join(f"1,{r},{r},0.5\n" for r in range(40, 60))  # label: int here
    (tmp_path / "sidecar_kinds" / "part-0002.metadata.csv").write_text(kinds)
    npy("sidecar_rows", ids=False)
    (tmp_path / "sidecar_rows" / "part-0000.metadata.csv").write_text(_csv(0, 19))
    npy("sidecar_ids_conflict", metadata=False, extra=["--ids", tmp_path / "ids.txt"])
    npy("parquet_flag_on_npy", ids=False, metadata=False, extra=["--id-column", "id"])
    return cases


EXPECTED = {
    "mixed_schema": "part-1.parquet: schema differs from",
    "mixed_types": "part-1.parquet: schema differs from",
    "missing_embedding": "part-0.parquet: no embedding column 'feat'",
    "no_embedding": "part-0.parquet: no embedding column 'embedding' (list columns: []",
    "missing_id": "part-0.parquet: no id column 'key'",
    "missing_metadata": "part-0.parquet: no metadata column 'site'",
    "ragged": "part-0.parquet: column 'embedding': ragged lists: row 40 has 5 values, expected 8",
    "null_embedding": "part-0.parquet: column 'embedding': null embedding in rows 33",
    "null_value": "part-0.parquet: column 'embedding': null values inside the embeddings of rows 51",
    "null_id": "part-0.parquet: null ids in column 'id', rows 7",
    "dup_ids_across_shards": (
        "duplicate ids: 'img-00025' (",
        "part-0.parquet row 25 and ",
        "part-1.parquet row 0)",
    ),
    "dup_ids_in_file": "part-0.parquet: duplicate ids: 'img-00002' (rows 2 and 59)",
    "float64": "part-0.parquet: column 'embedding' holds double values, not accepted (float32 or float16)",
    "int_list": "part-0.parquet: column 'embedding' holds int32 values, not accepted",
    "not_a_list": "part-0.parquet: column 'embedding' is string, not a list of floats",
    "empty": "part-0.parquet: input is empty (0 rows)",
    "empty_variable": "part-0.parquet: input is empty (0 rows)",
    "null_metadata": "part-0.parquet: null values in metadata column 'camera', rows 1, 3, 5",
    "unsupported_metadata": "part-0.parquet: metadata column 'flag' is bool; int, float or string expected",
    "ids_conflict": "ids.txt: the gallery",
    "metadata_conflict": "meta.csv: the gallery",
    "corrupt": "g.parquet: not a readable Parquet file",
    "mixed_dir": "mixed_dir: directory mixes .npy and Parquet shards",
    "partial_ids": "partial_ids: shards part-0001.npy have no .ids.txt sidecar while others do",
    "partial_metadata": "partial_metadata: shards part-0000.npy have no .metadata.csv sidecar",
    "stray_sidecar": "stray_sidecar: sidecars part-0009.ids.txt belong to no .npy shard",
    "sidecar_dup_ids": ("duplicate ids: 'img-00000' (", "part-0000.npy row 0 and ", "part-0002.npy row 0)"),
    "sidecar_header": "part-0001.metadata.csv: header ['camera', 'ts'] differs from",
    "sidecar_kinds": "part-0002.npy: metadata column 'label' is int here but string in",
    "sidecar_rows": "part-0000.metadata.csv: 19 metadata rows for 20 embeddings",
    "sidecar_ids_conflict": "ids.txt: the gallery",
    "parquet_flag_on_npy": "apply to Parquet input only",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_bad_input_exits_2_names_file_and_problem_and_publishes_nothing(tmp_path, caplog, name):
    gallery, extra = _bad_inputs(tmp_path)[name]
    root = tmp_path / "root"
    assert main(["build", "--gallery", str(gallery), "--root", str(root), *BUILD, *map(str, extra)]) == 2
    expected = EXPECTED[name]
    for part in (expected,) if isinstance(expected, str) else expected:
        assert part in caplog.text
    assert artifact.current_version(root) is None and artifact.version_ids(root) == []
    assert not list(root.glob(".staging-*")) if root.exists() else True


def test_fingerprint_covers_parquet_files_and_sidecars(tmp_path, reference):
    x, _ = reference
    g = write_parquet(tmp_path / "g", x, files=2)
    first = build(g, tmp_path / "root").manifest.input["fingerprint"]
    pq.write_table(_table(x[120:], 120).set_column(2, "camera", pa.array([0] * 120)), g / "part-0001.parquet")
    assert build(g, tmp_path / "root").manifest.input["fingerprint"] != first
    s = write_npy_shards(tmp_path / "s", x, files=2)
    first = build(s, tmp_path / "root2").manifest.input["fingerprint"]
    (s / "part-0001.ids.txt").write_text("".join(f"new-{i}\n" for i in range(120)))
    assert build(s, tmp_path / "root2").manifest.input["fingerprint"] != first


def test_quality_gate_reads_its_labels_from_parquet_columns(tmp_path):
    x, lab = labelled(n_ids=100, per_id=3, noise=0.8, seed=3)
    table = pa.table({"embedding": _embedding(x, "fixed"), "pid": lab.pids, "camid": lab.camids})
    pq.write_table(table, tmp_path / "g.parquet")
    args = ["--quality-sample", "60", "--min-map-gain", "0"]
    assert build(tmp_path / "g.parquet", tmp_path / "root", *args).manifest.quality["passed"]
    args += ["--metadata-columns", "pid"]
    assert (
        main(["build", "--gallery", str(tmp_path / "g.parquet"), "--root", str(tmp_path / "r2"), *args]) == 2
    )


def test_expand_reads_parquet_like_npy(tmp_path, reference):
    x, _ = reference
    np.save(tmp_path / "g.npy", x)
    write_parquet(tmp_path / "g", x, files=2, kind="variable", row_group_size=30)
    for name in ("g.npy", "g"):
        assert main(["expand", str(tmp_path / name), str(tmp_path / f"{name}.out.npy"), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "g.out.npy"), np.load(tmp_path / "g.npy.out.npy"))
