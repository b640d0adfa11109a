"""A small value computed on the model's device, read on the host without making it wait.

Reading a GPU tensor (`.item()`, `bool()`, `.tolist()`) blocks the reading thread until the
device has run everything queued before it, every camera's tower and pruner work included: one
such read per group per camera serializes the host with the GPU. A `LateValue` instead copies
the value to pinned host memory behind the queued work and records an event; `ready()` asks the
event without waiting, and `get()` waits only if it is asked too early. On the CPU the value is
already on the host, so it is ready at once and reading it costs nothing.
"""
from __future__ import annotations

from typing import Any

import torch


class LateValue:
    def __init__(self, value: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if value.device.type == "cuda":
            self._host = value.detach().to("cpu", non_blocking=True)  # a pinned copy, queued
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = value.detach()

    def ready(self) -> bool:
        """Whether `get()` would return without waiting for the device."""
        return self._event is None or self._event.query()

    def get(self) -> Any:
        """The value as Python numbers (`tolist`), waiting for the device if it is not ready."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
