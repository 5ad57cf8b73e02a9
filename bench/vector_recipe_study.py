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

``--probes`` adds the readout-probe variants to an existing results file (at the chosen layer and denoising;
the regularisation C and the stories' share of the weight swept; the same dev judging and story constraint): a
logistic-regression probe per transcript emotion on stories and fit transcripts together, in place of the
difference of means.
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
from limbic.vectors.extraction import (
    class_means,
    combine,
    dialogue_directions,
    neutral_components,
    probe_direction,
    project_out,
)
from limbic.vectors.storage import SINK_NORM_RATIO
from limbic.vectors.transcripts import EMOTION_LABELS, MATCHED, assistant_means
from sklearn.metrics import roc_auc_score

LAYERS = (12, 14, 16, 18, 20, 22, 24)
PROBE_CS = (0.001, 0.003, 0.01, 0.03, 0.1)
PROBE_STORY_SHARES = (0.5, 0.6, 0.7, 0.8)
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

    study = json.loads(path.read_text())
    study["per_emotion"] = per_emotion_weights(study["variants"], study["chosen"], study["todays_recipe"])
    study["per_emotion_rule"] = (
        "at the chosen layer and denoising, per story-checked emotion: the weight with the best own dev AUROC "
        f"(+ its matched comparison), own story AUROC within 0.02 of today's recipe; ties within {TIE} to the "
        "smaller weight"
    )
    write_addition(path, study, "per_emotion")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/vector_recipe_study.json"))
    parser.add_argument("--per-emotion-only", action="store_true", help="add the per-emotion choice to --out")
    parser.add_argument("--probes", action="store_true", help="add the readout-probe variants to --out")
    args = parser.parse_args()
    if args.per_emotion_only:
        add_per_emotion(args.out)
        return
    data = StudyData.load(LAYERS)
    if args.probes:
        add_probes(args.out, data)
        return
    variants = []
    for layer, weight, variance in itertools.product(LAYERS, WEIGHTS, DENOISE):
        directions = data.mean_directions(layer, weight, variance)
        result = {"layer": layer, "transcript_weight": weight, "denoise_variance": variance}
        result.update(data.judge(directions, layer))
        variants.append(result)
        print(layer, weight, variance, result["dev_objective"], result["dev_auroc"], result["dev_matched"], flush=True)
    today = next(
        v for v in variants if v["layer"] == 20 and v["transcript_weight"] == 0 and v["denoise_variance"] == 0.5
    )
    allowed = [v for v in variants if within_story_constraint(v, today)]
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


def within_story_constraint(variant: dict, today: dict) -> bool:
    return all(variant["story_auroc"][e] >= today["story_auroc"][e] - 0.02 for e in KEY_STORY_EMOTIONS)


class StudyData:
    """Everything the variants are built from and judged on, computed once (from the activation cache)."""

    @classmethod
    def load(cls, layers: tuple[int, ...]) -> StudyData:
        self = cls()
        cache = model_source.cache_dir() / "activations"
        loaded = hf_model.load(model_source.resolve(None))
        self.emotions = corpus.available_emotions()
        all_layers = list(range(loaded.identity.num_layers))
        self.train, self.train_labels = story_means(loaded, self.emotions, "train", 50, cache=cache)
        self.heldout, self.heldout_labels = story_means(loaded, self.emotions, "heldout", 50, cache=cache)
        plain = [
            loaded.tokenizer.encode("\n".join(m["content"] for m in d), add_special_tokens=False)
            for d in corpus.load_neutral_dialogues("train")
        ]
        self.genre = self.train.mean(0) - mean_activations(loaded, plain, all_layers, 50).mean(0)
        transcripts = corpus.load_transcripts("train")
        self.activations = assistant_means(loaded, transcripts, all_layers, cache)
        self.fit = [i for i, t in enumerate(transcripts) if t.scenario % 5 != 3]
        self.dev = [i for i, t in enumerate(transcripts) if t.scenario % 5 == 3]
        self.fit_labels = np.array([transcripts[i].label for i in self.fit])
        self.dev_labels = np.array([transcripts[i].label for i in self.dev])
        self.dialogue = dialogue_directions(self.activations[self.fit], list(self.fit_labels), self.emotions)
        means = class_means(self.train, self.train_labels, len(self.emotions))
        self.raw = means - means.mean(0, keepdim=True)
        self.neutral = neutral_tokens(loaded, layers)
        return self

    def removed(self, layer: int, variance: float) -> torch.Tensor:
        removed = self.genre[layer : layer + 1]
        if variance:
            removed = torch.cat([neutral_components(self.neutral[layer], variance), removed])
        return removed

    def mean_directions(self, layer: int, weight: float | dict, variance: float) -> torch.Tensor:
        at_layer = {e: d[layer] for e, d in self.dialogue.items()}
        return project_out(combine(self.raw[:, layer], at_layer, self.emotions, weight), self.removed(layer, variance))

    def probe_directions(self, layer: int, variance: float, c: float, story_share: float) -> torch.Tensor:
        """The study's chosen difference-of-means directions with each transcript emotion's row a probe."""
        directions = self.mean_directions(layer, 0.5, variance)
        removed = self.removed(layer, variance)
        for emotion in self.dialogue:
            i = self.emotions.index(emotion)
            directions[i] = probe_direction(
                self.train[:, layer],
                self.train_labels == i,
                self.activations[self.fit, layer],
                torch.tensor(self.fit_labels == emotion),
                removed,
                c,
                story_share,
            )
        return directions

    def judge(self, directions: torch.Tensor, layer: int) -> dict:
        dev_scores = (self.activations[self.dev, layer] @ directions.T).numpy()
        story_scores = (self.heldout[:, layer] @ directions.T).numpy()
        labels, emotions = self.dev_labels, self.emotions

        def score(emotion: str) -> np.ndarray:
            return dev_scores[:, emotions.index(emotion)]

        result = {
            "dev_auroc": {e: auroc(labels == e, score(e)) for e in EMOTION_LABELS},
            "dev_matched": {
                f"{emotion} on {pos} vs {neg}": auroc(
                    labels[np.isin(labels, [pos, neg])] == pos, score(emotion)[np.isin(labels, [pos, neg])]
                )
                for pos, neg, emotion in MATCHED
            },
            "story_auroc": {
                e: auroc(self.heldout_labels.numpy() == emotions.index(e), story_scores[:, emotions.index(e)])
                for e in KEY_STORY_EMOTIONS
            },
        }
        key = [result["dev_auroc"][e] for e in ("desperate", "panicked", "calm")] + list(result["dev_matched"].values())
        result["dev_objective"] = round(float(np.mean(key)), 4)
        return result


def add_probes(path: Path, data: StudyData) -> None:
    """Adds the readout-probe variants and the choice among them to a study's results."""
    import json

    study = json.loads(path.read_text())
    chosen, today = study["chosen"], study["todays_recipe"]
    layer, variance = chosen["layer"], chosen["denoise_variance"]
    variants = []
    for c, share in itertools.product(PROBE_CS, PROBE_STORY_SHARES):
        result = {"layer": layer, "denoise_variance": variance, "probe_c": c, "probe_story_share": share}
        result.update(data.judge(data.probe_directions(layer, variance, c, share), layer))
        variants.append(result)
        print(c, share, result["dev_objective"], result["dev_auroc"], result["story_auroc"], flush=True)
    allowed = [v for v in variants if within_story_constraint(v, today)]
    study["probe_variants"] = variants
    top = max(v["dev_objective"] for v in allowed)
    # Ties lean on the stories (the paper's data, and what the constraint protects: extraction then fits on
    # more transcripts than the study, which pulls toward them) and on stronger regularisation.
    study["probe_chosen"] = min(
        (v for v in allowed if v["dev_objective"] >= top - TIE), key=lambda v: (-v["probe_story_share"], v["probe_c"])
    )
    study["probe_rule"] = (
        "at the chosen layer and denoising, every transcript emotion read by a probe (stories + fit transcripts); "
        f"the C and story share with the best dev objective under the same story constraint; ties within {TIE} "
        "to the larger story share, then the smaller C"
    )
    write_addition(path, study, "probe")


def write_addition(path: Path, study: dict, name: str) -> None:
    """Writes a study with an addition made to it, recording the command that made the addition."""
    import json
    import sys

    study[f"{name}_command"] = " ".join([Path(sys.executable).name, *sys.argv])
    path.write_text(json.dumps(study, indent=2) + "\n")
    print(json.dumps(study.get(f"{name}_chosen", study.get(name)), indent=2))


if __name__ == "__main__":
    main()
