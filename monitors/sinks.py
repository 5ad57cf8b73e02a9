"""Where alert events go: a Redis stream shared by every replica, or an in-process ring buffer.

Events hold no prompt or response text unless the operator opted in (``Settings.alert_include_text``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import Protocol

import redis.asyncio as aioredis

log = logging.getLogger(__name__)


class AlertSink(Protocol):
    name: str

    async def publish(self, event: dict) -> None: ...

    async def recent(self, limit: int) -> list[dict]:
        """Newest first."""
        ...

    async def check(self) -> None:
        """Raises if the sink cannot take events now."""
        ...

    async def close(self) -> None: ...


class MemorySink:
    name = "memory"

    def __init__(self, capacity: int = 1000) -> None:
        self._events: deque[dict] = deque(maxlen=capacity)

    async def publish(self, event: dict) -> None:
        self._events.append(event)

    async def recent(self, limit: int) -> list[dict]:
        return list(reversed(self._events))[:limit]

    async def check(self) -> None:
        pass

    async def close(self) -> None:
        pass


class RedisStreamSink:
    """Appends each event to a capped Redis stream (XADD ... MAXLEN ~ capacity)."""

    name = "redis"

    def __init__(self, client: aioredis.Redis, stream: str, capacity: int) -> None:
        self._client = client
        self.stream = stream
        self._capacity = capacity

    @classmethod
    async def connect(cls, url: str, stream: str, capacity: int) -> RedisStreamSink:
        # Bounded waits: a hung Redis must not hold a response (the default is to wait forever).
        client = aioredis.from_url(url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            await client.ping()
        except Exception as exc:
            await client.aclose()
            raise ConnectionError(
                f"cannot reach Redis at {url} ({exc}): start redis-server, fix REDIS_URL, "
                "or unset it to keep alerts in memory"
            ) from exc
        return cls(client, stream, capacity)

    async def publish(self, event: dict) -> None:
        await self._client.xadd(self.stream, {"event": json.dumps(event)}, maxlen=self._capacity, approximate=True)

    async def check(self) -> None:
        await asyncio.wait_for(self._client.ping(), timeout=2.0)

    async def recent(self, limit: int) -> list[dict]:
        entries = await self._client.xrevrange(self.stream, count=limit)
        return [json.loads(fields["event"]) | {"stream_id": entry_id} for entry_id, fields in entries]

    async def close(self) -> None:
        await self._client.aclose()
