"""Steering: adding a scaled emotion vector to the residual stream at one layer (causal intervention).

Strength is a fraction of the typical residual norm at that layer, as in the paper: +0.05 x desperate
adds a twentieth of a typical token's norm along the desperate direction at every position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:  # the API side reads the strength bounds without torch
    import torch
    from limbic.vectors.storage import EmotionVectors
    from torch import nn

# Beyond about one typical residual norm the model's output degenerates; larger values are surely a mistake.
MAX_STRENGTH = 2.0
Strength = Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH)]  # for settings and request validation


def steering_vector(vectors: EmotionVectors, strengths: Mapping[str, float], residual_norm: float) -> torch.Tensor:
    """The sum of strength x norm x direction over the named emotions: one [hidden] vector to add."""
    import torch

    unknown = sorted(set(strengths) - set(vectors.emotions))
    if unknown:
        raise ValueError(f"cannot steer with unknown emotions {unknown}")
    directions = vectors.steering_directions  # the causal directions, where the set reads with a probe
    total = torch.zeros(directions.shape[1])
    for emotion, strength in strengths.items():
        total += strength * residual_norm * directions[vectors.emotions.index(emotion)].float()
    return total


def request_steering(vectors: EmotionVectors, strengths: Mapping[str, float]) -> torch.Tensor | None:
    """A request's steering vector, in units of the typical residual norm at the set's layer; None if unsteered."""
    if not any(strengths.values()):
        return None
    return steering_vector(vectors, strengths, vectors.manifest.calibration.typical_norm)


@contextmanager
def steer(layer: nn.Module, addition: torch.Tensor) -> Iterator[None]:
    """While open, every forward pass through ``layer`` leaves ``addition`` added to its output."""
    addition = addition.to(next(layer.parameters()).device)
    with steer_rows(layer, lambda rows: addition):
        yield


@contextmanager
def steer_rows(layer: nn.Module, addition_for: Callable[[int], torch.Tensor | None]) -> Iterator[None]:
    """While open, every forward pass through ``layer`` (one sequence) gets ``addition_for(rows)`` added:
    None, one [hidden] vector, or one row per token, decided during the pass (triggered steering)."""

    def hook(module: nn.Module, inputs: tuple, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        addition = addition_for(hidden.shape[-2])
        if addition is None:
            return output
        steered = hidden + addition.to(hidden.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
