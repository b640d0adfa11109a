"""Every registered pruner names the range of each of its parameters (docs/PRUNERS.md,
"Parameters"), its defaults lie inside, and its constructor accepts exactly that range."""
from __future__ import annotations

import math

import pytest

from pruning import PRUNERS, get_pruner, pruner_param_ranges, pruner_params
from pruning.base import POSITIVE, describe_range


def _just_outside(bound: float, step: float) -> float:
    """The nearest value past `bound` in the direction of `step` (an int past an int bound)."""
    if isinstance(bound, int):
        return bound + int(step)
    return math.nextafter(bound, step * math.inf)


@pytest.mark.parametrize("name", list(PRUNERS))
def test_ranges_cover_exactly_the_parameters_and_their_defaults(name):
    ranges = pruner_param_ranges(name)
    defaults = pruner_params(name)
    assert set(ranges) == set(defaults)
    for param, (lo, hi) in ranges.items():
        assert lo is None or hi is None or lo <= hi, param
        default = defaults[param]
        if default is None:
            continue
        assert lo is None or default >= lo, (param, default, lo)
        assert hi is None or default <= hi, (param, default, hi)


@pytest.mark.parametrize("name", list(PRUNERS))
def test_the_constructor_accepts_exactly_the_range(name):
    for param, (lo, hi) in pruner_param_ranges(name).items():
        for bound, step in ((lo, -1.0), (hi, 1.0)):
            if bound is None:
                continue
            get_pruner(name, **{param: bound})
            with pytest.raises(ValueError, match=param):
                get_pruner(name, **{param: _just_outside(bound, step)})
        with pytest.raises(ValueError, match=param):
            get_pruner(name, **{param: "0.5"})


def test_ranges_are_worded_for_people():
    assert describe_range(POSITIVE, None) == "> 0"
    assert describe_range(POSITIVE, 1.0) == "in (0, 1.0]"
    assert describe_range(0, None) == ">= 0"
    assert describe_range(-1.0, 1.0) == "in [-1.0, 1.0]"
    with pytest.raises(ValueError, match=r"tau must be > 0, got 0"):
        get_pruner("echoprune", tau=0)
