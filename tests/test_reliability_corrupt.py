"""Corrupt artifacts against a running service: each is refused with a reason, the old one serves.

Every case publishes a good version v1, serves it, publishes v2, damages v2 in one way and asks
for a reload (``POST /admin/reload``, or the watcher): the reload must be refused with a reason
in ``/info`` and the 409 body, ``aqe_reload_failures_total`` must count it, and searches must
still be answered by v1. ``tests/test_artifact.py`` covers the same damage at the artifact level.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from aqe_retrieval import artifact
from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams
from service.app import create_app
from service.settings import Settings

ADMIN = {"Authorization": "Bearer adm1n"}


def publish(root: Path, paths: dict[str, Path]) -> str:
    """Build and publish one more good version (keeping every older one)."""
    return build(
        BuildConfig(
            gallery=paths["gallery"],
            ids=paths["ids"],
            metadata=paths["metadata"],
            root=root,
            params=AqeParams(qe_k=5),
            keep=50,
            show_progress=False,
        )
    ).version


def edit_manifest(vdir: Path, change: Callable[[dict], object]) -> None:
    m = json.loads((vdir / "manifest.json").read_text())
    change(m)
    (vdir / "manifest.json").write_text(json.dumps(m))


def replace_file(vdir: Path, name: str, array: np.ndarray, allow_pickle: bool = False) -> None:
    """Swap a file for another array and re-checksum it, so only the load-time checks can tell."""
    np.save(vdir / name, array, allow_pickle=allow_pickle)
    data = (vdir / name).read_bytes()

    def rechecksum(m: dict) -> None:
        m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    edit_manifest(vdir, rechecksum)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_field(field: str) -> Callable[[dict], object]:
    return lambda m: m.pop(field)


CORRUPTIONS: dict[str, tuple[Callable[[Path], object], str]] = {
    "truncated index file": (
        lambda v: truncate(v / "serving.faiss"),
        r"serving\.faiss: \d+ bytes, manifest says \d+",
    ),
    "flipped bytes": (lambda v: flip_bytes(v / "level_0.npy"), r"level_0\.npy: checksum mismatch"),
    "missing file": (lambda v: (v / "level_0_norms.npy").unlink(), r"level_0_norms\.npy: missing"),
    "missing manifest": (lambda v: (v / "manifest.json").unlink(), r"no manifest"),
    "manifest does not parse": (
        lambda v: (v / "manifest.json").write_text('{"format_version": 1,'),
        r"manifest does not parse",
    ),
    "manifest is not an object": (
        lambda v: (v / "manifest.json").write_text("[1, 2]"),
        r"format version None, this build reads \[1, 2\]",
    ),
    "wrong format version": (
        lambda v: edit_manifest(v, lambda m: m.update(format_version=3)),
        r"format version 3, this build reads \[1, 2\]",
    ),
    "delta format without a delta": (  # format 2 is what add/delete publish, with their delta
        lambda v: edit_manifest(v, lambda m: m.update(format_version=2)),
        r"format version 2 without a delta",
    ),
    "manifest misses a field": (
        lambda v: edit_manifest(v, drop_field("levels")),
        r"invalid manifest.*levels",
    ),
    "manifest d differs from the arrays": (
        lambda v: edit_manifest(v, lambda m: m.update(d=31)),
        r"level_0\.npy: float32 \(600, 32\), expected \(600, 31\)",
    ),
    "manifest n differs from the arrays": (
        lambda v: edit_manifest(v, lambda m: m.update(n=601)),
        r"expected \(601, 32\)",
    ),
    "array of another dimension, re-checksummed": (
        lambda v: replace_file(v, "level_0.npy", np.ones((600, 16), np.float32)),
        r"level_0\.npy: float32 \(600, 16\), expected \(600, 32\)",
    ),
    "array of another dtype, re-checksummed": (
        lambda v: replace_file(v, "level_0.npy", np.ones((600, 32), np.float64)),
        r"level_0\.npy: float64 \(600, 32\), expected \(600, 32\)",
    ),
    "ids of another length, re-checksummed": (
        lambda v: replace_file(v, "ids.npy", np.array(["a"] * 599)),
        r"ids\.npy: .*\(599,\), expected \(600,\)",
    ),
    "serving index of another dimension, re-checksummed": (
        lambda v: _replace_index(v, 16),
        r"serving\.faiss: 600 x 16, expected 600 x 32",
    ),
    "truncated .npy, re-checksummed": (
        lambda v: _truncate_rechecksum(v, "level_0_norms.npy"),
        r"level_0_norms\.npy: unreadable",
    ),
    "truncated index, re-checksummed": (
        lambda v: _truncate_rechecksum(v, "serving.faiss"),
        r"serving\.faiss: FAISS cannot read it",
    ),
}


def _replace_index(vdir: Path, d: int) -> None:
    import faiss

    index = faiss.IndexFlatIP(d)
    index.add(np.ones((600, d), np.float32))
    faiss.write_index(index, str(vdir / "serving.faiss"))
    data = (vdir / "serving.faiss").read_bytes()
    edit_manifest(
        vdir,
        lambda m: m["files"].update(
            {"serving.faiss": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
        ),
    )


def _truncate_rechecksum(vdir: Path, name: str) -> None:
    truncate(vdir / name)
    data = (vdir / name).read_bytes()
    edit_manifest(
        vdir,
        lambda m: m["files"].update({name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}),
    )


@pytest.fixture
def served(tmp_path, built_root, small_gallery):
    """A private copy of ``built_root`` (v1) served by an app with admin token, no watcher."""
    root = tmp_path / "root"
    shutil.copytree(built_root, root)
    settings = Settings(index_root=root, reload_interval_s=0, admin_token="adm1n")
    with TestClient(create_app(settings)) as client:
        yield client, root, small_gallery


def failures(client: TestClient) -> float:
    m = re.search(r"^aqe_reload_failures_total (\S+)$", client.get("/metrics").text, re.M)
    assert m is not None
    return float(m.group(1))


def assert_still_serving(client: TestClient, x: np.ndarray, version: str | None) -> None:
    r = client.post("/search", json={"embedding": (x[7] + 0.01).tolist(), "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["index_version"] == version
    assert client.get("/readyz").json()["index_version"] == version


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_version_is_refused_and_the_old_one_keeps_serving(served, case):
    client, root, (x, paths) = served
    v1 = client.get("/info").json()["index_version"]
    v2 = publish(root, paths)
    damage, reason = CORRUPTIONS[case]
    damage(root / "versions" / v2)
    before = failures(client)

    r = client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["status"] == "failed" and body["version"] == v2 and body["serving"] == v1
    assert re.search(reason, body["error"], re.S), body["error"]
    info = client.get("/info", headers=ADMIN).json()  # the error text is for admins only
    assert info["index_version"] == v1
    assert info["last_reload_failure"]["version"] == v2
    assert re.search(reason, info["last_reload_failure"]["error"], re.S)
    assert failures(client) == before + 1
    assert_still_serving(client, x, v1)

    # once a good version is published again it is picked up
    v3 = publish(root, paths)
    assert client.post("/admin/reload", headers=ADMIN).json()["status"] == "loaded"
    assert_still_serving(client, x, v3)


@pytest.mark.parametrize(
    ("pointer", "reason"),
    [
        (b"../../etc\n", r"'\.\./\.\./etc' is not a version id"),
        (b"../../etc/passwd", r"is not a version id"),
        (b"/etc\n", r"'/etc' is not a version id"),
        (b"\n", r"'' is not a version id"),
        (b"\xff\xfe\x00garbage", r"unreadable"),
        (b"20991231T235959000000Z-abcdef\n", r"no manifest"),
    ],
)
def test_bad_current_pointer_is_refused_and_the_old_version_serves(served, pointer, reason):
    client, root, (x, _) = served
    v1 = client.get("/info").json()["index_version"]
    (root / "current").write_bytes(pointer)
    r = client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409 and re.search(reason, r.json()["error"]), r.text
    assert re.search(reason, client.get("/info", headers=ADMIN).json()["last_reload_failure"]["error"])
    assert_still_serving(client, x, v1)


def test_watcher_refuses_a_corrupt_version_without_an_admin_call(tmp_path, built_root, small_gallery):
    x, paths = small_gallery
    root = tmp_path / "root"
    shutil.copytree(built_root, root)
    v1 = artifact.current_version(root)
    with TestClient(
        create_app(Settings(index_root=root, reload_interval_s=0.05, admin_token="adm1n"))
    ) as client:
        v2 = publish(root, paths)
        truncate(root / "versions" / v2 / "level_0.npy")
        deadline = time.monotonic() + 10
        while client.get("/info").json()["last_reload_failure"] is None:
            assert time.monotonic() < deadline, "the watcher never refused the damaged version"
            time.sleep(0.05)
        failure = client.get("/info", headers=ADMIN).json()["last_reload_failure"]
        assert failure["version"] == v2 and "level_0.npy" in failure["error"]
        time.sleep(0.3)  # refused once, not retried every poll
        assert failures(client) == 1
        assert_still_serving(client, x, v1)


def test_corrupt_first_version_leaves_the_service_alive_but_not_ready(tmp_path, small_gallery):
    _, paths = small_gallery
    root = tmp_path / "root"
    v1 = publish(root, paths)
    flip_bytes(root / "versions" / v1 / "serving.faiss")
    with TestClient(
        create_app(Settings(index_root=root, reload_interval_s=0, admin_token="adm1n"))
    ) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        r = client.post("/search", json={"embedding": [1.0] * 32})
        assert r.status_code == 503 and "no index version" in r.json()["detail"]
        info = client.get("/info", headers=ADMIN).json()  # error texts are for admins only
        assert "checksum mismatch" in info["last_reload_failure"]["error"]


def test_without_checksums_the_load_time_checks_still_refuse(tmp_path, built_root, small_gallery):
    x, paths = small_gallery
    root = tmp_path / "root"
    shutil.copytree(built_root, root)
    v1 = artifact.current_version(root)
    # served in place: the private copy checks sizes while copying, before these load-time checks
    settings = Settings(
        index_root=root,
        reload_interval_s=0,
        admin_token="adm1n",
        verify_checksums=False,
        local_copy_dir="off",
    )
    with TestClient(create_app(settings)) as client:
        for damage, reason in [
            (lambda v: truncate(v / "serving.faiss"), "serving.faiss: FAISS cannot read it"),
            (lambda v: truncate(v / "level_0.npy"), "level_0.npy: unreadable"),
            (lambda v: edit_manifest(v, lambda m: m.update(d=16)), "expected (600, 16)"),
        ]:
            v2 = publish(root, paths)
            damage(root / "versions" / v2)
            r = client.post("/admin/reload", headers=ADMIN)
            assert r.status_code == 409 and reason in r.json()["error"], r.text
            assert_still_serving(client, x, v1)


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("name", ["meta_2.npy", "ids.npy"])
def test_object_dtype_npy_is_refused_not_unpickled(tmp_path, built_root, small_gallery, mmap, name):
    """A file replaced by a pickled object array (checksum recomputed) is refused, never unpickled."""
    x, paths = small_gallery
    root = tmp_path / "root"
    shutil.copytree(built_root, root)
    v1 = artifact.current_version(root)
    settings = Settings(index_root=root, reload_interval_s=0, admin_token="adm1n", mmap=mmap)
    with TestClient(create_app(settings)) as client:
        v2 = publish(root, paths)
        canary = tmp_path / "unpickled"
        replace_file(
            root / "versions" / v2,
            name,
            np.array([_Canary(str(canary))] * 600, dtype=object),
            allow_pickle=True,
        )
        r = client.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert f"{name}: unreadable" in error
        assert ("allow_pickle=False" in error) if not mmap else ("Python objects" in error)
        assert not canary.exists(), "the pickle was loaded"
        assert_still_serving(client, x, v1)


class _Canary:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_manifest_file_names_cannot_escape_the_version_directory(served, tmp_path, where):
    client, root, (x, paths) = served
    v1 = client.get("/info").json()["index_version"]
    v2 = publish(root, paths)
    vdir = root / "versions" / v2
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(vdir / "level_0.npy", outside / "level_0.npy")
    target = str(outside / "level_0.npy") if where == "absolute" else "../../../outside/level_0.npy"
    edit_manifest(vdir, lambda m: m["levels"][0].update(rows=target))
    r = client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409, f"loaded a file outside the version directory: {r.text}"
    assert_still_serving(client, x, v1)


def test_a_copied_version_directory_is_refused(served):
    """A version directory copied under a new id would report the old id and reload every poll."""
    client, root, _ = served
    v1 = client.get("/info").json()["index_version"]
    v2 = artifact.new_version_id()
    shutil.copytree(root / "versions" / v1, root / "versions" / v2)
    artifact.set_current(root, v2)
    r = client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409 and v2 in r.json()["error"], r.text
