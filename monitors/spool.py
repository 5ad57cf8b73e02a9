"""No lost alerts: a durable local spool in front of the Redis stream.

Every event is appended to a local file first (flushed and fsync'd: it survives a crash or a restart), then a
background task delivers the file's events to Redis in order. Delivery is deduplicated by event id in Redis
itself, so an event sent twice (a timeout after Redis took it, a restart between delivery and the file's
rewrite) lands once. While Redis is down events wait in the file, bounded: past ``capacity`` the oldest are
dropped and counted. Nothing here ever waits on Redis in a request's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

log = logging.getLogger("limbic.alerts")

RETRY_S = (0.5, 1.0, 2.0, 5.0)  # waits between failed deliveries, then 5 s until Redis is back


class SpoolLocked(RuntimeError):
    """Another limbic process holds this spool file."""


class AlertSpool:
    def __init__(self, path: Path, capacity: int, deliver: Callable[[dict], Awaitable[None]]) -> None:
        self.path = path
        self.capacity = capacity
        self._deliver = deliver
        self._pending: deque[dict] = deque()
        self._file: IO[str] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.dropped = 0  # events dropped because the spool was full
        self.delivered = 0
        self.failing = False  # the last delivery failed: Redis is unreachable

    @property
    def depth(self) -> int:
        return len(self._pending)

    def open(self) -> None:
        """Loads what an earlier run left undelivered and takes the file (one process per spool file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise SpoolLocked(f"{self.path} is in use by another limbic process: give each its own spool") from None
        self._file.seek(0)
        for line in self._file:
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash mid-write
                self._pending.append(json.loads(line))
        self._trim()
        self._rewrite()
        if self._pending:
            log.warning("alert spool %s: %d events from an earlier run to deliver", self.path, len(self._pending))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="limbic-alert-spool")
        self._wake.set()

    def append(self, event: dict) -> None:
        assert self._file is not None, "open() the spool first"
        self._pending.append(event)
        self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._trim():
            self._rewrite()
        self._wake.set()

    def _trim(self) -> bool:
        over = len(self._pending) - self.capacity
        for _ in range(max(over, 0)):
            self._pending.popleft()
        if over > 0:
            self.dropped += over
            log.error("alert spool %s full: dropped the %d oldest undelivered events", self.path, over)
        return over > 0

    def _rewrite(self) -> None:
        """Replaces the file with the undelivered events (a new file, then an atomic rename)."""
        assert self._file is not None
        fresh = self.path.with_suffix(".tmp")
        with fresh.open("w", encoding="utf-8") as out:
            out.writelines(json.dumps(e, separators=(",", ":")) + "\n" for e in self._pending)
            out.flush()
            os.fsync(out.fileno())
        os.replace(fresh, self.path)
        old, self._file = self._file, self.path.open("a", encoding="utf-8")
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        old.close()

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            since_rewrite = 0
            while self._pending:
                event = self._pending[0]
                try:
                    await self._deliver(event)
                except Exception as exc:
                    if not self.failing:
                        log.warning(
                            "alert spool: Redis refused event %s (%r); holding events locally", event["id"], exc
                        )
                    self.failing = True
                    await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                    failures += 1
                    continue
                if self._pending and self._pending[0] is event:  # not trimmed away meanwhile
                    self._pending.popleft()
                self.delivered += 1
                since_rewrite += 1
                if self.failing:
                    log.warning("alert spool: Redis is back; delivering %d held events", len(self._pending))
                self.failing, failures = False, 0
                if since_rewrite >= 256:
                    self._rewrite()
                    since_rewrite = 0
            if since_rewrite:
                self._rewrite()

    async def drained(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for every held event to be delivered (tests, shutdown)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return not self._pending

    async def close(self, drain_s: float = 2.0) -> None:
        """Gives delivery a moment, then stops; what is left stays in the file for the next run."""
        if self._task is not None:
            await self.drained(drain_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._file is not None:
            self._file.close()
            self._file = None
