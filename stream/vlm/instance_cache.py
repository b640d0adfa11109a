"""`instance_cache(maxsize)`: `functools.lru_cache` for a method, kept on each instance.

Decorating a method with `functools.lru_cache` keeps one cache on the class, keyed by `self`:
it holds every instance alive (a whole model, here) and shares its slots across them. This
descriptor gives each instance its own cache, made on first use and stored on the instance, so
it goes with it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


class instance_cache:  # noqa: N801 - used as a decorator, like functools.lru_cache
    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.fn: Callable[..., Any] | None = None
        self.name = ""

    def __call__(self, fn: Callable[..., Any]) -> "instance_cache":
        self.fn = fn
        functools.update_wrapper(self, fn)
        return self

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        cached = functools.lru_cache(maxsize=self.maxsize)(self.fn.__get__(obj, owner))
        obj.__dict__[self.name] = cached  # found before this (non-data) descriptor from now on
        return cached
