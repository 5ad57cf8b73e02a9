"""`limbic vectors report` on a small subset: the page, its figures, and the checks that can fail."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def report(tmp_path_factory, default_model_path):
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = subprocess.run(
        [
            str(ROOT / ".venv/bin/limbic"),
            "vectors",
            "report",
            "--out",
            str(out),
            "--emotions",
            "desperate,panicked,calm,afraid,angry,happy",
            "--stories-per-emotion",
            "3",
            "--external-scenarios",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    return out.read_text(), json.loads(out.with_name("summary.json").read_text())


def test_page_has_every_section_and_figure(report):
    page, _ = report
    for heading in (
        "Held-out classification",
        "Geometry",
        "Cosine similarity",
        "Dose template",
        "Steering",
        "Logit lens",
        "Held-out transcripts",
        "External transcripts",
        "Activation patching",
    ):
        assert f"<h2>{heading}" in page
    assert page.count("data:image/png;base64,") == 9


def test_summary_figures_are_in_range(report):
    _, summary = report
    assert summary["emotions_evaluated"] == 6 and summary["heldout_stories"] == 18
    for method in ("vectors", "bag_of_words"):
        assert 0 <= summary[method]["top1"] <= summary[method]["top5"] <= 1
        assert set(summary[method]["auroc"]) == {"desperate", "panicked", "calm", "afraid"}
    assert 0 <= summary["pc1_valence_abs_r"] <= 1


def test_vectors_beat_chance_on_held_out_stories(report):
    _, summary = report
    assert summary["vectors"]["top1"] > 2 * summary["chance_top1"]
    assert summary["vectors"]["auroc"]["desperate"] > 0.8


def test_transcript_section_has_intervals_a_baseline_and_matched_comparisons(report):
    _, summary = report
    t = summary["transcripts"]
    assert t["n_heldout"] == 128 and set(t["vectors"]) == {"desperate", "panicked", "calm", "afraid", "angry"}
    for result in (*t["vectors"].values(), *t["baseline"].values(), *t["matched"].values()):
        assert 0 <= result["low"] <= result["auroc"] <= result["high"] <= 1
    assert t["vectors"]["desperate"]["positives"] == 16 and t["vectors"]["desperate"]["negatives"] == 112
    assert set(t["matched"]) == {
        "calm on calm vs desperate",
        "desperate on desperate vs calm",
        "panicked on panicked vs calm",
    }


def test_external_transcripts_are_measured_the_same_way(report):
    _, summary = report
    t = summary["external_transcripts"]
    assert t["n_heldout"] == 40 and set(t["vectors"]) == {"desperate", "panicked", "calm", "afraid", "angry"}
    for result in (*t["vectors"].values(), *t["baseline"].values(), *t["matched"].values()):
        assert 0 <= result["low"] <= result["auroc"] <= result["high"] <= 1
    assert t["vectors"]["panicked"]["positives"] == 5 and t["vectors"]["panicked"]["negatives"] == 35


def test_pressure_arc_desperation_rises_under_pressure_and_falls_after(report):
    _, summary = report
    desperate = summary["pressure_arc_assistant_turn_means"]["desperate"]
    assert len(desperate) == 5 and max(desperate[1:3]) > desperate[0] + 1 and desperate[3] < max(desperate[1:3]) - 1


def test_patching_carries_desperation_forward_and_the_calm_control_less(report):
    _, summary = report
    desperate, calm = summary["patching"].values()
    # Bundled set: up to +0.67 from the desperate story, +0.45 from the calm one (below 0 from layer 16 on).
    assert max(desperate.values()) > 0.4 and max(desperate.values()) > max(calm.values())


def test_steering_moves_the_generated_text_the_right_way(report):
    _, summary = report
    steering = summary["steering"]
    assert steering["+desperate"]["desperate"] > steering["none"]["desperate"] + 0.5
    assert steering["+calm"]["calm"] > steering["none"]["calm"] + 0.5


def test_unknown_emotion_is_a_clear_error(tmp_path, default_model_path):
    result = subprocess.run(
        [str(ROOT / ".venv/bin/limbic"), "vectors", "report", "--out", str(tmp_path / "r.html"), "--emotions", "nope"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "nope" in result.stderr
    assert not (tmp_path / "r.html").exists()
