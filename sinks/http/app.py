"""The routes: the web page, the REST API, the OpenAI-compatible API and the metrics.

  GET    /                                      the web page (sinks/http/static/index.html); public
  GET    /static/{name}                         the page's files (that folder only); public
  GET    /api/cameras                           {"version", "cameras": [CAMERA, ...]}
  GET    /api/cameras/{name}                    CAMERA = {"name", "health", "status", "watches"}
  GET    /api/cameras/{name}/frame.jpg          the newest frame (404 no_frame before the first)
  GET    /api/cameras/{name}/contact_sheet.png  what the memory holds now (404 empty_memory)
  GET    /api/cameras/{name}/timeline.png       tokens kept per second of stream (404 empty_memory)
  GET    /api/cameras/{name}/snapshots/{id}.jpg the frame of a recent watch event (its snapshot_url)
  GET    /api/cameras/{name}/watches            {"camera", "watches": [...]}
  POST   /api/cameras/{name}/watches            a WatchSpec as JSON -> 201 and the listing
  DELETE /api/cameras/{name}/watches/{watch}    -> the listing (404 unknown_watch)
  POST   /api/cameras/{name}/ask                {"question", "id"?, "llm_budget"?, "max_new_tokens"?,
                                                "stream"?} -> the Answer; streamed: SSE `text`
                                                events, then one `answer` (or `error`)
  GET    /api/events?camera=a,b                 SSE: every bus event as `event: <type>`
  POST   /v1/chat/completions                   OpenAI chat completions; model = camera
  GET    /v1/models, /v1/models/{model}         the cameras as models
  GET    /metrics                               Prometheus

Every error is JSON in OpenAI's shape (errors.py); FastAPI's own validation errors are
`bad_request` naming the field. A question goes to the camera's one door with origin "http";
the door's refusals keep their codes. A streamed answer stays an ordinary HTTP error until its
first piece of text: a question refused at once (empty, busy, duplicate, ...) gets its status.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, Response

from stream.camera_api import CameraService
from stream.errors import ConfigError, RequestError
from stream.events import Question
from stream.http_settings import HttpSettings
from stream.validation import build
from stream.watches import WatchSpec

from .answers import AnswerStream, until_closed
from .cameras import ServedCameras
from .errors import ApiError, Json
from .event_stream import EventClients, EventStream, sse
from .gate import Gate
from .metrics import Metrics
from .openai_api import DONE, ChatRequest, Chunks, completion, model_entry, models_list, stream_error, to_question

STATIC = Path(__file__).parent / "static"
ORIGIN = "http"  # Question.origin of what comes in here
NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class Context:
    """What the routes serve from."""

    settings: HttpSettings
    cameras: ServedCameras
    events: EventClients
    metrics: Metrics
    closing: asyncio.Event
    version: str
    created: int  # when the service started (the models' `created`)


class AskBody(BaseModel):
    question: StrictStr = ""
    id: Any = None  # a string or an integer: the door checks it
    llm_budget: StrictInt | None = None
    max_new_tokens: StrictInt | None = None
    stream: StrictBool = False


def build_app(ctx: Context) -> FastAPI:
    app = FastAPI(title="streamprune", version=ctx.version, docs_url=None, redoc_url=None)
    app.add_middleware(Gate, settings=ctx.settings, metrics=ctx.metrics)
    _errors(app)
    _page(app)
    _rest(app, ctx)
    _openai(app, ctx)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        data, content_type = ctx.metrics.render(request.headers.get("accept", ""))
        return Response(data, media_type=content_type, headers=NO_STORE)

    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> Response:
        return e.response()

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, e: RequestError) -> Response:
        return ApiError.of(e).response()

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "bad_request")
        return ApiError(code, str(e.detail), e.status_code, headers=e.headers).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        message, param = validation_message(e.errors(), request.headers.get("content-type", ""))
        return ApiError("bad_request", message, param=param).response()


def validation_message(errors: Sequence[dict], content_type: str) -> tuple[str, str | None]:
    """One line for the first problem FastAPI found, and the field it names."""
    if not errors:
        return "the request is not valid", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', 'decode error')}", None
    loc = list(e.get("loc", ()))
    where = loc.pop(0) if loc else ""
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if where == "body" and param is None:
        if "json" not in content_type:
            return "the body must be a JSON object sent with Content-Type: application/json", None
        return f"the body: {e.get('msg', 'is not valid')}", None
    return f"{param or where}: {e.get('msg', 'is not valid')}", param


def _page(app: FastAPI) -> None:
    def static_file(name: str) -> FileResponse:
        path = STATIC / name
        if name.startswith(".") or "/" in name or "\\" in name or not path.is_file():
            raise ApiError("not_found", f"no file {name[:100]!r} here")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return static_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        return static_file(name)


def _rest(app: FastAPI, ctx: Context) -> None:
    cams = ctx.cameras

    @app.get("/api/cameras")
    async def cameras() -> Json:
        return Json({"version": ctx.version, "cameras": [cams.describe(name) for name in cams.names]})

    @app.get("/api/cameras/{name}")
    async def camera(name: str) -> Json:
        return Json(cams.describe(name))

    @app.get("/api/cameras/{name}/frame.jpg")
    async def frame(name: str) -> Response:
        return Response(await cams.frame(name), media_type="image/jpeg", headers=NO_STORE)

    @app.get("/api/cameras/{name}/contact_sheet.png")
    async def contact_sheet(name: str) -> Response:
        return await _picture(cams, name, "contact_sheet")

    @app.get("/api/cameras/{name}/timeline.png")
    async def timeline(name: str) -> Response:
        return await _picture(cams, name, "timeline")

    @app.get("/api/cameras/{name}/snapshots/{event_id}.jpg")
    async def snapshot(name: str, event_id: str) -> Response:
        return Response(cams.snapshot(name, event_id), media_type="image/jpeg")

    @app.get("/api/cameras/{name}/watches")
    async def watches(name: str) -> Json:
        return Json(cams.watches(name))

    @app.post("/api/cameras/{name}/watches", status_code=201)
    async def add_watch(name: str, body: dict[str, Any] = Body(...)) -> Json:
        camera = cams.get(name)
        if body.get("camera", name) != name:
            raise ApiError("bad_watch", f"camera: this is camera {name!r}'s list of watches", param="camera")
        try:
            camera.watches.add(build(WatchSpec, {**body, "camera": name}))
        except ConfigError as e:
            raise ApiError("bad_watch", str(e), param=e.path or None) from None
        return Json(cams.watches(name), 201)

    @app.delete("/api/cameras/{name}/watches/{watch:path}")  # a watch's name may hold a "/"
    async def remove_watch(name: str, watch: str) -> Json:
        if not cams.get(name).watches.remove(watch):
            raise ApiError("unknown_watch", f"camera {name!r} has no watch named {watch[:100]!r}")
        return Json(cams.watches(name))

    @app.post("/api/cameras/{name}/ask")
    async def ask(name: str, body: AskBody) -> Response:
        camera = cams.get(name)
        q = Question(body.question, body.id, body.llm_budget, body.max_new_tokens, ORIGIN)
        if not body.stream:
            return Json((await until_closed(camera.ask(q), ctx.closing)).to_dict())
        stream = await _started(camera, q, ctx.closing)
        return EventStream(_rest_frames(stream), on_close=stream.close)

    @app.get("/api/events")
    async def events(camera: list[str] = Query(default=[])) -> EventStream:
        names = [n.strip() for value in camera for n in value.split(",") if n.strip()]
        for n in names:
            cams.get(n)
        try:
            client = ctx.events.open(names or None)
        except RequestError as e:
            raise ApiError.of(e, 503) from None
        return ctx.events.stream(client)


async def _picture(cams: ServedCameras, name: str, kind: str) -> Response:
    try:
        data = await cams.picture(name, kind)
    except RequestError as e:
        raise ApiError.of(e, 404 if e.code == "empty_memory" else None) from None
    return Response(data, media_type="image/png", headers=NO_STORE)


async def _started(camera: CameraService, q: Question, closing: asyncio.Event) -> AnswerStream:
    """The question asked with its text streamed, once its first text is there (or it ended);
    a refusal before that raises here."""
    stream = AnswerStream(camera, q, closing)
    try:
        await stream.first()
    except BaseException:
        stream.close()
        raise
    return stream


async def _rest_frames(stream: AnswerStream) -> AsyncIterator[bytes]:
    try:
        async for piece in stream.pieces():
            yield sse("text", {"text": piece})
        assert stream.answer is not None
        yield sse("answer", stream.answer.to_dict())
    except RequestError as e:
        yield sse("error", {"code": e.code, "message": e.message})
    finally:
        stream.close()


def _openai(app: FastAPI, ctx: Context) -> None:
    cams = ctx.cameras

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Response:
        camera = cams.get(body.model)
        q = to_question(body, ORIGIN)
        if not body.stream:
            answer = await until_closed(camera.ask(q), ctx.closing)
            return Json(completion(answer, q, body.model))
        stream = await _started(camera, q, ctx.closing)
        return EventStream(_chunks(stream, q, body), on_close=stream.close)

    @app.get("/v1/models")
    async def models() -> Json:
        return Json(models_list(cams.names, ctx.created))

    @app.get("/v1/models/{model}")
    async def model(model: str) -> Json:
        cams.get(model)
        return Json(model_entry(model, ctx.created))


async def _chunks(stream: AnswerStream, q: Question, body: ChatRequest) -> AsyncIterator[bytes]:
    chunks = Chunks(body.model)
    try:
        yield sse(None, chunks.role())
        async for piece in stream.pieces():
            yield sse(None, chunks.text(piece))
        assert stream.answer is not None
        for chunk in chunks.last(stream.answer, q, body.include_usage):
            yield sse(None, chunk)
        yield DONE
    except RequestError as e:
        yield sse(None, stream_error(e.code, e.message))
    finally:
        stream.close()
