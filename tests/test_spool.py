"""No lost alerts: events go through a durable local spool to Redis, in order, once each, across a Redis
outage and a limbic restart; bounded, with its depth and drops exported."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from conftest import free_port, redis_server
from limbic.monitors.alerting.sinks import RedisStreamSink, SpooledSink
from limbic.monitors.alerting.spool import AlertSpool, SpoolLocked
from limbic.monitors.metrics import Metrics

STREAM = "limbic:alerts"


def event(n: int) -> dict:
    return {"id": uuid.uuid4().hex, "n": n, "emotion": "desperate"}


def sink(port: int, path: Path, capacity: int = 1000, stream: str = STREAM) -> SpooledSink:
    client = aioredis.Redis(port=port, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0)
    redis = RedisStreamSink(client, stream, 10_000)
    spool = AlertSpool(path, capacity, redis.publish)
    spool.open()
    return SpooledSink(redis, spool)


async def stored(port: int) -> list[int]:
    client = aioredis.Redis(port=port, decode_responses=True)
    entries = await client.xrange(STREAM)
    await client.aclose()
    return [json.loads(fields["event"])["n"] for _, fields in entries]


async def publish(s: SpooledSink, numbers: range) -> None:
    for n in numbers:
        await s.publish(event(n))
        await asyncio.sleep(0.01)


def test_redis_stopped_and_restarted_mid_traffic_loses_and_repeats_nothing(tmp_path):
    port, data = free_port(), tmp_path / "redis"
    data.mkdir()

    async def scenario() -> None:
        s = sink(port, tmp_path / "spool.jsonl")
        await s.start()
        with redis_server(port, str(data), durable=True):
            await publish(s, range(0, 20))
            assert await s.spool.drained(30)
        await publish(s, range(20, 40))  # Redis is down: publishing goes on, nothing waits on it
        await asyncio.sleep(1.0)
        assert s.spool.depth == 20
        on_disk = [json.loads(line)["n"] for line in (tmp_path / "spool.jsonl").read_text().splitlines()]
        assert on_disk[-20:] == list(range(20, 40))  # on disk, not only in memory (after the delivered ones)
        with redis_server(port, str(data), durable=True):
            await publish(s, range(40, 60))
            assert await s.spool.drained(30), f"{s.spool.depth} events still held"
            assert await stored(port) == list(range(60))  # every one, in order, once
        await s.close()

    asyncio.run(scenario())


def test_held_events_survive_a_restart(tmp_path):
    port, path = free_port(), tmp_path / "spool.jsonl"

    async def before_restart() -> None:  # Redis is not there at all
        s = sink(port, path)
        await s.start()
        await publish(s, range(5))
        await s.close(drain_s=0.2)

    asyncio.run(before_restart())
    assert path.read_text().count("\n") == 5

    async def after_restart() -> None:
        s = sink(port, path)
        assert s.spool.depth == 5
        await s.start()
        assert await s.spool.drained(30)
        assert await stored(port) == list(range(5))
        await s.close()
        assert path.read_text() == ""  # all delivered: the file is emptied on close

    with redis_server(port):
        asyncio.run(after_restart())


def test_a_repeated_delivery_lands_once(redis_url):
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        stream = f"test:{uuid.uuid4().hex}"
        redis = RedisStreamSink(client, stream, 100)
        same = event(1)
        await redis.publish(same)
        await redis.publish(same)  # e.g. a timeout after Redis had taken it, then a retry
        await redis.publish(event(2))
        assert [json.loads(f["event"])["n"] for _, f in await client.xrange(stream)] == [1, 2]
        await client.aclose()

    asyncio.run(scenario())


def test_the_spool_is_bounded_and_its_depth_and_drops_are_exported(tmp_path):
    async def scenario() -> None:
        s = sink(free_port(), tmp_path / "spool.jsonl", capacity=3)
        metrics = Metrics(["desperate"], "m", lambda: 0.0, lambda: 0.0)
        metrics.track_spool(lambda: s.spool.depth, lambda: s.spool.dropped)
        await publish(s, range(5))  # not started: nothing is delivered
        assert [e["n"] for e in s.spool._pending] == [2, 3, 4]
        assert metrics.registry.get_sample_value("limbic_alert_spool_depth", {"model": "m"}) == 3
        assert metrics.registry.get_sample_value("limbic_alert_spool_dropped_total", {"model": "m"}) == 2
        with pytest.raises(SpoolLocked):
            AlertSpool(tmp_path / "spool.jsonl", 3, s.redis.publish).open()  # one process per spool file
        await s.close(drain_s=0)
        again = AlertSpool(tmp_path / "spool.jsonl", 3, s.redis.publish)
        again.open()  # a restart keeps the newest three
        assert [e["n"] for e in again._pending] == [2, 3, 4]
        assert [json.loads(line)["n"] for line in (tmp_path / "spool.jsonl").read_text().splitlines()] == [2, 3, 4]
        await again.close()

    asyncio.run(scenario())


def test_delivered_events_are_compacted_away_without_blocking(tmp_path, redis_url):
    async def scenario() -> None:
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        s = sink(port, tmp_path / "spool.jsonl", stream=f"test:{uuid.uuid4().hex}")  # not the suite server's
        await s.start()
        await publish(s, range(1500))
        assert await s.spool.drained(60)
        await asyncio.sleep(0.5)  # the compaction after the last delivery
        lines = (tmp_path / "spool.jsonl").read_text().count("\n")
        assert lines <= 1024, lines  # not a growing log of everything ever delivered
        assert s.spool.delivering
        await s.close()

    asyncio.run(scenario())
