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
from limbic.monitors.alerting.spool import AlertSpool

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


def redis_client(url: str) -> aioredis.Redis:
    """A client for limbic's shared state (alerts, reviews, conversations), with bounded waits: a hung Redis
    must not hold a response (the default is to wait forever)."""
    return aioredis.from_url(url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0)


# Remembers each delivered event id for a day: longer than any outage the spool can hold.
DEDUP_TTL_S = 86400
# Added first, then marked seen: a failing XADD leaves the event unmarked, so its retry is not dropped.
_ADD_ONCE = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return false
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event', ARGV[1])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
return id
"""


class RedisStreamSink:
    """Appends each event to a capped Redis stream (XADD ... MAXLEN ~ capacity)."""

    name = "redis"

    def __init__(self, client: aioredis.Redis, stream: str, capacity: int) -> None:
        self._client = client
        self.stream = stream
        self._capacity = capacity

    @classmethod
    async def connect(cls, url: str, stream: str, capacity: int) -> RedisStreamSink:
        client = redis_client(url)
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
        """Appends the event unless one with its id already arrived (a retried delivery lands once)."""
        seen = f"{self.stream}:seen:{event['id']}"
        await self._client.eval(_ADD_ONCE, 2, self.stream, seen, json.dumps(event), self._capacity, DEDUP_TTL_S)  # type: ignore[misc]

    async def check(self) -> None:
        await asyncio.wait_for(self._client.ping(), timeout=2.0)

    async def recent(self, limit: int) -> list[dict]:
        entries = await self._client.xrevrange(self.stream, count=limit)
        return [json.loads(fields["event"]) | {"stream_id": entry_id} for entry_id, fields in entries]

    async def close(self) -> None:
        await self._client.aclose()


class SpooledSink:
    """The Redis stream behind a durable local spool (``limbic.monitors.alerting.spool``): publishing never waits
    on Redis and loses nothing while it is down."""

    name = "redis"

    def __init__(self, redis: RedisStreamSink, spool: AlertSpool) -> None:
        self.redis, self.spool = redis, spool
        self.stream = redis.stream

    async def start(self) -> None:
        self.spool.start()

    async def publish(self, event: dict) -> None:
        self.spool.append(event)

    async def recent(self, limit: int) -> list[dict]:
        return await self.redis.recent(limit)

    async def check(self) -> None:
        await self.redis.check()

    async def close(self, drain_s: float = 2.0) -> None:
        await self.spool.close(drain_s)
        await self.redis.close()
