"""The service's one settings object: environment variables prefixed ``AQE_``, validated at start."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_local_copy_dir() -> Path:
    """``$TMPDIR/aqe-local-copy-<uid>``: one per user, so no other user's directory is trusted."""
    return Path(tempfile.gettempdir()) / f"aqe-local-copy-{os.geteuid()}"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; not a container's CPU quota)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Every knob of the search service; a bad value stops start-up with a clear message."""

    model_config = SettingsConfigDict(env_prefix="AQE_", extra="ignore", frozen=True)

    index_root: Path = Field(description="directory the index builder publishes into")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=1, le=65535)
    admin_token: SecretStr | None = Field(
        None, description="bearer token of /admin routes; unset: admin routes are off"
    )
    allow_writes: bool = Field(
        False,
        description="serve POST/DELETE /admin/items (add/delete gallery items; needs "
        "AQE_ADMIN_TOKEN and a writable index root); off: they answer 404",
    )
    write_keep: int = Field(3, ge=1, description="versions kept when /admin/items publishes one")
    reload_interval_s: float = Field(5.0, ge=0.0, description="poll of 'current'; 0 disables")
    max_k: int = Field(100, ge=1, le=10_000)
    max_batch: int = Field(256, ge=1, le=100_000)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body size limit")
    threads: int = Field(1, ge=1, le=1024, description="FAISS OpenMP threads per search")
    batch_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="threads running batched searches (concurrent requests are "
        "gathered into one FAISS call per worker)",
    )
    search_on_loop: Literal["auto", "on", "off"] = Field(
        "auto",
        description="search cheap unfiltered queries on the event loop's own thread, batching "
        "those that arrived in the same turn of the loop, instead of handing them to the "
        "search threads: faster when every core has its own worker process, slower when one "
        "process must use several cores; auto: on when AQE_WORKERS is at least the cores "
        "this process may run on",
    )
    max_queue: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description="requests waiting for a search thread, per queue (unfiltered, filtered); "
        "past it a search is answered 503 with Retry-After",
    )
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="deadline of a search from when its handler starts (after its body is "
        "read): 503 with Retry-After past it, and its queued work is dropped",
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="time a client has to send a request's headers and body, from its first "
        "byte (search-service's HTTP protocol); past it the connection is closed",
    )
    verify_checksums: bool = Field(True, description="recompute checksums when loading a version")
    mmap: bool = Field(True, description="memory-map the level arrays instead of reading them")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes")
    stale_after_s: float = Field(
        36 * 3600.0, gt=0, description="the nightly build is stale after this long without success"
    )
    max_index_bytes: int | None = Field(
        None,
        ge=1,
        description="memory budget of one loaded version (sum of its files' sizes in "
        "the manifest); a bigger version is refused before it is loaded; unset: no limit",
    )

    local_copy_dir: Path | None = Field(
        default_factory=default_local_copy_dir,
        description="node-local directory (a disk, not a tmpfs) where each served version is "
        "copied and verified before it is memory-mapped, so files truncated or deleted in the "
        "shared index root cannot crash the service (SIGBUS); costs one more copy of the "
        "version on local disk; 'off' serves the index root's files in place",
    )
    max_filter_values: int = Field(
        1024, ge=1, le=1_000_000, description="values in one filter condition ('in', 'not_in')"
    )

    @field_validator("local_copy_dir", mode="before")
    @classmethod
    def _off_serves_in_place(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "off":
            return None
        if isinstance(value, str) and not value.strip():  # blank: the default
            return default_local_copy_dir()
        return value

    metrics_dir: Path | None = Field(
        None,
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description="set by search-service for AQE_WORKERS > 1 (a fresh private directory): "
        "the workers' shared metrics files and reload counter; not a setting to give",
    )

    def searches_on_loop(self) -> bool:
        """Whether :attr:`search_on_loop` is on here (``auto``: a worker per usable core or more)."""
        if self.search_on_loop != "auto":
            return self.search_on_loop == "on"
        return self.workers >= usable_cores()

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        # AQE_ADMIN_TOKEN="" must not switch admin routes on with an empty bearer token.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("max_index_bytes", mode="before")
    @classmethod
    def _empty_budget_is_unset(cls, value: object) -> object:
        # AQE_MAX_INDEX_BYTES="" (a blank value in a compose or k8s file) means no budget.
        return None if isinstance(value, str) and not value.strip() else value
