"""The main job end to end on the bundled demo data: build an index, serve it, query it.

    python scripts/demo.py            build, serve on 127.0.0.1:8000, show a query, keep serving
    python scripts/demo.py --once     the same, then stop (what the tests run)

The demo data (data/demo/) is real: Bible verses in four English translations embedded with
all-MiniLM-L6-v2; a verse is an identity (pid) and a translation a camera (camid). A query is one
translation's verse; its hits should be the same verse in the other translations.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "demo"


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, {}


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=REPO / "var" / "demo-index")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--once", action="store_true", help="stop after the demo query")
    p.add_argument("--query-row", type=int, default=1234, help="demo row used as the query")
    args = p.parse_args()

    build = [
        sys.executable,
        "-m",
        "index_builder.cli",
        "build",
        "--gallery",
        str(DATA / "features.npy"),
        "--ids",
        str(DATA / "ids.txt"),
        "--metadata",
        str(DATA / "metadata.csv"),
        "--root",
        str(args.root),
    ]
    print("$", " ".join(build[2:]), flush=True)
    subprocess.run(build, check=True)

    env = {**os.environ, "AQE_INDEX_ROOT": str(args.root), "AQE_PORT": str(args.port)}
    server = subprocess.Popen([sys.executable, "-m", "service.main"], env=env)
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(f"{url}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print("search-service did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)

        features = np.load(DATA / "features.npy", mmap_mode="r")
        meta = _metadata_row(args.query_row)
        body = {
            "embedding": features[args.query_row].astype(float).tolist(),
            "k": 5,
            "filter": {"camid": {"not_in": [int(meta["camid"])]}},
            "with_metadata": True,
        }
        answer = _post(f"{url}/search", body)
        print(f"\nindex version {answer['index_version']}")
        print(f"query ({meta['translation']} {meta['pid']}): {meta['text']}\n")
        for hit in answer["results"][0]:
            m = hit["metadata"]
            same = "same verse" if m["pid"] == int(meta["pid"]) else "other verse"
            print(f"  {hit['score']:.3f}  {hit['id']:<14} [{same}] {m['text'][:90]}")
        print(f"\nserving on {url}  (POST /search, GET /info, /metrics, /docs)")
        if args.once:
            return 0
        print("Ctrl-C to stop")
        server.wait()
        return server.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=15)


def _metadata_row(row: int) -> dict[str, str]:
    import csv

    with (DATA / "metadata.csv").open(newline="", encoding="utf-8") as f:
        for i, rec in enumerate(csv.DictReader(f)):
            if i == row:
                return rec
    raise SystemExit(f"row {row} is not in the demo data")


if __name__ == "__main__":
    sys.exit(main())
