"""One root for every error streamprune reports: a stable `code` for machines, a message for people.

Front doors turn an `Error` into their own wire form (an MQTT error payload, a console line, an
exit status) without translating between error kinds. Our own bugs are not `Error`s: they stay
ordinary exceptions and fail loudly.
"""
from __future__ import annotations


class Error(Exception):
    """Something the world or a user got wrong, already phrased for a person."""

    code = "error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RequestError(Error):
    """A request that will not be answered (`empty_question`, `busy`, `unavailable`, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code)


class ConfigError(Error, ValueError):
    """A bad config field or table; `path` is its dotted name ("memory.capacity")."""

    code = "bad_config"

    def __init__(self, message: str, path: str = ""):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.detail = message

    def under(self, prefix: str) -> "ConfigError":
        """The same problem with its path dotted under `prefix` ("watches[1]")."""
        return ConfigError(self.detail, f"{prefix}.{self.path}" if self.path else prefix)


class SourceError(Error):
    """A source that cannot deliver frames (unopenable file, camera that gave up reconnecting)."""

    code = "source_failed"
