"""A synthetic camera with scripted ground truth, for judging what a token memory keeps.

The scene is a `Script`: scenes split by cuts (each with its own textured background), actors
(textured shapes and text signs moving along piecewise-linear paths), flickering lamps, slow
lighting drift, per-pixel sensor noise and, when asked for (`make_script(periodic=True)`),
periodic distractors: a blinking light, a swaying branch and a shimmering region that repeat
forever without being events (the scene a memory should not fill with repeats). Positions are fractions of the frame, so one script
renders at any resolution. `render(t)` is a pure function of (seed, script, size, t): a frame can
be re-rendered at will, and backgrounds, sprites and noise are built once and cached.

Ground truth (`events`): every actor path segment whose phase is not "stay" is an event
(enter, move, leave, appear, brief) and every cut is one. An event's interval is clipped to
the time the actor is at least partly inside the frame; its `box` (x0, y0, x1, y1; pixels,
x1/y1 exclusive) is the union of the actor's boxes over that interval, clipped to the frame:
for linear motion that is the union of the boxes at both ends. `boxes_at(t)` gives the exact
per-frame boxes. Flickering lamps, the periodic distractors and the lighting drift are
`distractors`: they change pixels but are not events.

Sensor noise comes from a few precomputed Gaussian frames at a per-frame hashed offset: fresh
noise costs ~12 ms per 640x480 frame here, the whole render ~0.5 ms.
"""
from __future__ import annotations

import bisect
import functools
import math
import random
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass

import cv2
import numpy as np

from ..validation import bounded, choice
from .base import Pacer, Source, SourceConfig, iterate_in_thread

Box = tuple[int, int, int, int]

OBJECT_SHAPES = ("circle", "square", "triangle", "diamond")
SHAPES = (*OBJECT_SHAPES, "sign")
PHASES = ("enter", "move", "stay", "leave", "appear", "brief")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 185, 45),
    "blue": (35, 65, 225),
    "yellow": (245, 215, 20),
    "magenta": (205, 40, 205),
    "cyan": (20, 205, 215),
    "orange": (250, 135, 20),
    "white": (245, 245, 245),
}
SIGN_TEXTS = ("OPEN", "CLOSED", "EXIT", "SALE", "STOP", "PUSH")
SIGN_ASPECT = 2.4  # sign width / height
LAMP_ON = (255, 244, 200)
LAMP_OFF = (70, 70, 80)
PERIODIC_KINDS = ("blink", "sway", "shimmer")
BLINK_ON = (255, 150, 30)
BLINK_OFF = (60, 45, 35)
_NOISE_BANKS = 4
_NOISE_PAD = 32  # noise frames are this much larger; a random offset picks the window
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Actor:
    """A shape moving along `keys` = ((t_s, x, y), ...), its centre in frame fractions.

    Visible for keys[0] <= t < keys[-1]; linear between keys; `phases[i]` names the segment
    from keys[i] to keys[i + 1]. `size` is the sprite height as a fraction of frame height
    (a sign is `SIGN_ASPECT` times wider).
    """

    label: str
    shape: str
    colour: tuple[int, int, int]
    size: float
    keys: tuple[tuple[float, float, float], ...]
    phases: tuple[str, ...]
    text: str = ""

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"actor {self.label!r}: shape {self.shape!r} not in {SHAPES}")
        if len(self.keys) < 2 or len(self.phases) != len(self.keys) - 1:
            raise ValueError(f"actor {self.label!r}: need >= 2 keys and one phase per segment")
        if any(p not in PHASES for p in self.phases):
            raise ValueError(f"actor {self.label!r}: phases must be in {PHASES}")
        times = [k[0] for k in self.keys]
        if times != sorted(times) or times[0] >= times[-1]:
            raise ValueError(f"actor {self.label!r}: key times must be non-decreasing and span > 0")
        if not self.size > 0:
            raise ValueError(f"actor {self.label!r}: size must be > 0")


@dataclass(frozen=True)
class Flicker:
    """A lamp at `box` (frame fractions) switching on/off at random every `slot_s` seconds."""

    label: str
    box: tuple[float, float, float, float]
    start_s: float
    end_s: float
    slot_s: float = 0.15

    def __post_init__(self) -> None:
        if not (self.start_s < self.end_s and self.slot_s > 0):
            raise ValueError(f"flicker {self.label!r}: need start_s < end_s and slot_s > 0")


@dataclass(frozen=True)
class Periodic:
    """A distractor at `box` (frame fractions) repeating every `period_s` for the whole script.

    "blink": a light, on for the first half of each period and off for the second. "sway": a
    branch hanging across `box` (the area it sweeps), stepping through `steps` positions and
    back, a pendulum. "shimmer": a region cycling through `steps` textures (water, a screen).
    """

    label: str
    kind: str
    box: tuple[float, float, float, float]
    period_s: float
    steps: int = 3

    def __post_init__(self) -> None:
        if self.kind not in PERIODIC_KINDS:
            raise ValueError(f"periodic {self.label!r}: kind {self.kind!r} not in {PERIODIC_KINDS}")
        x0, y0, x1, y1 = self.box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"periodic {self.label!r}: box must lie inside the frame, x0 < x1 and y0 < y1")
        if not (self.period_s > 0 and self.steps >= 2):
            raise ValueError(f"periodic {self.label!r}: need period_s > 0 and steps >= 2")

    def phase(self, t: float) -> int:
        """Which state shows at time t: on (0) / off (1), a sway position, a texture."""
        if self.kind == "blink":
            return int((t / self.period_s) % 1.0 >= 0.5)
        if self.kind == "sway":
            cycle = [*range(self.steps), *range(self.steps - 2, 0, -1)]
            return cycle[math.floor(t / self.period_s * len(cycle)) % len(cycle)]
        return math.floor(t / self.period_s * self.steps) % self.steps


@dataclass(frozen=True)
class Script:
    """The whole scene: background k is shown from cuts[k - 1] (0 for k = 0)."""

    duration_s: float
    cuts: tuple[float, ...] = ()
    actors: tuple[Actor, ...] = ()
    flickers: tuple[Flicker, ...] = ()
    drift_amplitude: float = 0.08
    drift_period_s: float = 40.0
    noise_sigma: float = 3.0
    periodic: tuple[Periodic, ...] = ()  # empty: the scene renders as before periodic distractors existed

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ValueError("script duration_s must be > 0")
        if list(self.cuts) != sorted(set(self.cuts)) or any(not 0 < c < self.duration_s for c in self.cuts):
            raise ValueError("script cuts must be increasing and inside (0, duration_s)")
        times = [k[0] for a in self.actors for k in a.keys]
        times += [t for f in self.flickers for t in (f.start_s, f.end_s)]
        if any(not 0 <= t <= self.duration_s for t in times):
            raise ValueError("script actor keys and flicker times must lie in [0, duration_s]")
        labels = [a.label for a in self.actors] + [f.label for f in self.flickers] + [p.label for p in self.periodic]
        if len(labels) != len(set(labels)):
            raise ValueError("script labels must be unique")


@dataclass(frozen=True)
class GroundTruthEvent:
    """A scripted happening; `box` = (x0, y0, x1, y1) pixels, x1/y1 exclusive."""

    kind: str
    label: str
    start_s: float
    end_s: float
    box: Box


@dataclass(frozen=True)
class SyntheticConfig(SourceConfig):
    """`[source]` with kind = "synthetic" (the default): the scripted scene of `make_script`."""

    kind: str = choice("synthetic", default="synthetic")
    fps: float = bounded(10.0, 0.1, 240)  # frames rendered per second
    duration_s: float = bounded(60.0, 1.0, 86400 * 7)  # length of the scripted scene
    seed: int = bounded(0, 0, None)  # the scene script and noise
    width: int = bounded(640, 32, 7680)
    height: int = bounded(480, 32, 4320)
    realtime: bool = False  # pace to wall clock (a live camera); False = as fast as rendered
    speed: float = bounded(1.0, 0.01, 1000)  # with realtime: playback speed factor


class SyntheticSource(Source):
    """Frames of a `Script` at `fps`; pts = index / fps; `realtime` paces to wall clock / speed.

    `duration_s` defaults to 60 s (built by `make_script`) or to the given script's duration.
    """

    config_class = SyntheticConfig

    def __init__(
        self,
        duration_s: float | None = None,
        fps: float = 10.0,
        seed: int = 0,
        width: int = 640,
        height: int = 480,
        realtime: bool = False,
        speed: float = 1.0,
        script: Script | None = None,
        name: str | None = None,
    ):
        if not fps > 0 or width < 16 or height < 16 or seed < 0:
            raise ValueError("need fps > 0, width and height >= 16, seed >= 0")
        if script is None:
            script = make_script(60.0 if duration_s is None else duration_s, seed)
        elif duration_s is not None and duration_s != script.duration_s:
            raise ValueError(f"duration_s={duration_s} differs from the script's {script.duration_s}")
        super().__init__(name or f"synthetic:{seed}", live=realtime)
        self.script = script
        self.fps = fps
        self.seed = seed
        self.width = width
        self.height = height
        self.realtime = realtime
        self._pacer = Pacer(speed) if realtime else None
        self.n_frames = round(script.duration_s * fps)
        self._times = [[k[0] for k in a.keys] for a in script.actors]
        self._sizes = [_sprite_size(a, height) for a in script.actors]
        self._events = self._ground_truth()

    @classmethod
    def from_config(cls, cfg: SyntheticConfig, name: str) -> SyntheticSource:
        return cls(duration_s=cfg.duration_s, fps=cfg.fps, seed=cfg.seed, width=cfg.width, height=cfg.height,
                   realtime=cfg.realtime, speed=cfg.speed, name=name)

    @property
    def duration_s(self) -> float:
        return self.script.duration_s

    @property
    def events(self) -> tuple[GroundTruthEvent, ...]:
        """Scripted events (enter, move, leave, appear, brief, cut), by start time."""
        return self._events

    @property
    def distractors(self) -> tuple[GroundTruthEvent, ...]:
        """Pixel changes that are not events: flickering lamps ("flicker"), the periodic
        distractors ("blink", "sway": the whole swept area, "shimmer"), lighting drift."""
        out = [
            GroundTruthEvent("flicker", f.label, f.start_s, f.end_s, self._px_box(f.box))
            for f in self.script.flickers
        ]
        out += [GroundTruthEvent(p.kind, p.label, 0.0, self.duration_s, self._px_box(p.box)) for p in self.script.periodic]
        if self.script.drift_amplitude:
            full = (0, 0, self.width, self.height)
            out.append(GroundTruthEvent("lighting", "lighting drift", 0.0, self.duration_s, full))
        return tuple(out)

    def boxes_at(self, t: float) -> dict[str, Box]:
        """Box of every actor at least partly inside the frame at time t."""
        out = {}
        for actor, times, size in zip(self.script.actors, self._times, self._sizes):
            centre = _centre(actor, times, t)
            if centre is not None:
                box = self._box(centre, size)
                if box[0] < box[2] and box[1] < box[3]:
                    out[actor.label] = box
        return out

    def render(self, t: float) -> np.ndarray:
        """The frame at time t (H x W x 3 uint8 RGB), a pure function of (seed, script, size, t)."""
        s = self.script
        frame = _background(self.seed, bisect.bisect_right(s.cuts, t), self.width, self.height).copy()
        for i, f in enumerate(s.flickers):
            if f.start_s <= t < f.end_s:
                on = _mix(self.seed, i, math.floor((t - f.start_s) / f.slot_s)) % 100 < 55
                x0, y0, x1, y1 = self._px_box(f.box)
                frame[y0:y1, x0:x1] = LAMP_ON if on else LAMP_OFF
        for i, p in enumerate(s.periodic):
            self._draw_periodic(frame, i, p, t)
        for actor, times, size in zip(s.actors, self._times, self._sizes):
            centre = _centre(actor, times, t)
            if centre is not None:
                patch, mask = _sprite(actor.shape, actor.colour, size, actor.text)
                _paste(frame, patch, mask, self._corner(centre, size))
        if s.drift_amplitude:
            gain = 1.0 + s.drift_amplitude * math.sin(2 * math.pi * t / s.drift_period_s)
            frame = cv2.convertScaleAbs(frame, alpha=gain)
        if s.noise_sigma:
            pos, neg = _noise_bank(self.seed, self.width, self.height, s.noise_sigma)
            h = _mix(self.seed, round(t * 1e6))
            k, dy, dx = h % _NOISE_BANKS, (h >> 8) % _NOISE_PAD, (h >> 16) % _NOISE_PAD
            window = np.s_[k, dy : dy + self.height, dx : dx + self.width]
            cv2.add(frame, pos[window], dst=frame)
            cv2.subtract(frame, neg[window], dst=frame)
        return frame

    async def _produce(self) -> AsyncIterator[tuple[float, np.ndarray]]:
        def frames() -> Generator[tuple[float, np.ndarray], None, None]:
            for i in range(self.n_frames):
                yield i / self.fps, self.render(i / self.fps)

        async for pts, image in iterate_in_thread(frames, self._stop, self.name):
            if self._pacer is not None:
                await self._pacer.wait(pts)
            yield pts, image

    def _draw_periodic(self, frame: np.ndarray, i: int, p: Periodic, t: float) -> None:
        x0, y0, x1, y1 = self._px_box(p.box)
        k = p.phase(t)
        if p.kind == "blink":
            frame[y0:y1, x0:x1] = BLINK_OFF if k else BLINK_ON
        elif p.kind == "shimmer":
            frame[y0:y1, x0:x1] = _shimmer(self.seed, i, k, x1 - x0, y1 - y0)
        else:
            bw = max(1, round(0.45 * (x1 - x0)))
            patch, mask = _branch(bw, y1 - y0)
            _paste(frame, patch, mask, (x0 + round(k * (x1 - x0 - bw) / (p.steps - 1)), y0))

    def _corner(self, centre: tuple[float, float], size: tuple[int, int]) -> tuple[int, int]:
        """Top-left pixel of a sprite of `size` (w, h) centred at `centre` (frame fractions)."""
        return (
            math.floor(centre[0] * self.width - size[0] / 2 + 0.5),
            math.floor(centre[1] * self.height - size[1] / 2 + 0.5),
        )

    def _box(self, centre: tuple[float, float], size: tuple[int, int]) -> Box:
        x0, y0 = self._corner(centre, size)
        return _clip((x0, y0, x0 + size[0], y0 + size[1]), self.width, self.height)

    def _px_box(self, box: tuple[float, float, float, float]) -> Box:
        w, h = self.width, self.height
        x0, y0, x1, y1 = box
        return _clip((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)), w, h)

    def _ground_truth(self) -> tuple[GroundTruthEvent, ...]:
        full = (0, 0, self.width, self.height)
        cuts = enumerate(self.script.cuts)
        events = [GroundTruthEvent("cut", f"cut to scene {k + 1}", c, c, full) for k, c in cuts]
        for actor, size in zip(self.script.actors, self._sizes):
            for a, b, phase in zip(actor.keys, actor.keys[1:], actor.phases):
                span = None if phase == "stay" else _visible_span(a, b, size, self.width, self.height)
                if span is None:
                    continue
                ends = [self._box(_lerp(a, b, t), size) for t in span]
                box = (min(ends[0][0], ends[1][0]), min(ends[0][1], ends[1][1]),
                       max(ends[0][2], ends[1][2]), max(ends[0][3], ends[1][3]))
                events.append(GroundTruthEvent(phase, actor.label, span[0], span[1], box))
        return tuple(sorted(events, key=lambda e: (e.start_s, e.label)))


def make_script(
    duration_s: float,
    seed: int = 0,
    *,
    scene_s: float = 30.0,
    movers_per_scene: int = 2,
    briefs_per_scene: int = 1,
    signs_per_scene: int = 1,
    flickers_per_scene: int = 1,
    drift_amplitude: float = 0.08,
    drift_period_s: float = 40.0,
    noise_sigma: float = 3.0,
    periodic: bool = False,
) -> Script:
    """A random (by seed) script: about `duration_s / scene_s` scenes split by cuts, each with
    its movers (enter, move, stay, leave), signs appearing until the cut, brief (1-2 s)
    objects and a flickering lamp. A 60 s script has one cut near 30 s; the first sign says
    "OPEN". Movers stay in the lower part of the frame, signs and lamps in the upper part.
    `periodic` adds a blinking light (left edge), a swaying branch (right edge) and a shimmering
    strip (bottom), about 13% of the frame, from their own random stream: the actors, cuts and
    lamps are those of the same seed without them.
    """
    if not duration_s > 0 or not scene_s > 0:
        raise ValueError("duration_s and scene_s must be > 0")
    rng = random.Random(seed)
    n = max(1, round(duration_s / scene_s))
    length = duration_s / n
    cuts = tuple(k * length + rng.uniform(-0.1, 0.1) * length for k in range(1, n))
    bounds = (0.0, *cuts, duration_s)
    names: dict[str, int] = {}

    def unique(label: str) -> str:
        names[label] = names.get(label, 0) + 1
        return label if names[label] == 1 else f"{label} {names[label]}"

    actors: list[Actor] = []
    flickers: list[Flicker] = []
    for s0, s1 in zip(bounds, bounds[1:]):
        for _ in range(signs_per_scene):
            text = "OPEN" if not actors else rng.choice(SIGN_TEXTS)
            actors.append(_sign(rng, s0, s1, unique(f'sign "{text}"'), text))
        for _ in range(movers_per_scene):
            actors.append(_mover(rng, s0, s1, unique))
        for _ in range(briefs_per_scene):
            actors.append(_brief(rng, s0, s1, unique))
        for _ in range(flickers_per_scene):
            flickers.append(_flicker(rng, s0, s1, unique("flickering lamp")))
    return Script(
        duration_s, cuts, tuple(actors), tuple(flickers), drift_amplitude, drift_period_s, noise_sigma,
        _periodic(random.Random(_mix(seed, 0x5E71))) if periodic else (),
    )


def _periodic(rng: random.Random) -> tuple[Periodic, ...]:
    """A light blinking every 1 or 2 s (a group or two at 2 fps), a branch swaying through 3
    positions in 4 s and a strip shimmering through 3 textures in 1.5 s."""
    x, y = rng.uniform(0.02, 0.06), rng.uniform(0.28, 0.34)
    blink = Periodic("blinking light", "blink", (x, y, x + 0.12, y + 0.16), rng.choice((2.0, 4.0)))
    x, y = rng.uniform(0.79, 0.82), rng.uniform(0.25, 0.28)
    sway = Periodic("swaying branch", "sway", (x, y, x + 0.17, y + 0.38), 4.0)
    x = rng.uniform(0.3, 0.34)
    shimmer = Periodic("shimmering strip", "shimmer", (x, 0.87, x + 0.36, 1.0), 1.5)
    return blink, sway, shimmer


def _sign(rng: random.Random, s0: float, s1: float, label: str, text: str) -> Actor:
    t = s0 + rng.uniform(0.15, 0.5) * (s1 - s0)
    x, y = rng.uniform(0.32, 0.68), rng.uniform(0.12, 0.28)
    keys = ((t, x, y), (s1, x, y))
    return Actor(label, "sign", COLOURS["red"], rng.uniform(0.1, 0.12), keys, ("appear",), text)


def _pick_look(rng: random.Random) -> tuple[str, str]:
    return rng.choice(list(COLOURS)), rng.choice(OBJECT_SHAPES)


def _mover(rng: random.Random, s0: float, s1: float, unique: Callable[[str], str]) -> Actor:
    colour, shape = _pick_look(rng)
    margin = min(1.0, 0.05 * (s1 - s0))
    spans = [rng.uniform(1.5, 2.5), rng.uniform(3.0, 6.0), rng.uniform(1.0, 3.0), rng.uniform(1.5, 2.5)]
    avail = s1 - s0 - 2 * margin
    scale = min(1.0, avail / sum(spans))
    spans = [d * scale for d in spans]
    t = s0 + margin + rng.uniform(0.0, avail - sum(spans))
    x1, y1 = rng.uniform(0.2, 0.45), rng.uniform(0.45, 0.85)
    x2, y2 = rng.uniform(0.55, 0.8), rng.uniform(0.45, 0.85)
    if rng.random() < 0.5:
        x1, x2 = x2, x1
    points = [_offscreen(rng, x1, y1), (x1, y1), (x2, y2), (x2, y2), _offscreen(rng, x2, y2)]
    times = [t + sum(spans[:i]) for i in range(5)]
    keys = tuple((ti, *p) for ti, p in zip(times, points))
    phases = ("enter", "move", "stay", "leave")
    return Actor(unique(f"{colour} {shape}"), shape, COLOURS[colour], rng.uniform(0.12, 0.2), keys, phases)


def _offscreen(rng: random.Random, x: float, y: float) -> tuple[float, float]:
    """A point beyond the left, right or bottom edge, level with (x, y)."""
    side = rng.choice(("left", "right", "bottom"))
    return {"left": (-0.2, y), "right": (1.2, y), "bottom": (x, 1.2)}[side]


def _brief(rng: random.Random, s0: float, s1: float, unique: Callable[[str], str]) -> Actor:
    colour, shape = _pick_look(rng)
    d = min(rng.uniform(1.0, 2.0), 0.3 * (s1 - s0))
    margin = min(1.0, 0.05 * (s1 - s0))
    t = rng.uniform(s0 + margin, max(s0 + margin, s1 - margin - d))
    x, y = rng.uniform(0.25, 0.75), rng.uniform(0.4, 0.7)
    keys = ((t, x, y), (t + d, x, y))
    size = rng.uniform(0.1, 0.14)
    return Actor(unique(f"{colour} {shape}"), shape, COLOURS[colour], size, keys, ("brief",))


def _flicker(rng: random.Random, s0: float, s1: float, label: str) -> Flicker:
    length = s1 - s0
    x = rng.choice((rng.uniform(0.04, 0.12), rng.uniform(0.83, 0.91)))
    y = rng.uniform(0.04, 0.16)
    start, end = s0 + rng.uniform(0.0, 0.2) * length, s1 - rng.uniform(0.0, 0.2) * length
    return Flicker(label, (x, y, x + 0.05, y + 0.07), start, end, rng.uniform(0.1, 0.25))


def _mix(*values: int) -> int:
    """A stable 64-bit hash (splitmix64 steps); Python's hash() is salted between runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 31)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h


def _clip(box: Box, w: int, h: int) -> Box:
    return (min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w), min(max(box[3], 0), h))


def _lerp(a: tuple[float, float, float], b: tuple[float, float, float], t: float) -> tuple[float, float]:
    u = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0.0
    return a[1] + (b[1] - a[1]) * u, a[2] + (b[2] - a[2]) * u


def _centre(actor: Actor, times: list[float], t: float) -> tuple[float, float] | None:
    if not times[0] <= t < times[-1]:
        return None
    i = bisect.bisect_right(times, t) - 1
    return _lerp(actor.keys[i], actor.keys[i + 1], t)


def _sprite_size(actor: Actor, height: int) -> tuple[int, int]:
    h = max(4, round(actor.size * height))
    return (round(SIGN_ASPECT * h) if actor.shape == "sign" else h), h


def _visible_span(
    a: tuple[float, float, float], b: tuple[float, float, float], size: tuple[int, int], w: int, h: int
) -> tuple[float, float] | None:
    """The part of segment a -> b during which a sprite of `size` overlaps the frame.

    Each of the four overlap conditions is linear in the segment fraction u, so each bounds u.
    """
    if b[0] <= a[0]:
        return None
    lo, hi = 0.0, 1.0
    for p0, p1, half, extent in ((a[1] * w, b[1] * w, size[0] / 2, w), (a[2] * h, b[2] * h, size[1] / 2, h)):
        for c0, c1 in ((p0 + half, p1 - p0), (extent + half - p0, p0 - p1)):  # need c0 + c1 * u > 0
            if c1 == 0:
                if c0 <= 0:
                    return None
            elif c1 > 0:
                lo = max(lo, -c0 / c1)
            else:
                hi = min(hi, -c0 / c1)
    if lo >= hi:
        return None
    return a[0] + lo * (b[0] - a[0]), (b[0] if hi == 1.0 else a[0] + hi * (b[0] - a[0]))


def _paste(frame: np.ndarray, patch: np.ndarray, mask: np.ndarray, corner: tuple[int, int]) -> None:
    """Copy the masked sprite into the frame at `corner`, clipped to the frame."""
    x0, y0 = corner
    ph, pw = mask.shape
    fh, fw = frame.shape[:2]
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + pw, fw), min(y0 + ph, fh)
    if fx0 >= fx1 or fy0 >= fy1:
        return
    sub = np.s_[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    np.copyto(frame[fy0:fy1, fx0:fx1], patch[sub], where=mask[sub][..., None])


@functools.lru_cache(maxsize=8)
def _background(seed: int, scene: int, width: int, height: int) -> np.ndarray:
    """A textured still for one scene: colour regions, rectangles, lines and fine grain, so that
    tokens differ across the image and between scenes."""
    rng = np.random.default_rng([seed, scene, 1])
    low = rng.integers(50, 190, size=(3, 4, 3), dtype=np.uint8)
    img = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    s = min(width, height)
    for _ in range(14):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(s // 20, s // 3)), y0 + int(rng.integers(s // 20, s // 3))
        thickness = -1 if rng.random() < 0.6 else max(1, s // 100)
        cv2.rectangle(img, (x0, y0), (x1, y1), rng.integers(40, 200, 3).tolist(), thickness)
    for _ in range(10):
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(img, p0, p1, rng.integers(40, 200, 3).tolist(), max(1, s // 160))
    grain = rng.normal(0.0, 14.0, size=(height // 4 + 1, width // 4 + 1)).astype(np.float32)
    grain = cv2.resize(grain, (width, height), interpolation=cv2.INTER_LINEAR)
    img = np.clip(img.astype(np.float32) + grain[..., None], 0, 255).astype(np.uint8)
    img.setflags(write=False)
    return img


@functools.lru_cache(maxsize=256)
def _sprite(
    shape: str, colour: tuple[int, int, int], size: tuple[int, int], text: str
) -> tuple[np.ndarray, np.ndarray]:
    """(patch, mask) of a textured shape: diagonal stripes on the colour, or a sign with text."""
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    if shape == "circle":
        cv2.circle(mask, (w // 2, h // 2), min(w, h) // 2, 255, -1)
    elif shape in ("triangle", "diamond"):
        corners = {
            "triangle": [(w // 2, 0), (0, h - 1), (w - 1, h - 1)],
            "diamond": [(w // 2, 0), (w - 1, h // 2), (w // 2, h - 1), (0, h // 2)],
        }[shape]
        cv2.fillPoly(mask, [np.array(corners, np.int32)], 255)
    else:
        mask[:] = 255
    if shape == "sign":
        patch = np.full((h, w, 3), 235, np.uint8)
        cv2.rectangle(patch, (0, 0), (w - 1, h - 1), (40, 40, 40), max(1, h // 12))
        font = cv2.FONT_HERSHEY_SIMPLEX
        thickness = max(1, h // 14)
        (tw, th), _ = cv2.getTextSize(text, font, 1.0, thickness)
        scale = min(0.8 * w / max(tw, 1), 0.6 * h / max(th, 1))
        (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
        cv2.putText(patch, text, ((w - tw) // 2, (h + th) // 2), font, scale, colour, thickness, cv2.LINE_AA)
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        stripes = ((xx + yy) // max(2, h // 6)) % 2
        shade = np.where(stripes[..., None] == 1, 1.0, 0.6)
        patch = (np.array(colour, np.float32) * shade).astype(np.uint8)
    mask = mask > 0
    patch.setflags(write=False)
    mask.setflags(write=False)
    return patch, mask


@functools.lru_cache(maxsize=32)
def _shimmer(seed: int, index: int, k: int, width: int, height: int) -> np.ndarray:
    """Texture k of a shimmering region: blue-green ripples, a different pattern per k."""
    rng = np.random.default_rng([seed, 3, index, k])
    low = rng.normal(0.0, 1.0, size=(max(1, height // 8), max(1, width // 8))).astype(np.float32)
    ripple = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    base = np.array([40, 120, 150], np.float32)
    img = np.clip(base + 45.0 * ripple[..., None] * np.array([0.6, 1.0, 1.0], np.float32), 0, 255).astype(np.uint8)
    img.setflags(write=False)
    return img


@functools.lru_cache(maxsize=16)
def _branch(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(patch, mask) of a branch: a brown stem down the middle with green leaf blobs."""
    patch = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    cx = width // 2
    cv2.line(patch, (cx, 0), (cx, height - 1), (110, 70, 30), max(1, width // 8))
    cv2.line(mask, (cx, 0), (cx, height - 1), 255, max(1, width // 8))
    r = max(2, width // 3)
    for j in range(1, 6):
        centre = (cx + (r // 2 if j % 2 else -r // 2), j * height // 6)
        cv2.circle(patch, centre, r, (40, 140 + 15 * (j % 3), 50), -1)
        cv2.circle(mask, centre, r, 255, -1)
    mask = mask > 0
    patch.setflags(write=False)
    mask.setflags(write=False)
    return patch, mask


@functools.lru_cache(maxsize=4)
def _noise_bank(seed: int, width: int, height: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Banks of Gaussian sensor noise, split into positive and negative uint8 parts for
    saturating cv2.add / cv2.subtract; each frame takes a hashed bank and offset."""
    rng = np.random.default_rng([seed, 2])
    shape = (_NOISE_BANKS, height + _NOISE_PAD, width + _NOISE_PAD, 3)
    noise = np.rint(rng.normal(0.0, sigma, size=shape).astype(np.float32))
    pos = np.clip(noise, 0, 255).astype(np.uint8)
    neg = np.clip(-noise, 0, 255).astype(np.uint8)
    pos.setflags(write=False)
    neg.setflags(write=False)
    return pos, neg
