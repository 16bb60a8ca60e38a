"""The tile worker pool: every task runs once, errors reach the caller, progress adds up."""

from __future__ import annotations

import threading

import pytest

from index_builder.pool import Ticker, run_tiles


@pytest.mark.parametrize("workers", [1, 2])
def test_every_task_runs_once_on_a_worker_slot(workers):
    seen: list[tuple[int, int]] = []
    done: list[int] = []
    lock = threading.Lock()

    def work(task: int, slot: int) -> None:
        with lock:
            seen.append((task, slot))

    run_tiles(list(range(20)), work, workers, done.append)
    assert sorted(t for t, _ in seen) == list(range(20)) == sorted(done)
    assert {s for _, s in seen} <= set(range(workers))


def test_worker_errors_reach_the_caller():
    def boom(task, slot):
        raise RuntimeError(f"tile {task}")

    with pytest.raises(RuntimeError, match="tile"):
        run_tiles([1, 2, 3], boom, 2, lambda t: None)


def test_ticker_reports_exactly_n_rows():
    rows: list[int] = []
    tick = Ticker(rows.append, 7, 1000)
    for units in (1, 333, 3, 600, 63):
        tick(units)
    assert sum(rows) == 7 and all(r > 0 for r in rows)
