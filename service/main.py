"""``search-service``: read settings from flags and the environment, then serve with uvicorn.

Flags (``--index-root``, ``--host``, ``--port``, ``--workers``) win over their ``AQE_*``
variables; every other setting is an ``AQE_*`` variable only. The values the flags gave are
exported to this process's environment before uvicorn starts, so the app factory, which each
worker process runs on its own (:func:`app_factory`), builds the same settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError
from uvicorn.supervisors import Multiprocess

from aqe_retrieval.logs import FAISS_LOADER, quiet_faiss_loader
from service.settings import Settings
from service.supervisor import BalancedMultiprocess, listening_sockets, reuseport_available

if TYPE_CHECKING:
    from fastapi import FastAPI


def app_factory() -> FastAPI:
    """For ``uvicorn --factory service.main:app_factory`` (and worker processes)."""
    from service.app import create_app
    from service.index_manager import IndexManager

    return create_app(s := Settings(), IndexManager.from_settings(s))  # type: ignore[call-arg]


class _Config(uvicorn.Config):
    """uvicorn's config with TCP_NODELAY on the shared listening socket of worker processes.

    It also carries ``read_timeout_s`` to :class:`service.protocol.GuardedHttpToolsProtocol`
    (instance attributes travel with the config to worker processes).

    With ``workers > 1`` uvicorn binds the socket itself with ``proto=0``, and asyncio only sets
    TCP_NODELAY on connections whose socket says ``IPPROTO_TCP``: responses (headers and body
    are two writes) then waited for the client's delayed ACK, 44 ms each (measured,
    benchmarks/bench_service.py --workers 2). Linux hands the listener's TCP_NODELAY to every
    accepted connection.
    """

    read_timeout_s: float = 10.0

    def bind_socket(self) -> socket.socket:
        """uvicorn's listening socket, with TCP_NODELAY on TCP."""
        sock = super().bind_socket()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


# the settings a flag can give, with the flag's name
FLAGS = {"index_root": "--index-root", "host": "--host", "port": "--port", "workers": "--workers"}


def parse_args(argv: Sequence[str] | None) -> dict[str, Any]:
    """The settings given as flags (argparse exits with status 2 on a malformed one)."""
    parser = argparse.ArgumentParser(
        prog="search-service",
        description="Serve nearest-neighbour search with online query expansion over the index "
        "versions `index-builder build` publishes.",
        epilog="Each flag wins over its AQE_* environment variable; every other setting "
        "(AQE_ADMIN_TOKEN, AQE_MAX_K, AQE_REQUEST_TIMEOUT_S, ...) is read from the environment "
        "only: see the README's 'Search service' section.",
    )
    parser.add_argument(
        "--index-root", type=Path, help="directory the builder publishes into (AQE_INDEX_ROOT)"
    )
    parser.add_argument("--host", help="interface to bind (AQE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (AQE_PORT, default 8000)")
    parser.add_argument("--workers", type=int, help="worker processes (AQE_WORKERS, default 1)")
    args = parser.parse_args(argv)
    return {name: value for name, value in vars(args).items() if value is not None}


def load_settings(flags: dict[str, Any]) -> Settings:
    """Settings from ``flags`` over the environment, then the flags exported for worker processes.

    Raises ``ValidationError`` for a bad value, from a flag or a variable.
    """
    settings = Settings(**flags)
    for name, value in flags.items():
        os.environ[f"AQE_{name.upper()}"] = str(value)
    return settings


def _config_error(exc: ValidationError) -> str:
    lines = []
    for e in exc.errors():
        name = "_".join(str(p) for p in e["loc"])
        where = f"AQE_{name.upper()}" + (f" / {FLAGS[name]}" if name in FLAGS else "")
        lines.append(f"  {where}: {e['msg']}")
    return "search-service: invalid configuration:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``search-service`` console script."""
    flags = parse_args(argv)
    try:
        settings = load_settings(flags)
    except ValidationError as exc:
        print(_config_error(exc), file=sys.stderr)
        return 2
    quiet_faiss_loader()
    if settings.workers > 1:
        # one metrics view over every worker (and the admin reload fan-out): a fresh private
        # directory, set before any worker imports prometheus_client
        metrics_dir = tempfile.mkdtemp(prefix="aqe-search-service-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            return _serve(settings)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return _serve(settings)


def log_config(level: str) -> dict[str, Any]:
    """Logging for uvicorn to apply in the supervisor and in every worker process.

    The root logger included, so the service's own lines (``serving version ...``) show from
    every worker, each with its pid.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": {"format": "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": level},
        # faiss's INFO lines about the CPU modules it tries, in every worker (aqe_retrieval.logs)
        "loggers": {FAISS_LOADER: {"level": "WARNING"}},
    }


def _serve(settings: Settings) -> int:
    config = _Config(
        "service.main:app_factory",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level.lower(),
        log_config=log_config(settings.log_level),
        access_log=False,
        # read deadline for slow clients, cancel on disconnect (service.protocol)
        http="service.protocol:GuardedHttpToolsProtocol",
    )
    config.read_timeout_s = settings.read_timeout_s
    if config.workers > 1 and reuseport_available():  # a socket per worker (service.supervisor)
        try:
            sockets = listening_sockets(settings.host, settings.port, config.workers)
        except OSError as exc:
            print(f"search-service: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
            return 1
        host, port = sockets[0].getsockname()[:2]
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on http://%s:%d, %d workers, a socket each", host, port, config.workers
        )
        BalancedMultiprocess(config, sockets).run()
        return 0
    if config.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
