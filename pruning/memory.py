"""TokenMemory: a dense recent window plus a long-term store bounded by the pruner's eviction.

The last `recent_groups` groups are held whole (recent frames answer "what is happening now").
When a group leaves that window its surviving tokens move to the long-term store, whose rows
live in buffers preallocated for `capacity` plus one group, so storage never grows with the
stream; when the store is over `capacity` the pruner picks the rows to keep. Rows stay sorted
by (group, row, col) because groups arrive in order and eviction keeps ascending rows, so the
cost per added group is bounded by `capacity`, independent of stream length.

Eviction runs in steps: once the store is over `capacity` the pruner brings it down to
`capacity - evict_slack`, so the next few groups only append. A reader that keeps something
derived from the prompt order (the LLM's prompt cache: a change at row r invalidates every row
after r) then sees early rows change once every few groups instead of every group; the bound
`capacity` itself stays exact.

`add` (ingest thread) and `snapshot`/`layout`/`gather` (query and display threads) take one
lock; all return copies. A question that ranks the whole memory holds the lock instead
(`frozen`) and copies only the rows it keeps. `version` changes with every change to what is
held, so a reader that keeps something derived from the memory can tell whether it is stale
without copying the tokens, and every held row carries a `stamp` that changes whenever its
vector does (it is written or merged into), so such a reader can find the first row that
changed.

The memory lives on one device, the model's (`device`): the store, the recent window and the
pruner's own state are there, and a group's add reads nothing back to the host when its pruner
keeps every token at ingest and evicts to a fixed count (EchoPrune, MoPrune: counted by
`host_sync.HostSyncs` in tests/test_memory_device.py). What a group leaves in the store when its
pruner drops or merges tokens at ingest is a count only the device knows; it is queued for the
host (`HostCopy`) at the end of the add before the one it leaves the recent window in, and read
when it does (the runs a merging group folds into are the store's then, as only a graduation
changes the store). `layout` brings only the small
columns to the host; `gather` and `snapshot` hand out vectors on the device.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Iterator, Mapping

import torch

from .base import GroupScore, Pruner, RowView, TokenSet
from .host_sync import HostCopy, to_device
from .similarity import rows_of
from .types import FrameTokens


@dataclass(frozen=True)
class AddResult:
    """What one `add` did: tokens now held and the pruner's time (score + evict) in ms."""

    held: int
    prune_ms: float
    evicted: int


@dataclass(frozen=True)
class MemoryLayout:
    """Where the held tokens come from, without their vectors: one entry per held token in
    snapshot order (group, row, col); cheap enough to take for every picture or status tick."""

    group: torch.Tensor  # int64 [n]
    pts: torch.Tensor  # float64 [n]
    row: torch.Tensor  # int64 [n]
    col: torch.Tensor  # int64 [n]
    grid: tuple[int, int]
    tokens_seen: int
    groups_seen: int
    version: int
    stamp: torch.Tensor  # int64 [n]: changes whenever the row's vector does
    run: torch.Tensor  # int64 [n]: groups the row stands for (a merged run's length, else 1)


def per_token_extras(extras: Mapping[str, torch.Tensor], h: int, w: int) -> dict[str, torch.Tensor]:
    """[..., H, W, D] side features -> [H*W, ..., D], one row per token in raster order."""
    out = {}
    for name, x in extras.items():
        if x.ndim < 3 or tuple(x.shape[-3:-1]) != (h, w):
            raise ValueError(f"extras[{name!r}] has shape {tuple(x.shape)}; expected [..., {h}, {w}, D]")
        lead = x.ndim - 3
        perm = [lead, lead + 1, *range(lead), x.ndim - 1]
        x = x.permute(*perm)
        out[name] = x.reshape(h * w, *x.shape[2:])
    return out


class _Store:
    """The long-term store. Small per-row columns (group, pts, row, col, score, weight, stamp,
    meta, slot) are kept compact and sorted; the big vectors (tokens, extras) live in preallocated
    slots that never move: eviction compacts the small columns and frees slots, so its cost
    does not include copying every held vector."""

    def __init__(self, size: int, d: int, dtype: torch.dtype, device: torch.device):
        self.size = size
        self.n = 0
        self.device = device
        self.tokens = torch.zeros(size, d, dtype=dtype, device=device)
        self.extras: dict[str, torch.Tensor] = {}
        self.free = torch.arange(size, device=device)
        self.slot = torch.zeros(size, dtype=torch.long, device=device)
        self.group = torch.zeros(size, dtype=torch.long, device=device)
        self.pts = torch.zeros(size, dtype=torch.float64, device=device)
        self.row = torch.zeros(size, dtype=torch.long, device=device)
        self.col = torch.zeros(size, dtype=torch.long, device=device)
        self.score = torch.zeros(size, dtype=torch.float32, device=device)
        self.weight = torch.zeros(size, dtype=torch.float32, device=device)
        self.stamp = torch.zeros(size, dtype=torch.long, device=device)
        self.meta: dict[str, torch.Tensor] = {}

    def row_columns(self) -> list[torch.Tensor]:
        """The per-row columns a reallocation carries over, slots and meta aside."""
        return [self.group, self.pts, self.row, self.col, self.score, self.weight, self.stamp]

    def small_columns(self) -> list[torch.Tensor]:
        return [self.slot, *self.row_columns(), *self.meta.values()]

    def ensure_meta(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in self.meta:
            self.meta[name] = torch.zeros(self.size, *like.shape[1:], dtype=like.dtype, device=self.device)
        return self.meta[name]

    def ensure_extra(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in self.extras:
            self.extras[name] = torch.zeros(self.size, *like.shape[1:], dtype=self.tokens.dtype, device=self.device)
        return self.extras[name]

    def take_slots(self, k: int) -> torch.Tensor:
        slots, self.free = self.free[:k], self.free[k:]
        return slots

    def view(self, grid: tuple[int, int]) -> TokenSet:
        n = self.n
        slots = self.slot[:n]
        return TokenSet(
            tokens=RowView(self.tokens, slots), group=self.group[:n], pts=self.pts[:n],
            row=self.row[:n], col=self.col[:n], score=self.score[:n],
            recent=torch.zeros(n, dtype=torch.bool, device=self.device), grid=grid,
            meta={k: v[:n] for k, v in self.meta.items()},
            extras={k: RowView(v, slots) for k, v in self.extras.items()}, run=self.run(),
        )

    def positions(self) -> tuple[HostCopy, HostCopy]:
        """Host copies, queued, of the group, row, col, stamp and run columns of the live rows
        (stacked) and of their pts."""
        n = self.n
        return (HostCopy(torch.stack([self.group[:n], self.row[:n], self.col[:n], self.stamp[:n], self.run()])),
                HostCopy(self.pts[:n]))

    def run(self) -> torch.Tensor:
        """Groups each live row stands for: the tokens folded into it, itself included."""
        return self.weight[: self.n].long()

    def copy(self, grid: tuple[int, int]) -> TokenSet:
        """The store's rows as plain tensors (a snapshot part)."""
        n = self.n
        slots = self.slot[:n]
        return TokenSet(
            tokens=self.tokens.index_select(0, slots), group=self.group[:n].clone(),
            pts=self.pts[:n].clone(), row=self.row[:n].clone(), col=self.col[:n].clone(),
            score=self.score[:n].clone(), recent=torch.zeros(n, dtype=torch.bool, device=self.device), grid=grid,
            meta={k: v[:n].clone() for k, v in self.meta.items()},
            extras={k: v.index_select(0, slots) for k, v in self.extras.items()}, run=self.run(),
        )

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep rows `keep` (ascending, distinct) and free the others' slots, without reading
        anything back from the device: how many rows go is known from `keep`'s length."""
        k = int(keep.numel())
        mask = torch.ones(self.n, dtype=torch.bool, device=self.device)
        mask[keep] = False
        gone = rows_of(mask, self.n - k)
        self.free = torch.cat([self.free, self.slot[: self.n][gone]])
        for col in self.small_columns():
            col[:k] = col.index_select(0, keep)
        self.n = k


class TokenMemory:
    """Bounded visual-token memory: `len(mem) <= capacity + recent_groups * H * W` always."""

    def __init__(self, capacity: int, pruner: Pruner, recent_groups: int = 4, evict_slack: int = 0,
                 device: str | torch.device = "cpu"):
        """`device`: where the held vectors live and the pruner runs (the model's device, so
        nothing is copied between host and device per group or per question)."""
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if recent_groups < 0:
            raise ValueError(f"recent_groups must be >= 0, got {recent_groups}")
        if not 0 <= evict_slack <= capacity:
            raise ValueError(f"evict_slack must be in [0, capacity={capacity}], got {evict_slack}")
        self.capacity = int(capacity)
        self.pruner = pruner
        self.recent_groups = int(recent_groups)
        self.evict_slack = int(evict_slack)
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._recent: deque[tuple[FrameTokens, GroupScore, dict[str, torch.Tensor], int]] = deque()
        self._stamps = 0  # the last stamp handed out
        self._next: _Graduation | None = None  # the next graduating group's rows, their count read late
        self._epoch = 0  # changes whenever the store's rows do (a graduation, a reallocation)
        self._store: _Store | None = None
        self._grid: tuple[int, int] | None = None
        self._version = 0
        self.groups_seen = 0
        self.tokens_seen = 0
        self.tokens_evicted = 0

    def __len__(self) -> int:
        with self._lock:
            return self._len()

    def _len(self) -> int:
        stored = self._store.n if self._store is not None else 0
        return stored + sum(g.tokens.shape[0] * g.tokens.shape[1] for g, _, _, _ in self._recent)

    @property
    def version(self) -> int:
        """Changes on every append, eviction, merge into a held token and stream reset; never
        on a snapshot or a layout."""
        return self._version

    def reset_stream(self) -> None:
        """The stream restarted (reconnect): the pruner's next group has no predecessor."""
        with self._lock:
            self.pruner.reset()
            self._version += 1

    def add(self, group: FrameTokens) -> AddResult:
        """Score a new group causally, slide the recent window, evict down to capacity."""
        if group.tokens.ndim != 3:
            raise ValueError(f"FrameTokens.tokens must be [H, W, D], got {tuple(group.tokens.shape)}")
        h, w = group.grid
        group = self._on_device(group)
        extras = per_token_extras(group.extras, h, w)
        with self._lock, self.placed():
            t0 = time.perf_counter()
            scored = self.pruner.score(group)
            if scored.score.shape != (h * w,):
                raise RuntimeError(f"{self.pruner.name}.score returned {tuple(scored.score.shape)}, expected ({h * w},)")
            self._grid = (h, w)
            self._recent.append((group, scored, extras, self._new_stamp()))
            self._version += 1  # covers the merges and evictions below: readers wait for the lock
            self.groups_seen += 1
            self.tokens_seen += h * w
            evicted = 0
            while len(self._recent) > self.recent_groups:
                evicted += self._graduate(*self._recent.popleft())
            self._plan_next_graduation()
            self.tokens_evicted += evicted
            return AddResult(self._len(), (time.perf_counter() - t0) * 1e3, evicted)

    def _on_device(self, group: FrameTokens) -> FrameTokens:
        if group.tokens.device == self.device and all(v.device == self.device for v in group.extras.values()):
            return group
        return FrameTokens(group.index, group.pts, group.tokens.to(self.device, non_blocking=True),
                           {k: v.to(self.device, non_blocking=True) for k, v in group.extras.items()})

    def placed(self) -> contextlib.AbstractContextManager:
        """Where the pruner's own tensors are made: where the memory lives (no context on the
        CPU, the default, where the context's per-call cost would be pure overhead). A question
        ranks the memory inside it (`frozen`)."""
        return contextlib.nullcontext() if self.device.type == "cpu" else self.device

    def _new_stamp(self) -> int:
        self._stamps += 1
        return self._stamps

    def _graduate(self, group: FrameTokens, scored: GroupScore, extras: dict[str, torch.Tensor], stamp: int) -> int:
        """Move a group's surviving tokens from the recent window into the store (their vectors
        unchanged, so their stamp too); evict in a step down to `capacity - evict_slack`."""
        h, w = group.grid
        n_tok = h * w
        tokens = group.tokens.reshape(n_tok, -1)
        st = self._alloc(n_tok, tokens)
        if scored.keep is None and scored.merge_into is None:  # every token: nothing to read back
            rows = torch.arange(n_tok, device=self.device)
        else:
            rows = self._select(st, scored, tokens, extras, w, stamp)
        k = int(rows.numel())
        dropped = n_tok - k
        if st.n + k > st.size:
            raise RuntimeError("store overflow: eviction did not bring the store to capacity")
        sl = slice(st.n, st.n + k)
        slots = st.take_slots(k)
        st.slot[sl] = slots
        kept = tokens if k == n_tok else tokens.index_select(0, rows)  # one copy into the slots, not two
        st.tokens.index_copy_(0, slots, kept.to(st.tokens.dtype))
        st.group[sl] = group.index
        st.pts[sl] = group.pts
        st.row[sl] = rows // w
        st.col[sl] = rows % w
        st.score[sl] = scored.score[rows].float()
        st.weight[sl] = 1.0
        st.stamp[sl] = stamp
        for name, v in scored.meta.items():
            st.ensure_meta(name, v)[sl] = v[rows]
        for name, v in extras.items():  # one copy into the slots when every token stays
            st.ensure_extra(name, v).index_copy_(0, slots, (v if k == n_tok else v.index_select(0, rows)).to(
                st.tokens.dtype))
        st.n += k
        self._epoch += 1
        if st.n <= self.capacity:
            return dropped
        before = st.n
        target = self.capacity - self.evict_slack
        keep_rows = self.pruner.evict(st.view(self._grid), target).to(torch.long)
        if keep_rows.numel() > target:
            raise RuntimeError(f"{self.pruner.name}.evict must return at most {target} rows, got {keep_rows.numel()}")
        if keep_rows.numel() > 1:  # checked where the rows are: no wait for the device
            torch._assert_async((keep_rows[1:] > keep_rows[:-1]).all(),
                                f"{self.pruner.name}.evict must return ascending distinct rows")
        st.keep_rows(keep_rows)
        return dropped + before - st.n

    def _alloc(self, n_tok: int, tokens: torch.Tensor) -> _Store:
        """The store, reallocated (live rows carried over) if a group no longer fits."""
        st = self._store
        if st is not None and st.size >= self.capacity + n_tok and st.tokens.shape[1] == tokens.shape[1]:
            return st
        self._epoch += 1
        new = _Store(self.capacity + n_tok, tokens.shape[1], tokens.dtype, self.device)
        if st is not None and st.n and st.tokens.shape[1] == tokens.shape[1]:
            n = st.n
            old = st.copy(self._grid)
            slots = new.take_slots(n)
            new.slot[:n] = slots
            new.tokens[slots] = old.tokens
            for col_new, col_old in zip(new.row_columns(), st.row_columns()):
                col_new[:n] = col_old[:n]
            for name, v in st.meta.items():
                new.ensure_meta(name, v)[:n] = v[:n]
            for name, v in old.extras.items():
                new.ensure_extra(name, v)[slots] = v
            new.n = n
        self._store = new
        return new

    def _select(self, st: _Store, scored: GroupScore, tokens: torch.Tensor, extras: dict[str, torch.Tensor],
                w: int, stamp: int) -> torch.Tensor:
        """The rows of a group that become store rows, after folding its merging tokens into
        their runs. Unless its pruner says how many it keeps, how many there are is known only on
        the device: they were found, and their count queued for the host, at the end of the add
        before this one (`_plan_next_graduation`), and are read now, a group later; without a
        recent window, or at the first graduation of merges, they are found and read back now."""
        if scored.merge_into is None and scored.kept is not None:
            torch._assert_async(scored.keep.sum() == scored.kept,
                                f"{self.pruner.name}.score: keep does not keep `kept` tokens")
            return rows_of(scored.keep, scored.kept)
        fold_stamp = self._new_stamp() if scored.merge_into is not None else None
        plan, self._next = self._next, None
        if plan is not None and plan.stamp == stamp and plan.epoch in (None, self._epoch):
            kept, *merged = plan.counts.tolist()  # queued an add ago
        else:
            plan = _plan_graduation(st, scored, tokens.shape[0], w, stamp, self._epoch)
            kept, *merged = plan.counts.get().tolist()
        if merged and merged[0]:
            src = rows_of(plan.heads >= 0, merged[0])
            _fold(st, src, plan.heads[src], tokens, extras, fold_stamp)
        return rows_of(plan.keep, kept)

    def _plan_next_graduation(self) -> None:
        """If the group the next add graduates drops or merges tokens, find the rows it leaves
        now and queue their count for the host: read a group later, it has long arrived on a
        GPU. Only a graduation changes the store, so the runs a group folds into now are the
        ones its graduation finds (checked by `_epoch`)."""
        self._next = None
        if self.recent_groups == 0 or len(self._recent) != self.recent_groups:
            return
        group, scored, _, stamp = self._recent[0]
        if scored.merge_into is None and (scored.keep is None or scored.kept is not None):
            return  # nothing to count: it keeps every token, or says how many
        if scored.merge_into is not None and self._store is None:
            return  # the store it folds into does not exist yet
        h, w = group.grid
        self._next = _plan_graduation(self._store, scored, h * w, w, stamp, self._epoch)

    def layout(self) -> MemoryLayout:
        """The snapshot's group, pts, row and col columns (copies) and the counters, taken
        together under the lock; no token vectors are copied. The store's columns are copied to
        the host in the device's queue under the lock and waited for after it, so ingest never
        waits for the device's other work behind a layout."""
        with self._lock:
            store = self._store.positions() if self._store is not None and self._store.n else None
            recent = [(g.grid, g.index, g.pts, stamp) for g, _, _, stamp in self._recent]
            counters = (self._grid or (0, 0), self.tokens_seen, self.groups_seen, self._version)
        parts = []
        if store is not None:
            (group, row, col, stamp, run), pts = store[0].get(), store[1].get()
            parts.append([group, pts, row, col, stamp, run])
        for (h, w), index, pts, stamp in recent:
            idx = torch.arange(h * w)
            parts.append([torch.full((h * w,), index, dtype=torch.long), torch.full((h * w,), pts, dtype=torch.float64),
                          idx // w, idx % w, torch.full((h * w,), stamp, dtype=torch.long), torch.ones(h * w, dtype=torch.long)])
        if parts:
            group, pts, row, col, stamps, run = (torch.cat(c) for c in zip(*parts))
        else:
            z = torch.zeros(0, dtype=torch.long)
            group, pts, row, col, stamps, run = (z, torch.zeros(0, dtype=torch.float64), z.clone(), z.clone(),
                                                 z.clone(), z.clone())
        return MemoryLayout(group, pts, row, col, *counters, stamps, run)

    def gather(self, rows: torch.Tensor, version: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The vectors (tokens, extras) of snapshot rows `rows` (ascending), or None when the
        memory is no longer at `version` (the rows may mean something else by now). Copies only
        those rows, so a reader holding the rest (a prompt cache) does not copy the memory."""
        with self._lock:
            if version != self._version:
                return None
            st = self._store
            stored = st.n if st is not None else 0
            rows = rows.to(torch.long).cpu()
            cut = int(torch.searchsorted(rows, torch.tensor(stored)))
            toks: list[torch.Tensor] = []
            extras: list[dict[str, torch.Tensor]] = []
            if cut:
                slots = st.slot[to_device(rows[:cut], self.device)]
                toks.append(st.tokens.index_select(0, slots))
                extras.append({k: v.index_select(0, slots) for k, v in st.extras.items()})
            start = stored
            for g, _, ex, _ in self._recent:
                n = g.tokens.shape[0] * g.tokens.shape[1]
                lo, hi = (int(torch.searchsorted(rows, torch.tensor(x))) for x in (start, start + n))
                if hi > lo:
                    local = to_device(rows[lo:hi] - start, self.device)
                    toks.append(g.tokens.reshape(n, -1).index_select(0, local))
                    extras.append({k: v.index_select(0, local) for k, v in ex.items()})
                start += n
            if not toks:
                return torch.zeros(0, self._width(), device=self.device), {}
            dtype = toks[-1].dtype
            keys = set.intersection(*(set(e) for e in extras))
            return (torch.cat([t.to(dtype) for t in toks]),
                    {k: torch.cat([e[k].to(dtype) for e in extras]) for k in sorted(keys)})

    def _width(self) -> int:
        if self._store is not None:
            return int(self._store.tokens.shape[1])
        return int(self._recent[-1][0].tokens.shape[-1]) if self._recent else 0

    def snapshot(self) -> TokenSet:
        """An immutable copy of everything held, sorted by (group, row, col), on the memory's
        device (the query ranks there; `TokenSet.columns_on_host` before laying out a prompt)."""
        with self._lock, self.placed():
            parts: list[TokenSet] = []
            if self._store is not None and self._store.n:
                parts.append(self._store.copy(self._grid))
            for g, scored, extras, _ in self._recent:
                parts.append(self._group_set(g, scored, extras))
            if not parts:
                return _empty_set(self._grid or (0, 0))
            return _concat(parts)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[TokenSet]:
        """Everything held, in snapshot order, as a view for a question to rank without copying
        the memory: the store's vectors stay in their slots (`RowView`), only the recent
        window's are joined into one tail. Ingest waits for the lock until the block ends, so
        the view is valid inside it only; `select` the rows to keep."""
        with self._lock, self.placed():
            yield self._view()

    def _view(self) -> TokenSet:
        recent = [self._group_set(g, scored, extras) for g, scored, extras, _ in self._recent]
        st = self._store
        if st is None or st.n == 0:
            return _concat(recent) if recent else _empty_set(self._grid or (0, 0))
        head = st.view(self._grid)
        if not recent:
            return head
        tail = _concat(recent)
        keys = sorted(set(head.extras) & set(tail.extras))
        return replace(_concat_columns([head, tail]), tokens=RowView(st.tokens, head.tokens.idx, tail.tokens),
                       extras={k: RowView(st.extras[k], head.extras[k].idx, tail.extras[k]) for k in keys})

    @staticmethod
    def _group_set(g: FrameTokens, scored: GroupScore, extras: dict[str, torch.Tensor]) -> TokenSet:
        h, w = g.grid
        n = h * w
        idx = torch.arange(n)
        return TokenSet(
            tokens=g.tokens.reshape(n, -1), group=torch.full((n,), g.index, dtype=torch.long),
            pts=torch.full((n,), g.pts, dtype=torch.float64), row=idx // w, col=idx % w,
            score=scored.score.float(), recent=torch.ones(n, dtype=torch.bool), grid=(h, w),
            meta=dict(scored.meta), extras=extras,
        )


@dataclass(frozen=True)
class _Graduation:
    """What a group leaves in the store: the tokens that stay as rows, for a group that merges the
    store row each token folds into (-1: none), and the counts (kept, and merged when it merges),
    queued for the host. `epoch`: the store's, for a group that merges into it (None: one that
    only drops does not read the store)."""

    stamp: int
    epoch: int | None
    keep: torch.Tensor
    heads: torch.Tensor | None
    counts: HostCopy


def _plan_graduation(st: _Store | None, scored: GroupScore, n: int, w: int, stamp: int, epoch: int) -> _Graduation:
    """The rows a group of `n` tokens leaves: its keep-mask less the tokens that fold into a run
    of `st` as it is at `epoch`; nothing is read back."""
    if scored.merge_into is None:
        return _Graduation(stamp, None, scored.keep, None, HostCopy(scored.keep.sum().view(1)))
    keep = torch.ones(n, dtype=torch.bool) if scored.keep is None else scored.keep.clone()
    heads = _run_heads(st, scored.merge_into, keep, w)
    keep &= heads < 0
    return _Graduation(stamp, epoch, keep, heads, HostCopy(torch.stack([keep.sum(), (heads >= 0).sum()])))


def _run_heads(st: _Store, merge_into: torch.Tensor, keep: torch.Tensor, w: int) -> torch.Tensor:
    """[N]: the store row each merging token folds into, -1 for none. A run's head is the newest
    held row at the token's position from group `merge_into` on: the row the run started at or,
    once that was evicted, the token that started it again; a token with no such row starts the
    run anew. Scans the whole store rather than from the run's first group, whose row would
    have to be read back."""
    n_pos = merge_into.numel()
    newest = torch.full((n_pos,), -1, dtype=torch.long, device=merge_into.device)
    if st.n == 0:
        return newest
    since = torch.where(keep & (merge_into >= 0), merge_into, 1 << 62)
    pos = st.row[: st.n] * w + st.col[: st.n]
    at = pos.clamp_max(n_pos - 1)
    inside = (pos < n_pos) & (st.group[: st.n] >= since[at])
    rows = torch.arange(st.n, device=newest.device)
    return newest.scatter_reduce_(0, at, torch.where(inside, rows, -1), "amax")


def _fold(st: _Store, src: torch.Tensor, heads: torch.Tensor, tokens: torch.Tensor,
          extras: dict[str, torch.Tensor], stamp: int) -> None:
    """Fold tokens `src` into store rows `heads` by running mean; the heads get `stamp`."""
    slots = st.slot[heads]
    wt = st.weight[heads]
    for buf, new in [(st.tokens, tokens), *((st.extras[k], v) for k, v in extras.items() if k in st.extras)]:
        wv = wt.view(-1, *([1] * (buf.ndim - 1)))
        mean = buf.index_select(0, slots).float().mul_(wv).add_(new.index_select(0, src).float()).div_(wv + 1)
        buf.index_copy_(0, slots, mean.to(buf.dtype))
    st.weight[heads] += 1
    st.stamp[heads] = stamp


def _concat(parts: list[TokenSet]) -> TokenSet:
    extra_keys = set.intersection(*(set(p.extras.keys()) for p in parts))
    dtype = parts[-1].tokens.dtype
    return replace(_concat_columns(parts), tokens=torch.cat([p.tokens.to(dtype) for p in parts]),
                   extras={k: torch.cat([p.extras[k].to(dtype) for p in parts]) for k in sorted(extra_keys)})


def _concat_columns(parts: list[TokenSet]) -> TokenSet:
    """The parts' per-row columns joined; no vectors (`tokens` left empty)."""
    meta_keys = set().union(*(p.meta.keys() for p in parts))

    def cat_meta(k: str) -> torch.Tensor:
        ref = next(p.meta[k] for p in parts if k in p.meta)
        return torch.cat([p.meta[k] if k in p.meta else torch.zeros(len(p), dtype=ref.dtype) for p in parts])

    return TokenSet(
        tokens=torch.zeros(0, 0),
        group=torch.cat([p.group for p in parts]),
        pts=torch.cat([p.pts for p in parts]),
        row=torch.cat([p.row for p in parts]),
        col=torch.cat([p.col for p in parts]),
        score=torch.cat([p.score for p in parts]),
        recent=torch.cat([p.recent for p in parts]),
        grid=parts[-1].grid,
        meta={k: cat_meta(k) for k in sorted(meta_keys)},
        run=torch.cat([p.run for p in parts]),
    )


def _empty_set(grid: tuple[int, int]) -> TokenSet:
    z = torch.zeros(0, dtype=torch.long)
    return TokenSet(
        tokens=torch.zeros(0, 0), group=z, pts=torch.zeros(0, dtype=torch.float64), row=z, col=z,
        score=torch.zeros(0), recent=torch.zeros(0, dtype=torch.bool), grid=grid,
    )
