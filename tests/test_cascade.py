"""Cascade reconciliation: correctness, leakage accounting, the plain-Python reference,
message contents, schedules and input validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from qkdctl.postprocess.cascade import (
    KIND_IDENTITY,
    KIND_SHUFFLED,
    KIND_SPLIT,
    CascadeAlice,
    CascadeBob,
    CascadeSchedule,
    CascadeStart,
    ParityReply,
    ParityRequest,
    binary_entropy,
    burst_depth,
    choose_schedule,
    efficiency,
    pass_kinds,
    pass_layout,
    reconcile,
)
from qkdctl.postprocess.cascade_reference import (
    ReferenceTrace,
    layout_python,
    reconcile_reference,
)


def keys(n: int, qber: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    e = (rng.random(n) < qber).astype(np.uint8)
    return a, a ^ e, e


def run(a, b, qber, seed, schedule=None):
    """The exchange by hand: (result, Alice, requests, replies)."""
    alice = CascadeAlice(a)
    bob = CascadeBob(b, qber, seed, schedule)
    msgs, replies = [], []
    msg = bob.start()
    while msg is not None:
        msgs.append(msg)
        reply = alice.handle(msg)
        replies.append(reply)
        msg = bob.next_request(reply)
    return bob.result(), alice, msgs, replies


@pytest.mark.parametrize("qber", [0.01, 0.02, 0.05, 0.08])
def test_corrects_every_error(qber):
    for seed in range(6):
        a, b, e = keys(20_000, qber, 100 * seed + int(qber * 1000))
        res = reconcile(a, b, qber, seed)
        assert np.array_equal(res.corrected, a)
        assert np.array_equal(res.flipped, np.flatnonzero(e))
        assert res.passes == choose_schedule(a.size, qber).passes


def test_leakage_is_every_parity_alice_sent():
    n, q = 100_000, 0.02
    a, b, e = keys(n, q, 7)
    res, alice, msgs, replies = run(a, b, q, 11)
    sent = sum(r.parities.size for r in replies)
    assert res.leaked_bits == sent == alice.leaked_bits
    assert res.rounds == len(replies) == alice.replies
    assert np.array_equal(res.corrected, a)
    f = efficiency(res.leaked_bits, n, q)
    assert 1.0 < f < 1.12
    # every requested range is asked once, and none is a top-level block (already known)
    sched = choose_schedule(n, q)
    top = set()
    for p, k in enumerate(sched.block_sizes):
        if pass_kinds(sched)[p] != KIND_SPLIT:
            top.update((p, s, min(s + k, n)) for s in range(0, n, k))
    asked = [(int(p), int(s), int(t)) for m in msgs[1:]
             for p, s, t in zip(m.pass_index, m.start, m.end, strict=True)]
    assert len(asked) == len(set(asked))
    assert not top & set(asked)


def test_zero_errors_discloses_only_top_level_parities():
    n, q = 50_000, 0.03
    a, _, _ = keys(n, q, 3)
    res = reconcile(a, a.copy(), q, 5)
    sched = choose_schedule(n, q)
    blocks = [math.ceil(n / k) if kind != KIND_SPLIT else 2
              for k, kind in zip(sched.block_sizes, pass_kinds(sched), strict=True)]
    assert res.leaked_bits == blocks[0] + sum(nb - 1 for nb in blocks[1:])
    assert res.rounds == 1
    assert res.flipped.size == 0
    assert np.array_equal(res.corrected, a)


@pytest.mark.parametrize("n,qber,seed", [(300, 0.05, 1), (700, 0.02, 2), (1000, 0.08, 3),
                                         (1500, 0.03, 4), (256, 0.1, 5), (100, 0.04, 6)])
def test_numba_matches_reference(n, qber, seed):
    a, b, e = keys(n, qber, seed)
    res, alice, msgs, replies = run(a, b, qber, seed)
    trace = ReferenceTrace()
    ref = reconcile_reference(a, b, qber, seed, trace=trace)
    assert res.leaked_bits == ref.leaked_bits == alice.leaked_bits
    assert res.rounds == ref.rounds
    assert np.array_equal(res.flipped, ref.flipped)
    assert np.array_equal(res.corrected, ref.corrected)
    assert [r.parities.tolist() for r in replies] == trace.replies
    asked = [list(zip(m.pass_index.tolist(), m.start.tolist(), m.end.tolist(), strict=True))
             for m in msgs[1:]]
    assert asked == trace.requests


# bursts in every round (or only when few ranges are left), passes started early
RULES = [dict(burst_levels=3, burst_width=10 ** 6), dict(burst_levels=8, burst_width=40),
         dict(overlap=4), dict(overlap=10 ** 6, burst_levels=2, burst_width=10 ** 6),
         dict(overlap=3, burst_levels=4, burst_width=60)]


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("n,qber,seed,variant", [(700, 0.02, 2, "latency"),
                                                 (1000, 0.08, 3, "optimized"),
                                                 (1500, 0.03, 4, "latency"),
                                                 (300, 0.1, 5, "original")])
def test_round_rules_match_reference(rules, n, qber, seed, variant):
    a, b, e = keys(n, qber, seed)
    sched = dataclasses.replace(choose_schedule(n, qber, variant), **rules)
    res, alice, msgs, replies = run(a, b, qber, seed, sched)
    trace = ReferenceTrace()
    ref = reconcile_reference(a, b, qber, seed, sched, trace=trace)
    assert res.leaked_bits == ref.leaked_bits == alice.leaked_bits
    assert res.rounds == ref.rounds
    assert np.array_equal(res.flipped, ref.flipped)
    assert np.array_equal(res.corrected, ref.corrected)
    assert [r.parities.tolist() for r in replies] == trace.replies
    asked = [list(zip(m.pass_index.tolist(), m.start.tolist(), m.end.tolist(), strict=True))
             for m in msgs[1:]]
    assert asked == trace.requests
    start = msgs[0]
    assert (start.overlap, start.burst_levels, start.burst_width) == (
        sched.overlap, sched.burst_levels, sched.burst_width)
    if variant != "original":
        assert np.array_equal(res.corrected, a)
    # a burst asks whole sub-trees: sorted by (pass, start, longest first), no range twice
    for m in msgs[1:]:
        items = list(zip(m.pass_index.tolist(), m.start.tolist(),
                         (-m.end).tolist(), strict=True))
        assert items == sorted(items) and len(set(items)) == len(items)


def test_burst_depth():
    assert burst_depth(5, 1, 10 ** 6) == 1                 # classic: one level
    assert burst_depth(1, 4, 0) == 1
    assert burst_depth(10, 4, 29) == 1 and burst_depth(10, 4, 30) == 2
    assert burst_depth(10, 4, 70) == 3 and burst_depth(10, 4, 150) == 4
    assert burst_depth(1, 4, 10 ** 9) == 4 and burst_depth(1, 8, 255) == 8


def test_small_keys_and_odd_block_sizes_match_reference():
    """Tiny keys, a last block of one bit, repeated and whole-key block sizes."""
    for n in (1, 2, 5, 65, 257, 1025):
        for seed, q in ((1, 0.1), (2, 0.3)):
            a, b, _ = keys(n, q, seed + n)
            sched = CascadeSchedule(n, tuple(min(n, k) for k in (8, 16, (n + 1) // 2, 3, n)))
            fast = dataclasses.replace(sched, overlap=2, burst_levels=5, burst_width=1000)
            for s in (None, sched, fast):
                res = reconcile(a, b, q, seed, s)
                ref = reconcile_reference(a, b, q, seed, s)
                assert (res.leaked_bits, res.rounds) == (ref.leaked_bits, ref.rounds)
                assert np.array_equal(res.flipped, ref.flipped)
                assert np.array_equal(res.corrected, ref.corrected)


@pytest.mark.parametrize("variant", ["optimized", "opt7", "original"])
def test_other_schedules(variant):
    n, q = 3000, 0.04
    a, b, e = keys(n, q, 9)
    sched = choose_schedule(n, q, variant)
    res = reconcile(a, b, q, 21, sched)
    ref = reconcile_reference(a, b, q, 21, sched)
    assert res.leaked_bits == ref.leaked_bits
    assert np.array_equal(res.flipped, ref.flipped)
    if variant != "original":
        assert np.array_equal(res.corrected, a)


def test_layouts_match_reference():
    for n in (300, 1001):
        sched = CascadeSchedule(n, (7, 64, (n + 1) // 2, n), "custom")
        kinds = pass_kinds(sched)
        assert list(kinds) == [KIND_IDENTITY, KIND_SHUFFLED, KIND_SPLIT, KIND_IDENTITY]
        for q in range(sched.passes):
            elem, m = pass_layout(sched, 12345, q)
            ref, mr = layout_python(sched, 12345, q)
            assert elem.tolist() == ref and m == mr
            assert sorted(ref) == list(range(n))


def test_messages_hold_only_ints_and_arrays():
    a, b, _ = keys(5000, 0.03, 1)
    _, _, msgs, replies = run(a, b, 0.03, 2 ** 64 - 1)
    wire = pytest.importorskip("qkdctl.wire")
    reg = wire.Registry()
    for cls in (CascadeStart, ParityRequest, ParityReply):
        reg.register(cls)
    for m in [*msgs[:5], *replies[:5]]:
        for f in dataclasses.fields(m):
            v = getattr(m, f.name)
            assert type(v) is int or isinstance(v, np.ndarray), (type(m), f.name)
        back = reg.decode(reg.encode(m))
        for f in dataclasses.fields(m):
            assert np.array_equal(getattr(back, f.name), getattr(m, f.name))
    assert msgs[0].permutation_seed == 2 ** 64 - 1


def test_schedule_formulas():
    n = 1 << 20
    # latency (the default): k1 = 2**floor(log2(1.2/p)), k2 = 2**floor(log2(max(3/p, 128)))
    assert choose_schedule(n, 0.01).block_sizes[:3] == (64, 256, n // 2)
    assert choose_schedule(n, 0.013).block_sizes[:3] == (64, 128, n // 2)
    assert choose_schedule(n, 0.02).block_sizes[:3] == (32, 128, n // 2)
    assert choose_schedule(n, 0.05).block_sizes[:3] == (16, 128, n // 2)
    assert choose_schedule(n, 0.005).block_sizes[:2] == (128, 512)
    assert choose_schedule(n, 0.08).block_sizes[:2] == (8, 64)
    lat = choose_schedule(n, 0.02)
    assert (lat.variant, lat.overlap, lat.burst_levels, lat.burst_width) == (
        "latency", 0, 4, int(n * 0.02) // 256)
    # Martinez-Mateo et al. opt. (8): alpha = log2(1/p) - 1/2; classic round rules
    opt = choose_schedule(n, 0.01, "optimized")
    assert opt.block_sizes[:3] == (128, 1024, n // 2)
    assert (opt.overlap, opt.burst_levels, opt.burst_width) == (0, 1, 0)
    assert choose_schedule(n, 0.02, "optimized").block_sizes[:3] == (64, 512, n // 2)
    assert choose_schedule(n, 0.05, "optimized").block_sizes[:3] == (16, 256, n // 2)
    for v in ("latency", "optimized"):
        assert choose_schedule(n, 0.05, v).passes == 28          # ceil(log2 n) + 8
        assert choose_schedule(1000, 0.05, v).passes == 18
        assert choose_schedule(100, 0.05, v).passes == 16
    assert choose_schedule(n, 0.02, "opt7").block_sizes[:3] == (64, 256, n // 2)
    orig = choose_schedule(n, 0.02, "original")
    assert orig.block_sizes == (37, 74, 148, 296)
    assert choose_schedule(100, 0.001).block_sizes[:2] == (100, 100)   # capped at n
    assert choose_schedule(1001, 0.02).block_sizes[2] == 501
    assert binary_entropy(0.5) == 1.0 and binary_entropy(0.0) == 0.0


def test_bad_inputs():
    a, b, _ = keys(1000, 0.02, 1)
    with pytest.raises(ValueError, match="different lengths"):
        reconcile(a, b[:-1], 0.02, 1)
    with pytest.raises(ValueError, match="only 0 and 1"):
        reconcile(a, b * 2, 0.02, 1)
    with pytest.raises(ValueError, match="integers 0/1"):
        reconcile(a.astype(float), b, 0.02, 1)
    with pytest.raises(ValueError, match="1-D"):
        reconcile(a.reshape(10, 100), b.reshape(10, 100), 0.02, 1)
    with pytest.raises(ValueError, match="empty"):
        reconcile(a[:0], b[:0], 0.02, 1)
    for q in (0.0, 0.5, -0.1, 0.7, float("nan"), "x"):
        with pytest.raises(ValueError, match="qber"):
            reconcile(a, b, q, 1)
    for s in (-1, 2 ** 64, 1.5):
        with pytest.raises(ValueError, match="permutation_seed"):
            reconcile(a, b, 0.02, s)
    with pytest.raises(ValueError, match="variant"):
        choose_schedule(1000, 0.02, "fast")
    with pytest.raises(ValueError, match="block sizes"):
        CascadeSchedule(1000, (0, 10))
    for bad in (dict(overlap=-1), dict(burst_levels=0), dict(burst_levels=9),
                dict(burst_width=-1), dict(burst_width=1.5), dict(overlap=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CascadeSchedule(1000, (10, 20), **bad)
    with pytest.raises(ValueError, match="schedule is for"):
        CascadeBob(b, 0.02, 1, choose_schedule(999, 0.02))
    assert np.array_equal(reconcile(a.astype(bool), b.astype(np.int64), 0.02, 1).corrected, a)


def test_protocol_errors():
    a, b, _ = keys(1000, 0.05, 2)
    alice = CascadeAlice(a)
    with pytest.raises(ValueError, match="before CascadeStart"):
        alice.handle(ParityRequest(np.zeros(1, np.int32), np.zeros(1, np.int64),
                                   np.ones(1, np.int64)))
    bob = CascadeBob(b, 0.05, 3)
    start = bob.start()
    with pytest.raises(ValueError, match="different lengths"):
        CascadeAlice(a[:-1]).handle(start)
    with pytest.raises(ValueError, match="burst_levels"):
        CascadeAlice(a).handle(dataclasses.replace(start, burst_levels=0))
    reply = alice.handle(start)
    with pytest.raises(ValueError, match="start < end"):
        alice.handle(ParityRequest(np.zeros(1, np.int32), np.array([5]), np.array([5])))
    with pytest.raises(ValueError, match="start < end"):
        alice.handle(ParityRequest(np.zeros(1, np.int32), np.array([0]), np.array([1001])))
    with pytest.raises(ValueError, match="outside the schedule"):
        alice.handle(ParityRequest(np.array([99], np.int32), np.array([0]), np.array([2])))
    with pytest.raises(TypeError):
        alice.handle("hello")
    with pytest.raises(ValueError, match="parities"):
        bob.next_request(ParityReply(reply.parities[:-1]))
    req = bob.next_request(reply)
    with pytest.raises(ValueError, match="other than 0 and 1"):
        bob.next_request(ParityReply(np.full(req.start.size, 2, np.uint8)))
    with pytest.raises(RuntimeError, match="not finished"):
        bob.result()


def test_rounds_and_efficiency_pinned():
    """The default ("latency") schedule on a fixed 2**20-bit key: a bounded number of
    round trips at a small cost in leakage, against the classic rules."""
    n = 1 << 20
    for qber, max_rounds, max_f in ((0.01, 120, 1.06), (0.02, 110, 1.06)):
        a, b, e = keys(n, qber, 42)
        res = reconcile(a, b, qber, 7)
        assert np.array_equal(res.corrected, a)
        assert np.array_equal(res.flipped, np.flatnonzero(e))
        f = efficiency(res.leaked_bits, n, qber)
        assert res.rounds <= max_rounds and f <= max_f, (qber, res.rounds, f)
        old = reconcile(a, b, qber, 7, choose_schedule(n, qber, "optimized"))
        assert np.array_equal(old.corrected, a)
        assert old.rounds > 4 * res.rounds
        assert f - efficiency(old.leaked_bits, n, qber) < 0.035
