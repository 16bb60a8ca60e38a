"""Logging settings the entry points share (this module imports nothing that logs)."""

from __future__ import annotations

import logging

FAISS_LOADER = "faiss.loader"


def quiet_faiss_loader() -> None:
    """Drop faiss's INFO lines about the CPU modules it tries at import (AVX-512, AVX2, ...).

    ``import faiss`` logs eight INFO lines on every start, three of them "Could not load
    library with AVX512 support" on a machine that simply lacks it. Warnings and errors of the
    loader still come through. Call it before faiss is imported.
    """
    logging.getLogger(FAISS_LOADER).setLevel(logging.WARNING)
