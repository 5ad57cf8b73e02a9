"""Liveness and readiness: /readyz says which part cannot serve (here: the alert sink's Redis going away)."""

from __future__ import annotations

import pytest
from conftest import redis_server
from fastapi.testclient import TestClient
from tiny import tiny_engine

from service.app import create_app
from service.config import Settings


@pytest.fixture(scope="module")
def engine(default_model_path):
    with tiny_engine(default_model_path) as engine:
        yield engine


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
    http.__exit__(None, None, None)


def test_ready_without_redis(engine):
    with TestClient(create_app(Settings(), engine)) as http:
        assert http.get("/readyz").json() == {
            "status": "ready",
            "engine": "transformers",
            "checks": {"engine": "ok", "alert_sink": "ok"},
        }
