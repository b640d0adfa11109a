"""Counting host synchronizations: the operations that make the host wait for the device.

With the memory on a GPU, every place the Python code needs a value from the device (an
`.item()`, an `int(tensor)`, a `bool(tensor)`, a boolean-mask index or `nonzero`, whose output
size depends on the data) stalls the camera's thread until the device has caught up, so the
per-group hot path is kept free of them. `HostSyncs` counts them on any device, the CPU
included: the same Python code dispatches the same operations there, so a count taken on the
build machines is the count a GPU would see. `.tolist()`, `.cpu()`, `.numpy()` and `.to("cpu")`
of a CPU tensor never reach the dispatcher, so they are counted where Python calls them. The
`meta` device, where every read-back raises, proves a path has none at all
(tests/test_memory_device.py does both).

A copy from the host to a GPU waits too: without `non_blocking` (and pinned memory behind it)
PyTorch synchronizes the stream after it. `HostSyncs` counts those where the target is not the
CPU (`torch.tensor(..., device=...)`, `Tensor.to`, `Tensor.copy_`), so a run on `meta` shows
them; `to_device` is the copy that does not wait, and `HostCopy` the read-back that waits only
when its value is needed (after letting go of a lock, or a group later). `HostSyncs` counts a
`HostCopy`'s reads apart, as `late` (`total` leaves them out): whether one ever waits depends
on how much later it is read, which the caller says in its own docs.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Read-backs seen by the dispatcher (any device).
_ALWAYS = {
    "aten._local_scalar_dense",  # .item(), int(), float(), bool() of a tensor
    "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
    "aten.equal", "aten.is_nonzero", "aten.bincount",
}
_BOOL_INDEX = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
# Copies to the host, which a CPU tensor makes without reaching the dispatcher.
_TO_HOST = {"tolist", "cpu", "numpy"}
# Tensors made on a device from host data: a blocking copy there.
_FROM_DATA = {"tensor", "as_tensor", "asarray"}


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


def _to_host(args: tuple, kwargs: dict) -> bool:
    """`Tensor.to(...)` naming the CPU as its device."""
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu":
            return True
    return False


def _on_a_device(device: object) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type != "cpu"


def _blocking_to_device(name: str, args: tuple, kwargs: dict) -> bool:
    """A copy of host data to a device that makes the host wait for the device's queue."""
    if kwargs.get("non_blocking"):
        return False
    if name in _FROM_DATA:
        data = args[0] if args else kwargs.get("data")
        return _on_a_device(kwargs.get("device")) and not (
            isinstance(data, torch.Tensor) and data.device == torch.device(kwargs["device"]))
    if name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
        return name == "cuda" or any(_on_a_device(a) for a in (*args[1:], kwargs.get("device")))
    if name == "copy_" and len(args) > 1 and all(isinstance(a, torch.Tensor) for a in args[:2]):
        return args[0].device.type != "cpu" and args[1].device.type == "cpu" and not (args[2:] and args[2])
    return False


_reading = threading.local()  # .late: inside a HostCopy, whose reads are counted apart
LATE = "late "  # the prefix of a HostCopy's reads in `HostSyncs.counts`


@contextlib.contextmanager
def _late() -> Iterator[None]:
    before = getattr(_reading, "late", False)
    _reading.late = True
    try:
        yield
    finally:
        _reading.late = before


def _count(counts: Counter, name: str) -> None:
    counts[f"{LATE}{name}" if getattr(_reading, "late", False) else name] += 1


class _Dispatched(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in _ALWAYS or (name in _BOOL_INDEX and _bool_index(args)):
            _count(self.counts, name)
        return func(*args, **(kwargs or {}))


class _Copied(TorchFunctionMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _TO_HOST or (name == "to" and _to_host(args, kwargs)):
            _count(self.counts, f"Tensor.{name}")
        elif _blocking_to_device(name, args, kwargs):
            _count(self.counts, f"{name} to a device, blocking")
        return func(*args, **kwargs)


class HostSyncs:
    """`with HostSyncs() as syncs: ...` then `syncs.total` (what waits where it is read),
    `syncs.late` (a `HostCopy`'s reads) and `syncs.counts` by operation."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._modes = (_Copied(self.counts), _Dispatched(self.counts))

    @property
    def total(self) -> int:
        return sum(n for k, n in self.counts.items() if not k.startswith(LATE))

    @property
    def late(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith(LATE))

    def __enter__(self) -> "HostSyncs":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)


def to_device(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """`x` (on the host) on `device` without the host waiting for the device's queue: through
    pinned memory on a GPU (whose buffer PyTorch keeps until the copy is done), queued either way."""
    device = torch.device(device)
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


class HostCopy:
    """A host copy of device data, queued behind the device's work: on a GPU a non-blocking copy
    to pinned memory and an event, so the caller can let go of a lock, or go on with its next
    group, before it waits; `ready()` asks without waiting, `get()` waits only if it must. On the
    CPU it is a plain copy, ready at once."""

    def __init__(self, x: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        with _late():
            if x.device.type == "cuda":
                self._host = x.detach().to("cpu", non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(torch.cuda.current_stream(x.device))  # the copy's stream, on x's GPU
            else:
                self._host = x.detach().to("cpu", copy=True)

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._host

    def tolist(self):
        """The value as Python numbers (`get().tolist()`, counted as late)."""
        with _late():
            return self.get().tolist()
