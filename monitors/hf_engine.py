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
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from monitors import hf_model
from monitors.channel import Channel
from monitors.engine import SamplingParams, Step
from monitors.layers import decoder_layers
from monitors.probe import Readout, ResidualProbe, ScoredRows
from monitors.steering import request_steering, steer
from monitors.text_stream import Generation
from vectors.storage import EmotionVectors


class TransformersEngine:
    kind = "transformers"

    def __init__(self, loaded: hf_model.LoadedModel, vectors: EmotionVectors) -> None:
        self.loaded = loaded
        self.model_name = loaded.source.name
        self.identity = loaded.identity
        self.vectors = vectors
        self.context_length = hf_model.context_length(loaded.model, loaded.tokenizer)
        self._eos = hf_model.eos_token_ids(loaded.model.generation_config, loaded.tokenizer)
        self._layer = decoder_layers(loaded.model)[vectors.manifest.layer]
        self._probe = ResidualProbe(self._layer, Readout(vectors, loaded.device))  # first: reads before steering
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="limbic-engine")
        self._forward_seconds = 0.0  # cumulative, on the worker thread; read by metrics

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
        counts: Counter[int] = Counter()
        self._probe.drain()
        addition = request_steering(self.vectors, params.steer)
        model = self.loaded.model
        with contextlib.nullcontext() if addition is None else steer(self._layer, addition):
            out = self._forward(model, [prompt_ids], use_cache=True)
            emit(Step(scores=self._probe.drain(), phase="prompt"))
            while True:
                token = self._sample(out.logits[0, -1], params, counts, generator)
                counts[token] += 1
                delta, finish = generation.push(token)
                if finish is None and cancelled.is_set():
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
                    )
                )
                if finish is not None:
                    return

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, counts: Counter[int], generator: torch.Generator) -> int:
        logits = logits.float()
        if counts and (params.presence_penalty or params.frequency_penalty):
            ids = torch.tensor(list(counts), device=logits.device)
            freq = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= params.presence_penalty + params.frequency_penalty * freq
        if params.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > params.top_p  # keep the smallest nucleus
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator))

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._probe.remove()
        self._worker.shutdown(wait=True)
