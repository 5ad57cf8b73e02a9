"""Which extraction recipe makes the vectors read assistant turns: layer, dialogue-form data and its weight,
and the neutral denoising, judged on development transcripts; stories checked so they do not get worse.

    .venv/bin/python bench/vector_recipe_study.py [--out bench/results/vector_recipe_study.json]

Transcripts split three ways by scenario (index mod 5): 0-2 fit the dialogue directions, 3 is the development
set every variant is judged on here, 4 is held out and never looked at by this study (the report measures the
chosen recipe on it once). Story AUROC is one emotion's held-out stories against all other held-out stories
on that emotion's raw projection (AUROC does not change under the per-vector calibration, so none is needed).
Note: that story constraint is checked on the *held-out* stories (as the report's story figures are), so those
figures for the chosen recipe were part of the choice; the transcript figures on held-out scenarios were not.
Uses the activation cache that extraction fills (``~/.cache/limbic/activations``).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import record
import torch
from limbic.monitors import model_source
from limbic.monitors.hf import model as hf_model
from limbic.monitors.hf.model import chat_ids
from limbic.vectors import corpus
from limbic.vectors.activations import mean_activations, story_means, tap_layers
from limbic.vectors.extraction import class_means, combine, dialogue_directions, neutral_components, project_out
from limbic.vectors.storage import SINK_NORM_RATIO
from limbic.vectors.transcripts import EMOTION_LABELS, MATCHED, assistant_means
from sklearn.metrics import roc_auc_score

LAYERS = (12, 14, 16, 18, 20, 22, 24)
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
DENOISE = (0.5, 0.0)
KEY_STORY_EMOTIONS = ("desperate", "panicked", "calm", "afraid")


@torch.inference_mode()
def neutral_tokens(loaded: hf_model.LoadedModel, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Neutral chat tokens (train dialogues, chat template, sinks dropped) at each layer."""
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with tap_layers(loaded, list(layers)) as captured:
        for dialogue in corpus.load_neutral_dialogues("train"):
            loaded.model.base_model(torch.tensor([chat_ids(loaded.tokenizer, dialogue)], device=loaded.device))
            for layer in layers:
                rows[layer].append(captured[layer][0].float().cpu())
    out = {}
    for layer in layers:
        stacked = torch.cat(rows[layer])
        norms = stacked.norm(dim=-1)
        out[layer] = stacked[norms < norms.median() * SINK_NORM_RATIO]
    return out


def auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    return round(float(roc_auc_score(positive, scores)), 4)


# An emotion's own figures: its label's dev AUROC, plus its matched comparison where there is one.
OWN_MATCHED = {emotion: f"{emotion} on {pos} vs {neg}" for pos, neg, emotion in MATCHED}
TIE = 0.005  # objectives closer than this are a tie, won by the smaller weight (closer to the shared recipe)


def per_emotion_weights(variants: list[dict], chosen: dict, today: dict) -> dict[str, dict]:
    """Each story-checked emotion's transcript weight at the chosen layer and denoising: its own dev figures at
    their best, its own story AUROC within 0.02 of today's recipe. A vector's scores depend on its own
    direction only, so the emotions can be chosen one by one."""
    same = [
        v for v in variants if v["layer"] == chosen["layer"] and v["denoise_variance"] == chosen["denoise_variance"]
    ]
    out = {}
    for emotion in KEY_STORY_EMOTIONS:

        def own(v: dict, e: str = emotion) -> float:
            return v["dev_auroc"][e] + (v["dev_matched"][OWN_MATCHED[e]] if e in OWN_MATCHED else 0.0)

        allowed = [v for v in same if v["story_auroc"][emotion] >= today["story_auroc"][emotion] - 0.02]
        top = max(own(v) for v in allowed)
        pick = min((v for v in allowed if own(v) >= top - TIE), key=lambda v: v["transcript_weight"])
        out[emotion] = {
            "transcript_weight": pick["transcript_weight"],
            "dev_auroc": pick["dev_auroc"][emotion],
            "story_auroc": pick["story_auroc"][emotion],
            "at_shared_weight": {
                "dev_auroc": chosen["dev_auroc"][emotion],
                "story_auroc": chosen["story_auroc"][emotion],
            },
        }
    return out


def add_per_emotion(path: Path) -> None:
    """Adds the per-emotion choice to a study's results (no recomputation)."""
    import json
    import sys

    study = json.loads(path.read_text())
    study["per_emotion"] = per_emotion_weights(study["variants"], study["chosen"], study["todays_recipe"])
    study["per_emotion_rule"] = (
        "at the chosen layer and denoising, per story-checked emotion: the weight with the best own dev AUROC "
        f"(+ its matched comparison), own story AUROC within 0.02 of today's recipe; ties within {TIE} to the "
        "smaller weight"
    )
    study["per_emotion_command"] = " ".join([Path(sys.executable).name, *sys.argv])
    path.write_text(json.dumps(study, indent=2) + "\n")
    print(json.dumps(study["per_emotion"], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/vector_recipe_study.json"))
    parser.add_argument("--per-emotion-only", action="store_true", help="add the per-emotion choice to --out")
    args = parser.parse_args()
    if args.per_emotion_only:
        add_per_emotion(args.out)
        return
    cache = model_source.cache_dir() / "activations"
    loaded = hf_model.load(model_source.resolve(None))
    emotions = corpus.available_emotions()
    all_layers = list(range(loaded.identity.num_layers))
    train, train_labels = story_means(loaded, emotions, "train", 50, cache=cache)
    heldout, heldout_labels = story_means(loaded, emotions, "heldout", 50, cache=cache)
    plain = [
        loaded.tokenizer.encode("\n".join(m["content"] for m in d), add_special_tokens=False)
        for d in corpus.load_neutral_dialogues("train")
    ]
    genre = train.mean(0) - mean_activations(loaded, plain, all_layers, 50).mean(0)
    transcripts = corpus.load_transcripts("train")
    activations = assistant_means(loaded, transcripts, all_layers, cache)
    fit = [i for i, t in enumerate(transcripts) if t.scenario % 5 != 3]
    dev = [i for i, t in enumerate(transcripts) if t.scenario % 5 == 3]
    fit_labels = [transcripts[i].label for i in fit]
    dev_labels = np.array([transcripts[i].label for i in dev])
    dialogue = dialogue_directions(activations[fit], fit_labels, emotions)
    means = class_means(train, train_labels, len(emotions))
    raw = means - means.mean(0, keepdim=True)
    neutral = neutral_tokens(loaded, LAYERS)

    variants = []
    for layer, weight, variance in itertools.product(LAYERS, WEIGHTS, DENOISE):
        removed = genre[layer : layer + 1]
        if variance:
            removed = torch.cat([neutral_components(neutral[layer], variance), removed])
        at_layer = {e: d[layer] for e, d in dialogue.items()}
        directions = project_out(combine(raw[:, layer], at_layer, emotions, weight), removed)
        dev_scores = (activations[dev, layer] @ directions.T).numpy()
        story_scores = (heldout[:, layer] @ directions.T).numpy()

        def score(emotion: str, scores: np.ndarray = dev_scores) -> np.ndarray:
            return scores[:, emotions.index(emotion)]

        result = {
            "layer": layer,
            "transcript_weight": weight,
            "denoise_variance": variance,
            "dev_auroc": {e: auroc(dev_labels == e, score(e)) for e in EMOTION_LABELS},
            "dev_matched": {
                f"{emotion} on {pos} vs {neg}": auroc(
                    dev_labels[np.isin(dev_labels, [pos, neg])] == pos, score(emotion)[np.isin(dev_labels, [pos, neg])]
                )
                for pos, neg, emotion in MATCHED
            },
            "story_auroc": {
                e: auroc(heldout_labels.numpy() == emotions.index(e), story_scores[:, emotions.index(e)])
                for e in KEY_STORY_EMOTIONS
            },
        }
        key = [result["dev_auroc"][e] for e in ("desperate", "panicked", "calm")] + list(result["dev_matched"].values())
        result["dev_objective"] = round(float(np.mean(key)), 4)
        variants.append(result)
        print(layer, weight, variance, result["dev_objective"], result["dev_auroc"], result["dev_matched"], flush=True)
    today = next(
        v for v in variants if v["layer"] == 20 and v["transcript_weight"] == 0 and v["denoise_variance"] == 0.5
    )
    allowed = [
        v for v in variants if all(v["story_auroc"][e] >= today["story_auroc"][e] - 0.02 for e in KEY_STORY_EMOTIONS)
    ]
    best = max(allowed, key=lambda v: v["dev_objective"])
    record.write(
        args.out,
        {
            "split": "transcript scenarios mod 5: 0-2 fit, 3 development (judged here), 4 held out (not used)",
            "objective": "mean dev AUROC of desperate, panicked, calm and the three matched comparisons",
            "constraint": "story AUROC of desperate, panicked, calm, afraid within 0.02 of today's recipe",
            "todays_recipe": today,
            "chosen": best,
            "variants": variants,
        },
    )
    add_per_emotion(args.out)


if __name__ == "__main__":
    main()
