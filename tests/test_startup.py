"""`limbic serve` refuses bad configurations with a message that names the fix, and exits 2."""

from __future__ import annotations

import subprocess

from conftest import ROOT, free_port
from limbic.vectors.storage import ModelIdentity
from tiny import random_vectors


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [str(ROOT / ".venv/bin/limbic"), "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_serve_refuses_vectors_for_another_model(tmp_path, default_model_path):
    identity = ModelIdentity("other", "LlamaForCausalLM", hidden_size=64, num_layers=30, fingerprint="0" * 16)
    random_vectors(identity, 20, ["desperate", "panicked"]).save(tmp_path / "wrong")
    result = serve("--vectors", str(tmp_path / "wrong"))
    assert result.returncode == 2
    assert "limbic vectors extract" in result.stderr and "hidden size 64" in result.stderr


def test_serve_refuses_an_unreachable_redis():
    result = serve("--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 2
    assert "cannot reach Redis" in result.stderr and "unset it" in result.stderr


def test_serve_refuses_a_model_path_that_is_not_a_model(tmp_path):
    result = serve("--model", str(tmp_path))
    assert result.returncode == 2 and "no config.json" in result.stderr


def test_serve_refuses_alert_rules_for_unknown_emotions(default_model_path):
    result = serve(env={"LIMBIC_ALERT_RULES": '{"nonexistent": {"warning": 1}}'})
    assert result.returncode == 2 and "nonexistent" in result.stderr


def test_malformed_settings_are_named():
    result = serve(env={"LIMBIC_ALERT_RULES": '{"desperate": {"warning": "high"}}'})
    assert result.returncode == 2 and "invalid settings" in result.stderr and "warning" in result.stderr


def test_serve_refuses_steering_with_unknown_emotions(default_model_path):
    result = serve(env={"LIMBIC_STEER": '{"nonexistent": 0.1}'})
    assert result.returncode == 2 and "LIMBIC_STEER" in result.stderr and "nonexistent" in result.stderr


def test_serve_refuses_the_vllm_engine_where_vllm_cannot_start(default_model_path):
    # A context longer than the model's: vLLM's own config check refuses, and limbic names the way out.
    result = serve("--engine", "vllm", env={"LIMBIC_VLLM_MAX_MODEL_LEN": "100000"})
    assert result.returncode == 2 and "vLLM did not start" in result.stderr
    assert "--engine transformers" in result.stderr
