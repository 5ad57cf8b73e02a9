"""Scoring texts and transcripts without generating: the shared core of ``limbic analyze`` and
``POST /v1/analyze``.

Plain text is scored as it is (no chat template). A transcript (OpenAI-style messages) is rendered with the
model's chat template, as served traffic is, and by default only the assistant's tokens count: that is how
operators replay logged agent transcripts through the monitor. Attention-sink tokens never count
(``limbic.monitors.probe.scored``), so a one-token text has no scores rather than absurd ones.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from limbic.monitors.alerting.monitor import ScoreSummary
from limbic.monitors.engine import Engine, scored
from limbic.monitors.hf.model import chat_spans
from limbic.service.protocol import AnalyzeItem

TokenSelection = Literal["all", "assistant", "user"]


class TextTooLong(ValueError):
    pass


def _summary(z: np.ndarray, emotions: list[str]) -> dict:
    summary = ScoreSummary()
    summary.add(z)
    return summary.as_dict(emotions)


async def _score(engine: Engine, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    if not ids:
        raise ValueError("text has no tokens")
    if len(ids) > engine.context_length:
        raise TextTooLong(f"text is {len(ids)} tokens; the model's context is {engine.context_length}")
    rows = await engine.score(ids)
    return rows.z, scored(rows.norms, engine.vectors.manifest.calibration.sink_norm)


async def analyze_text(engine: Engine, item_id: Any, text: str) -> dict:
    ids = engine.encode(text)
    z, keep = await _score(engine, ids)
    return {
        "id": item_id,
        "n_tokens": len(ids),
        "n_scored": int(keep.sum()),
        "scores": _summary(z[keep], engine.vectors.emotions),
    }


async def analyze_messages(
    engine: Engine, item_id: Any, messages: list[dict], tokens: TokenSelection = "assistant", per_message: bool = False
) -> dict:
    """Scores a transcript; ``tokens`` picks whose tokens the summary covers (content only, no role headers)."""
    ids, spans = chat_spans(engine.tokenizer, messages)
    z, keep = await _score(engine, ids)
    chosen = np.full(len(ids), tokens == "all")
    for message, (start, end) in zip(messages, spans, strict=True):
        if message["role"] == tokens:
            chosen[start:end] = True
    chosen &= keep
    result = {
        "id": item_id,
        "n_tokens": len(ids),
        "n_scored": int(chosen.sum()),
        "tokens": tokens,
        "scores": _summary(z[chosen], engine.vectors.emotions),
    }
    if per_message:
        result["messages"] = [
            {
                "index": k,
                "role": message["role"],
                "n_scored": int(keep[start:end].sum()),
                "scores": _summary(z[start:end][keep[start:end]], engine.vectors.emotions),
            }
            for k, (message, (start, end)) in enumerate(zip(messages, spans, strict=True))
        ]
    return result


async def analyze_item(engine: Engine, item: AnalyzeItem) -> dict:
    """One input line or request item: a text or a transcript."""
    if item.messages is not None:
        messages = [m.model_dump() for m in item.messages]
        return await analyze_messages(engine, item.id, messages, item.tokens, item.per_message)
    return await analyze_text(engine, item.id, item.text or "")
