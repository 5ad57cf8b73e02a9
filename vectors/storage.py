"""Emotion vectors on disk: a safetensors matrix plus a JSON manifest, written atomically.

A vector set is a folder holding ``vectors.safetensors`` (tensor ``directions``, one unit-norm row per
emotion, float32) and ``manifest.json`` (model identity, layer, emotion names, calibration). The manifest
is what the service checks at start-up against the model it loaded.

``directions`` are what the monitor *reads* with. A set may also hold ``steering`` (same shape): the
directions steering *adds*, where they differ. Extraction reads some emotions with a trained probe, which
separates them best, but steers with the difference of means, the direction the research found causal (a
probe also picks up directions that merely correlate with the label). Without ``steering``, a set steers
along its readout directions.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "vectors.safetensors"
BUNDLED = Path(__file__).parent / "data"
# A token whose residual norm is this many times the median is an attention sink (see Calibration).
SINK_NORM_RATIO = 10.0


class VectorFileError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    fingerprint: str  # a hash of a sample of the weights; see monitors.fingerprint


@dataclass(frozen=True)
class Calibration:
    """Per-emotion mean and std of raw projections on neutral text: score = (projection - mean) / std."""

    mean: list[float]
    std: list[float]
    # Residual norms above this are attention-sink tokens (position 0 has ~100x the usual norm): scored
    # but kept out of summaries, histograms and alerts, where their projections would be meaningless.
    sink_norm: float
    n_tokens: int
    source: str

    @property
    def typical_norm(self) -> float:
        """The median residual norm at the layer (extraction sets the sink threshold at 10x it): steering's unit."""
        return self.sink_norm / SINK_NORM_RATIO


@dataclass(frozen=True)
class Thresholds:
    """Per-emotion z-scores that neutral chat tokens exceed at the stated per-token false-positive rates."""

    warning_fpr: float
    critical_fpr: float
    warning: list[float]
    critical: list[float]
    n_tokens: int
    source: str


@dataclass(frozen=True)
class Manifest:
    model: ModelIdentity
    layer: int
    emotions: list[str]
    calibration: Calibration
    extraction: dict = field(default_factory=dict)
    thresholds: Thresholds | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        if data.get("format_version") != FORMAT_VERSION:
            raise VectorFileError(f"unsupported vector format {data.get('format_version')!r}")
        return cls(
            model=ModelIdentity(**data["model"]),
            layer=data["layer"],
            emotions=list(data["emotions"]),
            calibration=Calibration(**data["calibration"]),
            extraction=data.get("extraction", {}),
            thresholds=Thresholds(**data["thresholds"]) if data.get("thresholds") else None,
        )


@dataclass(frozen=True)
class EmotionVectors:
    manifest: Manifest
    directions: torch.Tensor  # [n_emotions, hidden_size], unit-norm rows: the readout
    steering: torch.Tensor | None = None  # same shape: what steering adds, where it is not the readout

    @property
    def emotions(self) -> list[str]:
        return self.manifest.emotions

    @property
    def steering_directions(self) -> torch.Tensor:
        return self.directions if self.steering is None else self.steering

    def save(self, folder: Path) -> None:
        """Writes the set into ``folder``, replacing any previous set there only once complete."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            tensors = {"directions": self.directions.float().contiguous()}
            if self.steering is not None:
                tensors["steering"] = self.steering.float().contiguous()
            save_file(tensors, str(staging / TENSORS))
            (staging / MANIFEST).write_text(json.dumps(asdict(self.manifest), indent=2) + "\n")
            # mkdtemp makes a private folder; a vector set is read by other users (the container's `nobody`).
            staging.chmod(0o755)
            for path in staging.iterdir():
                path.chmod(0o644)
            if folder.exists():
                retired = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(retired, ignore_errors=True)
                folder.rename(retired)
                staging.rename(folder)
                shutil.rmtree(retired)
            else:
                staging.rename(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def load(folder: Path) -> EmotionVectors:
    folder = Path(folder)
    try:
        manifest = Manifest.from_json(json.loads((folder / MANIFEST).read_text()))
        tensors = load_file(str(folder / TENSORS))
        directions = tensors["directions"]
    except FileNotFoundError as exc:
        raise VectorFileError(f"{folder} is not a vector set (missing {Path(exc.filename).name})") from exc
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise VectorFileError(f"{folder} has a malformed manifest or tensor file: {exc}") from exc
    t = manifest.thresholds
    if t is not None and not len(t.warning) == len(t.critical) == len(manifest.emotions):
        raise VectorFileError(f"{folder}: thresholds do not list one value per emotion")
    expected = (len(manifest.emotions), manifest.model.hidden_size)
    steering = tensors.get("steering")
    for name, tensor in (("directions", directions), ("steering", steering)):
        if tensor is not None and tuple(tensor.shape) != expected:
            raise VectorFileError(f"{folder}: {name} has shape {tuple(tensor.shape)}, manifest says {expected}")
    return EmotionVectors(manifest, directions, steering)


def bundled_folder(model_name: str) -> Path:
    return BUNDLED / model_name


def check_matches(vectors: EmotionVectors, model: ModelIdentity, rebuild_hint: str) -> None:
    """Refuses a vector set made for another model; the message names the command that builds the right one."""
    made_for = vectors.manifest.model
    problems = []
    if made_for.hidden_size != model.hidden_size:
        problems.append(f"hidden size {made_for.hidden_size} != model's {model.hidden_size}")
    if vectors.manifest.layer >= model.num_layers:
        problems.append(f"layer {vectors.manifest.layer} does not exist in a {model.num_layers}-layer model")
    if made_for.fingerprint != model.fingerprint:
        problems.append(f"weights fingerprint {made_for.fingerprint} != model's {model.fingerprint}")
    if problems:
        raise VectorFileError(
            f"the vectors were made for {made_for.name!r}, not this model ({'; '.join(problems)}). "
            f"Build matching ones with: {rebuild_hint}"
        )
