"""The scoring hook: projects every token's residual stream onto the emotion vectors, on the model's device.

Calibration is folded into the projection, so one ``addmm`` turns a [tokens, hidden] block into z-scores
[tokens, emotions]: z = (h · d - mean) / std = h · (d / std) - mean / std.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from limbic.monitors.engine import ScoredRows
from limbic.monitors.layers import residual_from_output
from limbic.vectors.storage import EmotionVectors
from torch import nn


class Readout:
    """The affine map from residual rows to calibrated per-emotion z-scores."""

    def __init__(self, vectors: EmotionVectors, device: torch.device | str = "cpu") -> None:
        std = torch.tensor(vectors.manifest.calibration.std, dtype=torch.float32)
        mean = torch.tensor(vectors.manifest.calibration.mean, dtype=torch.float32)
        self.weight_t = (vectors.directions.float() / std[:, None]).T.contiguous().to(device)  # [H, E]
        self.bias = (-mean / std).to(device)  # [E]
        self.emotions = list(vectors.emotions)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, rows.float(), self.weight_t)

    def score(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z-scores and residual norms (the norms tell attention-sink tokens apart) of [tokens, hidden] rows."""
        rows = rows.float()
        return torch.addmm(self.bias, rows, self.weight_t), torch.linalg.vector_norm(rows, dim=-1)


class ResidualProbe:
    """A forward hook on one decoder layer that scores every row passing through it.

    The caller runs one sequence per forward pass and calls ``drain`` after each to take the rows.
    """

    def __init__(self, layer: nn.Module, readout: Readout) -> None:
        self.readout = readout
        self.scoring_seconds = 0.0  # cumulative; read by metrics
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle = layer.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs: tuple, output: object) -> None:
        started = time.perf_counter()
        hidden = residual_from_output(output)
        self._pending.append(self.readout.score(hidden.reshape(-1, hidden.shape[-1])))
        self.scoring_seconds += time.perf_counter() - started

    def latest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The z-scores and norms of the rows the last forward pass scored (for hooks that run after this one)."""
        return self._pending[-1]

    def drain(self) -> ScoredRows:
        """Rows scored since the last drain, in order, moved to the host."""
        if not self._pending:
            width = len(self.readout.emotions)
            return ScoredRows(np.zeros((0, width), np.float32), np.zeros(0, np.float32))
        z = torch.cat([z for z, _ in self._pending]).cpu().numpy()
        norms = torch.cat([n for _, n in self._pending]).cpu().numpy()
        self._pending.clear()
        return ScoredRows(z, norms)

    def remove(self) -> None:
        self._handle.remove()
