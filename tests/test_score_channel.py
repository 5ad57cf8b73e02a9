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


def test_hello_reaches_the_reader_and_host_tensors_are_sent(tmp_path):
    import torch

    async def scenario() -> None:
        address = f"ipc://{tmp_path}/scores"
        receiver = ScoreReceiver(address, WIDTH)
        receiver.start()
        pusher = ScorePusher(address)
        pusher.hello({"runner": "CPUModelRunner", "layer": 20})
        await asyncio.wait_for(receiver.said_hello.wait(), 5)
        assert receiver.hello == {"runner": "CPUModelRunner", "layer": 20}
        scores = receiver.open("t", capacity=2)
        p, z, n = rows([0, 1])
        pusher.push(["t"], np.array([0, 2], np.int32), p, torch.from_numpy(z), torch.from_numpy(n), {})
        assert (await scores.rows(0, 2, timeout=5)).z.tolist() == z.tolist()
        await receiver.close()

    asyncio.run(scenario())


def test_backpressure_is_sized_in_bytes_and_the_forward_pass_waits_only_past_it(tmp_path):
    """Nobody reads: the sender fills ZMQ's small queue, then the byte budget; the next push waits for room
    and goes as soon as the reader drains (nothing is lost)."""
    import threading

    address = f"ipc://{tmp_path}/scores"
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1)
    pull.bind(address)
    p, z, n = rows(list(range(1000)))  # ~16 KB a message
    size = p.nbytes + z.nbytes + n.nbytes + 8
    pusher = ScorePusher(address, budget_bytes=4 * size)
    pushed = 0

    def producer() -> None:
        nonlocal pushed
        for _ in range(40):
            pusher.push(["k"], np.array([0, len(p)], np.int32), p, z, n, {})
            pushed += 1

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    time.sleep(1.0)
    stalled = pushed
    assert stalled < 40 and pusher.queued_bytes <= 4 * size + 200  # waiting, within the budget
    received = 0
    while received < 40:
        assert pull.poll(5000), f"only {received} of 40 messages arrived"
        pull.recv_multipart()
        received += 1
    thread.join(5)
    assert pushed == 40 and pusher.flush(5) and pusher.waited_s > 0.5
    pull.close(linger=0)


def test_one_message_larger_than_the_budget_still_goes(tmp_path):
    address = f"ipc://{tmp_path}/scores"
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(address)
    p, z, n = rows(list(range(100)))
    pusher = ScorePusher(address, budget_bytes=10)
    pusher.push(["k"], np.array([0, 100], np.int32), p, z, n, {})
    assert pull.poll(5000)
    frames = pull.recv_multipart()
    assert np.frombuffer(frames[3], "<f4").reshape(100, WIDTH).tolist() == z.tolist()
    pull.close(linger=0)
