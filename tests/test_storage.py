from __future__ import annotations

import pytest
import torch
from limbic.vectors import storage
from limbic.vectors.storage import ModelIdentity, VectorFileError
from tiny import random_vectors

IDENTITY = ModelIdentity("m", "LlamaForCausalLM", hidden_size=16, num_layers=4, fingerprint="abc")


def test_round_trip(tmp_path):
    vectors = random_vectors(IDENTITY, 2, ["desperate", "calm"])
    vectors.save(tmp_path / "set")
    back = storage.load(tmp_path / "set")
    assert back.manifest == vectors.manifest
    assert torch.equal(back.directions, vectors.directions)


def test_steering_directions_round_trip_and_default_to_the_readout(tmp_path):
    vectors = random_vectors(IDENTITY, 2, ["desperate", "calm"])
    assert vectors.steering_directions is vectors.directions
    steering = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    with_steering = storage.EmotionVectors(vectors.manifest, vectors.directions, steering)
    with_steering.save(tmp_path / "set")
    back = storage.load(tmp_path / "set")
    assert torch.equal(back.directions, vectors.directions) and torch.equal(back.steering_directions, steering)


def test_steering_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import save_file

    vectors = random_vectors(IDENTITY, 2, ["desperate", "calm"])
    vectors.save(tmp_path / "set")
    save_file(
        {"directions": vectors.directions, "steering": torch.zeros(3, 16)}, str(tmp_path / "set" / storage.TENSORS)
    )
    with pytest.raises(VectorFileError, match=r"steering has shape \(3, 16\), manifest says \(2, 16\)"):
        storage.load(tmp_path / "set")


def test_steering_adds_the_steering_directions_not_the_readout():
    from limbic.monitors.steering import steering_vector

    vectors = random_vectors(IDENTITY, 2, ["desperate", "calm"])
    steering = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    split = storage.EmotionVectors(vectors.manifest, vectors.directions, steering)
    assert torch.allclose(steering_vector(split, {"calm": 0.5}, 10.0), 5.0 * steering[1])
    assert torch.allclose(steering_vector(vectors, {"calm": 0.5}, 10.0), 5.0 * vectors.directions[1].float())


def test_failed_save_keeps_the_previous_set_whole(tmp_path, monkeypatch):
    good = random_vectors(IDENTITY, 2, ["desperate", "calm"])
    good.save(tmp_path / "set")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "save_file", explode)
    with pytest.raises(OSError):
        random_vectors(IDENTITY, 3, ["afraid", "calm"], seed=5).save(tmp_path / "set")
    assert storage.load(tmp_path / "set").manifest == good.manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no staging folders left behind


def test_mismatch_names_the_rebuild_command():
    vectors = random_vectors(IDENTITY, 2, ["desperate"])
    other = ModelIdentity("n", "LlamaForCausalLM", hidden_size=32, num_layers=4, fingerprint="xyz")
    with pytest.raises(VectorFileError, match=r"hidden size 16 != model's 32.*limbic vectors extract"):
        storage.check_matches(vectors, other, "limbic vectors extract --out DIR")


def test_bad_folder_is_a_clear_error(tmp_path):
    with pytest.raises(VectorFileError, match="not a vector set"):
        storage.load(tmp_path)


def test_bundled_default_set_matches_the_default_model(default_model_path):
    from limbic.monitors import model_source
    from limbic.monitors.hf import model as hf_model

    vectors = storage.load(storage.bundled_folder(model_source.DEFAULT_MODEL_NAME))
    loaded = hf_model.load(model_source.resolve(None))
    storage.check_matches(vectors, loaded.identity, "")
    assert {"desperate", "panicked", "calm", "afraid"} <= set(vectors.emotions)
    assert vectors.manifest.layer == 20
    norms = vectors.directions.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
