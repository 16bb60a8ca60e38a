"""``index-builder evaluate``: split labelled features, measure every method, print and save.

The served row goes through a real index built by :func:`index_builder.build.build` and the
service's own :class:`service.searcher.Searcher`, so it measures what users get (mAP@K).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aqe_retrieval import artifact
from index_builder.build import build
from index_builder.config import BuildConfig, ServingSpec
from index_builder.evaluation import topk_metrics
from index_builder.expansion import AqeParams
from index_builder.inputs import open_embeddings
from index_builder.knn import KnnSpec, sample_rows
from index_builder.quality import Labels, compare, sweep

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Which rows are queries; the gallery is every other row."""

    queries: np.ndarray
    gallery: np.ndarray


def split_rows(
    columns: dict[str, np.ndarray],
    n: int,
    where: str | None,
    rows_file: Path | None,
    max_queries: int,
    seed: int,
) -> Split:
    """Queries from a ``COLUMN=VALUE`` rule or a file of row numbers, sampled to ``max_queries``."""
    if rows_file is not None:
        candidates = np.unique(np.loadtxt(rows_file, dtype=np.int64, ndmin=1))
        if len(candidates) and (candidates.min() < 0 or candidates.max() >= n):
            raise ValueError(f"{rows_file}: row numbers must be in 0..{n - 1}")
    else:
        column, _, value = (where or "camid=0").partition("=")
        if column not in columns:
            raise ValueError(f"--query-where: no metadata column {column!r}")
        col = columns[column]
        candidates = np.flatnonzero(col == (col.dtype.type(value) if col.dtype.kind in "iuf" else value))
    if len(candidates) == 0:
        raise ValueError("the query rule selects no rows")
    chosen = candidates[sample_rows(len(candidates), max_queries, seed)]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return Split(np.flatnonzero(mask), np.flatnonzero(~mask))


def served_metrics(
    xq: np.ndarray,
    xg: np.ndarray,
    q: Labels,
    g: Labels,
    params: AqeParams,
    knn: KnnSpec,
    serving: ServingSpec,
    k: int,
) -> dict[str, Any]:
    """mAP@k through a real built index and the service's searcher."""
    from aqe_retrieval.searcher import Searcher  # the very code the service runs

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "gallery.npy", xg)
        root = Path(tmp) / "root"
        build(
            BuildConfig(
                gallery=Path(tmp) / "gallery.npy",
                root=root,
                params=params,
                knn=knn,
                serving=serving,
                show_progress=False,
            )
        )
        searcher = Searcher(artifact.load(root))
        t0 = time.perf_counter()
        hits = searcher.search(xq, k)
        seconds = time.perf_counter() - t0
    ids = np.full((len(xq), k), -1, dtype=np.int64)
    for i, row in enumerate(hits):
        ids[i, : len(row)] = [h.row for h in row]
    out = topk_metrics(ids, q.pids, g.pids, q.camids, g.camids).as_dict()
    out["k"], out["queries_per_s"] = k, len(xq) / seconds
    return out


def evaluate(
    features: Path,
    columns: dict[str, np.ndarray],
    labels: Labels,
    split: Split,
    params: AqeParams,
    knn: KnnSpec,
    serving: ServingSpec,
    served_k: int,
    sweep_qe_k: list[int],
    sweep_alpha: list[float],
) -> dict[str, Any]:
    """The whole evaluation as one JSON-ready report."""
    x = open_embeddings(features)
    every = np.arange(x.n)
    xall = x.take(every)
    xq, xg = xall[split.queries], xall[split.gallery]
    q, g = labels[split.queries], labels[split.gallery]
    logger.info("evaluating %d queries against %d gallery rows", len(xq), len(xg))
    table = compare(xq, xg, q, g, params, knn)
    name = f"served top-{served_k}" + ("" if knn.exact else f" ({knn.method})")
    table[name] = served_metrics(xq, xg, q, g, params, knn, serving, served_k)
    grid = sweep(xq, xg, q, g, sweep_qe_k, sweep_alpha) if sweep_qe_k and sweep_alpha else []
    return {
        "features": str(features),
        "queries": len(xq),
        "gallery": len(xg),
        "params": {"qe_k": params.qe_k, "alpha": params.alpha, "qe_times": params.qe_times},
        "knn": knn.method,
        "nprobe": knn.nprobe,
        "serving_index": serving.method,
        "table": table,
        "sweep": grid,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report's table as aligned text."""
    lines = [
        f"{report['queries']} queries, {report['gallery']} gallery rows, "
        f"qe_k={report['params']['qe_k']} alpha={report['params']['alpha']:g} "
        f"qe_times={report['params']['qe_times']}",
        f"{'method':<36}{'mAP':>8}{'rank-1':>8}{'rank-5':>8}{'rank-10':>8}{'mINP':>8}{'graph recall':>14}",
    ]
    for name, row in report["table"].items():
        recall = row.get("graph_recall")
        lines.append(
            f"{name:<36}{row['mAP']:>8.4f}{row.get('rank1', float('nan')):>8.4f}"
            f"{row.get('rank5', float('nan')):>8.4f}{row.get('rank10', float('nan')):>8.4f}"
            f"{row['mINP']:>8.4f}{'' if recall is None else f'{recall:.4f}':>14}"
        )
    if report["sweep"]:
        lines.append("\nsweep (serving-mode AQE, exact kNN): mAP / rank-1")
        alphas = sorted({s["alpha"] for s in report["sweep"]})
        lines.append(f"{'qe_k':>6}" + "".join(f"{'alpha=' + format(a, 'g'):>18}" for a in alphas))
        for k in sorted({s["qe_k"] for s in report["sweep"]}):
            cells = {s["alpha"]: s for s in report["sweep"] if s["qe_k"] == k}
            lines.append(
                f"{k:>6}" + "".join(f"{cells[a]['mAP']:>10.4f} /{cells[a]['rank1']:.3f}" for a in alphas)
            )
    return "\n".join(lines)


def save(report: dict[str, Any], json_path: Path | None, plots_dir: Path | None) -> list[Path]:
    """Write the JSON and the PNG plots; returns the files written."""
    written = []
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
        written.append(json_path)
    if plots_dir is not None:
        from index_builder import plots

        plots_dir.mkdir(parents=True, exist_ok=True)
        written.append(plots.cmc_curves(report["table"], plots_dir / "cmc.png"))
        if report["sweep"]:
            written.append(
                plots.map_vs_qe_k(
                    report["sweep"], report["table"]["raw"]["mAP"], plots_dir / "map_vs_qe_k.png"
                )
            )
    return written
