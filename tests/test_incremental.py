"""``add``/``delete``: oracle tests against a full build over the resulting rows, and the CLI."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from helpers import search_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqe_retrieval import artifact, incremental
from aqe_retrieval.searcher import Searcher
from index_builder.cli import main
from service.app import create_app
from service.settings import Settings

D = 8
EXACT = ["--knn", "exact", "--serving-index", "exact", "--expansion-index", "exact", "--no-progress"]


def build(root: Path, x: np.ndarray, ids: list[str], qe_times: int = 1, qe_k: int = 4) -> None:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root.parent / f"{root.name}.npy", x)
    (root.parent / f"{root.name}.ids").write_text("".join(f"{i}\n" for i in ids))
    args = [
        "build",
        "--gallery",
        str(root.parent / f"{root.name}.npy"),
        "--ids",
        str(root.parent / f"{root.name}.ids"),
    ]
    opts = ["--qe-k", str(qe_k), "--qe-times", str(qe_times), "--keep", "10", *EXACT]
    assert main([*args, "--root", str(root), *opts]) == 0


def same_results(a: Searcher, b: Searcher, queries: np.ndarray, k: int = 6) -> None:
    for ha, hb in zip(a.search(queries, k), b.search(queries, k), strict=True):
        sa = np.array([h.score for h in ha])
        np.testing.assert_allclose(sa, [h.score for h in hb], atol=1e-5)
        # same neighbour sets up to ties at the k-th score
        strict = sa > sa[-1] + 1e-5
        ida = {a.external_id(h.row) for h, s in zip(ha, strict, strict=True) if s}
        idb = {b.external_id(h.row) for h, s in zip(hb, strict, strict=True) if s}
        assert ida == idb


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**16),
    qe_times=st.sampled_from([1, 2]),
    steps=st.lists(st.tuples(st.booleans(), st.integers(1, 6)), min_size=1, max_size=3),
)
def test_add_and_delete_serve_what_a_full_build_serves(tmp_path_factory, seed, qe_times, steps):
    tmp = tmp_path_factory.mktemp("oracle")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, D)).astype(np.float32)
    ids = [f"r{i}" for i in range(40)]
    build(tmp / "inc", x, ids, qe_times)
    rows = dict(zip(ids, x, strict=True))
    for step, (is_add, m) in enumerate(steps):
        if is_add:
            new = rng.standard_normal((m, D)).astype(np.float32)
            new_ids = [f"a{step}_{i}" for i in range(m)]
            incremental.apply_change(tmp / "inc", incremental.Change(f"op{step}", rows=new, ids=new_ids))
            rows.update(zip(new_ids, new, strict=True))
        else:
            gone = list(rng.choice(sorted(rows), size=m, replace=False))
            incremental.apply_change(tmp / "inc", incremental.Change(f"op{step}", delete=gone))
            for g in gone:
                del rows[g]
    build(tmp / "full", np.array(list(rows.values())), list(rows), qe_times)
    inc, full = artifact.load(tmp / "inc"), artifact.load(tmp / "full")
    assert sorted(inc.ids.tolist()) == sorted(full.ids.tolist())
    queries = rng.standard_normal((12, D)).astype(np.float32)
    same_results(Searcher(inc), Searcher(full), queries)
    assert artifact.verify(tmp / "inc") == []


def test_a_deleted_row_is_never_served_nor_expands_a_query(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, D)).astype(np.float32)
    build(tmp_path / "root", x, [f"r{i}" for i in range(30)], qe_times=2)
    query = x[:1] + 0.01
    art = artifact.load(tmp_path / "root")
    hit = Searcher(art).search(query, 1)[0][0]
    assert Searcher(art).external_id(hit.row) == "r0"
    (tmp_path / "gone.txt").write_text("r0\n")
    assert main(["delete", "--root", str(tmp_path / "root"), "--ids", str(tmp_path / "gone.txt")]) == 0
    s = Searcher(artifact.load(tmp_path / "root"))
    hits = s.search(query, 29)[0]
    assert "r0" not in {s.external_id(h.row) for h in hits}
    for level in s.artifact.levels:  # nothing left for online expansion to use
        assert not (np.abs(level.rows @ (x[0] / np.linalg.norm(x[0])) - 1) < 1e-6).any()


def test_cli_errors_retries_prune_verify_and_rollback(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "root"
    build(root, rng.standard_normal((30, D)).astype(np.float32), [f"r{i}" for i in range(30)])
    first = artifact.current_version(root)
    np.save(tmp_path / "new.npy", rng.standard_normal((3, D)).astype(np.float32))
    (tmp_path / "dup.txt").write_text("r1\nx1\nx2\n")
    add = ["add", "--root", str(root), "--gallery", str(tmp_path / "new.npy"), "--ids"]
    assert main([*add, str(tmp_path / "dup.txt")]) == 2  # r1 is in the version already
    (tmp_path / "unknown.txt").write_text("nope\n")
    assert main(["delete", "--root", str(root), "--ids", str(tmp_path / "unknown.txt")]) == 2
    assert artifact.current_version(root) == first
    (tmp_path / "new.txt").write_text("x0\nx1\nx2\n")
    assert main([*add, str(tmp_path / "new.txt")]) == 0
    second = artifact.current_version(root)
    assert main([*add, str(tmp_path / "new.txt")]) == 0  # the retry: a no-op
    assert artifact.current_version(root) == second == artifact.version_ids(root)[-1]
    m = artifact.read_manifest(root, second)
    shared = [n for n in m.files if not n.startswith("delta_")]
    assert all(
        os.path.samefile(root / "versions" / first / n, root / "versions" / second / n) for n in shared
    )
    artifact.prune(root, 1)  # the parent goes; the shared files stay with the child
    assert artifact.version_ids(root) == [second] and artifact.verify(root) == []
    assert artifact.load(root).manifest.n == 33
    (tmp_path / "gone.txt").write_text("x1\nr5\n")
    assert main(["delete", "--root", str(root), "--ids", str(tmp_path / "gone.txt")]) == 0
    assert artifact.load(root).manifest.n == 31
    assert artifact.rollback(root) == second and artifact.load(root).manifest.n == 33


def test_a_running_service_picks_up_adds_and_deletes_without_a_failed_request(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, D)).astype(np.float32)
    root = tmp_path / "root"
    build(root, x, [f"r{i}" for i in range(40)])
    new = rng.standard_normal((2, D)).astype(np.float32)
    stop = threading.Event()
    with TestClient(create_app(Settings(index_root=root, reload_interval_s=0.05))) as client:

        def worker(seed: int) -> list[int]:
            return search_until(client, x, stop, seed, 3)

        def top_id(v: np.ndarray) -> str:
            return client.post("/search", json={"embedding": v.tolist(), "k": 1}).json()["results"][0][0][
                "id"
            ]

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(worker, s) for s in range(3)]
            try:
                check_reloads(root, new, x, top_id)
            finally:
                stop.set()
            codes = [c for f in futures for c in f.result()]
    assert codes and set(codes) == {200}


def check_reloads(root, new, x, top_id) -> None:
    incremental.apply_change(root, incremental.Change("add", rows=new, ids=["n0", "n1"]))
    deadline = time.monotonic() + 10
    while top_id(new[0]) != "n0" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert top_id(new[0]) == "n0"
    incremental.apply_change(root, incremental.Change("del", delete=["n0", "r3"]))
    while top_id(new[0]) == "n0" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert top_id(new[0]) != "n0" and top_id(x[3]) != "r3"
