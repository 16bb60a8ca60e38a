"""HTTP conventions of the service (TestClient, lifespan runs): media types, /info privacy, docs."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from aqe_retrieval import artifact
from aqe_retrieval.status import Failure, NightlyStatus
from service.app import create_app
from service.settings import Settings

ADMIN = {"Authorization": "Bearer t0ken"}


@pytest.fixture(scope="module")
def client(built_root):
    with TestClient(
        create_app(Settings(index_root=built_root, reload_interval_s=0, admin_token="t0ken"))
    ) as c:
        yield c


def test_info_shows_hosts_pids_and_error_texts_only_to_admins(tmp_path, built_root):
    root = tmp_path / "root"
    root.mkdir()
    (root / "current").write_text("no-such-version\n")
    failed = datetime.now(UTC)
    artifact.write_status(
        root,
        NightlyStatus(
            host="build-host-7",
            pid=4242,
            last_run_started=failed,
            last_failure=Failure(time=failed, error="OSError: /secret/path/gallery.npy"),
        ),
    )
    settings = Settings(index_root=root, reload_interval_s=0, admin_token="t0ken")
    with TestClient(create_app(settings)) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            public = c.get("/info", headers=headers)
            assert public.status_code == 200
            text = public.text
            assert "build-host-7" not in text and "4242" not in text and "/secret/path" not in text
            info = public.json()
            assert "host" not in info["nightly"] and "pid" not in info["nightly"]
            assert info["nightly"]["last_failure"]["time"]
            assert "error" not in info["last_reload_failure"] and info["last_reload_failure"]["at"]
        private = c.get("/info", headers=ADMIN).json()
        assert private["nightly"]["host"] == "build-host-7" and private["nightly"]["pid"] == 4242
        assert "/secret/path" in private["nightly"]["last_failure"]["error"]
        assert private["last_reload_failure"]["error"]
