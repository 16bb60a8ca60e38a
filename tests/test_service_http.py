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


@pytest.mark.parametrize(
    ("content", "ctype"),
    [
        (b'{"embedding": [1.0], "k": 1}', "text/plain"),
        (b"embedding=1&k=1", "application/x-www-form-urlencoded"),
        (b'{"embedding": [1.0], "k": 1}', None),
        (b"--b\r\n\r\n{}\r\n--b--", "multipart/form-data; boundary=b"),
    ],
    ids=["text-plain", "form", "undeclared", "multipart"],
)
def test_a_body_not_declared_json_gets_415(client, content, ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = client.post("/search", content=content, headers=headers)
    assert r.status_code == 415, r.text
    assert "application/json" in r.json()["detail"]
    r = client.post("/admin/reload", content=content, headers={**headers, **ADMIN})
    assert r.status_code == 415, r.text


def test_json_media_types_are_accepted(client, small_gallery):
    x, _ = small_gallery
    body = f'{{"embedding": {x[3].tolist()}, "k": 2}}'.encode()
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert client.post("/search", content=body, headers={"content-type": ctype}).status_code == 200
    # an admin POST needs no body at all (curl -X POST), or a JSON one
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200
    assert client.post("/admin/reload", json={}, headers=ADMIN).status_code == 200


def test_openapi_lists_every_status_and_the_served_dimension(client):
    doc = client.get("/openapi.json").json()
    search = doc["paths"]["/search"]["post"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(search["responses"])
    assert "Retry-After" in search["responses"]["503"]["headers"]
    assert {"200", "401", "404", "409", "415"} <= set(doc["paths"]["/admin/reload"]["post"]["responses"])
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]
    body = search["requestBody"]["content"]["application/json"]
    assert dimensions(body) == (32, 32)
    assert body["examples"]
    for example in body["examples"].values():  # every example is answered
        r = client.post("/search", json=example["value"])
        assert r.status_code == 200, (example, r.text)


def dimensions(body: dict) -> tuple[int, int]:
    props = body["schema"]["properties"]
    [one] = [s for s in props["embedding"]["anyOf"] if s.get("type") == "array"]
    [batch] = [s for s in props["embeddings"]["anyOf"] if s.get("type") == "array"]
    assert one["minItems"] == one["maxItems"] and batch["items"]["minItems"] == batch["items"]["maxItems"]
    return one["maxItems"], batch["items"]["maxItems"]


def test_openapi_follows_a_reload_to_another_dimension(tmp_path, small_gallery):
    from helpers import clustered_data, write_gallery

    from index_builder.cli import main as builder

    root = tmp_path / "root"
    _, paths = small_gallery
    assert builder(["build", "--gallery", str(paths["gallery"]), "--root", str(root), "--no-progress"]) == 0
    with TestClient(create_app(Settings(index_root=root, reload_interval_s=0, admin_token="t0ken"))) as c:
        body = lambda: c.get("/openapi.json").json()["paths"]["/search"]["post"]["requestBody"]  # noqa: E731
        assert dimensions(body()["content"]["application/json"]) == (32, 32)
        small = write_gallery(tmp_path / "g16", clustered_data(120, 16, seed=5), with_metadata=False)
        assert (
            builder(["build", "--gallery", str(small["gallery"]), "--root", str(root), "--no-progress"]) == 0
        )
        assert c.post("/admin/reload", headers=ADMIN).json()["status"] == "loaded"
        content = body()["content"]["application/json"]
        assert dimensions(content) == (16, 16)
        for example in content["examples"].values():
            assert c.post("/search", json=example["value"]).status_code == 200


@pytest.mark.parametrize(
    ("page", "assets"),
    [("/docs", ["swagger-ui-bundle.js", "swagger-ui.css"]), ("/redoc", ["redoc.standalone.js"])],
)
def test_docs_pages_load_their_assets_from_the_service(client, page, assets):
    html = client.get(page)
    assert html.status_code == 200
    assert "http://" not in html.text and "https://" not in html.text  # no CDN, no fonts
    for asset in assets:
        assert f"/docs-static/{asset}" in html.text
        r = client.get(f"/docs-static/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000
