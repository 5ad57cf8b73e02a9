"""Finds the decoder layers of a Hugging Face causal LM, whatever its architecture.

Llama, Mistral, Qwen2/3 and Gemma keep them at ``model.layers``, GPT-2 at ``transformer.h``, multimodal
Gemma 3 under ``language_model``. Rather than a table of paths, we take the ModuleList whose length is the
configured number of layers: every supported architecture has exactly one.
"""

from __future__ import annotations

from torch import nn


class LayerDiscoveryError(RuntimeError):
    pass


def num_hidden_layers(config: object) -> int:
    text_config = getattr(config, "text_config", None) or config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int):
            return value
    raise LayerDiscoveryError(f"config {type(config).__name__} does not state its number of layers")


def hidden_size(config: object) -> int:
    text_config = getattr(config, "text_config", None) or config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int):
            return value
    raise LayerDiscoveryError(f"config {type(config).__name__} does not state its hidden size")


def decoder_layers(model: nn.Module, config: object | None = None) -> nn.ModuleList:
    """The model's decoder layers, in order (``config`` for models that do not carry theirs, as in vLLM)."""
    expected = num_hidden_layers(config if config is not None else model.config)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == expected
    ]
    if len(candidates) != 1:
        names = [name for name, _ in candidates] or ["none"]
        raise LayerDiscoveryError(
            f"expected one list of {expected} decoder layers in {type(model).__name__}, found: {names}"
        )
    return candidates[0][1]


def default_layer(n_layers: int) -> int:
    """About two thirds of the way through the model, where the paper reads emotions best."""
    return max(0, min(n_layers - 1, round(n_layers * 2 / 3)))


def residual_from_output(output: object):
    """The residual stream after a decoder layer, from whatever the layer's forward returned.

    Recent transformers return the tensor itself; older ones and GPT-2 return a tuple led by it.
    """
    return output[0] if isinstance(output, tuple) else output
