"""The side channel that carries per-token scores from vLLM's workers to the API process.

One ZMQ message per forward pass (PUSH in the worker, PULL in the API process, over an ipc socket): a
JSON header (the requests' limbic keys, and the worker's cumulative forward and scoring seconds), then raw
little-endian arrays: query start offsets (int32, one more than keys), each row's position (int32),
z-scores (float32, rows x emotions) and residual norms (float32). Rows for a request nobody waits on
(finished, aborted, or a warm-up) are dropped. A header-only message with ``hello`` is the plugin saying it
runs (which runner, which layer), sent once at start-up.

The worker hands each pass's scores to a sender thread, off the forward path (on a GPU, with the event that
completes their asynchronous copy to pinned memory). Backpressure is sized in bytes: at most
``LIMBIC_VLLM_SCORE_BUFFER_MB`` of scores wait in the worker; beyond that the forward pass waits, so a reader
that falls far behind slows generation rather than losing scores or growing memory without bound. ZMQ's own
queues hold a few messages more on each side.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from limbic.monitors.engine import ScoredRows

log = logging.getLogger(__name__)

_HIGH_WATER_MARK = 8  # messages in each side's ZMQ queue; the byte budget bounds the rest
BUFFER_ENV = "LIMBIC_VLLM_SCORE_BUFFER_MB"
DEFAULT_BUFFER_MB = 64.0


def _buffer_bytes() -> int:
    return int(float(os.environ.get(BUFFER_ENV) or DEFAULT_BUFFER_MB) * 2**20)


class ScorePusher:
    """Worker side: queues each forward pass's scores and sends them from a thread."""

    def __init__(self, address: str, budget_bytes: int | None = None) -> None:
        self.budget_bytes = _buffer_bytes() if budget_bytes is None else budget_bytes
        self.queued_bytes = 0
        self.waited_s = 0.0  # how long forward passes waited for the reader (cumulative)
        self._queue: collections.deque[tuple[bytes, list[Any], Any, int]] = collections.deque()
        self._changed = threading.Condition()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._send_loop, args=(address,), name="limbic-scores", daemon=True)
        self._thread.start()

    def hello(self, info: dict[str, Any]) -> None:
        self._enqueue(json.dumps({"hello": info}).encode(), [], None)

    def push(
        self,
        keys: list[str],
        starts: np.ndarray,
        positions: np.ndarray,
        z: Any,
        norms: Any,
        times: dict[str, float],
        ready: Any = None,
    ) -> None:
        """Queues one pass. ``z`` and ``norms`` are numpy arrays or host tensors, complete once ``ready`` (a
        CUDA event, or None) has completed; the sender reads them only after that."""
        # "sent": when this forward pass scored its rows (CLOCK_MONOTONIC, shared by the processes of one
        # machine): the API measures scoring lag from it, so a reader that falls behind shows.
        header = json.dumps({"keys": keys, "times": dict(times), "sent": time.perf_counter()}).encode()
        self._enqueue(header, [starts, positions, z, norms], ready)

    def _enqueue(self, header: bytes, arrays: list[Any], ready: Any) -> None:
        size = len(header) + sum(_nbytes(a) for a in arrays)
        with self._changed:
            started = time.perf_counter()
            # One message larger than the whole budget still goes, alone.
            while self._queue and self.queued_bytes + size > self.budget_bytes and self._failed is None:
                self._changed.wait(1.0)
            self.waited_s += time.perf_counter() - started
            if self._failed is not None:
                raise RuntimeError("limbic: the score sender stopped") from self._failed
            self._queue.append((header, arrays, ready, size))
            self.queued_bytes += size
            self._changed.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until every queued message went to ZMQ (tests, shutdown)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue or self._failed is not None, timeout)

    def _send_loop(self, address: str) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, _HIGH_WATER_MARK)
        socket.connect(address)
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: bool(self._queue))
                    header, arrays, ready, size = self._queue[0]
                if ready is not None:
                    ready.synchronize()  # this thread waits for the copy, not the forward pass
                frames = [header, *(_little_endian(a) for a in arrays)]
                socket.send_multipart(frames, copy=False)  # blocks while the reader's queues are full
                with self._changed:
                    self._queue.popleft()
                    self.queued_bytes -= size
                    self._changed.notify_all()
        except BaseException as exc:  # the forward pass sees it at its next push
            log.exception("limbic: the score sender stopped")
            with self._changed:
                self._failed = exc
                self._changed.notify_all()


def _nbytes(array: Any) -> int:
    return int(array.nbytes) if isinstance(array, np.ndarray) else int(array.numel() * array.element_size())


def _little_endian(array: Any) -> np.ndarray:
    values = array if isinstance(array, np.ndarray) else array.numpy()
    return np.ascontiguousarray(values, "<i4" if values.dtype.kind in "iu" else "<f4")


class ScoreMissing(RuntimeError):
    """Scores for a token did not arrive in time: the worker-side plugin is not running, or vLLM stalled."""


class RequestScores:
    """One request's scores by position; rows arrive in any order and a recomputed position overwrites."""

    def __init__(self, capacity: int, width: int) -> None:
        self.z = np.zeros((capacity, width), np.float32)
        self.norms = np.zeros(capacity, np.float32)
        self.filled = np.zeros(capacity, bool)
        self.scored_at = np.zeros(capacity, np.float64)  # when the worker scored each position
        self._arrived = asyncio.Event()

    def write(self, positions: np.ndarray, z: np.ndarray, norms: np.ndarray, scored_at: float | None = None) -> int:
        """Stores rows by position; returns how many positions already had scores (recomputed by vLLM)."""
        keep = positions < len(self.filled)  # the one step vLLM may run past the last position we asked for
        positions = positions[keep]
        again = int(self.filled[positions].sum())
        self.z[positions] = z[keep]
        self.norms[positions] = norms[keep]
        self.filled[positions] = True
        self.scored_at[positions] = time.perf_counter() if scored_at is None else scored_at
        self._arrived.set()
        return again

    def ready(self, start: int, stop: int) -> bool:
        return bool(self.filled[start:stop].all())

    async def rows(self, start: int, stop: int, timeout: float) -> ScoredRows:
        """Positions ``start .. stop``, waiting up to ``timeout`` seconds for them to arrive."""
        assert stop <= len(self.filled), "rows beyond the capacity the request was opened with"
        deadline = time.monotonic() + timeout
        while not self.ready(start, stop):
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [int(p) for p in np.flatnonzero(~self.filled[start:stop])[:5] + start]
                raise ScoreMissing(f"no scores for positions {missing} after {timeout:.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        # The newest row decides: the lag is then how long the reader took once the last row it needed existed.
        scored_at = float(self.scored_at[start:stop].max()) if stop > start else time.perf_counter()
        return ScoredRows(self.z[start:stop].copy(), self.norms[start:stop].copy(), scored_at)


class ScoreReceiver:
    """API side: binds the socket and routes each message's rows to the requests waiting for them."""

    def __init__(self, address: str, width: int) -> None:
        self.address = address
        self.width = width
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, _HIGH_WATER_MARK)
        self._socket.bind(address)
        self._open: dict[str, RequestScores] = {}
        self._task: asyncio.Task | None = None
        self.worker_times: dict[str, float] = {}  # cumulative seconds the worker reports: forward, scoring
        self.recomputed = 0  # positions that arrived a second time (preempted requests are recomputed)
        self._heard = time.monotonic()  # the last message, or when requests started waiting for one
        self.hello: dict | None = None  # what the worker's plugin said at start-up
        self.said_hello = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="limbic-score-receiver")
        self._task.add_done_callback(self._stopped)

    @staticmethod
    def _stopped(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # every request will now time out: say why
            log.error("limbic: the score reader stopped", exc_info=task.exception())

    def open(self, key: str, capacity: int) -> RequestScores:
        if not self._open:  # nobody was waiting: silence before now says nothing
            self._heard = time.monotonic()
        scores = self._open[key] = RequestScores(capacity, self.width)
        return scores

    def problem(self, silence_s: float) -> str | None:
        """Why the channel cannot deliver scores now, or None: the reader stopped, or requests have waited
        ``silence_s`` seconds without a single message from the workers."""
        if self._task is not None and self._task.done():
            return "the score reader stopped"
        quiet = time.monotonic() - self._heard
        if self._open and quiet > silence_s:
            return f"no score message from vLLM's workers for {quiet:.0f} s while {len(self._open)} requests wait"
        return None

    def close_request(self, key: str) -> None:
        self._open.pop(key, None)

    async def _run(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                self._route(frames)
            except Exception:  # a malformed message must not stop the reader for everyone
                log.exception("limbic: dropped a malformed score message")

    def _route(self, frames: list[bytes]) -> None:
        self._heard = time.monotonic()
        header = json.loads(frames[0])
        if "hello" in header:
            self.hello = header["hello"]
            self.said_hello.set()
            return
        keys, sent = header["keys"], header.get("sent")
        self.worker_times = header["times"]
        starts = np.frombuffer(frames[1], "<i4")
        positions = np.frombuffer(frames[2], "<i4")
        z = np.frombuffer(frames[3], "<f4").reshape(len(positions), self.width)
        norms = np.frombuffer(frames[4], "<f4")
        for i, key in enumerate(keys):
            scores = self._open.get(key)
            if scores is not None:
                rows = slice(starts[i], starts[i + 1])
                self.recomputed += scores.write(positions[rows], z[rows], norms[rows], sent)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.close_now()

    def close_now(self) -> None:
        """Closes the socket without the reader task (which is not running yet, or has been cancelled)."""
        self._socket.close(linger=0)
        self._context.term()
