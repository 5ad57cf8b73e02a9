"""Scoring plain text (no chat template): the shared core of ``limbic analyze`` and ``POST /v1/analyze``."""

from __future__ import annotations

from typing import Any

from monitors.engine import Engine
from monitors.session import ScoreSummary


class TextTooLong(ValueError):
    pass


async def analyze_text(engine: Engine, item_id: Any, text: str) -> dict:
    ids = engine.encode(text)
    if not ids:
        raise ValueError("text has no tokens")
    if len(ids) > engine.context_length:
        raise TextTooLong(f"text is {len(ids)} tokens; the model's context is {engine.context_length}")
    rows = await engine.score(ids)
    keep = rows.norms < engine.vectors.manifest.calibration.sink_norm
    summary = ScoreSummary()
    # A one-token text is all attention sink; score it as it is rather than not at all.
    summary.add(rows.z[keep] if keep.any() else rows.z)
    return {"id": item_id, "n_tokens": len(ids), "scores": summary.as_dict(engine.vectors.emotions)}
