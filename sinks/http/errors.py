"""Errors over HTTP: one status per stable code, and one JSON shape for every error, OpenAI's
`{"error": {"message", "type", "param", "code"}}`, so the official clients raise their usual
exception classes with our code in `.code`.

The codes are the camera door's and the MQTT door's (stream/door.py, sinks/mqtt/protocol.py),
plus what only HTTP has: `unauthorized`, `foreign_host`, `not_found`, `method_not_allowed`, `no_frame`,
`unknown_snapshot`. A code this table does not know is a request problem (400).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from stream.errors import RequestError

STATUS = {
    "bad_request": 400, "empty_question": 400, "question_too_long": 400, "bad_llm_budget": 400,
    "bad_max_new_tokens": 400, "bad_watch": 400,
    "unauthorized": 401,
    "foreign_host": 403,
    "not_found": 404, "unknown_camera": 404, "unknown_watch": 404, "no_frame": 404, "unknown_snapshot": 404,
    "method_not_allowed": 405,
    "duplicate": 409, "too_many_watches": 409,
    "payload_too_large": 413,
    "busy": 429,
    "internal_error": 500,
    "unavailable": 503, "empty_memory": 503, "preempted": 503,
}
_TYPES = {401: "authentication_error", 429: "rate_limit_error"}
MAX_MESSAGE_CHARS = 300  # a message may quote the request (a field's name): cut short


def status_of(code: str) -> int:
    return STATUS.get(code, 400)


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def dumps(value: Any) -> bytes:
    """JSON as UTF-8; text UTF-8 cannot carry (a lone surrogate from a "\\ud800" escape in a
    request) goes out as \\u escapes instead of failing the response."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


class Json(JSONResponse):
    """A JSON response encoded with `dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


class ApiError(HTTPException):
    """A refusal with a stable code. An HTTPException, so FastAPI passes it through its body
    parsing untouched (a body found too large while it is read)."""

    def __init__(self, code: str, message: str, status: int | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None):
        status = status_of(code) if status is None else status
        if code == "unauthorized":
            headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "…"
        super().__init__(status, message, dict(headers) if headers else None)
        self.code = code
        self.message = message
        self.param = param

    @classmethod
    def of(cls, error: RequestError, status: int | None = None) -> "ApiError":
        return cls(error.code, error.message, status)

    def response(self) -> Json:
        return Json(error_body(self.code, self.message, self.status_code, self.param), self.status_code,
                    headers=self.headers)


def error_body(code: str, message: str, status: int | None = None, param: str | None = None) -> dict:
    status = status_of(code) if status is None else status
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
