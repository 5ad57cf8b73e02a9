"""The extraction pipeline end to end on a tiny random Llama (fast), plus its building blocks."""

from __future__ import annotations

import pytest
import torch
from limbic.vectors import corpus
from limbic.vectors.activations import token_activations
from limbic.vectors.extraction import (
    ExtractionConfig,
    _chat_ids,
    choose_layer,
    extract,
    neutral_components,
    probe_direction,
    project_out,
)
from tiny import loaded, tiny_llama

EMOTIONS = ["desperate", "panicked", "calm", "afraid"]


@pytest.fixture(scope="module")
def tiny(default_model_path):
    return loaded(tiny_llama(layers=6), default_model_path)


@pytest.fixture(scope="module")
def extracted(tiny):
    config = ExtractionConfig(emotions=EMOTIONS, stories_per_emotion=3, neutral_dialogues=12, progress=False)
    return extract(tiny, config)


def test_manifest_records_the_model_layer_and_sweep(tiny, extracted):
    m = extracted.manifest
    assert m.model == tiny.identity and m.emotions == EMOTIONS and m.layer == 4  # round(6 * 2 / 3)
    assert len(m.extraction["layer_sweep_heldout_top1"]) == 6
    assert m.extraction["train_stories"] == 12 and m.extraction["heldout_stories"] == 12
    assert m.thresholds is not None and all(
        c >= w for c, w in zip(m.thresholds.critical, m.thresholds.warning, strict=True)
    )
    norms = extracted.directions.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_calibration_makes_neutral_chat_score_zero_mean_unit_std(tiny, extracted):
    chats = [_chat_ids(tiny, d) for d in corpus.load_neutral_dialogues("train", 12)]
    rows = token_activations(tiny, chats, extracted.manifest.layer)
    c = extracted.manifest.calibration
    rows = rows[rows.norm(dim=-1) < c.sink_norm]
    z = (rows @ extracted.directions.T - torch.tensor(c.mean)) / torch.tensor(c.std)
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-3)
    assert torch.allclose(z.std(0), torch.ones(4), atol=1e-3)


def test_project_out_leaves_nothing_along_removed_directions():
    torch.manual_seed(0)
    vectors, removed = torch.randn(5, 32), torch.randn(3, 32)
    cleaned = project_out(vectors, removed)
    assert torch.allclose(cleaned @ removed.T, torch.zeros(5, 3), atol=1e-4)


def test_neutral_components_explain_the_requested_variance():
    torch.manual_seed(0)
    rows = torch.randn(400, 16) * torch.linspace(5, 0.1, 16)
    components = neutral_components(rows, 0.5)
    centered = rows - rows.mean(0)
    explained = (centered @ components.T).square().sum() / centered.square().sum()
    assert explained >= 0.5 and len(components) < 16


def test_layer_choice():
    sweep = [0.1, 0.2, 0.3, 0.9, 0.4, 0.5, 0.45, 0.3, 0.2, 0.2, 0.99, 0.1]
    assert choose_layer(None, sweep) == 8  # two thirds of 12
    assert choose_layer(5, sweep) == 5
    assert choose_layer("auto", sweep) == 5  # best in the middle band, layers 4-9; 3 and 10 lie outside


def test_unknown_emotion_is_refused(tiny):
    with pytest.raises(ValueError, match="no stories"):
        extract(tiny, ExtractionConfig(emotions=["desperate", "bliss"], progress=False))


def test_dialogue_directions_are_centred_over_labels_and_skip_neutral_and_absent_emotions():
    from limbic.vectors.extraction import combine, dialogue_directions

    means = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])  # two per label
    labels = ["calm", "calm", "neutral", "desperate"]
    directions = dialogue_directions(means, labels, ["calm", "afraid"])
    assert set(directions) == {"calm"}  # neutral is the reference, desperate is not among the emotions
    grand = torch.stack([means[:2].mean(0), means[2], means[3]]).mean(0)
    assert torch.allclose(directions["calm"], means[:2].mean(0) - grand)
    raw = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    combined = combine(raw, {"calm": torch.tensor([2.0, 0.0])}, ["calm", "afraid"], weight=1.0)
    assert torch.allclose(combined[0], torch.tensor([3.0, 3.0]))  # unit story + unit dialogue, story norm kept
    assert torch.equal(combined[1], raw[1])  # an emotion without transcripts is untouched


def test_extraction_records_the_transcripts_it_used(extracted):
    extraction = extracted.manifest.extraction
    assert extraction["transcripts"] == ["afraid", "calm", "desperate", "panicked"]
    assert extraction["train_transcripts"] == 512 and extraction["transcript_weight"] == 0.5
    assert extraction["transcript_weights"] == dict.fromkeys(["afraid", "calm", "desperate", "panicked"], 0.5)


def test_transcript_emotions_are_read_by_probes_and_steered_by_the_means(tiny, extracted):
    assert extracted.manifest.extraction["readout_probes"] == ["afraid", "calm", "desperate", "panicked"]
    assert extracted.manifest.extraction["probe_story_share"] == 0.8
    assert extracted.steering is not None and extracted.steering.shape == extracted.directions.shape
    norms = extracted.steering.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # The readout differs from the steering direction, and with --readout mean the two are one.
    assert not torch.allclose(extracted.directions, extracted.steering)
    config = ExtractionConfig(
        emotions=EMOTIONS, stories_per_emotion=3, neutral_dialogues=12, progress=False, readout="mean"
    )
    means = extract(tiny, config)
    assert means.steering is None and means.manifest.extraction["readout_probes"] == []
    assert torch.allclose(means.directions, extracted.steering, atol=1e-5)


def test_probe_finds_the_planted_direction_and_ignores_the_corpus_offset():
    generator = torch.Generator().manual_seed(0)
    hidden, planted, offset = 24, torch.zeros(24), torch.zeros(24)
    planted[3], offset[7] = 1.0, 1.0

    def corpus_rows(n: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        positive = torch.arange(n) % 4 == 0
        rows = torch.randn(n, hidden, generator=generator) * 0.5 + positive[:, None] * planted * 2 + shift * offset
        return rows, positive

    stories, story_positive = corpus_rows(400, 0.0)
    transcripts, transcript_positive = corpus_rows(80, 5.0)  # another genre: far along `offset`
    removed = torch.zeros(1, hidden)
    removed[0, 11] = 1.0
    direction = probe_direction(stories, story_positive, transcripts, transcript_positive, removed, c=1.0)
    assert abs(float(direction.norm()) - 1) < 1e-5 and abs(float(direction[11])) < 1e-6
    assert float(direction @ planted) > 0.9 and abs(float(direction @ offset)) < 0.2


def test_probe_needs_both_classes_in_both_corpora_and_a_share_between_0_and_1():
    rows, some = torch.randn(8, 4), torch.arange(8) < 2
    with pytest.raises(ValueError, match="positives and negatives"):
        probe_direction(rows, torch.zeros(8, dtype=torch.bool), rows, some, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"between 0 and 1, not 1\.0"):
        probe_direction(rows, some, rows, some, torch.zeros(1, 4), story_share=1.0)


def test_the_story_share_decides_which_corpus_the_probe_follows():
    """Stories mark the label along one axis, transcripts along another: the share tilts the probe."""
    generator = torch.Generator().manual_seed(1)
    positive = torch.arange(200) % 2 == 0
    stories = torch.randn(200, 6, generator=generator) * 0.3
    stories[:, 0] += positive * 1.0
    transcripts = torch.randn(200, 6, generator=generator) * 0.3
    transcripts[:, 1] += positive * 1.0
    removed = torch.zeros(1, 6)
    removed[0, 5] = 1.0
    lean = [probe_direction(stories, positive, transcripts, positive, removed, 1.0, share) for share in (0.2, 0.8)]
    assert lean[0][1] > lean[0][0] and lean[1][0] > lean[1][1]


def test_per_emotion_transcript_weights_override_the_shared_one():
    from limbic.vectors.extraction import combine

    raw, dialogue = torch.randn(3, 8), {"a": torch.randn(8), "b": torch.randn(8)}
    mixed = combine(raw, dialogue, ["a", "b", "c"], {"a": 1.0, "b": 0.5})
    assert torch.allclose(mixed[0], combine(raw, dialogue, ["a", "b", "c"], 1.0)[0])
    assert torch.allclose(mixed[1], combine(raw, dialogue, ["a", "b", "c"], 0.5)[1])
    assert torch.equal(mixed[2], raw[2])
    config = ExtractionConfig(transcript_weight=0.5, transcript_weights={"desperate": 1.0})
    assert config.weight_of("desperate") == 1.0 and config.weight_of("calm") == 0.5
