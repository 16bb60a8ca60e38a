"""Worker processes that share the load: one ``SO_REUSEPORT`` listening socket per worker.

uvicorn's :class:`~uvicorn.supervisors.Multiprocess` hands every worker the same listening socket,
so the workers race to ``accept`` each connection and the kernel wakes the most recently idle one
first: the worker that is awake takes every pending connection. Keep-alive clients then stay on
it. Measured (``AQE_WORKERS=2``, 8 keep-alive clients, 200,000 x 256 HNSW, three runs): all eight
connections on one worker every time, the other worker idle (0.0 of a core), 750 q/s.

Here each worker slot has its own listening socket, every one bound to the same address with
``SO_REUSEPORT``, and Linux spreads new connections over them by a hash of the connection's
addresses: evenly on average, not per run (two workers, 32 wrk connections: from 9/23 to 16/16
over 13 runs; q/s did not follow the split beyond the machine's drift).
The sockets are the supervisor's: a worker that dies is replaced on its slot's socket,
so the connections queued in that socket's backlog wait for the replacement instead of being
reset. The rest of the supervision (restarting dead or hung workers, ``SIGHUP``, signals) is
uvicorn's own, run one slot at a time.

``SO_REUSEPORT`` would also let a second service started on the same port (by the same user)
join the group and silently take part of the traffic, so the address is first claimed with a
plain bind, which fails as uvicorn's own bind would when anything already listens there.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import Any

from uvicorn import Config
from uvicorn.supervisors import Multiprocess

BACKLOG = 2048
"""Each socket's accept queue (uvicorn's default ``backlog``)."""


def reuseport_available() -> bool:
    """Whether this platform balances connections over ``SO_REUSEPORT`` sockets (Linux does)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def listening_sockets(host: str, port: int, count: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """``count`` listening sockets on ``(host, port)`` in one ``SO_REUSEPORT`` group, TCP_NODELAY set.

    Port 0 picks a free port for the first and binds the rest to it. Raises ``OSError``
    (``EADDRINUSE``) when anything already listens on the address.
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    if port:  # claim the address: a plain bind fails if anything listens there, a group included
        socket.create_server((host, port), family=family).close()
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_server((host, port), family=family, reuse_port=True, backlog=backlog)
            # Linux hands the listener's TCP_NODELAY to every accepted connection (see
            # service.main._Config: responses otherwise wait 40 ms for a delayed ACK)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.set_inheritable(True)
            sockets.append(sock)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class BalancedMultiprocess(Multiprocess):
    """uvicorn's supervisor with worker ``i`` always serving ``sockets[i]`` (one per worker)."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        if len(sockets) != config.workers:
            raise ValueError(f"{config.workers} workers need as many sockets, got {len(sockets)}")
        super().__init__(config, sockets=[])
        self.slot_sockets = sockets

    def _in_slot(self, slot: int, step: Callable[[], Any]) -> None:
        """Run one of uvicorn's supervision steps as if ``slot`` were the only worker."""
        processes, count = self.processes, self.processes_num
        self.processes = processes[slot : slot + 1]
        self.processes_num, self.sockets = 1, [self.slot_sockets[slot]]
        try:
            step()
        finally:
            processes[slot : slot + 1] = self.processes
            self.processes, self.processes_num, self.sockets = processes, count, []

    def init_processes(self) -> None:
        """Start one worker per slot, each on its slot's socket."""
        for slot in range(self.processes_num):
            self._in_slot(slot, super().init_processes)

    def keep_subprocess_alive(self) -> None:
        """uvicorn's check of each worker, replacing a dead or hung one on its slot's socket."""
        for slot in range(len(self.processes)):
            if self.should_exit.is_set():
                return
            self._in_slot(slot, super().keep_subprocess_alive)

    def restart_all(self) -> None:
        """``SIGHUP``: replace each worker in turn, its replacement on the same socket."""
        for slot in range(len(self.processes)):
            if self.should_exit.is_set():
                return
            self._in_slot(slot, super().restart_all)

    def run(self) -> None:
        """Supervise until told to exit, then close the sockets."""
        try:
            super().run()
        finally:
            for sock in self.slot_sockets:
                sock.close()
