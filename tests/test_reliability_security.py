"""Security: admin routes behind a constant-time bearer check, nothing unpickled, no eval, pins.

Service-level refusals of hostile artifacts (an object-dtype ``.npy``, a ``current`` that points
outside the root) are in ``test_reliability_corrupt.py``.
"""

from __future__ import annotations

import inspect
import io
import re
import tokenize
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service import routes
from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-t0ken"


@pytest.fixture(scope="module")
def client(built_root):
    s = Settings(index_root=built_root, reload_interval_s=0, admin_token=TOKEN)
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"bearer {TOKEN}",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Bearer  {TOKEN}",
        f"Bearer {TOKEN} ",
        f"Bearer {TOKEN.upper()}",
    ],
)
def test_admin_reload_refuses_anything_but_the_exact_bearer_token(client, header):
    headers = {} if header is None else {"Authorization": header}
    r = client.post("/admin/reload", headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer" and r.json()["detail"]


def test_admin_reload_with_the_token(client):
    r = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["status"] == "loaded"
    assert client.get("/admin/reload").status_code == 405


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=40))
def test_fuzzed_authorization_headers_get_401_never_5xx(client, value):
    r = client.post("/admin/reload", headers={"Authorization": value.encode("latin-1")})
    assert r.status_code == (200 if value == f"Bearer {TOKEN}" else 401), r.text


def test_token_is_compared_in_constant_time():
    source = inspect.getsource(routes.is_admin)
    assert "hmac.compare_digest(" in source and "is_admin(" in inspect.getsource(routes.require_admin)
    assert not re.search(r"[!=]=\s*expected|expected\s*[!=]=", source)


@pytest.mark.parametrize("token", [None, "", "   ", "\t\n"])
def test_without_a_token_admin_routes_are_off(built_root, monkeypatch, token):
    monkeypatch.setenv("AQE_INDEX_ROOT", str(built_root))
    if token is None:
        monkeypatch.delenv("AQE_ADMIN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("AQE_ADMIN_TOKEN", token)
    settings_ = Settings()  # type: ignore[call-arg]
    assert settings_.admin_token is None
    with TestClient(create_app(settings_)) as c:
        for header in (
            {},
            {"Authorization": "Bearer "},
            {"Authorization": f"Bearer {token}"},
            {"Authorization": "Bearer None"},
        ):
            r = c.post("/admin/reload", headers=header)
            assert r.status_code == 404 and "AQE_ADMIN_TOKEN" in r.json()["detail"]


def test_the_token_never_shows_in_responses_or_reprs(client):
    for path in ("/info", "/metrics", "/openapi.json", "/readyz", "/healthz"):
        assert TOKEN not in client.get(path).text
    settings_ = client.app.state.settings
    assert TOKEN not in repr(settings_) and TOKEN not in str(settings_.model_dump())


def test_binds_loopback_by_default(tmp_path):
    assert Settings(index_root=tmp_path).host == "127.0.0.1"


def _code_tokens(path: Path) -> list[tokenize.TokenInfo]:
    """The tokens of a Python file, without comments and strings (docstrings may say 'pickle')."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return [t for t in tokens if t.type not in (tokenize.COMMENT, tokenize.STRING)]


SOURCES = sorted(
    p for pkg in ("aqe_retrieval", "index_builder", "service") for p in (REPO / pkg).rglob("*.py")
)
FORBIDDEN_NAMES = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "eval", "exec", "__import__"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_pickle_eval_or_exec_in_the_code(path):
    tokens = _code_tokens(path)
    names = {t.string for t in tokens if t.type == tokenize.NAME}
    assert not names & FORBIDDEN_NAMES, f"{path}: uses {sorted(names & FORBIDDEN_NAMES)}"
    for i, t in enumerate(tokens[:-2]):
        if t.string == "allow_pickle":
            assert tokens[i + 1].string == "=" and tokens[i + 2].string == "False", (
                f"{path}:{t.start[0]}: allow_pickle must be False"
            )
    text = path.read_text(encoding="utf-8")
    assert "allow_pickle=True" not in text and "yaml.load(" not in text


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_npy_load_refuses_pickles_explicitly(path):
    """``np.load`` defaults to allow_pickle=False today; every call still says so."""
    text = "".join(t.string + " " for t in _code_tokens(path))
    for call in re.finditer(r"np \. load \(", text):
        args = text[call.end() : call.end() + 300]
        assert "allow_pickle = False" in args.split(")")[0], f"{path}: np.load without allow_pickle"


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_constraints_pin_every_dependency_exactly():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(project["dependencies"] + project["optional-dependencies"]["test"])
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert m, f"constraints.txt: {line!r} is not an exact pin"
        name = m.group(1).lower().replace("_", "-")
        assert name not in pins, f"constraints.txt: {name} pinned twice"
        pins[name] = m.group(2)
    assert not wanted - set(pins), f"not pinned: {sorted(wanted - set(pins))}"
    assert "aqe-retrieval" not in pins  # the project itself is not a constraint
