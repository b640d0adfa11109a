"""The pruner contract (docs/DESIGN.md, "Core types"): what a streaming pruner decides and
what it is shown.

A pruner owns three decisions:
- `score(group)` at ingest, a function of this group and earlier ones only (it may keep state,
  e.g. the previous group). It returns a `GroupScore`: one score per token (higher = keep),
  an optional ingest keep-mask (tokens dropped before they reach the long-term store), and
  per-token metadata the pruner needs later (segment, scene, tree, depth, ...).
- `evict(store, capacity)` when the long-term store is over budget: the rows to keep.
- `rank_for_query(snapshot, query_embeds, budget)`: which snapshot rows the LLM sees.

`rank_for_query` runs on a query thread while ingest keeps calling `score` on another, so it
must only read the snapshot and immutable settings, never the pruner's ingest state.

Every pruner class names the range of each keyword parameter in `param_ranges` (inclusive
bounds, None = unbounded; `POSITIVE` as a lower bound means "> 0") and refuses values outside
it with `check_params`, so a config can be validated by name and range before a pruner is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Mapping

import torch

from .similarity import topk_indices
from .types import FrameTokens

ParamRange = tuple[float | None, float | None]
POSITIVE = math.ulp(0.0)  # the least float above 0: as an inclusive lower bound it reads "> 0"


def describe_range(lo: float | None, hi: float | None) -> str:
    """A range as people read it: "> 0", ">= 0", "in [0.0, 1.0]", "in (0, 1.0]", "any number"."""
    if lo is not None and hi is not None:
        return f"in {'(0' if lo == POSITIVE else f'[{lo}'}, {hi}]"
    if lo is not None:
        return "> 0" if lo == POSITIVE else f">= {lo}"
    return "any number" if hi is None else f"<= {hi}"


def check_params(cls: type["Pruner"], **values: object) -> None:
    """Raise ValueError naming the first value that is not a number inside `cls.param_ranges`.

    None is not checked: a parameter that accepts None (EchoPrune's `radius`) says so itself.
    """
    for name, value in values.items():
        if value is None:
            continue
        lo, hi = cls.param_ranges[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number {describe_range(lo, hi)}, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi) or math.isnan(value):
            raise ValueError(f"{name} must be {describe_range(lo, hi)}, got {value!r}")


@dataclass(frozen=True)
class GroupScore:
    """What a pruner says about one incoming group (all tensors are [N], N = H*W, raster order).

    `keep` False drops a token when its group leaves the dense recent window (e.g. DTD drops
    static tokens). `merge_into[i] = g >= 0` folds token i, at that moment, by running mean into
    its run's head: the newest held token at the same (row, col) from group g on (HieraVid's
    static runs; g's own token, or the one that restarted the run once g's was evicted); with
    none held, token i is kept as a row and starts the run anew. `meta`
    is stored per token and handed to `evict`. `kept`, when the pruner knows it without
    reading the device (a fixed share of the group), is how many tokens `keep` keeps: the
    memory then needs no read-back to move them (docs/DESIGN.md, the memory on the device).
    """

    score: torch.Tensor
    keep: torch.Tensor | None = None
    merge_into: torch.Tensor | None = None
    meta: Mapping[str, torch.Tensor] = field(default_factory=dict)
    kept: int | None = None


class RowView:
    """Rows `idx` of a buffer, then the rows of `tail` (if any), gathered only when indexed.

    The long-term store hands `evict` its tokens (and extras) this way: eviction decides from
    scores and metadata, and copying every held vector for every added group would cost more
    than the pruning itself. A question ranks the whole memory the same way
    (`TokenMemory.frozen`): the store's rows in their slots, the recent window as the tail.
    `view[i]` returns real rows; `materialize()` all of them; `rowwise(fn)` applies a row-wise
    `fn` without gathering.
    """

    def __init__(self, buf: torch.Tensor, idx: torch.Tensor, tail: torch.Tensor | None = None):
        self.buf = buf
        self.idx = idx
        self.tail = tail

    @property
    def shape(self) -> torch.Size:
        extra = 0 if self.tail is None else int(self.tail.shape[0])
        return torch.Size((int(self.idx.numel()) + extra, *self.buf.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.buf.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i) -> torch.Tensor:
        if self.tail is None:
            return _rows(self.buf, self.idx[i])
        j = torch.as_tensor(i, device=self.idx.device).to(torch.long)
        head = int(self.idx.numel())
        if head == 0:
            return self.tail[j]
        return self._split(j, head) if j.device.type == "cpu" else self._where(j, head)

    def _split(self, j: torch.Tensor, head: int) -> torch.Tensor:
        """Each row from its part, where reading the split back costs nothing (the CPU). Rows of
        the store before rows of the tail (a `select` of ascending rows) are copied once."""
        inside = j < head
        c = int(inside.sum())
        if j.ndim == 1 and bool(inside[:c].all()) and self.tail.dtype == self.buf.dtype:
            out = torch.empty(j.shape[0], *self.buf.shape[1:], dtype=self.buf.dtype, device=self.buf.device)
            torch.index_select(self.buf, 0, self.idx[j[:c]], out=out[:c])
            torch.index_select(self.tail, 0, j[c:] - head, out=out[c:])
            return out
        out = torch.empty(*j.shape, *self.buf.shape[1:], dtype=self.buf.dtype, device=self.buf.device)
        out[inside] = self.buf[self.idx[j[inside]]]
        out[~inside] = self.tail[j[~inside] - head].to(self.buf.dtype)
        return out

    def _where(self, j: torch.Tensor, head: int) -> torch.Tensor:
        """Every row gathered from both parts and the right one kept: nothing read back."""
        inner = self.buf[self.idx[j.clamp_max(head - 1)]]
        outer = self.tail[(j - head).clamp(0, int(self.tail.shape[0]) - 1)]
        inside = (j < head).view(*j.shape, *([1] * (inner.ndim - j.ndim)))
        return torch.where(inside, inner, outer.to(inner.dtype))

    def materialize(self) -> torch.Tensor:
        rows = self.buf.index_select(0, self.idx)
        return rows if self.tail is None else torch.cat([rows, self.tail.to(rows.dtype)])

    def rowwise(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`fn(self.materialize())` for an `fn` that treats each row alone, run over the whole
        buffer and the tail instead, so no held vector is copied (free slots cost the buffer's
        spare group). Rounding may differ from one call on the gathered rows where a matrix
        product's kernel depends on the row count."""
        out = fn(self.buf)[self.idx]
        return out if self.tail is None else torch.cat([out, fn(self.tail.to(self.buf.dtype))])


def _rows(x: torch.Tensor | RowView, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of a tensor or a `RowView`; a list of rows by `index_select` (the same copy as
    `x[idx]`, about twice as fast on the CPU for rows of thousands of values)."""
    if isinstance(x, RowView) or idx.ndim != 1 or idx.dtype != torch.long:
        return x[idx]
    return x.index_select(0, idx)


def rowwise(tokens: torch.Tensor | RowView, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn(tokens)` for a row-wise `fn`, on a tensor or a `RowView` alike."""
    return tokens.rowwise(fn) if isinstance(tokens, RowView) else fn(tokens)


@dataclass(frozen=True)
class TokenSet:
    """Tokens with per-token metadata, sorted by (group, row, col).

    Used as the long-term store handed to `evict` and as the whole memory a question ranks
    (`TokenMemory.frozen`), both read-only, where `tokens` and `extras` are `RowView`s (index
    them to read rows, or `rowwise` for a row-wise function of all of them), and as an
    immutable snapshot (plain tensors). `recent` marks tokens of the dense recent window. `run` is how many
    consecutive groups a row stands for: a merged run's length from the row's group on (its
    vector their mean), 1 for every other row; left out, it is all 1.
    """

    tokens: torch.Tensor  # [n, D]
    group: torch.Tensor  # [n] long
    pts: torch.Tensor  # [n] float64, seconds of the group's first frame
    row: torch.Tensor  # [n] long
    col: torch.Tensor  # [n] long
    score: torch.Tensor  # [n] float32, ingest score
    recent: torch.Tensor  # [n] bool
    grid: tuple[int, int]  # (H, W) of the token grid
    meta: Mapping[str, torch.Tensor] = field(default_factory=dict)  # [n] each
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)  # [n, ...] each
    run: torch.Tensor | None = None  # [n] long, groups each row stands for (None: all 1)

    def __post_init__(self) -> None:
        if self.run is None:
            object.__setattr__(self, "run", torch.ones(self.group.shape[0], dtype=torch.long))

    def __len__(self) -> int:
        return int(self.group.shape[0])

    def select(self, idx: torch.Tensor) -> "TokenSet":
        """Rows `idx` (ascending keeps the (group, row, col) order)."""
        idx = idx.to(torch.long)
        return replace(
            self,
            tokens=_rows(self.tokens, idx),
            group=self.group[idx],
            pts=self.pts[idx],
            row=self.row[idx],
            col=self.col[idx],
            score=self.score[idx],
            recent=self.recent[idx],
            meta={k: v[idx] for k, v in self.meta.items()},
            extras={k: _rows(v, idx) for k, v in self.extras.items()},
            run=self.run[idx],
        )

    def columns_on_host(self) -> "TokenSet":
        """The same rows with their small columns on the host, where a prompt's layout reads
        them; the vectors stay on their device."""
        return replace(self, group=self.group.cpu(), pts=self.pts.cpu(), row=self.row.cpu(), col=self.col.cpu(),
                       score=self.score.cpu(), recent=self.recent.cpu(), meta={k: v.cpu() for k, v in self.meta.items()},
                       run=self.run.cpu())

    def groups(self) -> torch.Tensor:
        """Distinct group indices present, ascending."""
        return torch.unique(self.group)


def recent_first(snap: TokenSet, score: torch.Tensor, budget: int) -> torch.Tensor:
    """Top `budget` rows, the dense recent window first (newest group first), then by score.

    Recent frames answer "what is happening now", so a query budget is spent on them before
    the long-term store. Returns ascending row indices.
    """
    budget = max(0, min(int(budget), len(snap)))
    if budget == len(snap):
        return torch.arange(len(snap))
    recent_rows = torch.nonzero(snap.recent).flatten()
    if recent_rows.numel() >= budget:
        newest_first = torch.sort(snap.group[recent_rows], descending=True, stable=True).indices
        return torch.sort(recent_rows[newest_first[:budget]]).values
    rest = torch.nonzero(~snap.recent).flatten()
    picked = rest[topk_indices(score[rest], budget - recent_rows.numel())]
    return torch.sort(torch.cat([recent_rows, picked])).values


class Pruner:
    """Base streaming pruner: subclasses override `score` and `evict`, and `query_score` when
    they rank differently at question time than at ingest."""

    name = "base"
    paper = ""  # where the method comes from, for `streamprune pruners`
    param_ranges: ClassVar[dict[str, ParamRange]] = {}
    # What `rank_for_query` ranks by: None, the question's input embeddings; K, its hidden states
    # at the LLM's decoder layer K (HieraVid's instruction state).
    query_layer: ClassVar[int | None] = None

    def reset(self) -> None:
        """Forget stream state: the next group has no predecessor (start, reconnect)."""

    def score(self, group: FrameTokens) -> GroupScore:
        raise NotImplementedError

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        """Rows of `store` to keep (ascending, at most `capacity`); default: highest score."""
        return topk_indices(store.score, capacity)

    def query_score(self, snap: TokenSet, query_embeds: torch.Tensor | None) -> torch.Tensor:
        """Per-row score used by `rank_for_query`; default: the stored ingest score."""
        return snap.score

    def rank_for_query(
        self, snap: TokenSet, query_embeds: torch.Tensor | None, budget: int
    ) -> torch.Tensor:
        """Rows of `snap` the LLM sees (ascending, at most `budget`), recent window first. A
        question passes the memory in place, its vectors as `RowView`s; a snapshot works alike."""
        return recent_first(snap, self.query_score(snap, query_embeds), budget)
