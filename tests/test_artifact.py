"""The artifact's publish protocol: atomic versions, retention, rollback, verify, refusals."""

from __future__ import annotations

import json
import os
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
