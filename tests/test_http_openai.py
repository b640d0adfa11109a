"""The OpenAI-compatible API with the official `openai` client (AsyncOpenAI, no retries) against
a real server: completions streamed and not, the models, and each documented error as the
client's own exception with our code. Then a real camera on the tiny model: the same question
over the OpenAI API, streamed and not, and over REST gives the same answer and evidence, and
its contact sheet is drawn from what its memory holds."""
from __future__ import annotations

import io

import openai
import pytest
from PIL import Image

from http_serving import serving
from scripted_camera import ScriptedCamera

EVIDENCE = {"camera", "t_start", "t_end", "groups", "tokens_used", "memory_tokens", "prefilled_tokens", "prompt_path",
            "ttft_s", "total_s", "pruner"}


def client_of(service, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{service.url}v1", api_key=api_key, max_retries=0, timeout=30.0)


async def streamed(oa: openai.AsyncOpenAI, **request) -> tuple[str, list]:
    chunks = [c async for c in await oa.chat.completions.create(stream=True, **request)]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


async def test_the_openai_client_gets_completions_streams_and_models():
    async with serving(ScriptedCamera("cam"), ScriptedCamera("yard", says_yes=lambda t: False)) as (service, _):
        oa = client_of(service)
        ask = {"model": "cam", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Is it in view?"}],
               "max_tokens": 16, "temperature": 0.2, "user": "ignored"}
        done = await oa.chat.completions.create(**ask)
        assert done.object == "chat.completion" and done.model == "cam"
        assert done.choices[0].message.role == "assistant" and done.choices[0].message.content == "Yes, it is in view."
        assert done.choices[0].finish_reason == "stop"
        assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (40, 5, 45)
        assert set(done.model_extra["streamprune"]) == EVIDENCE
        assert done.model_extra["streamprune"]["camera"] == "cam" and done.model_extra["streamprune"]["groups"] == 2

        text, chunks = await streamed(oa, **ask)
        assert text == done.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop" and set(chunks[-1].model_extra["streamprune"]) == EVIDENCE

        _, with_usage = await streamed(oa, **ask, stream_options={"include_usage": True})
        assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 5

        parts = [{"type": "text", "text": "Is it"}, {"type": "image_url", "image_url": {"url": "x"}},
                 {"type": "text", "text": "in view?"}]
        r = await oa.chat.completions.create(model="yard", messages=[{"role": "user", "content": parts}])
        assert r.choices[0].message.content == "No."
        service_cam = service.cameras.get("yard")
        assert service_cam.answers[-1].question == "Is it\nin view?" and service_cam.answers[-1].origin == "http"

        models = await oa.models.list()
        assert [(m.id, m.object, m.owned_by) for m in models.data] == [("cam", "model", "streamprune"),
                                                                       ("yard", "model", "streamprune")]
        assert (await oa.models.retrieve("yard")).id == "yard"


async def test_the_openai_client_raises_the_documented_errors():
    async with serving(ScriptedCamera("cam"), token="s3cret") as (service, _):
        oa = client_of(service, "s3cret")
        with pytest.raises(openai.NotFoundError) as e:
            await oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert e.value.code == "unknown_camera" and "cameras: cam" in e.value.message
        for messages in ([{"role": "user", "content": "  "}], [{"role": "system", "content": "hi"}]):
            with pytest.raises(openai.BadRequestError) as e:
                await oa.chat.completions.create(model="cam", messages=messages)
            assert e.value.code == "empty_question"
        with pytest.raises(openai.BadRequestError) as e:
            await streamed(oa, model="cam", messages=[{"role": "user", "content": ""}])
        assert e.value.code == "empty_question"  # a streamed question refused at once: still an HTTP error
        with pytest.raises(openai.BadRequestError) as e:
            await oa.chat.completions.create(model="cam", messages=[{"role": "user", "content": "hi"}], n=2)
        assert e.value.code == "bad_request"
        with pytest.raises(openai.BadRequestError) as e:
            await oa.chat.completions.create(model="cam", messages="hi")  # type: ignore[arg-type]
        assert e.value.code == "bad_request" and "messages" in e.value.message
        for key, headers in (("wrong", None), ("s3cret", {"Authorization": openai.Omit()})):  # wrong, none
            with pytest.raises(openai.AuthenticationError) as e:
                await client_of(service, key).chat.completions.create(
                    model="cam", messages=[{"role": "user", "content": "hi"}], extra_headers=headers)
            assert e.value.code == "unauthorized"
        with pytest.raises(openai.AuthenticationError):
            await client_of(service, "wrong").models.list()


async def test_a_real_camera_answers_over_http_with_its_evidence_and_pictures(vlm):
    from stream.camera import Camera
    from stream.config import from_dict

    cfg = from_dict({"name": "cam", "source": {"kind": "synthetic", "fps": 4.0, "duration_s": 6.0, "width": 160,
                                               "height": 120}, "memory": {"capacity": 300, "recent_groups": 2},
                     "query": {"max_new_tokens": 6}, "output": {"status_interval_s": 0.0}})
    cam = Camera(cfg, vlm)
    async with serving(cam) as (service, client), cam:
        await cam.done()  # the whole 6 s scene is in the memory, unchanged from here on
        oa = client_of(service)
        ask = {"model": "cam", "messages": [{"role": "user", "content": "What is in view?"}], "max_tokens": 6}
        done = await oa.chat.completions.create(**ask)
        text, chunks = await streamed(oa, **ask)
        assert text == done.choices[0].message.content  # streamed piece by piece, the same answer
        evidence = done.model_extra["streamprune"]
        assert evidence == {**chunks[-1].model_extra["streamprune"], "ttft_s": evidence["ttft_s"],
                            "total_s": evidence["total_s"]}
        assert evidence["camera"] == "cam" and evidence["pruner"] == "echoprune"
        assert 0.0 <= evidence["t_start"] <= evidence["t_end"] <= 6.0 and evidence["groups"] >= 1
        assert 0 < evidence["tokens_used"] <= evidence["memory_tokens"]
        assert 0 < evidence["ttft_s"] <= evidence["total_s"]
        assert evidence["prompt_path"] in ("cached", "full") and evidence["prefilled_tokens"] >= 1
        assert 1 <= done.usage.completion_tokens <= 6 and done.usage.prompt_tokens > evidence["tokens_used"]

        r = await client.post("/api/cameras/cam/ask", json={"question": "What is in view?", "max_new_tokens": 6})
        rest = r.json()
        assert rest["text"] == text and rest["model"] == "tiny-random" and rest["origin"] == "http"

        sheet = await client.get("/api/cameras/cam/contact_sheet.png")
        assert sheet.status_code == 200
        image = Image.open(io.BytesIO(sheet.content))
        assert image.format == "PNG" and image.size[1] > 40  # tiles, not the "memory is empty" strip
        held = {int(g) for g in cam.memory_map().group}
        assert {g for g, _, _ in service.cameras.thumbnails["cam"].kept()} == held
        timeline = await client.get("/api/cameras/cam/timeline.png")
        assert Image.open(io.BytesIO(timeline.content)).size == (900, 260)
        frame = await client.get("/api/cameras/cam/frame.jpg")
        assert Image.open(io.BytesIO(frame.content)).size == (160, 120)
        listing = (await client.get("/api/cameras")).json()["cameras"]
        assert listing[0]["health"] == "stopped" and listing[0]["status"]["groups_encoded"] == 6
