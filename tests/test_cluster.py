"""The cluster build against the single-process build: same levels and expanded rows, on real workers.

Workers are real processes on 127.0.0.1: a ``LocalCluster(processes=True)`` of single-threaded
workers, and ``dask scheduler`` / ``dask worker --no-nanny`` subprocesses for the fault test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import clustered_data, free_port

from aqe_retrieval import artifact
from index_builder import dist_knn
from index_builder.build import build
from index_builder.cluster import ClusterSpec, check_address
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams
from index_builder.knn import KnnSpec
from index_builder.urls import Url

distributed = pytest.importorskip("distributed")

EXACT = KnnSpec()
IVF = KnnSpec(method="IVF16,Flat", nprobe=4)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """900 x 24 clustered rows on disk."""
    path = tmp_path_factory.mktemp("cluster") / "gallery.npy"
    np.save(path, clustered_data(900, 24, seed=5))
    return path


@pytest.fixture(scope="module")
def scheduler() -> str:
    """The address of a LocalCluster of three single-threaded worker processes."""
    with distributed.LocalCluster(
        n_workers=3, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster:
        yield cluster.scheduler_address


def _build(gallery: Path | Url, root: Path, knn: KnnSpec, qe_times: int, cluster: ClusterSpec | None) -> Path:
    build(
        BuildConfig(
            gallery=gallery,
            root=root,
            params=AqeParams(qe_k=5, qe_times=qe_times),
            knn=knn,
            show_progress=False,
            cluster=cluster,
        )
    )
    return root


def _assert_same(ref_root: Path, root: Path) -> None:
    ref, got = artifact.load(ref_root), artifact.load(root)
    assert len(ref.levels) == len(got.levels)
    for a, b in zip(ref.levels, got.levels, strict=True):
        np.testing.assert_allclose(np.asarray(b.rows), np.asarray(a.rows), atol=1e-5)
        np.testing.assert_allclose(np.asarray(b.norms), np.asarray(a.norms), rtol=1e-5)
    n = ref.manifest.n
    np.testing.assert_allclose(
        got.serving_index.reconstruct_n(0, n), ref.serving_index.reconstruct_n(0, n), atol=1e-5
    )
    if ref.manifest.graph_recall is None:
        assert got.manifest.graph_recall is None
    else:  # neighbours tied at the k-th place are picked in another order (clustered_data has ties)
        assert got.manifest.graph_recall == pytest.approx(ref.manifest.graph_recall, abs=0.01)
    assert got.manifest.effective_qe_k == ref.manifest.effective_qe_k


@pytest.mark.parametrize(
    ("knn", "qe_times", "spec"),
    [
        (EXACT, 1, {"tile": 256}),
        (EXACT, 2, {"tile": 200, "rows_per_task": 250}),
        (IVF, 1, {"group_bytes": 30_000}),
        (IVF, 2, {"rows_per_task": 333, "group_bytes": 10**9}),
    ],
    ids=["exact-1", "exact-2", "ivf-1", "ivf-2"],
)
def test_cluster_equals_single_process(tmp_path, gallery, scheduler, knn, qe_times, spec) -> None:
    """Any partitioning, three workers: the levels and expanded rows the single process publishes."""
    ref = _build(gallery, tmp_path / "ref", knn, qe_times, None)
    got = _build(gallery, tmp_path / "got", knn, qe_times, ClusterSpec(scheduler, **spec))
    _assert_same(ref, got)


@pytest.mark.parametrize(("knn", "workers"), [(EXACT, 1), (IVF, 2)], ids=["exact-local1", "ivf-local2"])
def test_local_cluster_workers(tmp_path, gallery, knn, workers) -> None:
    """``local:N`` starts its own worker processes; 1 and 2 workers publish the same result."""
    ref = _build(gallery, tmp_path / "ref", knn, 2, None)
    got = _build(gallery, tmp_path / "got", knn, 2, ClusterSpec(f"local:{workers}", rows_per_task=300))
    _assert_same(ref, got)


def test_workers_read_a_url_gallery_themselves(tmp_path, gallery, scheduler) -> None:
    """An fsspec URL: each worker resolves it (unknown there: the build fails) and reads its ranges."""
    import rangefs

    from aqe_retrieval.errors import InputError

    rangefs.register()  # here, for the client's look at the header
    url = Url(rangefs.url(gallery))
    with pytest.raises(InputError, match="no fsspec filesystem for protocol 'aqetest'"):
        _build(url, tmp_path / "unknown", EXACT, 1, ClusterSpec("local:1"))
    with distributed.Client(scheduler) as client:
        client.run(rangefs.register)
    ref = _build(gallery, tmp_path / "ref", IVF, 1, None)
    got = _build(url, tmp_path / "got", IVF, 1, ClusterSpec(scheduler, rows_per_task=200))
    _assert_same(ref, got)


def test_cluster_address_checked() -> None:
    """A bad --cluster value fails on construction, naming it."""
    assert check_address("local:2") == "local:2"
    with pytest.raises(ValueError, match="local:0"):
        ClusterSpec("local:0")
    with pytest.raises(ValueError, match="rows_per_task"):
        ClusterSpec("tcp://127.0.0.1:8786", rows_per_task=0)


def test_row_range_tasks_fit_the_worker_share() -> None:
    """Rows per read/expand/merge task follow the share and d (a wide gallery gets fewer rows)."""
    spec = ClusterSpec("local:1", worker_bytes=64 * 2**20)
    assert spec.rows_for(768) == 64 * 2**20 // (16 * 768)
    assert spec.rows_for(768) * 768 * 4 * 4 <= spec.worker_bytes
    assert spec.rows_for(8) == 16384 and ClusterSpec("local:1", worker_bytes=1).rows_for(8) == 256
    assert ClusterSpec("local:1", rows_per_task=100).rows_for(768) == 100


def test_worker_killed_mid_build(tmp_path, gallery) -> None:
    """``dask worker --no-nanny`` processes; one SIGKILLed mid-build; the build still publishes the same."""
    ref = _build(gallery, tmp_path / "ref", EXACT, 2, None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), *sys.path) if p)}
    address = f"tcp://127.0.0.1:{free_port()}"
    dask = [sys.executable, "-m", "dask"]  # the `dask` command, with this interpreter
    procs = [
        subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
             "--no-dashboard"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    try:
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [*dask, "worker", address, "--nthreads", "1", "--memory-limit", "300MiB",
                     "--no-nanny", "--host", "127.0.0.1", "--no-dashboard"],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        root = tmp_path / "got"
        root.mkdir()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                _build(gallery, root, EXACT, 2, ClusterSpec(address, tile=48, rows_per_task=100))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 60
        while not list(root.glob(".staging-*/.scratch/parts_0/tile_*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        killed_mid_build = thread.is_alive()
        procs[1].send_signal(signal.SIGKILL)
        thread.join(timeout=240)
        assert not errors, errors
        assert killed_mid_build
        _assert_same(ref, root)
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait(timeout=30)


def test_knn_auto_on_a_cluster_is_exact_while_cheap_and_asks_for_a_graph_above(tmp_path) -> None:
    from aqe_retrieval.errors import KnnConfigError
    from index_builder.dist_build import resolve_auto_graph
    from index_builder.graph_auto import GRAPH_EXACT_MAX_N

    config = BuildConfig(gallery=tmp_path / "g.npy", root=tmp_path, knn=KnnSpec(method="auto"))
    assert resolve_auto_graph(config, GRAPH_EXACT_MAX_N).knn.exact
    with pytest.raises(KnnConfigError, match="give the graph explicitly"):
        resolve_auto_graph(config, GRAPH_EXACT_MAX_N + 1)
    ivf = BuildConfig(gallery=tmp_path / "g.npy", root=tmp_path, knn=KnnSpec(method="IVF16,Flat", nprobe=4))
    assert resolve_auto_graph(ivf, 10**7) is ivf


def test_a_cluster_build_refuses_a_change_log_it_cannot_fold(tmp_path) -> None:
    """Logged adds/deletes must not be dropped silently: the cluster build says so and stops."""
    from aqe_retrieval.errors import InputError
    from index_builder.cli import main

    rng = np.random.default_rng(1)
    np.save(tmp_path / "g.npy", rng.standard_normal((30, 8)).astype(np.float32))
    (tmp_path / "g.ids").write_text("".join(f"r{i}\n" for i in range(30)))
    root = tmp_path / "root"
    exact = ["--knn", "exact", "--serving-index", "exact", "--expansion-index", "exact", "--qe-k", "3"]
    base = ["--gallery", str(tmp_path / "g.npy"), "--ids", str(tmp_path / "g.ids"), "--root", str(root)]
    assert main(["build", *base, *exact]) == 0
    (tmp_path / "gone.txt").write_text("r1\n")
    assert main(["delete", "--root", str(root), "--ids", str(tmp_path / "gone.txt")]) == 0
    config = BuildConfig(
        gallery=tmp_path / "g.npy", ids=tmp_path / "g.ids", root=root, cluster=ClusterSpec("local:1")
    )
    with pytest.raises(InputError, match="logged add/delete"):
        build(config)


# ------------------------------------------------- a gallery larger than a worker


BIG_N, BIG_D = 80_000, 768
"""246 MB of float32: 1.5 times any one worker's cgroup (and --memory-limit) below."""
WORKER_LIMIT = 160 * 2**20
"""Each worker's cgroup and ``--memory-limit``: the interpreter, distributed and FAISS take ~110 MiB."""
BIG_ARGS = (
    "--knn", "IVF256,Flat", "--nprobe", "2", "--qe-k", "5", "--qe-times", "1",
    "--serving-index", "exact", "--no-progress", "--train-size", "7000",
)  # fmt: skip
"""``--train-size``: the default sample (12,800 rows of 768 floats) is more than a worker's share
(40 MiB) holds, so the cluster would train on fewer rows than the single-process reference
(dist_knn.train_rows: 7,650 here); 7,000 fits both and keeps their results comparable."""


def _cli(gallery: Path, root: Path, *extra: str) -> list[str]:
    return ["build", "--gallery", str(gallery), "--root", str(root), *BIG_ARGS, *extra]


class _Sampler:
    """The largest anonymous memory (``total_rss``) each cgroup held, sampled every 50 ms."""

    def __init__(self, cgroups: list) -> None:
        self.cgroups, self.peaks = cgroups, [0] * len(cgroups)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            for i, cg in enumerate(self.cgroups):
                self.peaks[i] = max(self.peaks[i], cg.stat().get("total_rss", 0))
            self.done.wait(0.05)

    def __enter__(self) -> _Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_gallery_larger_than_any_worker_builds_in_bounded_memory(tmp_path) -> None:
    """Three ``dask worker`` processes, each in a 160 MiB memory cgroup; a 246 MB gallery.

    The client runs the CLI in a cgroup of one worker's limit too. Counted: each cgroup's
    anonymous memory (``total_rss``, sampled; page cache of the memory-mapped arrays is charged
    to the cgroup as well but the kernel reclaims it at the limit, so it is not counted). A
    worker over its limit is killed by the kernel, so every worker must still be alive at the
    end; and the published version equals the single-process build's.
    """
    from memcg import MemoryCgroup, unavailable

    from index_builder.cli import main

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    gallery = tmp_path / "gallery.npy"
    np.save(gallery, clustered_data(BIG_N, BIG_D, seed=11))  # identities in runs: neighbours nearby
    assert gallery.stat().st_size > 1.4 * WORKER_LIMIT
    spec = KnnSpec(method="IVF256,Flat", train_size=7000)  # BIG_ARGS: the same sample on a worker
    assert dist_knn.train_rows(spec, BIG_D, WORKER_LIMIT // 4) == 7000
    assert main(_cli(gallery, tmp_path / "ref")) == 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), *sys.path) if p)}
    address = f"tcp://127.0.0.1:{free_port()}"
    dask = [sys.executable, "-m", "dask"]
    with contextlib.ExitStack() as stack:
        cgroups = [stack.enter_context(MemoryCgroup(WORKER_LIMIT, "aqe-dask")) for _ in range(4)]
        procs: list[subprocess.Popen] = []
        stack.callback(lambda: [(p.kill(), p.wait(timeout=30)) for p in reversed(procs)])
        procs.append(
            subprocess.Popen(
                [*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                 "--no-dashboard"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        for cg in cgroups[:3]:
            argv = [*dask, "worker", address, "--nthreads", "1", "--memory-limit", str(WORKER_LIMIT),
                    "--no-nanny", "--host", "127.0.0.1", "--no-dashboard"]  # fmt: skip
            procs.append(
                subprocess.Popen(
                    cg.command(argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(3, timeout=60)
        client_cg = cgroups[3]
        argv = [
            sys.executable,
            "-m",
            "index_builder.cli",
            *_cli(gallery, tmp_path / "got", "--cluster", address),
        ]
        with _Sampler(cgroups[:3]) as workers:
            done = client_cg.run(argv, env=env, timeout=500)
        assert done.returncode == 0, done.stderr[-3000:]
        alive = [p.poll() is None for p in procs[1:]]
        assert all(alive), f"a worker was killed (over its cgroup?): {alive}"
        # the limits were binding: anonymous memory plus page cache reached them, and was reclaimed
        assert all(cg.max_usage() >= 0.9 * WORKER_LIMIT for cg in cgroups[:3])
        peaks = [*workers.peaks, client_cg.peak_rss]
    assert all(0 < p < WORKER_LIMIT for p in peaks), peaks
    assert client_cg.peak_rss < WORKER_LIMIT  # the client holds no share of the gallery
    _assert_same(tmp_path / "ref", tmp_path / "got")


def test_topk_selects_by_row_chunks_like_a_full_sort() -> None:
    """The chunked selection (a few rows at a time) returns each row's k best, as argsort does."""
    rng = np.random.default_rng(3)
    s = rng.standard_normal((37, 23)).astype(np.float32)
    for cells in (1, 50, 23 * 37):
        sims, ids = dist_knn._topk(s, 5, 100, cells=cells)
        order = np.argsort(-s, axis=1)[:, :5]
        np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(order + 100, axis=1))
        np.testing.assert_allclose(np.sort(sims, axis=1), np.sort(np.take_along_axis(s, order, 1), axis=1))
    sims, ids = dist_knn._topk(s[:, :3], 5, 0, cells=7)  # fewer columns than k: padded
    assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all() and (ids[:, :3] >= 0).all()


def test_training_sample_is_the_single_process_one_until_the_worker_share_is_smaller() -> None:
    """The training task samples what the single-process build does, or as many rows as fit its share."""
    spec = KnnSpec(method="IVF64,Flat")
    assert dist_knn.train_rows(spec, 32, 2**30) == 10_000  # max(50 nlist, 10000), as knn.build_index
    assert dist_knn.train_rows(replace(spec, train_size=5000), 32, 2**30) == 5000
    share = dist_knn.KMEANS_BLOCK_BYTES + 2**20
    rows = dist_knn.train_rows(spec, 32, share)
    assert 64 <= rows < 10_000
    assert rows * (4 * 32 + 12) + 8 * 64 * 32 + dist_knn.KMEANS_BLOCK_BYTES <= share
