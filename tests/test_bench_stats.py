"""The statistics of bench/vllm_serving.py (ABBA blocks, ratios, spreads, targets) and the comparisons of
bench/gpu_check.py, on made-up numbers: no server, no model."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_check
import vllm_serving as vs


def run(
    block: int, arm: str, tps: float, ttft: float = 0.1, itl: float = 0.01, errors: int = 0, first: float | None = None
) -> dict:
    return {
        "block": block,
        "arm": arm,
        "tokens_per_second": tps,
        "ttft_p50_seconds": ttft,
        "ttft_p99_seconds": ttft * 2,
        "itl_p50_seconds": itl,
        "itl_p99_seconds": itl * 3,
        "first_itl_p50_seconds": itl if first is None else first,
        "wall_seconds": 1.0,
        "completion_tokens": 64,
        "errors": errors,
        "short_requests": 0,
        "loadavg_1m_before": 1.0,
    }


def test_percentile_interpolates_between_ranks_and_ignores_nan():
    assert vs.percentile([4, 1, 3, 2], 50) == 2.5
    assert vs.percentile([1, 2, 3, 4], 0) == 1
    assert vs.percentile([1, 2, 3, 4], 100) == 4
    assert vs.percentile([1, 2, 3, 4, 5], 25) == 2
    assert vs.percentile([10, math.nan], 99) == 10
    assert math.isnan(vs.percentile([], 50))


def test_spread_gives_median_range_and_quartiles():
    s = vs.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"n": 5, "median": 3.0, "min": 1.0, "max": 5.0, "q1": 2.0, "q3": 4.0}
    assert vs.spread([math.nan, 2.0])["n"] == 1
    assert math.isnan(vs.spread([])["median"])


def test_abba_order_interleaves_each_block():
    assert vs.abba_order(2) == [
        (0, "vllm"),
        (0, "limbic"),
        (0, "limbic"),
        (0, "vllm"),
        (1, "vllm"),
        (1, "limbic"),
        (1, "limbic"),
        (1, "vllm"),
    ]


def test_ratio_is_per_block_then_median_with_its_spread():
    # Block 0: vLLM 100 and 110 (mean 105), limbic 98 and 99 (98.5): 0.938. Block 1: vLLM 90, 100 (95),
    # limbic 95, 96 (95.5): 1.005. Block 2, a slow spell that hits both arms: vLLM 50, 50; limbic 49, 49: 0.98.
    runs = [
        run(0, "vllm", 100),
        run(0, "limbic", 98),
        run(0, "limbic", 99),
        run(0, "vllm", 110),
        run(1, "vllm", 90),
        run(1, "limbic", 95),
        run(1, "limbic", 96),
        run(1, "vllm", 100),
        run(2, "vllm", 50),
        run(2, "limbic", 49),
        run(2, "limbic", 49),
        run(2, "vllm", 50),
    ]
    ratios = vs.block_ratios(runs)
    assert ratios == pytest.approx([98.5 / 105, 95.5 / 95, 0.98])
    level = vs.summarise_level(8, runs)
    assert level["limbic_over_vllm_tokens_per_second"]["median"] == 0.98
    assert level["limbic_over_vllm_tokens_per_second"]["min"] == round(98.5 / 105, 3)
    assert level["limbic_over_vllm_tokens_per_second"]["max"] == round(95.5 / 95, 3)
    assert level["limbic_over_vllm_tokens_per_second"]["n"] == 3
    # Per arm: the median of its six runs, with the range.
    assert level["arms"]["vllm"]["tokens_per_second"]["median"] == 95.0
    assert level["arms"]["vllm"]["tokens_per_second"]["min"] == 50
    assert level["arms"]["limbic"]["tokens_per_second"]["max"] == 99
    assert len(level["runs"]) == 12


def test_ttft_added_and_decode_step_in_milliseconds():
    runs = [
        run(0, "vllm", 100, ttft=0.100, itl=0.020),
        run(0, "limbic", 95, ttft=0.125, itl=0.021),
        run(0, "limbic", 95, ttft=0.135, itl=0.021),
        run(0, "vllm", 100, ttft=0.110, itl=0.022),
        run(1, "vllm", 100, ttft=0.100, itl=0.024),
        run(1, "limbic", 99, ttft=0.150, itl=0.025),
        run(1, "limbic", 99, ttft=0.150, itl=0.025),
        run(1, "vllm", 100, ttft=0.100, itl=0.024),
    ]
    level = vs.summarise_level(32, runs)
    # Block 0: 130 - 105 = 25 ms; block 1: 150 - 100 = 50 ms.
    assert level["ttft_p50_added_ms"]["median"] == pytest.approx(37.5)
    assert level["ttft_p50_added_ms"]["min"] == pytest.approx(25.0)
    assert level["ttft_p50_added_ms"]["max"] == pytest.approx(50.0)
    # One decode step: vLLM's ITL p50, median over its runs (20, 22, 24, 24 ms).
    assert level["decode_step_ms"] == pytest.approx(23.0)
    targets = vs.check_targets([level])
    ratio_target = next(t for t in targets if "tokens/s" in t["target"])
    ttft_target = next(t for t in targets if "TTFT" in t["target"])
    assert ratio_target["value"] == pytest.approx(0.97) and ratio_target["pass"]  # 95/100 and 99/100
    assert ttft_target["limit"] == pytest.approx(23.0) and not ttft_target["pass"]


def test_ttft_target_is_the_step_after_the_first_token_and_the_median_step_is_kept():
    runs = [
        run(0, "vllm", 100, ttft=0.100, itl=0.020, first=0.060),
        run(0, "limbic", 99, ttft=0.150),
        run(0, "limbic", 99, ttft=0.150),
        run(0, "vllm", 100, ttft=0.100, itl=0.020, first=0.060),
    ]
    level = vs.summarise_level(32, runs)
    assert level["first_step_ms"] == pytest.approx(60.0) and level["decode_step_ms"] == pytest.approx(20.0)
    ttft_target = next(t for t in vs.check_targets([level]) if "TTFT" in t["target"])
    assert ttft_target["value"] == pytest.approx(50.0) and ttft_target["limit"] == pytest.approx(60.0)
    assert ttft_target["pass"] and not ttft_target["within_median_decode_step"]


def test_ratio_target_applies_at_8_and_32_only_and_a_block_missing_an_arm_is_left_out():
    runs = [run(0, "vllm", 100), run(0, "limbic", 90), run(0, "limbic", 90), run(0, "vllm", 100)]
    runs += [run(1, "vllm", 100)]  # a block cut short (the deadline): no limbic run, no ratio
    level = vs.summarise_level(1, runs)
    assert level["limbic_over_vllm_tokens_per_second"]["n"] == 1
    assert [t["target"] for t in vs.check_targets([level])] == [vs.TTFT_TARGET]
    level8 = vs.summarise_level(8, runs)
    assert not next(t for t in vs.check_targets([level8]) if "tokens/s" in t["target"])["pass"]


def test_run_figures_count_tokens_errors_and_short_requests():
    results = [
        vs.RequestResult(ttft=0.1, itls=[0.01, 0.02], latency=0.13, tokens=3),
        vs.RequestResult(ttft=0.3, itls=[0.03, 0.04], latency=0.37, tokens=3),
        vs.RequestResult(ttft=0.2, itls=[0.05], latency=0.25, tokens=2),  # short: ignore_eos should prevent it
        vs.RequestResult(error="APIConnectionError: refused"),
    ]
    figures = vs.run_figures(results, wall=2.0, concurrency=2, max_tokens=3)
    assert figures["first_itl_p50_seconds"] == 0.03  # the first gaps: 0.01, 0.03, 0.05
    assert figures["completion_tokens"] == 8
    assert figures["tokens_per_second"] == 4.0
    assert figures["errors"] == 1 and figures["short_requests"] == 1
    assert figures["ttft_p50_seconds"] == 0.2
    assert figures["itl_p50_seconds"] == 0.03
    assert figures["itl_p99_seconds"] == pytest.approx(0.0496)


def reply(prompt: list[str], generation: list[str], z_prompt: np.ndarray, z_generation: np.ndarray) -> gpu_check.Reply:
    return gpu_check.Reply(prompt, z_prompt, generation, z_generation, [1.0] * len(generation), "", None, 0)


def test_compare_stops_at_the_first_differing_token():
    z_prompt = np.array([[np.nan, np.nan], [0.5, -1.0], [1.5, 2.0]])  # the sink first: null scores
    z_gen = np.array([[0.1, 0.2], [0.3, 0.4], [9.0, 9.0]])
    a = reply(["<s>", "a", "b"], ["x", "y", "z"], z_prompt, z_gen)
    b = reply(["<s>", "a", "b"], ["x", "y", "w"], z_prompt + 0.001, z_gen * np.array([[1], [1], [0]]))
    result = gpu_check.compare(a, b)
    assert not result["tokens_equal"] and result["first_divergence"] == 2
    assert result["compared_tokens"] == 4  # two prompt tokens (not the sink) and two shared generated ones
    assert result["max_abs_diff"] == pytest.approx(0.001)
    assert result["null_mismatches"] == 0
    assert gpu_check.compare(a, a)["tokens_equal"]
    other_prompt = reply(["<s>", "a", "c"], ["x"], z_prompt, z_gen[:1])
    assert gpu_check.compare(a, other_prompt)["max_abs_diff"] == math.inf


def test_first_divergence_counts_a_length_difference():
    assert gpu_check.first_divergence(["a", "b"], ["a", "b"]) is None
    assert gpu_check.first_divergence(["a", "b"], ["a"]) == 1
    assert gpu_check.first_divergence(["a", "b"], ["c", "b"]) == 0


@pytest.mark.parametrize(
    "module", ["api_overhead", "detokenise", "gpu_check", "mitigation", "scoring_overhead", "vector_recipe_study"]
)
def test_every_benchmark_script_imports(module):
    """A benchmark runs rarely, so an import it lost (a helper renamed elsewhere) would go unseen until then."""
    importlib.import_module(module)
