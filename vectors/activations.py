"""Reads residual-stream activations out of a Hugging Face model for extraction and calibration."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from limbic.monitors.hf.model import LoadedModel
from limbic.monitors.layers import decoder_layers, residual_from_output
from limbic.vectors import corpus
from tqdm import tqdm


@contextmanager
def tap_layers(loaded: LoadedModel, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While open, each forward pass leaves layer index -> residual [batch, tokens, hidden] in the dict."""
    captured: dict[int, torch.Tensor] = {}
    modules = decoder_layers(loaded.model)

    def hook_for(index: int):
        def hook(module: torch.nn.Module, inputs: tuple, output: object) -> None:
            captured[index] = residual_from_output(output).detach()

        return hook

    handles = [modules[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


Span = tuple[int, int]


def window_spans(token_lists: Sequence[Sequence[int]], skip_tokens: int) -> list[list[Span]]:
    """Each text's tokens from ``skip_tokens`` on; short texts from half their length, so every text counts."""
    return [[(min(skip_tokens, len(ids) // 2), len(ids))] for ids in token_lists]


@torch.inference_mode()
def mean_activations(
    loaded: LoadedModel,
    token_lists: Sequence[Sequence[int]],
    layers: Sequence[int],
    skip_tokens: int = 0,
    batch_size: int = 8,
    desc: str | None = None,
    spans: Sequence[Sequence[Span]] | None = None,
) -> torch.Tensor:
    """Per-text mean residual at each layer over the tokens of ``spans`` (default: ``window_spans``):
    [texts, layers, hidden].

    Texts are right-padded into batches; causal attention keeps padding from touching real positions.
    """
    spans = spans if spans is not None else window_spans(token_lists, skip_tokens)
    out = []
    pad = loaded.tokenizer.pad_token_id or 0
    with tap_layers(loaded, layers) as captured, tqdm(total=len(token_lists), desc=desc, disable=not desc) as bar:
        for batch, batch_spans in zip(_batches(token_lists, batch_size), _batches(spans, batch_size), strict=True):
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            weights = torch.zeros((len(batch), width))
            for row, (tokens, text_spans) in enumerate(zip(batch, batch_spans, strict=True)):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                for start, end in text_spans:
                    weights[row, start:end] = 1.0
                weights[row] /= weights[row].sum().clamp(min=1.0)
            loaded.model.base_model(ids.to(loaded.device), attention_mask=mask.to(loaded.device))
            weights = weights.to(loaded.device)
            stacked = torch.stack([captured[i].float() for i in layers], dim=1)  # [B, L, T, H]
            out.append(torch.einsum("blth,bt->blh", stacked, weights).cpu())
            bar.update(len(batch))
    return torch.cat(out)


@torch.inference_mode()
def token_activations(
    loaded: LoadedModel, token_lists: Sequence[Sequence[int]], layer: int, desc: str | None = None
) -> torch.Tensor:
    """Every token's residual at ``layer``, texts concatenated: [total tokens, hidden]."""
    rows = []
    with tap_layers(loaded, [layer]) as captured:
        for tokens in tqdm(token_lists, desc=desc, disable=not desc):
            loaded.model.base_model(torch.tensor([list(tokens)], device=loaded.device))
            rows.append(captured[layer][0].float().cpu())
    return torch.cat(rows)


def cached_mean_activations(
    loaded: LoadedModel,
    token_lists: Sequence[Sequence[int]],
    layers: Sequence[int],
    skip_tokens: int,
    cache: Path | None,
    batch_size: int = 8,
    spans: Sequence[Sequence[Span]] | None = None,
) -> torch.Tensor:
    """``mean_activations``, remembered on disk by model fingerprint and exact inputs.

    Extraction over the whole corpus takes most of an hour on a small CPU; with the cache, adding an
    emotion or changing a later step of the recipe recomputes only what changed.
    """
    if cache is None:
        return mean_activations(loaded, token_lists, layers, skip_tokens, batch_size, spans=spans)
    identity = [loaded.identity.fingerprint, str(loaded.model.dtype), loaded.device.type]
    inputs: list = [*identity, list(layers), skip_tokens, [list(t) for t in token_lists]]
    if spans is not None:  # (the key of story windows stays as it was, so existing caches still hit)
        inputs.append([[list(span) for span in text] for text in spans])
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:24]
    path = cache / loaded.identity.fingerprint / f"{key}.pt"
    if path.is_file():
        return torch.load(path)
    result = mean_activations(loaded, token_lists, layers, skip_tokens, batch_size, spans=spans)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(result, staging)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return result


def story_means(
    loaded: LoadedModel,
    emotions: Sequence[str],
    split: corpus.Split,
    skip_tokens: int,
    limit: int | None = None,
    cache: Path | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean activations at every layer of each story in ``split`` [stories, layers, hidden], with labels
    (indices into ``emotions``). Computed emotion by emotion, so each emotion is cached on its own and
    extraction and validation share the cache."""
    layers = list(range(loaded.identity.num_layers))
    means, labels = [], []
    for label, emotion in enumerate(tqdm(emotions, desc=f"{split} stories", disable=not progress)):
        ids = [
            loaded.tokenizer.encode(s.text, add_special_tokens=False)
            for s in corpus.load_stories(emotion, split, limit)
        ]
        if ids:
            means.append(cached_mean_activations(loaded, ids, layers, skip_tokens, cache, batch_size))
            labels += [label] * len(ids)
    empty = torch.zeros(0, len(layers), loaded.identity.hidden_size)
    return (torch.cat(means) if means else empty), torch.tensor(labels, dtype=torch.long)
