"""``search-service``: read settings from the environment, then serve with uvicorn."""

from __future__ import annotations

import logging
import socket
import sys
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError
from uvicorn.supervisors import Multiprocess

from aqe_retrieval.logs import quiet_faiss_loader
from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI


def app_factory() -> FastAPI:
    """For ``uvicorn --factory service.main:app_factory`` (and worker processes)."""
    from service.app import create_app
    from service.index_manager import IndexManager

    return create_app(s := Settings(), IndexManager.from_settings(s))  # type: ignore[call-arg]


class _Config(uvicorn.Config):
    """uvicorn's config with TCP_NODELAY on the shared listening socket of worker processes.

    With ``workers > 1`` uvicorn binds the socket itself with ``proto=0``, and asyncio only sets
    TCP_NODELAY on connections whose socket says ``IPPROTO_TCP``: responses (headers and body
    are two writes) then waited for the client's delayed ACK, 44 ms each (measured,
    benchmarks/bench_service.py --workers 2). Linux hands the listener's TCP_NODELAY to every
    accepted connection.
    """

    def bind_socket(self) -> socket.socket:
        """uvicorn's listening socket, with TCP_NODELAY on TCP."""
        sock = super().bind_socket()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def main() -> int:
    """Entry point of the ``search-service`` console script."""
    try:
        settings = Settings()  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = [f"  AQE_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()]
        print("search-service: invalid configuration:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_faiss_loader()
    config = _Config(
        "service.main:app_factory",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
    if config.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
