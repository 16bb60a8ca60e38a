"""The change log folded into a full build: ``--gallery``, then the logged adds, minus the deletes.

``add``/``delete`` log every applied operation under ``ROOT/changes/``
(:func:`aqe_retrieval.artifact.record_change`) with its exact raw inputs, so the next
``build``/``nightly`` over the same ``--gallery`` loses no added row and resurrects no deleted
one. Records apply in order, each its deletes then its rows: an id added then deleted is gone, a
deleted id added again is back. Once the upstream gallery holds the changes,
``index-builder changes clear ROOT --through N`` drops them (or ``build --no-changes`` ignores
the log for one run). A logged add whose id is already alive (in ``--gallery``, say) is refused:
the upstream gallery holds it and the log must be cleared; a logged delete of an id that is
not there any more is skipped (the result is the same).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aqe_retrieval import artifact
from aqe_retrieval.errors import InputError
from index_builder.inputs import EmbeddingSource, Shard, open_embeddings
from index_builder.urls import Location

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Filtered:
    """A shard with some rows left out (``keep`` (rows,) bool): a :class:`Shard` itself."""

    shard: Shard
    keep: np.ndarray

    @property
    def path(self) -> Location:
        return self.shard.path

    @property
    def rows(self) -> int:
        return int(self.keep.sum())

    @property
    def d(self) -> int:
        return self.shard.d

    @property
    def dtype(self) -> np.dtype:
        return self.shard.dtype

    @property
    def files(self) -> tuple[Location, ...]:
        return self.shard.files

    @property
    def has_ids(self) -> bool:
        return self.shard.has_ids

    @property
    def has_metadata(self) -> bool:
        return self.shard.has_metadata

    def blocks(self, block_size: int) -> Iterator[np.ndarray]:
        lo = 0
        for block in self.shard.blocks(block_size):
            mask = self.keep[lo : lo + len(block)]
            lo += len(block)
            if mask.any():
                yield block if mask.all() else block[mask]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.shard.take(np.flatnonzero(self.keep)[rows])

    def ids(self) -> list[str]:
        return np.asarray(self.shard.ids())[self.keep].tolist()

    def metadata(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v)[self.keep] for k, v in self.shard.metadata().items()}


@dataclass
class Folded:
    """The build's input with the log applied, and the records it holds."""

    source: EmbeddingSource
    ids: list[str] | None
    metadata: dict[str, np.ndarray]
    records: list[artifact.ChangeRecord]


def fold(
    root: Path, source: EmbeddingSource, ids: list[str] | None, metadata: dict[str, np.ndarray]
) -> Folded:
    """``source`` (with its ids and metadata) followed by the logged adds, minus the logged deletes."""
    records = artifact.list_changes(root)
    if not records:
        return Folded(source, ids, metadata, [])
    if ids is None:
        raise InputError(
            f"{root}: {len(records)} logged change(s) need gallery ids; "
            "give --ids, or --no-changes to build without them"
        )
    all_ids = list(ids)
    alive = np.ones(len(ids), dtype=bool)
    where = {i: n for n, i in enumerate(ids)}
    shards: list[Shard] = list(source.shards)
    meta = {k: [np.asarray(v)] for k, v in metadata.items()}
    for r in records:
        for i in r.deleted_ids():
            pos = where.pop(i, None)
            if pos is None:
                logger.warning("change %d deletes %r, which is not there: skipped", r.order, i)
            else:
                alive[pos] = False
        if r.kind != "add":
            continue
        added = open_embeddings(r.rows)
        if added.d != source.d:
            raise InputError(f"{r.rows}: dimension {added.d}, the gallery has {source.d}")
        new_ids = r.added_ids()
        if len(new_ids) != added.n:
            raise InputError(f"{r.path}: {len(new_ids)} ids for {added.n} rows")
        dup = [i for i in new_ids if i in where]
        if dup:
            raise InputError(
                f"change {r.order} adds ids already present, e.g. {dup[:5]}: the upstream gallery "
                f"holds them; run 'index-builder changes clear {root} --through N' (N >= {r.order}) "
                "or build with --no-changes"
            )
        new_meta = r.metadata()
        if sorted(new_meta) != sorted(meta):
            raise InputError(f"change {r.order}: metadata columns {sorted(new_meta)}, gallery {sorted(meta)}")
        for k in meta:
            meta[k].append(new_meta[k])
        for i in new_ids:
            where[i] = len(all_ids)
            all_ids.append(i)
        alive = np.concatenate([alive, np.ones(added.n, dtype=bool)])
        shards.extend(added.shards)
    kept: list[Shard] = []
    lo = 0
    for shard in shards:
        mask = alive[lo : lo + shard.rows]
        lo += shard.rows
        if mask.all():
            kept.append(shard)
        elif mask.any():
            kept.append(Filtered(shard, mask))
    if not kept:
        raise InputError(f"{root}: the logged changes delete every row")
    out_ids = np.asarray(all_ids)[alive].tolist()
    out_meta = {k: np.concatenate(v)[alive] for k, v in meta.items()}
    logger.info(
        "folded %d logged change(s) (orders %d..%d): %d rows -> %d",
        len(records),
        records[0].order,
        records[-1].order,
        source.n,
        len(out_ids),
    )
    return Folded(EmbeddingSource(tuple(kept), source.columns), out_ids, out_meta, records)
