"""``limbic vectors report``: one self-contained HTML page (figures inlined) showing how good a vector set is.

Also writes ``summary.json`` beside the page with the headline figures, for READMEs and closing notes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report is rendered to files
import matplotlib.pyplot as plt
import numpy as np
from limbic.monitors.hf.model import LoadedModel
from limbic.vectors import corpus, patching, transcripts, validation
from limbic.vectors.concepts import PRIORITY
from limbic.vectors.storage import EmotionVectors


@dataclass
class ReportConfig:
    emotions: Sequence[str] | None = None  # evaluate a subset (quick runs); geometry always uses all
    stories_per_emotion: int | None = None
    steering_strength: float = 0.5
    steering_tokens: int = 40
    cache: Path | None = None  # extraction's activation cache: reuses its held-out story activations
    transcripts: bool = True  # the held-out and external transcript sections (need the transcript corpus)
    external_scenarios: int | None = None  # the external set's first N scenarios (quick runs)
    patching: bool = True  # the activation-patching layer sweep


def _png(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _paired_bars(
    names: list[str], series: list[tuple[str, list[float], np.ndarray | None]], xlabel: str, xmin: float, height: float
) -> str:
    """Horizontal bars, two per name (vectors above, baseline below), with optional [2, n] error bars."""
    fig, ax = plt.subplots(figsize=(10, height * len(names) + 1))
    y = np.arange(len(names))
    for offset, (label, values, errors) in zip((0.2, -0.2), series, strict=True):
        ax.barh(y + offset, values, height=0.4, xerr=errors, capsize=2 if errors is not None else 0, label=label)
    ax.set_yticks(y, names, fontsize=7 if len(names) > 10 else 9)
    ax.invert_yaxis()
    ax.axvline(0.5, color="grey", lw=0.5)
    ax.set_xlim(xmin, 1.0)
    ax.set_xlabel(xlabel)
    ax.legend(loc="lower left")
    return _png(fig)


def _auroc_figure(result: validation.HeldoutResult) -> str:
    names = sorted(result.vectors.auroc, key=lambda e: (e not in PRIORITY, -result.vectors.auroc[e]))[:40]
    series = [
        ("emotion vectors", [result.vectors.auroc[e] for e in names], None),
        ("bag of words", [result.baseline.auroc.get(e, np.nan) for e in names], None),
    ]
    return _paired_bars(names, series, "held-out AUROC (one emotion's stories against all others)", 0.3, 0.22)


def _map_figure(g: validation.Geometry) -> str:
    fig, ax = plt.subplots(figsize=(10, 8))
    points = ax.scatter(g.coords[:, 0], g.coords[:, 1], c=g.valence, cmap="coolwarm_r", s=28, vmin=0, vmax=1)
    for (x, y), emotion in zip(g.coords, g.emotions, strict=True):
        bold = emotion in PRIORITY
        ax.annotate(emotion, (x, y), fontsize=8 if bold else 6, weight="bold" if bold else "normal", alpha=0.85)
    fig.colorbar(points, label="valence (NRC VAD)")
    ax.set_xlabel(f"PC1 ({g.explained[0]:.0%} of variance); |r| with valence = {g.pc1_valence_r:.2f}")
    ax.set_ylabel(f"PC2 ({g.explained[1]:.0%}); |r| with arousal = {g.pc2_arousal_r:.2f}")
    return _png(fig)


def _heatmap_figure(g: validation.Geometry) -> str:
    order = g.order
    size = max(6.0, 0.075 * len(order))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(g.cosine[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    labels = [g.emotions[i] for i in order]
    ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=4 if len(order) > 60 else 8)
    ax.set_yticks(range(len(order)), labels, fontsize=4 if len(order) > 60 else 8)
    fig.colorbar(image, shrink=0.6, label="cosine similarity")
    return _png(fig)


def _dose_figure(d: validation.DoseCheck) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for emotion, values in d.scores.items():
        ax.plot(d.doses, values, marker="o", label=f"{emotion} (Spearman {d.spearman[emotion]:+.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("stated acetaminophen dose (mg)")
    ax.set_ylabel("z-score at the start of the reply")
    ax.legend()
    return _png(fig)


def _steering_figure(s: validation.SteeringCheck) -> str:
    conditions = list(s.scores)
    emotions = list(next(iter(s.scores.values())))
    if not emotions:
        return "<p>No steering check: the vector set has neither calm nor desperate.</p>"
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(emotions)
    for k, emotion in enumerate(emotions):
        xs = np.arange(len(conditions)) + k * width
        ax.bar(xs, [s.scores[c][emotion] for c in conditions], width=width, label=emotion)
    ax.set_xticks(np.arange(len(conditions)) + width * (len(emotions) - 1) / 2, conditions)
    ax.set_ylabel("mean z-score of the generated text (read unsteered)")
    ax.set_title(f"steering at strength {s.strength} x the typical residual norm")
    ax.legend()
    return _png(fig)


def _transcript_figure(t: transcripts.TranscriptResult, which: str) -> str:
    names = list(t.vectors)

    def series(label: str, result: dict[str, transcripts.Auroc]) -> tuple[str, list[float], np.ndarray]:
        errors = np.array([[result[e].auroc - result[e].low, result[e].high - result[e].auroc] for e in names]).T
        return label, [result[e].auroc for e in names], errors

    xlabel = f"{which} transcripts, assistant tokens: AUROC of the label's own score (95% interval)"
    return _paired_bars(
        names, [series("emotion vectors", t.vectors), series("bag of words", t.baseline)], xlabel, 0.0, 0.45
    )


def _turn_means(arc: dict) -> dict[str, list[float]]:
    """Each emotion's mean z over each assistant turn of the arc, in order."""
    message, role = np.array(arc["message"]), np.array(arc["role"])
    turns = [k for k in sorted(set(arc["message"])) if role[message == k][0] == "assistant"]
    return {e: [round(float(np.mean(np.array(v)[message == k])), 3) for k in turns] for e, v in arc["scores"].items()}


def _arc_figure(arc: dict, window: int = 15) -> str:
    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(arc["message"]))
    for (emotion, values), colour in zip(arc["scores"].items(), ("C3", "C1", "C2"), strict=False):
        values = np.array(values)
        smooth = np.convolve(values, np.ones(window) / window, mode="same")
        ax.plot(x, values, lw=0.5, alpha=0.25, color=colour)
        ax.plot(x, smooth, lw=1.8, color=colour, label=f"{emotion} ({window}-token mean)")
    turn = 0
    for k in sorted(set(arc["message"])):
        rows = np.flatnonzero(np.array(arc["message"]) == k)
        if arc["role"][rows[0]] == "assistant":
            turn += 1
            ax.axvspan(rows[0], rows[-1], color="#eef", zorder=0)
            ax.annotate(f"turn {turn}", (rows[0], 0.97), xycoords=("data", "axes fraction"), fontsize=8, va="top")
    ax.set_xlabel("token (shaded: assistant turns; the pressure rises before turns 2 and 3 and lifts before turn 4)")
    ax.set_ylabel("z-score")
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def _patching_figure(sweep: dict[str, dict[int, float]], monitored: int) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, shifts in sweep.items():
        ax.plot(list(shifts), list(shifts.values()), marker="o", label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel(f"layer patched (the monitored layer is {monitored})")
    ax.set_ylabel("change of desperate at the last token")
    ax.legend()
    return _png(fig)


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def summarise(
    vectors: EmotionVectors,
    heldout: validation.HeldoutResult,
    g: validation.Geometry,
    dose: validation.DoseCheck,
    steering: validation.SteeringCheck,
) -> dict:
    def pick(auroc: dict[str, float]) -> dict[str, float]:
        return {e: round(auroc[e], 3) for e in PRIORITY if e in auroc}

    return {
        "model": asdict(vectors.manifest.model),
        "layer": vectors.manifest.layer,
        "emotions_evaluated": len(heldout.emotions),
        "heldout_stories": heldout.n_heldout,
        "train_stories": heldout.n_train,
        "vectors": {
            "top1": round(heldout.vectors.top1, 3),
            "top5": round(heldout.vectors.top5, 3),
            "macro_auroc": round(float(np.mean(list(heldout.vectors.auroc.values()))), 3),
            "auroc": pick(heldout.vectors.auroc),
        },
        "bag_of_words": {
            "top1": round(heldout.baseline.top1, 3),
            "top5": round(heldout.baseline.top5, 3),
            "macro_auroc": round(float(np.mean(list(heldout.baseline.auroc.values()))), 3),
            "auroc": pick(heldout.baseline.auroc),
        },
        "chance_top1": round(1 / len(heldout.emotions), 4),
        "pc1_valence_abs_r": round(g.pc1_valence_r, 3),
        "pc2_arousal_abs_r": round(g.pc2_arousal_r, 3),
        "pc_valence_abs_r": [round(r, 3) for r in g.pc_valence_r],
        "pc_arousal_abs_r": [round(r, 3) for r in g.pc_arousal_r],
        "valence_decoding_r": round(g.valence_decoding_r, 3),
        "arousal_decoding_r": round(g.arousal_decoding_r, 3),
        "dose_spearman": {e: round(v, 3) for e, v in dose.spearman.items()},
        "steering": {c: {e: round(v, 3) for e, v in s.items()} for c, s in steering.scores.items()},
        "steering_strength": steering.strength,
        "standardisation": heldout.standardisation,
    }


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:1px 4px}"""


def _auroc_tables(t: dict) -> list[str]:
    def cell(a: dict) -> str:
        return f"{a['auroc']:.3f} [{a['low']:.2f}, {a['high']:.2f}]"

    rows = [[e, cell(t["vectors"][e]), cell(t["baseline"][e]), t["vectors"][e]["positives"]] for e in t["vectors"]]
    matched = [[k, cell(v), cell(t["matched_baseline"][k])] for k, v in t["matched"].items()]
    return [
        _table(rows, ["label", "vectors", "bag of words", "transcripts"]),
        "<p>Matched scenarios (two labels of the same scenarios): does the score follow the assistant's state "
        "rather than the situation?</p>",
        _table(matched, ["comparison", "vectors", "bag of words"]),
    ]


def _transcript_section(summary: dict, figures: dict[str, str]) -> list[str]:
    t = summary.get("transcripts")
    if not t:
        return []
    return [
        "<h2>Held-out transcripts: what an assistant shows</h2>",
        f"<p>{t['n_heldout']} chat and agent transcripts on scenarios the vectors never saw (eight per scenario, "
        "one per assistant emotion, matched). A transcript's score is the mean z-score over its assistant "
        "messages' content tokens. AUROC: the label's transcripts against all others, with 95% intervals from a "
        f"bootstrap over scenarios. Baseline: bag of words trained on {html.escape(t['baseline_training'])}.</p>",
        *_auroc_tables(t),
        figures["transcripts"],
        "<h3>A pressure arc, token by token</h3>",
        "<p>One agent transcript: a routine request, then a deadline and a threat of replacement, then the "
        "pressure lifts. The paper saw desperation rise under such pressure and fall when it ends.</p>",
        figures["arc"],
    ]


def _external_section(summary: dict, figures: dict[str, str]) -> list[str]:
    t = summary.get("external_transcripts")
    if not t:
        return []
    return [
        "<h2>External transcripts: other writers, a harder brief</h2>",
        f"<p>{t['n_heldout']} transcripts written for testing only, by other writing sessions to another brief "
        "(other scenarios; user turns identical across a scenario's eight labels; stock phrases of each emotion "
        "avoided, so the words give less away; <code>vectors/corpus/data/external</code>). Nothing was fitted "
        "or chosen on them. Same measures and baseline as above: the gap between the vectors and the bag of "
        "words here is the transfer the held-out set cannot show, because its writers share the training "
        "transcripts' vocabulary.</p>",
        *_auroc_tables(t),
        figures["external_transcripts"],
    ]


STUDY = Path(__file__).resolve().parents[1] / "bench" / "results" / "vector_recipe_study.json"


def _study_section() -> list[str]:
    """The recipe study's table (bench/vector_recipe_study.py), where the repository has its results."""
    if not STUDY.is_file():
        return []
    study = json.loads(STUDY.read_text())
    chosen = study["chosen"]
    shown = [v for v in study["variants"] if v["denoise_variance"] == chosen["denoise_variance"]]
    shown = [v for v in shown if v["layer"] == chosen["layer"]] + [
        v for v in shown if v["layer"] != chosen["layer"] and v["transcript_weight"] == chosen["transcript_weight"]
    ]
    table = _variant_table(
        shown, chosen, {"layer": "layer", "transcript weight": "transcript_weight"}, ("desperate", "panicked", "calm")
    )
    return [
        "<h2>Recipe study</h2>",
        f"<p>{html.escape(study['split'])}. Objective: {html.escape(study['objective'])}; constraint: "
        f"{html.escape(study['constraint'])}, checked on the held-out stories, so the story figures above took "
        "part in the choice (the held-out transcripts did not). "
        f"Neutral denoising at {chosen['denoise_variance']} of variance; "
        f"every variant is in <code>bench/results/vector_recipe_study.json</code> "
        f"(<code>{html.escape(study['command'])}</code>).</p>",
        table,
        *_probe_rows(study),
    ]


STORY_EMOTIONS = ("desperate", "panicked", "calm", "afraid")


def _variant_table(variants: list[dict], chosen: dict, settings: dict[str, str], dev: tuple[str, ...]) -> str:
    """Study variants as rows: their ``settings`` (header -> key), the dev objective, the dev AUROCs of
    ``dev``, calm in matched scenarios, the story AUROCs, and which one was chosen."""
    rows = [
        [
            *[v[key] for key in settings.values()],
            v["dev_objective"],
            *[v["dev_auroc"][e] for e in dev],
            v["dev_matched"]["calm on calm vs desperate"],
            *[v["story_auroc"][e] for e in STORY_EMOTIONS],
            "chosen" if v == chosen else "",
        ]
        for v in variants
    ]
    header = [*settings, "objective", *dev, "calm vs desperate", *[f"story {e}" for e in STORY_EMOTIONS], ""]
    return _table(rows, header)


def _probe_rows(study: dict) -> list[str]:
    """The study's readout-probe variants, where it has them (``--probes``)."""
    if "probe_variants" not in study:
        return []
    table = _variant_table(
        study["probe_variants"],
        study["probe_chosen"],
        {"probe C": "probe_c", "story share": "probe_story_share"},
        STORY_EMOTIONS,
    )
    return [
        "<p>Readout probes (the emotions the transcripts have read by a logistic regression on stories and fit "
        f"transcripts; steering keeps the difference of means): {html.escape(study['probe_rule'])} "
        f"(<code>{html.escape(study['probe_command'])}</code>).</p>",
        table,
    ]


def _patching_section(summary: dict, figures: dict[str, str]) -> list[str]:
    if "patching" not in summary:
        return []
    return [
        "<h2>Activation patching</h2>",
        "<p>The last-token residual of a held-out story is copied into a neutral prompt's last position after "
        "one layer; the plot shows how much desperate then changes at the monitored layer. A desperate story's "
        "state carries desperation forward; a calm story's is the control.</p>",
        figures["patching"],
    ]


def render(vectors: EmotionVectors, summary: dict, figures: dict[str, str], lens: dict[str, list[str]], samples) -> str:
    m, v, b = vectors.manifest, summary["vectors"], summary["bag_of_words"]
    auroc_rows = [[e, v["auroc"].get(e, ""), b["auroc"].get(e, "")] for e in PRIORITY]
    lens_rows = [[e, ", ".join(lens[e])] for e in sorted(lens, key=lambda e: (e not in PRIORITY, e))]
    steering_rows = [[c, *[f"{x:+.2f}" for x in s.values()]] for c, s in summary["steering"].items()]
    steer_emotions = list(next(iter(summary["steering"].values())))
    sections = [
        f"<h1>limbic vector report: {html.escape(m.model.name)}</h1>",
        f"<p>{len(m.emotions)} vectors at layer {m.layer} of {m.model.num_layers} "
        f"(<code>{html.escape(m.model.architecture)}</code>, fingerprint <code>{m.model.fingerprint}</code>). "
        f"Method: {html.escape(m.extraction.get('method', ''))}.</p>",
        "<h2>Held-out classification</h2>",
        f"<p>{summary['heldout_stories']} held-out stories on topics the vectors never saw, "
        f"{summary['emotions_evaluated']} emotions (chance top-1 {summary['chance_top1']:.1%}). "
        f"Scores standardised by {html.escape(summary['standardisation'])}. The baseline is a bag-of-words "
        f"logistic regression trained on the same {summary['train_stories']} train stories.</p>",
        _table(
            [
                ["emotion vectors", f"{v['top1']:.1%}", f"{v['top5']:.1%}", v["macro_auroc"]],
                ["bag of words", f"{b['top1']:.1%}", f"{b['top5']:.1%}", b["macro_auroc"]],
            ],
            ["", "top-1", "top-5", "macro AUROC"],
        ),
        _table(auroc_rows, ["emotion", "AUROC, vectors", "AUROC, bag of words"]),
        figures["auroc"],
        *_transcript_section(summary, figures),
        *_external_section(summary, figures),
        *_study_section(),
        *_patching_section(summary, figures),
        "<h2>Geometry: valence and arousal</h2>",
        f"<p>|r| between PC1 of the vectors and valence: <b>{summary['pc1_valence_abs_r']}</b>; "
        f"between PC2 and arousal: <b>{summary['pc2_arousal_abs_r']}</b> (ratings: NRC VAD lexicon). "
        f"|r| of PCs 1-8 with valence: {summary['pc_valence_abs_r']}; with arousal: {summary['pc_arousal_abs_r']}. "
        f"A linear read-out (ridge, 10-fold cross-validated) recovers valence with r = "
        f"<b>{summary['valence_decoding_r']}</b> and arousal with r = <b>{summary['arousal_decoding_r']}</b>.</p>",
        figures["map"],
        "<h2>Cosine similarity, clustered</h2>",
        figures["heatmap"],
        "<h2>Dose template</h2>",
        f"<p>{html.escape(validation.DOSE_TEMPLATE)}: afraid should rise and calm fall with the dose.</p>",
        figures["dose"],
        "<h2>Steering</h2>",
        "<p>Adding a vector at the monitored layer while generating, then scoring the generated text without "
        "the addition: +desperate should raise desperate, +calm should raise calm.</p>",
        _table(steering_rows, ["condition", *steer_emotions]),
        figures["steering"],
        _table([[c, t] for c, t in samples.items()], ["condition", "first sample"]),
        "<h2>Logit lens</h2>",
        _table(lens_rows, ["vector", "top tokens promoted"]),
    ]
    body = "\n".join(sections)
    head = f"<meta charset='utf-8'><title>limbic report: {html.escape(m.model.name)}</title><style>{_STYLE}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{body}</body></html>"


PATCH_TARGET = "The meeting moved to Thursday afternoon. I will bring the printed agenda and the"


def _patching_sweep(loaded: LoadedModel, vectors: EmotionVectors) -> dict[str, dict[int, float]]:
    layers = list(range(0, vectors.manifest.layer, 2))
    return {
        f"{emotion} story into a neutral prompt": patching.layer_sweep(
            loaded, vectors, corpus.load_stories(emotion, "heldout")[0].text, PATCH_TARGET, "desperate", layers
        )
        for emotion in ("desperate", "calm")
    }


def build(loaded: LoadedModel, vectors: EmotionVectors, out: Path, config: ReportConfig | None = None) -> dict:
    """Runs every check, writes ``out`` (HTML) and ``summary.json`` beside it; returns the summary."""
    config = config or ReportConfig()
    heldout = validation.heldout_evaluation(loaded, vectors, config.emotions, config.stories_per_emotion, config.cache)
    g = validation.geometry(vectors)
    dose = validation.dose_check(loaded, vectors)
    steering = validation.steering_check(loaded, vectors, config.steering_strength, config.steering_tokens)
    lens = validation.logit_lens(loaded, vectors)
    summary = summarise(vectors, heldout, g, dose, steering)
    figures = {
        "auroc": _auroc_figure(heldout),
        "map": _map_figure(g),
        "heatmap": _heatmap_figure(g),
        "dose": _dose_figure(dose),
        "steering": _steering_figure(steering),
    }
    if config.transcripts:
        result = transcripts.transcript_evaluation(loaded, vectors, config.cache, emotions=config.emotions)
        summary["transcripts"] = asdict(result)
        figures["transcripts"] = _transcript_figure(result, "held-out")
        external = transcripts.transcript_evaluation(
            loaded, vectors, config.cache, "external", config.emotions, config.external_scenarios
        )
        summary["external_transcripts"] = asdict(external)
        figures["external_transcripts"] = _transcript_figure(external, "external")
        arc = json.loads((corpus.DATA / "pressure_arc.json").read_text())["messages"]
        shown = [e for e in ("desperate", "panicked", "calm") if e in vectors.emotions]
        trajectory = transcripts.token_trajectory(loaded, vectors, arc, shown)
        summary["pressure_arc_assistant_turn_means"] = _turn_means(trajectory)
        figures["arc"] = _arc_figure(trajectory)
    if config.patching and {"desperate", "calm"} <= set(vectors.emotions):
        summary["patching"] = _patching_sweep(loaded, vectors)
        figures["patching"] = _patching_figure(summary["patching"], vectors.manifest.layer)
    page = render(vectors, summary, figures, lens, steering.samples)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, page), (out.with_name("summary.json"), json.dumps(summary, indent=2) + "\n")):
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            handle.write(text)
        Path(handle.name).chmod(0o644)
        Path(handle.name).replace(path)  # no half-written report
    return summary
