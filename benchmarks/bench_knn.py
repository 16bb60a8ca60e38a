"""The builder's exact kNN phase against this machine's GEMM peak and FAISS's flat search, one run.

In one process, interleaved ``--repeat`` times (so machine load hits all of them alike):
  * GEMM peak: numpy float32 matmul of two 4096 x 4096 matrices, best of 3 (the BLAS and its
    threads are printed, via threadpoolctl);
  * the kNN phase: ``self_knn(u, k, KnnSpec(), block_size)`` (the builder's exact default);
  * a profile of the kNN phase: the same tiles and threads with GEMM only (no top-k), so
    ``1 - gemm_only / knn`` is the share of the top-k selection and the tile bookkeeping;
  * FAISS flat search: ``faiss.knn(u, u, k, METRIC_INNER_PRODUCT)``, all rows at once;
with the GEMM peak measured again between phases: each phase's fraction of peak uses the peaks
measured right before and after it.
Flops: ``2 N^2 d`` for a full scan, ``N^2 d (1 + tile / N)`` for the symmetric kernel (the
diagonal tiles are computed whole). Neighbour sets are compared with FAISS's row by row; a row
may differ only inside an exact tie (within ``--tie-eps`` of the k-th similarity).

    python benchmarks/bench_knn.py                        # N = 100,000, d = 512, k = 10
    python benchmarks/bench_knn.py --n 20000 --repeat 2
    python benchmarks/bench_knn.py --sweep 1000,2000,4000,8000,16000 --d 512   # auto threshold
    python benchmarks/bench_knn.py --n 30000 --tiles 1024,2048,4096            # tile side
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from index_builder import pool
from index_builder.knn import KnnSpec, self_knn, use_symmetric
from index_builder.symmetric import SYMMETRIC_TILE, symmetric_self_knn


def blas_info() -> list[dict]:
    from threadpoolctl import threadpool_info

    return [
        {k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture", "threading_layer")}
        for i in threadpool_info()
    ]


def gemm_peak(size: int = 4096, tries: int = 3) -> float:
    """Best float32 GFLOP/s of numpy matmul of two (size, size) matrices."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    c = np.empty_like(a)
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def gemm_only(u: np.ndarray, tile: int) -> float:
    """Seconds for the symmetric kernel's tiles with GEMM only: its floor on this machine."""
    n = len(u)
    starts = range(0, n, tile)
    tasks = [(a, b) for a in starts for b in starts if b >= a]
    workers = pool.worker_count()
    bufs = [np.empty(min(tile, n) ** 2, dtype=np.float32) for _ in range(workers)]

    def work(task, slot):
        xa, xb = u[task[0] : task[0] + tile], u[task[1] : task[1] + tile]
        np.matmul(xa, xb.T, out=bufs[slot][: len(xa) * len(xb)].reshape(len(xa), len(xb)))

    t0 = time.perf_counter()
    with pool.single_threaded_blas(workers):
        pool.run_tiles(tasks, work, workers, lambda t: None)
    return time.perf_counter() - t0


def compare_sets(ids, sims, ref_ids, ref_sims, eps: float) -> dict:
    """Rows whose sets match, differ only inside ties at the k-th value, or truly differ."""
    same = np.array([set(a) == set(b) for a, b in zip(ids, ref_ids, strict=True)])
    bad = 0
    for r in np.flatnonzero(~same):
        kth = min(sims[r, -1], ref_sims[r, -1])
        extra = np.setdiff1d(ids[r], ref_ids[r])
        missing = np.setdiff1d(ref_ids[r], ids[r])
        s_extra = sims[r][np.isin(ids[r], extra)]
        s_missing = ref_sims[r][np.isin(ref_ids[r], missing)]
        if np.abs(s_extra - kth).max() > eps or np.abs(s_missing - kth).max() > eps:
            bad += 1
    return {
        "rows_identical": int(same.sum()),
        "rows_differing_in_ties": int((~same).sum() - bad),
        "rows_differing": bad,
    }


def main_run(a) -> dict:
    u = unit_rows(a.n, a.d)
    tile = min(a.block_size, SYMMETRIC_TILE)
    sym = use_symmetric(a.n)
    flops_knn = a.n * a.n * a.d * (1 + tile / a.n) if sym else 2 * a.n * a.n * a.d
    flops_full = 2 * a.n * a.n * a.d
    rows = []
    for rep in range(a.repeat):
        load = os.getloadavg()[0]
        # each phase is judged against the GEMM peak measured right before and after it
        p0 = gemm_peak()
        t_knn, res = timed(lambda: self_knn(u, a.k, KnnSpec(), a.block_size))
        p1 = gemm_peak()
        t_gemm = gemm_only(u, tile) if sym and not a.no_profile else None
        p2 = gemm_peak() if t_gemm is not None else p1
        t_faiss, (ref_sims, ref_ids) = timed(lambda: faiss.knn(u, u, a.k, metric=faiss.METRIC_INNER_PRODUCT))
        p3 = gemm_peak()
        peak_knn, peak_gemm, peak_faiss = (p0 + p1) / 2, (p1 + p2) / 2, (p2 + p3) / 2
        row = {
            "rep": rep,
            "load_1min": round(load, 2),
            "gemm_peak_gflops": round((p0 + p1 + p2 + p3) / 4, 1),
            "gemm_peaks_between_phases": [round(p, 1) for p in (p0, p1, p2, p3)],
            "knn_kernel": "symmetric" if sym else "faiss",
            "knn_s": round(t_knn, 2),
            "knn_gflops": round(flops_knn / t_knn / 1e9, 1),
            "knn_fraction_of_peak": round(flops_knn / t_knn / 1e9 / peak_knn, 3),
            "faiss_knn_s": round(t_faiss, 2),
            "faiss_gflops": round(flops_full / t_faiss / 1e9, 1),
            "faiss_fraction_of_peak": round(flops_full / t_faiss / 1e9 / peak_faiss, 3),
            "speedup_vs_faiss": round(t_faiss / t_knn, 2),
            **compare_sets(res.ids, res.sims, ref_ids, ref_sims, a.tie_eps),
            "max_abs_sim_diff": float(np.abs(res.sims - ref_sims).max()),
            "load_1min_end": round(os.getloadavg()[0], 2),
        }
        if t_gemm is not None:
            row.update(
                gemm_only_s=round(t_gemm, 2),
                gemm_only_fraction_of_peak=round(flops_knn / t_gemm / 1e9 / peak_gemm, 3),
                topk_share_of_knn=round(1 - t_gemm / t_knn, 3),
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {
        "n": a.n,
        "d": a.d,
        "k": a.k,
        "block_size": a.block_size,
        "tile": tile,
        "workers": pool.worker_count(),
        "blas": blas_info(),
        "runs": rows,
    }


def sweep_run(a) -> dict:
    """Symmetric kernel against faiss.knn (blockwise, as the builder ran it) per N, interleaved."""
    rows = []
    for n in (int(s) for s in a.sweep.split(",")):
        u = unit_rows(n, a.d, seed=n)
        best = {"symmetric": float("inf"), "faiss": float("inf")}
        for _ in range(a.repeat):
            for kernel in best:
                t, _ = timed(
                    lambda u=u, kernel=kernel: self_knn(u, a.k, KnnSpec(exact_kernel=kernel), a.block_size)
                )
                best[kernel] = min(best[kernel], t)
        row = {
            "n": n,
            "d": a.d,
            "symmetric_s": round(best["symmetric"], 4),
            "faiss_s": round(best["faiss"], 4),
            "speedup": round(best["faiss"] / best["symmetric"], 2),
            "load_1min": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"sweep": rows}


def tiles_run(a) -> dict:
    """Symmetric kernel per tile side, interleaved, with the GEMM-only floor of each."""
    u = unit_rows(a.n, a.d)
    tiles = [int(s) for s in a.tiles.split(",")]
    best = {t: float("inf") for t in tiles}
    floor = {t: float("inf") for t in tiles}
    for _ in range(a.repeat):
        for t in tiles:
            best[t] = min(best[t], timed(lambda t=t: symmetric_self_knn(u, a.k, t))[0])
            floor[t] = min(floor[t], gemm_only(u, t))
    rows = [
        {
            "tile": t,
            "symmetric_s": round(best[t], 2),
            "gemm_only_s": round(floor[t], 2),
            "topk_share": round(1 - floor[t] / best[t], 3),
        }
        for t in tiles
    ]
    for r in rows:
        print(json.dumps(r), flush=True)
    return {"n": a.n, "d": a.d, "tiles": rows, "load_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--block-size", type=int, default=16384)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--tie-eps", type=float, default=1e-6)
    p.add_argument("--no-profile", action="store_true", help="skip the GEMM-only pass")
    p.add_argument("--sweep", help="comma-separated N: symmetric vs faiss kernel per N")
    p.add_argument("--tiles", help="comma-separated tile sides to compare at --n")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()
    print(
        json.dumps(
            {
                "blas": blas_info(),
                "faiss": faiss.__version__,
                "numpy": np.__version__,
                "workers": pool.worker_count(),
                "cpus": os.cpu_count(),
            }
        ),
        flush=True,
    )
    result = sweep_run(a) if a.sweep else tiles_run(a) if a.tiles else main_run(a)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
