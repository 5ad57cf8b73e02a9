"""Validation on what limbic watches: assistant turns in held-out chat and agent transcripts.

Each transcript's score on a vector is the mean z-score over its assistant messages' content tokens (role
headers, user turns and the attention sink left out), the same selection as ``limbic analyze`` on messages.
Per label: AUROC of the label's own vector, that label's transcripts against all other held-out transcripts,
with a 95% interval from a bootstrap over scenarios (the eight transcripts of a scenario are matched, so they
are resampled together). The text-only baseline is a bag of words with logistic regression trained on the
same training data as the vectors. Matched comparisons use only two labels of the same scenarios: calm
against desperate assistants on the calm vector, and on the desperate vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from limbic.monitors.hf.model import LoadedModel, chat_spans
from limbic.vectors import corpus
from limbic.vectors.activations import Span, cached_mean_activations
from limbic.vectors.storage import EmotionVectors
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

EMOTION_LABELS = [label for label in corpus.TRANSCRIPT_LABELS if label != "neutral"]
MATCHED = (("calm", "desperate", "calm"), ("desperate", "calm", "desperate"), ("panicked", "calm", "panicked"))
BOOTSTRAP_SAMPLES = 1000


def assistant_tokens(loaded: LoadedModel, transcript: corpus.Transcript) -> tuple[list[int], list[Span]]:
    """The transcript's token ids through the chat template and its assistant messages' content spans."""
    ids, spans = chat_spans(loaded.tokenizer, transcript.messages)
    return ids, [span for m, span in zip(transcript.messages, spans, strict=True) if m["role"] == "assistant"]


def assistant_means(
    loaded: LoadedModel, transcripts: Sequence[corpus.Transcript], layers: Sequence[int], cache: Path | None
) -> torch.Tensor:
    """Mean residual over assistant content tokens per transcript and layer: [transcripts, layers, hidden]."""
    if not transcripts:
        return torch.zeros(0, len(layers), loaded.identity.hidden_size)
    encoded = [assistant_tokens(loaded, t) for t in transcripts]
    ids, spans = [e[0] for e in encoded], [e[1] for e in encoded]
    return cached_mean_activations(loaded, ids, list(layers), 0, cache, batch_size=4, spans=spans)


@dataclass
class Auroc:
    auroc: float
    low: float  # 95% bootstrap interval over scenarios
    high: float
    positives: int
    negatives: int


def auroc_with_interval(positive: np.ndarray, scores: np.ndarray, groups: np.ndarray, seed: int = 0) -> Auroc:
    """AUROC of ``scores`` for ``positive``, with a percentile bootstrap that resamples whole groups."""
    rng = np.random.default_rng(seed)
    unique = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in unique}
    samples = []
    for _ in range(BOOTSTRAP_SAMPLES):
        rows = np.concatenate([members[g] for g in rng.choice(unique, len(unique))])
        if 0 < positive[rows].sum() < len(rows):
            samples.append(roc_auc_score(positive[rows], scores[rows]))
    low, high = np.percentile(samples, [2.5, 97.5])
    return Auroc(
        round(float(roc_auc_score(positive, scores)), 4),
        round(float(low), 4),
        round(float(high), 4),
        int(positive.sum()),
        int((~positive).sum()),
    )


@dataclass
class TranscriptResult:
    layer: int
    n_heldout: int
    baseline_training: str
    vectors: dict[str, Auroc]  # label -> its own vector's AUROC against all other held-out transcripts
    baseline: dict[str, Auroc]
    matched: dict[str, Auroc]  # "calm on calm vs desperate", ...
    matched_baseline: dict[str, Auroc]


def _assistant_text(transcript: corpus.Transcript) -> str:
    return "\n".join(m["content"] for m in transcript.messages if m["role"] == "assistant")


def baseline_scores(
    heldout: Sequence[corpus.Transcript], with_transcripts: bool, emotions: Sequence[str] = EMOTION_LABELS
) -> tuple[np.ndarray, str]:
    """Log-probabilities per label [heldout, labels] from a bag of words trained on the vectors' own training
    data: the labels' train stories and neutral dialogues, plus the train transcripts when extraction used them."""
    texts, labels = [], []
    for i, emotion in enumerate(emotions):
        texts += [s.text for s in corpus.load_stories(emotion, "train")]
        labels += [i] * (len(texts) - len(labels))
    neutral = len(emotions)
    texts += ["\n".join(m["content"] for m in d) for d in corpus.load_neutral_dialogues("train")]
    labels += [neutral] * (len(texts) - len(labels))
    what = "train stories of the labels and neutral dialogues"
    if with_transcripts:
        names = [*emotions, "neutral"]
        for transcript in corpus.load_transcripts("train"):
            texts.append(_assistant_text(transcript))
            labels.append(names.index(transcript.label))
        what += ", and the train transcripts' assistant turns"
    bag = CountVectorizer(lowercase=True)
    classifier = LogisticRegression(max_iter=3000)
    classifier.fit(bag.fit_transform(texts), labels)
    scores = np.full((len(heldout), neutral + 1), -np.inf)
    scores[:, classifier.classes_] = classifier.predict_log_proba(bag.transform([_assistant_text(t) for t in heldout]))
    return scores[:, :neutral], what


def transcript_z(loaded: LoadedModel, vectors: EmotionVectors, transcripts, cache: Path | None) -> np.ndarray:
    """Each transcript's mean assistant-token z-score per emotion of the set: [transcripts, emotions]."""
    means = assistant_means(loaded, transcripts, [vectors.manifest.layer], cache)[:, 0]
    c = vectors.manifest.calibration
    return ((means @ vectors.directions.float().T - torch.tensor(c.mean)) / torch.tensor(c.std)).numpy()


def transcript_evaluation(
    loaded: LoadedModel,
    vectors: EmotionVectors,
    cache: Path | None = None,
    split: corpus.Split | Literal["external"] = "heldout",
    emotions: Sequence[str] | None = None,
    scenarios: int | None = None,
) -> TranscriptResult:
    """The transcript checks on ``split`` of the project's own transcripts, or on the external set, for the
    transcript labels among ``emotions`` (default: all) and the first ``scenarios`` scenarios (default: all)."""
    transcripts = corpus.load_external_transcripts() if split == "external" else corpus.load_transcripts(split)
    if scenarios is not None:
        transcripts = [t for t in transcripts if t.scenario < scenarios]
    if not transcripts:
        raise ValueError(f"no {split} transcripts in {corpus.DATA}")
    z = transcript_z(loaded, vectors, transcripts, cache)
    labels = np.array([t.label for t in transcripts])
    groups = np.array([t.scenario for t in transcripts])
    used_transcripts = bool(vectors.manifest.extraction.get("transcripts"))
    base, what = baseline_scores(transcripts, used_transcripts)
    present = [e for e in EMOTION_LABELS if e in vectors.emotions and (emotions is None or e in emotions)]

    def own(scores_of: callable) -> dict[str, Auroc]:
        return {e: auroc_with_interval(labels == e, scores_of(e), groups) for e in present}

    def matched(scores_of: callable) -> dict[str, Auroc]:
        out = {}
        for positive, negative, emotion in MATCHED:
            rows = np.isin(labels, [positive, negative])
            out[f"{emotion} on {positive} vs {negative}"] = auroc_with_interval(
                labels[rows] == positive, scores_of(emotion)[rows], groups[rows]
            )
        return out

    vector_scores = lambda e: z[:, vectors.emotions.index(e)]  # noqa: E731
    baseline_of = lambda e: base[:, EMOTION_LABELS.index(e)]  # noqa: E731
    return TranscriptResult(
        layer=vectors.manifest.layer,
        n_heldout=len(transcripts),
        baseline_training=what,
        vectors=own(vector_scores),
        baseline=own(baseline_of),
        matched=matched(vector_scores),
        matched_baseline=matched(baseline_of),
    )


def token_trajectory(
    loaded: LoadedModel, vectors: EmotionVectors, messages: list[dict], emotions: Sequence[str]
) -> dict:
    """Per-token z-scores of ``emotions`` over a whole transcript, with each token's message index and role:
    the data of the report's pressure-arc figure."""
    from limbic.monitors.engine import scored
    from limbic.monitors.probe import Readout
    from limbic.vectors.activations import tap_layers

    ids, spans = chat_spans(loaded.tokenizer, messages)
    layer = vectors.manifest.layer
    with torch.inference_mode(), tap_layers(loaded, [layer]) as captured:
        loaded.model.base_model(torch.tensor([ids], device=loaded.device))
        z, norms = Readout(vectors, loaded.device).score(captured[layer][0])
    keep = scored(norms.cpu().numpy(), vectors.manifest.calibration.sink_norm)
    owner = np.full(len(ids), -1)
    for k, (start, end) in enumerate(spans):
        owner[start:end] = k
    rows = [i for i in range(len(ids)) if keep[i] and owner[i] >= 0]
    return {
        "message": [int(owner[i]) for i in rows],
        "role": [messages[owner[i]]["role"] for i in rows],
        "scores": {e: [round(float(z[i, vectors.emotions.index(e)]), 4) for i in rows] for e in emotions},
    }
