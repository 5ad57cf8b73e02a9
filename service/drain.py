"""Shutdown with a deadline: on SIGTERM the server stops accepting and in-flight generations may finish for
``LIMBIC_SHUTDOWN_DRAIN_S``; then every one still open ends: a stream with an in-band error event, a
non-streamed request with a 503, and the engine's requests are aborted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from limbic.monitors.channel import Channel


class ShuttingDown(Exception):
    """The server's drain time ran out before this generation finished."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down: this generation was aborted; retry on another replica")


class Drain:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the app starts serving
        self.started = False
        self.expired = False
        self._open: set[Channel] = set()

    def begin(self, seconds: float) -> None:
        """Starts the clock (safe from a signal handler); a second call changes nothing."""
        if self.loop is not None and not self.started:
            self.started = True
            self.loop.call_soon_threadsafe(self.loop.call_later, seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        for channel in self._open:
            channel.fail(ShuttingDown())

    @contextmanager
    def watching(self, channel: Channel) -> Iterator[None]:
        """Ends ``channel`` with ``ShuttingDown`` if the drain time runs out while it is open."""
        if self.expired:
            channel.fail(ShuttingDown())
        self._open.add(channel)
        try:
            yield
        finally:
            self._open.discard(channel)
