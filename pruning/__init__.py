"""Causal visual-token pruning for live video: the memory, the pruners, the shared math.

Needs only torch. `get_pruner(name, **params)` builds a streaming pruner by name; a new pruner
is one module here and one line in `PRUNERS` (docs/DESIGN.md, "How to extend"). What each
pruner computes, offline and streaming, is defined in docs/PRUNERS.md.
"""
from __future__ import annotations

import importlib
import inspect

from .base import GroupScore, ParamRange, Pruner, TokenSet
from .memory import TokenMemory
from .types import FrameTokens

PRUNERS: dict[str, str] = {
    "echoprune": "pruning.echoprune:EchoPrune",
    "moprune": "pruning.moprune:MoPrune",
    "hieravid": "pruning.hieravid:HieraVid",
    "forestprune": "pruning.forestprune:ForestPrune",
    "uniform": "pruning.baselines:Uniform",
    "recent": "pruning.baselines:Recent",
    "dtd": "pruning.baselines:DTD",
    "random": "pruning.baselines:Random",
}


def pruner_class(name: str) -> type[Pruner]:
    """The class registered under `name`; unknown names list the accepted ones."""
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; accepted: {', '.join(PRUNERS)}")
    module, cls = PRUNERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def pruner_params(name: str) -> dict[str, object]:
    """The keyword parameters a pruner accepts, with their defaults."""
    sig = inspect.signature(pruner_class(name).__init__)
    return {p.name: p.default for p in list(sig.parameters.values())[1:] if p.kind == p.KEYWORD_ONLY or p.default is not p.empty}


def pruner_param_ranges(name: str) -> dict[str, ParamRange]:
    """The inclusive (lo, hi) range of each keyword parameter of pruner `name`; None leaves a side
    open and `pruning.base.POSITIVE` as lo means "> 0" (`pruning.base.describe_range` words it)."""
    return dict(pruner_class(name).param_ranges)


def get_pruner(name: str, **params: object) -> Pruner:
    """Build the streaming pruner `name`; an unknown parameter names the accepted ones."""
    cls = pruner_class(name)
    accepted = pruner_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"pruner {name!r} has no parameter {', '.join(unknown)}; accepted: {', '.join(accepted) or 'none'}")
    return cls(**params)


__all__ = ["FrameTokens", "GroupScore", "PRUNERS", "Pruner", "TokenMemory", "TokenSet", "get_pruner", "pruner_class",
           "pruner_param_ranges", "pruner_params"]
