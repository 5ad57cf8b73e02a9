"""The paper's recipe: difference of means over emotion stories, denoised by neutral principal components.

1. Mean residual per story (tokens from the 50th on), at every layer in one pass.
2. Mean per emotion, minus the mean over emotions.
3. Project out the top principal components of neutral-dialogue activations (50% of their variance).
4. Calibrate: mean and std of each vector's projection on neutral chat tokens, so scores are z-scores.
A layer sweep records how well held-out stories separate at each layer; the monitored layer defaults to
two thirds of the depth.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monitors.hf_model import LoadedModel
from monitors.layers import default_layer
from vectors import corpus
from vectors.activations import mean_activations, token_activations
from vectors.storage import Calibration, EmotionVectors, Manifest

log = logging.getLogger(__name__)

# A token whose residual norm is this many times the median is an attention sink (see Calibration).
SINK_NORM_RATIO = 10.0


@dataclass(frozen=True)
class ExtractionConfig:
    emotions: Sequence[str] | None = None  # default: every emotion with stories
    layer: int | None = None  # default: two thirds deep
    skip_tokens: int = 50
    denoise_variance: float = 0.5
    stories_per_emotion: int | None = None  # cap, for quick runs and tests
    neutral_dialogues: int | None = None
    batch_size: int = 8
    progress: bool = True


def class_means(activations: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean of ``activations`` [N, ...] per label: [n_classes, ...]."""
    sums = torch.zeros((n_classes, *activations.shape[1:]))
    sums.index_add_(0, labels, activations)
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1)
    return sums / counts.view(-1, *([1] * (activations.dim() - 1)))


def neutral_components(rows: torch.Tensor, variance: float) -> torch.Tensor:
    """The top principal directions [k, hidden] of ``rows`` that together explain ``variance``."""
    centered = rows - rows.mean(0)
    _, singular, vt = torch.linalg.svd(centered, full_matrices=False)
    explained = singular.square().cumsum(0) / singular.square().sum()
    k = int(torch.searchsorted(explained, torch.tensor(variance)).item()) + 1
    return vt[:k]


def project_out(vectors: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    return vectors - (vectors @ components.T) @ components


def nearest_direction_accuracy(story_means: torch.Tensor, labels: torch.Tensor, directions: torch.Tensor) -> float:
    """Share of stories whose centred mean is closest in cosine to their own emotion's direction."""
    centered = story_means - story_means.mean(0)
    sims = torch.nn.functional.normalize(centered, dim=-1) @ torch.nn.functional.normalize(directions, dim=-1).T
    return float((sims.argmax(-1) == labels).float().mean())


def _tokenised_stories(loaded: LoadedModel, emotions: Sequence[str], split: corpus.Split, limit: int | None):
    ids, labels = [], []
    for label, emotion in enumerate(emotions):
        for story in corpus.load_stories(emotion, split, limit):
            ids.append(loaded.tokenizer.encode(story.text, add_special_tokens=False))
            labels.append(label)
    return ids, torch.tensor(labels)


def _tokenised_dialogues(loaded: LoadedModel, split: corpus.Split, limit: int | None) -> list[list[int]]:
    out = []
    for messages in corpus.load_neutral_dialogues(split, limit):
        encoded = loaded.tokenizer.apply_chat_template(messages, tokenize=True)
        out.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
    return out


def extract(loaded: LoadedModel, config: ExtractionConfig = ExtractionConfig()) -> EmotionVectors:
    emotions = list(config.emotions or corpus.available_emotions())
    if len(emotions) < 2:
        raise ValueError("difference of means needs at least two emotions with stories")
    n_layers = loaded.identity.num_layers
    layer = default_layer(n_layers) if config.layer is None else config.layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside 0..{n_layers - 1}")
    all_layers = list(range(n_layers))
    desc = (lambda text: text) if config.progress else (lambda text: None)

    train_ids, train_labels = _tokenised_stories(loaded, emotions, "train", config.stories_per_emotion)
    heldout_ids, heldout_labels = _tokenised_stories(loaded, emotions, "heldout", config.stories_per_emotion)
    train = mean_activations(
        loaded, train_ids, all_layers, config.skip_tokens, config.batch_size, desc("train stories")
    )
    heldout = mean_activations(
        loaded, heldout_ids, all_layers, config.skip_tokens, config.batch_size, desc("held-out stories")
    )

    means = class_means(train, train_labels, len(emotions))  # [E, L, H]
    raw = means - means.mean(0, keepdim=True)
    sweep = [
        nearest_direction_accuracy(heldout[:, i], heldout_labels, raw[:, i]) if len(heldout) else float("nan")
        for i in all_layers
    ]

    neutral = token_activations(
        loaded, _tokenised_dialogues(loaded, "train", config.neutral_dialogues), layer, desc("neutral dialogues")
    )
    norms = neutral.norm(dim=-1)
    sink_norm = float(norms.median()) * SINK_NORM_RATIO
    neutral = neutral[norms < sink_norm]
    components = neutral_components(neutral, config.denoise_variance)
    directions = torch.nn.functional.normalize(project_out(raw[:, layer], components), dim=-1)

    projections = neutral @ directions.T
    manifest = Manifest(
        model=loaded.identity,
        layer=layer,
        emotions=emotions,
        calibration=Calibration(
            mean=projections.mean(0).tolist(),
            std=projections.std(0).clamp(min=1e-6).tolist(),
            sink_norm=sink_norm,
            n_tokens=len(neutral),
            source="neutral dialogues (train split), chat template applied",
        ),
        extraction={
            "method": "difference of means over emotion stories minus mean over emotions; "
            "neutral principal components projected out",
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "skip_tokens": config.skip_tokens,
            "denoise_variance": config.denoise_variance,
            "denoise_components": len(components),
            "train_stories": len(train_ids),
            "heldout_stories": len(heldout_ids),
            "neutral_tokens": len(neutral),
            "layer_sweep_heldout_top1": [round(a, 4) for a in sweep],
        },
    )
    return EmotionVectors(manifest, directions.contiguous())
