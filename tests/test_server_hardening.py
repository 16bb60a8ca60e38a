"""A real ``search-service`` process on a loopback port: CLI, workers, load shedding, slow clients.

Every request loop here is bounded in count and in time; everything talks to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import free_port, serving

from index_builder.cli import main as builder


@pytest.fixture(scope="module")
def root(tmp_path_factory, small_gallery) -> Path:
    """An index root with one version of ``small_gallery`` (600 x 32, ids and metadata)."""
    _, paths = small_gallery
    root = tmp_path_factory.mktemp("served")
    args = ["build", "--root", str(root), "--qe-k", "5", "--no-progress"]
    for name in ("gallery", "ids", "metadata"):
        args += [f"--{name}", str(paths[name])]
    assert builder(args) == 0
    return root


def test_help_prints_usage_without_any_configuration():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "service.main", "--help"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: search-service" in proc.stdout
    for flag in ("--index-root", "--host", "--port", "--workers"):
        assert flag in proc.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--port", "70000"], "--port"),
        (["--port", "abc"], "--port"),
        (["--workers", "0"], "--workers"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_a_bad_flag_exits_2_and_names_it(tmp_path, args, says):
    proc = subprocess.run(
        [sys.executable, "-m", "service.main", "--index-root", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_flags_win_over_the_environment_in_every_worker(tmp_path, root):
    port = free_port()
    # the environment names a missing root and another port: the flags must win in both workers
    env = {"AQE_INDEX_ROOT": str(tmp_path / "missing"), "AQE_PORT": "1"}
    args = ["--index-root", str(root), "--port", str(port), "--workers", "2", "--host", "127.0.0.1"]
    with serving(tmp_path / "log", args, env, workers=2, port=port) as url:
        for _ in range(10):  # fresh connections, so both workers answer some
            with httpx.Client(base_url=url) as c:
                assert c.get("/readyz").json()["status"] == "ready"


# Load shedding: one search thread per queue, 4 waiting requests at most, a 0.5 s deadline, 1 s
# to send a request. A heavy request (5000 queries, 50,000 hits) costs about 0.25 s of search.
SHEDDING = {
    "AQE_BATCH_WORKERS": "1",
    "AQE_MAX_BATCH": "20000",
    "AQE_MAX_QUEUE": "4",
    "AQE_REQUEST_TIMEOUT_S": "0.5",
    "AQE_READ_TIMEOUT_S": "1",
    "AQE_RELOAD_INTERVAL_S": "0",
}
# what a request may take beyond the deadline: reading and parsing its body before the deadline
# starts and rendering its answer after it, on two shared cores
SLACK_S = 2.0


@pytest.fixture(scope="module")
def shedding(tmp_path_factory, root):
    with serving(
        tmp_path_factory.mktemp("shedding") / "log", env={"AQE_INDEX_ROOT": str(root), **SHEDDING}
    ) as url:
        yield url


def heavy_body(rows: int = 5000) -> bytes:
    q = np.random.default_rng(rows).standard_normal((rows, 32)).round(4)
    return json.dumps({"embeddings": q.tolist(), "k": 10}).encode()


JSON = {"content-type": "application/json"}


def test_overload_is_shed_with_503_retry_after_within_the_deadline(shedding):
    body = heavy_body()
    outcomes: list[tuple[int, float, str | None]] = []
    health: list[float] = []
    done = threading.Event()

    def heavy() -> None:
        t0 = time.monotonic()
        r = httpx.post(f"{shedding}/search", content=body, headers=JSON, timeout=30)
        outcomes.append((r.status_code, time.monotonic() - t0, r.headers.get("retry-after")))

    def probe() -> None:
        with httpx.Client(base_url=shedding, timeout=10) as c:
            stop = time.monotonic() + 20
            while not done.is_set() and time.monotonic() < stop:
                t0 = time.monotonic()
                assert c.get("/healthz").status_code == 200
                health.append(time.monotonic() - t0)
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: heavy(), range(16)))
    done.set()
    prober.join()
    statuses = sorted(s for s, _, _ in outcomes)
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, statuses
    assert all(ra == "1" for s, _, ra in outcomes if s == 503)
    slowest = max(t for _, t, _ in outcomes)
    assert slowest < float(SHEDDING["AQE_REQUEST_TIMEOUT_S"]) + SLACK_S, outcomes
    assert health and max(health) < 1.0, max(health)
    text = httpx.get(f"{shedding}/metrics").text
    assert 'aqe_requests_total{route="/search",status="503"}' in text
    # and the burst over, the service answers again (once the searches still running finish)
    wait_idle(shedding)


def wait_idle(url: str) -> None:
    """Until a small search is answered (what an overload left running or queued is done)."""
    deadline = time.monotonic() + 10
    while (r := httpx.post(f"{url}/search", json={"embedding": [0.5] * 32, "k": 2})).status_code != 200:
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(0.2)


def raw_request(url: str, data: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(data)
    return sock


def test_a_client_that_hangs_up_has_its_queued_search_dropped(shedding, small_gallery):
    x, _ = small_gallery
    wait_idle(shedding)
    before = dropped(shedding)
    busy = threading.Thread(
        target=lambda: httpx.post(f"{shedding}/search", content=heavy_body(8000), headers=JSON, timeout=30)
    )
    submitted = metric(shedding, "aqe_queries_per_request_count")
    busy.start()
    deadline = time.monotonic() + 10
    while metric(shedding, "aqe_queries_per_request_count") == submitted:  # it is parsed
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # the only unfiltered search thread is busy for ~0.4 s with the 8000 queries
    small = json.dumps({"embedding": x[1].tolist(), "k": 3}).encode()
    request = (
        b"POST /search HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(small), small)
    )
    for _ in range(3):
        raw_request(shedding, request).close()  # sent whole, then hung up at once
    busy.join()
    deadline = time.monotonic() + 5
    while dropped(shedding) - before < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    # never searched: the requests' tasks were cancelled, so the batcher dropped their jobs
    assert dropped(shedding) - before == 3
    assert 'aqe_requests_total{route="/search",status="499"}' in httpx.get(f"{shedding}/metrics").text


def metric(url: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels) in ``url``'s /metrics; 0 if absent."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def dropped(url: str) -> float:
    return metric(url, 'aqe_searches_dropped_total{reason="gone"}')


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        (b"", b"HTTP/1.1 408"),  # connected, never sent a byte
        (b"POST /search HTTP/1.1\r\nhost: a\r\ncontent-ty", b"HTTP/1.1 408"),  # half the headers
        # whole headers, a tenth of the body: a handler waits for it, so no answer, just closed
        (
            b"POST /search HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"k": 1,',
            b"",
        ),
    ],
    ids=["nothing", "partial-headers", "partial-body"],
)
def test_a_slow_client_is_cut_off_at_the_read_timeout(shedding, sent, answer):
    t0 = time.monotonic()
    with raw_request(shedding, sent) as sock:
        got = b""
        while chunk := sock.recv(4096):  # until the server closes (the socket times out at 5 s)
            got += chunk
    waited = time.monotonic() - t0
    assert 0.8 < waited < float(SHEDDING["AQE_READ_TIMEOUT_S"]) + 1.5, waited
    assert got.startswith(answer)
    assert httpx.get(f"{shedding}/healthz").status_code == 200


def test_a_body_not_declared_json_gets_415_over_http(shedding):
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = httpx.post(
            f"{shedding}/search", content=b'{"embedding": [1], "k": 1}', headers={"content-type": ctype}
        )
        assert r.status_code == 415, r.text


def test_two_workers_one_metrics_view_their_logs_and_reloads_for_all(tmp_path, root, small_gallery):
    x, paths = small_gallery
    served = tmp_path / "root"
    shutil.copytree(root, served)
    env = {
        "AQE_INDEX_ROOT": str(served),
        "AQE_WORKERS": "2",
        "AQE_ADMIN_TOKEN": "s3",
        "AQE_RELOAD_INTERVAL_S": "0",
    }
    log = tmp_path / "log"
    with serving(log, env=env, workers=2) as url:
        # each line of the service's own logging, from each worker, with its pid
        pids = set(re.findall(r"\[(\d+)\] service\.index_manager: serving version", log.read_text()))
        assert len(pids) == 2, log.read_text()
        for i in range(10):  # fresh connections: both workers answer some
            r = httpx.post(f"{url}/search", json={"embedding": x[i].tolist(), "k": 2})
            assert r.status_code == 200
        for _ in range(6):  # and whichever worker answers the scrape shows them all
            assert metric(url, 'aqe_requests_total{route="/search",status="200"}') == 10
            assert metric(url, "aqe_reloads_total") == 2  # one load per worker
            assert "aqe_index_info{version=" in httpx.get(f"{url}/metrics").text  # custom collector
        # no watcher (AQE_RELOAD_INTERVAL_S=0): only the admin reload can bring a new version
        assert (
            builder(["build", "--gallery", str(paths["gallery"]), "--root", str(served), "--no-progress"])
            == 0
        )
        r = httpx.post(f"{url}/admin/reload", headers={"Authorization": "Bearer s3"})
        assert r.status_code == 200 and r.json()["workers"] == "all"
        new = r.json()["version"]
        deadline = time.monotonic() + 10
        while metric(url, f'aqe_workers_serving{{version="{new}"}}') != 2:
            assert time.monotonic() < deadline, httpx.get(f"{url}/metrics").text
            time.sleep(0.1)
        for _ in range(6):
            assert httpx.get(f"{url}/readyz").json()["index_version"] == new
