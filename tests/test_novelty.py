"""Memory-aware novelty (pruning/novelty.py; docs/PRUNERS.md, EchoPrune and MoPrune streaming):
periodic distractors do not fill the memory, events stay, and a token that returns to no state
keeps the paper's score."""
from __future__ import annotations

import pytest
import torch
from planted_streams import planted_stream, store_report

from pruning import FrameTokens, TokenMemory, get_pruner
from pruning.novelty import SAME_STATE, StateBank

SEEDS = (0, 1, 2)
CAPACITIES = (0.03, 0.10)


def replay(name: str, seed: int, capacity: float, **params) -> tuple[float, int, int]:
    """(distractor share of the store, events kept, events) of a planted stream."""
    planted = planted_stream(seed)
    t = planted.video.shape[0]
    mem = TokenMemory(capacity=int(capacity * t * planted.n), pruner=get_pruner(name, **params), recent_groups=2)
    for k in range(t):
        mem.add(FrameTokens(k, float(k), planted.video[k]))
    share, kept = store_report(planted, mem.snapshot())
    return share, kept, len(planted.events)


@pytest.mark.parametrize("name", ["echoprune", "moprune"])
@pytest.mark.parametrize("capacity", CAPACITIES)
def test_periodic_distractors_do_not_fill_the_memory_and_every_event_stays(name, capacity):
    for seed in SEEDS:
        share, kept, events = replay(name, seed, capacity)
        assert share <= 0.10 and kept == events, (seed, share, kept)


@pytest.mark.parametrize("name", ["echoprune", "moprune"])
def test_with_the_papers_novelty_the_distractors_fill_it(name):
    """memory_states=0 is the paper's novelty: a blinking light is new in every group."""
    runs = [replay(name, seed, capacity, memory_states=0) for seed in SEEDS for capacity in CAPACITIES]
    assert min(share for share, _, _ in runs) >= 0.8
    assert sum(kept for _, kept, _ in runs) < sum(events for _, _, events in runs)


def test_the_sketch_at_a_large_width_finds_the_same_recurrences():
    """D > 256 goes through the count sketch; D = 1024 here, as at a real model's width."""
    planted = planted_stream(0, t=24, h=6, w=6, d=1024)
    exact, sketched = StateBank(4, dims=1024), StateBank(4)
    for k in range(24):
        x = planted.video[k].reshape(36, -1)
        (cos_e, _, _), (cos_s, _, _) = exact.observe(x), sketched.observe(x)
        assert torch.equal(torch.isfinite(cos_e), torch.isfinite(cos_s)), k
        both = torch.isfinite(cos_e)
        assert torch.allclose(cos_e[both], cos_s[both], atol=0.02), k
    assert bool(torch.isfinite(cos_e).any())


def unit(*shape: int, seed: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def test_a_return_to_a_left_state_recurs_and_a_static_or_new_state_does_not():
    """Position 0 static, 1 blinking (a, b, a, b, ...), 2 an event (bg, e, e, bg, ...)."""
    bg, a, b, e = unit(4, 3, 16, seed=0).unbind(0)
    bank = StateBank(4)
    seq = []
    for k in range(8):
        x = torch.stack([bg[0], (a[1], b[1])[k % 2], e[2] if k in (1, 2) else bg[2]])
        seq.append(bank.observe(x))
    cos = torch.stack([c for c, _, _ in seq])
    assert not bool(torch.isfinite(cos[:, 0]).any())  # static: its predecessor's state
    assert not bool(torch.isfinite(cos[:2, 1]).any()) and bool((cos[2:, 1] > 0.999).all())  # blinking
    assert torch.isfinite(cos[:, 2]).tolist() == [False, False, False, True, False, False, False, False]
    dist = torch.stack([d for _, d, _ in seq])
    assert bool((dist[2:, 1] < 1e-5).all()) and not bool(torch.isfinite(dist[:, 0]).any())
    state = torch.stack([s for _, _, s in seq])
    assert state[:, 0].unique().numel() == 1 and state[:, 1].unique().numel() == 2
    assert state[3, 2] == state[0, 2] != state[1, 2] == state[2, 2]
    positions = torch.arange(3)
    # the blink returned to each state at least twice by group 5; the background of position 2 once
    assert bank.periodic(positions, state[-1]).tolist() == [False, True, False]


def test_noise_is_folded_into_a_state_and_the_bank_is_bounded():
    g = torch.Generator().manual_seed(1)
    states = unit(6, 16, seed=2)
    bank = StateBank(4)
    ids = [int(bank.observe((states[k % 2] + 0.05 * torch.randn(16, generator=g))[None])[2]) for k in range(12)]
    assert len(set(ids)) == 2 and ids == ids[:2] * 6  # two states, however noisy each view
    for k in range(2, 6):  # four new states push out the two old ones
        bank.observe(states[k][None])
    cos, _, state = bank.observe(states[0][None])
    assert not bool(torch.isfinite(cos).any()) and int(state) not in ids


def test_a_new_grid_starts_an_empty_bank():
    bank = StateBank(4)
    x = unit(4, 8, seed=3)
    for k in range(3):
        _, _, old = bank.observe(x)
    cos, _, new = bank.observe(x[:2])
    assert not bool(torch.isfinite(cos).any()) and int(new.min()) > int(old.max())
    assert not bool(bank.periodic(torch.arange(2), old[:2]).any())


@pytest.mark.parametrize("name", ["echoprune", "moprune"])
def test_a_token_that_returns_to_no_state_keeps_the_papers_score(name):
    """EchoPrune: bit for bit where no token recurs; MoPrune's min-max spans the group, so a
    group with no recurrence is bit for bit."""
    planted = planted_stream(3, t=16)
    on, off = get_pruner(name), get_pruner(name, memory_states=0)
    bank = StateBank(4)
    for k in range(16):
        group = FrameTokens(k, float(k), planted.video[k])
        cos, _, _ = bank.observe(planted.video[k].reshape(planted.n, -1))
        a, b = on.score(group).score, off.score(group).score
        fresh = ~torch.isfinite(cos)
        if name == "echoprune":
            assert torch.equal(a[fresh], b[fresh]), k
            assert bool((a[~fresh] <= -2 * SAME_STATE).all()), k
        elif bool(fresh.all()):
            assert torch.equal(a, b), k
