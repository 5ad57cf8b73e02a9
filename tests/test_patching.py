"""Activation patching: the mechanics on a tiny random Llama, the effect on the default model, the command."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import ROOT
from limbic.vectors import corpus
from limbic.vectors.activations import tap_layers
from limbic.vectors.patching import PatchPlan, patch, replacing
from tiny import loaded, random_vectors, tiny_llama

NEUTRAL = "The meeting moved to Thursday afternoon. I will bring the printed agenda and the"


@pytest.fixture(scope="module")
def tiny(default_model_path):
    model = loaded(tiny_llama(), default_model_path)
    return model, random_vectors(model.identity, 3, ["desperate", "calm"])


def test_patched_rows_equal_the_source_rows_and_nothing_else_moves(tiny):
    model, _ = tiny
    layer = 1
    source = model.tokenizer.encode("A long source sentence with several tokens in it", add_special_tokens=False)
    target = model.tokenizer.encode("Another target sentence, also long enough", add_special_tokens=False)
    plan = PatchPlan.make("span", len(source), len(target), (2, 5))
    with torch.inference_mode(), tap_layers(model, [layer]) as captured:
        model.model.base_model(torch.tensor([source]))
        source_rows = captured[layer][0][plan.source].clone()
        model.model.base_model(torch.tensor([target]))
        plain = captured[layer][0].clone()
    decoder = model.model.base_model.layers[layer]
    # The tap must come after the patch among the layer's hooks to see the patched output.
    with torch.inference_mode(), replacing(decoder, len(target), plan.target, source_rows):
        with tap_layers(model, [layer]) as captured:
            model.model.base_model(torch.tensor([target]))
        patched = captured[layer][0]
    assert torch.equal(patched[2:5], source_rows)
    keep = [i for i in range(len(target)) if i not in plan.target]
    assert torch.equal(patched[keep], plain[keep])


def test_patch_reports_both_runs_and_changes_only_with_a_real_patch(tiny):
    model, vectors = tiny
    same = patch(model, vectors, "Hello there friend", "Hello there friend", 1, "aligned", new_tokens=4)
    assert same["patched"] == same["unpatched"]  # patching a text into itself changes nothing
    other = patch(model, vectors, "Something else entirely here", "Hello there friend", 1, "last", new_tokens=4)
    assert other["positions"]["target"] == [other["target_tokens"] - 1]
    assert other["patched"]["scores"] != other["unpatched"]["scores"]
    with pytest.raises(ValueError, match="unknown emotions"):
        patch(model, vectors, "a b", "c d", 1, emotions=["nope"])
    with pytest.raises(ValueError, match="span"):
        patch(model, vectors, "a b", "c d", 1, "span", (0, 9))


@pytest.mark.slow
def test_a_desperate_state_patched_into_a_neutral_prompt_raises_desperate_downstream(default_model_path):
    """Patching at layer 12 (the monitored layer is 20): the state travels forward through 8 layers, and the
    target reads more desperate and less calm."""
    source = corpus.load_stories("desperate", "heldout")[0].text
    result = subprocess.run(
        [
            str(ROOT / ".venv/bin/limbic"),
            "vectors",
            "patch",
            "--source",
            source,
            "--target",
            NEUTRAL,
            "--layer",
            "12",
            "--new-tokens",
            "8",
            "--emotions",
            "desperate,calm,afraid,panicked",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["monitored_layer"] == 20 and report["patch_layer"] == 12
    # Measured with the bundled probe readouts: desperate +0.61, calm -0.48 (panicked, a neighbouring state,
    # rises too: +0.99). Before the probes, read along the steering directions, desperate rose by 2.7.
    shift = report["last_token_shift"]
    assert shift["desperate"] > 0.4 and shift["calm"] < 0
