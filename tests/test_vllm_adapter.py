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


def _fake_engine(outputs, scores):
    """A VLLMEngine without vLLM: ``generate``'s own logic over a scripted output stream and score buffer."""
    import contextlib
    from types import SimpleNamespace

    from limbic.monitors.vllm.engine import VLLMEngine

    engine = object.__new__(VLLMEngine)
    engine.options = SimpleNamespace(score_timeout=5.0)
    engine.decode = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)
    engine._eos = [0]
    engine._prompt_cache = None

    @contextlib.asynccontextmanager
    async def request(prompt_ids, params, max_tokens, reads):
        try:
            yield scores, outputs
        finally:
            await outputs.aclose()

    engine._request = request
    return engine


def _output(token, finished=False):
    from types import SimpleNamespace

    sample = SimpleNamespace(token_ids=[token], logprobs=None, finish_reason="length" if finished else None)
    return SimpleNamespace(outputs=[sample], finished=finished, num_cached_tokens=0)


def test_a_token_is_released_once_scored_without_waiting_for_the_next_output():
    """Token k is scored in the step that samples k+1; its score usually arrives before that step's output,
    and the token leaves then (TTFT and per-token latency), not with the next output."""
    import asyncio

    import numpy as np
    from limbic.monitors.engine import SamplingParams
    from limbic.monitors.vllm.scores import RequestScores

    async def scenario():
        scores = RequestScores(capacity=8, width=2)
        second = asyncio.Event()
        closed = []

        async def outputs():
            try:
                yield _output(3)
                await second.wait()
                yield _output(4)
                yield _output(5, finished=True)
            finally:
                closed.append(True)

        def score(*positions):
            at = np.array(positions, dtype=np.int64)
            scores.write(at, np.full((len(at), 2), float(positions[0]), np.float32), np.ones(len(at), np.float32))

        score(0, 1)  # the prompt, scored in the prefill that sampled the first token
        steps = _fake_engine(outputs(), scores).generate([7, 8], SamplingParams(max_tokens=3))
        prompt = await asyncio.wait_for(anext(steps), 2)
        assert prompt.phase == "prompt" and len(prompt.scores.z) == 2
        released = asyncio.ensure_future(anext(steps))
        await asyncio.sleep(0.05)
        assert not released.done()  # not scored yet: the first token waits
        score(2)  # the step after the prefill scores the first token, before its own output arrives
        first = await asyncio.wait_for(released, 2)
        assert first.token_ids == [3] and first.score_start == 0 and float(first.scores.z[0, 0]) == 2.0
        assert not second.is_set()
        second.set()
        score(3)
        score(4)
        rest = [step async for step in steps]
        assert [s.token_ids for s in rest] == [[4], [5]] and rest[-1].finish_reason == "length"
        assert closed == [True]

    asyncio.run(scenario())


def test_a_consumer_leaving_while_the_next_output_is_awaited_cancels_it():
    import asyncio

    import numpy as np
    from limbic.monitors.engine import SamplingParams
    from limbic.monitors.vllm.scores import RequestScores

    async def scenario():
        scores = RequestScores(capacity=8, width=2)
        cancelled = []

        async def outputs():
            yield _output(3)
            try:
                await asyncio.sleep(60)  # vLLM still computing the next step
            except asyncio.CancelledError:
                cancelled.append(True)  # vLLM's generate aborts the request here
                raise
            yield _output(4)

        scores.write(np.array([0, 1, 2]), np.zeros((3, 2), np.float32), np.ones(3, np.float32))
        steps = _fake_engine(outputs(), scores).generate([7, 8], SamplingParams(max_tokens=3))
        await anext(steps)  # the prompt
        first = await asyncio.wait_for(anext(steps), 2)
        assert first.token_ids == [3]
        await asyncio.wait_for(steps.aclose(), 2)
        assert cancelled == [True]

    asyncio.run(scenario())
