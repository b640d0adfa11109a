"""instance_cache: a method's cache kept on its instance, so a model can be freed."""
from __future__ import annotations

import gc
import weakref

import numpy as np

from stream.vlm.instance_cache import instance_cache
from stream.vlm.registry import load_model


class _Counter:
    def __init__(self, base: int):
        self.base, self.calls = base, 0

    @instance_cache(maxsize=2)
    def plus(self, x: int) -> int:
        self.calls += 1
        return self.base + x


def test_each_instance_caches_its_own_results():
    a, b = _Counter(10), _Counter(20)
    assert [a.plus(1), a.plus(1), b.plus(1), b.plus(1)] == [11, 11, 21, 21]
    assert a.calls == 1 and b.calls == 1
    a.plus(2), a.plus(3), a.plus(1)  # maxsize 2: 1 was dropped
    assert a.calls == 4


def test_a_model_that_encoded_and_laid_out_a_prompt_is_freed(model_cache):
    vlm = load_model("tiny-random", cache=model_cache)
    vlm.encode([[np.zeros((112, 112, 3), np.uint8)] * 2])  # caches the grid's tower inputs
    vlm._before_video("")
    ref = weakref.ref(vlm)
    del vlm
    gc.collect()
    assert ref() is None
