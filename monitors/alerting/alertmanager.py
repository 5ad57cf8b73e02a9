"""Pushes alert events straight to Alertmanager's API: pages within a second, not a scrape and a rule cycle later.

Each event becomes one Alertmanager alert. Events with the same labels (model, emotion, severity, phase) merge
into one alert whose ``endsAt`` moves on with every new event, so it resolves by itself ``resolve_timeout``
seconds after the last one. Labels never carry request ids or text; the request id rides in an annotation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Protocol

import httpx

log = logging.getLogger(__name__)

ALERT_NAME = "LimbicEmotionAlert"


class _Count(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class AlertmanagerPush:
    def __init__(self, url: str, errors: _Count, resolve_timeout: float = 300.0, timeout: float = 2.0) -> None:
        self.endpoint = f"{url.rstrip('/')}/api/v2/alerts"
        self._errors = errors
        self._resolve_timeout = dt.timedelta(seconds=resolve_timeout)
        self._client = httpx.AsyncClient(timeout=timeout)
        self._pending: set[asyncio.Task] = set()

    def submit(self, event: dict) -> None:
        """Pushes in the background: the request that raised the alert never waits on Alertmanager."""
        task = asyncio.get_running_loop().create_task(self.push(event))
        self._pending.add(task)  # keep a reference until done (the loop holds tasks only weakly)
        task.add_done_callback(self._pending.discard)

    async def push(self, event: dict) -> bool:
        """One POST; a failure is logged and counted, never raised."""
        try:
            response = await self._client.post(self.endpoint, json=[self.alert(event)])
            response.raise_for_status()
        except Exception as exc:
            self._errors.inc()
            log.warning("Alertmanager push to %s failed for alert %s: %r", self.endpoint, event["id"], exc)
            return False
        return True

    def alert(self, event: dict) -> dict:
        started = dt.datetime.fromisoformat(event["time"])
        if event.get("kind") == "trend":
            where = f"the last {len(event['values'])} turns of conversation {event['conversation_id']}, up to request"
        else:
            where = f"{event['phase']} tokens {event['token_start']}-{event['token_index']} of request"
        return {
            "labels": {
                "alertname": ALERT_NAME,
                "emotion": event["emotion"],
                "severity": event["severity"],
                "model": event["model"],
                "phase": event["phase"],
            },
            "annotations": {
                "summary": f"{event['emotion']} {event['severity']} on {event['model']}",
                "description": (
                    f"{event['emotion']} scored {event['score']} (threshold {event['threshold']}) over {where} "
                    f"{event['request_id']}; action: {event.get('action', 'observe')}."
                ),
                "request_id": event["request_id"],
                "event_id": event["id"],
                "action": event.get("action", "observe"),
            },
            "startsAt": started.isoformat(),
            "endsAt": (started + self._resolve_timeout).isoformat(),
        }

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._client.aclose()
