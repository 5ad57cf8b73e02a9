"""The review queue: responses an alert rule with action ``review`` flagged for a person to look at.

Items hold ids, scores, alerts and actions; the request's text only when the operator opted in. Redis keeps
the queue for every replica; without Redis it lives in this process's memory.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import OrderedDict
from typing import Literal, Protocol

import redis.asyncio as aioredis

Verdict = Literal["confirmed", "false_positive", "escalated"]
VERDICTS: tuple[Verdict, ...] = ("confirmed", "false_positive", "escalated")
Status = Literal["open", "resolved", "all"]


class ReviewNotFound(KeyError):
    pass


class AlreadyResolved(RuntimeError):
    pass


def new_item(fields: dict) -> dict:
    """A queue item: ``fields`` (ids, summaries, alerts, ...) plus its id, time and open status."""
    return {
        "id": f"rev_{uuid.uuid4().hex}",
        "object": "review",
        "time": _now(),
        "status": "open",
        **fields,
        "resolution": None,
    }


def resolved(item: dict, verdict: Verdict, note: str | None) -> dict:
    return item | {"status": "resolved", "resolution": {"verdict": verdict, "note": note, "time": _now()}}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class ReviewQueue(Protocol):
    name: str

    async def add(self, item: dict) -> int:
        """Queues an item; returns the number of open items."""
        ...

    async def items(self, status: Status, limit: int) -> list[dict]:
        """Newest first."""
        ...

    async def get(self, review_id: str) -> dict: ...

    async def resolve(self, review_id: str, verdict: Verdict, note: str | None) -> tuple[dict, int]:
        """The resolved item and the number still open; ``AlreadyResolved`` if someone was first."""
        ...

    async def open_count(self) -> int: ...

    async def close(self) -> None: ...


class MemoryReviewQueue:
    name = "memory"

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, dict] = OrderedDict()  # oldest first

    async def add(self, item: dict) -> int:
        self._items[item["id"]] = item
        while len(self._items) > self._capacity:  # resolved items go first, then the oldest open ones
            resolved_ids = (k for k, v in self._items.items() if v["status"] != "open")
            del self._items[next(resolved_ids, next(iter(self._items)))]
        return await self.open_count()

    async def items(self, status: Status, limit: int) -> list[dict]:
        chosen = [i for i in reversed(self._items.values()) if status == "all" or i["status"] == status]
        return chosen[:limit]

    async def get(self, review_id: str) -> dict:
        try:
            return self._items[review_id]
        except KeyError:
            raise ReviewNotFound(review_id) from None

    async def resolve(self, review_id: str, verdict: Verdict, note: str | None) -> tuple[dict, int]:
        item = await self.get(review_id)
        if item["status"] != "open":
            raise AlreadyResolved(review_id)
        self._items[review_id] = done = resolved(item, verdict, note)
        return done, await self.open_count()

    async def open_count(self) -> int:
        return sum(i["status"] == "open" for i in self._items.values())

    async def close(self) -> None:
        pass


class RedisReviewQueue:
    """Items in a hash, indexed by sorted sets (in queue order) of all, open and resolved items; capped at
    ``capacity``."""

    name = "redis"

    def __init__(self, client: aioredis.Redis, prefix: str, capacity: int) -> None:
        self._client = client
        self._items, self._all = f"{prefix}:items", f"{prefix}:all"
        self._open, self._resolved, self._sequence = f"{prefix}:open", f"{prefix}:resolved", f"{prefix}:sequence"
        self._capacity = capacity

    async def add(self, item: dict) -> int:
        stamp = await self._client.incr(self._sequence)  # orders items queued within the same millisecond
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(self._items, item["id"], json.dumps(item))
            pipe.zadd(self._all, {item["id"]: stamp})
            pipe.zadd(self._open, {item["id"]: stamp})
            pipe.zcard(self._all)
            *_, size = await pipe.execute()
        if size > self._capacity:  # drop the oldest resolved items, then (if need be) the oldest open ones
            excess = size - self._capacity
            oldest = await self._client.zrange(self._resolved, 0, excess - 1)
            if len(oldest) < excess:
                oldest += await self._client.zrange(self._open, 0, excess - len(oldest) - 1)
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hdel(self._items, *oldest)
                pipe.zrem(self._all, *oldest)
                pipe.zrem(self._open, *oldest)
                pipe.zrem(self._resolved, *oldest)
                await pipe.execute()
        return await self.open_count()

    async def items(self, status: Status, limit: int) -> list[dict]:
        index = {"open": self._open, "resolved": self._resolved, "all": self._all}[status]
        ids = await self._client.zrevrange(index, 0, limit - 1)
        if not ids:
            return []
        return [json.loads(raw) for raw in await self._client.hmget(self._items, ids) if raw is not None]

    async def get(self, review_id: str) -> dict:
        raw = await self._client.hget(self._items, review_id)
        if raw is None:
            raise ReviewNotFound(review_id)
        return json.loads(raw)

    async def resolve(self, review_id: str, verdict: Verdict, note: str | None) -> tuple[dict, int]:
        item = await self.get(review_id)
        if not await self._client.zrem(self._open, review_id):  # the atomic claim: one resolver wins
            raise AlreadyResolved(review_id)
        done = resolved(item, verdict, note)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(self._items, review_id, json.dumps(done))
            pipe.zadd(self._resolved, {review_id: await self._client.zscore(self._all, review_id) or 0})
            await pipe.execute()
        return done, await self.open_count()

    async def open_count(self) -> int:
        return int(await self._client.zcard(self._open))

    async def close(self) -> None:
        await self._client.aclose()
