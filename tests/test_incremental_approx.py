"""``add``/``delete`` over approximate indexes: IVF and HNSW, the default ``auto`` build, float16.

A delta version serves the base's index masked plus its delta rows (``aqe_retrieval/overlay.py``).
Oracles: added rows are found, deleted ids are never served nor used by online expansion, and
where the served search is exact (IVF at nprobe = nlist) the results equal a full build's.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import search_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqe_retrieval import aqe, artifact, incremental
from aqe_retrieval.faiss_search import exact_knn
from aqe_retrieval.online import gallery_level
from aqe_retrieval.overlay import DeltaIndex
from aqe_retrieval.searcher import Searcher
from index_builder.cli import main
from service.app import create_app
from service.settings import Settings
from tests.test_incremental import EXACT, same_results

D, N, QE_K = 32, 3000, 5
# nprobe = nlist: the IVF graph and serving are exact, so a full build is the oracle
IVF = ["--knn", "IVF64,Flat", "--nprobe", "64", "--serving-index", "IVF64,Flat", "--serving-nprobe", "64"]
HNSW = ["--knn", "HNSW32", "--ef-search", "64", "--serving-index", "HNSW32", "--serving-ef-search", "64"]


def build(root: Path, x: np.ndarray, ids: list[str], options: list[str], qe_times: int = 1) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    np.save(root.parent / f"{root.name}.npy", x)
    (root.parent / f"{root.name}.ids").write_text("".join(f"{i}\n" for i in ids))
    args = ["build", "--gallery", str(root.parent / f"{root.name}.npy"), "--ids"]
    args += [str(root.parent / f"{root.name}.ids"), "--root", str(root), "--keep", "10"]
    opts = ["--qe-k", str(QE_K), "--qe-times", str(qe_times), "--no-progress", *options]
    assert main([*args, *opts]) == 0


def check_deleted_never_used(s: Searcher, gone: dict[str, np.ndarray], queries: np.ndarray) -> None:
    """No deleted id in any result, nor among any level's expansion neighbours (the masked base)."""
    if not gone:
        return
    probes = np.concatenate([np.array(list(gone.values())), queries])
    names = set(gone)
    for raw in (False, True):
        hits = s.search(probes, 20, raw=raw)
        assert not names & {s.external_id(h.row) for row in hits for h in row}
    u, _ = aqe.normalize_rows(probes)
    for lv in s.artifact.levels:
        level = gallery_level(lv.rows, lv.norms, lv.index, lv.entry.nprobe, lv.entry.ef_search)
        neighbours = level.search(u, QE_K - 1)
        assert not names & {s.external_id(int(i)) for i in neighbours.ravel()}


def check_added_found(s: Searcher, added: dict[str, np.ndarray]) -> None:
    """An added row's raw vector (raw kNN) and its own served row (expand=False) find it first."""
    names = list(added)
    x = np.array([added[i] for i in names])
    assert [s.external_id(h[0].row) for h in s.search(x, 1, raw=True)] == names
    index = s.artifact.serving_index
    assert isinstance(index, DeltaIndex)
    own = index.reconstruct_batch(np.array([s.row_of(i) for i in names]))
    assert [s.external_id(h[0].row) for h in s.search(own, 1, expand=False)] == names
    if index.nlist:  # a reasonable nprobe, not all lists: the delta rows are searched exactly
        assert [s.external_id(int(i)) for i in index.search(own, 1, nprobe=4)[1][:, 0]] == names


def check_filtered(s: Searcher, rng: np.random.Generator, exact: bool) -> None:
    """A filter over view positions composes with the stale mask (delta rows included)."""
    index = s.artifact.serving_index
    assert isinstance(index, DeltaIndex)
    allowed = np.zeros(s.n, dtype=bool)
    allowed[rng.choice(s.n, 40, replace=False)] = True
    allowed[index.pos[: len(index.pos) // 2]] = True
    u, _ = aqe.normalize_rows(rng.standard_normal((8, D)).astype(np.float32))
    sims, ids = index.search(u, 10, allowed)
    assert allowed[ids[ids >= 0]].all()
    if exact:  # brute force over the served rows the filter admits
        rows = np.flatnonzero(allowed)
        truth = u @ index.reconstruct_batch(rows).T
        np.testing.assert_allclose(sims, -np.sort(-truth, axis=1)[:, :10], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**16),
    qe_times=st.sampled_from([1, 2]),
    steps=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=3),
)
def test_adds_and_deletes_over_ivf_and_hnsw(tmp_path_factory, kind, seed, qe_times, steps):
    tmp = tmp_path_factory.mktemp(kind)
    options = IVF if kind == "ivf" else HNSW
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    ids = [f"r{i}" for i in range(N)]
    build(tmp / "inc", x, ids, options, qe_times)
    rows = dict(zip(ids, x, strict=True))
    added, gone = {}, {}
    for step, (is_add, m) in enumerate(steps):
        if is_add:
            new = rng.standard_normal((m, D)).astype(np.float32)
            new_ids = [f"a{step}_{i}" for i in range(m)]
            incremental.apply_change(tmp / "inc", incremental.Change(f"op{step}", rows=new, ids=new_ids))
            rows.update(zip(new_ids, new, strict=True))
            added.update(zip(new_ids, new, strict=True))
        else:
            doomed = rng.choice(sorted(rows), size=m, replace=False).tolist()
            incremental.apply_change(tmp / "inc", incremental.Change(f"op{step}", delete=doomed))
            for g in doomed:
                gone[g] = rows.pop(g)
                added.pop(g, None)
    s = Searcher(artifact.load(tmp / "inc"))
    assert isinstance(s.artifact.serving_index, DeltaIndex)
    assert all(isinstance(lv.index, DeltaIndex) for lv in s.artifact.levels)
    queries = rng.standard_normal((16, D)).astype(np.float32)
    if added:
        check_added_found(s, added)
    check_deleted_never_used(s, gone, queries)
    check_filtered(s, rng, exact=kind == "ivf")
    if kind == "ivf":  # exact at nprobe = nlist: what a full build over the resulting rows serves
        build(tmp / "full", np.array(list(rows.values())), list(rows), options, qe_times)
        full = Searcher(artifact.load(tmp / "full"))
        assert sorted(s.artifact.ids.tolist()) == sorted(full.artifact.ids.tolist())
        same_results(s, full, queries, k=10)
        same_results(s, full, queries[:4], k=10)  # the BLAS path of a few queries too


def float16_results(a: Searcher, b: Searcher, queries: np.ndarray, k: int = 6, tol: float = 2e-3) -> None:
    """Scores within float16 tolerance; the same ids wherever the scores are further apart than it."""
    for ha, hb in zip(a.search(queries, k), b.search(queries, k), strict=True):
        sa = np.array([h.score for h in ha])
        np.testing.assert_allclose(sa, [h.score for h in hb], atol=tol)
        strict = sa > sa[-1] + 2 * tol
        ida = {a.external_id(h.row) for h, s in zip(ha, strict, strict=True) if s}
        idb = {b.external_id(h.row) for h, s in zip(hb, strict, strict=True) if s}
        assert ida == idb


@pytest.mark.parametrize("qe_times", [1, 2])
def test_float16_levels_take_adds_and_deletes_within_float16_tolerance(tmp_path, qe_times):
    """Deltas are computed in float32 from the stored float16 values and stored as float16."""
    rng = np.random.default_rng(5 + qe_times)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    ids = [f"r{i}" for i in range(60)]
    f16 = [*EXACT, "--level-dtype", "float16"]
    build(tmp_path / "inc", x, ids, f16, qe_times)
    new = rng.standard_normal((5, 8)).astype(np.float32)
    incremental.apply_change(
        tmp_path / "inc", incremental.Change("add", rows=new, ids=[f"x{i}" for i in range(5)])
    )
    incremental.apply_change(tmp_path / "inc", incremental.Change("del", delete=["r1", "r7", "x2"]))
    art = artifact.load(tmp_path / "inc")
    assert art.manifest.delta is not None
    assert all(lv.rows.dtype == np.float16 for lv in art.levels)
    delta_rows = artifact.version_dir(tmp_path / "inc", art.version) / art.manifest.delta.levels[0].rows
    assert np.load(delta_rows).dtype == np.float16
    rows = dict(zip(ids, x, strict=True)) | {f"x{i}": v for i, v in enumerate(new)}
    for g in ("r1", "r7", "x2"):
        del rows[g]
    build(tmp_path / "full", np.array(list(rows.values())), list(rows), f16, qe_times)
    queries = rng.standard_normal((12, 8)).astype(np.float32)
    float16_results(Searcher(art), Searcher(artifact.load(tmp_path / "full")), queries)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_default_build_takes_add_and_delete_and_the_service_serves_them(tmp_path, dtype):
    """The default (auto) build at 20,000 rows is approximate; the CLI changes it, hot reload serves it."""
    rng = np.random.default_rng(11)
    n, d = 20_000, 16
    x = rng.standard_normal((n, d)).astype(np.float32)
    root = tmp_path / "root"
    np.save(tmp_path / "g.npy", x)
    (tmp_path / "g.ids").write_text("".join(f"r{i}\n" for i in range(n)))
    args = ["build", "--gallery", str(tmp_path / "g.npy"), "--ids", str(tmp_path / "g.ids")]
    assert main([*args, "--root", str(root), "--no-progress", "--level-dtype", dtype]) == 0
    m = artifact.read_manifest(root, artifact.current_version(root) or "")
    assert m.serving_index.index_type != "IndexFlat" and all(lv.index for lv in m.levels)
    new = rng.standard_normal((50, d)).astype(np.float32)
    np.save(tmp_path / "new.npy", new)
    (tmp_path / "new.ids").write_text("".join(f"n{i}\n" for i in range(50)))
    (tmp_path / "gone.ids").write_text("n0\nr3\nr4\n")
    stop = threading.Event()
    with TestClient(create_app(Settings(index_root=root, reload_interval_s=0.05))) as client:

        def worker(seed: int) -> list[int]:
            return search_until(client, x, stop, seed, 5)

        def top_ids(v: np.ndarray, k: int = 1) -> list[str]:
            body = {"embedding": v.tolist(), "k": k}
            return [h["id"] for h in client.post("/search", json=body).json()["results"][0]]

        def wait_for(version: str) -> None:
            deadline = time.monotonic() + 20
            while client.get("/info").json().get("index_version") != version and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.get("/info").json()["index_version"] == version

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(worker, s) for s in range(2)]
            try:
                add = ["add", "--root", str(root), "--gallery", str(tmp_path / "new.npy")]
                assert main([*add, "--ids", str(tmp_path / "new.ids")]) == 0
                wait_for(artifact.current_version(root) or "")
                assert [top_ids(v)[0] for v in new] == [f"n{i}" for i in range(50)]
                assert main(["delete", "--root", str(root), "--ids", str(tmp_path / "gone.ids")]) == 0
                wait_for(artifact.current_version(root) or "")
                for v in (new[0], x[3], x[4]):
                    assert not {"n0", "r3", "r4"} & set(top_ids(v, 20))
            finally:
                stop.set()
            codes = [c for f in futures for c in f.result()]
    assert codes and set(codes) == {200}
    s = Searcher(artifact.load(root))
    assert isinstance(s.artifact.serving_index, DeltaIndex) and s.artifact.manifest.n == n + 47
    check_deleted_never_used(s, {"n0": new[0], "r3": x[3], "r4": x[4]}, x[:8])


def same_hits(a: Searcher, ha: list, b: Searcher, hb: list, tol: float = 1e-5) -> None:
    """The same ids and scores, order and the k-th place only within a tie."""
    for ra, rb in zip(ha, hb, strict=True):
        np.testing.assert_allclose([h.score for h in ra], [h.score for h in rb], atol=tol)
        if not rb:
            continue
        boundary = min(h.score for h in rb)
        ia = {a.external_id(h.row): h.score for h in ra}
        ib = {b.external_id(h.row): h.score for h in rb}
        assert all(abs({**ia, **ib}[i] - boundary) <= tol for i in set(ia) ^ set(ib)), (ra, rb)


def test_on_disk_lists_filters_min_score_raw_and_search_by_id_through_a_delta(tmp_path):
    """Out-of-core IVF (``.ivfdata``) at nprobe = nlist: every search path equals a full build's."""
    from helpers import clustered_data, write_gallery

    x = clustered_data(6_000, D, seed=4)
    paths = write_gallery(tmp_path / "in", x)
    ivf = ["--knn", "IVF32,Flat", "--nprobe", "32", "--batch-lists", "--qe-times", "2", "--qe-k", "5"]
    ivf += ["--serving-index", "IVF64,Flat", "--serving-nprobe", "64", "--no-progress", "--keep", "5"]
    inputs = [
        "--gallery",
        str(paths["gallery"]),
        "--ids",
        str(paths["ids"]),
        "--metadata",
        str(paths["metadata"]),
    ]
    root = tmp_path / "inc"
    assert main(["build", *inputs, "--root", str(root), "--memory-budget", "52MiB", *ivf]) == 0
    assert artifact.read_manifest(root, artifact.current_version(root) or "").serving_index.ivfdata
    rng = np.random.default_rng(4)
    new = x[rng.choice(6_000, 30)] + 0.2 * rng.standard_normal((30, D)).astype(np.float32)
    new_ids = [f"new-{i}" for i in range(30)]
    meta = {"camera": np.arange(30) % 6, "ts": 10_000 + np.arange(30), "label": [f"q{i}" for i in range(30)]}
    incremental.apply_change(root, incremental.Change("add", rows=new, ids=new_ids, metadata=meta))
    gone = [f"img-{i:05d}" for i in rng.choice(6_000, 40, replace=False)] + ["new-3"]
    incremental.apply_change(root, incremental.Change("del", delete=gone))
    s = Searcher(artifact.load(root))
    assert s.artifact.manifest.serving_index.ivfdata and isinstance(s.artifact.serving_index, DeltaIndex)
    keep = [i for i in range(6_000) if f"img-{i:05d}" not in gone]
    kept_new = [i for i in range(30) if i != 3]
    rows = np.concatenate([x[keep], new[kept_new]])
    ids = [f"img-{i:05d}" for i in keep] + [new_ids[i] for i in kept_new]
    lines = [f"{i % 6},{i},p{i // 6}\n" for i in keep] + [f"{i % 6},{10_000 + i},q{i}\n" for i in kept_new]
    full_in = write_gallery(tmp_path / "full_in", rows, with_ids=False, with_metadata=False)
    (tmp_path / "full_in" / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    (tmp_path / "full_in" / "meta.csv").write_text("camera,ts,label\n" + "".join(lines))
    full_inputs = ["--gallery", str(full_in["gallery"]), "--ids", str(tmp_path / "full_in" / "ids.txt")]
    full_inputs += ["--metadata", str(tmp_path / "full_in" / "meta.csv")]
    assert main(["build", *full_inputs, "--root", str(tmp_path / "full"), *ivf]) == 0
    f = Searcher(artifact.load(tmp_path / "full"))
    queries = np.concatenate([new[:6], x[::600] + 0.01]).astype(np.float32)
    rare = {"ts": {"in": [10_001, 10_003, 10_007, 17]}}
    for kwargs in (
        {},
        {"raw": True},
        {"expand": False},
        {"filters": {"camera": 2}},
        {"filters": {"camera": {"in": [1, 4]}}, "raw": True},
        {"filters": rare},  # fewer allowed rows than k
        {"min_score": 0.8},
    ):
        same_hits(s, s.search(queries, 10, **kwargs), f, f.search(queries, 10, **kwargs))
    hits = s.search(queries, 10, filters=rare)
    assert {s.external_id(h.row) for row in hits for h in row} <= {"new-1", "img-00017", "new-7"} - set(gone)
    for name in ("new-5", "img-00100"):  # search by id: the row's own raw vector, plain kNN
        if name not in gone:
            assert s.external_id(s.search(s.raw_rows([s.row_of(name)]), 1, raw=True)[0][0].row) == name
    deleted = {g: x[int(g[4:])] for g in gone if g.startswith("img-")} | {"new-3": new[3]}
    check_deleted_never_used(s, deleted, queries)


def test_an_approximate_graph_recomputes_lists_through_its_own_index(tmp_path):
    """A delete over an IVF graph refills the touched lists from the graph's index, not a full scan.

    At nprobe 1 of 64 lists the index's answers differ from exact kNN, so the new version's lists
    show which way they were recomputed; no deleted row is in any of them.
    """
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, D)).astype(np.float32)
    ids = [f"r{i}" for i in range(N)]
    low = ["--knn", "IVF64,Flat", "--nprobe", "1", "--serving-index", "IVF64,Flat", "--serving-nprobe", "64"]
    build(tmp_path / "inc", x, ids, low)
    parent = artifact.load(tmp_path / "inc")
    doomed = rng.choice(N, size=60, replace=False)
    keep = np.ones(N, dtype=bool)
    keep[doomed] = False
    search = incremental.graph_search(parent.manifest, parent, keep)
    assert search is not None
    incremental.apply_change(tmp_path / "inc", incremental.Change("op", delete=[ids[i] for i in doomed]))
    child = artifact.load(tmp_path / "inc")
    graph_ids = artifact.load_graphs(child)[0][0]
    old_ids = artifact.load_graphs(parent)[0][0]
    touched = np.flatnonzero(np.isin(old_ids, doomed).any(axis=1) & keep)
    new_pos = np.cumsum(keep) - 1
    u = np.asarray(parent.levels[0].rows, np.float32)[keep]
    got = np.asarray(graph_ids)[new_pos[touched]]
    assert (got >= 0).all()
    through_index = new_pos[search(u[new_pos[touched]], QE_K)[1]]  # parent numbering -> new
    assert all(set(a) == set(b) for a, b in zip(got, through_index, strict=True))
    exact = exact_knn(u[new_pos[touched]], u, QE_K)[1]
    assert any(set(a) != set(b) for a, b in zip(got, exact, strict=True))  # not a full scan
    # an exact graph recomputes exactly
    build(tmp_path / "exact", x, ids, EXACT)
    exact_art = artifact.load(tmp_path / "exact")
    assert incremental.graph_search(exact_art.manifest, exact_art, keep) is None
