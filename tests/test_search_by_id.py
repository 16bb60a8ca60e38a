"""Search by gallery id, min_score and mode "raw" over HTTP: TestClient and a real process."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import serving

from aqe_retrieval import artifact
from aqe_retrieval.searcher import Searcher
from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client(built_root):
    settings = Settings(index_root=built_root, reload_interval_s=0, max_k=50, max_batch=8)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def searcher(built_root) -> Searcher:
    return Searcher(artifact.load(built_root))


def hits(r: httpx.Response) -> list[list[tuple[str, float]]]:
    assert r.status_code == 200, r.text
    return [[(h["id"], h["score"]) for h in row] for row in r.json()["results"]]


def test_an_id_searches_with_that_items_own_raw_vector(client, searcher):
    row = searcher.row_of("img-00042")
    own = searcher.raw_rows([row])[0].tolist()
    by_id = hits(client.post("/search", json={"id": "img-00042", "k": 5}))
    by_vector = hits(client.post("/search", json={"embedding": own, "k": 5}))
    assert by_id == by_vector and by_id[0][0][0] == "img-00042"
    batch = hits(client.post("/search", json={"ids": ["img-00042", "img-00007"], "k": 3}))
    assert [i for i, _ in batch[0]] == [i for i, _ in by_id[0][:3]] and batch[1][0][0] == "img-00007"
    # a batch is one GEMM, a single query a GEMV: the same cosines up to float32 rounding
    np.testing.assert_allclose([s for _, s in batch[0]], [s for _, s in by_id[0][:3]], atol=1e-6)


@pytest.mark.parametrize(
    "body",
    [{"id": "nobody"}, {"ids": ["img-00001", "nobody"]}, {"id": "x" * 1000}],
)
def test_an_unknown_id_is_a_404_that_names_it(client, body):
    r = client.post("/search", json=body)
    assert r.status_code == 404, r.text
    assert "no gallery item" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"id": "img-00001", "embedding": [1.0] * 32}, "exactly one"),
        ({"ids": ["img-00001"], "id": "img-00002"}, "exactly one"),
        ({"ids": []}, "'ids' is empty"),
        ({"ids": ["img-00001"] * 9}, "over the limit of 8"),
        ({"id": "img-00001", "min_score": "NaN"}, "min_score must be a finite number"),
        ({"id": "img-00001", "min_score": "Infinity"}, "min_score must be a finite number"),
        ({"id": "img-00001", "mode": "raw", "expand_query": True}, 'mode "raw"'),
    ],
)
def test_bad_id_requests_are_a_400_that_says_why(client, body, message):
    raw = str(body).replace("'", '"').replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
    raw = raw.replace("True", "true")
    r = client.post("/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"]


def test_an_unknown_mode_is_a_422(client):
    r = client.post("/search", json={"id": "img-00001", "mode": "hybrid"})
    assert r.status_code == 422


def test_min_score_drops_the_hits_below_it_per_request(client):
    full = hits(client.post("/search", json={"id": "img-00010", "k": 20}))[0]
    cut = full[6][1]
    kept = hits(client.post("/search", json={"id": "img-00010", "k": 20, "min_score": cut}))[0]
    assert kept == [h for h in full if h[1] >= cut] and len(kept) < len(full)
    assert hits(client.post("/search", json={"id": "img-00010", "min_score": 1.5}))[0] == []


def test_min_score_applies_to_its_own_request_inside_a_batch(client):
    """Concurrent requests share one FAISS call; each keeps its own floor."""
    import concurrent.futures

    bodies = [{"id": f"img-{i:05d}", "k": 10, "min_score": 0.0 if i % 2 else 1.5} for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: client.post("/search", json=b), bodies))
    for i, r in enumerate(answers):
        [row] = hits(r)
        assert (len(row) == 10) if i % 2 else (row == [])


def test_mode_raw_is_plain_knn_and_differs_from_aqe(client, searcher):
    raw = hits(client.post("/search", json={"id": "img-00005", "k": 10, "mode": "raw"}))[0]
    want = searcher.search(searcher.raw_rows([searcher.row_of("img-00005")]), 10, raw=True)[0]
    assert [i for i, _ in raw] == [searcher.external_id(h.row) for h in want]
    np.testing.assert_allclose([s for _, s in raw], [h.score for h in want], atol=1e-6)
    aqe = hits(client.post("/search", json={"id": "img-00005", "k": 10}))[0]
    unexpanded = hits(client.post("/search", json={"id": "img-00005", "k": 10, "expand_query": False}))[0]
    assert len({tuple(aqe), tuple(unexpanded), tuple(raw)}) == 3  # three different searches
    no_expand = {"id": "img-00005", "k": 10, "mode": "raw", "expand_query": False}
    assert hits(client.post("/search", json=no_expand))[0] == raw


def test_openapi_documents_ids_min_score_mode_and_the_404(client):
    doc = client.get("/openapi.json").json()
    post = doc["paths"]["/search"]["post"]
    assert "404" in post["responses"]
    body = post["requestBody"]["content"]["application/json"]
    props = body["schema"]["properties"]
    assert {"id", "ids", "min_score", "mode"} <= set(props)
    examples = body["examples"]
    by_id = [e["value"] for e in examples.values() if "id" in e["value"]]
    assert by_id and by_id[0]["id"] == client.app.state.manager.searcher.external_id(0)
    for example in examples.values():  # every example is answered with a 200
        assert client.post("/search", json=example["value"]).status_code == 200


def test_search_by_id_through_a_real_search_service(built_root, tmp_path):
    env = {"AQE_INDEX_ROOT": str(built_root), "AQE_RELOAD_INTERVAL_S": "0"}
    with serving(tmp_path / "server.log", env=env) as url:
        ok = httpx.post(f"{url}/search", json={"ids": ["img-00003", "img-00004"], "k": 3, "min_score": 0.5})
        assert [row[0]["id"] for row in ok.json()["results"]] == ["img-00003", "img-00004"]
        assert all(h["score"] >= 0.5 for row in ok.json()["results"] for h in row)
        missing = httpx.post(f"{url}/search", json={"id": "img-99999"})
        assert missing.status_code == 404 and "img-99999" in missing.json()["detail"]
        raw = httpx.post(f"{url}/search", json={"id": "img-00003", "mode": "raw", "k": 2})
        assert raw.status_code == 200 and raw.json()["results"][0][0]["id"] == "img-00003"
