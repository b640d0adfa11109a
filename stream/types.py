"""Types of the streaming side: a decoded frame as it leaves a source."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One decoded RGB frame; `pts` is seconds since stream start (wall clock for live sources)."""

    index: int
    pts: float
    image: np.ndarray  # H x W x 3, uint8, RGB
