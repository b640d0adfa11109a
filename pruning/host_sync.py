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
"""
from __future__ import annotations

from collections import Counter

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


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


def _to_host(args: tuple, kwargs: dict) -> bool:
    """`Tensor.to(...)` naming the CPU as its device."""
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu":
            return True
    return False


class _Dispatched(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in _ALWAYS or (name in _BOOL_INDEX and _bool_index(args)):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class _Copied(TorchFunctionMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _TO_HOST or (name == "to" and _to_host(args, kwargs)):
            self.counts[f"Tensor.{name}"] += 1
        return func(*args, **kwargs)


class HostSyncs:
    """`with HostSyncs() as syncs: ...` then `syncs.total`, and `syncs.counts` by operation."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._modes = (_Copied(self.counts), _Dispatched(self.counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "HostSyncs":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
