"""The artifact's publish protocol: atomic versions, retention, rollback, verify, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from aqe_retrieval import artifact
from aqe_retrieval.status import NightlyStatus, Success
from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams


def build_into(root: Path, paths, **kw) -> artifact.Manifest:
    return build(
        BuildConfig(
            gallery=paths["gallery"],
            ids=paths.get("ids"),
            metadata=paths.get("metadata"),
            root=root,
            params=AqeParams(qe_k=5),
            show_progress=False,
            **kw,
        )
    )


def test_publish_writes_a_complete_verified_version(tmp_path, small_gallery):
    x, paths = small_gallery
    m = build_into(tmp_path, paths)
    assert artifact.current_version(tmp_path) == m.version
    assert artifact.verify(tmp_path) == []
    art = artifact.load(tmp_path)
    assert (m.n, m.d, m.effective_qe_k) == (len(x), x.shape[1], 5)
    assert art.ids is not None and art.ids[0] == "img-00000"
    assert set(art.metadata) == {"camera", "ts", "label"}
    assert art.metadata["camera"].dtype.kind == "i" and art.metadata["label"].dtype.kind == "U"
    assert set(m.files) >= {"level_0.npy", "level_0_norms.npy", "serving.faiss", "ids.npy"}
    assert m.software["faiss"] and m.input["fingerprint"] and m.timings_s["total"] > 0
    assert not list(tmp_path.glob(".staging-*"))


def test_failure_while_publishing_leaves_current_and_previous_intact(tmp_path, small_gallery, monkeypatch):
    _, paths = small_gallery
    first = build_into(tmp_path, paths)
    real_rename = os.rename

    def crash(src, dst):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(artifact.os, "rename", crash)
    with pytest.raises(OSError, match="simulated"):
        build_into(tmp_path, paths)
    monkeypatch.setattr(artifact.os, "rename", real_rename)
    assert artifact.current_version(tmp_path) == first.version
    assert artifact.version_ids(tmp_path) == [first.version]
    assert artifact.verify(tmp_path) == []
    assert not list(tmp_path.glob(".staging-*"))


def test_failure_while_switching_current_keeps_the_old_pointer(tmp_path, small_gallery, monkeypatch):
    _, paths = small_gallery
    first = build_into(tmp_path, paths)

    def crash(src, dst):
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(artifact.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        build_into(tmp_path, paths)
    assert artifact.current_version(tmp_path) == first.version
    assert artifact.load(tmp_path).version == first.version


def test_leftover_staging_of_a_dead_build_is_removed_by_the_next(tmp_path, small_gallery):
    _, paths = small_gallery
    dead = tmp_path / ".staging-20200101T000000000000Z-abcdef-999999999"
    dead.mkdir(parents=True)
    (dead / "level_0.npy").write_bytes(b"half")
    build_into(tmp_path, paths)
    assert not dead.exists()


def test_retention_rollback_and_verify(tmp_path, small_gallery):
    _, paths = small_gallery
    made = [build_into(tmp_path, paths, keep=2).version for _ in range(4)]
    assert artifact.version_ids(tmp_path) == made[-2:]  # only the oldest were removed
    assert artifact.rollback(tmp_path) == made[-2]
    assert artifact.current_version(tmp_path) == made[-2]
    # a newer build keeps the rolled-back current even if it is among the oldest
    newest = build_into(tmp_path, paths, keep=1).version
    assert artifact.version_ids(tmp_path) == [newest]
    assert artifact.rollback(tmp_path, newest) == newest
    with pytest.raises(artifact.ArtifactError, match="no version older"):
        artifact.rollback(tmp_path)
    with pytest.raises(artifact.ArtifactError, match="not a version id"):
        artifact.rollback(tmp_path, "../../etc")


def test_verify_and_load_refuse_damaged_versions(tmp_path, small_gallery):
    _, paths = small_gallery
    m = build_into(tmp_path, paths)
    base = tmp_path / "versions" / m.version
    data = bytearray((base / "serving.faiss").read_bytes())
    data[-5] ^= 0xFF
    (base / "serving.faiss").write_bytes(bytes(data))
    assert artifact.verify(tmp_path) == ["serving.faiss: checksum mismatch"]
    with pytest.raises(artifact.ArtifactError, match="damaged"):
        artifact.load(tmp_path)
    (base / "ids.npy").unlink()
    assert "ids.npy: missing" in artifact.verify(tmp_path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.update(d=7), "expected"),
        (lambda m: m.pop("levels"), "invalid manifest"),
    ],
)
def test_load_refuses_bad_manifests(tmp_path, small_gallery, mutate, message):
    _, paths = small_gallery
    m = build_into(tmp_path, paths)
    path = tmp_path / "versions" / m.version / "manifest.json"
    raw = json.loads(path.read_text())
    mutate(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.load(tmp_path, check=False)


def test_unparsable_manifest_and_truncated_array(tmp_path, small_gallery):
    _, paths = small_gallery
    m = build_into(tmp_path, paths)
    base = tmp_path / "versions" / m.version
    np.save(base / "level_0_norms.npy", np.zeros(3, np.float32))
    with pytest.raises(artifact.ArtifactError, match=r"level_0_norms\.npy"):
        artifact.load(tmp_path, check=False)
    (base / "manifest.json").write_text("{not json")
    with pytest.raises(artifact.ArtifactError, match="does not parse"):
        artifact.load(tmp_path)


def test_nothing_published_yet(tmp_path):
    assert artifact.current_version(tmp_path) is None
    with pytest.raises(artifact.ArtifactError, match="nothing published"):
        artifact.load(tmp_path)


def test_read_status_tolerates_missing_and_corrupt(tmp_path):
    assert artifact.read_status(tmp_path) is None
    artifact.status_path(tmp_path).write_text("{not json")
    assert artifact.read_status(tmp_path) is None


def test_status_record_round_trips(tmp_path):
    t = datetime(2030, 1, 1, tzinfo=UTC)
    status = NightlyStatus(host="h", pid=1, last_run_started=t, last_success=Success(time=t, version="v"))
    artifact.write_status(tmp_path, status)
    assert artifact.load_status(tmp_path) == status
    assert artifact.read_status(tmp_path) == status.model_dump(mode="json")
    assert not [p.name for p in tmp_path.iterdir() if p != artifact.status_path(tmp_path)]


class LockHolder:
    """Another process holding ``root``'s build lock until closed."""

    def __init__(self, root: Path) -> None:
        code = (
            "import sys\n"
            "from pathlib import Path\n"
            "from aqe_retrieval import artifact\n"
            f"with artifact.build_lock(Path({str(root)!r})):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.read()\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "held\n"

    def __enter__(self) -> LockHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        self.proc.stdout.close()


def test_leftovers_of_another_host_are_removed_whatever_their_pid(tmp_path, small_gallery):
    """PID 1 is alive on this host, but a leftover of another host's build is dead all the same."""
    _, paths = small_gallery
    build_into(tmp_path, paths)
    leftovers = [
        tmp_path / ".staging-20200101T000000000000Z-abcdef-1",
        tmp_path / f".staging-20200101T000000000000Z-abcdef-{os.getpid()}",
        tmp_path / ".current.tmp-1",
    ]
    leftovers[0].mkdir()
    (leftovers[0] / "level_0.npy").write_bytes(b"half")
    leftovers[1].mkdir()
    leftovers[2].write_text("20200101T000000000000Z-abcdef\n")
    build_into(tmp_path, paths)
    assert [p for p in leftovers if p.exists()] == []
    assert not list(tmp_path.glob(".staging-*"))


def test_nothing_is_cleaned_while_another_process_holds_the_lock(tmp_path):
    live = tmp_path / ".staging-20200101T000000000000Z-abcdef-1"
    live.mkdir()
    with LockHolder(tmp_path):
        assert artifact.clean_stale_staging(tmp_path) == []
        assert live.is_dir()
        with (
            pytest.raises(artifact.LockedError, match=r"another build holds \.build\.lock"),
            artifact.build_lock(tmp_path),
        ):
            pass
    assert artifact.clean_stale_staging(tmp_path) == [live]


def test_the_build_lock_is_reentrant_in_its_thread_only(tmp_path):
    with artifact.build_lock(tmp_path):
        with artifact.build_lock(tmp_path):  # staging() inside a locked build
            pass
        refused = []

        def other() -> None:
            try:
                with artifact.build_lock(tmp_path):
                    pass
            except artifact.LockedError as exc:
                refused.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(refused) == 1
    with artifact.build_lock(tmp_path):  # released
        pass


def test_rollback_is_refused_while_another_process_holds_the_lock(tmp_path, small_gallery):
    _, paths = small_gallery
    build_into(tmp_path, paths)
    newest = build_into(tmp_path, paths).version
    with LockHolder(tmp_path), pytest.raises(artifact.LockedError):
        artifact.rollback(tmp_path)
    assert artifact.current_version(tmp_path) == newest
