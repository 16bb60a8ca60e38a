"""Worker processes on a socket each: connections spread over them, a dead one replaced on its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.supervisor import listening_sockets, reuseport_available

pytestmark = pytest.mark.skipif(not reuseport_available(), reason="SO_REUSEPORT balancing is Linux's")


def _accept_all(sock: socket.socket) -> list[socket.socket]:
    sock.setblocking(False)
    accepted = []
    while True:
        try:
            accepted.append(sock.accept()[0])
        except BlockingIOError:
            return accepted


def test_connections_spread_over_every_socket_of_the_group():
    group = listening_sockets("127.0.0.1", 0, 2)
    port = group[0].getsockname()[1]
    assert {s.getsockname()[1] for s in group} == {port}
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
    try:
        time.sleep(0.2)  # the handshakes complete into the accept queues
        accepted = [_accept_all(s) for s in group]
        # by a hash of each connection's addresses: all 64 on one socket has odds of 2**-63
        assert sum(map(len, accepted)) == 64
        assert all(len(a) > 0 for a in accepted), [len(a) for a in accepted]
        assert all(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for a in accepted for c in a)
        for a in accepted:
            for c in a:
                c.close()
    finally:
        for c in clients:
            c.close()
        for s in group:
            s.close()


def test_an_address_in_use_is_refused_even_by_a_group_of_the_same_user():
    """A second service on the same port must fail to start, not join the first one's group."""
    plain = socket.create_server(("127.0.0.1", 0))
    port = plain.getsockname()[1]
    with plain, pytest.raises(OSError):
        listening_sockets("127.0.0.1", port, 2)
    first = listening_sockets("127.0.0.1", port, 2)
    try:
        with pytest.raises(OSError):
            listening_sockets("127.0.0.1", port, 2)
    finally:
        for s in first:
            s.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _workers(supervisor: int) -> list[int]:
    """The supervisor's worker processes (the spawn context's resource tracker excluded)."""
    out = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True).stdout.split()
    return [
        int(p)
        for p in out
        if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
    ]


def _load(url: str, body: dict, connections: int, seconds: float) -> list[int]:
    """``connections`` keep-alive clients posting ``body`` for ``seconds``; every status seen (-1: failed)."""
    statuses: list[int] = []

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    statuses.append(c.post(f"{url}/search", json=body).status_code)
                except httpx.HTTPError:  # refused, reset or never answered
                    statuses.append(-1)
                    return

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_both_workers_serve_and_a_killed_one_is_replaced_on_its_socket(built_root, small_gallery, tmp_path):
    x, _ = small_gallery
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "AQE_INDEX_ROOT": str(built_root),
        "AQE_PORT": str(port),
        "AQE_WORKERS": "2",
        "AQE_RELOAD_INTERVAL_S": "0",
        "AQE_LOCAL_COPY_DIR": str(tmp_path / "copies"),
    }
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.main"], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    body = {"embedding": np.asarray(x[0], np.float64).tolist(), "k": 3}

    def ready(workers: int) -> None:
        deadline = time.monotonic() + 60
        while log.read_text(errors="replace").count("Application startup complete.") < workers:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    try:
        ready(2)
        assert "a socket each" in log.read_text()
        workers = _workers(proc.pid)
        assert len(workers) == 2
        before = {p: _cpu_seconds(p) for p in workers}
        statuses = _load(url, body, 16, 3.0)
        assert statuses and set(statuses) == {200}
        # 16 connections over two sockets: all on one has odds of 2**-15
        used = {p: _cpu_seconds(p) - before[p] for p in workers}
        assert all(v > 0.05 for v in used.values()), used

        os.kill(workers[0], signal.SIGKILL)
        # new connections hash to both sockets; the dead worker's wait in its backlog for the
        # replacement (its start-up: a few seconds) and none is refused
        statuses = _load(url, body, 16, 2.0)
        assert statuses and set(statuses) == {200}
        ready(3)
        replaced = _workers(proc.pid)
        assert len(replaced) == 2 and workers[0] not in replaced and workers[1] in replaced
        before = {p: _cpu_seconds(p) for p in replaced}
        assert set(_load(url, body, 16, 3.0)) == {200}
        used = {p: _cpu_seconds(p) - before[p] for p in replaced}
        assert all(v > 0.05 for v in used.values()), used
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_several_workers_on_a_port_in_use_exit_1_naming_the_address(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {**os.environ, "AQE_INDEX_ROOT": str(tmp_path), "AQE_PORT": str(port), "AQE_WORKERS": "2"}
        proc = subprocess.run(
            [sys.executable, "-m", "service.main"], env=env, capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
