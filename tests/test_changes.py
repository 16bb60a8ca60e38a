"""The change log: a full build over the same ``--gallery`` folds in every logged add/delete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aqe_retrieval import artifact, incremental
from aqe_retrieval.searcher import Searcher
from index_builder.cli import main
from tests.test_incremental import EXACT, build, same_results

D = 8


def _rebuild(root: Path, *extra: str) -> int:
    gallery, ids = root.parent / f"{root.name}.npy", root.parent / f"{root.name}.ids"
    args = ["--gallery", str(gallery), "--ids", str(ids), "--root", str(root)]
    return main(["build", *args, "--qe-k", "4", "--keep", "10", *EXACT, *extra])


def test_full_build_folds_in_the_log_nothing_lost_nothing_resurrected(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, D)).astype(np.float32)
    ids = [f"r{i}" for i in range(40)]
    root = tmp_path / "inc"
    build(root, x, ids)
    rows = dict(zip(ids, x, strict=True))
    a = rng.standard_normal((5, D)).astype(np.float32)
    a_ids = [f"a{i}" for i in range(5)]
    incremental.apply_change(root, incremental.Change("op1", rows=a, ids=a_ids))
    rows.update(zip(a_ids, a, strict=True))
    gone = ["r3", "r7", "a1"]  # a gallery row and an added one
    incremental.apply_change(root, incremental.Change("op2", delete=gone))
    for g in gone:
        del rows[g]
    back = rng.standard_normal((1, D)).astype(np.float32)  # a deleted id added again: back
    incremental.apply_change(root, incremental.Change("op3", rows=back, ids=["r3"]))
    rows["r3"] = back[0]
    records = artifact.list_changes(root)
    assert [(r.order, r.kind, r.operation) for r in records] == [
        (1, "add", "op1"),
        (2, "delete", "op2"),
        (3, "add", "op3"),
    ]
    inc = artifact.load(root)
    inc_rows = Searcher(inc)
    queries = rng.standard_normal((12, D)).astype(np.float32)
    expected = [(h.score, inc_rows.external_id(h.row)) for hs in inc_rows.search(queries, 6) for h in hs]

    assert _rebuild(root) == 0  # the same --gallery as the first build
    full = artifact.load(root)
    assert full.manifest.delta is None
    assert sorted(full.ids.tolist()) == sorted(rows)
    assert full.manifest.history == ["op1", "op2", "op3"]
    assert full.manifest.input["changes_through"] == 3
    same_results(Searcher(full), inc_rows, queries)
    got = [
        (h.score, Searcher(full).external_id(h.row)) for hs in Searcher(full).search(queries, 6) for h in hs
    ]
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in expected], atol=1e-5)
    # a retried add, already folded in, is a no-op and logs nothing
    assert not incremental.apply_change(root, incremental.Change("op3", rows=back, ids=["r3"])).applied
    assert len(artifact.list_changes(root)) == 3

    # the gallery brings the changes upstream: the log refuses a second copy, then is cleared
    up_ids = list(rows)
    np.save(tmp_path / "inc.npy", np.array([rows[i] for i in up_ids]))
    (tmp_path / "inc.ids").write_text("".join(f"{i}\n" for i in up_ids))
    assert _rebuild(root) == 2
    assert main(["changes", "list", str(root)]) == 0
    assert main(["changes", "clear", str(root), "--through", "3"]) == 0
    assert artifact.list_changes(root) == []
    assert _rebuild(root) == 0
    assert sorted(artifact.load(root).ids.tolist()) == sorted(rows)
    # order numbers are never reused after a clear
    incremental.apply_change(root, incremental.Change("op4", delete=["r0"]))
    assert [r.order for r in artifact.list_changes(root)] == [4]


def test_no_changes_ignores_the_log_and_a_failed_publish_keeps_one_record(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, D)).astype(np.float32)
    root = tmp_path / "inc"
    build(root, x, [f"r{i}" for i in range(30)])
    monkeypatch.setattr(incremental, "_publish", _boom)
    with pytest.raises(RuntimeError):
        incremental.apply_change(root, incremental.Change("op1", delete=["r1"]))
    (record,) = artifact.list_changes(root)  # durable before the version: the build folds it
    monkeypatch.undo()
    incremental.apply_change(root, incremental.Change("op1", delete=["r1"]))  # the retry
    assert [r.order for r in artifact.list_changes(root)] == [record.order]
    assert "r1" not in artifact.load(root).ids.tolist()
    assert _rebuild(root, "--no-changes") == 0
    assert "r1" in artifact.load(root).ids.tolist()
    assert _rebuild(root) == 0
    assert "r1" not in artifact.load(root).ids.tolist()


def _boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("publish failed")


def test_nightly_folds_the_log_too(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, D)).astype(np.float32)
    root = tmp_path / "inc"
    build(root, x, [f"r{i}" for i in range(30)])
    new = rng.standard_normal((2, D)).astype(np.float32)
    incremental.apply_change(root, incremental.Change("op1", rows=new, ids=["n0", "n1"]))
    incremental.apply_change(root, incremental.Change("op2", delete=["n1", "r2"]))
    gallery, ids = tmp_path / "inc.npy", tmp_path / "inc.ids"
    args = ["nightly", "--gallery", str(gallery), "--ids", str(ids), "--root", str(root)]
    assert main([*args, "--qe-k", "4", *EXACT]) == 0
    got = artifact.load(root)
    assert got.manifest.delta is None and got.manifest.input["changes_through"] == 2
    assert sorted(got.ids.tolist()) == sorted([f"r{i}" for i in range(30) if i != 2] + ["n0"])
    np.testing.assert_array_equal(np.asarray(got.levels[0].rows).shape, (30, D))


def test_logged_metadata_is_folded_with_its_rows(tmp_path):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((20, D)).astype(np.float32)
    np.save(tmp_path / "g.npy", x)
    (tmp_path / "g.ids").write_text("".join(f"r{i}\n" for i in range(20)))
    (tmp_path / "g.csv").write_text("camid,name\n" + "".join(f"{i % 3},p{i}\n" for i in range(20)))
    gallery = ["--gallery", str(tmp_path / "g.npy"), "--ids", str(tmp_path / "g.ids")]
    common = [*gallery, "--metadata", str(tmp_path / "g.csv"), "--root", str(tmp_path / "root")]
    assert main(["build", *common, "--qe-k", "4", *EXACT]) == 0
    np.save(tmp_path / "new.npy", rng.standard_normal((2, D)).astype(np.float32))
    (tmp_path / "new.ids").write_text("n0\nn1\n")
    (tmp_path / "new.csv").write_text("camid,name\n7,q0\n8,q1\n")
    add = ["add", "--root", str(tmp_path / "root"), "--gallery", str(tmp_path / "new.npy")]
    assert main([*add, "--ids", str(tmp_path / "new.ids"), "--metadata", str(tmp_path / "new.csv")]) == 0
    (tmp_path / "gone.txt").write_text("r4\n")
    assert main(["delete", "--root", str(tmp_path / "root"), "--ids", str(tmp_path / "gone.txt")]) == 0
    inc = artifact.load(tmp_path / "root")
    assert main(["build", *common, "--qe-k", "4", *EXACT]) == 0
    full = artifact.load(tmp_path / "root")
    for art in (inc, full):
        by_id = dict(
            zip(
                art.ids.tolist(),
                zip(*(art.metadata[c].tolist() for c in ("camid", "name")), strict=True),
                strict=True,
            )
        )
        assert by_id["n1"] == (8, "q1") and by_id["r5"] == (2, "p5") and "r4" not in by_id
