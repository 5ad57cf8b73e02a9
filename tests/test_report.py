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
    ):
        assert f"<h2>{heading}" in page
    assert page.count("data:image/png;base64,") == 5


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
