"""EchoPrune: keep the tokens the previous group cannot echo (docs/PRUNERS.md, "EchoPrune").

Paper: "EchoPrune: Interpreting Redundancy as Temporal Echoes for Efficient VideoLLMs",
Sec. 3 and Alg. 1. Offline, `echoprune_select` implements:
- relevance `r` (Sec. 3.1, Eq. 4): max cosine to the text tokens, 0 without text;
- correspondence `corr` (Sec. 3.2, Eq. 5): cosine to the same position in the previous group;
- `echo` (Sec. 3.2, Eq. 6-9): inner product of a token with its softmax(cos / tau)
  reconstruction from a (2*radius+1)^2 window of the previous group clipped at the borders, or
  the whole group for `radius=None` (holistic matching, Sec. 4.3, App. B.4 Fig. 12; `radius=1`
  is the 3x3 window of Sec. 3.2). The reconstruction is linear and not re-normalised, so
  `echo_i = sum_j p_ij cos(v_i, v_j)`: it is computed from the similarities alone;
- `S = r - corr - echo` (Eq. 10-11), the global Top-K (Eq. 12) after a first-group quota of
  `max(1, budget // T)` picked by `r` (end of Sec. 3.3: "the first frame has no reconstruction
  error"). Defaults: LLaVA-OneVision's tau 0.1 and 3x3 window (Sec. 4.3).

The streaming `EchoPrune` (Qwen defaults, Sec. 4.3 and App. B.3: tau 0.5, whole group) shares
`relevance` and `novelty` with it and departs from it in these places, 1-3 because a live
stream has neither the question nor the clip's end at ingest, 4-5 because it never ends:
1. The ingest score is the novelty `-(corr + echo)` alone, bit-identical to the offline one for
   groups >= 1 where no token returns to a banked state (4); `r` against the question's token
   embeddings is added at query time.
2. The first group of a stream (and after a change of grid) has no predecessor. Offline gives
   it `budget // T` tokens by `r`; streaming knows neither T nor the question, so it gets a fixed
   quota, `first_ratio` of its tokens (at least one if > 0), chosen by intra-group uniqueness
   `1 - cos(v, mean of the group)`. They are scored as the novelty against a virtual
   predecessor made only of the group's mean token, for which corr = echo = cos(v, mean), i.e.
   `-2 cos(v, mean)`, on the same scale as later novelty; the other tokens of the group get that
   minus 5, below any novelty (>= -2), so beyond its quota the group yields to every later token.
3. Offline's global Top-K over the clip becomes eviction of the lowest novelty from a bounded
   store plus a dense recent window spent first at query time (`base.recent_first`), so the
   held set depends on when a question arrives; the first group's quota is not guaranteed but
   competes with later novelty.
4. Memory-aware novelty (`memory_states`, default 4; 0 is the paper): a token that returns to a
   state its position left (`novelty.StateBank`, cosine >= 0.9 to the state) is explained by
   it as by a predecessor that is the state: `-max(corr + echo, 2 cos)`; a state its position
   keeps returning to is periodic, and eviction ranks its held tokens at -2, a perfect
   recurrence. Measured reason (tests/test_novelty.py, planted blinking and swaying regions on
   20% of the grid, 3% and 10% capacity): the paper's novelty spent 0.96-0.99 of the store on
   them and kept 3 and 11 of 12 events; with the bank 0.00 and every event.
5. A reconnect (`reset()`) keeps the predecessor and the bank when the grid is unchanged: the
   camera most likely shows the same view. Without its predecessor the first group back was
   scored as a stream's first: a quarter of it as novelty, the rest below every later token,
   whatever had changed during the outage. A change of grid still starts afresh.
Measured (tests/test_echoprune.py, with `memory_states=0`): the store's tokens beyond the first
group are a subset of the offline pick at the same budget, and the store agrees with it on
>= 0.85 of its tokens.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from .base import POSITIVE, GroupScore, ParamRange, Pruner, TokenSet, check_params, rowwise
from .novelty import StateBank, check_states
from .similarity import EPS, normalize, topk_indices
from .types import FrameTokens

_BELOW_ANY_NOVELTY = 5.0
_PERIODIC = -2.0  # the novelty of an exact recurrence: corr = echo = 1
_ALIGN = 64


def relevance(tokens: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """Eq. 4: `r_i = max_j cos(v_i, t_j)` for tokens [..., D] (or a `RowView` of them) and text
    [L, D]; 0 without text."""
    lead = tokens.shape[:-1]
    if text is None or text.numel() == 0 or lead.numel() == 0:
        return torch.zeros(lead)
    unit_text = normalize(text.reshape(-1, text.shape[-1])).T

    def best(x: torch.Tensor) -> torch.Tensor:  # dot products over the norm: no normalised copy of x
        flat = x.reshape(-1, x.shape[-1]).float()
        return (flat @ unit_text).amax(dim=1) / flat.norm(dim=-1).clamp_min(EPS)

    return rowwise(tokens, best).reshape(lead)


class Prepared(NamedTuple):
    """A group in float32 [H, W, D] with its L2 norms [H, W] clamped at eps, as in `normalize`.

    Cosines are taken as dot products divided by both norms rather than on a normalised copy:
    same quantity, one pass less over the group, which is most of the ingest cost at real sizes.
    """

    tokens: torch.Tensor
    norm: torch.Tensor


def prepare(tokens: torch.Tensor) -> Prepared:
    """Float32, contiguous and 64-byte aligned (copied only when it is not): the CPU kernels
    round differently on misaligned memory, and alignment keeps a group's streaming scores
    bit-identical to the offline ones whatever tensor it arrives in."""
    x = tokens.float()
    if x.data_ptr() % _ALIGN or not x.is_contiguous():
        x = x.clone(memory_format=torch.contiguous_format)
    return Prepared(x, x.norm(dim=-1).clamp_min(EPS))


def window_cos(cur: Prepared, prev: Prepared, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cos(cur_i, prev_j)` for j in the clipped (2r+1)^2 window around i: ([N, K], valid [N, K]).

    Column k is the offset (dy, dx) in raster order over [-r, r]^2; an offset that leaves the
    grid is invalid (no padding, no duplicates) and its similarity is 0. Per row offset dy, one
    batched matmul of each row against row y+dy of prev; the column offsets are its diagonals.
    This is (2r+1) H W^2 D work, about twice as fast here as one dot product per offset.
    """
    h, w, _ = cur.tokens.shape
    side = 2 * radius + 1
    sims = torch.zeros(side, side, h, w)
    valid = torch.zeros(side, side, h, w, dtype=torch.bool)
    for a, dy in enumerate(range(-radius, radius + 1)):
        if abs(dy) >= h:
            continue
        ys, yp = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
        dots = torch.bmm(cur.tokens[ys], prev.tokens[yp].transpose(1, 2))
        rows = dots / (cur.norm[ys].unsqueeze(2) * prev.norm[yp].unsqueeze(1))
        for b, dx in enumerate(range(-radius, radius + 1)):
            if abs(dx) >= w:
                continue
            xs = slice(max(0, -dx), w - max(0, dx))
            sims[a, b, ys, xs] = torch.diagonal(rows, offset=dx, dim1=1, dim2=2)
            valid[a, b, ys, xs] = True
    return sims.reshape(side * side, h * w).T, valid.reshape(side * side, h * w).T


def corr_echo(cur: Prepared, prev: Prepared, tau: float, radius: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 and Eq. 6-9 of group cur against its predecessor prev: (corr [N], echo [N])."""
    h, w, d = cur.tokens.shape
    if radius is None:
        dots = cur.tokens.reshape(h * w, d) @ prev.tokens.reshape(h * w, d).T
        sims = dots / (cur.norm.reshape(h * w, 1) * prev.norm.reshape(1, h * w))
        weights = torch.softmax(sims / tau, dim=1)
        return sims.diagonal().clone(), (weights * sims).sum(dim=1)
    sims, valid = window_cos(cur, prev, radius)
    weights = torch.softmax((sims / tau).masked_fill(~valid, float("-inf")), dim=1)
    center = (2 * radius + 1) ** 2 // 2
    return sims[:, center].clone(), (weights * sims).sum(dim=1)


def novelty(cur: Prepared, prev: Prepared, tau: float, radius: int | None,
            recur: torch.Tensor | None = None) -> torch.Tensor:
    """`-(corr + echo)` [N] of group cur against its predecessor prev (Eq. 10); with `recur`
    [N], the cosine to a state the position left (`novelty.StateBank`, -inf if none), that state
    explains a token as a predecessor would if it were the state (corr = echo = recur):
    `-max(corr + echo, 2 recur)`."""
    corr, echo = corr_echo(cur, prev, tau, radius)
    explained = corr + echo
    if recur is not None:
        explained = torch.maximum(explained, 2 * recur)
    return -explained


def echoprune_scores(
    video: torch.Tensor, text: torch.Tensor | None = None, tau: float = 0.1, radius: int | None = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, novelty), each [T, N]; novelty of group 0 is 0 (corr = echo = 0). `S = r + novelty`."""
    _check(video, tau, radius)
    t, h, w, d = video.shape
    groups = [prepare(video[k]) for k in range(t)]
    nov = torch.zeros(t, h * w)
    for k in range(1, t):
        nov[k] = novelty(groups[k], groups[k - 1], tau, radius)
    return relevance(video.reshape(t, h * w, d), text), nov


def echoprune_select(
    video: torch.Tensor, text: torch.Tensor | None, budget: int, tau: float = 0.1, radius: int | None = 1
) -> torch.Tensor:
    """Alg. 1: ascending flat indices into T*H*W of the `budget` tokens EchoPrune keeps."""
    _check(video, tau, radius)
    t, h, w, _ = video.shape
    n = h * w
    budget = int(budget)
    if budget >= t * n:
        return torch.arange(t * n)
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long)
    r, nov = echoprune_scores(video, text, tau, radius)
    if t == 1:
        return topk_indices(r[0], budget)
    quota = min(n, budget, max(1, budget // t))
    first = topk_indices(r[0], quota)
    rest = topk_indices((r[1:] + nov[1:]).flatten(), budget - quota) + n
    return torch.cat([first, rest])


def first_group_score(tokens: torch.Tensor, quota: int) -> torch.Tensor:
    """Ingest score [N] of a group [H, W, D] with no predecessor (module docstring, point 2)."""
    h, w, d = tokens.shape
    flat = tokens.reshape(h * w, d).float()
    score = -2.0 * (normalize(flat) @ normalize(flat.mean(dim=0)))
    quota_rows = topk_indices(score, quota)
    below = score - _BELOW_ANY_NOVELTY
    below[quota_rows] = score[quota_rows]
    return below


class EchoPrune(Pruner):
    """Streaming EchoPrune: novelty at ingest, `r + novelty` at query time (Qwen defaults)."""

    name = "echoprune"
    paper = "EchoPrune: Interpreting Redundancy as Temporal Echoes for Efficient VideoLLMs (2026)"
    param_ranges: ClassVar[dict[str, ParamRange]] = {
        "tau": (POSITIVE, None), "radius": (0, None), "first_ratio": (0.0, 1.0), "memory_states": (0, 64)}

    def __init__(self, *, tau: float = 0.5, radius: int | None = None, first_ratio: float = 0.25,
                 memory_states: int = 4):
        _check_params(tau, radius)
        check_params(EchoPrune, first_ratio=first_ratio)
        check_states(EchoPrune, memory_states)
        self.tau = float(tau)
        self.radius = radius
        self.first_ratio = float(first_ratio)
        self.memory_states = memory_states
        self._bank = StateBank(memory_states) if memory_states else None
        self._prev: Prepared | None = None

    def reset(self) -> None:
        """A reconnect keeps the predecessor and the bank: the next group is compared with them
        if its grid is the same (the camera most likely shows the same view), else it is a
        first group (`score` checks the grid)."""

    def score(self, group: FrameTokens) -> GroupScore:
        cur = prepare(group.tokens)
        h, w = group.grid
        recur, meta = None, {}
        if self._bank is not None:
            recur, _, meta["state"] = self._bank.observe(cur.tokens.reshape(h * w, -1))
        if self._prev is None or self._prev.tokens.shape != cur.tokens.shape:
            quota = min(h * w, max(1, int(self.first_ratio * h * w))) if self.first_ratio > 0 else 0
            score = first_group_score(group.tokens, quota)
        else:
            score = novelty(cur, self._prev, self.tau, self.radius, recur)
        self._prev = cur
        return GroupScore(score=score, meta=meta)

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        """The highest novelty; a token whose state has since proved periodic ranks as a perfect
        recurrence (-2): it was new when first seen, but its position keeps returning to it."""
        score = store.score
        if self._bank is not None and "state" in store.meta:
            periodic = self._bank.periodic(store.row * store.grid[1] + store.col, store.meta["state"])
            score = torch.where(periodic, score.clamp_max(_PERIODIC), score)
        return topk_indices(score, capacity)

    def query_score(self, snap: TokenSet, query_embeds: torch.Tensor | None) -> torch.Tensor:
        """`S = r - corr - echo`: relevance to the question tokens plus the stored novelty."""
        if query_embeds is None or len(snap) == 0:
            return snap.score
        return relevance(snap.tokens, query_embeds) + snap.score


def _check_params(tau: float, radius: int | None) -> None:
    """`tau` and `radius` as EchoPrune.param_ranges says; `radius` is None or an int."""
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, int)):
        raise ValueError(f"radius must be None or an int >= 0, got {radius!r}")
    check_params(EchoPrune, tau=tau, radius=radius)


def _check(video: torch.Tensor, tau: float, radius: int | None) -> None:
    if video.ndim != 4:
        raise ValueError(f"video must be [T, H, W, D], got {tuple(video.shape)}")
    _check_params(tau, radius)
