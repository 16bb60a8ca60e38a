"""The benchmarks' load client (benchmarks/http_load.py): both drivers against a small real server.

The server answers each POST with ``k`` hits and records the bodies it received; a body starting
with ``fail`` gets a 500. The wrk driver's tests skip where wrk is not installed.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import http_load

K = 3
needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt install wrk)")


class _Answers(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as both drivers use
    received: list[bytes]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append(body)
        status = 500 if body.startswith(b"fail") else 200
        answer = json.dumps({"results": [[{"id": str(i)} for i in range(K)]]}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, list[bytes]]]:
    received: list[bytes] = []
    handler = type("Handler", (_Answers,), {"received": received})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", received
    finally:
        httpd.shutdown()
        httpd.server_close()


def _figures_ok(figures: dict, client: str, clients: int) -> None:
    assert figures["client"] == client
    assert figures["clients"] == clients
    assert figures["requests"] > 0 and figures["qps"] > 0
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]


def test_python_client_counts_answers_and_errors(server: tuple[str, list[bytes]]) -> None:
    url, received = server
    ok = http_load.load(url, [b'{"q": 1}', b'{"q": 2}'], 2, 0.5, K, client="python")
    _figures_ok(ok, "python", 2)
    assert ok["errors"] == 0
    assert received and set(received) == {b'{"q": 1}', b'{"q": 2}'}
    failing = http_load.load(url, [b"fail"], 1, 0.3, K, client="python")
    assert failing["errors"] == failing["requests"] > 0


def test_python_client_checks_the_hits(server: tuple[str, list[bytes]]) -> None:
    url, _ = server
    wrong_k = http_load.load(url, [b"{}"], 1, 0.3, K + 1, client="python")
    assert wrong_k["errors"] == min(wrong_k["requests"], http_load.CHECKED)


@needs_wrk
def test_wrk_sends_every_body_intact_and_reports_the_figures(server: tuple[str, list[bytes]]) -> None:
    url, received = server
    bodies = [b"\n\x00binary\r\n" + bytes([i]) * i for i in range(1, 6)]  # newlines, NULs
    figures = http_load.load(url, bodies, 2, 1, K, client="wrk")
    _figures_ok(figures, "wrk", 2)
    assert figures["errors"] == 0
    assert set(received) == set(bodies)
    assert len(received) >= figures["requests"]  # plus the checked ones before the run


@needs_wrk
def test_wrk_counts_error_statuses(server: tuple[str, list[bytes]]) -> None:
    url, _ = server
    bodies = [b"ok"] * http_load.CHECKED + [b"fail"]  # the checked first bodies pass
    figures = http_load.load(url, bodies, 1, 1, K, client="wrk")
    assert 0 < figures["errors"] < figures["requests"]


@needs_wrk
def test_wrk_refuses_to_start_on_a_wrong_answer(server: tuple[str, list[bytes]]) -> None:
    url, _ = server
    with pytest.raises(ValueError, match="answered 500"):
        http_load.load(url, [b"fail"], 1, 1, K, client="wrk")
    with pytest.raises(ValueError, match=f"{K + 1} hits"):
        http_load.load(url, [b"ok"], 1, 1, K + 1, client="wrk")


def test_auto_uses_wrk_where_installed(server: tuple[str, list[bytes]]) -> None:
    url, _ = server
    figures = http_load.load(url, [b"ok"], 1, 1, K)
    assert figures["client"] == ("wrk" if shutil.which("wrk") else "python")
