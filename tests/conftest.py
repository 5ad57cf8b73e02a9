from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model's safetensors folder (materialised once per machine)."""
    from monitors import model_source

    return model_source.resolve(None).path


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run scripts/setup --test")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="limbic-redis-")
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    stop(process)
    shutil.rmtree(workdir, ignore_errors=True)


# Low enough that a desperate prompt crosses it, high enough that the neutral prompts in the tests do not.
TEST_ALERT_RULES = '{"desperate": {"warning": 1.5, "critical": 3.0, "min_tokens": 2}}'


def start_limbic(port: int, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "limbic"), "serve", "--port", str(port), *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="session")
def limbic_url(redis_url: str, default_model_path: Path) -> Iterator[str]:
    port = free_port()
    process = start_limbic(port, {"REDIS_URL": redis_url, "LIMBIC_ALERT_RULES": TEST_ALERT_RULES})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process)
    except Exception:
        stop(process)
        print(process.stdout.read())
        raise
    yield f"http://127.0.0.1:{port}"
    stop(process)


@pytest.fixture()
def client(limbic_url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{limbic_url}/v1", api_key="unused", max_retries=0, timeout=120)
