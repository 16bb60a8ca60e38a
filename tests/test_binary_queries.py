"""Binary query bodies on /search: float32 (application/octet-stream) and .npy (application/x-npy)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

FLOAT32 = {"content-type": "application/octet-stream"}
NPY = {"content-type": "application/x-npy"}


@pytest.fixture(scope="module")
def client(built_root):
    settings = Settings(index_root=built_root, reload_interval_s=0, max_k=50, max_batch=8)
    with TestClient(create_app(settings)) as c:
        yield c


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def results(r):
    assert r.status_code == 200, r.text
    return [[h["id"] for h in row] for row in r.json()["results"]]


def test_float32_and_npy_bodies_answer_what_json_does(client, small_gallery):
    x, _ = small_gallery
    q = (x[[3, 40, 41]] + 0.01).astype(np.float32)
    want = results(client.post("/search", json={"embeddings": q.tolist(), "k": 4}))
    assert results(client.post("/search?k=4", content=q.tobytes(), headers=FLOAT32)) == want
    assert results(client.post("/search?k=4", content=npy(q), headers=NPY)) == want
    assert results(client.post("/search?k=4", content=npy(q.astype(np.float64)), headers=NPY)) == want
    one = results(client.post("/search?k=4", content=npy(q[0]), headers=NPY))
    assert one == want[:1]


def test_binary_requests_take_every_option_from_the_query_string(client, small_gallery):
    x, _ = small_gallery
    q = (x[7] + 0.01).astype(np.float32)
    flt = json.dumps({"camera": {"in": [1, 2]}})
    params = {"k": "5", "mode": "raw", "with_metadata": "true", "filter": flt, "min_score": "0.1"}
    r = client.post("/search", params=params, content=q.tobytes(), headers=FLOAT32)
    body = {"embedding": q.tolist(), "k": 5, "mode": "raw", "with_metadata": True}
    want = client.post("/search", json={**body, "filter": json.loads(flt), "min_score": 0.1})
    assert r.status_code == 200 and r.json() == want.json()
    assert all(h["metadata"]["camera"] in (1, 2) for h in r.json()["results"][0])
    unexpanded = client.post("/search?expand_query=false", content=q.tobytes(), headers=FLOAT32)
    assert (
        unexpanded.json()
        == client.post("/search", json={"embedding": q.tolist(), "expand_query": False}).json()
    )


@pytest.mark.parametrize(
    ("path", "content", "headers", "status", "message"),
    [
        ("/search", np.ones(31, np.float32).tobytes(), FLOAT32, 400, "not a whole number of rows"),
        ("/search", b"", FLOAT32, 400, "holds no queries"),
        ("/search", np.ones((9, 32), np.float32).tobytes(), FLOAT32, 400, "over the limit of 8"),
        ("/search", np.full(32, np.nan, np.float32).tobytes(), FLOAT32, 400, "NaN or Inf"),
        ("/search", np.zeros(32, np.float32).tobytes(), FLOAT32, 400, "all zeros"),
        ("/search?k=0", np.ones(32, np.float32).tobytes(), FLOAT32, 400, "k must be between"),
        ("/search?k=many", np.ones(32, np.float32).tobytes(), FLOAT32, 422, "valid integer"),
        ("/search?bogus=1", np.ones(32, np.float32).tobytes(), FLOAT32, 422, "Extra inputs"),
        ("/search?id=img-00001", np.ones(32, np.float32).tobytes(), FLOAT32, 400, "cannot be a parameter"),
        ("/search?filter=%7Bx", np.ones(32, np.float32).tobytes(), FLOAT32, 400, "JSON object"),
        ("/search", npy(np.ones((2, 31), np.float32)), NPY, 400, "dimension 31 does not match"),
        ("/search", npy(np.ones((2, 32), np.int64)), NPY, 400, "float32 or float64"),
        ("/search", npy(np.ones((1, 2, 32), np.float32)), NPY, 400, "(d,) or (m, d)"),
        ("/search", npy(np.array([{"a": 1}], dtype=object)), NPY, 400, "not one .npy array"),
        ("/search", b"\x93NUMPY garbage", NPY, 400, "not one .npy array"),
    ],
)
def test_bad_binary_requests_get_a_4xx_that_says_why(client, path, content, headers, status, message):
    r = client.post(path, content=content, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.text


def test_other_media_types_are_still_415_and_name_the_accepted_ones(client):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "image/png"):
        r = client.post("/search", content=np.ones(32, np.float32).tobytes(), headers={"content-type": ctype})
        assert r.status_code == 415
        detail = r.json()["detail"]
        assert "application/json" in detail and "application/octet-stream" in detail


def test_openapi_lists_the_binary_encodings(client):
    body = client.get("/openapi.json").json()["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/octet-stream", "application/x-npy"} <= set(body)
