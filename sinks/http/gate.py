"""What every request passes before any route: the token and the body size limit; and around
every request: the request counter, a debug log line, and a JSON 500 for our own bugs.

The token is compared in constant time, from `Authorization: Bearer <token>` or `?token=`
(a page's <img> and EventSource cannot set headers). The web page itself (`GET /`,
`/static/*`) is public: it holds no camera data and asks for the token. A server bound to this
machine only answers requests addressed to this machine (`Host: localhost`, `127.0.0.1`,
`[::1]`): a web page elsewhere that rebinds its own name to 127.0.0.1 (DNS rebinding) must not
reach the cameras through the user's browser. A body is refused with
413 before it is read when its Content-Length is over the limit, and while it is read when it
is chunked and grows past it.
"""
from __future__ import annotations

import hmac
import logging
import time
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stream.http_settings import HttpSettings, is_local

from .errors import ApiError
from .metrics import Metrics

log = logging.getLogger(__name__)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as "other"


def is_public(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and (path == "/" or path.startswith("/static/"))


def presented_token(scope: Scope) -> bytes | None:
    """The token the request carries: the bearer token, else the `token` query parameter."""
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        if key == "token":
            return value.encode("utf-8", "surrogateescape")
    return None


def host_name(scope: Scope) -> str | None:
    """The Host header's name without its port ("[::1]:8080" -> "::1"), or None without one."""
    for key, value in scope["headers"]:
        if key == b"host":
            host = value.decode("latin-1")
            if host.startswith("["):
                return host[1:].partition("]")[0]
            return host.rpartition(":")[0] if host.count(":") == 1 else host
    return None


def content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class Gate:
    """Pure ASGI middleware (it sees streamed responses as they go, without buffering them)."""

    def __init__(self, app: ASGIApp, settings: HttpSettings, metrics: Metrics):
        self.app = app
        self.settings = settings
        self.token = settings.token.encode()
        self.local = is_local(settings.host)
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        method, path = scope["method"], scope["path"]
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(method, path, scope)
            if refusal is not None:
                await refusal.response()(scope, receive, sending)
            else:
                await self.app(scope, self._limited(receive), sending)
        except ClientDisconnect:
            log.debug("HTTP %s %s: the client went away", method, path)
        except Exception:
            log.exception("HTTP %s %s failed", method, path)
            if status:
                raise  # the response is under way: the connection ends
            error = ApiError("internal_error", "the service failed on this request; see its log")
            await error.response()(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(method if method in METHODS else "other", route, str(status)).inc()
            log.debug("HTTP %s %s -> %s in %.1f ms", method, path, status, (time.perf_counter() - t0) * 1e3)

    def _refusal(self, method: str, path: str, scope: Scope) -> ApiError | None:
        if self.local and not is_local(host_name(scope) or "localhost"):
            return ApiError("foreign_host", "this server serves this machine only: address it as localhost, "
                            "127.0.0.1 or [::1] (or bind http.host to another address, with a token)")
        if self.token and not is_public(method, path):
            token = presented_token(scope)
            if token is None:
                return ApiError("unauthorized", "this server needs a token: send 'Authorization: Bearer <token>' "
                                "(or ?token=<token>)")
            if not hmac.compare_digest(token, self.token):
                return ApiError("unauthorized", "the token is wrong")
        length = content_length(scope)
        if length is not None and length > self.settings.max_request_bytes:
            return self._too_large(f"{length} bytes")
        return None

    def _too_large(self, size: str) -> ApiError:
        return ApiError("payload_too_large", f"the request body has {size}; the limit is "
                        f"{self.settings.max_request_bytes} bytes (http.max_request_bytes)")

    def _limited(self, receive: Receive) -> Receive:
        """`receive`, refusing a body that grows past the limit while it is read."""
        seen = 0
        limit = self.settings.max_request_bytes

        async def receiving() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._too_large(f"more than {limit} bytes")
            return message

        return receiving
