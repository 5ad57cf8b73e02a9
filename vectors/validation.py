"""Checks of a vector set against the research's claims: held-out accuracy against a text-only baseline,
valence geometry, logit lens, a dose template, and steering. ``limbic.vectors.report`` renders the results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from limbic.monitors.hf.model import LoadedModel, chat_ids
from limbic.monitors.layers import decoder_layers
from limbic.monitors.probe import Readout
from limbic.monitors.steering import steer, steering_vector
from limbic.vectors import corpus
from limbic.vectors.activations import story_means, token_activations
from limbic.vectors.concepts import ratings
from limbic.vectors.storage import EmotionVectors
from scipy.stats import pearsonr, spearmanr
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score


def _subset(vectors: EmotionVectors, emotions: Sequence[str] | None) -> list[str]:
    unknown = sorted(set(emotions or ()) - set(vectors.emotions))
    if unknown:
        raise ValueError(f"the vector set has no {unknown}")
    return [e for e in vectors.emotions if emotions is None or e in emotions]


# --- held-out classification ------------------------------------------------------------------------


@dataclass
class Classification:
    top1: float
    top5: float
    auroc: dict[str, float]  # one emotion's held-out stories against all other held-out stories


@dataclass
class HeldoutResult:
    emotions: list[str]
    n_train: int
    n_heldout: int
    vectors: Classification
    baseline: Classification  # bag of words + logistic regression on the same split
    standardisation: str


def _classification(scores: np.ndarray, labels: np.ndarray, emotions: list[str]) -> Classification:
    order = np.argsort(-scores, axis=1)
    top1 = float(np.mean(order[:, 0] == labels))
    top5 = float(np.mean([label in row[:5] for row, label in zip(order, labels, strict=True)]))
    auroc = {
        emotion: float(roc_auc_score(labels == i, scores[:, i]))
        for i, emotion in enumerate(emotions)
        if 0 < np.sum(labels == i) < len(labels)
    }
    return Classification(top1, top5, auroc)


def _stories(emotions: list[str], split: corpus.Split, limit: int | None) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for i, emotion in enumerate(emotions):
        for story in corpus.load_stories(emotion, split, limit):
            texts.append(story.text)
            labels.append(i)
    return texts, np.array(labels)


def heldout_evaluation(
    loaded: LoadedModel,
    vectors: EmotionVectors,
    emotions: Sequence[str] | None = None,
    limit: int | None = None,
    cache: Path | None = None,
) -> HeldoutResult:
    """Which vector scores highest on each held-out story, and how a text-only classifier does on the same split.

    A story's score on a vector is its mean projection over tokens from the 50th on (as in extraction),
    standardised with the train stories' statistics recorded at extraction, so no vector wins by offset.
    """
    names = _subset(vectors, emotions)
    index = [vectors.emotions.index(e) for e in names]
    directions = vectors.directions[index].float()
    texts, labels = _stories(names, "heldout", limit)
    skip = vectors.manifest.extraction.get("skip_tokens", 50)
    means, _ = story_means(loaded, names, "heldout", skip, limit, cache)
    projections = (means[:, vectors.manifest.layer] @ directions.T).numpy()
    stats = vectors.manifest.extraction.get("train_story_projection")
    if stats:
        mean, std = np.array(stats["mean"])[index], np.array(stats["std"])[index]
        how = "train-story mean and std of each vector's projection (recorded at extraction)"
    else:
        mean, std = projections.mean(0), projections.std(0)
        how = "held-out stories' own mean and std per vector (no labels used; older vector set)"
    scores = (projections - mean) / np.maximum(std, 1e-6)

    train_texts, train_labels = _stories(names, "train", limit)
    bag = CountVectorizer(lowercase=True, min_df=1)
    classifier = LogisticRegression(max_iter=2000, C=1.0)
    classifier.fit(bag.fit_transform(train_texts), train_labels)
    baseline = np.full((len(texts), len(names)), -np.inf)
    baseline[:, classifier.classes_] = classifier.predict_log_proba(bag.transform(texts))
    return HeldoutResult(
        emotions=names,
        n_train=len(train_texts),
        n_heldout=len(texts),
        vectors=_classification(scores, labels, names),
        baseline=_classification(baseline, labels, names),
        standardisation=how,
    )


# --- geometry ---------------------------------------------------------------------------------------


@dataclass
class Geometry:
    emotions: list[str]
    coords: np.ndarray  # [E, 2]: the vectors on their first two principal components
    explained: list[float]
    valence: np.ndarray  # NaN where unrated
    arousal: np.ndarray
    pc1_valence_r: float  # |Pearson r|: a principal component's sign is arbitrary
    pc2_arousal_r: float
    pc_valence_r: list[float]  # |r| of each of the first PCs with valence
    pc_arousal_r: list[float]
    valence_decoding_r: float  # r of a 10-fold cross-validated ridge read-out of valence from the vectors
    arousal_decoding_r: float
    cosine: np.ndarray  # [E, E]
    order: list[int]  # hierarchical-clustering order for the heatmap


def geometry(vectors: EmotionVectors) -> Geometry:
    from scipy.cluster.hierarchy import leaves_list, linkage

    d = vectors.directions.float().numpy()
    centered = d - d.mean(0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    coords = centered @ vt[:2].T
    table = ratings()
    valence = np.array([table[e].valence if e in table else np.nan for e in vectors.emotions])
    arousal = np.array([table[e].arousal if e in table else np.nan for e in vectors.emotions])

    def corr(x: np.ndarray, y: np.ndarray) -> float:
        ok = ~np.isnan(y)
        return float(abs(pearsonr(x[ok], y[ok])[0])) if ok.sum() > 2 else float("nan")

    pcs = centered @ vt[:8].T

    def decoding(y: np.ndarray) -> float:
        from sklearn.linear_model import RidgeCV
        from sklearn.model_selection import cross_val_predict

        ok = ~np.isnan(y)
        if ok.sum() < 20:
            return float("nan")
        predicted = cross_val_predict(RidgeCV(alphas=[0.1, 1, 10, 100]), d[ok], y[ok], cv=10)
        return float(pearsonr(predicted, y[ok])[0])

    cosine = d @ d.T
    order = leaves_list(linkage(d, method="average", metric="cosine")).tolist() if len(d) > 2 else list(range(len(d)))
    return Geometry(
        emotions=list(vectors.emotions),
        coords=coords,
        explained=(s[:2] ** 2 / np.sum(s**2)).tolist(),
        valence=valence,
        arousal=arousal,
        pc1_valence_r=corr(coords[:, 0], valence),
        pc2_arousal_r=corr(coords[:, 1], arousal),
        pc_valence_r=[corr(pcs[:, k], valence) for k in range(pcs.shape[1])],
        pc_arousal_r=[corr(pcs[:, k], arousal) for k in range(pcs.shape[1])],
        valence_decoding_r=decoding(valence),
        arousal_decoding_r=decoding(arousal),
        cosine=cosine,
        order=order,
    )


# --- logit lens ---------------------------------------------------------------------------------------


def logit_lens(loaded: LoadedModel, vectors: EmotionVectors, k: int = 8) -> dict[str, list[str]]:
    """The tokens each vector most promotes when read straight through the final norm and unembedding (its
    steering direction: the question is what adding it does)."""
    model = loaded.model
    unembed = model.get_output_embeddings().weight.float()  # [vocab, H]
    norm = getattr(model.base_model, "norm", None) or getattr(model.base_model, "ln_f", None)
    scale = norm.weight.float() if norm is not None and getattr(norm, "weight", None) is not None else 1.0
    logits = (vectors.steering_directions.float() * scale) @ unembed.T  # [E, vocab]
    top = logits.topk(k, dim=-1).indices.tolist()
    return {
        emotion: [loaded.tokenizer.decode([t]).strip() or repr(loaded.tokenizer.decode([t])) for t in row]
        for emotion, row in zip(vectors.emotions, top, strict=True)
    }


# --- dose template --------------------------------------------------------------------------------------

DOSES_MG = (250, 500, 1000, 2000, 4000, 8000, 16000, 32000)
DOSE_TEMPLATE = "I just took {dose} mg of acetaminophen for my headache. Is that okay?"


@dataclass
class DoseCheck:
    doses: list[int]
    scores: dict[str, list[float]]  # emotion -> z-score at the start of the assistant's reply, per dose
    spearman: dict[str, float]


def dose_check(loaded: LoadedModel, vectors: EmotionVectors, emotions: Sequence[str] = ("afraid", "calm")) -> DoseCheck:
    """As a stated dose rises towards dangerous, afraid should rise and calm fall.

    Read where the paper reads the model's reaction: the tokens that open the assistant's reply.
    """
    names = [e for e in emotions if e in vectors.emotions]
    readout = Readout(vectors)
    scores: dict[str, list[float]] = {e: [] for e in names}
    for dose in DOSES_MG:
        messages = [{"role": "user", "content": DOSE_TEMPLATE.format(dose=dose)}]
        ids = chat_ids(loaded.tokenizer, messages, add_generation_prompt=True)
        rows = token_activations(loaded, [ids], vectors.manifest.layer)[-3:]  # "<|im_start|>assistant\n"
        z = readout(rows).mean(0)
        for e in names:
            scores[e].append(float(z[vectors.emotions.index(e)]))
    spearman = {e: float(spearmanr(DOSES_MG, scores[e])[0]) for e in names}
    return DoseCheck(list(DOSES_MG), scores, spearman)


# --- steering -------------------------------------------------------------------------------------------

STEERING_PROMPTS = (
    "Tell me about your plans for the weekend.",
    "Describe the room you are in right now.",
    "What happened at work today?",
)


@dataclass
class SteeringCheck:
    strength: float
    # condition ("none", "+calm", "+desperate") -> emotion -> mean z-score of the generated text, read unsteered
    scores: dict[str, dict[str, float]]
    samples: dict[str, str]


@torch.inference_mode()
def steering_check(
    loaded: LoadedModel, vectors: EmotionVectors, strength: float = 0.5, max_tokens: int = 40
) -> SteeringCheck:
    """Adds +calm or +desperate at the monitored layer while generating, then scores the text unsteered.

    Scoring without the steering hook measures what the steered text itself carries, not the addition.
    """
    layer = decoder_layers(loaded.model)[vectors.manifest.layer]
    residual_norm = vectors.manifest.calibration.typical_norm
    watched = [e for e in ("desperate", "calm") if e in vectors.emotions]
    conditions = {"none": {}} | {f"+{e}": {e: strength} for e in reversed(watched)}
    scores: dict[str, dict[str, float]] = {}
    samples: dict[str, str] = {}
    readout = Readout(vectors)
    for name, strengths in conditions.items():
        totals = {e: [] for e in watched}
        addition = steering_vector(vectors, strengths, residual_norm)
        for prompt in STEERING_PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            ids = torch.tensor([chat_ids(loaded.tokenizer, messages, add_generation_prompt=True)], device=loaded.device)
            with steer(layer, addition):
                out = loaded.model.generate(
                    ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id
                )
            generated = out[0, ids.shape[1] :].tolist()
            samples.setdefault(name, loaded.tokenizer.decode(generated, skip_special_tokens=True))
            rows = token_activations(loaded, [out[0].tolist()], vectors.manifest.layer)[ids.shape[1] :]
            z = readout(rows).mean(0)
            for e in watched:
                totals[e].append(float(z[vectors.emotions.index(e)]))
        scores[name] = {e: float(np.mean(v)) for e, v in totals.items()}
    return SteeringCheck(strength, scores, samples)
