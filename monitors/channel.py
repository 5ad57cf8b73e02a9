"""A one-producer, one-consumer async channel that carries items, then an end or the producer's error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class Channel(Generic[T]):
    """Producers call ``put``/``fail``/``close`` on the event loop's thread (wrap them with
    ``loop.call_soon_threadsafe`` from another thread); the consumer iterates and gets the error raised."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()

    def put(self, item: T) -> None:
        self._queue.put_nowait(item)

    def fail(self, error: BaseException) -> None:
        self._queue.put_nowait(error)

    def close(self) -> None:
        self._queue.put_nowait(_END)

    async def __aiter__(self) -> AsyncIterator[T]:
        while (item := await self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
