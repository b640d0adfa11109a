"""Planted token streams: a fixed camera's tokens with periodic distractors and one-off events
whose positions and times are known, so a memory's content can be scored against them.

Pure torch, no model: each position of the grid holds a random unit vector (the background)
plus a direction shared by every token (as a real encoder's tokens share one: same-scene
tokens have cosine ~0.5, so the frame mean is stable) and small noise per group. A blinking
region (an LED: period 2, on/off) and a swaying region (a branch: period 4, cycling through a
few states and back) cover about `distractor_share` of the positions; each event changes a few
background positions to new states for a few groups and then returns them to the background.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning import TokenSet


@dataclass(frozen=True)
class PlantedEvent:
    start: int  # first group showing it
    stop: int  # first group after it
    positions: torch.Tensor  # [k] flat positions row * W + col

    def tokens(self, n: int) -> torch.Tensor:
        """Flat indices t * n + position of every token showing the event."""
        groups = torch.arange(self.start, self.stop)
        return (groups[:, None] * n + self.positions[None, :]).flatten()


@dataclass(frozen=True)
class PlantedStream:
    video: torch.Tensor  # [T, H, W, D]
    distractor: torch.Tensor  # [H * W] bool: a blinking or swaying position
    events: tuple[PlantedEvent, ...]

    @property
    def n(self) -> int:
        return self.video.shape[1] * self.video.shape[2]


def planted_stream(seed: int, t: int = 48, h: int = 8, w: int = 8, d: int = 64, noise: float = 0.15,
                   distractor_share: float = 0.2, n_events: int = 4, event_groups: int = 3,
                   event_positions: int = 2, sway_states: int = 3, shared: float = 1.0) -> PlantedStream:
    """A `t`-group stream of an `h` x `w` grid of `d`-dim tokens (see the module docstring).

    Every state is a unit vector: its own direction plus `shared` times the common one,
    normalised. Noise is Gaussian with norm about `noise` per token, so two views of one state
    have cosine about 1 / (1 + noise^2). The blinking region is the first half of the distractor
    positions (period 2: another state, then the background), the swaying region the rest
    (states 0, 1, ..., `sway_states` - 1 and back, state 0 the background: 0 1 2 1, period 4,
    for the default 3). Events start at evenly spread groups after the first few, on background
    positions, `event_groups` long.
    """
    g = torch.Generator().manual_seed(seed)
    n = h * w

    def unit(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, d, generator=g)
        return x / x.norm(dim=-1, keepdim=True)

    bg = unit(n)
    states = bg[None].repeat(t, 1, 1)  # [T, N, D]: the noiseless state of every token
    order = torch.randperm(n, generator=g)
    n_dis = round(distractor_share * n)
    blink, sway = order[: n_dis // 2], order[n_dis // 2 : n_dis]
    lit = unit(len(blink))
    states[::2, blink] = lit
    sway_cycle = list(range(sway_states)) + list(range(sway_states - 2, 0, -1))
    sway_look = torch.cat([bg[sway][None], unit(sway_states - 1, len(sway))])  # state 0 is the background
    for k in range(t):
        states[k, sway] = sway_look[sway_cycle[k % len(sway_cycle)]]
    quiet = order[n_dis:]
    events = []
    first, last = 4, t - event_groups - 4
    for e in range(n_events):
        start = first + (last - first) * e // max(1, n_events - 1)
        where = quiet[torch.randperm(len(quiet), generator=g)[:event_positions]]
        states[start : start + event_groups, where] = unit(event_positions)
        events.append(PlantedEvent(start, start + event_groups, torch.sort(where).values))
    states = states + shared * unit(1)
    states = states / states.norm(dim=-1, keepdim=True)
    video = states + noise * torch.randn(t, n, d, generator=g) / d**0.5
    distractor = torch.zeros(n, dtype=torch.bool)
    distractor[order[:n_dis]] = True
    return PlantedStream(video.reshape(t, h, w, d), distractor, tuple(events))


def store_report(planted: PlantedStream, snap: TokenSet) -> tuple[float, int]:
    """(share of the long-term store on distractor positions, events with a held token)."""
    h, w = snap.grid
    store = ~snap.recent
    pos = snap.row * w + snap.col
    share = float(planted.distractor[pos[store]].float().mean()) if bool(store.any()) else 0.0
    held = set((snap.group * (h * w) + pos).tolist())
    kept = sum(1 for e in planted.events if held & set(e.tokens(h * w).tolist()))
    return share, kept
