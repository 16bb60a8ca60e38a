"""``index-builder add`` and ``delete``: read the inputs as ``build`` does, apply them in the core.

The work (exact graph update, re-expansion of the changed rows, a delta version) is
:func:`aqe_retrieval.incremental.apply_change`; this module only reads files. The operation's
fingerprint is BLAKE2b over the input files (as a build's): a retried command whose operation
is already in the current version's history publishes nothing and says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aqe_retrieval import incremental
from aqe_retrieval.errors import InputError
from index_builder.id_metadata import read_ids
from index_builder.inputs import ParquetColumns, fingerprint, gallery_ids, gallery_metadata, open_embeddings


def add(
    root: Path,
    gallery: Path,
    ids: Path | None = None,
    metadata: Path | None = None,
    columns: ParquetColumns | None = None,
    keep: int = 3,
) -> incremental.Outcome:
    """Publish a version of ``root`` with the rows of ``gallery`` (any input ``build`` reads) added."""
    source = open_embeddings(gallery, columns)
    new_ids = gallery_ids(source, ids)
    meta = gallery_metadata(source, metadata)
    rows = source.take(np.arange(source.n))
    files = [*source.files, *(p for p in (ids, metadata) if p)]
    change = incremental.Change("add:" + fingerprint(files), rows=rows, ids=new_ids, metadata=meta)
    return incremental.apply_change(root, change, keep)


def delete(root: Path, ids_file: Path, keep: int = 3) -> incremental.Outcome:
    """Publish a version of ``root`` without the rows whose ids ``ids_file`` lists (one a line)."""
    try:
        count = len(ids_file.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{ids_file}: cannot read ids ({exc})") from exc
    if count == 0:
        raise InputError(f"{ids_file}: no ids to delete")
    wanted = read_ids(ids_file, count)
    change = incremental.Change("delete:" + fingerprint([ids_file]), delete=wanted)
    return incremental.apply_change(root, change, keep)
