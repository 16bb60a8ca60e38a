"""The real thing: ``search-service`` started as a process, spoken to over loopback HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from helpers import serving

from index_builder.cli import main as builder


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def server(request, tmp_path, small_gallery):
    _, paths = small_gallery
    root = tmp_path / "root"
    assert (
        builder(
            [
                "build",
                "--gallery",
                str(paths["gallery"]),
                "--ids",
                str(paths["ids"]),
                "--metadata",
                str(paths["metadata"]),
                "--root",
                str(root),
                "--qe-k",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    env = {"AQE_INDEX_ROOT": str(root), "AQE_ADMIN_TOKEN": "secret", "AQE_WORKERS": str(request.param)}
    # every worker loads the version before its start-up completes (and says so)
    with serving(tmp_path / "server.log", env=env, workers=request.param) as url:
        yield url, root, paths, request.param


def test_served_over_http_with_reload(server, small_gallery):
    url, root, paths, workers = server
    x, _ = small_gallery
    r = httpx.post(
        f"{url}/search",
        json={
            "embedding": (x[3] + 0.01).tolist(),
            "k": 4,
            "with_metadata": True,
            "filter": {"camera": {"in": [3]}},
        },
    )
    assert r.status_code == 200
    body = r.json()
    assert body["results"][0][0] == {
        "id": "img-00003",
        "score": pytest.approx(1, abs=0.2),
        "metadata": {"camera": 3, "ts": 3, "label": "p0"},
    }
    first = body["index_version"]
    assert httpx.post(f"{url}/search", json={"embedding": [1.0]}).status_code == 400
    assert builder(["build", "--gallery", str(paths["gallery"]), "--root", str(root), "--no-progress"]) == 0
    # Each worker process reloads on its own clock. One keep-alive connection is served by one
    # worker throughout, so the search that shows the new version and the metrics read after it
    # come from the same process.
    deadline = time.monotonic() + 15
    with httpx.Client(base_url=url) as client:
        while True:
            r = client.post("/search", json={"embeddings": [np.ones(32).tolist()] * 2, "k": 2})
            assert r.status_code == 200, r.text
            if r.json()["index_version"] != first:
                break
            assert time.monotonic() < deadline, "new version not picked up"
            time.sleep(0.1)
        assert len(r.json()["results"]) == 2
        # /metrics is one view of every worker: two loads in each, once all have reloaded
        want = f"aqe_reloads_total {2.0 * workers}"
        while want not in client.get("/metrics").text:
            assert time.monotonic() < deadline, client.get("/metrics").text
            time.sleep(0.1)


def test_bad_configuration_stops_start_up(tmp_path):
    env = {**os.environ, "AQE_INDEX_ROOT": str(tmp_path), "AQE_MAX_K": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "service.main"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "AQE_MAX_K" in proc.stderr


def test_the_shared_socket_of_worker_processes_sends_without_delay():
    """With AQE_WORKERS > 1 accepted connections must have TCP_NODELAY (else 40 ms per reply)."""
    from service.main import _Config

    listener = _Config(
        "service.main:app_factory", factory=True, host="127.0.0.1", port=0, workers=2
    ).bind_socket()
    listener.listen()  # the event loop does this in each worker
    with listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
