"""PNG plots of an evaluation: CMC curves and mAP against ``qe_k`` (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a RuntimeError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # an optional dependency: say how to get it
        raise RuntimeError("plots need matplotlib: pip install 'aqe-retrieval[eval]'") from exc
    return plt


def cmc_curves(table: dict[str, dict[str, Any]], out: Path, max_rank: int = 20) -> Path:
    """CMC curve of every method of ``table`` (name -> metrics dict with ``cmc``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, row in table.items():
        cmc = row.get("cmc")
        if cmc:
            ranks = range(1, min(max_rank, len(cmc)) + 1)
            ax.plot(list(ranks), cmc[: len(ranks)], marker=".", label=f"{name} (mAP {row['mAP']:.3f})")
    return _save(plt, fig, ax, out, "rank", "CMC (match rate)", "CMC: raw vs alpha-weighted query expansion")


def map_vs_qe_k(grid: list[dict[str, Any]], raw_map: float, out: Path) -> Path:
    """Serving-mode mAP against ``qe_k``, one line per ``alpha``, the raw mAP as a baseline."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for alpha in sorted({g["alpha"] for g in grid}):
        pts = sorted((g["qe_k"], g["mAP"]) for g in grid if g["alpha"] == alpha)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"alpha={alpha:g}")
    ax.axhline(raw_map, color="grey", linestyle="--", label=f"raw ({raw_map:.3f})")
    ax.set_xscale("log", base=2)
    return _save(plt, fig, ax, out, "qe_k", "mAP (serving-mode AQE)", "mAP against qe_k")


def _save(plt: Any, fig: Any, ax: Any, out: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, save as ``out`` and close one figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
