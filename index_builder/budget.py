"""The build's memory budget: sizes parsed, the machine's limit found, every phase planned inside it.

The budget is ``--memory-budget`` (``4GiB``, ``512MiB``, bytes), else the container's limit
(cgroup v2 ``memory.max``, v1 ``hierarchical_memory_limit``) or the machine's available memory,
whichever is smaller. :func:`plan_build` turns it into the sizes every phase works with.

**Resident** (the whole in-memory build fits): today's build, unchanged; it needs about
``BASE + 1.5 (2 N d 4 + (W + 1) N k 12 + indexes)`` bytes (RESIDENT_SLACK).

**Out of core** (it does not): arrays of N rows (level rows and norms, expanded rows, the kNN
graph, the coarse assignment) are memory-mapped files in the staging directory, written and read
in blocks; IVF inverted lists are on-disk (``.ivfdata``); what stays in anonymous memory is::

    BASE                              interpreter, numpy, FAISS, BLAS (BASE_BYTES)
  + the largest of the phases:
      W * 5 * T**2 + S * (W * k * 12 + 4 * nprobe)   kNN: tiles (side T), heaps of a stripe of S rows
      C * (k * d * 12 + 8 d) + E * (8 d + 24 k)      expansion: a chunk of pairs, a stripe of E rows
      B * d * 12                                     read / normalise: one block
      R * (code + 8 + 4 d)                           an IVF shard before its merge into on-disk lists
      train * (4 d + 16) + nlist * d * 8             IVF training: sample and centroids
      N * 8                                          the serving IVF's direct map (grows with N)

with ``W`` workers and ``T, S, C, E, B, R`` the largest that keep each phase within half of
``budget - BASE`` (tiles, block and an expansion chunk within an eighth, heaps, shard and the
expansion stripe within a quarter). The other half is left to the page cache: mapped file
pages count against a cgroup's limit too, and a phase thrashes unless the rows it is working
through (a stripe: ``S d 4`` bytes, at most a quarter of that half) stay cached. The kernel
reclaims mapped pages; anonymous memory it cannot. A phase that cannot fit raises
:class:`BudgetError` before any heavy work, naming the budget it would need.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from aqe_retrieval.errors import InputError

logger = logging.getLogger(__name__)

BASE_BYTES = 48 * 2**20
"""Anonymous memory of the process besides its arrays: measured 31.5 MiB after importing the
builder, 40 MiB once BLAS has run on two tile threads and FAISS has searched."""
MIN_WORK_BYTES = 4 * 2**20
"""Below this much memory beyond BASE_BYTES no phase is planned."""
TILES = (2048, 1024, 512, 256, 128)
"""Tile sides tried, largest first (2048 is the measured optimum, symmetric.SYMMETRIC_TILE)."""
EXPAND_CHUNK = 1024
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNLIMITED = 2**60
"""cgroup v1 reports "no limit" as a huge number (9223372036854771712 on this kernel)."""


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
"""glibc ``mallopt`` parameters (malloc.h)."""


def bound_malloc() -> bool:
    """Make glibc hand freed large blocks back to the kernel; False where there is no glibc.

    By default glibc raises its mmap threshold to the size of the largest block freed (up to
    32 MiB), so the next blocks of that size come from the heap and stay resident after they are
    freed: measured here, an out-of-core build's serving-index shards left 11 MiB more anonymous
    memory than planned. A fixed threshold (1 MiB) keeps big blocks mmap()ed, and two arenas stop
    each tile thread from growing its own.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(param, value) == 1
        for param, value in ((M_MMAP_THRESHOLD, 2**20), (M_TRIM_THRESHOLD, 2**20), (M_ARENA_MAX, 2))
    )


class BudgetError(InputError):
    """A phase of the build cannot run inside the memory budget (exit status 2)."""


def parse_size(text: str) -> int:
    """Bytes of a size like ``512MiB``, ``4GiB``, ``1.5G``, ``800MB`` or ``1048576``.

    ``K/M/G/T`` and ``KiB/MiB/...`` are powers of 1024; ``KB/MB/GB/TB`` powers of 1000.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"memory size {text!r} is not a size like 512MiB, 4GiB or 1048576")
    value, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    base = _UNITS[unit]
    if unit and suffix == "b":  # KB, MB, GB: decimal
        base = 1000 ** "kmgt".index(unit) * 1000
    size = int(value * base)
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return size


def format_size(size: float) -> str:
    """``size`` bytes as the largest binary unit below it, e.g. ``1.50 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


@dataclass(frozen=True)
class Budget:
    """The build's memory budget in bytes, and where it came from."""

    bytes: int
    source: str


def detect_budget(
    requested: int | None = None, proc: Path = Path("/proc"), cgroup: Path | None = None
) -> Budget:
    """``requested`` if given, else the smaller of the container's limit and available memory."""
    if requested is not None:
        return Budget(requested, "--memory-budget")
    found = [b for b in (cgroup_limit(proc, cgroup), available_memory(proc)) if b is not None]
    if not found:
        return Budget(_UNLIMITED, "unknown (no cgroup limit, no /proc/meminfo)")
    return min(found, key=lambda b: b.bytes)


def cgroup_limit(proc: Path = Path("/proc"), mount: Path | None = None) -> Budget | None:
    """This process's cgroup memory limit (v2 ``memory.max`` up the tree, v1 hierarchical), or None."""
    mount = mount or Path("/sys/fs/cgroup")
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[Budget] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # v2: the unified hierarchy, mounted at the root or at unified/
            for base in (mount, mount / "unified"):
                limits += _v2_limits(base, rel)
        elif "memory" in controllers.split(","):
            for base in (mount / "memory", mount / controllers):
                stat = _read(base / rel / "memory.stat")
                for row in (stat or "").splitlines():
                    if row.startswith("hierarchical_memory_limit "):
                        limits.append(Budget(int(row.split()[1]), "cgroup v1 memory limit"))
                value = _read(base / rel / "memory.limit_in_bytes")
                if value and value.strip().isdigit():
                    limits.append(Budget(int(value), "cgroup v1 memory.limit_in_bytes"))
    limits = [b for b in limits if b.bytes < _UNLIMITED]
    return min(limits, key=lambda b: b.bytes) if limits else None


def _v2_limits(base: Path, rel: str) -> list[Budget]:
    found = []
    parts = [p for p in rel.split("/") if p]
    for i in range(len(parts), -1, -1):
        value = _read(base.joinpath(*parts[:i]) / "memory.max")
        if value and value.strip().isdigit():
            found.append(Budget(int(value), "cgroup v2 memory.max"))
    return found


def available_memory(proc: Path = Path("/proc")) -> Budget | None:
    """``MemAvailable`` of ``/proc/meminfo``, or None where it cannot be read."""
    for row in (_read(proc / "meminfo") or "").splitlines():
        if row.startswith("MemAvailable:"):
            return Budget(int(row.split()[1]) * 1024, "available memory (/proc/meminfo)")
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class Workload:
    """What a build will hold: N x d rows, ``k`` neighbours, its kNN and serving indexes."""

    n: int
    d: int
    k: int
    workers: int
    block_size: int
    knn_index_bytes: int = 0
    """The kNN index held in memory when resident (IVF,Flat: N (4d + 8)); 0 for exact kNN."""
    knn_in_memory_only: str | None = None
    """Why the kNN index cannot go out of core (HNSW, ...), or None."""
    serving_index_bytes: int = 0
    serving_in_memory_only: str | None = None
    """Why the serving index must be held whole while it is built (flat), or None."""
    train_rows: int = 0
    nlist: int = 0
    code_size: int = 0
    nprobe: int = 0
    """nprobe of a batch-lists kNN graph (its coarse assignment, 4 bytes a probe), else 0."""


@dataclass(frozen=True)
class Plan:
    """Sizes the build works with inside its budget (see the module's formula)."""

    budget: Budget
    resident: bool
    resident_bytes: int
    anonymous_bytes: int
    block_size: int
    tile: int
    stripe: int
    chunk: int
    shard_rows: int
    expand_stripe: int = 0
    """Output rows of one streamed expansion pass (``expansion.expand_streamed``), out of core."""

    def describe(self) -> str:
        """One log line: budget, mode and sizes."""
        mode = "resident" if self.resident else "out of core"
        return (
            f"memory budget {format_size(self.budget.bytes)} ({self.budget.source}): {mode}; "
            f"in-memory build needs {format_size(self.resident_bytes)}, planned anonymous "
            f"{format_size(self.anonymous_bytes)}; block {self.block_size}, tile {self.tile}, "
            f"stripe {self.stripe}, chunk {self.chunk}, shard {self.shard_rows} rows"
        )


RESIDENT_SLACK = 1.5
"""The in-memory build's peak over its formula: measured 1.42x (220 MiB for 155 MiB) at
30,000 x 256 with an IVF64,Flat graph and an IVF64,SQ8 serving index (bench_out_of_core.py)."""


def resident_bytes(w: Workload) -> int:
    """What today's in-memory build holds at its peak (README "Peak memory"), with RESIDENT_SLACK."""
    rows = 2 * w.n * w.d * 4
    graph = (w.workers + 1) * w.n * w.k * 12
    working = w.block_size * w.k * 8 + EXPAND_CHUNK * w.k * w.d * 8
    formula = rows + graph + working + w.knn_index_bytes + w.serving_index_bytes
    return BASE_BYTES + int(RESIDENT_SLACK * formula)


def plan_build(budget: Budget, w: Workload) -> Plan:
    """Plan ``w`` inside ``budget``: resident when it fits, else out of core (module formula).

    Raises :class:`BudgetError` naming the phase and the budget it needs when one cannot fit.
    """
    need = resident_bytes(w)
    tile = min(TILES[0], w.block_size)
    if need <= budget.bytes:
        return Plan(budget, True, need, need, w.block_size, tile, w.n, EXPAND_CHUNK, w.n)
    work = budget.bytes - BASE_BYTES
    if work < MIN_WORK_BYTES:
        raise BudgetError(
            f"memory budget {format_size(budget.bytes)} ({budget.source}) leaves no room to work: "
            f"the builder needs at least {format_size(BASE_BYTES + MIN_WORK_BYTES)}"
        )
    cache = work // 2  # the page cache's share: the mapped rows a phase is working through
    work -= cache
    for what, why, size in (
        ("kNN index", w.knn_in_memory_only, w.knn_index_bytes),
        ("serving index", w.serving_in_memory_only, w.serving_index_bytes),
    ):
        if why is not None and size > work // 2:
            raise BudgetError(
                f"the {what} must be held in memory ({why}): it needs {format_size(size)}, more than "
                f"half of what the budget {format_size(budget.bytes)} ({budget.source}) leaves after "
                f"{format_size(BASE_BYTES)} of base and the page cache's half; needs a budget of at "
                f"least {format_size(BASE_BYTES + 4 * size)}, or use an IVF index (its lists go on disk)"
            )
    train = w.train_rows * (4 * w.d + 16) + w.nlist * w.d * 8
    direct_map = w.n * 8 if w.nlist else 0
    for what, size, part in (
        (f"the IVF training sample ({w.train_rows} rows) and {w.nlist} centroids", train, 1),
        ("the serving IVF's direct map (8 bytes a row)", direct_map, 2),
    ):
        if size > work // part:
            raise BudgetError(
                f"{what} need {format_size(size)}, more than the budget {format_size(budget.bytes)} "
                f"({budget.source}) allows; needs a budget of at least "
                f"{format_size(BASE_BYTES + 2 * part * size)}"
                + (" (or a smaller --train-size)" if part == 1 else "")
            )
    tile = next((t for t in TILES if t <= w.block_size and w.workers * 5 * t * t <= work // 4), 0)
    if tile == 0:
        smallest = TILES[-1]
        raise BudgetError(
            f"kNN tiles of {smallest} rows on {w.workers} workers need "
            f"{format_size(w.workers * 5 * smallest**2)}, more than the budget "
            f"{format_size(budget.bytes)} allows; fewer --threads or a larger budget"
        )
    stripe = max(1, min(w.n, (work // 2) // (w.workers * w.k * 12 + 4 * w.nprobe + 4)))
    stripe = min(stripe, max(1, cache // 2 // (4 * w.d)))  # a stripe's rows stay in the page cache
    if stripe < w.n:
        stripe = max(tile, stripe // tile * tile)
    chunk = max(1, min(EXPAND_CHUNK, (work // 8) // (w.k * w.d * 12 + w.d * 8)))
    expand_stripe = max(1, min(w.n, (work // 2) // (8 * w.d + 24 * w.k)))
    block = max(1, min(w.block_size, (work // 4) // (w.d * 12)))
    shard = max(1, min(w.n, (work // 2) // (w.code_size + 8 + 4 * w.d))) if w.code_size else w.n
    knn_phase = w.workers * 5 * tile * tile + stripe * (w.workers * w.k * 12 + 4 * w.nprobe)
    anonymous = BASE_BYTES + max(
        knn_phase,
        train,
        chunk * (w.k * w.d * 12 + w.d * 8) + expand_stripe * (8 * w.d + 24 * w.k),
        block * w.d * 12,
        shard * (w.code_size + 8 + 4 * w.d) if w.code_size else 0,
        direct_map,
    )
    return Plan(budget, False, need, anonymous, block, tile, stripe, chunk, shard, expand_stripe)
