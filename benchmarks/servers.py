"""Server processes of the benchmarks: a free port, waiting for an answer, stopping for sure.

One home for what every benchmark that starts ``search-service`` (or a Chroma server) needs, so
each stops its servers the same way: terminated, then killed if they outlive a grace period, and
never left running after the benchmark has failed.
"""

from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, seconds: float = 300) -> None:
    """Return once ``GET url`` answers 200; exit the benchmark if it has not within ``seconds``."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer 200 within {seconds:g} s")


def stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """Terminate ``proc`` and wait for it; kill it if it has not exited within ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
