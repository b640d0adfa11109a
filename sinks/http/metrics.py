"""Prometheus metrics of the served cameras and of the HTTP service, in a registry of the
service's own (a process may build several services; tests build many).

A camera's counters are read from `camera.status()` at scrape time, so nothing is counted
twice; only what a status does not keep is observed here: the time to first token and the
answer time of every answer on the bus (histograms), and the HTTP requests and the events
dropped for slow `/api/events` clients.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from stream.camera_api import CameraService
from stream.events import Answer, Status

PREFIX = "streamprune"
SOURCE_STATES = ("connecting", "streaming", "reconnecting", "stopped", "failed")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
ANSWER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

# Status field -> (metric name, help); counters get "_total" from the client library
STATUS_COUNTERS = {
    "frames_in": ("frames_in", "Frames read from the source"),
    "frames_out": ("frames_sampled", "Frames the sampler passed to the encoder"),
    "dropped": ("frames_dropped", "Frames dropped (the sampler's `latest` policy, or groups the encoder dropped)"),
    "groups_encoded": ("groups_encoded", "Groups of frames encoded into the memory"),
    "tokens_seen": ("tokens_seen", "Visual tokens the encoder produced"),
    "answers": ("answers", "Questions answered (through any door, watch checks included)"),
}
STATUS_GAUGES = {
    "memory_tokens": ("memory_tokens", "Visual tokens the memory holds", 1.0),
    "queued": ("queued_questions", "Questions waiting behind the one being answered", 1.0),
    "backlog": ("backlog_groups", "Groups waiting for the encoder", 1.0),
    "encode_ms": ("group_encode_seconds", "Encoder time per group", 1e-3),
    "prune_ms": ("group_prune_seconds", "Pruner time per group", 1e-3),
    "ingest_latency_ms": ("ingest_latency_seconds", "From a group's last frame to the group in memory (last group)", 1e-3),
    "stream_s": ("stream_seconds", "Stream time of the newest group in the memory", 1.0),
    "watches": ("watches", "Watches of the camera", 1.0),
}
SOURCE_COUNTERS = {"frames": "source_frames", "errors": "source_errors", "reconnects": "source_reconnects"}


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CameraCollector:
    """Each camera's `Status`, read at scrape time."""

    def __init__(self, cameras: Mapping[str, CameraService]):
        self.cameras = cameras

    def collect(self) -> Iterable[Metric]:
        statuses = [(name, cam.status()) for name, cam in self.cameras.items()]
        yield from self._status_fields(statuses)
        yield from self._source(statuses)
        errors = CounterMetricFamily(f"{PREFIX}_request_errors", "Questions and requests refused, by code",
                                     labels=["camera", "code"])
        watch = CounterMetricFamily(f"{PREFIX}_watch_events", "What the watches did (checks, fire, cooldown, "
                                    "clear, unclear, errors, preempted, slowed, ...)", labels=["camera", "kind"])
        restarts = CounterMetricFamily(f"{PREFIX}_task_restarts", "Restarts of the camera's supervised tasks",
                                       labels=["camera", "task"])
        cache = GaugeMetricFamily(f"{PREFIX}_prompt_cache_bytes", "Bytes the camera's prompt cache holds",
                                  labels=["camera"])
        cache_tokens = GaugeMetricFamily(f"{PREFIX}_prompt_cache_tokens", "Tokens the camera's prompt cache holds",
                                         labels=["camera"])
        for name, s in statuses:
            for code, n in sorted(s.errors.items()):
                errors.add_metric([name, str(code)], n)
            for kind, n in sorted(s.watch_counters.items()):
                watch.add_metric([name, str(kind).removeprefix("watch_")], n)
            for task, state in sorted(s.tasks.items()):
                if isinstance(state, dict) and _number(state.get("restarts")):
                    restarts.add_metric([name, str(task)], state["restarts"])
            if _number(s.prompt_cache.get("bytes")):
                cache.add_metric([name], s.prompt_cache["bytes"])
            if _number(s.prompt_cache.get("tokens")):
                cache_tokens.add_metric([name], s.prompt_cache["tokens"])
        yield from (errors, watch, restarts, cache, cache_tokens)

    def _status_fields(self, statuses: list[tuple[str, Status]]) -> Iterable[Metric]:
        for field, (metric, doc) in STATUS_COUNTERS.items():
            family = CounterMetricFamily(f"{PREFIX}_{metric}", doc, labels=["camera"])
            for name, s in statuses:
                family.add_metric([name], getattr(s, field))
            yield family
        for field, (metric, doc, scale) in STATUS_GAUGES.items():
            family = GaugeMetricFamily(f"{PREFIX}_{metric}", doc, labels=["camera"])
            for name, s in statuses:
                family.add_metric([name], getattr(s, field) * scale)
            yield family

    def _source(self, statuses: list[tuple[str, Status]]) -> Iterable[Metric]:
        state = GaugeMetricFamily(f"{PREFIX}_source_state", "1 for the source's state now, 0 for the others",
                                  labels=["camera", "state"])
        age = GaugeMetricFamily(f"{PREFIX}_source_last_frame_age_seconds", "Seconds since the source's newest frame",
                                labels=["camera"])
        counters = {key: CounterMetricFamily(f"{PREFIX}_{metric}", f"The source's {key}", labels=["camera"])
                    for key, metric in SOURCE_COUNTERS.items()}
        for name, s in statuses:
            now = str(s.source.get("state"))
            for st in SOURCE_STATES if now in SOURCE_STATES else (*SOURCE_STATES, now):
                state.add_metric([name, st], float(st == now))
            if _number(s.source.get("last_frame_age_s")):
                age.add_metric([name], s.source["last_frame_age_s"])
            for key, family in counters.items():
                if _number(s.source.get(key)):
                    family.add_metric([name], s.source[key])
        yield state
        yield age
        yield from counters.values()


class ServiceCollector:
    """What the HTTP service knows at scrape time: its open event streams and their losses."""

    def __init__(self, event_clients: Callable[[], int], dropped: Callable[[], int]):
        self.event_clients = event_clients
        self.dropped = dropped

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}_http_event_clients", "Open /api/events streams",
                                value=self.event_clients())
        yield CounterMetricFamily(f"{PREFIX}_http_events_dropped", "Events dropped for /api/events clients "
                                  "too slow to take them", value=self.dropped())


class Metrics:
    def __init__(self, cameras: Mapping[str, CameraService], version: str, event_clients: Callable[[], int],
                 dropped: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(f"{PREFIX}_ttft_seconds", "Time from the LLM taking a question to its first token",
                              ["camera"], buckets=TTFT_BUCKETS, registry=r)
        self.answer_time = Histogram(f"{PREFIX}_answer_seconds", "Time from the LLM taking a question to its answer",
                                     ["camera"], buckets=ANSWER_BUCKETS, registry=r)
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests served, by route and status",
                                ["method", "route", "status"], registry=r)
        Gauge(f"{PREFIX}_build_info", "The streamprune version serving", ["version"], registry=r).labels(version).set(1)
        r.register(CameraCollector(cameras))
        r.register(ServiceCollector(event_clients, dropped))

    def observe(self, answer: Answer) -> None:
        self.ttft.labels(answer.camera).observe(answer.ttft_s)
        self.answer_time.labels(answer.camera).observe(answer.total_s)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The scrape in the format `accept` asks for (the classic text format by default)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
