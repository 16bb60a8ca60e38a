"""A test fsspec protocol, ``aqetest://``: local files behind a protocol that only fsspec resolves.

fsspec's ``memory://`` lives in one process; this one works in every process that calls
:func:`register` (the test's and, through ``client.run``, each Dask worker's), so a cluster
build over an ``aqetest://`` gallery shows that workers resolve and read the URL themselves.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "aqetest"


class RangeFS(LocalFileSystem):
    """The local filesystem, addressed as ``aqetest:///absolute/path``."""

    protocol = (PROTOCOL,)
    opened = 0
    """Files opened through this protocol in this process (what a test may count)."""

    def _open(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        type(self).opened += 1
        return super()._open(path, *args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3 :]
        return super()._strip_protocol(path)


def register() -> None:
    """Make ``aqetest://`` known to fsspec in this process."""
    fsspec.register_implementation(PROTOCOL, RangeFS, clobber=True)


def url(path: Any) -> str:
    """The ``aqetest://`` URL of a local absolute path."""
    return f"{PROTOCOL}://{path}"
