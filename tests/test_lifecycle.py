"""Shutdown and failure under a live stream: SIGTERM drains in-flight streams, then aborts what is left with
an in-band error; an engine that dies mid-stream ends the stream with an error event, and the health
endpoints say so."""

from __future__ import annotations

import json
import signal
import time

import httpx
import psutil
import pytest
from conftest import ROOT, free_port, running
from test_api import MODEL

pytestmark = pytest.mark.slow


def serve(port: int, *args: str) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "limbic"), "serve", "--port", str(port), *args]


def open_stream(url: str, max_tokens: int) -> tuple[httpx.Client, httpx.Response]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    client = httpx.Client(timeout=120)
    response = client.send(client.build_request("POST", f"{url}/v1/chat/completions", json=body), stream=True)
    return client, response


def events(lines) -> list:
    for line in lines:
        if line.startswith("data: "):
            yield "[DONE]" if line == "data: [DONE]" else json.loads(line[6:])


def exited(process, timeout: float) -> int | None:
    try:
        return process.wait(timeout=timeout)
    except Exception:
        return None


@pytest.mark.parametrize("drain_s", [60, 1])
def test_sigterm_drains_streams_then_aborts_the_rest(drain_s):
    port = free_port()
    env = {"LIMBIC_ENGINE": "transformers", "LIMBIC_SHUTDOWN_DRAIN_S": str(drain_s)}
    with running(serve(port), f"http://127.0.0.1:{port}/healthz", env) as process:
        client, response = open_stream(f"http://127.0.0.1:{port}", max_tokens=48 if drain_s > 1 else 4000)
        received = events(response.iter_lines())
        first = next(received)
        assert first["choices"][0]["delta"]["role"] == "assistant"
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        rest = list(received)
        client.close()
        if drain_s > 1:  # the stream had time to finish: whole, then [DONE]
            assert rest[-1] == "[DONE]"
            assert rest[-2]["choices"][0]["finish_reason"] == "length"
        else:  # aborted at the deadline, and the client is told why
            assert rest[-1]["error"]["code"] == "shutting_down", rest[-3:]
        # uvicorn re-raises the signal once shut down: killed by SIGTERM is its clean exit
        assert exited(process, 30) in (0, -signal.SIGTERM)


def test_an_engine_that_dies_mid_stream_ends_it_with_an_error_event():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(serve(port), f"{url}/healthz", {}) as process:
        client, response = open_stream(url, max_tokens=4000)
        received = events(response.iter_lines())
        next(received)
        engines = [p for p in psutil.Process(process.pid).children(recursive=True) if "EngineCore" in p.name()]
        assert engines, "no vLLM engine process found"
        for engine in engines:
            engine.kill()
        rest = list(received)
        client.close()
        assert "error" in rest[-1] and rest[-1]["error"]["type"] == "server_error", rest[-3:]
        deadline = time.monotonic() + 30
        while (ready := httpx.get(f"{url}/readyz")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ready.status_code == 503 and ready.json()["checks"]["engine"] != "ok"
        assert httpx.get(f"{url}/healthz").status_code == 503  # a restart is the cure
