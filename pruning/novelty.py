"""Memory-aware novelty: a token is news only if neither its predecessor nor a state its position
held before explains it (docs/PRUNERS.md, EchoPrune and MoPrune, streaming).

A departure from both papers, shared by `EchoPrune` and `MoPrune`. The papers judge a token
against the group before it only (EchoPrune Sec. 3.2, Eq. 5-9; MoPrune Sec. 3.4, Eq. 9), so a
blinking light or a swaying branch is new in every group. Measured on planted streams
(tests/planted_streams.py: 48 groups of 8x8 tokens, a blinking region of period 2 and a swaying
one of period 4 on 20% of the positions, four one-off events; seeds 0-2; capacity 3% and 10% of
the dense stream, 2 recent groups), with the papers' novelty: EchoPrune spent 0.96-0.99 of its
long-term store on the distractors and kept a token of 3 (3%) and 11 (10%) of 12 events;
MoPrune 0.93-0.98, 3 and 11 of 12. With the bank below: EchoPrune 0.00, MoPrune 0.05-0.07
from its motion alone and 0.00 with its eviction of explained tokens first (moprune.py,
departure 5), every event kept (tests/test_novelty.py). EchoPrune's offline ablation over the
two or three previous frames (Sec. 4.3, Fig. 9) softmaxes over all their tokens and dilutes the
correspondence; the bank instead keeps one vector per state of a position and counts a match
only at cosine >= `SAME_STATE`.

`StateBank` keeps, for each position of the token grid, up to `states` distinct states: the
running mean (of the last `MEAN_OF` observations at most) of the tokens seen there that matched
each other with cosine >= `SAME_STATE`, and the step each was last seen. A token *returns* when
it matches a state its position has left, one it held earlier but not in the group before. The
pruners score a return as explained by that state: EchoPrune as if the state were the
predecessor (corr = echo = its cosine), MoPrune's motion as the distance to it. A token that
returns to no state keeps the paper's score exactly; so does one whose position cycles through
more than `states` states (the oldest is pushed out before it comes back). A state its position
has returned to `PERIODIC_RETURNS` times is periodic: EchoPrune's eviction ranks the tokens of
its first appearances, new when they came, as a perfect recurrence once that is known; MoPrune's
keeps them, and the tokens that returned, only when it keeps every other token.

Cost per group is bounded and independent of the stream's length: one pass over the group
to sketch it when D > `SKETCH_DIMS` (the signed sum of its 256-wide chunks, one random sign per
chunk, so E<Sx, Sy> = <x, y>; exact below), then N * states * 256 multiply-adds. At Qwen2.5-VL-7B
shapes (16x16 x 3584) `observe` takes about 0.9 ms on one core. A change of grid (or of D) starts
an empty bank; a reconnect keeps it (the same camera most likely shows the same view).
"""
from __future__ import annotations

import torch

from .base import check_params, describe_range
from .host_sync import to_device
from .similarity import EPS

# Cosine at or above which a token is an observation of a banked state. Same cell, consecutive
# groups, in the tiny model's encoding of the recall benchmark's clips: median 0.997, 0.948 at the
# 10th percentile (moving content included).
SAME_STATE = 0.9
MEAN_OF = 8  # a banked state is the running mean of at most this many observations, then an EMA
SKETCH_DIMS = 256
PERIODIC_RETURNS = 2  # returns after which a state counts as periodic (a person coming back once does not)


class StateBank:
    """Per position, the last `states` distinct states seen there (see the module docstring)."""

    def __init__(self, states: int, dims: int = SKETCH_DIMS):
        self.states = int(states)
        self.dims = int(dims)
        self._shape: tuple[int, int] | None = None
        self._next_id: torch.Tensor | None = None  # never reset: a state id names one state of one bank for good

    def _start(self, n: int, d: int, device: torch.device) -> None:
        """An empty bank on the group's device; ids go on from the last bank's (kept there too:
        counting new states reads nothing back to the host)."""
        k = self.states
        self._shape = (n, d)
        self._chunks = -(-d // self.dims) if d > self.dims else 0
        gen = torch.Generator().manual_seed(0)
        signs = torch.randint(0, 2, (1, self._chunks), generator=gen, device="cpu") * 2 - 1
        self._signs = to_device(signs.float(), device)
        self._bank = torch.zeros(n, k, min(d, self.dims), device=device)
        self._norm = torch.ones(n, k, device=device)  # of each banked vector, clamped at EPS
        self._count = torch.zeros(n, k, device=device)  # observations folded in, 0 = empty
        self._stamp = torch.full((n, k), -1, dtype=torch.long, device=device)  # step last seen, -1 = empty
        self._id = torch.full((n, k), -1, dtype=torch.long, device=device)
        self._returns = torch.zeros(n, k, dtype=torch.long, device=device)
        self._slots = torch.arange(k, device=device)
        self._next_id = torch.zeros((), dtype=torch.long, device=device) if self._next_id is None \
            else self._next_id.to(device)
        self._step = 0

    def sketch(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, min(D, dims)]: x itself when D <= dims, else the signed sum of its
        `dims`-wide chunks (zero-padded to a whole chunk), one random sign per chunk: a batched
        vector-matrix product, one pass over the group; E<Sx, Sy> = <x, y>."""
        if not self._chunks:
            return x.float()
        n, d = x.shape
        x = x.float()
        if self._chunks * self.dims != d:
            x = torch.nn.functional.pad(x, (0, self._chunks * self.dims - d))
        return torch.matmul(self._signs, x.view(n, self._chunks, self.dims)).squeeze(1)

    def observe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compare the group `x` [N, D] with the states its positions left, then bank it.

        Returns (cos [N], dist [N], state [N]): the highest cosine to, and the least L2 distance
        from, a state the token returns to, one its position held before but not in the previous
        observed group and that the token matches (cosine >= SAME_STATE); -inf and inf where
        there is none; and the id of the state each token was banked as. Causal: the bank holds
        only earlier groups when they are computed.
        """
        n, d = x.shape
        if self._shape != (n, d):
            self._start(n, d, x.device)
        s = self.sketch(x)
        s_norm = s.norm(dim=1, keepdim=True)
        dots = torch.bmm(self._bank, s.unsqueeze(2)).squeeze(2)  # [N, K]
        cos = torch.where(self._stamp >= 0, dots / (s_norm.clamp_min(EPS) * self._norm), -2.0)
        back = (self._stamp < self._step - 1) & (cos >= SAME_STATE)
        dist = (s_norm.square() + self._norm.square() - 2 * dots).clamp_min(0).sqrt()
        recur_cos = torch.where(back, cos, float("-inf")).amax(dim=1)
        recur_dist = torch.where(back, dist, float("inf")).amin(dim=1)
        return recur_cos, recur_dist, self._bank_group(s, cos, back)

    def _bank_group(self, s: torch.Tensor, cos: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """Fold each token into its state (best cosine >= SAME_STATE; a return if the state was
        left) or make it a new state in place of the least recently seen one (an empty slot
        first). Returns each token's state id."""
        best_cos, best = cos.max(dim=1)
        same = best_cos >= SAME_STATE
        slot = torch.where(same, best, self._stamp.argmin(dim=1))
        hit = slot.unsqueeze(1) == self._slots  # [N, K]: the one slot each token goes to
        same_hit = hit & same.unsqueeze(1)
        fresh = hit & ~same.unsqueeze(1)
        new_ids = self._next_id + torch.cumsum(fresh.flatten(), 0).view_as(fresh) - 1  # raster order
        self._id = torch.where(fresh, new_ids, self._id)
        self._next_id = self._next_id + fresh.sum()
        self._returns = torch.where(same_hit, self._returns + back.long(), torch.where(fresh, 0, self._returns))
        self._count = torch.where(same_hit, self._count + 1, torch.where(fresh, 1.0, self._count))
        rows = torch.arange(s.shape[0])
        old = self._bank[rows, slot]
        new = old + (s - old) / self._count[rows, slot].clamp_max(MEAN_OF).unsqueeze(1)
        self._bank[rows, slot] = new
        self._norm[rows, slot] = new.norm(dim=1).clamp_min(EPS)
        self._stamp.masked_fill_(hit, self._step)
        self._step += 1
        return self._id.gather(1, slot.unsqueeze(1)).squeeze(1)

    def periodic_ids(self) -> torch.Tensor:
        """Ids of the banked states that are periodic (`periodic`), ascending, after -1 for every
        slot that holds none: one entry per slot, so its size is known on the host."""
        if self._shape is None:
            return torch.zeros(0, dtype=torch.long)
        return torch.sort(torch.where(self._returns >= PERIODIC_RETURNS, self._id, -1).flatten()).values

    def periodic(self, position: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """[n] bool: the state `state` [n] of position `position` [n] (row * W + col) is still
        banked and its position has returned to it at least `PERIODIC_RETURNS` times."""
        if self._shape is None:
            return torch.zeros(position.shape, dtype=torch.bool)
        inside = position < self._shape[0]
        pos = position.clamp_max(self._shape[0] - 1)
        match = (self._id[pos] == state.unsqueeze(1)) & (self._returns[pos] >= PERIODIC_RETURNS)
        return match.any(dim=1) & inside


def check_states(cls: type, states: object) -> None:
    """`memory_states` is an int inside `cls.param_ranges` (0: the paper's novelty, no bank)."""
    if isinstance(states, bool) or not isinstance(states, int):
        raise ValueError(f"memory_states must be an int {describe_range(*cls.param_ranges['memory_states'])}, "
                         f"got {states!r}")
    check_params(cls, memory_states=states)
