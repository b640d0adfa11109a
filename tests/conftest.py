"""Shared fixtures: the tiny model built once per session into a temp cache, and the real
broker and RTSP server fixtures (tests/mqtt_broker.py, tests/rtsp_fixtures.py)."""
from __future__ import annotations

import os

import pytest
from mqtt_broker import broker, mqtt_broker  # noqa: F401  (fixtures: a real mosquitto)
from rtsp_fixtures import rtsp_clip, rtsp_server, rtsp_servers  # noqa: F401  (fixtures: a real RTSP server)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["STREAMPRUNE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def vlm(model_cache):
    from stream.vlm.registry import load_model

    return load_model("tiny-random", cache=model_cache)
