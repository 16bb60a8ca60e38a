"""Logging settings the entry points share (this module imports nothing that logs)."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

FAISS_LOADER = "faiss.loader"


def quiet_faiss_loader() -> None:
    """Drop faiss's INFO lines about the CPU modules it tries at import (AVX-512, AVX2, ...).

    ``import faiss`` logs eight INFO lines on every start, three of them "Could not load
    library with AVX512 support" on a machine that simply lacks it. Warnings and errors of the
    loader still come through. Call it before faiss is imported.
    """
    logging.getLogger(FAISS_LOADER).setLevel(logging.WARNING)


@contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code prints on standard output to standard error while inside.

    FAISS's reader of on-disk inverted lists (``IO_FLAG_ONDISK_SAME_DIR``) ``printf``s a line
    ("updating ondisk filename ...") on every load; on stdout it broke the JSON summary that
    ``index-builder build`` prints there. C's stdout is buffered, so it is flushed before file
    descriptor 1 is restored. Process-wide while it lasts: another thread's stdout output in that
    window lands on stderr too (nothing is lost).
    """
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    libc.fflush(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
