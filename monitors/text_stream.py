"""Incremental detokenisation with stop strings, for engines that sample token by token.

Text is released only when it is final: not the tail of a multi-byte character still being spelled out,
and not a prefix of a stop string that the next token might complete.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from limbic.monitors.engine import FinishReason, SamplingParams


class TextStream:
    """Decodes a growing token sequence in constant work per token: only a short window is decoded each time
    (the tokens since the last settled text, after a few tokens of context, which decoders need for spacing
    rules), not the whole sequence, so a long generation costs no more per token than a short one."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = (), min_tokens: int = 0) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._min_tokens = min_tokens  # stop strings count only once more tokens than this exist (as vLLM)
        self._ids: list[int] = []
        self._context = 0  # ids[context:settled] are decoded again with each window, for context
        self._settled = 0  # ids[:settled] are in self._text
        self._text = ""  # the text of ids[:settled]: complete characters only
        self._released = 0  # characters of it already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text that became final. Sets ``stopped`` on a stop string."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._context : self._settled])
        window = self._decode(self._ids[self._context :])
        if len(window) > len(before) and not window.endswith("\ufffd"):  # new complete characters
            self._text += window[len(before) :]
            self._context, self._settled = self._settled, len(self._ids)
        text = self._text
        stops = self._stop if len(self._ids) > self._min_tokens else ()
        for stop in stops:
            at = text.find(stop, max(0, self._released - len(stop)))
            if at != -1:
                self.stopped = True
                return self._release(text, at)
        end = len(text)
        if stops:
            end -= self._stop_prefix_len(text)
        return self._release(text, max(end, self._released))

    def flush(self) -> str:
        """The held-back text at the end of generation (no stop string completed it), incomplete characters
        included, as a full decode would show them."""
        if self.stopped:
            return ""
        tail = self._decode(self._ids[self._context :])[len(self._decode(self._ids[self._context : self._settled])) :]
        return self._release(self._text + tail, None)

    def _release(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self._released : end]
        self._released = max(self._released, end)
        return piece

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class Generation:
    """When a generation ends and what text each token releases: the stop rules every engine shares.

    EOS (unless ``ignore_eos``), ``stop_token_ids`` and stop strings finish with "stop", ``max_tokens`` with
    "length". A stopping token is counted and scored but adds no text. Before ``min_tokens`` tokens exist
    the engines suppress stopping tokens; should one slip through it is ordinary text here.
    """

    def __init__(
        self, decode: Callable[[Sequence[int]], str], params: SamplingParams, eos_token_ids: Collection[int]
    ) -> None:
        self.text = TextStream(decode, params.stop, params.min_tokens)
        self.params = params
        self.stopping = frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos else eos_token_ids)
        self.count = 0

    def push(self, token_id: int) -> tuple[str, FinishReason | None]:
        self.count += 1
        if token_id in self.stopping and self.count > self.params.min_tokens:
            return self.text.flush(), "stop"
        delta = self.text.push(token_id)
        if self.text.stopped:
            return delta, "stop"
        if self.count >= self.params.max_tokens:
            return delta + self.text.flush(), "length"
        return delta, None
