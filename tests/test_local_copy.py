"""The private node-local copy: verified while copied, shared by concurrent loaders, cleaned up."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from aqe_retrieval import artifact, local_copy
from aqe_retrieval.errors import ArtifactError


@pytest.fixture(scope="module")
def version(built_root) -> str:
    v = artifact.current_version(built_root)
    assert v is not None
    return v


def test_load_maps_a_verified_private_copy(built_root, version, tmp_path):
    local = tmp_path / "local"
    art = local_copy.load(built_root, version, local)
    rows = art.levels[0].rows
    assert isinstance(rows, np.memmap) and Path(rows.filename).parent == artifact.version_dir(local, version)
    assert artifact.verify(local, version) == []
    assert (local.stat().st_mode & 0o777) == 0o700
    assert local_copy.ensure_copy(built_root, version, local) is False  # reused


def test_concurrent_loaders_share_one_copy(built_root, version, tmp_path):
    local, go = tmp_path / "local", tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from aqe_retrieval import artifact, local_copy\n"
        "print('ready', flush=True)\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
        f"copied = local_copy.ensure_copy(Path({str(built_root)!r}), {version!r}, Path({str(local)!r}))\n"
        f"art = local_copy.load(Path({str(built_root)!r}), {version!r}, Path({str(local)!r}))\n"
        "print(copied, os.stat(art.levels[0].rows.filename).st_ino)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    for p in procs:  # all started and waiting: then they race for the copy
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    go.touch()
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(copied for copied, _ in outs) == ["False", "False", "False", "True"]
    assert len({inode for _, inode in outs}) == 1  # one copy, mapped by all
    assert artifact.version_ids(local) == [version]
    assert not list(local.glob(".copy-*"))


def test_a_damaged_version_is_refused_and_leaves_nothing(tmp_path, small_gallery):
    from test_artifact import build_into

    _, paths = small_gallery
    root, local = tmp_path / "root", tmp_path / "local"
    v = build_into(root, paths).version
    base = artifact.version_dir(root, v)
    data = bytearray((base / "level_0.npy").read_bytes())
    data[-1] ^= 0xFF
    (base / "level_0.npy").write_bytes(bytes(data))
    os.truncate(base / "serving.faiss", 10)
    with pytest.raises(ArtifactError, match=r"level_0\.npy: checksum mismatch; serving\.faiss: 10 bytes"):
        local_copy.load(root, v, local)
    assert artifact.version_ids(local) == [] and not list(local.glob(".copy-*"))
    # without checksums the flipped byte passes, the wrong size never does
    with pytest.raises(ArtifactError, match=r"serving\.faiss: 10 bytes") as e:
        local_copy.load(root, v, local, check=False)
    assert "level_0" not in str(e.value)


def test_an_incomplete_copy_is_replaced_and_leftovers_removed(built_root, version, tmp_path):
    local = tmp_path / "local"
    assert local_copy.ensure_copy(built_root, version, local) is True
    os.truncate(artifact.version_dir(local, version) / "serving.faiss", 0)
    (local / f".copy-{version}-1-abcdef").mkdir()  # a copier killed halfway
    (local / "versions" / "20200101T000000000000Z-abcdef").mkdir()  # an old version
    art = local_copy.load(built_root, version, local)
    assert art.serving_index.ntotal == art.manifest.n
    assert artifact.version_ids(local) == [version]
    assert not list(local.glob(".copy-*"))


def test_remove_others_keeps_the_ones_named(built_root, version, tmp_path):
    local = tmp_path / "local"
    local_copy.ensure_copy(built_root, version, local)
    old = "20200101T000000000000Z-abcdef"
    (local / "versions" / old).mkdir()
    assert local_copy.remove_others(local, {version, old}) == []
    assert local_copy.remove_others(local, {version}) == [old]
    assert local_copy.remove_others(local, set()) == [version]


def test_a_directory_others_can_write_is_refused(built_root, version, tmp_path):
    local = tmp_path / "shared"
    local.mkdir(mode=0o777)
    os.chmod(local, 0o777)
    with pytest.raises(ArtifactError, match="must be this service's own"):
        local_copy.load(built_root, version, local)


def test_not_enough_disk_is_refused_before_copying(built_root, version, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(local_copy.shutil, "disk_usage", lambda p: usage(100, 90, 10))
    with pytest.raises(ArtifactError, match="bytes to copy, 10 free"):
        local_copy.load(built_root, version, tmp_path / "local")
    assert artifact.version_ids(tmp_path / "local") == []


def test_a_tmpfs_is_recognised_as_memory(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "tmpfs /tmp tmpfs rw 0 0\n"
        "/dev/vdb /tmp/disk ext4 rw 0 0\n"
        "tmpfs /run/with\\040space tmpfs rw 0 0\n"
    )
    assert local_copy.memory_backed(Path("/tmp/aqe-local-copy-0"), mounts)
    assert local_copy.memory_backed(Path("/tmp"), mounts)
    assert not local_copy.memory_backed(Path("/tmp/disk/aqe"), mounts)
    assert not local_copy.memory_backed(Path("/tmpx/aqe"), mounts)
    assert not local_copy.memory_backed(Path("/var/cache/aqe"), mounts)
    assert local_copy.memory_backed(Path("/run/with space/aqe"), mounts)
    assert not local_copy.memory_backed(Path("/x"), tmp_path / "missing")
    if Path("/dev/shm").is_dir():  # a tmpfs on Linux
        assert local_copy.memory_backed(Path("/dev/shm/aqe-local-copy"))
