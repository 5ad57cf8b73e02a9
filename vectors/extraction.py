"""The paper's recipe: difference of means over emotion stories, denoised by neutral principal components.

1. Mean residual per story (tokens from the 50th on), at every layer in one pass.
2. Mean per emotion, minus the mean over emotions.
3. Project out the top principal components of neutral-dialogue activations (50% of their variance), and
   the genre direction: the mean of all stories minus the mean of the neutral dialogues read as plain text.
4. Calibrate: mean and std of each vector's projection on neutral chat tokens, so scores are z-scores.
A layer sweep records how well held-out stories separate at each layer; the monitored layer defaults to
two thirds of the depth.

Dialogue form (our addition, for the traffic limbic watches): where the transcript corpus has an emotion, the
vector also gets that emotion's direction among *assistant turns*: the mean over assistant tokens of its train
transcripts minus the mean over all eight transcript labels (neutral included), the two unit directions added
with weight ``transcript_weight``. Stories teach an emotion as narrated; transcripts teach it as an assistant
shows it, in the same situations as the other labels (matched scenarios), which is what lets calm read the
assistant's composure rather than the pressure of the situation.

Readout probes (our addition, chosen by bench/vector_recipe_study.py): a difference of means added to a
dialogue direction still reads an assistant's *situation* as much as its emotion (a steady assistant under a
deadline scored lower on calm than a desperate one), and a neutral assistant as calm as a calm one. Where the
transcripts have an emotion, the vector the monitor reads with is instead a logistic-regression probe, that
emotion against all others, trained on the train stories and the train transcripts' assistant turns together
(each corpus centred on its own mean so the probe cannot learn story-versus-chat; within a corpus the two
classes weigh the same, and the stories carry PROBE_STORY_SHARE of the whole), in the same denoised space.
Steering keeps the difference of means (saved as the set's ``steering`` directions): the research steers with
it, and a probe also weighs directions that merely correlate with the label.

The genre direction is our addition to the paper's recipe. On a small model, stories and assistant chat
differ along directions that every emotion vector partly contains, so without it a plain chat message can
outscore a desperate story on `desperate` (held-out AUROC of desperate stories against neutral text was 0.6
to 0.8 on SmolLM2-135M; with it, 1.0, while desperate-against-other-emotions stayed at 0.99).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from limbic.monitors.hf.model import LoadedModel, chat_ids
from limbic.monitors.layers import default_layer
from limbic.vectors import corpus
from limbic.vectors.activations import mean_activations, story_means, token_activations
from limbic.vectors.storage import SINK_NORM_RATIO, Calibration, EmotionVectors, Manifest, Thresholds
from limbic.vectors.transcripts import assistant_means

log = logging.getLogger(__name__)

# The readout probes' inverse L2 strength and the stories' share of their training weight (the transcripts have
# the rest), chosen on development transcripts by bench/vector_recipe_study.py.
PROBE_C = 0.003
PROBE_STORY_SHARE = 0.8

# Per-token false-positive rates on held-out neutral chat that set the recorded alert thresholds.
WARNING_FPR, CRITICAL_FPR = 0.01, 0.001


@dataclass(frozen=True)
class ExtractionConfig:
    emotions: Sequence[str] | None = None  # default: every emotion with stories
    layer: int | Literal["auto"] | None = None  # None: two thirds deep; "auto": the sweep's best middle layer
    skip_tokens: int = 50
    denoise_variance: float = 0.5
    stories_per_emotion: int | None = None  # cap, for quick runs and tests
    neutral_dialogues: int | None = None
    batch_size: int = 8
    progress: bool = True
    cache: Path | None = None  # remembers story activations between runs (see cached_mean_activations)
    transcripts: bool = True  # add dialogue-form directions from the train transcripts (see above)
    # Chosen by bench/vector_recipe_study.py: the best development-transcript AUROC whose story AUROC stays
    # within 0.02 of the stories-only recipe (larger weights read transcripts better and stories worse).
    transcript_weight: float = 0.5
    # Per emotion, over the shared weight. The study's "per_emotion" choice (desperate=1, panicked=1) was made
    # for reading along these directions; with probe readouts they only steer, and steering keeps the shared
    # weight the mitigation benchmark measured.
    transcript_weights: Mapping[str, float] = field(default_factory=dict)
    # "probe": emotions with transcripts are read by a probe (see above); "mean": read along the steering
    # directions, as the paper does.
    readout: Literal["probe", "mean"] = "probe"
    probe_c: float = PROBE_C
    probe_story_share: float = PROBE_STORY_SHARE

    def weight_of(self, emotion: str) -> float:
        return self.transcript_weights.get(emotion, self.transcript_weight)


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


def project_out(vectors: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Removes the span of ``directions`` [k, hidden] (any k, not necessarily orthonormal) from ``vectors``."""
    basis, _ = torch.linalg.qr(directions.T)  # [hidden, k], orthonormal
    return vectors - (vectors @ basis) @ basis.T


def dialogue_directions(means: torch.Tensor, labels: Sequence[str], emotions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per transcript label (not neutral) present in ``emotions``: its mean assistant-token activation minus
    the mean over all labels, from transcript means [N, ..., hidden] labelled ``labels``."""
    names = sorted(set(labels))
    index = torch.tensor([names.index(label) for label in labels])
    centred = class_means(means, index, len(names))
    centred = centred - centred.mean(0, keepdim=True)
    return {name: centred[i] for i, name in enumerate(names) if name != "neutral" and name in emotions}


def combine(
    raw: torch.Tensor,
    dialogue: dict[str, torch.Tensor],
    emotions: Sequence[str],
    weight: float | Mapping[str, float],
) -> torch.Tensor:
    """Story directions [E, hidden] with each dialogue direction added as unit vectors, ``weight`` to one (one
    weight for all, or a weight per emotion)."""
    combined = raw.clone()
    for emotion, direction in dialogue.items():
        i = list(emotions).index(emotion)
        unit = torch.nn.functional.normalize
        w = weight[emotion] if isinstance(weight, Mapping) else weight
        combined[i] = (unit(raw[i], dim=-1) + w * unit(direction, dim=-1)) * raw[i].norm()
    return combined


def probe_direction(
    stories: torch.Tensor,
    story_positive: torch.Tensor,
    transcripts: torch.Tensor,
    transcript_positive: torch.Tensor,
    removed: torch.Tensor,
    c: float = PROBE_C,
    story_share: float = PROBE_STORY_SHARE,
) -> torch.Tensor:
    """A unit readout direction [hidden]: logistic regression, positives against the rest, on story means and
    transcript means [N, hidden] together, after removing ``removed`` [k, hidden]. Each corpus is centred on
    its own mean; the stories carry ``story_share`` of the total weight, the transcripts the rest, and within
    each corpus the two classes carry equal weight."""
    from sklearn.linear_model import LogisticRegression

    parts = [project_out(rows, removed) for rows in (stories, transcripts)]
    parts = [rows - rows.mean(0) for rows in parts]
    x = torch.cat(parts)
    x = (x / x.std()).numpy()
    positives = [mask.numpy().astype(bool) for mask in (story_positive, transcript_positive)]
    if not all(0 < p.sum() < len(p) for p in positives):
        raise ValueError("a probe needs positives and negatives among both the stories and the transcripts")
    if not 0 < story_share < 1:
        raise ValueError(f"the stories' share of a probe's weight must lie between 0 and 1, not {story_share}")
    weights = np.concatenate(
        [
            np.where(p, share / 2 / p.sum(), share / 2 / (~p).sum())
            for p, share in zip(positives, (story_share, 1 - story_share), strict=True)
        ]
    )
    classifier = LogisticRegression(C=c, max_iter=5000)
    classifier.fit(x, np.concatenate(positives), sample_weight=weights * len(weights))
    direction = torch.tensor(classifier.coef_[0], dtype=torch.float32)
    return torch.nn.functional.normalize(project_out(direction[None], removed)[0], dim=0)


def heldout_top1(train: torch.Tensor, heldout: torch.Tensor, labels: torch.Tensor, directions: torch.Tensor) -> float:
    """Share of held-out stories whose highest-scoring vector is their own emotion's.

    Each vector's projections are standardised with the train stories' mean and std first, so that a
    vector with a large offset does not win every story.
    """
    train_proj, heldout_proj = train @ directions.T, heldout @ directions.T
    z = (heldout_proj - train_proj.mean(0)) / train_proj.std(0).clamp(min=1e-6)
    return float((z.argmax(-1) == labels).float().mean())


def choose_layer(requested: int | Literal["auto"] | None, sweep: list[float]) -> int:
    """The monitored layer: as requested, the sweep's best in the middle of the model, or two thirds deep."""
    if isinstance(requested, int):
        return requested
    n_layers = len(sweep)
    if requested == "auto":
        middle = range(n_layers // 3, max(n_layers // 3 + 1, (5 * n_layers) // 6))
        return max(middle, key=lambda i: (sweep[i], -abs(i - default_layer(n_layers))))
    return default_layer(n_layers)


def neutral_thresholds(rows: torch.Tensor, directions: torch.Tensor, calibration: Calibration) -> Thresholds:
    """Per-emotion z-scores exceeded by WARNING_FPR / CRITICAL_FPR of held-out neutral chat tokens."""
    rows = rows[rows.norm(dim=-1) < calibration.sink_norm]
    z = (rows @ directions.T - torch.tensor(calibration.mean)) / torch.tensor(calibration.std)
    return Thresholds(
        warning_fpr=WARNING_FPR,
        critical_fpr=CRITICAL_FPR,
        warning=[round(v, 4) for v in torch.quantile(z, 1 - WARNING_FPR, dim=0).tolist()],
        critical=[round(v, 4) for v in torch.quantile(z, 1 - CRITICAL_FPR, dim=0).tolist()],
        n_tokens=len(z),
        source="neutral dialogues (held-out split), chat template applied, per-token rates",
    )


def _as_plain_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def _chat_ids(loaded: LoadedModel, messages: list[dict]) -> list[int]:
    return chat_ids(loaded.tokenizer, messages)


def extract(loaded: LoadedModel, config: ExtractionConfig = ExtractionConfig()) -> EmotionVectors:
    emotions = list(config.emotions or corpus.available_emotions())
    missing = sorted(set(emotions) - set(corpus.available_emotions()))
    if missing:
        raise ValueError(f"no stories for {missing} in {corpus.DATA / 'stories'}")
    if len(emotions) < 2:
        raise ValueError("difference of means needs at least two emotions with stories")
    n_layers = loaded.identity.num_layers
    if isinstance(config.layer, int) and not 0 <= config.layer < n_layers:
        raise ValueError(f"layer {config.layer} is outside 0..{n_layers - 1}")
    all_layers = list(range(n_layers))
    desc = (lambda text: text) if config.progress else (lambda text: None)

    shared = dict(limit=config.stories_per_emotion, cache=config.cache, batch_size=config.batch_size)
    train, train_labels = story_means(loaded, emotions, "train", config.skip_tokens, **shared, progress=config.progress)
    heldout, heldout_labels = story_means(
        loaded, emotions, "heldout", config.skip_tokens, **shared, progress=config.progress
    )

    dialogues = corpus.load_neutral_dialogues("train", config.neutral_dialogues)
    plain = [loaded.tokenizer.encode(_as_plain_text(d), add_special_tokens=False) for d in dialogues]
    neutral_plain = mean_activations(
        loaded, plain, all_layers, config.skip_tokens, config.batch_size, desc("neutral dialogues as text")
    )
    genre = train.mean(0) - neutral_plain.mean(0)  # [L, H]

    means = class_means(train, train_labels, len(emotions))  # [E, L, H]
    raw = means - means.mean(0, keepdim=True)
    dialogue: dict[str, torch.Tensor] = {}
    transcripts: list[corpus.Transcript] = []
    if config.transcripts:
        transcripts = corpus.load_transcripts("train")
        activations = assistant_means(loaded, transcripts, all_layers, config.cache)  # [N, L, H]
        dialogue = dialogue_directions(activations, [t.label for t in transcripts], emotions)
    sweep = [
        heldout_top1(train[:, i], heldout[:, i], heldout_labels, project_out(raw[:, i], genre[i : i + 1]))
        if len(heldout)
        else float("nan")
        for i in all_layers
    ]
    layer = choose_layer(config.layer, sweep)

    chats = [_chat_ids(loaded, d) for d in dialogues]
    neutral = token_activations(loaded, chats, layer, desc("neutral dialogues as chat"))
    norms = neutral.norm(dim=-1)
    sink_norm = float(norms.median()) * SINK_NORM_RATIO
    neutral = neutral[norms < sink_norm]
    components = neutral_components(neutral, config.denoise_variance)
    removed = torch.cat([components, genre[layer : layer + 1]])
    at_layer = {e: d[layer] for e, d in dialogue.items()}
    weights = {e: config.weight_of(e) for e in dialogue}
    steering = torch.nn.functional.normalize(
        project_out(combine(raw[:, layer], at_layer, emotions, weights), removed), dim=-1
    )
    directions = steering.clone()
    probed = sorted(dialogue) if config.readout == "probe" else []
    for emotion in probed:
        i = emotions.index(emotion)
        directions[i] = probe_direction(
            train[:, layer],
            train_labels == i,
            activations[:, layer],
            torch.tensor([t.label == emotion for t in transcripts]),
            removed,
            config.probe_c,
            config.probe_story_share,
        )

    projections = neutral @ directions.T
    calibration = Calibration(
        mean=projections.mean(0).tolist(),
        std=projections.std(0).clamp(min=1e-6).tolist(),
        sink_norm=sink_norm,
        n_tokens=len(neutral),
        source="neutral dialogues (train split), chat template applied",
    )
    heldout_chats = [_chat_ids(loaded, d) for d in corpus.load_neutral_dialogues("heldout", config.neutral_dialogues)]
    thresholds = neutral_thresholds(
        token_activations(loaded, heldout_chats, layer, desc("held-out neutral chats")), directions, calibration
    )
    story_projection = train[:, layer] @ directions.T  # for standardising story scores in validation
    manifest = Manifest(
        model=loaded.identity,
        layer=layer,
        emotions=emotions,
        calibration=calibration,
        thresholds=thresholds,
        extraction={
            "method": "difference of means over emotion stories minus mean over emotions"
            + (
                ", plus assistant-turn directions from train transcripts where the corpus has the emotion"
                if dialogue
                else ""
            )
            + "; neutral principal components and the story-vs-neutral genre direction projected out"
            + (
                "; read by logistic-regression probes on stories and transcripts where the corpus has the emotion, "
                "steered along the differences of means"
                if probed
                else ""
            ),
            "transcripts": sorted(dialogue),
            "transcript_weight": config.transcript_weight if dialogue else 0.0,
            "transcript_weights": dict(sorted(weights.items())),
            "train_transcripts": len(transcripts),
            "readout_probes": probed,
            "probe_c": config.probe_c if probed else None,
            "probe_story_share": config.probe_story_share if probed else None,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "skip_tokens": config.skip_tokens,
            "denoise_variance": config.denoise_variance,
            "denoise_components": len(components),
            "train_stories": len(train),
            "heldout_stories": len(heldout),
            "neutral_tokens": len(neutral),
            "layer_sweep_heldout_top1": [round(a, 4) for a in sweep],
            "layer_sweep_note": "held-out top-1 over the emotions, genre direction removed, before neutral PCs",
            "train_story_projection": {
                "mean": [round(v, 5) for v in story_projection.mean(0).tolist()],
                "std": [round(v, 5) for v in story_projection.std(0).tolist()],
            },
        },
    )
    return EmotionVectors(manifest, directions.contiguous(), steering.contiguous() if probed else None)
