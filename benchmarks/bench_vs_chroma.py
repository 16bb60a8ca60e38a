"""This project's search service against a Chroma server on the same data and queries, in one run.

Both servers run on this machine over loopback, each in its own process(es), driven by the same
keep-alive load client (http_load.py in its own process; it runs ``wrk`` where that is
installed, ``--client`` to choose: on these 2 shared cores the client's own CPU comes out of the
servers'). For each: p50 / p99 latency and
throughput at 1 / 8 / 32 / 64 connections, interleaved (every concurrency level measures ours,
then Chroma, so both see the same background load), and recall@10 of the 1,000 held-out queries:

  * ours (default build settings with ``--serving-index auto``, online expansion on) against its
    own exact search: the same online-expanded queries searched by brute force over the
    expanded gallery, read back from the serving index (flat codes, IVF-Flat lists, HNSW-Flat
    storage); for a lossy serving index (SQ8, PQ) a second version of the same data is built
    with ``--serving-index exact`` (the kNN graph of <= 250,000 rows is exact, so its expanded
    gallery is the same);
  * Chroma (``chroma run``, a cosine HNSW collection with its defaults) against exact raw search
    (brute-force cosine over the raw gallery).

Plus raw in-process ``Searcher.search`` at batch 32 (the ceiling the HTTP figures are read
against), measured at the start and again just before each concurrency level, and the load
average before and after. ``--rounds N`` repeats each level's interleaved raw / ours / Chroma
measurement N times and reports the medians: single 5-second windows on a shared VM vary by
more than the targets' margins. Each ratio (of raw, ours against Chroma) is the median of the
rounds' own ratios, each taken from measurements made side by side.

Chroma lives in its own environment, so its client library never meets ours::

    python3 -m venv venv-chroma && venv-chroma/bin/pip install chromadb
    python benchmarks/bench_vs_chroma.py --workdir var/vs \\
        --chroma-python venv-chroma/bin/python --chroma-bin venv-chroma/bin/chroma

``--data FILE.npy`` takes a real gallery instead of the synthetic one (its last ``--queries``
rows held out as the queries), e.g. ``data/bible165k/features.npy``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_service import raw_batch32_qps  # noqa: E402
from http_load import CLIENTS, run_in_subprocess  # noqa: E402
from servers import free_port, stop, wait_http  # noqa: E402
from synthetic import generate  # noqa: E402

COLLECTION = "bench"
CHROMA_LOAD = """
import sys, numpy as np, chromadb
host, port, path, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], 4096
client = chromadb.HttpClient(host=host, port=port)
try:
    client.delete_collection("{name}")
except Exception:
    pass
col = client.create_collection("{name}", metadata={{"hnsw:space": "cosine"}})
x = np.load(path, mmap_mode="r")
for lo in range(0, len(x), batch):
    hi = min(len(x), lo + batch)
    col.add(ids=[str(i) for i in range(lo, hi)], embeddings=np.asarray(x[lo:hi], np.float32))
print(col.id)
"""
CHROMA_QUERY = """
import json, sys, numpy as np, chromadb
client = chromadb.HttpClient(host=sys.argv[1], port=int(sys.argv[2]))
col = client.get_collection("{name}")
q, k = np.load(sys.argv[3]), int(sys.argv[4])
ids = []
for lo in range(0, len(q), 100):
    ids += col.query(query_embeddings=q[lo : lo + 100], n_results=k, include=[])["ids"]
print(json.dumps([[int(i) for i in row] for row in ids]))
"""


def recall(got: list[list[int]], truth: np.ndarray, k: int) -> float:
    return float(
        np.mean([len(set(g[:k]) & set(t[:k].tolist())) / k for g, t in zip(got, truth, strict=True)])
    )


def exact_top(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Brute-force cosine top-k (xb rows already normalised), in blocks of queries."""
    from aqe_retrieval.aqe import normalize_rows
    from aqe_retrieval.faiss_search import exact_knn

    return exact_knn(normalize_rows(xq)[0], xb, k)[1]


def stored_rows(index) -> np.ndarray | None:
    """The exact rows a serving index stores (flat, IVF-Flat, HNSW-Flat), else None (lossy codes)."""
    import faiss

    from aqe_retrieval.faiss_search import flat_rows

    rows = flat_rows(index, copy_unaligned=True)  # a memory-mapped flat index is often unaligned
    if rows is not None:
        return rows
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(ivf, faiss.IndexIVFFlat):
        out = np.empty((index.ntotal, index.d), np.float32)
        lists = ivf.invlists
        for lst in range(ivf.nlist):
            size = lists.list_size(lst)
            if size:
                ids = faiss.rev_swig_ptr(lists.get_ids(lst), size).copy()
                codes = faiss.rev_swig_ptr(lists.get_codes(lst), size * ivf.code_size)
                out[ids] = np.frombuffer(codes, np.float32).reshape(size, index.d)
        return out
    if isinstance(index, faiss.IndexHNSWFlat):
        return index.reconstruct_n(0, index.ntotal)
    return None


def build(gallery: Path, root: Path, serving: str) -> None:
    cmd = [sys.executable, "-m", "index_builder.cli", "build", "--gallery", str(gallery), "--root", str(root)]
    subprocess.run([*cmd, "--serving-index", serving, "--no-progress"], check=True, stdout=subprocess.DEVNULL)


def ours_hits(url: str, queries: np.ndarray, k: int) -> list[list[int]]:
    """Our answers for every query (batches of 50 over HTTP), as gallery rows."""
    import httpx

    out: list[list[int]] = []
    with httpx.Client(timeout=60) as client:
        for lo in range(0, len(queries), 50):
            r = client.post(f"{url}/search", json={"embeddings": queries[lo : lo + 50].tolist(), "k": k})
            r.raise_for_status()
            out += [[int(h["id"]) for h in row] for row in r.json()["results"]]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True, help="data, index roots, Chroma's files")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--data", type=Path, help="a real (n, d) .npy gallery instead of synthetic data")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--serving-index", default="auto", help="our build's --serving-index")
    p.add_argument("--workers", type=int, default=1, help="our AQE_WORKERS")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved rounds per concurrency level (raw, ours, Chroma each time); medians reported",
    )
    p.add_argument("--encoding", default="json", choices=["json", "float32"], help="our request bodies")
    p.add_argument("--client", default="auto", choices=CLIENTS, help="auto: wrk where installed")
    p.add_argument("--chroma-python", default="venv-chroma/bin/python", help="Chroma's own venv (docstring)")
    p.add_argument("--chroma-bin", default="venv-chroma/bin/chroma")
    p.add_argument("--skip-chroma", action="store_true")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    k = a.k
    res: dict = {"load_start": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()}

    tag = a.data.stem if a.data else f"synthetic_{a.n}x{a.d}"
    gallery, queries_file = work / f"{tag}_gallery.npy", work / f"{tag}_queries.npy"
    if not gallery.exists():
        if a.data:
            x = np.load(a.data, mmap_mode="r")
        else:
            generate(work / f"{tag}_all.npy", a.n + a.queries, a.d, seed=11)
            x = np.load(work / f"{tag}_all.npy", mmap_mode="r")
        np.save(queries_file, np.asarray(x[-a.queries :], np.float32))
        np.save(gallery, np.asarray(x[: -a.queries], np.float32))
    queries = np.load(queries_file)
    n, d = np.load(gallery, mmap_mode="r").shape  # --d is the synthetic data's; --data has its own
    res["data"] = {"gallery": str(gallery), "n": int(n), "d": int(d)}

    root = work / f"{tag}_root_{a.serving_index}"
    if not (root / "current").exists():
        t0 = time.perf_counter()
        build(gallery, root, a.serving_index)
        res["build_s"] = round(time.perf_counter() - t0, 1)

    from aqe_retrieval import artifact
    from aqe_retrieval.aqe import normalize_rows
    from aqe_retrieval.faiss_search import exact_knn
    from aqe_retrieval.searcher import Searcher

    served = Searcher(artifact.load(root))
    served.warm_up()
    expanded = stored_rows(served.artifact.serving_index)
    if expanded is None:  # a lossy serving index: the exact twin's rows
        exact_root = work / f"{tag}_root_exact"
        if not (exact_root / "current").exists():
            build(gallery, exact_root, "exact")
        expanded = stored_rows(artifact.load(exact_root).serving_index)
        assert expanded is not None
    res["ours_serving_index"] = served.manifest.serving_index.model_dump(mode="json")
    truth_ours = exact_knn(normalize_rows(served.expand(served.check_queries(queries)))[0], expanded, k)[1]
    raw_rows = np.asarray(served.artifact.levels[0].rows)
    truth_raw = exact_knn(normalize_rows(queries)[0], raw_rows, k)[1]

    def raw_qps() -> float:
        return raw_batch32_qps(served, queries, k, a.seconds)

    res["raw_batch32_qps"] = raw_qps()

    port = free_port()
    env = {
        **os.environ,
        "AQE_INDEX_ROOT": str(root),
        "AQE_PORT": str(port),
        "AQE_WORKERS": str(a.workers),
        "AQE_LOG_LEVEL": "WARNING",
        "AQE_RELOAD_INTERVAL_S": "0",
    }
    procs: list[subprocess.Popen] = []
    ours = f"http://127.0.0.1:{port}"
    procs.append(subprocess.Popen([sys.executable, "-m", "service.main"], env=env, stdout=subprocess.DEVNULL))
    chroma_url = chroma_path = None
    try:
        wait_http(f"{ours}/readyz")
        time.sleep(1.0 if a.workers > 1 else 0)
        res["ours_recall_at_10"] = round(recall(ours_hits(ours, queries, k), truth_ours, k), 4)
        res["ours_recall_at_10_vs_raw_exact"] = round(recall(ours_hits(ours, queries, k), truth_raw, k), 4)
        if not a.skip_chroma:
            cport = free_port()
            cdir = work / f"{tag}_chroma"
            procs.append(
                subprocess.Popen(
                    [a.chroma_bin, "run", "--path", str(cdir), "--host", "127.0.0.1", "--port", str(cport)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            chroma_url = f"http://127.0.0.1:{cport}"
            wait_http(f"{chroma_url}/api/v2/heartbeat")
            t0 = time.perf_counter()
            load_script = CHROMA_LOAD.format(name=COLLECTION)
            out = subprocess.run(
                [a.chroma_python, "-c", load_script, "127.0.0.1", str(cport), str(gallery)],
                check=True,
                capture_output=True,
                text=True,
            )
            res["chroma_insert_s"] = round(time.perf_counter() - t0, 1)
            cid = out.stdout.strip().splitlines()[-1]
            chroma_path = f"/api/v2/tenants/default_tenant/databases/default_database/collections/{cid}/query"
            np.save(work / "q.npy", queries)
            query_script = CHROMA_QUERY.format(name=COLLECTION)
            got = subprocess.run(
                [a.chroma_python, "-c", query_script, "127.0.0.1", str(cport), str(work / "q.npy"), str(k)],
                check=True,
                capture_output=True,
                text=True,
            )
            res["chroma_recall_at_10"] = round(recall(json.loads(got.stdout), truth_raw, k), 4)
        res["concurrency"] = []
        for c in (int(v) for v in a.concurrency.split(",")):
            rounds = []
            for _ in range(a.rounds):
                # the anchor again, just before (both services idle): the machine's speed drifts
                # (the same index and code measured 3,272 and 2,452 q/s five hours apart), so each
                # ratio is to a figure taken next to it
                measured = {
                    "raw_batch32_qps": raw_qps(),
                    "ours": run_in_subprocess(
                        ours, queries, k, c, a.seconds, work, encoding=a.encoding, client=a.client
                    ),
                }
                if chroma_url and chroma_path:
                    measured["chroma"] = run_in_subprocess(
                        chroma_url, queries, k, c, a.seconds, work, chroma_path, "chroma", a.client
                    )
                rounds.append(measured)
            res["concurrency"].append(level_medians(c, rounds))
    finally:
        for proc in procs:
            stop(proc, grace_s=60)
    res["load_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(res, indent=2))
    report(res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


def level_medians(clients: int, rounds: list[dict]) -> dict:
    """One concurrency level's figures: each the median over its rounds (listed under ``rounds``).

    The ratios too are medians of each round's own ratio (``of_raw``: ours to the raw anchor
    measured just before it; ``qps_vs_chroma``, ``p50_vs_chroma``: ours to Chroma's, measured
    next to each other), not ratios of the medians, which may come from different rounds.
    """

    def median(values: list[float]) -> float:
        return round(float(np.median(values)), 3)

    row: dict = {"clients": clients, "raw_batch32_qps": median([r["raw_batch32_qps"] for r in rounds])}
    row["of_raw"] = median([r["ours"]["qps"] / r["raw_batch32_qps"] for r in rounds])
    for system in ("ours", "chroma"):
        if system in rounds[0]:
            figures = [r[system] for r in rounds]
            row[system] = {key: median([f[key] for f in figures]) for key in ("qps", "p50_ms", "p99_ms")}
            row[system]["errors"] = sum(f["errors"] for f in figures)
            row[system]["client"] = figures[0].get("client")
    if "chroma" in rounds[0]:
        row["qps_vs_chroma"] = median([r["ours"]["qps"] / max(r["chroma"]["qps"], 1e-9) for r in rounds])
        row["p50_vs_chroma"] = median([r["ours"]["p50_ms"] / r["chroma"]["p50_ms"] for r in rounds])
    if len(rounds) > 1:
        row["rounds"] = rounds
    return row


def report(res: dict) -> None:
    """The comparison in a few lines, with each target."""
    raw = res["raw_batch32_qps"]
    ours, chroma = res["ours_recall_at_10"], res.get("chroma_recall_at_10")
    print(f"\nrecall@10: ours {ours} (against its own exact search), Chroma {chroma} (against exact)")
    anchors = [raw] + [r["raw_batch32_qps"] for row in res["concurrency"] for r in row.get("rounds", [row])]
    print(
        f"raw in-process Searcher.search at batch 32: {raw:.0f} q/s at the start, "
        f"{min(anchors):.0f}-{max(anchors):.0f} over the run (each ratio is to the anchor just before it)"
    )
    for row in res["concurrency"]:
        o, c = row["ours"], row.get("chroma")
        line = f"{row['clients']:>3} clients: ours {o['qps']:>7.0f} q/s p50 {o['p50_ms']:.2f} "
        line += f"p99 {o['p99_ms']:.2f} ms ({row['of_raw']:.2f} of raw)"
        if c:
            line += f" | Chroma {c['qps']:>6.0f} q/s p50 {c['p50_ms']:.2f} p99 {c['p99_ms']:.2f} ms"
            line += f" | ours/Chroma {row['qps_vs_chroma']:.1f}x q/s, p50 {row['p50_vs_chroma']:.2f}"
        print(line)
    client = res["concurrency"][0]["ours"].get("client") if res["concurrency"] else None
    print(f"load client: {client}")
    print(f"load average: start {res['load_start']}, end {res['load_end']}")


if __name__ == "__main__":
    main()
