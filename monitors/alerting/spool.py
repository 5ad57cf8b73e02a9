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
        self._file_lines = 0  # lines in the file: pending events plus delivered or dropped ones not compacted
        self._appended = 0
        self._syncing = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.dropped = 0  # events dropped because the spool was full
        self.delivered = 0
        self.failing = False  # the last delivery failed: Redis is unreachable

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def delivering(self) -> bool:
        """The delivery task runs (it is restarted by nobody: False means events only pile up)."""
        return self._task is not None and not self._task.done()

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
        _write_lines(self._fresh, list(self._pending))
        self._swap(len(self._pending))
        if self._pending:
            log.warning("alert spool %s: %d events from an earlier run to deliver", self.path, len(self._pending))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="limbic-alert-spool")
        self._wake.set()

    def append(self, event: dict) -> None:
        """Holds an event (in memory and in the file) until Redis has it. Never waits: the file is flushed
        now and fsync'd in a thread, one fsync for however many events arrived meanwhile."""
        assert self._file is not None, "open() the spool first"
        self._pending.append(event)
        self._file.write(_line(event))
        self._file.flush()
        self._file_lines += 1
        self._appended += 1
        self._trim()
        self._sync_soon()
        self._wake.set()

    def _sync_soon(self) -> None:
        if self._syncing or self._file is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            os.fsync(self._file.fileno())
            return
        self._syncing = True
        done = loop.run_in_executor(None, _fsync_quietly, self._file.fileno())
        done.add_done_callback(lambda _: setattr(self, "_syncing", False))

    def _trim(self) -> None:
        """Past the capacity the oldest events go (the file keeps their lines until the next compaction)."""
        over = len(self._pending) - self.capacity
        for _ in range(max(over, 0)):
            self._pending.popleft()
        if over > 0:
            self.dropped += over
            log.error("alert spool %s full: dropped the %d oldest undelivered events", self.path, over)

    @property
    def _fresh(self) -> Path:
        return self.path.with_suffix(".tmp")

    def _swap(self, lines: int) -> None:
        """Puts the freshly written file in place of the old one (atomically) and appends to it from now on."""
        os.replace(self._fresh, self.path)
        _fsync_directory(self.path.parent)
        old, self._file = self._file, self.path.open("a", encoding="utf-8")
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if old is not None:
            old.close()
        self._file_lines = lines

    def _needs_compaction(self) -> bool:
        return self._file_lines - len(self._pending) > max(1024, len(self._pending))

    async def _compact(self) -> None:
        """Rewrites the file with only the pending events, in a thread; events appended meanwhile follow."""
        snapshot, appended = list(self._pending), self._appended
        await asyncio.to_thread(_write_lines, self._fresh, snapshot)
        arrived = min(self._appended - appended, len(self._pending))  # appends go to the right end
        tail = list(self._pending)[len(self._pending) - arrived :] if arrived else []
        with self._fresh.open("a", encoding="utf-8") as out:
            out.writelines(map(_line, tail))
        self._swap(len(snapshot) + len(tail))

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                if self._needs_compaction():
                    await self._compact()
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                event = self._pending[0]
                try:
                    await self._deliver(event)
                except Exception as exc:
                    if not self.failing:
                        log.warning("alert spool: Redis refused event %s (%r); holding events", event["id"], exc)
                    self.failing = True
                    await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                    failures += 1
                    continue
                if self._pending and self._pending[0] is event:  # not trimmed away meanwhile
                    self._pending.popleft()
                self.delivered += 1
                if self.failing:
                    log.warning("alert spool: Redis is back; delivering %d held events", len(self._pending))
                self.failing, failures = False, 0
            except asyncio.CancelledError:
                raise
            except Exception:  # a full disk, say: keep trying rather than let events pile up unseen
                log.exception("alert spool %s: delivery loop error; retrying", self.path)
                await asyncio.sleep(RETRY_S[-1])

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
            if not self._pending:  # everything delivered: leave an empty file, not a log of the past
                _write_lines(self._fresh, [])
                self._swap(0)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _line(event: dict) -> str:
    return json.dumps(event, separators=(",", ":")) + "\n"


def _write_lines(path: Path, events: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as out:
        out.writelines(map(_line, events))
        out.flush()
        os.fsync(out.fileno())


def _fsync_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):  # the file was swapped for a compacted one meanwhile
        os.fsync(fd)


def _fsync_directory(folder: Path) -> None:
    """Makes a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
