"""Shared fixtures: the tiny model is built once per session into a temp cache."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["STREAMPRUNE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def vlm(model_cache):
    from stream.vlm.qwen import QwenVL

    return QwenVL.load("tiny-random", cache=model_cache)
