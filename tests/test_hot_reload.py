"""Hot reload under load: every request succeeds and names a version current while it ran."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi.testclient import TestClient

from aqe_retrieval import artifact
from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.expansion import AqeParams
from service.app import create_app
from service.settings import Settings


def test_swaps_under_concurrent_searches(tmp_path, small_gallery):
    x, paths = small_gallery
    root = tmp_path / "root"

    def publish() -> str:
        return build(
            BuildConfig(
                gallery=paths["gallery"],
                ids=paths["ids"],
                root=root,
                params=AqeParams(qe_k=5),
                keep=10,
                show_progress=False,
            )
        ).version

    def published() -> tuple[float, float, str]:
        # the build's start and end: the version becomes current somewhere between them
        t0 = time.monotonic()
        version = publish()
        return t0, time.monotonic(), version

    history: list[tuple[float, float, str]] = [published()]
    settings = Settings(index_root=root, reload_interval_s=0.05, admin_token="tok")
    stop = threading.Event()
    with TestClient(create_app(settings)) as client:

        def worker(seed: int) -> list[tuple[float, float, int, str | None]]:
            rng = np.random.default_rng(seed)
            out = []
            while not stop.is_set():
                t0 = time.monotonic()
                r = client.post("/search", json={"embedding": x[rng.integers(len(x))].tolist(), "k": 5})
                version = r.json().get("index_version") if r.status_code == 200 else None
                out.append((t0, time.monotonic(), r.status_code, version))
            return out

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(worker, s) for s in range(6)]
            for i in range(4):
                time.sleep(0.3)
                history.append(published())
                if i == 1:  # a broken version: refused, the previous one keeps serving
                    t_broken = time.monotonic()
                    broken = publish()
                    (root / "versions" / broken / "serving.faiss").write_bytes(b"broken")
                    history.append((t_broken, time.monotonic(), broken))
                    time.sleep(0.3)
                    assert client.get("/info").json()["last_reload_failure"]["version"] == broken
                    r = client.post("/admin/reload", headers={"Authorization": "Bearer tok"})
                    assert r.status_code == 409
                    time.sleep(0.1)
                    history.append(published())
            time.sleep(0.5)
            stop.set()
            results = [r for f in futures for r in f.result()]
        served_last = client.get("/info").json()["index_version"]
        metrics = client.get("/metrics").text

    assert len(results) > 50
    assert all(status == 200 for _, _, status, _ in results), {s for *_, s, _ in results}
    # each response names a version that was current during the request: its build had started
    # before the request ended, and the next good version's build had not finished long before
    # the request began (the watcher polls every 50 ms, so "long" is a generous 1 s; timing from
    # the build's end, not its start, so a slow build on a loaded machine does not count)
    good = [(t0, t1, v) for t0, t1, v in history if v != broken]
    started = {v: t0 for t0, _, v in good}
    replaced = {v: good[i + 1][1] for i, (_, _, v) in enumerate(good[:-1])}
    for t0, t1, _, version in results:
        assert version != broken and version in started
        assert started[version] <= t1
        assert replaced.get(version, float("inf")) > t0 - 1.0
    assert served_last == history[-1][2]
    assert "aqe_reload_failures_total" in metrics and artifact.current_version(root) == served_last
