"""The OpenAI wire format in one place: chat completion requests in, completions and chunks out.

A camera is a model: `model` names the camera, the last `user` message is the question (its
text, or its `text` parts joined; other parts and earlier messages are not read: the camera
answers one question from what it saw), `max_tokens` / `max_completion_tokens` bound the answer
(to at most the door's limit), and fields a client sends that a camera has no use for
(temperature, tools, ...) are ignored. `n` above 1 is refused. Every reply carries the answer's
evidence in an extra top-level field, "streamprune"; a stream carries it on its last chunk.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from stream.door import MAX_NEW_TOKENS
from stream.errors import RequestError
from stream.events import Answer, Question

from .errors import error_body

OWNER = "streamprune"
EVIDENCE = ("camera", "t_start", "t_end", "groups", "tokens_used", "memory_tokens", "prefilled_tokens",
            "prompt_path", "ttft_s", "total_s", "pruner")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: StrictStr
    content: Any = None  # a string, a list of content parts, or null (checked by `question_text`)


class ChatRequest(BaseModel):
    """The fields of POST /v1/chat/completions a camera reads; the rest are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    messages: list[ChatMessage]
    stream: StrictBool | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    n: StrictInt | None = None
    stream_options: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage") is True)


def question_text(messages: list[ChatMessage]) -> str:
    """The last user message's text; RequestError when there is none or it is not text."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.role != "user":
            continue
        if m.content is None or isinstance(m.content, str):
            return m.content or ""
        if isinstance(m.content, list):
            return "\n".join(p["text"] for p in m.content
                             if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
        raise RequestError("bad_request", f"messages[{i}].content must be a string or a list of content parts")
    raise RequestError("empty_question", "messages holds no user message: the last user message is the question")


def to_question(req: ChatRequest, origin: str) -> Question:
    """The question a chat request asks; RequestError for what no camera could answer."""
    if req.n is not None and req.n != 1:
        raise RequestError("bad_request", f"n must be 1: a camera gives one answer per question, got {req.n}")
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if limit is not None and limit < 1:
        raise RequestError("bad_max_new_tokens", f"max_tokens must be at least 1, got {limit}")
    return Question(question_text(req.messages), max_new_tokens=None if limit is None else min(limit, MAX_NEW_TOKENS),
                    origin=origin)


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def evidence(answer: Answer) -> dict:
    """What the answer is based on and what it cost: the extra "streamprune" field."""
    return {k: getattr(answer, k) for k in EVIDENCE}


def finish_reason(answer: Answer, question: Question) -> str:
    return "length" if question.max_new_tokens is not None and answer.new_tokens >= question.max_new_tokens else "stop"


def usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.new_tokens,
            "total_tokens": answer.prompt_tokens + answer.new_tokens}


def completion(answer: Answer, question: Question, model: str) -> dict:
    """The non-streamed reply: a `chat.completion`."""
    return {
        "id": new_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason(answer, question)}],
        "usage": usage(answer), "system_fingerprint": None, "streamprune": evidence(answer),
    }


class Chunks:
    """The `chat.completion.chunk`s of one streamed reply, sharing its id and creation time."""

    def __init__(self, model: str):
        self.model = model
        self.id = new_id()
        self.created = int(time.time())

    def _chunk(self, delta: dict | None, finish: str | None = None, **extra: Any) -> dict:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def role(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def text(self, piece: str) -> dict:
        return self._chunk({"content": piece})

    def last(self, answer: Answer, question: Question, include_usage: bool) -> list[dict]:
        """The finishing chunk with the evidence, and the usage chunk when the client asked for it."""
        out = [self._chunk({}, finish_reason(answer, question), streamprune=evidence(answer))]
        if include_usage:
            out.append(self._chunk(None, usage=usage(answer), streamprune=evidence(answer)))
        return out


def stream_error(code: str, message: str) -> dict:
    """An error after the stream began: the official clients raise it from the `error` key."""
    return error_body(code, message)


DONE = b"data: [DONE]\n\n"


def models_list(cameras: list[str], created: int) -> dict:
    return {"object": "list", "data": [model_entry(name, created) for name in cameras]}


def model_entry(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}
