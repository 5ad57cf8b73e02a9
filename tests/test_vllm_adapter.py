"""The vLLM adapter's start-up choices and guards, without a server: the model runner, the splitting ops from
vLLM's own logic, the refusal of full CUDA graphs, and the check that every forward pass ran the tap."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

from limbic.monitors.engine import EngineStartupError
from limbic.monitors.vllm import engine, plugin


def test_splitting_ops_are_vllms_defaults_plus_the_tap():
    ops = engine.splitting_ops()
    assert ops[-1] == plugin.OP_NAME and ops.count(plugin.OP_NAME) == 1
    assert "vllm::unified_attention_with_output" in ops  # vLLM's attention op, from its own logic


def test_an_explicit_v2_runner_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(EngineStartupError, match="VLLM_USE_V2_MODEL_RUNNER=1"):
        engine._choose_v1_runner()
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    engine._choose_v1_runner()
    import os

    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"


@pytest.mark.parametrize("mode", ["FULL", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"])
def test_full_cuda_graphs_are_refused_at_load(mode):
    from vllm.config.compilation import CUDAGraphMode

    runner = SimpleNamespace(vllm_config=SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=None)))
    runner.vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode[mode]
    with pytest.raises(RuntimeError, match=f"cudagraph_mode is {mode}"):
        plugin._refuse_full_graphs(runner)
    runner.vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
    plugin._refuse_full_graphs(runner)


def test_a_forward_pass_without_the_tap_stops_loudly():
    monitor = plugin.LayerMonitor.__new__(plugin.LayerMonitor)
    monitor.taps, monitor.times = 0, {"forward": 0.0, "scoring": 0.0}

    def tapped(output):  # a forward pass that ran the op
        monitor.taps += 1

    def replayed(output):  # a full graph replay: the kernels ran, the op's Python did not
        pass

    step = SimpleNamespace(total_num_scheduled_tokens=3)
    monitor._timed(tapped)(step)
    monitor._timed(replayed)(SimpleNamespace(total_num_scheduled_tokens=0))  # nothing scheduled: no forward
    with pytest.raises(RuntimeError, match="without limbic's tap"):
        monitor._timed(replayed)(step)


def test_positions_come_from_the_runners_host_state(monkeypatch):
    monkeypatch.setattr(plugin, "_VERIFY_POSITIONS", False)  # the suite's servers verify; this stand-in has none
    # Two requests: one decoding its 8th token (7 computed), one prefilling a chunk of 3 after 4 computed.
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(num_reqs=2, req_ids=["a", "b"], num_computed_tokens_cpu=np.array([7, 4, 0])),
        query_start_loc=SimpleNamespace(np=np.array([0, 1, 4, 0], np.int32)),
    )
    layout = plugin._BatchLayout.read(runner)
    assert layout.req_ids == ["a", "b"] and layout.starts.tolist() == [0, 1, 4]
    assert layout.positions.tolist() == [7, 4, 5, 6]
