"""``index-builder`` as a user runs it: expand, build, list, verify, rollback, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import clustered_data, write_gallery
from reference import reference_aqe

from aqe_retrieval import artifact
from index_builder.cli import main


def test_expand_serving_and_transductive_match_the_reference(tmp_path):
    g, q = clustered_data(400, 16, seed=1), clustered_data(40, 16, seed=2)
    np.save(tmp_path / "g.npy", g.astype(np.float16))
    np.save(tmp_path / "q.npy", q)
    g16 = g.astype(np.float16).astype(np.float32)
    assert (
        main(
            [
                "expand",
                str(tmp_path / "g.npy"),
                str(tmp_path / "out.npy"),
                "--qe-k",
                "5",
                "--block-size",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    _, ref_g, _ = reference_aqe(g16[:0], g16, 1, 5, 3.0)
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref_g, atol=1e-5)
    assert (
        main(
            [
                "expand",
                str(tmp_path / "g.npy"),
                str(tmp_path / "gout.npy"),
                "--queries",
                str(tmp_path / "q.npy"),
                "--queries-out",
                str(tmp_path / "qout.npy"),
                "--qe-times",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    ref_q, ref_g, _ = reference_aqe(q, g16, 2, 10, 3.0)
    np.testing.assert_allclose(np.load(tmp_path / "qout.npy"), ref_q, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "gout.npy"), ref_g, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npy", "gout.npy", "out.npy", "q.npy", "qout.npy"]


def test_build_list_verify_rollback(tmp_path, small_gallery, capsys):
    _, paths = small_gallery
    root = tmp_path / "root"
    args = [
        "build",
        "--gallery",
        str(paths["gallery"]),
        "--ids",
        str(paths["ids"]),
        "--metadata",
        str(paths["metadata"]),
        "--root",
        str(root),
        "--no-progress",
    ]
    assert main(args) == 0
    assert main([*args, "--knn", "IVF8,Flat", "--nprobe", "2", "--serving-index", "HNSW16"]) == 0
    first, second = artifact.version_ids(root)
    m = artifact.read_manifest(root, second)
    assert m.graph_recall is not None and 0 < m.graph_recall <= 1
    assert m.serving_index.index_type == "IndexHNSWFlat" and m.serving_index.recall_at_k
    capsys.readouterr()
    assert main(["list", str(root)]) == 0
    listing = capsys.readouterr().out
    assert f"* {second}" in listing and first in listing
    assert main(["verify", str(root)]) == 0
    assert main(["rollback", str(root)]) == 0
    assert artifact.current_version(root) == first
    (root / "versions" / first / "serving.faiss").write_bytes(b"garbage")
    assert main(["verify", str(root), first]) == 1
    assert f"{first}: serving.faiss: 7 bytes, manifest says" in capsys.readouterr().err


def _bad_inputs(tmp_path):
    good = clustered_data(50, 8, seed=0)
    cases = {}

    def case(name, gallery=None, ids=None, metadata=None):
        d = tmp_path / name
        d.mkdir()
        p = {"gallery": d / "g.npy"}
        if isinstance(gallery, list):
            p["gallery"] = d / "shards"
            p["gallery"].mkdir()
            for i, s in enumerate(gallery):
                np.save(p["gallery"] / f"{i:03d}.npy", s)
        else:
            np.save(p["gallery"], good if gallery is None else gallery)
        if ids is not None:
            p["ids"] = d / "ids.txt"
            p["ids"].write_text(ids)
        if metadata is not None:
            p["metadata"] = d / "m.csv"
            p["metadata"].write_text(metadata)
        cases[name] = p

    nan = good.copy()
    nan[[3, 7]] = np.nan
    inf = good.copy()
    inf[5, 2] = np.inf
    zero = good.copy()
    zero[[0, 9]] = 0
    case("dim_mismatch", [good[:20], clustered_data(30, 9)])
    case("dtype_mismatch", [good[:20], good[20:].astype(np.float16)])
    case("int_dtype", good.astype(np.int32))
    case("nan_rows", nan)
    case("inf_rows", inf)
    case("zero_rows", zero)
    case("empty", np.zeros((0, 8), np.float32))
    case("one_d", good[0])
    case("ids_count", ids="".join(f"a{i}\n" for i in range(49)))
    case("ids_dup", ids="".join(f"a{i % 48}\n" for i in range(50)))
    case("meta_count", metadata="camera\n" + "1\n" * 51)
    case("meta_ragged", metadata="camera,ts\n" + "1,2\n" * 49 + "1\n")
    return cases


EXPECTED = {
    "dim_mismatch": "dimension 9 differs",
    "dtype_mismatch": "dtype float16 differs",
    "int_dtype": "dtype int32 is not accepted",
    "nan_rows": "NaN or Inf in rows 3, 7",
    "inf_rows": "NaN or Inf in rows 5",
    "zero_rows": "all-zero rows 0, 9",
    "empty": "empty",
    "one_d": "2-D",
    "ids_count": "49 ids for 50",
    "ids_dup": "duplicate ids",
    "meta_count": "51 metadata rows for 50",
    "meta_ragged": "rows 49 do not have 2 fields",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_bad_input_is_named_exits_2_and_publishes_nothing(tmp_path, caplog, name):
    p = _bad_inputs(tmp_path)[name]
    root = tmp_path / "root"
    args = ["build", "--gallery", str(p["gallery"]), "--root", str(root), "--no-progress"]
    for opt in ("ids", "metadata"):
        if opt in p:
            args += [f"--{opt}", str(p[opt])]
    assert main(args) == 2
    assert EXPECTED[name] in caplog.text
    assert artifact.current_version(root) is None and artifact.version_ids(root) == []
    assert not list(root.glob(".staging-*")) if root.exists() else True


def test_bad_input_keeps_the_previous_version_current(tmp_path, small_gallery):
    _, paths = small_gallery
    root = tmp_path / "root"
    assert main(["build", "--gallery", str(paths["gallery"]), "--root", str(root), "--no-progress"]) == 0
    before = artifact.current_version(root)
    bad = clustered_data(30, 32)
    bad[4] = np.nan
    bad_paths = write_gallery(tmp_path / "bad", bad, with_ids=False, with_metadata=False)
    assert main(["build", "--gallery", str(bad_paths["gallery"]), "--root", str(root), "--no-progress"]) == 2
    assert artifact.current_version(root) == before and len(artifact.version_ids(root)) == 1


def test_bad_options_are_refused(tmp_path, small_gallery, caplog):
    _, paths = small_gallery
    base = ["build", "--gallery", str(paths["gallery"]), "--root", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as e:
        main([*base, "--qe-k", "0"])
    assert e.value.code == 2
    assert main([*base, "--knn", "IVF4096,Flat", "--no-progress"]) == 2
    assert "training" in caplog.text
    assert (
        main(["expand", str(paths["gallery"]), str(tmp_path / "o.npy"), "--queries", str(paths["gallery"])])
        == 2
    )


def test_cli_serving_index_auto_and_fast_knn_flags(tmp_path, small_gallery):
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


def test_build_and_rollback_exit_3_while_another_process_holds_the_lock(tmp_path, small_gallery, caplog):
    from test_artifact import LockHolder

    _, paths = small_gallery
    root = tmp_path / "root"
    build = ["build", "--gallery", str(paths["gallery"]), "--root", str(root), "--no-progress"]
    assert main(build) == 0 and main(build) == 0
    before = (artifact.current_version(root), artifact.version_ids(root))
    with LockHolder(root):
        assert main(build) == 3
        assert main(["rollback", str(root)]) == 3
        assert main(["nightly", *build[1:]]) == 3
    assert "another build holds .build.lock (pid" in caplog.text
    assert (artifact.current_version(root), artifact.version_ids(root)) == before
    assert not list(root.glob(".staging-*"))
    assert main(["rollback", str(root)]) == 0  # released
