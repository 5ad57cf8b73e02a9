"""The transformers engine: one request at a time through a Hugging Face model, scored by a forward hook.

Generation runs on a single worker thread (the model is not re-entrant); steps cross to the event loop
through an asyncio queue. Good for research and any architecture transformers loads; vLLM serves traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import torch
from limbic.monitors.channel import Channel
from limbic.monitors.engine import SamplingParams, ScoredRows, Step, TokenLogprob
from limbic.monitors.hf import model as hf_model
from limbic.monitors.hf.constrained import GrammarCompiler, Matcher
from limbic.monitors.layers import decoder_layers
from limbic.monitors.mitigation import SteeringSchedule
from limbic.monitors.probe import Readout, ResidualProbe
from limbic.monitors.steering import request_steering, steer, steer_rows
from limbic.monitors.text_stream import Generation
from limbic.vectors.storage import EmotionVectors
from torch import nn


class TransformersEngine:
    kind = "transformers"

    def __init__(self, loaded: hf_model.LoadedModel, vectors: EmotionVectors) -> None:
        self.loaded = loaded
        self.model_name = loaded.source.name
        self.identity = loaded.identity
        self.vectors = vectors
        self.context_length = hf_model.context_length(loaded.model, loaded.tokenizer)
        self.tokenizer = loaded.tokenizer
        self._eos = hf_model.eos_token_ids(loaded.model.generation_config, loaded.tokenizer)
        self._layer = decoder_layers(loaded.model)[vectors.manifest.layer]
        self._probe = ResidualProbe(self._layer, Readout(vectors, loaded.device))  # first: reads before steering
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="limbic-engine")
        self._grammars: GrammarCompiler | None = None  # built on the first constrained request
        self._forward_seconds = 0.0  # cumulative, on the worker thread; read by metrics
        self._closing = threading.Event()  # close(): generations stop at their next token

    # --- tokenisation -------------------------------------------------------------------------------
    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return hf_model.chat_ids(self.loaded.tokenizer, messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.loaded.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.loaded.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def scoring_seconds(self) -> float:
        return self._probe.scoring_seconds

    def forward_seconds(self) -> float:
        return self._forward_seconds

    def recomputed_tokens(self) -> int:
        return 0  # one sequence, never preempted

    def prompt_tokens_cached(self) -> int:
        return 0  # every prompt is computed

    prompt_tokens_rescored = prompt_tokens_cached

    def _forward(self, module: nn.Module, ids: list[list[int]], **kwargs: Any) -> Any:
        """One timed forward pass (the scoring hook runs inside it)."""
        started = time.perf_counter()
        out = module(torch.tensor(ids, device=self.loaded.device), **kwargs)
        if self.loaded.device.type == "cuda":
            torch.cuda.synchronize()  # count the device's time, not only the launch
        self._forward_seconds += time.perf_counter() - started
        return out

    # --- scoring only -------------------------------------------------------------------------------
    async def score(self, token_ids: list[int]) -> ScoredRows:
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._score_sync, token_ids)

    @torch.inference_mode()
    def _score_sync(self, token_ids: list[int]) -> ScoredRows:
        self._probe.drain()
        # Only the residual at the monitored layer is needed: skip the LM head's [T, vocab] logits.
        self._forward(self.loaded.model.base_model, [token_ids])
        return self._probe.drain()

    # --- generation ---------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Step]:
        loop = asyncio.get_running_loop()
        channel: Channel[Step] = Channel()
        cancelled = threading.Event()

        def run() -> None:
            try:
                self._generate_sync(
                    prompt_ids, params, lambda step: loop.call_soon_threadsafe(channel.put, step), cancelled
                )
            except BaseException as exc:  # surfaced to the consumer
                loop.call_soon_threadsafe(channel.fail, exc)
            finally:
                loop.call_soon_threadsafe(channel.close)

        future = loop.run_in_executor(self._worker, run)
        try:
            async for step in channel:
                yield step
        finally:
            cancelled.set()  # the consumer left (client disconnect): stop at the next token
            await asyncio.shield(future)

    @torch.inference_mode()
    def _generate_sync(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable[[object], None],
        cancelled: threading.Event,
    ) -> None:
        generator = torch.Generator(device=self.loaded.device)
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        generation = Generation(self.decode, params, self._eos)
        sampler = _Sampler(params, prompt_ids, self._eos, generator, self._matcher(params))
        self._probe.drain()
        addition = request_steering(self.vectors, params.steer)
        model = self.loaded.model
        triggered = self._triggered_steering(params, len(prompt_ids))
        with (
            contextlib.nullcontext() if addition is None else steer(self._layer, addition),
            contextlib.nullcontext() if triggered is None else triggered,
        ):
            out = self._forward(model, [prompt_ids], use_cache=True)
            emit(Step(scores=self._probe.drain(), phase="prompt"))
            while True:
                token, logprob = sampler.sample(out.logits[0, -1])
                delta, finish = generation.push(token)
                if finish is None and (cancelled.is_set() or self._closing.is_set()):
                    finish = "abort"
                # Feed the token back: this both scores it and yields the logits for the next one.
                out = self._forward(model, [[token]], past_key_values=out.past_key_values, use_cache=True)
                scores = self._probe.drain()
                emit(
                    Step(
                        text=delta,
                        token_ids=[token],
                        scores=scores,
                        score_start=generation.count - 1,
                        finish_reason=finish,
                        logprobs=None if logprob is None else [logprob],
                    )
                )
                if finish is not None:
                    return

    def _triggered_steering(self, params: SamplingParams, prompt_length: int) -> AbstractContextManager | None:
        """A hook after the probe's: feeds each forward's scores to the request's steering schedule and adds
        the steering it calls for to the same forward's rows, from the crossing row on."""
        if params.trigger is None:
            return None
        device, dtype = self.loaded.device, next(self._layer.parameters()).dtype
        schedule = SteeringSchedule(
            params.trigger,
            {e: i for i, e in enumerate(self.vectors.emotions)},
            prompt_length,
            lambda strengths: request_steering(self.vectors, strengths).to(device, dtype),
        )
        position = 0

        def rows_addition(rows: int) -> torch.Tensor | None:
            nonlocal position
            z, norms = self._probe.latest()
            schedule.observe(z.cpu().numpy(), norms.cpu().numpy(), position)
            addition = schedule.addition(position, rows)
            position += rows
            return addition

        return steer_rows(self._layer, rows_addition)

    def _matcher(self, params: SamplingParams) -> Matcher | None:
        if params.constraint is None:
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.loaded.tokenizer, self.loaded.model.config.vocab_size)
        return self._grammars.matcher(params.constraint)

    async def readiness(self) -> dict[str, str]:
        # The worker thread is the engine: a shut-down executor takes no more work.
        return {"engine": "stopped" if self._worker._shutdown else "ok"}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._closing.set()
        await asyncio.to_thread(self._worker.shutdown, wait=True)
        self._probe.remove()


class _Sampler:
    """One request's sampling, in vLLM's order: logit bias, min_tokens, grammar, penalties, temperature,
    then min_p, top_k and top_p. Log-probabilities are of the raw logits (vLLM's default ``raw_logprobs``)."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        eos: Collection[int],
        generator: torch.Generator,
        matcher: Matcher | None,
    ) -> None:
        self.params = params
        self.seen = set(prompt_ids)  # the repetition penalty covers prompt and output, as vLLM's
        self.counts: Counter[int] = Counter()
        self.stopping = sorted(set(eos) | set(params.stop_token_ids))
        self.generator = generator
        self.matcher = matcher

    def sample(self, raw: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        p = self.params
        logits = raw.float().clone()
        if p.logit_bias:
            bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits[torch.tensor(list(p.logit_bias), device=logits.device)] += bias
        if self.counts.total() < p.min_tokens:
            logits[self.stopping] = -float("inf")
        if self.matcher is not None:
            self.matcher.mask(logits)
        self._penalise(logits)
        if p.temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(self._distribution(logits / p.temperature), 1, generator=self.generator))
        if self.matcher is not None:
            self.matcher.accept(token)
        self.counts[token] += 1
        self.seen.add(token)
        return token, self._logprob(raw, token)

    def _penalise(self, logits: torch.Tensor) -> None:
        p = self.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(self.seen), device=logits.device)
            picked = logits[ids]
            logits[ids] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(self.counts), device=logits.device)
            freq = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * freq

    def _distribution(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0.0
        if p.top_k > 0:
            kth = probs.topk(min(p.top_k, probs.numel())).values[-1]
            probs[probs < kth] = 0.0
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > p.top_p * sorted_probs.sum()  # smallest nucleus
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return probs

    def _logprob(self, raw: torch.Tensor, token: int) -> TokenLogprob | None:
        k = self.params.logprobs
        if k is None:
            return None
        logprobs = torch.log_softmax(raw.float(), dim=-1)
        best = logprobs.topk(k)
        return TokenLogprob(
            token, float(logprobs[token]), tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True))
        )
