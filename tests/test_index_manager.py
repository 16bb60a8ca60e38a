"""Which version is served when the shared files change underneath: a real ``search-service``.

The service maps a private copy of the served version (AQE_LOCAL_COPY_DIR), so files of the
index root truncated in place (an overwrite; an NFS prune from another host), replaced or
deleted never reach its pages: before, the next search died of SIGBUS without a log line.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import serving

from aqe_retrieval import artifact
from index_builder.cli import main as builder
from service.index_manager import IndexManager
from service.settings import Settings, default_local_copy_dir

ADMIN_TOKEN = "adm1n"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def build(root: Path, paths: dict[str, Path]) -> str:
    args = ["build", "--gallery", str(paths["gallery"]), "--root", str(root), "--qe-k", "5", "--no-progress"]
    assert builder([*args, "--ids", str(paths["ids"]), "--metadata", str(paths["metadata"])]) == 0
    version = artifact.current_version(root)
    assert version is not None
    return version


@contextmanager
def service(root: Path, local: Path, log: Path, ready: bool = True) -> Iterator[str]:
    env = {
        "AQE_INDEX_ROOT": str(root),
        "AQE_LOCAL_COPY_DIR": str(local),
        "AQE_ADMIN_TOKEN": ADMIN_TOKEN,  # /info shows reload failure texts to the admin only
    }
    with serving(log, env=env, ready_path="/readyz" if ready else "/healthz") as url:
        yield url


def search(url: str, x: np.ndarray) -> httpx.Response:
    body = {
        "embedding": (x[7] + 0.01).tolist(),
        "k": 5,
        "with_metadata": True,
        "filter": {"camera": {"in": [1]}},
    }
    return httpx.post(f"{url}/search", json=body, timeout=10)


def answers_from(url: str, x: np.ndarray, version: str) -> None:
    for _ in range(3):
        r = search(url, x)
        assert r.status_code == 200, r.text
        assert r.json()["index_version"] == version
        assert r.json()["results"][0][0]["id"] == "img-00007"
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def wait_for(predicate, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def damaged_version(tmp_path: Path, paths: dict[str, Path], root: Path) -> str:
    """A version published under ``root`` whose serving index is truncated (not yet current)."""
    side = tmp_path / "side"
    version = build(side, paths)
    os.truncate(artifact.version_dir(side, version) / "serving.faiss", 100)
    os.rename(artifact.version_dir(side, version), root / "versions" / version)
    return version


def test_the_served_version_survives_its_shared_files_being_truncated_replaced_and_deleted(
    tmp_path, small_gallery
):
    x, paths = small_gallery
    root, local = tmp_path / "root", tmp_path / "local"
    first = build(root, paths)
    shared = artifact.version_dir(root, first)
    with service(root, local, tmp_path / "server.log") as url:
        answers_from(url, x, first)
        assert artifact.version_ids(local) == [first]

        for p in shared.iterdir():  # an overwrite in place, or another host's prune over NFS
            os.truncate(p, 0)
        answers_from(url, x, first)
        for p in shared.iterdir():  # replaced by other files under the same names
            p.with_name(p.name + ".new").write_bytes(b"\0" * 4096)
            os.replace(p.with_name(p.name + ".new"), p)
        answers_from(url, x, first)
        shutil.rmtree(shared)
        answers_from(url, x, first)

        # current points at a damaged version: refused, the old one keeps answering
        bad = damaged_version(tmp_path, paths, root)
        artifact.set_current(root, bad)

        def refused() -> bool:
            failure = httpx.get(f"{url}/info", headers=ADMIN).json()["last_reload_failure"]
            return failure is not None and failure["version"] == bad

        wait_for(refused, "the damaged version was not refused")
        assert (
            "serving.faiss" in httpx.get(f"{url}/info", headers=ADMIN).json()["last_reload_failure"]["error"]
        )
        answers_from(url, x, first)
        assert artifact.version_ids(local) == [first]  # the refused copy was not kept

        good = build(root, paths)  # until a good version is published
        wait_for(lambda: search(url, x).json()["index_version"] == good, "the good version was not loaded")
        answers_from(url, x, good)
        wait_for(lambda: artifact.version_ids(local) == [good], "the old copy was not removed")


def test_a_damaged_current_version_is_a_503_with_the_reason_until_a_good_one_appears(tmp_path, small_gallery):
    x, paths = small_gallery
    root, local = tmp_path / "root", tmp_path / "local"
    build(root, paths)
    bad = damaged_version(tmp_path, paths, root)
    artifact.set_current(root, bad)
    with service(root, local, tmp_path / "server.log", ready=False) as url:
        r = search(url, x)
        assert r.status_code == 503 and r.json()["detail"]
        assert httpx.get(f"{url}/readyz").status_code == 503
        failure = httpx.get(f"{url}/info", headers=ADMIN).json()["last_reload_failure"]
        assert failure["version"] == bad and "serving.faiss" in failure["error"]
        good = build(root, paths)
        wait_for(lambda: search(url, x).status_code == 200, "the good version was not loaded")
        answers_from(url, x, good)


def test_the_manager_serves_in_place_when_the_local_copy_is_off(tmp_path, small_gallery, monkeypatch):
    _, paths = small_gallery
    root = tmp_path / "root"
    version = build(root, paths)
    monkeypatch.setenv("AQE_LOCAL_COPY_DIR", "off")
    manager = IndexManager.from_settings(Settings(index_root=root))
    assert manager.local_copy_dir is None
    assert manager.reload().status == "loaded"
    assert manager.searcher is not None
    rows = manager.searcher.artifact.levels[0].rows
    assert Path(rows.filename).parent == artifact.version_dir(root, version)  # mapped in place

    monkeypatch.setenv("AQE_LOCAL_COPY_DIR", str(tmp_path / "local"))
    manager = IndexManager.from_settings(Settings(index_root=root, max_filter_values=3))
    assert manager.reload().status == "loaded" and manager.searcher is not None
    assert (
        Path(manager.searcher.artifact.levels[0].rows.filename).parent
        == tmp_path / "local/versions" / version
    )
    assert manager.searcher.max_filter_values == 3


@pytest.mark.parametrize("value", ["", " "])
def test_a_blank_local_copy_dir_is_the_default(monkeypatch, tmp_path, value):
    monkeypatch.setenv("AQE_LOCAL_COPY_DIR", value)
    assert Settings(index_root=tmp_path).local_copy_dir == default_local_copy_dir()
    assert default_local_copy_dir().name == f"aqe-local-copy-{os.geteuid()}"


def test_a_local_copy_dir_on_tmpfs_serves_in_place_with_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("aqe_retrieval.local_copy.memory_backed", lambda path: True)
    manager = IndexManager(tmp_path, local_copy_dir=tmp_path / "local")
    assert manager.local_copy_dir is None
    assert "is on a tmpfs" in caplog.text
