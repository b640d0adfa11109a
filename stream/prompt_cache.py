"""One camera's prompt cache: the LLM's KV of the prompt prefix (system text and the memory's
video block), kept current as groups arrive, so a question prefills only itself.

Exact by construction. The family's `PromptPlan` says where every prefix token comes from, and
`PromptPlan.key` gives each one an identity (id, position, and for a visual token the memory's
stamp of its vector). The cache remembers the keys of the tokens it holds; bringing it current
finds the first key that differs from the memory's plan now, crops the KV back to it (a crop is
a length change) and prefills from there: an appended group costs its own tokens; an eviction,
a merge into a held token or a dropped first group costs a re-prefill from the first row it
changed (the memory evicts in steps, so that comes once every few groups). Prefilling in chunks
equals prefilling at once, so the KV equals a full prefill of the same prompt.

Only the camera's LLM thread touches the cache. It extends it between questions (`refresh`, in
chunks sized to take about `CHUNK_S` at the prefill rate measured so far, but never under 512
tokens, below which chunking costs more than it saves) and gives way to a waiting question
between chunks, so a question waits for at most one chunk (~2 s for the 0.5B-size LLM on the
2-core CPU). It answers on it too: the question's suffix is prefilled onto the shared KV and
cropped off after the answer. So ingest and questions never see each other half-done. The memory is read under its lock: its columns
(`TokenMemory.layout`) and then only the vectors not yet cached (`TokenMemory.gather`), retried
if the memory changed in between.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pruning import TokenMemory

from .errors import ConfigError
from .vlm.base import Columns, LayoutSettings, Prompt, PromptPlan, VideoLM
from .vlm.decode import prefill
from .vlm.kv_cache import crop_to

log = logging.getLogger(__name__)

CHUNK_S = 0.25  # seconds one background forward aims at
CHUNK_TOKENS = (512, 2048)  # a background forward's bounds: 4k tokens at 0.5B size on the CPU took
# 17 s in chunks of 512-2048, 42 s in 256 and 126 s in 64
UNBOUNDED = 2**62
TEMPLATE_TOKENS = 64  # room for the chat template and the span line around a question
MIB = 1 << 20


def limit_tokens(vlm: VideoLM, mib: float, memory: TokenMemory, layout: LayoutSettings, max_new_tokens: int,
                 max_question_chars: int) -> int:
    """The cache's limit in prompt tokens for a limit of `mib` MiB (0: no limit beyond the
    memory's own bound); a `ConfigError` naming `query.prompt_cache_mib` when the largest prompt
    the memory can give cannot fit: every held token, the system text, a question of
    `max_question_chars` characters (up to 4 tokens each: a byte-level tokenizer spends one per
    UTF-8 byte) and its answer, and in `text` mode a timestamp label for every held group (up to
    one group per held token)."""
    per = vlm.kv_bytes_per_token
    visual = memory.capacity + memory.recent_groups * vlm.max_tokens_per_group
    one = len(vlm.plan(Columns.of([0], [0.0]), "", layout))
    label = len(vlm.plan(Columns.of([0, 1], [0.0, 99_999.9]), "", layout)) - one - 1
    groups = memory.recent_groups + memory.capacity if label else 0
    need = one - 1 + visual + groups * label + TEMPLATE_TOKENS + 4 * max_question_chars + max_new_tokens
    log.info("prompt cache: %d bytes (%.1f KiB) per token; the memory's %d visual tokens, a question and its "
             "answer need up to %d tokens (%.0f MiB)", per, per / 1024, visual, need, need * per / MIB)
    if mib == 0:
        return UNBOUNDED
    room = int(mib * MIB) // per
    if room < need:
        labels = f", {label} tokens of timestamp label for each of up to {groups} groups" if groups else ""
        raise ConfigError(
            f"{mib:g} MiB holds {room} prompt tokens of {vlm.name} ({per / 1024:.1f} KiB per token), but the memory "
            f"holds up to {visual} visual tokens (capacity {memory.capacity} + {memory.recent_groups} recent groups "
            f"x {vlm.max_tokens_per_group}){labels}, and with the system text, a question of up to "
            f"{max_question_chars} characters and {max_new_tokens} new tokens the prompt needs up to {need}: set at "
            f"least {-(-need * per // MIB)}, or 0 to size the cache to the memory", "query.prompt_cache_mib")
    return room





@dataclass
class CacheStats:
    """What keeping the cache current has cost (background work and the part done at question time)."""

    appended_tokens: int = 0  # prefilled at the end of what was held
    reprefilled_tokens: int = 0  # prefilled again after a change to rows already held
    rewinds: int = 0  # times the held prefix was cut back to a changed row
    background_ms: float = 0.0  # LLM time spent by `refresh`
    refreshes: int = 0
    over_limit: int = 0  # times the prefix did not fit in the limit


class PromptCache:
    """The KV of one camera's prompt prefix and the keys of the tokens it holds."""

    def __init__(self, vlm: VideoLM, memory: TokenMemory, layout: LayoutSettings, max_tokens: int = UNBOUNDED):
        self.vlm = vlm
        self.memory = memory
        self.layout = layout
        self.max_tokens = max_tokens
        self.kv = vlm.new_cache(max_tokens)
        self.key = torch.zeros(0, 0, dtype=torch.long)
        self.stats = CacheStats()
        self._replaced_end = 0  # prefilling up to here again is re-prefill (the prefix before the last rewind)
        self._rate: float | None = None  # prefill tokens per second, measured on the refreshes

    @property
    def held(self) -> int:
        """Prefix tokens whose KV is held."""
        return int(self.key.shape[0])

    def nbytes(self) -> int:
        return self.kv.nbytes()

    def sync(self, plan: PromptPlan, stamps: torch.Tensor) -> torch.Tensor:
        """Cut the held prefix back to the first token that differs from `plan`; the plan's
        prefix keys (hand them to `extended` once more of the plan is prefilled)."""
        want = plan.key(stamps)
        n = min(self.held, int(want.shape[0]))
        if self.key.shape[1:] != want.shape[1:]:
            n = 0
        same = n
        if n:
            diff = torch.nonzero((self.key[:n] != want[:n]).any(dim=1))
            same = int(diff[0]) if diff.numel() else n
        if same < self.held:
            self.stats.rewinds += 1
            self._replaced_end = min(max(self._replaced_end, self.held), int(want.shape[0]))
            crop_to(self.kv, same)
            self.key = self.key[:same]
        return want

    def fits(self, tokens: int) -> bool:
        return tokens <= self.max_tokens

    def prompt(self, plan: PromptPlan, version: int, end: int | None = None) -> Prompt | None:
        """The plan's embeddings from the held prefix on (to `end`), gathering only the
        visual tokens not yet cached; None when the memory changed since `version`."""
        end = len(plan) if end is None else end
        vis = plan.visual[self.held:end]
        got = self.memory.gather(vis[vis >= 0], version)
        if got is None:
            return None
        return Prompt(plan, self.vlm.embed(plan, got[0], self.held, end), start=self.held, extras=got[1])

    def extended(self, want: torch.Tensor, end: int) -> int:
        """Record that the KV now holds the first `end` tokens of the plan whose keys `sync`
        returned (`end` <= prefix_len; the held ones agree with them); the tokens that were new."""
        start = self.held
        self.key = want[:end]
        again = max(0, min(end, self._replaced_end) - start)
        self.stats.reprefilled_tokens += again
        self.stats.appended_tokens += end - start - again
        if end >= self._replaced_end:
            self._replaced_end = 0
        return end - start

    def drop(self) -> None:
        """Forget everything held (after an error part-way through a prefill)."""
        crop_to(self.kv, 0)
        self.key = self.key[:0]

    def _chunk(self) -> int:
        lo, hi = CHUNK_TOKENS
        return lo if self._rate is None else max(lo, min(hi, int(self._rate * CHUNK_S)))

    def refresh(self, give_way: Callable[[], bool]) -> int:
        """Bring the prefix current with the memory, a chunk per forward, until it is or
        `give_way()` says a question waits; the tokens prefilled."""
        done = 0
        t0 = time.perf_counter()
        try:
            while not give_way():
                lay = self.memory.layout()
                if lay.group.numel() == 0:
                    break
                plan = self.vlm.plan(lay, "", self.layout)
                if not self.fits(plan.prefix_len):
                    self.stats.over_limit += 1
                    break
                want = self.sync(plan, lay.stamp)
                if self.held >= plan.prefix_len:
                    break
                end = min(plan.prefix_len, self.held + self._chunk())
                prompt = self.prompt(plan, lay.version, end)
                if prompt is None:  # ingest added a group meanwhile: plan again
                    continue
                t = time.perf_counter()
                prefill(self.vlm, self.kv, prompt, end=end)
                if prompt.inputs_embeds.is_cuda:  # a forward without logits returns before its kernels finish
                    torch.cuda.synchronize(prompt.inputs_embeds.device)
                n = self.extended(want, end)
                rate = n / max(time.perf_counter() - t, 1e-6)
                self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
                done += n
        except BaseException:
            self.drop()
            raise
        finally:
            if done:
                self.stats.refreshes += 1
                self.stats.background_ms += (time.perf_counter() - t0) * 1e3
        return done

    def report(self) -> dict:
        """For the camera's status: what the cache holds and what keeping it has cost."""
        s = self.stats
        return {
            "tokens": self.held, "bytes": self.nbytes(), "kv_bytes_per_token": self.vlm.kv_bytes_per_token,
            "limit_tokens": None if self.max_tokens >= UNBOUNDED else self.max_tokens,
            "appended_tokens": s.appended_tokens, "reprefilled_tokens": s.reprefilled_tokens, "rewinds": s.rewinds,
            "background_ms": round(s.background_ms, 1), "over_limit": s.over_limit,
        }
