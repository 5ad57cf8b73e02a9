"""vLLM's score channel in process, over a real ZMQ socket: rows routed by request key and position, in any
order, recomputed positions counted, rows past a request's capacity dropped, malformed messages survived,
missing rows reported, and the worker's scoring time carried for the lag metric."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import zmq
from limbic.monitors.vllm.scores import ScoreMissing, ScorePusher, ScoreReceiver

WIDTH = 3


def rows(positions: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.array(positions, np.int32)
    z = np.stack([p * 1.0, p * 10.0, -p * 1.0], axis=1).astype(np.float32)
    return p, z, np.full(len(p), 7.0, np.float32)


def test_rows_are_routed_by_key_and_position(tmp_path):
    async def scenario() -> None:
        address = f"ipc://{tmp_path}/scores"
        receiver = ScoreReceiver(address, WIDTH)
        receiver.start()
        pusher = ScorePusher(address)
        a, b = receiver.open("a", capacity=4), receiver.open("b", capacity=2)
        # One forward pass with both requests, a's rows out of order; then a recomputation of a's 0 and 1,
        # a row past b's capacity, and a request nobody waits for.
        pa, za, na = rows([2, 0])
        pb, zb, nb = rows([0, 1, 2])
        starts = np.array([0, 2, 5], np.int32)
        pusher.push(
            ["a", "b"], starts, np.concatenate([pa, pb]), np.concatenate([za, zb]), np.concatenate([na, nb]), {}
        )
        sent = time.perf_counter()
        pr, zr, nr = rows([0, 1, 3, 0])
        pusher.push(["a", "gone"], np.array([0, 3, 4], np.int32), pr, zr, nr, {"forward": 1.5})
        got = await a.rows(0, 4, timeout=5)
        assert got.z[:, 1].tolist() == [0.0, 10.0, 20.0, 30.0] and got.norms.tolist() == [7.0] * 4
        assert got.scored_at >= sent  # the worker's time of the newest row
        assert (await b.rows(0, 2, timeout=5)).z[:, 0].tolist() == [0.0, 1.0]
        assert receiver.recomputed == 1  # a's position 0 arrived twice
        assert receiver.worker_times == {"forward": 1.5}
        with pytest.raises(ScoreMissing, match=r"positions \[0, 1\]"):
            await receiver.open("c", capacity=2).rows(0, 2, timeout=0.2)
        # A malformed message is dropped; the reader goes on.
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.connect(address)
        raw.send_multipart([b"not json"])
        p, z, n = rows([0])
        pusher.push(["d"], np.array([0, 1], np.int32), p, z, n, {})
        d = receiver.open("d", capacity=1)
        pusher.push(["d"], np.array([0, 1], np.int32), p, z, n, {})
        assert (await d.rows(0, 1, timeout=5)).z.shape == (1, WIDTH)
        assert receiver.problem(silence_s=30) is None
        raw.close(linger=0)
        await receiver.close()

    asyncio.run(scenario())


def test_the_api_side_reader_and_monitor_import_without_torch():
    import subprocess
    import sys

    modules = ", ".join(
        f"limbic.monitors.{m}" for m in ("vllm.scores", "alerting.monitor", "engine", "alerting.rules", "mitigation")
    )
    check = f"import sys, {modules}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
