"""The cluster build against the single-process build: same levels and expanded rows, on real workers.

Workers are real processes on 127.0.0.1: a ``LocalCluster(processes=True)`` of single-threaded
workers, and ``dask scheduler`` / ``dask worker --no-nanny`` subprocesses for the fault test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import clustered_data

from aqe_retrieval import artifact
from index_builder.build import build
from index_builder.cluster import ClusterSpec, check_address
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams
from index_builder.knn import KnnSpec

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


def _build(gallery: Path, root: Path, knn: KnnSpec, qe_times: int, cluster: ClusterSpec | None) -> Path:
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


def test_cluster_address_checked() -> None:
    """A bad --cluster value fails on construction, naming it."""
    assert check_address("local:2") == "local:2"
    with pytest.raises(ValueError, match="local:0"):
        ClusterSpec("local:0")
    with pytest.raises(ValueError, match="rows_per_task"):
        ClusterSpec("tcp://127.0.0.1:8786", rows_per_task=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_worker_killed_mid_build(tmp_path, gallery) -> None:
    """``dask worker --no-nanny`` processes; one SIGKILLed mid-build; the build still publishes the same."""
    ref = _build(gallery, tmp_path / "ref", EXACT, 2, None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), *sys.path) if p)}
    address = f"tcp://127.0.0.1:{_free_port()}"
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
