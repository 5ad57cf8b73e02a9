"""Tiny randomly initialised models built from configs (no download), for fast hook and layer tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from limbic.monitors.hf.engine import TransformersEngine
from limbic.monitors.hf.model import LoadedModel, fingerprint
from limbic.monitors.layers import hidden_size, num_hidden_layers
from limbic.monitors.model_source import ModelSource
from limbic.vectors.storage import Calibration, EmotionVectors, Manifest, ModelIdentity
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig


def tiny_llama(vocab_size: int = 49152, layers: int = 4, hidden: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=2,
        bos_token_id=1,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def loaded(model: torch.nn.Module, tokenizer_path) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    identity = ModelIdentity(
        name="tiny",
        architecture=type(model).__name__,
        hidden_size=hidden_size(model.config),
        num_layers=num_hidden_layers(model.config),
        fingerprint=fingerprint(model),
    )
    return LoadedModel(ModelSource("tiny", tokenizer_path), model, tokenizer, identity)


def random_vectors(identity: ModelIdentity, layer: int, emotions: list[str], seed: int = 1) -> EmotionVectors:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(
        torch.randn(len(emotions), identity.hidden_size, generator=generator), dim=-1
    )
    calibration = Calibration(
        mean=torch.randn(len(emotions), generator=generator).tolist(),
        std=(torch.rand(len(emotions), generator=generator) + 0.5).tolist(),
        sink_norm=1e9,
        n_tokens=0,
        source="random, for tests",
    )
    return EmotionVectors(Manifest(identity, layer, emotions, calibration), directions)


@contextmanager
def tiny_engine(tokenizer_path: Path) -> Iterator[TransformersEngine]:
    """The transformers engine on a tiny random Llama, with random desperate and calm vectors at layer 2."""
    model = loaded(tiny_llama(), tokenizer_path)
    engine = TransformersEngine(model, random_vectors(model.identity, 2, ["desperate", "calm"]))
    try:
        yield engine
    finally:
        asyncio.run(engine.close())
