"""What stands between the network and the app: API keys with two scopes, and a bound on request bodies.

Both are plain ASGI middleware, so a refused request costs no parsing: a body over the limit is answered 413
as soon as its declared length (or, streamed, its running length) passes it, and a request without a valid
key never reaches a handler. Keys are compared as SHA-256 digests in constant time; a keys file holds only
digests (``sha256:<hex>`` lines, from ``limbic keys hash``); no key is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

Scope_ = Literal["open", "inference", "admin"]

# Endpoints that show other callers' data or change shared state need an admin key.
ADMIN_PREFIXES = ("/v1/alerts", "/v1/conversations", "/v1/reviews")
# Probes and scrapers stay open; the live view's static files too (its API calls carry a key).
OPEN_PATHS = ("/health", "/healthz", "/readyz", "/ui")
OPEN_PREFIXES = ("/ui/",)


class KeyFileError(ValueError):
    """A keys file that cannot be used; the message names the line and the fix."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def hashed_line(key: str) -> str:
    """A keys-file line for ``key``."""
    return f"sha256:{digest(key).hex()}"


def read_key_file(path: Path) -> list[bytes]:
    digests = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, value = line.partition(":")
        try:
            if kind != "sha256" or len(value) != 64:
                raise ValueError
            digests.append(bytes.fromhex(value))
        except ValueError:
            raise KeyFileError(
                f"{path}:{number}: expected `sha256:<64 hex digits>` (make one with `limbic keys hash`); "
                "plain keys are not accepted in files"
            ) from None
    return digests


@dataclass(frozen=True)
class KeyRing:
    inference: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()
    protect_metrics: bool = False

    @classmethod
    def build(
        cls,
        inference_keys: Iterable[str] = (),
        admin_keys: Iterable[str] = (),
        inference_file: Path | None = None,
        admin_file: Path | None = None,
        protect_metrics: bool = False,
    ) -> KeyRing:
        inference = [digest(k) for k in inference_keys if k] + (read_key_file(inference_file) if inference_file else [])
        admin = [digest(k) for k in admin_keys if k] + (read_key_file(admin_file) if admin_file else [])
        return cls(tuple(inference), tuple(admin), protect_metrics)

    @property
    def enabled(self) -> bool:
        return bool(self.inference or self.admin)

    def scope_of(self, presented: str) -> Scope_ | None:
        """The scope a presented key grants (admin includes inference), or None. Every stored digest is
        compared, whatever matches first, so the time taken says nothing about which key is close."""
        candidate = digest(presented)
        is_admin = _any_equal(candidate, self.admin)
        is_inference = _any_equal(candidate, self.inference)
        return "admin" if is_admin else "inference" if is_inference else None

    def required(self, path: str) -> Scope_:
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return "open"
        if path == "/metrics":
            return "admin" if self.protect_metrics else "open"
        if path.startswith(ADMIN_PREFIXES):
            return "admin"
        return "inference"


def _any_equal(candidate: bytes, digests: Iterable[bytes]) -> bool:
    found = False
    for stored in digests:
        found |= hmac.compare_digest(candidate, stored)
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _refuse(
    send: Send, status: int, message: str, type_: str, code: str | None, param: str | None = None
) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="limbic"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class KeyGuard:
    """401 without a valid bearer key, 403 when an inference key calls an admin endpoint."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            return await self.app(scope, receive, send)
        required = self.keys.required(_route_path(scope))
        if required == "open":
            return await self.app(scope, receive, send)
        presented = _bearer(scope)
        granted = None if presented is None else self.keys.scope_of(presented)
        if granted is None:
            what = "No API key provided" if presented is None else "Incorrect API key provided"
            message = (
                f"{what}: send `Authorization: Bearer <key>` with a key from LIMBIC_API_KEYS or LIMBIC_ADMIN_KEYS."
            )
            return await _refuse(send, 401, message, "invalid_request_error", "invalid_api_key")
        if required == "admin" and granted != "admin":
            message = f"{_route_path(scope)} shows other callers' data or changes shared state: it needs an admin key."
            return await _refuse(send, 403, message, "permission_error", "insufficient_permissions")
        return await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the router matches: without the mount point when limbic is served under a prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if kind.lower() == "bearer" and token.strip() else None
    return None


class BodyLimit:
    """413 for a request body over ``limit`` bytes, before the app reads (or parses) any of it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await _refuse(send, 413, self._message(), "invalid_request_error", "request_too_large")
        received = 0
        responded = refused = False

        async def counted() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit and not responded:
                    # Answer now and tell the app its client left: it stops reading and its answer is dropped.
                    refused = True
                    await _refuse(send, 413, self._message(), "invalid_request_error", "request_too_large")
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: Message) -> None:
            nonlocal responded
            if refused:
                return
            responded |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not refused:  # the app's complaint about the cut-off body; the client has its 413
                raise

    def _message(self) -> str:
        return f"Request body exceeds {self.limit} bytes (LIMBIC_MAX_BODY_BYTES)."
