from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# Every vLLM server in the tests prefills at most 256 tokens per forward pass, so longer prompts are
# chunked (tested in test_vllm); one setting for all of them also means one torch.compile, then cache hits.
os.environ.setdefault("LIMBIC_VLLM_MAX_NUM_BATCHED_TOKENS", "256")
# Every forward pass in the tests' vLLM servers checks the plugin's host-side positions against the runner's.
os.environ.setdefault("LIMBIC_VLLM_VERIFY_POSITIONS", "1")
# The servers' alert spools go to a folder of this run, not the user's cache.
os.environ.setdefault("LIMBIC_ALERT_SPOOL_DIR", tempfile.mkdtemp(prefix="limbic-spool-"))


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
    """Stops a server; one started in its own session (``running``) takes its whole process group with it:
    vLLM's engine and worker processes outlive a server killed before it finished starting."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if getattr(process, "own_group", False):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model's safetensors folder (materialised once per machine)."""
    from limbic.monitors import model_source

    return model_source.resolve(None).path


@pytest.fixture(scope="module")
def engine(default_model_path: Path):
    """The transformers engine on a tiny random Llama (tests/tiny.py), one per test module; a module that
    needs another engine defines its own ``engine``."""
    from tiny import tiny_engine

    with tiny_engine(default_model_path) as engine:
        yield engine


@contextmanager
def redis_server(port: int | None = None, workdir: str | None = None, durable: bool = False) -> Iterator[str]:
    """A private redis-server for the block (a free port unless given); yields its URL. ``durable``: every
    write is in its append-only file, so a restart on the same port and folder keeps the data."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run scripts/setup --test")
    port = port or free_port()
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="limbic-redis-")
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence]
    process = subprocess.Popen([*command, "--dir", workdir], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process)
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


# Low enough that a desperate prompt crosses it, high enough that the neutral prompts in the tests do not.
TEST_ALERT_RULES = '{"desperate": {"warning": 1.5, "critical": 3.0, "min_tokens": 2}}'


@contextmanager
def running(args: list[str], ready_url: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Runs a server for the block, once ``ready_url`` answers; its output is printed if it fails to start.

    The output goes to a temporary file, not a pipe: a pipe nobody reads fills up and blocks a chatty server.
    """
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            args,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        process.own_group = True  # type: ignore[attr-defined]
        try:
            wait_http(ready_url, process)
        except Exception:
            stop(process)
            log.seek(0)
            print(log.read())
            raise
        try:
            yield process
        finally:
            stop(process)


@contextmanager
def running_limbic(env: dict[str, str], *args: str) -> Iterator[str]:
    """``limbic serve`` on a free port for the block; yields its base URL."""
    port = free_port()
    command = [str(ROOT / ".venv" / "bin" / "limbic"), "serve", "--port", str(port), *args]
    with running(command, f"http://127.0.0.1:{port}/healthz", env):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def limbic_url(request: pytest.FixtureRequest, default_model_path: Path) -> Iterator[str]:
    """The suite's server; LIMBIC_TEST_URL points the tests at one already running (while developing)."""
    if os.environ.get("LIMBIC_TEST_URL"):
        yield os.environ["LIMBIC_TEST_URL"]
        return
    redis_url = request.getfixturevalue("redis_url")
    with running_limbic({"REDIS_URL": redis_url, "LIMBIC_ALERT_RULES": TEST_ALERT_RULES}) as url:
        yield url


@pytest.fixture()
def client(limbic_url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{limbic_url}/v1", api_key="unused", max_retries=0, timeout=120)
