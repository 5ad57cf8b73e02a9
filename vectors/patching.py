"""Activation patching: copy a source text's residual stream into a target text's run and watch what changes.

The causal experiment open reproductions of the emotion research are built on. The source's residual after
decoder layer ``layer`` replaces the target's at chosen positions (the last token, a span, or all aligned
positions); the target is then read at the monitored layer (its emotion z-scores) and continued greedily.
Patching at a layer before the monitored one asks whether the emotion travels forward from there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from limbic.monitors.engine import scored
from limbic.monitors.hf.model import LoadedModel
from limbic.monitors.layers import decoder_layers, residual_from_output
from limbic.monitors.probe import Readout
from limbic.vectors.activations import tap_layers
from limbic.vectors.storage import EmotionVectors
from torch import nn

Positions = Literal["last", "span", "aligned"]


@dataclass(frozen=True)
class PatchPlan:
    """Which target positions receive which source positions' residuals."""

    source: list[int]
    target: list[int]

    @classmethod
    def make(cls, kind: Positions, source_len: int, target_len: int, span: tuple[int, int] | None = None) -> PatchPlan:
        if kind == "last":
            return cls([source_len - 1], [target_len - 1])
        if kind == "aligned":  # position i to position i, the sink (0) left alone
            n = min(source_len, target_len)
            return cls(list(range(1, n)), list(range(1, n)))
        if span is None:
            raise ValueError("positions `span` needs a span (start, end)")
        start, end = span
        if not 0 < start < end <= min(source_len, target_len):
            raise ValueError(f"span {span} must lie within 1..{min(source_len, target_len)} of both texts")
        return cls(list(range(start, end)), list(range(start, end)))


@contextmanager
def replacing(layer: nn.Module, length: int, positions: Sequence[int], rows: torch.Tensor) -> Iterator[None]:
    """While open, a forward pass over a whole ``length``-token sequence through ``layer`` leaves ``rows`` at
    ``positions`` of its output residual (batch of one). Other passes (cached decoding) are left alone."""
    index = torch.tensor(list(positions))

    def hook(module: nn.Module, inputs: tuple, output: object) -> object:
        hidden = residual_from_output(output)
        if hidden.shape[1] != length:
            return output
        patched = hidden.clone()
        patched[0, index.to(hidden.device)] = rows.to(hidden.device, hidden.dtype)
        return (patched, *output[1:]) if isinstance(output, tuple) else patched

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def _run(loaded: LoadedModel, ids: list[int], read_layer: int, readout: Readout, new_tokens: int) -> dict:
    """Scores of every token at ``read_layer`` and a greedy continuation of ``ids``."""
    model = loaded.model
    with tap_layers(loaded, [read_layer]) as captured:
        out = model(torch.tensor([ids], device=loaded.device), use_cache=True)
        z, norms = readout.score(captured[read_layer][0])
    continuation: list[int] = []
    for _ in range(new_tokens):
        token = int(out.logits[0, -1].argmax())
        continuation.append(token)
        out = model(torch.tensor([[token]], device=loaded.device), past_key_values=out.past_key_values, use_cache=True)
    return {"z": z.cpu().numpy(), "norms": norms.cpu().numpy(), "continuation": continuation}


def _summary(run: dict, emotions: list[str], sink_norm: float, rows: Sequence[int]) -> dict:
    keep = scored(run["norms"], sink_norm)
    chosen = [r for r in rows if keep[r]]
    z = run["z"]
    return {
        e: {
            "mean": round(float(z[keep, i].mean()), 4),
            "patched_positions": round(float(z[chosen, i].mean()), 4) if chosen else None,
            "last": round(float(z[-1, i]), 4),
        }
        for i, e in enumerate(emotions)
    }


def patch(
    loaded: LoadedModel,
    vectors: EmotionVectors,
    source: str,
    target: str,
    layer: int,
    positions: Positions = "last",
    span: tuple[int, int] | None = None,
    new_tokens: int = 20,
    emotions: Sequence[str] | None = None,
) -> dict:
    """Runs ``target`` unpatched and with ``source``'s residual after ``layer`` patched in; returns both
    runs' emotion scores at the monitored layer and greedy continuations, as JSON-ready data."""
    n_layers = loaded.identity.num_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside 0..{n_layers - 1}")
    encode = lambda text: loaded.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    source_ids, target_ids = encode(source), encode(target)
    if not source_ids or not target_ids:
        raise ValueError("source and target both need at least one token")
    plan = PatchPlan.make(positions, len(source_ids), len(target_ids), span)
    read_layer = vectors.manifest.layer
    readout = Readout(vectors, loaded.device)
    with torch.inference_mode(), tap_layers(loaded, [layer]) as captured:
        loaded.model.base_model(torch.tensor([source_ids], device=loaded.device))
        source_rows = captured[layer][0][plan.source].clone()
    plain = _run(loaded, target_ids, read_layer, readout, new_tokens)
    with replacing(decoder_layers(loaded.model)[layer], len(target_ids), plan.target, source_rows):
        patched = _run(loaded, target_ids, read_layer, readout, new_tokens)
    names = list(emotions or vectors.emotions)
    unknown = sorted(set(names) - set(vectors.emotions))
    if unknown:
        raise ValueError(f"unknown emotions {unknown}")
    index = [vectors.emotions.index(e) for e in names]
    sink_norm = vectors.manifest.calibration.sink_norm

    def report(run: dict) -> dict:
        run = run | {"z": run["z"][:, index]}
        return {
            "scores": _summary(run, names, sink_norm, plan.target),
            "continuation": loaded.tokenizer.decode(run["continuation"], skip_special_tokens=True),
        }

    unpatched_report, patched_report = report(plain), report(patched)
    shift = {e: round(patched_report["scores"][e]["last"] - unpatched_report["scores"][e]["last"], 4) for e in names}
    return {
        "model": loaded.identity.name,
        "patch_layer": layer,
        "monitored_layer": read_layer,
        "positions": {"kind": positions, "source": plan.source, "target": plan.target},
        "source_tokens": len(source_ids),
        "target_tokens": len(target_ids),
        "unpatched": unpatched_report,
        "patched": patched_report,
        "last_token_shift": dict(sorted(shift.items(), key=lambda kv: -abs(kv[1]))),
    }


def layer_sweep(
    loaded: LoadedModel, vectors: EmotionVectors, source: str, target: str, emotion: str, layers: Sequence[int]
) -> dict[int, float]:
    """The last-token shift of ``emotion`` at the monitored layer when ``source``'s last-token state is patched
    into ``target`` after each of ``layers``: how far forward the state carries the emotion."""
    return {
        layer: patch(loaded, vectors, source, target, layer, "last", new_tokens=0, emotions=[emotion])[
            "last_token_shift"
        ][emotion]
        for layer in layers
    }
