"""Settings of the HTTP front door (`[http]`): the web page, the OpenAI-compatible API, the REST
API and the Prometheus metrics, served in the same process on the same event loop.

Torch-free, like the MQTT settings, so the HTTP sink can read them. The one rule across fields:
a server reachable from other machines must ask for a token, unless the operator says
explicitly that it need not (`allow_unauthenticated`).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .errors import ConfigError
from .validation import bounded

LOCAL_NAMES = ("localhost", "ip6-localhost")


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = False
    host: str = "127.0.0.1"  # the address to bind; 0.0.0.0 or :: for every interface (needs a token)
    port: int = bounded(8080, 0, 65535)  # 0 = any free port (the log line says which)
    token: str = ""  # "" = no auth; else every request needs `Authorization: Bearer <token>`
    allow_unauthenticated: bool = False  # true: serve a non-local address without a token anyway
    max_request_bytes: int = bounded(65536, 1024, 16 * 1024 * 1024)  # larger request bodies get 413
    max_event_clients: int = bounded(64, 1, 10_000)  # open event streams at once; beyond: 503 `busy`


def is_local(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_http(s: HttpSettings) -> HttpSettings:
    """Rules across `[http]` fields, as a ConfigError naming the field."""
    if not s.host.strip():
        raise ConfigError("must not be empty (127.0.0.1 serves this machine only)", "host")
    if s.token and (s.token != s.token.strip() or any(not c.isprintable() for c in s.token)):
        raise ConfigError("must be printable text without surrounding spaces", "token")
    if s.enabled and not s.token and not is_local(s.host) and not s.allow_unauthenticated:
        raise ConfigError(f"{s.host!r} is reachable from other machines: set http.token, or "
                          "http.allow_unauthenticated = true to serve it without one", "host")
    return s
