"""API keys with scopes and the request body limit, on the real app (tiny random model, transformers engine),
driven through ASGI by the official openai client and plain HTTP."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from limbic.service.app import create_app
from limbic.service.config import Settings
from limbic.service.guard import hashed_line
from limbic.service.runtime import StartupError, key_ring
from openai import AuthenticationError, OpenAI, PermissionDeniedError

INFERENCE, ADMIN = "inference-key-1", "admin-key-1"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture()
def app_with(engine):
    clients = []

    def make(**settings) -> TestClient:
        client = TestClient(create_app(Settings(**settings), engine))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_inference_and_admin_scopes(app_with):
    http = app_with(api_keys=INFERENCE, admin_keys=ADMIN)
    for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {INFERENCE}"}):
        refused = http.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert http.post("/v1/chat/completions", json=CHAT, headers=bearer(INFERENCE)).status_code == 200
    assert http.post("/v1/chat/completions", json=CHAT, headers=bearer(ADMIN)).status_code == 200  # admin ⊇
    for path in ("/v1/alerts", "/v1/reviews", "/v1/conversations", "/v1/conversations/c-1"):
        denied = http.get(path, headers=bearer(INFERENCE))
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error", path
        assert http.get(path, headers=bearer(ADMIN)).status_code in (200, 404), path
    assert http.post("/v1/reviews/rev_x", json={"verdict": "confirmed"}, headers=bearer(INFERENCE)).status_code == 403
    for path in ("/metrics", "/health", "/healthz", "/ui/"):  # scrapers, probes and the page itself
        assert http.get(path).status_code == 200, path
    assert http.get("/uix").status_code == 401  # only the page's own paths are open
    for tricky in ("/v1/alerts/", "/v1/alerts?limit=1", "/v1/%61lerts"):
        assert http.get(tricky, headers=bearer(INFERENCE)).status_code in (403, 404), tricky


def test_the_openai_client_sends_its_key(app_with):
    http = app_with(api_keys=INFERENCE, admin_keys=ADMIN)

    def client(key: str) -> OpenAI:
        return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)

    assert client(INFERENCE).chat.completions.create(**CHAT).choices[0].message is not None
    with pytest.raises(AuthenticationError):
        client("not-a-key").models.list()
    with pytest.raises(PermissionDeniedError):
        client(INFERENCE).get("/alerts", cast_to=object)


def test_metrics_can_be_protected(app_with):
    http = app_with(admin_keys=ADMIN, protect_metrics=True)
    assert http.get("/metrics").status_code == 401
    assert http.get("/metrics", headers=bearer(ADMIN)).status_code == 200
    assert http.get("/healthz").status_code == 200


def test_key_files_hold_digests_only(app_with, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# inference keys\n{hashed_line(INFERENCE)}\n\n")
    http = app_with(api_keys_file=keys)
    assert http.post("/v1/chat/completions", json=CHAT, headers=bearer(INFERENCE)).status_code == 200
    assert INFERENCE not in keys.read_text()
    plain = tmp_path / "plain"
    plain.write_text(INFERENCE + "\n")
    with pytest.raises(StartupError, match=r"plain:1: expected `sha256:"):
        key_ring(Settings(api_keys_file=plain))
    with pytest.raises(StartupError, match="cannot read API keys"):
        key_ring(Settings(api_keys_file=tmp_path / "missing"))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::", "limbic.example"])
def test_no_keys_means_loopback_only(host):
    with pytest.raises(StartupError, match="--allow-unauthenticated"):
        key_ring(Settings(host=host))
    assert not key_ring(Settings(host=host, allow_unauthenticated=True)).enabled
    assert key_ring(Settings(host=host, api_keys=INFERENCE)).enabled
    for loopback in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert not key_ring(Settings(host=loopback)).enabled


def test_bodies_over_the_limit_get_a_413_before_parsing(app_with):
    http = app_with(max_body_bytes=2048)
    big = b"{" + b" " * 4096  # not even JSON: the limit answers first
    refused = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the running count decides
        for _ in range(8):
            yield b" " * 1024

    streamed = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "LIMBIC_MAX_BODY_BYTES" in streamed.json()["error"]["message"]
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200  # under it: served


def test_scopes_hold_under_a_mount_prefix(engine):
    app = create_app(Settings(api_keys=INFERENCE, admin_keys=ADMIN), engine)
    with TestClient(app, root_path="/limbic") as http:  # served behind a proxy at /limbic
        assert http.get("/limbic/v1/alerts", headers=bearer(INFERENCE)).status_code == 403
        assert http.get("/limbic/v1/alerts", headers=bearer(ADMIN)).status_code == 200
