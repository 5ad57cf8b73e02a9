"""Conversations: the turns of one conversation id, their score summaries and alerts, and trend rules.

A turn holds no text: the time, the request id, the prompt's and the generation's summaries for the headline
emotions, the alerts (with their actions) and the finish reason. Redis keeps them for every replica with a
TTL; without Redis they live in this process's memory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal, Protocol

import redis.asyncio as aioredis
from limbic.monitors.alerting.rules import Severity
from pydantic import BaseModel, ConfigDict, Field


class TrendRule(BaseModel):
    """Alert when an emotion's per-turn generation statistic rose at each of the last ``turns`` turns, by at
    least ``rise`` in all."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    turns: int = Field(default=3, ge=2, le=50, description="turns the rise spans")
    rise: float = Field(default=0.5, gt=0, description="total rise in z-score units, first to last turn")
    statistic: Literal["mean", "max"] = "mean"
    severity: Severity = "warning"


def rising(values: Sequence[float], rule: TrendRule) -> bool:
    """Whether the last ``rule.turns`` values rise at every step and by ``rule.rise`` in all."""
    if len(values) < rule.turns:
        return False
    last = values[-rule.turns :]
    return all(b > a for a, b in pairwise(last)) and last[-1] - last[0] >= rule.rise


def trend_crossings(turns: Sequence[dict], rules: dict[str, TrendRule]) -> list[tuple[str, TrendRule, list[float]]]:
    """The rules that the newest turn makes fire: rising now, and not already rising at the turn before (a
    continuing rise fires once)."""
    fired = []
    for emotion, rule in rules.items():
        values: list[float] = []  # the newest unbroken run of turns that generated tokens
        for turn in reversed(turns):
            summary = turn.get("generation", {}).get(emotion)
            if summary is None:
                break
            values.insert(0, summary[rule.statistic])
        if rising(values, rule) and not rising(values[:-1], rule):
            fired.append((emotion, rule, values[-rule.turns :]))
    return fired


def _now() -> tuple[str, float]:
    now = dt.datetime.now(dt.UTC)
    return now.isoformat(timespec="milliseconds"), now.timestamp()


class ConversationStore(Protocol):
    name: str

    async def append(self, conversation_id: str, turn: dict, recent: int) -> list[dict]:
        """Adds a turn (numbered and stamped here); returns the last ``recent`` turns, oldest first."""
        ...

    async def get(self, conversation_id: str) -> dict | None:
        """``{"id", "flagged", "turns"}``, or None if unknown or expired."""
        ...

    async def recent(self, flagged: bool, limit: int) -> list[dict]:
        """``{"id", "turns", "alerts", "flagged", "last_time"}`` per conversation, most recent first."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Conversation:
    turns: list[dict] = field(default_factory=list)
    count: int = 0
    alerts: int = 0
    last: float = 0.0
    last_time: str = ""


class MemoryConversationStore:
    name = "memory"

    def __init__(self, ttl_s: float, max_turns: int, capacity: int = 10_000) -> None:
        self._ttl, self._max_turns, self._capacity = ttl_s, max_turns, capacity
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()  # least recently written first

    def _expire(self) -> None:
        cutoff = time.time() - self._ttl
        while self._conversations and (
            len(self._conversations) > self._capacity or next(iter(self._conversations.values())).last < cutoff
        ):
            self._conversations.popitem(last=False)

    async def append(self, conversation_id: str, turn: dict, recent: int) -> list[dict]:
        self._expire()
        conversation = self._conversations.pop(conversation_id, None) or _Conversation()
        self._conversations[conversation_id] = conversation
        conversation.count += 1
        conversation.alerts += len(turn.get("alerts", ()))
        conversation.last_time, conversation.last = _now()
        conversation.turns.append({"turn": conversation.count, "time": conversation.last_time, **turn})
        del conversation.turns[: -self._max_turns]
        return conversation.turns[-recent:]

    async def get(self, conversation_id: str) -> dict | None:
        self._expire()
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            return None
        return {"id": conversation_id, "flagged": conversation.alerts > 0, "turns": list(conversation.turns)}

    async def recent(self, flagged: bool, limit: int) -> list[dict]:
        self._expire()
        rows = [
            {"id": cid, "turns": c.count, "alerts": c.alerts, "flagged": c.alerts > 0, "last_time": c.last_time}
            for cid, c in reversed(self._conversations.items())
            if c.alerts or not flagged
        ]
        return rows[:limit]

    async def close(self) -> None:
        pass


class RedisConversationStore:
    """Per conversation a list of turns and a hash of counters, both expiring ``ttl_s`` after the last turn;
    sorted sets (by last turn time) of all and of flagged conversations, pruned of expired ones on write and
    capped at the newest ``capacity``. Keys hold a digest of the id, never the client's string itself."""

    name = "redis"

    def __init__(
        self, client: aioredis.Redis, prefix: str, ttl_s: float, max_turns: int, capacity: int = 100_000
    ) -> None:
        self._client, self._prefix = client, prefix
        self._ttl, self._max_turns, self._capacity = ttl_s, max_turns, capacity
        self._all, self._flagged = f"{prefix}:conversations", f"{prefix}:conversations:flagged"

    def _keys(self, conversation_id: str) -> tuple[str, str]:
        digest = hashlib.sha256(conversation_id.encode()).hexdigest()[:32]
        base = f"{self._prefix}:conversation:{digest}"
        return f"{base}:turns", f"{base}:meta"

    async def append(self, conversation_id: str, turn: dict, recent: int) -> list[dict]:
        turns_key, meta_key = self._keys(conversation_id)
        stamp, now = _now()
        ttl = max(1, int(self._ttl))
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hincrby(meta_key, "turns", 1)
            pipe.hincrby(meta_key, "alerts", len(turn.get("alerts", ())))
            pipe.hset(meta_key, "last_time", stamp)
            pipe.rpush(turns_key, json.dumps({"time": stamp, **turn}))
            pipe.ltrim(turns_key, -self._max_turns, -1)
            pipe.expire(turns_key, ttl)
            pipe.expire(meta_key, ttl)
            pipe.zadd(self._all, {conversation_id: now})
            for index in (self._all, self._flagged):
                pipe.zremrangebyscore(index, "-inf", now - self._ttl)
                pipe.zremrangebyrank(index, 0, -self._capacity - 1)
            pipe.lrange(turns_key, -recent, -1)
            total, alerts, *_, last = await pipe.execute()
        if alerts:
            await self._client.zadd(self._flagged, {conversation_id: now})
        return _numbered(last, total)

    async def get(self, conversation_id: str) -> dict | None:
        turns_key, meta_key = self._keys(conversation_id)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.lrange(turns_key, 0, -1)
            pipe.hmget(meta_key, "turns", "alerts")
            turns, (total, alerts) = await pipe.execute()
        if not turns:
            return None
        return {"id": conversation_id, "flagged": int(alerts or 0) > 0, "turns": _numbered(turns, int(total or 0))}

    async def recent(self, flagged: bool, limit: int) -> list[dict]:
        ids = await self._client.zrevrange(self._flagged if flagged else self._all, 0, limit - 1)
        rows = []
        for conversation_id in ids:
            meta = await self._client.hgetall(self._keys(conversation_id)[1])
            if not meta:
                continue  # expired since the index was pruned
            alerts = int(meta.get("alerts", 0))
            rows.append(
                {
                    "id": conversation_id,
                    "turns": int(meta.get("turns", 0)),
                    "alerts": alerts,
                    "flagged": alerts > 0,
                    "last_time": meta.get("last_time", ""),
                }
            )
        return rows

    async def close(self) -> None:
        await self._client.aclose()


def _numbered(raw: list[str], total: int) -> list[dict]:
    """The newest ``len(raw)`` of ``total`` turns, each with its number (1 = the conversation's first)."""
    first = total - len(raw) + 1
    return [{"turn": first + i, **json.loads(t)} for i, t in enumerate(raw)]
