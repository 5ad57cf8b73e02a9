"""The review queue and the conversation store, in memory and in a real Redis, and trend rules through the
monitor's alert path (sink, metrics, Alertmanager's format)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from limbic.monitors.alerting.alertmanager import AlertmanagerPush
from limbic.monitors.alerting.conversations import (
    MemoryConversationStore,
    RedisConversationStore,
    TrendRule,
    trend_crossings,
)
from limbic.monitors.alerting.monitor import Monitor
from limbic.monitors.alerting.reviews import (
    AlreadyResolved,
    MemoryReviewQueue,
    RedisReviewQueue,
    ReviewNotFound,
    new_item,
)
from limbic.monitors.alerting.rules import AlertRule
from limbic.monitors.alerting.sinks import MemorySink
from limbic.monitors.metrics import Metrics


def client(redis_url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture(params=["memory", "redis"])
def queue(request: pytest.FixtureRequest):
    def make(capacity: int = 100):
        if request.param == "memory":
            return MemoryReviewQueue(capacity)
        return RedisReviewQueue(client(request.getfixturevalue("redis_url")), f"test:{uuid.uuid4().hex}", capacity)

    return make


def test_review_queue_lists_resolves_once_and_drops_the_oldest(queue):
    async def scenario():
        q = queue(capacity=3)
        items = [new_item({"request_id": f"r{i}"}) for i in range(4)]
        for n, item in enumerate(items[:3], 1):
            assert await q.add(item) == n
        assert [i["request_id"] for i in await q.items("open", 10)] == ["r2", "r1", "r0"]
        done, still_open = await q.resolve(items[1]["id"], "confirmed", "looked at it")
        assert done["status"] == "resolved" and done["resolution"]["verdict"] == "confirmed" and still_open == 2
        with pytest.raises(AlreadyResolved):
            await q.resolve(items[1]["id"], "false_positive", None)
        with pytest.raises(ReviewNotFound):
            await q.get("rev_unknown")
        assert [i["request_id"] for i in await q.items("resolved", 10)] == ["r1"]
        assert (await q.get(items[1]["id"]))["resolution"]["note"] == "looked at it"
        await q.add(items[3])  # over capacity: r1, the resolved one, goes before any open item
        assert [i["request_id"] for i in await q.items("all", 10)] == ["r3", "r2", "r0"]
        assert await q.open_count() == 3
        await q.close()

    asyncio.run(scenario())


@pytest.fixture(params=["memory", "redis"])
def conversations(request: pytest.FixtureRequest):
    def make(ttl: float = 60.0, max_turns: int = 3):
        if request.param == "memory":
            return MemoryConversationStore(ttl, max_turns)
        prefix = f"test:{uuid.uuid4().hex}"
        return RedisConversationStore(client(request.getfixturevalue("redis_url")), prefix, ttl, max_turns)

    return make


def turn(desperate_mean: float, alerts: int = 0) -> dict:
    return {
        "request_id": uuid.uuid4().hex,
        "generation": {"desperate": {"mean": desperate_mean, "max": desperate_mean + 1}},
        "alerts": [{"id": str(i)} for i in range(alerts)],
    }


def test_conversations_keep_turns_in_order_and_flag_those_with_alerts(conversations):
    async def scenario():
        store = conversations(max_turns=3)
        for value in (0.1, 0.2, 0.3, 0.4):
            recent = await store.append("quiet", turn(value), recent=2)
        assert [t["turn"] for t in recent] == [3, 4]
        kept = await store.get("quiet")
        assert [t["turn"] for t in kept["turns"]] == [2, 3, 4] and not kept["flagged"]  # only the newest 3
        await store.append("loud", turn(1.0, alerts=2), recent=1)
        assert [c["id"] for c in await store.recent(flagged=False, limit=10)] == ["loud", "quiet"]
        (flagged,) = await store.recent(flagged=True, limit=10)
        assert (flagged["id"], flagged["alerts"], flagged["turns"], flagged["flagged"]) == ("loud", 2, 1, True)
        assert await store.get("never") is None
        # Ids are the client's: one that looks like another's key must not collide with it.
        await store.append("x", turn(0.1), recent=1)
        await store.append("x:turns", turn(0.2), recent=1)
        assert [len((await store.get(cid))["turns"]) for cid in ("x", "x:turns")] == [1, 1]
        await store.close()

    asyncio.run(scenario())


def test_conversations_expire(conversations):
    async def scenario():
        store = conversations(ttl=1.0)
        await store.append("brief", turn(0.1, alerts=1), recent=1)
        await asyncio.sleep(2.1)
        await store.append("other", turn(0.1), recent=1)  # writes prune the indexes
        assert await store.get("brief") is None
        assert [c["id"] for c in await store.recent(flagged=False, limit=10)] == ["other"]
        assert await store.recent(flagged=True, limit=10) == []
        await store.close()

    asyncio.run(scenario())


def test_trend_fires_once_per_rise():
    rule = TrendRule(turns=3, rise=0.5)
    history: list[dict] = []
    fired = []
    for value in (0.0, 0.3, 0.6, 0.9, 0.2, 0.4, 0.5):
        history.append(turn(value))
        fired.append(bool(trend_crossings(history, {"desperate": rule})))
    # Fires at 0.0 -> 0.3 -> 0.6 (rise 0.6), not again while it goes on rising; 0.2 -> 0.4 -> 0.5 is too small.
    assert fired == [False, False, True, False, False, False, False]
    assert trend_crossings([turn(0.0), {"request_id": "x", "generation": {}}, turn(1.0)], {"desperate": rule}) == []


def test_a_trend_alert_takes_the_alert_path(redis_url):
    async def scenario():
        metrics = Metrics(["desperate", "calm"], "m", lambda: 0.0, lambda: 0.0)
        sink = MemorySink()
        monitor = Monitor(
            "m",
            ["desperate", "calm"],
            {"desperate": AlertRule(warning=2.0)},
            metrics,
            sink,
            sink_norm=100.0,
            conversations=RedisConversationStore(client(redis_url), f"test:{uuid.uuid4().hex}", 60, 10),
            trend_rules={"desperate": TrendRule(turns=3, rise=0.5)},
        )
        events = [await monitor.record_turn("c-7", turn(v)) for v in (0.0, 0.4, 0.8)]
        assert events[:2] == [[], []]
        (event,) = events[2]
        assert (event["phase"], event["kind"], event["conversation_id"], event["values"]) == (
            "conversation",
            "trend",
            "c-7",
            [0.0, 0.4, 0.8],
        )
        assert (await sink.recent(1))[0]["id"] == event["id"]
        sample = metrics.registry.get_sample_value(
            "limbic_alerts_total",
            {"emotion": "desperate", "severity": "warning", "phase": "conversation", "model": "m"},
        )
        assert sample == 1.0
        pushed = AlertmanagerPush("http://127.0.0.1:9", metrics.push_errors.labels("m")).alert(event)
        assert (
            pushed["labels"]["phase"] == "conversation" and "conversation c-7" in pushed["annotations"]["description"]
        )
        await monitor.close()

    asyncio.run(scenario())
