"""The memory budget: sizes, the detected limit, the plan, and builds that stay inside it.

The cgroup tests run the real CLI in a memory cgroup smaller than the gallery and compare what
it publishes with an unlimited build of the same gallery.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import clustered_data, free_port, wait_ready
from memcg import MemoryCgroup, unavailable

from aqe_retrieval import artifact
from aqe_retrieval.searcher import Hit, Searcher
from index_builder import budget
from index_builder.budget import Budget, BudgetError, Workload, detect_budget, parse_size, plan_build
from index_builder.cli import main

MiB = 2**20


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 2**20),
        ("512MiB", 512 * MiB),
        ("512M", 512 * MiB),
        ("4GiB", 4 * 2**30),
        ("1.5g", int(1.5 * 2**30)),
        ("800MB", 800_000_000),
        (" 64 kib ", 64 * 1024),
    ],
)
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "12XB", "1e9"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_size(text)


def _fake_proc(tmp_path: Path, cgroup: str, available_kib: int) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available_kib} kB\n")
    return proc


def test_the_budget_is_the_v1_limit_when_it_is_below_available_memory(tmp_path):
    proc = _fake_proc(tmp_path, "4:memory:/jobs/a\n0::/\n", 8 * 2**20)
    group = tmp_path / "cg" / "memory" / "jobs" / "a"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit of its own
    (group / "memory.stat").write_text(f"cache 0\nhierarchical_memory_limit {300 * MiB}\n")
    found = detect_budget(None, proc, tmp_path / "cg")
    assert found == Budget(300 * MiB, "cgroup v1 memory limit")


def test_the_budget_is_the_tightest_v2_limit_up_the_tree(tmp_path):
    proc = _fake_proc(tmp_path, "0::/outer/inner\n", 8 * 2**20)
    cg = tmp_path / "cg"
    (cg / "outer" / "inner").mkdir(parents=True)
    (cg / "outer" / "inner" / "memory.max").write_text("max\n")
    (cg / "outer" / "memory.max").write_text(f"{200 * MiB}\n")
    assert detect_budget(None, proc, cg).bytes == 200 * MiB


def test_without_a_limit_the_budget_is_available_memory_and_a_flag_wins(tmp_path):
    proc = _fake_proc(tmp_path, "0::/\n", 1024)
    assert detect_budget(None, proc, tmp_path / "none") == Budget(MiB, "available memory (/proc/meminfo)")
    assert detect_budget(5 * MiB, proc, tmp_path / "none") == Budget(5 * MiB, "--memory-budget")


def _workload(n: int, **kw: object) -> Workload:
    return Workload(n=n, d=256, k=10, workers=2, block_size=16384, **kw)  # type: ignore[arg-type]


def test_a_build_that_fits_is_planned_as_today():
    plan = plan_build(Budget(64 * 2**30, "test"), _workload(100_000))
    assert plan.resident and plan.stripe == 100_000 and plan.chunk == 1024 and plan.block_size == 16384


@pytest.mark.parametrize("n", [500_000, 1_000_000, 10_000_000])
def test_out_of_core_plans_stay_inside_the_budget_whatever_n(n):
    ivf = {"train_rows": 51_200, "nlist": 1024, "code_size": 1024, "knn_index_bytes": n * 1032}
    plan = plan_build(Budget(512 * MiB, "test"), _workload(n, **ivf, nprobe=16))
    assert not plan.resident
    assert plan.anonymous_bytes <= 512 * MiB
    assert plan.stripe == n or plan.stripe % plan.tile == 0
    assert plan.stripe * (2 * 10 * 12 + 4 * 16) <= (512 * MiB - budget.BASE_BYTES) // 2


def test_a_flat_index_over_budget_is_refused_with_the_budget_it_needs():
    w = _workload(800_000, serving_index_bytes=800_000 * 1024, serving_in_memory_only="flat")
    with pytest.raises(BudgetError, match=r"serving index.*needs a budget of at least 3\.10 GiB"):
        plan_build(Budget(512 * MiB, "test"), w)


def test_no_room_beyond_the_base_is_refused():
    with pytest.raises(BudgetError, match="leaves no room"):
        plan_build(Budget(budget.BASE_BYTES, "test"), _workload(10**6))


# ------------------------------------------------------------------ builds


def _build(gallery: Path, root: Path, *extra: str) -> list[str]:
    return [
        "build",
        "--gallery",
        str(gallery),
        "--root",
        str(root),
        "--no-progress",
        "--serving-index",
        "IVF64,Flat",
        "--serving-nprobe",
        "8",
        *extra,
    ]


def _served(
    root: Path, queries: np.ndarray, k: int = 10, nprobe: int | None = None
) -> tuple[Searcher, list[list[Hit]]]:
    """A searcher over ``root`` and its hits; ``nprobe`` overrides the serving index's."""
    art = artifact.load(root)
    if nprobe is not None:
        art.manifest.serving_index.nprobe = nprobe
    s = Searcher(art)
    return s, s.search(queries, k=k)


def _assert_same_hits(ours: list[list[Hit]], theirs: list[list[Hit]], tol: float = 1e-5) -> None:
    """The same neighbour sets with the same scores; order and the k-th place only within a tie."""
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=tol)
        boundary = min(h.score for h in b)
        differ = {h.row for h in a} ^ {h.row for h in b}
        scores = {h.row: h.score for h in a + b}
        assert all(abs(scores[r] - boundary) <= tol for r in differ), (a, b)


def test_an_over_budget_phase_fails_before_the_work(tmp_path, caplog):
    np.save(tmp_path / "g.npy", clustered_data(20_000, 64, seed=1))
    args = _build(tmp_path / "g.npy", tmp_path / "root", "--memory-budget", "52MiB")
    args[args.index("IVF64,Flat")] = "HNSW32"  # vectors and links held whole
    assert main(args) == 2
    assert "serving index must be held in memory" in caplog.text
    assert "needs a budget of at least" in caplog.text
    assert not (tmp_path / "root").exists() or artifact.current_version(tmp_path / "root") is None


def test_a_flat_serving_index_over_the_budget_is_written_in_blocks_and_mapped(tmp_path):
    """Out of core, ``--serving-index exact`` larger than the budget allows builds and serves as in memory."""
    g = clustered_data(20_000, 64, seed=1)
    np.save(tmp_path / "g.npy", g)
    graph = ("--knn", "IVF32,Flat", "--nprobe", "4")
    small = _build(tmp_path / "g.npy", tmp_path / "ooc", *graph, "--memory-budget", "60MiB")
    small[small.index("IVF64,Flat")] = "exact"  # 4 N d = 4.9 MiB: held, over what 60 MiB leaves
    big = _build(tmp_path / "g.npy", tmp_path / "ram", *graph)
    big[big.index("IVF64,Flat")] = "exact"
    assert main(small) == 0 and main(big) == 0
    entry = artifact.read_manifest(tmp_path / "ooc", artifact.current_version(tmp_path / "ooc")).serving_index
    assert entry.index_type.startswith("IndexFlat")
    queries = g[:40] / np.linalg.norm(g[:40], axis=1, keepdims=True)
    _, ours = _served(tmp_path / "ooc", queries)
    _, theirs = _served(tmp_path / "ram", queries)
    _assert_same_hits(ours, theirs)


def test_stdout_carries_only_the_json_summary_out_of_core(tmp_path):
    # FAISS printf()s a line on stdout whenever it loads on-disk lists: in a subprocess (C's
    # stdout buffer is flushed at exit) it used to precede the summary and break its JSON.
    np.save(tmp_path / "g.npy", clustered_data(6_000, 32, seed=2))
    args = _build(tmp_path / "g.npy", tmp_path / "root", "--knn", "IVF32,Flat", "--memory-budget", "52MiB")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", "index_builder.cli", *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["n"] == 6_000
    assert artifact.read_manifest(tmp_path / "root", summary["version"]).serving_index.ivfdata
    assert "updating ondisk filename" in done.stderr  # still said, where logs go


def test_out_of_core_serves_what_the_resident_build_serves(tmp_path):
    g = clustered_data(6_000, 32, seed=2)
    np.save(tmp_path / "g.npy", g)
    knn = ["--knn", "IVF32,Flat", "--nprobe", "6", "--batch-lists", "--qe-times", "2", "--qe-k", "5"]
    assert main(_build(tmp_path / "g.npy", tmp_path / "a", *knn)) == 0
    assert main(_build(tmp_path / "g.npy", tmp_path / "b", *knn, "--memory-budget", "52MiB")) == 0
    queries = g[::300] + 0.01
    sa, ra = _served(tmp_path / "a", queries)
    sb, rb = _served(tmp_path / "b", queries)
    _assert_same_hits(ra, rb)
    np.testing.assert_allclose(sa.expand(queries), sb.expand(queries), rtol=1e-5, atol=1e-6)
    mb = sb.manifest
    assert mb.serving_index.ivfdata == "serving.ivfdata"
    assert [lv.ivfdata for lv in mb.levels] == ["level_0.ivfdata", "level_1.ivfdata"]
    assert "serving.ivfdata" in mb.files and not artifact.verify(tmp_path / "b")
    version = tmp_path / "b" / "versions" / mb.version
    assert not (version / ".scratch").exists()
    for t in range(2):
        np.testing.assert_allclose(sa.artifact.levels[t].rows, sb.artifact.levels[t].rows, atol=1e-6)


def _cgroup_or_skip() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def big_gallery(tmp_path_factory) -> tuple[np.ndarray, Path]:
    """88,000 x 256 float32: 90.1 MB on disk, more than the cgroups below allow (83.9 MB)."""
    x = clustered_data(88_000, 256, seed=5)
    path = tmp_path_factory.mktemp("big") / "g.npy"
    np.save(path, x)
    return x, path


@pytest.fixture(scope="module")
def unlimited_root(tmp_path_factory, big_gallery) -> Path:
    root = tmp_path_factory.mktemp("unlimited") / "root"
    assert main(_build(big_gallery[1], root, *GRAPH)) == 0
    return root


GRAPH = ("--knn", "IVF64,Flat", "--nprobe", "4", "--batch-lists", "--train-size", "4000")
LIMIT = 80 * MiB
"""Below the gallery; 48 MiB of it are the interpreter and libraries (budget.BASE_BYTES)."""


def _env() -> dict[str, str]:
    here = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def limited_build(tmp_path_factory, big_gallery) -> tuple[Path, subprocess.CompletedProcess[str], int]:
    """The CLI's build of ``big_gallery`` in a cgroup of LIMIT: (root, the process, peak anon)."""
    _cgroup_or_skip()
    _, gallery = big_gallery
    root = tmp_path_factory.mktemp("limited") / "root"
    assert gallery.stat().st_size > LIMIT  # the budget comes from the cgroup: no flag
    argv = [sys.executable, "-m", "index_builder.cli", *_build(gallery, root, *GRAPH)]
    with MemoryCgroup(LIMIT) as cg:
        done = cg.run(argv, env=_env(), timeout=600)
    return root, done, cg.peak_rss


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_build_in_a_cgroup_smaller_than_the_gallery_serves_what_the_unlimited_one_does(
    big_gallery, unlimited_root, limited_build
):
    x, _ = big_gallery
    root, done, peak_rss = limited_build
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cgroup v1 memory" in done.stderr and "out of core" in done.stderr
    queries = x[::2000] * 1.05 + 0.01
    # at nprobe = nlist the serving answers do not depend on its k-means: the streamed
    # expansion's rows differ from the resident one's by up to 9e-8, k-means amplifies that
    # (centroids 0.038 apart from the same 10,000 rows), and at the built nprobe 8 (recall 0.66)
    # the two versions' tails differed at ranks 6-9
    sa, ra = _served(unlimited_root, queries, nprobe=64)
    sb, rb = _served(root, queries, nprobe=64)
    _assert_same_hits(ra, rb)
    np.testing.assert_allclose(sa.expand(queries), sb.expand(queries), rtol=1e-5, atol=1e-6)
    assert peak_rss < LIMIT


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_service_in_a_cgroup_smaller_than_its_version_keeps_answering(
    tmp_path, big_gallery, limited_build
):
    x, _ = big_gallery
    root, done, _ = limited_build
    assert done.returncode == 0, done.stderr[-3000:]
    version = root / "versions" / artifact.current_version(root)
    files = sum(p.stat().st_size for p in version.iterdir())
    limit = 128 * MiB
    assert limit < files  # the mapped version cannot all be resident at once
    port = free_port()
    env = {**_env(), "AQE_INDEX_ROOT": str(root), "AQE_PORT": str(port), "AQE_RELOAD_INTERVAL_S": "0"}
    queries = x[::2000] * 1.05 + 0.01
    with MemoryCgroup(limit, "aqe-service") as cg, (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            cg.command([sys.executable, "-m", "service.main"]), env=env, stdout=log, stderr=log
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc, tmp_path / "server.log", timeout_s=60)
            served = []
            for _ in range(3):  # every query reads its lists and neighbour rows through the page cache
                body = {"embeddings": queries.tolist(), "k": 10}
                r = httpx.post(f"{url}/search", json=body, timeout=60)
                assert r.status_code == 200, r.text
                served = r.json()["results"]
            stat = cg.stat()
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    _, want = _served(root, queries)  # what the same version answers in process, unconfined
    got = [[Hit(int(h["id"]), h["score"]) for h in hits] for hits in served]
    _assert_same_hits(got, want, tol=1e-4)
    assert stat["total_rss"] < limit


def test_a_build_that_cannot_fit_its_cgroup_says_so_and_exits_2(tmp_path, big_gallery):
    _cgroup_or_skip()
    argv = [sys.executable, "-m", "index_builder.cli", *_build(big_gallery[1], tmp_path / "root")]
    argv[argv.index("IVF64,Flat")] = "exact"
    with MemoryCgroup(LIMIT) as cg:
        done = cg.run(argv, env=_env(), timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs a budget of at least" in done.stderr


def test_subprocess_helper_is_not_left_behind():
    # every cgroup made above is removed again
    leftovers = [p for p in Path("/sys/fs/cgroup/memory").glob(f"aqe-test-{os.getpid()}-*")]
    assert leftovers == []
    assert subprocess.run(["true"]).returncode == 0
