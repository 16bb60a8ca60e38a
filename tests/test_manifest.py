"""The manifest model: defaults, and file names that must stay inside the version directory."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from aqe_retrieval.manifest import FORMAT_VERSION, SERVING_INDEX, Manifest


def fields(**changes: Any) -> dict[str, Any]:
    """A valid manifest's fields (one level, ids, one metadata column), with ``changes``."""
    files = ["level_0.npy", "level_0_norms.npy", SERVING_INDEX, "ids.npy", "meta_0.npy"]
    base: dict[str, Any] = {
        "version": "20300101T000000000000Z-abcdef",
        "created_at": datetime(2030, 1, 1, tzinfo=UTC),
        "n": 10,
        "d": 4,
        "qe_k": 10,
        "effective_qe_k": 10,
        "alpha": 3.0,
        "qe_times": 1,
        "knn": {"method": "exact"},
        "levels": [{"level": 0, "rows": "level_0.npy", "norms": "level_0_norms.npy"}],
        "serving_index": {},
        "ids_file": "ids.npy",
        "metadata": [{"name": "camera", "dtype": "int64", "file": "meta_0.npy"}],
        "files": {name: {"sha256": "0" * 64, "bytes": 1} for name in files},
    }
    base.update(changes)
    return base


def test_a_valid_manifest_and_its_defaults():
    m = Manifest.model_validate(fields())
    assert m.format_version == FORMAT_VERSION == 1
    assert m.serving_index.file == SERVING_INDEX and m.serving_index.spec == "exact"
    assert m.levels[0].index is None and m.levels[0].index_type == "exact"
    assert (m.graph_recall, m.quality, m.graph_recall_sample) == (None, None, 0)
    assert Manifest.model_validate_json(m.model_dump_json()) == m


@pytest.mark.parametrize(
    "name", ["../level_0.npy", "/etc/passwd", "sub/level_0.npy", ".hidden", "", "level 0.npy"]
)
@pytest.mark.parametrize("where", ["rows", "ids_file", "metadata", "files"])
def test_a_file_name_that_is_not_a_plain_name_is_refused(name, where):
    raw = fields()
    raw["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    if where == "rows":
        raw["levels"][0]["rows"] = name
    elif where == "ids_file":
        raw["ids_file"] = name
    elif where == "metadata":
        raw["metadata"][0]["file"] = name
    with pytest.raises(ValidationError, match="is not a plain name inside the version"):
        Manifest.model_validate(raw)


@pytest.mark.parametrize(
    "missing", ["level_0.npy", "level_0_norms.npy", SERVING_INDEX, "ids.npy", "meta_0.npy"]
)
def test_every_named_file_needs_a_checksum_entry(missing):
    raw = fields()
    del raw["files"][missing]
    with pytest.raises(ValidationError, match=rf"files \['{missing}'\] have no checksum entry"):
        Manifest.model_validate(raw)


def test_a_level_index_needs_a_checksum_entry_too():
    raw = fields()
    raw["levels"][0]["index"] = "level_0.faiss"
    with pytest.raises(ValidationError, match="no checksum entry"):
        Manifest.model_validate(raw)
    raw["files"]["level_0.faiss"] = {"sha256": "0" * 64, "bytes": 1}
    assert Manifest.model_validate(raw).levels[0].index == "level_0.faiss"


@pytest.mark.parametrize("field", ["version", "n", "levels", "files", "serving_index"])
def test_required_fields(field):
    raw = fields()
    del raw[field]
    with pytest.raises(ValidationError, match=field):
        Manifest.model_validate(raw)
