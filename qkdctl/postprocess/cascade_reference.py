"""Plain-Python reference of the Cascade exchange in :mod:`qkdctl.postprocess.cascade`.

Written from the protocol description in that module, with no numba and no
incremental bookkeeping: its own SplitMix64 and Fisher-Yates for the pass
layouts, every parity computed by summing bits, every error parity recomputed
from its definition ``parity(Alice) ^ parity(Bob)`` over the range. It runs the
same rounds: all top-level parities first; then, before each round, passes start
in order while the ranges left to search (odd known ranges of the started passes
whose halves are not known) number none, or at most the schedule's ``overlap``;
each round takes those ranges sorted by (pass, start) and asks, for each, the
left halves of its sub-ranges of at least two bits down to ``m`` levels in
pre-order (``m`` from :func:`qkdctl.postprocess.cascade.burst_depth`), replies
taken in that order, a bit flipped as soon as a one-bit range is known to be odd.
So for the same keys and seed it must disclose the same parities and flip the
same bits as the numba version. Slow: for tests on small keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cascade import (
    KIND_IDENTITY,
    KIND_SHUFFLED,
    KIND_SPLIT,
    CascadeResult,
    CascadeSchedule,
    burst_depth,
    choose_schedule,
    pass_kinds,
)

__all__ = ["ReferenceTrace", "layout_python", "mix64_py", "reconcile_reference"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def mix64_py(z: int) -> int:
    """SplitMix64 finaliser on Python ints."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _shuffle_py(a: list[int], s: int) -> None:
    c = 0
    for i in range(len(a) - 1, 0, -1):
        c = (c + _GOLDEN) & _MASK
        z = mix64_py(s + c)
        j = ((z >> 32) * (i + 1)) >> 32
        a[i], a[j] = a[j], a[i]


def layout_python(schedule: CascadeSchedule, permutation_seed: int, q: int
                  ) -> tuple[list[int], int]:
    """``(elem, m)`` of pass ``q``, as :func:`qkdctl.postprocess.cascade.pass_layout`."""
    n = schedule.n
    kind = int(pass_kinds(schedule)[q])
    seed = mix64_py(int(permutation_seed) + (q + 1) * _GOLDEN)
    if kind == KIND_SPLIT:
        split_key = mix64_py(int(permutation_seed))
        bits = [(mix64_py(split_key + i * _GOLDEN) >> q) & 1 for i in range(n)]
        first = [i for i in range(n) if bits[i] == 0]
        second = [i for i in range(n) if bits[i] == 1]
        _shuffle_py(first, mix64_py(seed ^ 1))
        _shuffle_py(second, mix64_py(seed ^ 2))
        return first + second, len(first)
    elem = list(range(n))
    if kind == KIND_SHUFFLED:
        _shuffle_py(elem, seed)
    assert kind in (KIND_IDENTITY, KIND_SHUFFLED)
    return elem, -1


@dataclass
class ReferenceTrace:
    """Every message of a reference run, for tests."""

    requests: list[list[tuple[int, int, int]]] = field(default_factory=list)
    replies: list[list[int]] = field(default_factory=list)


def reconcile_reference(alice_key, bob_key, qber_estimate: float, permutation_seed: int,
                        schedule: CascadeSchedule | None = None,
                        trace: ReferenceTrace | None = None) -> CascadeResult:
    """Cascade between ``alice_key`` and ``bob_key``, in plain Python."""
    alice = [int(v) for v in alice_key]
    bob = [int(v) for v in bob_key]
    n = len(alice)
    if len(bob) != n:
        raise ValueError("keys of different lengths")
    if schedule is None:
        schedule = choose_schedule(n, qber_estimate)
    npass = schedule.passes
    elems, blocks = [], []
    for q in range(npass):
        elem, m = layout_python(schedule, permutation_seed, q)
        elems.append(elem)
        if m >= 0:
            blocks.append([(0, m), (m, n)])
        else:
            k = schedule.block_sizes[q]
            blocks.append([(a, min(a + k, n)) for a in range(0, n, k)])

    def alice_parity(q: int, a: int, b: int) -> int:
        return sum(alice[elems[q][j]] for j in range(a, b)) & 1

    def bob_parity(q: int, a: int, b: int) -> int:
        return sum(bob[elems[q][j]] for j in range(a, b)) & 1

    known: dict[tuple[int, int, int], int] = {}     # (pass, start, end) -> Alice's parity
    expanded: set[tuple[int, int, int]] = set()
    flipped: list[int] = []
    leaked = 0
    rounds = 0

    def err(node: tuple[int, int, int]) -> int:
        return known[node] ^ bob_parity(*node)

    def flip(x: int) -> None:
        assert x not in flipped, "a bit was flipped twice"
        bob[x] ^= 1
        flipped.append(x)

    # round 1: every top-level block; the last block of passes > 0 is inferred
    sent = []
    for q in range(npass):
        for i, (a, b) in enumerate(blocks[q]):
            if q == 0 or i < len(blocks[q]) - 1:
                sent.append(alice_parity(q, a, b))
    if trace is not None:
        trace.replies.append(list(sent))
    leaked += len(sent)
    rounds += 1
    it = iter(sent)
    total = 0
    for q in range(npass):
        acc = 0
        for i, (a, b) in enumerate(blocks[q]):
            par = next(it) if (q == 0 or i < len(blocks[q]) - 1) else total ^ acc
            acc ^= par
            known[(q, a, b)] = par
        if q == 0:
            total = acc

    def frontier() -> list[tuple[int, int, int]]:
        odd_singletons = [nd for nd in known if nd[0] <= cur and nd[2] - nd[1] == 1
                          and nd not in expanded and err(nd)]
        assert not odd_singletons
        return sorted(nd for nd in known if nd[0] <= cur and nd not in expanded
                      and nd[2] - nd[1] >= 2 and err(nd))

    def start_next_pass() -> None:
        nonlocal cur
        cur += 1
        for a, b in blocks[cur]:
            if b - a == 1 and err((cur, a, b)):
                flip(elems[cur][a])

    def subtree(q: int, a: int, b: int, depth: int) -> list[tuple[int, int, int]]:
        """The ranges of at least two bits under (q, a, b), ``depth`` levels, pre-order."""
        if b - a < 2 or depth == 0:
            return []
        mid = a + (b - a) // 2
        return ([(q, a, b)] + subtree(q, a, mid, depth - 1)
                + subtree(q, mid, b, depth - 1))

    cur = -1
    while True:
        front = frontier()
        if front and len(front) <= schedule.overlap and cur + 1 < npass:
            start_next_pass()
            continue
        if not front:
            if cur + 1 == npass:
                break
            start_next_pass()
            continue
        m = burst_depth(len(front), schedule.burst_levels, schedule.burst_width)
        ranges = [r for q, a, b in front for r in subtree(q, a, b, m)]
        request = [(q, a, a + (b - a) // 2) for q, a, b in ranges]
        reply = [alice_parity(*r) for r in request]
        if trace is not None:
            trace.requests.append(request)
            trace.replies.append(reply)
        leaked += len(reply)
        rounds += 1
        for (q, a, b), par in zip(ranges, reply, strict=True):
            mid = a + (b - a) // 2
            known[(q, a, mid)] = par
            known[(q, mid, b)] = known[(q, a, b)] ^ par
            expanded.add((q, a, b))
            for lo, hi in ((a, mid), (mid, b)):
                if hi - lo == 1 and err((q, lo, hi)):
                    flip(elems[q][lo])

    return CascadeResult(corrected=np.array(bob, np.uint8), leaked_bits=leaked, rounds=rounds,
                         flipped=np.array(sorted(flipped), np.int64), passes=npass)
