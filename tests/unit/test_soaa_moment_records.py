"""The C step's remembered moment sums stay bounded when the set of blocks with a gradient changes each
step (a mixture of experts' idle experts, LayerDrop), and always answer with a block's newest sums."""

from __future__ import annotations

import torch

from lightning_soaa import SOAA
from lightning_soaa.functional.soaa import MomentRecords, Stored


def _moments(n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.zeros(3) for _ in range(n)], [torch.zeros(3) for _ in range(n)]


def test_a_block_answers_with_its_newest_record_and_old_records_go() -> None:
    ms, vs = _moments(6)
    rec = MomentRecords()
    g = torch.Generator().manual_seed(0)
    newest: dict[int, tuple[float, float]] = {}
    for step in range(500):  # every step a different subset of the blocks, as idle experts give
        idx = sorted(torch.randperm(6, generator=g)[: 1 + step % 5].tolist())
        for i in idx:
            ms[i].add_(1.0)  # the step writes them (a version bump), then remembers
        record = rec.snapshot([ms[i] for i in idx], [vs[i] for i in idx])
        sums = [(float(step), float(i)) for i in idx]
        rec.keep(record, sums)
        newest.update({i: s for i, s in zip(idx, sums)})
        assert len(rec) <= 6  # at most one record per block (it grew by one a step)
        for i in range(6):
            assert rec.lookup(ms[i], vs[i]) == newest.get(i)
    assert rec.lookup_all(ms, vs) == [newest[i] for i in range(6)]
    ms[2].mul_(2.0)  # changed since: no longer known
    assert rec.lookup(ms[2], vs[2]) is None
    rec.forget()
    assert len(rec) == 0 and rec.lookup(ms[0], vs[0]) is None


def test_records_of_moments_that_went_away_are_dropped() -> None:
    rec = MomentRecords()
    for _ in range(300):  # a new model every time: the old moments die
        ms, vs = _moments(2)
        rec.keep(rec.snapshot(ms, vs), [(1.0, 1.0), (2.0, 2.0)])
        del ms, vs
    assert len(rec) <= 64 + 1


def test_soaa_with_idle_experts_keeps_a_bounded_store() -> None:
    """SOAA's C step (compile=True on the CPU), experts idle at random: the store holds at most one
    record per expert block, and the run equals the eager one."""
    torch.manual_seed(0)
    experts = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(8)]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in experts]
    opt = SOAA(experts, lr=1e-2, total_steps=200, compile=True)
    ref = SOAA(twin, lr=1e-2, total_steps=200, compile=False)
    kernels = opt._kernels()
    assert kernels is not None
    g = torch.Generator().manual_seed(1)
    for step in range(200):
        active = torch.randperm(8, generator=g)[: 1 + step % 7].tolist()
        for ps in (experts, twin):
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, 0.1 * (i + 1)) + 0.01 * step if i in active else None
        loss = 1.0 / (1 + step)
        opt.step(loss=loss)
        ref.step(loss=loss)
        assert len(kernels._records) <= len(experts)
    for a, b in zip(experts, twin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _CountedId(int):
    """An id whose equality tests and hashes are counted (a fresh object per snapshot, as ``id()`` gives)."""

    used = 0

    def __eq__(self, other: object) -> bool:
        _CountedId.used += 1
        return int.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        _CountedId.used += 1
        return int.__hash__(self)


def _record_of(ms: list[torch.Tensor], vs: list[torch.Tensor]) -> Stored:
    """A snapshot whose ids are counted (new id objects each call, as two snapshots of one step make)."""
    s = MomentRecords.snapshot(ms, vs)
    return Stored(tuple(_CountedId(i) for i in s.ids), s.refs, s.versions, s.ptrs, [])


def test_remembering_the_same_blocks_again_costs_a_few_id_operations_per_block() -> None:
    """A step's record of all its blocks (SOAA's first step keeps two, a reload's step as many): each
    block compared its record's ids with the new ones in full (2n ids per block: 3000 blocks, 0.2 s of a
    first step), and a record that blocks leave had its 2n ids hashed once per block leaving. The id
    equality tests and hashes stay a few per block, whatever the number of blocks."""
    n = 400
    ms, vs = _moments(n)
    rec = MomentRecords()
    sums = [(float(i), 1.0) for i in range(n)]
    rec.keep(_record_of(ms, vs), sums)
    _CountedId.used = 0
    rec.keep(_record_of(ms, vs), sums)  # the same blocks again
    assert _CountedId.used <= 24 * n  # (before: ~2n², once per block)
    assert len(rec) == 1 and rec.lookup_all(ms, vs) == sums
    vs2 = [torch.zeros(3) for _ in range(n)]
    _CountedId.used = 0
    rec.keep(_record_of(ms, vs2), sums)  # every block leaves the old record for a new one
    assert _CountedId.used <= 24 * n  # (before: ~2n², once per block)
    assert len(rec) == 1 and rec.lookup_all(ms, vs2) == sums and rec.lookup(ms[0], vs[0]) is None
