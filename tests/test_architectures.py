"""Decoder-layer discovery and the scoring hook on tiny random models of each supported architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from limbic.monitors.layers import decoder_layers, default_layer, hidden_size, num_hidden_layers
from limbic.monitors.probe import Readout, ResidualProbe
from limbic.vectors.storage import ModelIdentity
from tiny import random_vectors
from transformers import AutoConfig, AutoModelForCausalLM

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
CONFIGS = {
    "llama": dict(SMALL, num_key_value_heads=2),
    "mistral": dict(SMALL, num_key_value_heads=2),
    "qwen2": dict(SMALL, num_key_value_heads=2),
    "qwen3": dict(SMALL, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(SMALL, num_key_value_heads=2, head_dim=16),
    "gemma3_text": dict(SMALL, num_key_value_heads=2, head_dim=16),
    "gpt2": dict(vocab_size=512, n_embd=64, n_layer=3, n_head=4, n_positions=128),
}


def build(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_hook_scores_equal_hidden_states_projection(model_type):
    model = build(model_type)
    layers = decoder_layers(model)
    assert len(layers) == num_hidden_layers(model.config) == 3
    layer = 1  # a middle layer: GPT-2's last hidden state has the final norm applied
    identity = ModelIdentity(model_type, type(model).__name__, hidden_size(model.config), 3, "0")
    vectors = random_vectors(identity, layer, ["desperate", "calm", "afraid"])
    probe = ResidualProbe(layers[layer], Readout(vectors))
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    scored = probe.drain()
    probe.remove()
    c = vectors.manifest.calibration
    expected = (out.hidden_states[layer + 1][0] @ vectors.directions.T - torch.tensor(c.mean)) / torch.tensor(c.std)
    np.testing.assert_allclose(scored.z, expected.numpy(), atol=1e-4)
    assert scored.z.shape == (9, 3)


def test_default_layer_is_two_thirds_deep():
    assert default_layer(30) == 20 and default_layer(3) == 2 and default_layer(1) == 0
