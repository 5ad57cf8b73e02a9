"""Liveness and readiness: /readyz says which part cannot serve (here: the alert sink's Redis going away)."""

from __future__ import annotations

import time

from conftest import redis_server
from fastapi.testclient import TestClient
from limbic.service.app import create_app
from limbic.service.config import Settings


def test_ready_until_redis_goes_away(engine):
    with redis_server() as url:
        http = TestClient(create_app(Settings(redis_url=url), engine))
        http.__enter__()
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"engine": "ok", "alert_sink": "ok", "alert_spool": "ok"}
    # The server is gone: not ready, and the reason names the sink; liveness is unaffected.
    gone = http.get("/readyz")
    assert gone.status_code == 503 and gone.json()["status"] == "not ready"
    assert gone.json()["checks"]["engine"] == "ok" and "redis unreachable" in gone.json()["checks"]["alert_sink"]
    assert http.get("/healthz").status_code == 200
    # What lives in Redis says it is unavailable (not a 500); serving goes on, its alerts held in the spool.
    for path in ("/v1/alerts", "/v1/reviews", "/v1/conversations"):
        down = http.get(path)
        assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable", path
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    started = time.monotonic()
    served = http.post("/v1/chat/completions", json=chat, headers={"X-Limbic-Conversation": "c-1"})
    assert served.status_code == 200 and time.monotonic() - started < 2.0  # the store's timeouts hold nothing
    http.__exit__(None, None, None)


def test_ready_without_redis(engine):
    with TestClient(create_app(Settings(), engine)) as http:
        assert http.get("/readyz").json() == {
            "status": "ready",
            "engine": "transformers",
            "checks": {"engine": "ok", "alert_sink": "ok"},
        }
