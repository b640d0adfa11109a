"""GET /metrics: the Prometheus text format, parsed by prometheus_client's own parser, with each
camera's counters read from its status, a TTFT histogram fed by answers, refusals by code, the
HTTP requests and the events dropped for slow clients; one registry per service."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from http_serving import serving
from scripted_camera import ScriptedCamera


async def scrape(client) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted labels: value}} of one scrape."""
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_metrics_show_each_camera_the_ttft_histogram_and_the_http_side():
    a, b = ScriptedCamera("a"), ScriptedCamera("b")
    async with serving(a, b) as (service, client):
        await client.post("/api/cameras/a/ask", json={"question": "Is it there?"})
        await client.post("/api/cameras/a/ask", json={"question": " "})
        await b.source_state("reconnecting")
        m = await scrape(client)

        cam_a, cam_b = (("camera", "a"),), (("camera", "b"),)
        assert m["streamprune_answers_total"] == {cam_a: 1.0, cam_b: 0.0}
        assert m["streamprune_memory_tokens"][cam_a] == 24.0 and m["streamprune_tokens_seen_total"][cam_a] == 24.0
        for name in ("frames_in_total", "frames_sampled_total", "frames_dropped_total", "groups_encoded_total",
                     "group_encode_seconds", "group_prune_seconds", "queued_questions", "backlog_groups"):
            assert m[f"streamprune_{name}"][cam_a] == 0.0, name
        assert m["streamprune_request_errors_total"] == {(("camera", "a"), ("code", "empty_question")): 1.0}
        assert m["streamprune_source_state"][(("camera", "a"), ("state", "streaming"))] == 1.0
        assert m["streamprune_source_state"][(("camera", "b"), ("state", "streaming"))] == 0.0
        assert m["streamprune_source_state"][(("camera", "b"), ("state", "reconnecting"))] == 1.0

        assert m["streamprune_ttft_seconds_count"] == {cam_a: 1.0}
        assert m["streamprune_ttft_seconds_bucket"][(("camera", "a"), ("le", "0.01"))] == 1.0  # 1 ms
        assert m["streamprune_ttft_seconds_bucket"][(("camera", "a"), ("le", "60.0"))] == 1.0
        assert m["streamprune_answer_seconds_count"] == {cam_a: 1.0}

        ask = (("method", "POST"), ("route", "/api/cameras/{name}/ask"))
        assert m["streamprune_http_requests_total"][(*ask, ("status", "200"))] == 1.0
        assert m["streamprune_http_requests_total"][(*ask, ("status", "400"))] == 1.0
        assert m["streamprune_http_event_clients"][()] == 0.0
        assert m["streamprune_http_events_dropped_total"][()] == 0.0
        assert m["streamprune_build_info"] == {(("version", "0.1.0"),): 1.0}

        service.events.queue_size = 1
        slow = service.events.open()  # an event client that reads nothing: it keeps only the newest
        for _ in range(3):
            await client.post("/api/cameras/b/ask", json={"question": "Is it there?"})
        m = await scrape(client)
        assert m["streamprune_http_events_dropped_total"][()] == 2.0 and m["streamprune_http_event_clients"][()] == 1.0
        slow.close()
        scrapes = (("method", "GET"), ("route", "/metrics"), ("status", "200"))
        assert m["streamprune_http_requests_total"][scrapes] == 1.0

    async with serving(ScriptedCamera("a")) as (_, client):  # a second service: a registry of its own
        m = await scrape(client)
        assert "streamprune_ttft_seconds_count" not in m and m["streamprune_answers_total"] == {cam_a: 0.0}


async def test_metrics_ask_for_the_token_too():
    async with serving(ScriptedCamera("a"), token="t0k") as (_, client):
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer t0k"})).status_code == 200
