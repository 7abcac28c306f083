"""Cascade information reconciliation between Alice (answers parities) and Bob (drives).

Cascade (Brassard, Salvail, EUROCRYPT '93) corrects Bob's key towards Alice's
by comparing parities of blocks of bits over the public, authenticated classical
channel: a block whose parities differ holds an odd number of errors, and a
binary search (bisection) inside it finds one. Several passes, each over a
pseudo-random reordering of the key, catch the errors that were in blocks with
an even number of errors before; each bit Bob corrects changes the parity of
the blocks that hold it in the other passes, which then get searched too (the
cascade effect). This module follows the optimisations of Martinez-Mateo,
Pacher, Peev, Ciurana, Martin, "Demystifying the information reconciliation
protocol Cascade", Quantum Inf. Comput. 15, 453 (2015), arXiv:1407.3257:

- **Block sizes** (:func:`choose_schedule`, variant ``"optimized"``, their
  "Cascade opt. (8)"): with ``alpha = log2(1/p) - 1/2``, the first pass uses
  blocks of ``k1 = 2**ceil(alpha)``, the second ``k2 = 2**ceil((alpha + 12)/2)``
  and every later pass two blocks of half the key; ``ceil(log2 n) + 8`` passes,
  at least 16 (each later pass costs about one parity and halves the frame error
  rate). Powers of two make every bisection exact. The default variant,
  ``"latency"``, keeps that structure with smaller first two blocks, for fewer
  rounds (see *Rounds* below): ``k1`` the largest power of two ``<= 1.2/p``,
  ``k2`` the largest power of two ``<= max(3/p, 128)``, at most ``8 k1``. Their
  "opt. (7)" (``k1 = 2**ceil(log2(1/p))``, ``k2 = 4 k1``) and the original
  schedule (``k1 = ceil(0.73/p)``, doubling, 4 passes) are there to compare.
- **Reuse of known sub-block parities**: every parity Alice ever disclosed is
  kept, with Bob's error parity ``e = parity(Alice) ^ parity(Bob)`` of its
  range, which each bit Bob flips toggles on every known range that holds it,
  in every pass. Any known range with ``e = 1`` holds an error; Bob searches
  each such range whose halves are not known yet, so a cascade restarts from
  the smallest known range, not from the top-level block, and two errors that
  a bisection separated are both found even when their block is even again.
- **Parity inference**: a bisection asks only for the left half (the right one
  is the parent XOR the left); the parity of the whole key follows from the
  first pass, so the last block of every later pass is never asked for.

Leakage: ``leaked_bits`` is the number of parity bits Alice sent (the length of
every :class:`ParityReply`); Bob's requests say which ranges he asks about,
which depends only on public data and Bob's key, and are not counted. Alice's
own count (:attr:`CascadeAlice.leaked_bits`) is the one privacy amplification
must use: she counts what she sent, whatever Bob asked.

The exchange is round-based: :class:`CascadeStart` (the schedule, its round
rules and the permutation seed) is answered with the parities of all top-level
blocks of all passes at once (Alice's key never changes, so asking early
discloses nothing more); then every round carries, in one :class:`ParityRequest`,
the ranges being searched (all the parallel bisections and cascades of the
started passes), and Alice answers with their parities in one
:class:`ParityReply`. The rules, all of Bob's driving (Alice answers any range),
from the :class:`CascadeSchedule`:

- **Pass start**: passes start in order. Before each round, while not all have
  started, the next one starts if the ranges left to search (odd known ranges of
  the started passes whose halves are not known) number none, or at most
  ``overlap`` (0 by default: pass ``i`` searches start only when no known range
  of passes ``< i`` is odd, as in sequential Cascade).
- **Levels per round**: a round takes the ``A`` ranges left to search, sorted by
  (pass, start), and asks for each the left half of every sub-range of at least
  two bits down to ``m`` levels, the range's sub-tree in pre-order (the range,
  its left half's sub-tree, its right half's): ``2**m - 1`` parities for ``m``
  bisection levels. ``m`` is the largest value ``<= burst_levels`` with
  ``A * (2**m - 1) <= burst_width``, at least 1 (:func:`burst_depth`; with the
  classic ``burst_levels = 1``, one level per round: the left halves only).

The replies are processed in request order (a sub-range is split as soon as its
parity is known, a bit flipped as soon as a one-bit range is known to be odd), so
the outcome is a function of the keys, the seed and the schedule.

**Rounds.** Every round costs one round-trip time (RTT) of the classical
channel, which dominates over a real network. What makes them many is not the
later passes (after the first two, a handful of errors is left, which one or
two half-key passes and their cascades find in ``log2 n`` rounds each) but the
cascades between the first two passes: each bit flipped makes the block of the
other pass that holds it odd, whose search (``log2 k`` rounds) finds the next
error, and so on. The errors left after the first pass, linked by the blocks
they share in both passes, form long chains once ``k2 p`` is well above 1 (a
giant component), each walked one search at a time from its ends; the frame
waits for the longest. With the ``"optimized"`` sizes (``k2 p`` of 5 to 13) a
2**22-bit key at 1 % takes about 900 rounds, 850 of them in these chains.
``"latency"`` uses ``k1 p`` in (0.6, 1.2] and, up to a QBER of 2.3 %, ``k2 p``
in (1.5, 3], where the chains stay short: 75 to 140 rounds on average from 0.4
to 2.5 % (about 100 at 1 and 2 %) for 2**17 to 2**22 bits, for about 0.02 to
0.025 in ``f``. Above, where short blocks leak more, the second pass keeps
blocks of 128 bits (``k2 p`` above 3): more rounds (about 200 at 5 %) for an
``f`` within 0.02 of ``"optimized"``. The chains end in a tail of few long
searches; there, bursts of ``m`` levels cut the rounds by a further 30 %
(``burst_width = n p / 256``: at most that many parities a round go to bursts,
so their leakage scales with the key: 0.001 in ``f`` at 1 %, 0.004 at 2 %,
0.008 at 5 %; on short keys they hardly apply). Starting later passes early
(``overlap > 0``) was measured to save only 1-3 rounds more while leaking more
(half-key searches of ``log2 n`` parities chasing errors that the cascades find
in ``log2 k1``) and costing time (each split block searched must be laid out),
so ``"latency"`` keeps ``overlap = 0``; the other variants keep the classic
rules (``overlap = 0``, ``burst_levels = 1``), for comparison.

Layouts (which bit sits at which position of a pass): pass 0 is the identity;
a pass with more than two blocks is a Fisher-Yates shuffle driven by SplitMix64
(:mod:`qkdctl.rng`) from the pass seed; a pass of block size ``>= n/2`` (two
blocks, for ``n >= 256``) is a random split: bit ``i`` is in the first block of
pass ``q`` when bit ``q`` of ``hash_index(split_key, i)`` is 0, so that block
holds about (not exactly) ``n/2`` bits, in ascending order of ``i`` then
shuffled. A split gives its block parities without any permutation (one hash
per bit serves all passes), and a block is only shuffled, on both sides, if a
search ever enters it; this keeps the many late passes cheap. The pass seeds
and the split key come from the 64-bit ``permutation_seed``; both sides derive
the same layouts (:func:`pass_layout`).

Residual errors are possible (two or more errors that no pass separated); they
are left to the verification hash that follows reconciliation.

The hot loops are numba kernels; Python moves arrays between rounds. A
plain-Python twin of the whole protocol, written from this description, is in
:mod:`qkdctl.postprocess.cascade_reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba as nb
import numpy as np

from ..rng import GOLDEN, hash_index, mix64

__all__ = [
    "CascadeAlice",
    "CascadeBob",
    "CascadeResult",
    "CascadeSchedule",
    "CascadeStart",
    "ParityReply",
    "ParityRequest",
    "VARIANTS",
    "binary_entropy",
    "burst_depth",
    "choose_schedule",
    "default_passes",
    "efficiency",
    "pass_layout",
    "pass_seeds",
    "reconcile",
]

KIND_IDENTITY = 0   # positions are the key indices
KIND_SHUFFLED = 1   # a Fisher-Yates shuffle, blocks of the pass's block size
KIND_SPLIT = 2      # two blocks: a random split by hash bit, each block shuffled lazily
MAX_PASSES = 64
MAX_BITS = 1 << 31    # positions are int32
SPLIT_MIN_BITS = 256  # below this, a two-block pass is an ordinary shuffled pass
VARIANTS = ("latency", "optimized", "opt7", "original")
ORIGINAL_PASSES = 4
MAX_BURST_LEVELS = 8  # levels a round may search at once (2**8 - 1 parities per range)
BURST_LEVELS = 4      # "latency": up to 4 levels (15 parities per range) in a round
BURST_WIDTH_DIV = 256  # "latency": ... when that makes at most n p / 256 parities

_MASK64 = (1 << 64) - 1
_GOLDEN_INT = 0x9E3779B97F4A7C15
_U1 = np.uint64(1)
_U32 = np.uint64(32)


# --------------------------------------------------------------------------- schedule


def binary_entropy(p: float) -> float:
    """h(p) = -p log2 p - (1-p) log2 (1-p), in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


def efficiency(leaked_bits: int, n: int, qber: float) -> float:
    """Reconciliation efficiency f = leaked bits / (n h(qber)); 1 is the Shannon limit."""
    return leaked_bits / (n * binary_entropy(qber))


def _check_qber(qber: float) -> float:
    try:
        q = float(qber)
    except (TypeError, ValueError):
        raise ValueError(f"qber must be a number in (0, 0.5), got {qber!r}") from None
    if not 0.0 < q < 0.5:
        raise ValueError(f"qber must be in (0, 0.5), got {qber!r}")
    return q


@dataclass(frozen=True)
class CascadeSchedule:
    """Block size of every pass of one Cascade run over ``n`` bits, and how the
    searches are scheduled into rounds.

    A pass whose block size is at least ``n/2`` (and below ``n``) has two
    blocks; for ``n >= SPLIT_MIN_BITS`` it is laid out as a random split, whose
    first block holds about ``n/2`` bits (see the module docstring).

    ``overlap``: pass ``q`` starts as soon as at most ``overlap`` ranges of the
    passes before it are left to search (0: only when none is, sequential Cascade).
    ``burst_levels``, ``burst_width``: a round that searches ``A`` ranges asks,
    for each, the left halves of its sub-ranges down to ``m`` levels
    (``2**m - 1`` parities, fewer near one-bit ranges), ``m`` the largest value
    ``<= burst_levels`` with ``A * (2**m - 1) <= burst_width``, at least 1
    (``burst_levels = 1``: one bisection level per round). The defaults are the
    classic rules.
    """

    n: int
    block_sizes: tuple[int, ...]
    variant: str = "custom"
    overlap: int = 0
    burst_levels: int = 1
    burst_width: int = 0

    def __post_init__(self) -> None:
        if int(self.n) < 1:
            raise ValueError(f"schedule needs n >= 1, got {self.n}")
        if not 1 <= len(self.block_sizes) <= MAX_PASSES:
            raise ValueError(f"a schedule has 1 to {MAX_PASSES} passes, "
                             f"got {len(self.block_sizes)}")
        for k in self.block_sizes:
            if not 1 <= int(k) <= int(self.n):
                raise ValueError(f"block sizes must be in [1, n={self.n}], got {k}")
        object.__setattr__(self, "block_sizes", tuple(int(k) for k in self.block_sizes))
        for name, lo, hi in (("overlap", 0, MAX_BITS), ("burst_levels", 1, MAX_BURST_LEVELS),
                             ("burst_width", 0, MAX_BITS)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
            object.__setattr__(self, name, int(v))

    @property
    def passes(self) -> int:
        return len(self.block_sizes)


def default_passes(n: int) -> int:
    """Passes of the optimized schedules: ``ceil(log2 n) + 8``, 16 to 64.

    Errors left after the first two passes come in even groups that each later
    (half-key) pass splits with probability 1/2 at the cost of one parity; their
    number grows with n, so the passes grow with log2 n to keep the frame error
    rate near 1e-6.
    """
    return max(16, min(MAX_PASSES, math.ceil(math.log2(max(int(n), 2))) + 8))


def choose_schedule(n: int, qber: float, variant: str = "latency",
                    passes: int | None = None) -> CascadeSchedule:
    """The block sizes (and round rules) for ``n`` bits at estimated QBER ``qber``.

    ``"latency"`` (the default, for a link with a round-trip time): ``k1`` the
    largest power of two ``<= 1.2/p``, ``k2`` the largest power of two
    ``<= max(3/p, 128)``, at most ``8 k1``, then ``ceil(n/2)``;
    :func:`default_passes` passes; ``overlap = 0``,
    ``burst_levels = 4``, ``burst_width = floor(n p / 256)`` (see
    :class:`CascadeSchedule` and the module docstring for why).
    ``"optimized"`` (Martinez-Mateo et al., Cascade opt. (8)): ``alpha =
    log2(1/p) - 1/2``, ``k1 = 2**ceil(alpha)``, ``k2 = 2**ceil((alpha + 12)/2)``,
    then ``ceil(n/2)``; :func:`default_passes` passes. ``"opt7"`` (their opt. (7)):
    ``k1 = 2**ceil(log2(1/p))``, ``k2 = 4 k1``, then ``ceil(n/2)``. ``"original"``
    (Brassard-Salvail): ``k1 = ceil(0.73/p)``, doubling, 4 passes (their schedule;
    the search is still this module's, with reuse and inference). These three keep
    the classic round rules (sequential passes, one level per round). Block sizes
    are capped at ``n``. A larger ``k2`` lowers the leakage a little more but makes
    the cascades of the first two passes much longer, hence more rounds (the
    ``"optimized"`` ``k2`` is the leakage optimum for long keys).
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"key length must be >= 1, got {n}")
    p = _check_qber(qber)
    if variant not in VARIANTS:
        raise ValueError(f"unknown Cascade variant {variant!r}; choose one of {VARIANTS}")
    if passes is not None:
        npass = int(passes)
    elif variant == "original":
        npass = ORIGINAL_PASSES
    else:
        npass = default_passes(n)
    if not 1 <= npass <= MAX_PASSES:
        raise ValueError(f"passes must be in [1, {MAX_PASSES}], got {passes}")
    half = (n + 1) // 2
    rules = {}
    if variant == "original":
        k = math.ceil(0.73 / p)
        sizes = [k << i for i in range(npass)]
    else:
        if variant == "latency":
            k1 = 1 << math.floor(math.log2(1.2 / p))
            k2 = min(8 * k1, 1 << math.floor(math.log2(max(3.0 / p, 128.0))))
            errors = n * p
            rules = {"burst_levels": BURST_LEVELS, "burst_width": int(errors // BURST_WIDTH_DIV)}
        elif variant == "optimized":
            alpha = math.log2(1.0 / p) - 0.5
            k1 = 1 << math.ceil(alpha)
            k2 = 1 << math.ceil((alpha + 12.0) / 2.0)
        else:
            k1 = 1 << math.ceil(math.log2(1.0 / p))
            k2 = 4 * k1
        sizes = [k1, k2] + [half] * (npass - 2)
        sizes = sizes[:npass]
    return CascadeSchedule(n, tuple(min(int(k), n) for k in sizes), variant, **rules)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class CascadeStart:
    """Bob to Alice: start a run. Alice answers with a :class:`ParityReply` holding
    the parities of the top-level blocks of every pass, pass by pass, block by
    block, without the last block of passes after the first (inferred by Bob
    from the parity of the whole key). The round rules of the schedule come along
    so that both sides hold the same :class:`CascadeSchedule` (Alice checks them;
    she answers whatever ranges are asked)."""

    n: int
    block_sizes: np.ndarray       # int64, one per pass
    permutation_seed: int         # 0 <= seed < 2**64
    overlap: int = 0              # the round rules of the schedule (:class:`CascadeSchedule`)
    burst_levels: int = 1
    burst_width: int = 0


@dataclass(frozen=True)
class ParityRequest:
    """Bob to Alice: the parities of positions ``[start, end)`` of pass ``pass_index``."""

    pass_index: np.ndarray        # int32
    start: np.ndarray             # int64
    end: np.ndarray               # int64


@dataclass(frozen=True)
class ParityReply:
    """Alice to Bob: one parity bit per requested range, in request order."""

    parities: np.ndarray          # uint8, 0/1


@dataclass(frozen=True)
class CascadeResult:
    """Bob's outcome: his corrected key, the bits disclosed, and the exchange."""

    corrected: np.ndarray         # uint8
    leaked_bits: int              # parity bits Alice sent
    rounds: int                   # round trips (replies from Alice), the start included
    flipped: np.ndarray           # int64, sorted indices of the bits Bob flipped
    passes: int


# --------------------------------------------------------------------------- layouts


def _mix64_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"permutation_seed must be an integer, got {seed!r}")
    s = int(seed)
    if not 0 <= s <= _MASK64:
        raise ValueError(f"permutation_seed must be in [0, 2**64), got {seed}")
    return s


def pass_seeds(permutation_seed: int, passes: int) -> tuple[np.ndarray, np.uint64]:
    """The layout seed of every pass, ``mix64(seed + (q + 1) * GOLDEN)``, and the split
    key ``mix64(seed)``."""
    s = _check_seed(permutation_seed)
    seeds = np.array([_mix64_int(s + (q + 1) * _GOLDEN_INT) for q in range(passes)],
                     dtype=np.uint64)
    return seeds, np.uint64(_mix64_int(s))


def pass_kinds(schedule: CascadeSchedule) -> np.ndarray:
    """The layout kind of every pass (identity, shuffled, random split)."""
    n = schedule.n
    kinds = np.empty(schedule.passes, np.int64)
    for q, k in enumerate(schedule.block_sizes):
        if q == 0 or k >= n:
            kinds[q] = KIND_IDENTITY
        elif 2 * k >= n and n >= SPLIT_MIN_BITS:
            kinds[q] = KIND_SPLIT
        else:
            kinds[q] = KIND_SHUFFLED
    return kinds


@nb.njit(cache=True, nogil=True)
def _shuffle(a, s):
    """Fisher-Yates in place, from the top: draw c = 1, 2, ... is ``mix64(s + c * GOLDEN)``
    and swaps ``a[i]`` with ``a[j]``, ``j = (draw >> 32) * (i + 1) >> 32``, for i = n-1..1
    (multiply-shift: a bias below ``n / 2**32``, harmless for public permutations).
    The draws are made in chunks first (they vectorize), then the swaps."""
    chunk = 4096
    js = np.empty(chunk, np.int64)
    hi = a.size - 1
    c0 = np.uint64(0)
    while hi > 0:
        cnt = min(chunk, hi)
        for k in range(cnt):
            z = mix64(s + (c0 + np.uint64(k + 1)) * GOLDEN)
            js[k] = np.int64(((z >> _U32) * np.uint64(hi - k + 1)) >> _U32)
        for k in range(cnt):
            i = hi - k
            j = js[k]
            t = a[i]
            a[i] = a[j]
            a[j] = t
        c0 += np.uint64(cnt)
        hi -= cnt


@nb.njit(cache=True, nogil=True)
def _shuffled_kernel(s, out):
    for i in range(out.size):
        out[i] = i
    _shuffle(out, s)


@nb.njit(cache=True, nogil=True)
def _split_parities_kernel(key, skey):
    """Bit q of the result: parity of the first block of split pass q (every q at once)."""
    acc = np.uint64(0)
    zero = np.uint64(0)
    for i in range(key.size):
        acc ^= ~hash_index(skey, i) & (zero - np.uint64(key[i]))
    return acc


@nb.njit(cache=True, nogil=True)
def _split_size_kernel(n, skey, q):
    """Size of the first block of split pass ``q``."""
    sh = np.uint64(q)
    ones = 0
    for i in range(n):
        ones += np.int64((hash_index(skey, i) >> sh) & _U1)
    return n - ones


@nb.njit(cache=True, nogil=True)
def _split_block_kernel(n, skey, q, s, b, out):
    """Writes into ``out`` the key indices of block ``b`` of split pass ``q``, in pass
    order: ascending, then shuffled with ``mix64(s ^ (b + 1))``."""
    sh = np.uint64(q)
    keep = np.empty(n, np.uint8)
    for i in range(n):
        bit = np.int64((hash_index(skey, i) >> sh) & _U1)
        keep[i] = 1 - (bit ^ b)
    size = out.size
    k = 0
    for i in range(n):
        if k == size:
            break
        out[k] = i
        k += keep[i]
    _shuffle(out, mix64(s ^ np.uint64(b + 1)))


def pass_layout(schedule: CascadeSchedule, permutation_seed: int, q: int
                ) -> tuple[np.ndarray, int]:
    """``(elem, m)`` of pass ``q``: ``elem[position]`` is the key index at that position,
    ``m`` the size of the first block of a split pass (-1 otherwise)."""
    n = schedule.n
    kind = int(pass_kinds(schedule)[q])
    seeds, skey = pass_seeds(permutation_seed, schedule.passes)
    elem = np.arange(n, dtype=np.int32)
    if kind == KIND_SPLIT:
        m = int(_split_size_kernel(n, skey, q))
        _split_block_kernel(n, skey, q, seeds[q], 0, elem[:m])
        _split_block_kernel(n, skey, q, seeds[q], 1, elem[m:])
        return elem, m
    if kind == KIND_SHUFFLED:
        _shuffled_kernel(seeds[q], elem)
    return elem, -1


def _block_bounds(n: int, k: int) -> np.ndarray:
    return np.append(np.arange(0, n, k, dtype=np.int64), np.int64(n))


@nb.njit(cache=True, nogil=True)
def _xor_range(row, a, b):
    """Parity of ``row[a:b]`` (uint8 0/1), eight bytes at a time."""
    acc = np.uint64(0)
    j = a
    while j < b and (j & 7) != 0:
        acc ^= np.uint64(row[j])
        j += 1
    e8 = b & ~7
    if j < e8:
        w = row[j:e8].view(np.uint64)
        for i in range(w.size):
            acc ^= w[i]
        j = e8
    while j < b:
        acc ^= np.uint64(row[j])
        j += 1
    acc ^= acc >> np.uint64(32)
    acc ^= acc >> np.uint64(16)
    acc ^= acc >> np.uint64(8)
    return np.int64(acc & _U1)


@nb.njit(cache=True, nogil=True)
def _block_parity_kernel(row, bounds):
    out = np.empty(bounds.size - 1, np.uint8)
    for b in range(bounds.size - 1):
        out[b] = _xor_range(row, bounds[b], bounds[b + 1])
    return out


def _as_key(key: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(key)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of bits, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if a.size >= MAX_BITS:
        raise ValueError(f"{name} has {a.size} bits; at most {MAX_BITS - 1} are supported")
    if a.dtype != np.bool_ and a.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers 0/1, got dtype {a.dtype}")
    if a.dtype != np.bool_ and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{name} must hold only 0 and 1 "
                         f"(found values in [{a.min()}, {a.max()}])")
    return np.ascontiguousarray(a, dtype=np.uint8)


def _int_array(x, name: str) -> np.ndarray:
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.ndim != 1 or not (a.size == 0 or a.dtype.kind in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array")
    return a if a.dtype == np.int64 else a.astype(np.int64)


# --------------------------------------------------------------------------- Alice


@nb.njit(cache=True, nogil=True)
def _prefix_kernel(key, elem, out, off, acc0):
    """``out[off + j] = acc0 ^ XOR of key[elem[0..j)]`` for j = 0..len(elem)."""
    acc = np.uint8(acc0)
    out[off] = acc
    for j in range(elem.size):
        acc ^= key[elem[j]]
        out[off + j + 1] = acc


@nb.njit(cache=True, nogil=True)
def _answer_kernel(prefix, q, a, b, n, kind, msplit, ordered, need):
    """Alice's parities of the ranges; code 1: bad pass, 2: bad range, 3: a split block
    to lay out first (marked in ``need``, -1 where its size is not known yet)."""
    npass = kind.size
    out = np.empty(q.size, np.uint8)
    code = 0
    for i in range(q.size):
        p = q[i]
        if p < 0 or p >= npass:
            return 1, out
        if a[i] < 0 or b[i] > n or a[i] >= b[i]:
            return 2, out
        if kind[p] == KIND_SPLIT:
            m = msplit[p]
            if m < 0:
                need[p, 0] = -1
                code = 3
            else:
                if a[i] < m and ordered[p, 0] == 0:
                    need[p, 0] = 1
                    code = 3
                if b[i] > m and ordered[p, 1] == 0:
                    need[p, 1] = 1
                    code = 3
        if code == 0:
            out[i] = prefix[p, b[i]] ^ prefix[p, a[i]]
    return code, out


class CascadeAlice:
    """Alice's side: answers parity requests over ranges of her fixed key.

    Every pass's prefix-XOR array gives any range parity in O(1) (the blocks of
    a split pass are laid out the first time a request enters them). She counts
    every parity bit she sends in :attr:`leaked_bits`.
    """

    def __init__(self, key: np.ndarray):
        self.key = _as_key(key, "Alice's key")
        self.n = int(self.key.size)
        self.leaked_bits = 0
        self.replies = 0
        self._prefix: np.ndarray | None = None

    def handle(self, msg: CascadeStart | ParityRequest) -> ParityReply:
        """Answer one message from Bob."""
        if isinstance(msg, CascadeStart):
            reply = self._start(msg)
        elif isinstance(msg, ParityRequest):
            reply = self._answer(msg)
        else:
            raise TypeError(f"Alice cannot handle a {type(msg).__name__}")
        self.leaked_bits += int(reply.parities.size)
        self.replies += 1
        return reply

    def _start(self, msg: CascadeStart) -> ParityReply:
        if int(msg.n) != self.n:
            raise ValueError(f"Bob's key has {msg.n} bits, Alice's {self.n}: "
                             "keys of different lengths")
        sizes = _int_array(msg.block_sizes, "block_sizes")
        sched = CascadeSchedule(self.n, tuple(int(k) for k in sizes), overlap=msg.overlap,
                                burst_levels=msg.burst_levels, burst_width=msg.burst_width)
        n, npass = self.n, sched.passes
        self._kind = pass_kinds(sched)
        self._seeds, self._skey = pass_seeds(msg.permutation_seed, npass)
        self._msplit = np.full(npass, -1, np.int64)
        self._ordered = np.zeros((npass, 2), np.uint8)
        self._prefix = np.empty((npass, n + 1), np.uint8)
        self._need = np.zeros((npass, 2), np.int64)
        self._sacc = int(_split_parities_kernel(self.key, self._skey))
        out = []
        for q in range(npass):
            kind = int(self._kind[q])
            if kind == KIND_SPLIT:
                out.append(np.array([(self._sacc >> q) & 1], np.uint8))  # last block inferred
                continue
            elem = np.arange(n, dtype=np.int32)
            if kind == KIND_SHUFFLED:
                _shuffled_kernel(self._seeds[q], elem)
            _prefix_kernel(self.key, elem, self._prefix[q], 0, 0)
            self._ordered[q] = 1
            bounds = _block_bounds(n, int(sizes[q]))
            pre = self._prefix[q]
            pars = pre[bounds[1:]] ^ pre[bounds[:-1]]
            out.append(pars if q == 0 else pars[:-1])
        return ParityReply(np.concatenate(out).astype(np.uint8))

    def _lay_out_split(self, q: int, b: int) -> None:
        n, m = self.n, int(self._msplit[q])
        off, size = (0, m) if b == 0 else (m, n - m)
        elem = np.empty(size, np.int32)
        _split_block_kernel(n, self._skey, q, self._seeds[q], b, elem)
        _prefix_kernel(self.key, elem, self._prefix[q], off,
                       0 if b == 0 else (self._sacc >> q) & 1)
        self._ordered[q, b] = 1

    def _answer(self, msg: ParityRequest) -> ParityReply:
        if self._prefix is None:
            raise ValueError("parity request before CascadeStart")
        q = _int_array(msg.pass_index, "pass_index")
        a = _int_array(msg.start, "start")
        b = _int_array(msg.end, "end")
        if not q.size == a.size == b.size:
            raise ValueError("a parity request needs three arrays of one length")
        need = self._need
        while True:
            code, out = _answer_kernel(self._prefix, q, a, b, self.n, self._kind,
                                       self._msplit, self._ordered, need)
            if code == 1:
                raise ValueError("parity request for a pass outside the schedule")
            if code == 2:
                raise ValueError("parity request ranges must satisfy "
                                 f"0 <= start < end <= {self.n}")
            if code == 0:
                return ParityReply(out)
            for p, blk in zip(*np.nonzero(need), strict=True):
                if need[p, blk] < 0:
                    self._msplit[p] = _split_size_kernel(self.n, self._skey, int(p))
                else:
                    self._lay_out_split(int(p), int(blk))
            need[:] = 0


# --------------------------------------------------------------------------- Bob kernels


@nb.njit(cache=True, nogil=True)
def _order_kernel(key, elem_row, pos_row, bk_row, off, size):
    """Bob's view of positions ``[off, off + size)`` of a pass, whose bits are
    ``elem_row[off:off + size]``: where each bit sits, and his bits in pass order."""
    for j in range(off, off + size):
        x = elem_row[j]
        pos_row[x] = j
        bk_row[j] = key[x]


@nb.njit(cache=True, nogil=True)
def _push(nd, pend, inpend, cnt):
    if inpend[nd] == 0:
        inpend[nd] = 1
        pend[cnt[1]] = nd
        cnt[1] += 1


@nb.njit(cache=True, nogil=True)
def _elem_at(q, p, kind, elem2d):
    return p if kind[q] == KIND_IDENTITY else elem2d[q, p]


@nb.njit(cache=True, nogil=True)
def _split_bounds(q, n, skey, msplit, root_base, nstart, nend):
    """The size of split pass ``q``'s first block, computed the first time it is needed."""
    if msplit[q] < 0:
        m = _split_size_kernel(n, skey, q)
        msplit[q] = m
        nend[root_base[q]] = m
        nstart[root_base[q] + 1] = m


@nb.njit(cache=True, nogil=True)
def _flip(x, key, flipped, cnt, kind, ksz, msplit, skey, sacc, ordered, root_base,
          pos2d, bk2d, nstart, nend, nleft, ne, pend, inpend):
    """Bob flips bit ``x``: toggle the error parity of every known range holding it."""
    key[x] ^= 1
    flipped[cnt[2]] = x
    cnt[2] += 1
    cur = cnt[3]
    h = hash_index(skey, x)
    sacc[0] ^= ~h                     # block-0 parities of the split passes
    for q in range(kind.size):
        k = kind[q]
        if k == KIND_SPLIT:
            if q > cur:
                continue              # laid out from Bob's key when the pass starts
            blk = np.int64((h >> np.uint64(q)) & _U1)
            nd = root_base[q] + blk
            ne[nd] ^= 1
            if ne[nd] == 1:
                _split_bounds(q, key.size, skey, msplit, root_base, nstart, nend)
            p = 0                     # a block not laid out has no known sub-ranges
            if ordered[q, blk] != 0:
                p = pos2d[q, x]
                bk2d[q, p] ^= 1
        else:
            p = x if k == KIND_IDENTITY else pos2d[q, x]
            bk2d[q, p] ^= 1
            nd = root_base[q] + p // ksz[q]
            ne[nd] ^= 1
        while nleft[nd] >= 0:
            c = nleft[nd]
            nd = c if p < nend[c] else c + 1
            ne[nd] ^= 1
        if q <= cur and ne[nd] == 1 and nend[nd] - nstart[nd] >= 2:
            _push(nd, pend, inpend, cnt)


@nb.njit(cache=True, nogil=True)
def _expand(nd, ap, key, flipped, cnt, kind, ksz, msplit, skey, sacc, ordered, root_base,
            elem2d, pos2d, bk2d, npass, nstart, nend, nleft, ne, pend, inpend):
    """Range ``nd`` gets its halves, from Alice's parity ``ap`` of the left one; a
    one-bit half that is odd is flipped, a longer one joins the search."""
    q = npass[nd]
    s = nstart[nd]
    t = nend[nd]
    mid = s + (t - s) // 2
    el = np.uint8(ap ^ _xor_range(bk2d[q], s, mid))
    er = ne[nd] ^ el
    c = cnt[0]
    cnt[0] += 2
    npass[c] = q
    nstart[c] = s
    nend[c] = mid
    nleft[c] = -1
    ne[c] = el
    inpend[c] = 0
    npass[c + 1] = q
    nstart[c + 1] = mid
    nend[c + 1] = t
    nleft[c + 1] = -1
    ne[c + 1] = er
    inpend[c + 1] = 0
    nleft[nd] = c
    for j in (c, c + 1):
        if ne[j] == 1:
            if nend[j] - nstart[j] == 1:
                _flip(_elem_at(q, nstart[j], kind, elem2d), key, flipped, cnt, kind, ksz,
                      msplit, skey, sacc, ordered, root_base, pos2d, bk2d, nstart, nend,
                      nleft, ne, pend, inpend)
            else:
                _push(j, pend, inpend, cnt)


@nb.njit(cache=True, nogil=True)
def _process_kernel(ids, levels, apar, key, flipped, cnt, kind, ksz, msplit, skey, sacc,
                    ordered, root_base, elem2d, pos2d, bk2d, npass, nstart, nend, nleft, ne,
                    pend, inpend):
    """Bob takes Alice's parities of the left halves of the ranges ``ids`` and, with
    ``levels > 1``, of their sub-ranges of at least two bits down to ``levels``
    levels, in the order of :func:`_request_kernel` (each range's sub-tree in
    pre-order: a range, then its left half's sub-tree, then its right half's).

    Returns -1 if a parity is not 0/1 (nothing is changed then), else 0."""
    for r in range(apar.size):
        if apar[r] > 1:
            return -1
    stk = np.empty(levels + 1, np.int64)
    dep = np.empty(levels + 1, np.int64)
    i = 0
    for r in range(ids.size):
        stk[0] = ids[r]
        dep[0] = 0
        top = 1
        while top > 0:
            top -= 1
            nd = stk[top]
            d = dep[top]
            _expand(nd, apar[i], key, flipped, cnt, kind, ksz, msplit, skey, sacc, ordered,
                    root_base, elem2d, pos2d, bk2d, npass, nstart, nend, nleft, ne, pend,
                    inpend)
            i += 1
            if d + 1 < levels:
                c = np.int64(nleft[nd])
                for j in (c + 1, c):          # the left half's sub-tree comes first
                    if nend[j] - nstart[j] >= 2:
                        stk[top] = j
                        dep[top] = d + 1
                        top += 1
    return 0


@nb.njit(cache=True, nogil=True)
def _request_kernel(qs, st, en, levels):
    """The ranges a round asks, in order: for each range ``[st, en)`` of pass ``qs``,
    the left halves of its sub-tree of ranges of at least two bits, ``levels`` deep,
    in pre-order. Returns (pass, start, end) arrays."""
    cap = qs.size * ((1 << levels) - 1)
    oq = np.empty(cap, np.int32)
    os_ = np.empty(cap, np.int64)
    oe = np.empty(cap, np.int64)
    sa = np.empty(levels + 1, np.int64)
    sb = np.empty(levels + 1, np.int64)
    dep = np.empty(levels + 1, np.int64)
    k = 0
    for r in range(qs.size):
        sa[0] = st[r]
        sb[0] = en[r]
        dep[0] = 0
        top = 1
        while top > 0:
            top -= 1
            a = sa[top]
            b = sb[top]
            d = dep[top]
            mid = a + (b - a) // 2
            oq[k] = qs[r]
            os_[k] = a
            oe[k] = mid
            k += 1
            if d + 1 < levels:
                if b - mid >= 2:
                    sa[top] = mid
                    sb[top] = b
                    dep[top] = d + 1
                    top += 1
                if mid - a >= 2:
                    sa[top] = a
                    sb[top] = mid
                    dep[top] = d + 1
                    top += 1
    return oq[:k], os_[:k], oe[:k]


@nb.njit(cache=True, nogil=True)
def _count_search_kernel(pend, cnt, ne, nleft):
    """How many ranges the next round would search (odd, halves unknown)."""
    c = 0
    for i in range(cnt[1]):
        nd = pend[i]
        if ne[nd] == 1 and nleft[nd] < 0:
            c += 1
    return c


def burst_depth(ranges: int, burst_levels: int, burst_width: int) -> int:
    """Levels a round searching ``ranges`` ranges asks at once (see
    :class:`CascadeSchedule`)."""
    m = 1
    while m < burst_levels and ranges * ((2 << m) - 1) <= burst_width:
        m += 1
    return m


@nb.njit(cache=True, nogil=True)
def _start_pass_kernel(q, key, flipped, cnt, kind, ksz, msplit, skey, sacc, ordered,
                       root_base, elem2d, pos2d, bk2d, nstart, nend, nleft, ne, pend, inpend):
    """Pass ``q`` becomes current: its odd blocks join the search.

    Returns 1, changing nothing, if an odd block of a split pass has one bit and
    the pass is not laid out yet (Bob lays it out and calls again), else 0."""
    if kind[q] == KIND_SPLIT:
        r = root_base[q]
        if ne[r] == 1 or ne[r + 1] == 1:
            _split_bounds(q, key.size, skey, msplit, root_base, nstart, nend)
            for nd in (r, r + 1):
                if ne[nd] == 1 and nend[nd] - nstart[nd] == 1 and ordered[q, nd - r] == 0:
                    return 1
    cnt[3] = q
    for nd in range(root_base[q], root_base[q + 1]):
        if ne[nd] == 1:
            if nend[nd] - nstart[nd] == 1:
                _flip(_elem_at(q, nstart[nd], kind, elem2d), key, flipped, cnt, kind, ksz,
                      msplit, skey, sacc, ordered, root_base, pos2d, bk2d, nstart, nend,
                      nleft, ne, pend, inpend)
            else:
                _push(nd, pend, inpend, cnt)
    return 0


@nb.njit(cache=True, nogil=True)
def _collect_kernel(pend, inpend, cnt, ne, nleft, nstart, nend, npass, n, kind, msplit,
                    ordered, need):
    """The ranges to search next (odd, halves unknown), sorted by (pass, start).

    Returns (node ids, pass, start, middle); marks in ``need`` the split blocks
    Bob must lay out before the reply comes back."""
    m = cnt[1]
    sel = np.empty(m, np.int64)
    k = 0
    for i in range(m):
        nd = pend[i]
        inpend[nd] = 0
        if ne[nd] == 1 and nleft[nd] < 0:
            sel[k] = nd
            k += 1
    cnt[1] = 0
    sel = sel[:k]
    key = np.empty(k, np.int64)
    for i in range(k):
        key[i] = npass[sel[i]] * (n + 1) + nstart[sel[i]]
    sel = sel[np.argsort(key)]
    qs = np.empty(k, np.int32)
    st = np.empty(k, np.int64)
    mid = np.empty(k, np.int64)
    for i in range(k):
        nd = sel[i]
        q = npass[nd]
        qs[i] = q
        st[i] = nstart[nd]
        mid[i] = nstart[nd] + (nend[nd] - nstart[nd]) // 2
        if kind[q] == KIND_SPLIT:
            blk = 0 if nstart[nd] < msplit[q] else 1
            if ordered[q, blk] == 0:
                need[q, blk] = 1
    return sel, qs, st, mid


# --------------------------------------------------------------------------- Bob


class CascadeBob:
    """Bob's side: drives the exchange and corrects his key.

    ``start()`` gives the :class:`CascadeStart` for Alice; then each call of
    ``next_request(reply)`` takes Alice's last :class:`ParityReply` and returns
    the next :class:`ParityRequest`, or ``None`` when Cascade is finished, after
    which ``result()`` gives the :class:`CascadeResult`. ``leaked_bits`` counts
    the parities in Alice's replies (Bob's requests are not counted: they are
    functions of public data and of Bob's key, not of Alice's).
    """

    def __init__(self, key: np.ndarray, qber_estimate: float, permutation_seed: int,
                 schedule: CascadeSchedule | None = None):
        self.key = _as_key(key, "Bob's key").copy()
        self.n = n = int(self.key.size)
        self.qber_estimate = _check_qber(qber_estimate)
        self.permutation_seed = _check_seed(permutation_seed)
        if schedule is None:
            schedule = choose_schedule(n, self.qber_estimate)
        if not isinstance(schedule, CascadeSchedule):
            raise TypeError(f"schedule must be a CascadeSchedule, got {type(schedule).__name__}")
        if schedule.n != n:
            raise ValueError(f"schedule is for {schedule.n} bits, the key has {n}")
        self.schedule = schedule
        self.leaked_bits = 0
        self.rounds = 0
        self._state = "new"
        self._ids = np.empty(0, np.int64)
        self._levels = 1
        self._asked = 0

    # -- setup
    def start(self) -> CascadeStart:
        """Lay out the passes (but the splits) and compute Bob's top-level parities."""
        if self._state != "new":
            raise RuntimeError("start() was already called")
        n, sched = self.n, self.schedule
        npass = sched.passes
        self._kind = pass_kinds(sched)
        self._seeds, self._skey = pass_seeds(self.permutation_seed, npass)
        self._ksz = np.array(sched.block_sizes, np.int64)
        self._msplit = np.full(npass, -1, np.int64)
        self._ordered = np.zeros((npass, 2), np.uint8)
        self._elem2d = np.empty((npass, n), np.int32)
        self._pos2d = np.empty((npass, n), np.int32)
        self._bk2d = np.empty((npass, n), np.uint8)
        self._sacc = np.array([_split_parities_kernel(self.key, self._skey)], np.uint64)
        self._alice_split = np.zeros((npass, 2), np.uint8)
        bounds, bob_par = [], []
        for q in range(npass):
            kind = int(self._kind[q])
            if kind == KIND_SPLIT:
                # the split point is found when a block is odd (a flip before the
                # pass starts does not touch it)
                b = np.array([0, -1, n], np.int64)
                pars = np.zeros(2, np.uint8)
            else:
                if kind == KIND_IDENTITY:
                    self._bk2d[q] = self.key
                else:
                    _shuffled_kernel(self._seeds[q], self._elem2d[q])
                    _order_kernel(self.key, self._elem2d[q], self._pos2d[q], self._bk2d[q],
                                  0, n)
                self._ordered[q] = 1
                b = _block_bounds(n, int(self._ksz[q]))
                pars = _block_parity_kernel(self._bk2d[q], b)
            bounds.append(b)
            bob_par.append(pars)
        nblocks = np.array([b.size - 1 for b in bounds], np.int64)
        self._root_base = np.concatenate([[0], np.cumsum(nblocks)]).astype(np.int64)
        nroots = int(self._root_base[-1])
        cap = max(1024, 2 * nroots + 64)
        self._npass = np.empty(cap, np.int32)
        self._nstart = np.empty(cap, np.int64)
        self._nend = np.empty(cap, np.int64)
        self._nleft = np.full(cap, -1, np.int32)
        self._ne = np.zeros(cap, np.uint8)
        self._inpend = np.zeros(cap, np.uint8)
        self._pend = np.empty(cap, np.int64)
        for q in range(npass):
            sl = slice(self._root_base[q], self._root_base[q + 1])
            self._npass[sl] = q
            self._nstart[sl] = bounds[q][:-1]
            self._nend[sl] = bounds[q][1:]
        self._bob_par = bob_par
        self._nblocks = nblocks
        self._need = np.zeros((npass, 2), np.uint8)
        self._flipped = np.empty(n, np.int64)
        # counters: nodes used, pending, flips, current pass
        self._cnt = np.array([nroots, 0, 0, -1], np.int64)
        self._state = "started"
        return CascadeStart(n=n, block_sizes=np.array(sched.block_sizes, np.int64),
                            permutation_seed=self.permutation_seed, overlap=sched.overlap,
                            burst_levels=sched.burst_levels, burst_width=sched.burst_width)

    def _split_parities(self, q: int) -> None:
        """Split pass ``q`` starts: Bob's error parities of its blocks, from his key now
        (the block sizes are computed by the kernels if a block is odd)."""
        par0 = (int(self._sacc[0]) >> q) & 1
        par1 = par0 ^ int(_xor_range(self.key, 0, self.n))
        r = int(self._root_base[q])
        self._ne[r] = self._alice_split[q, 0] ^ par0
        self._ne[r + 1] = self._alice_split[q, 1] ^ par1

    def _order_split(self, q: int, b: int) -> None:
        n, m = self.n, int(self._msplit[q])
        off, size = (0, m) if b == 0 else (m, n - m)
        _split_block_kernel(n, self._skey, q, self._seeds[q], b,
                            self._elem2d[q, off:off + size])
        _order_kernel(self.key, self._elem2d[q], self._pos2d[q], self._bk2d[q], off, size)
        self._ordered[q, b] = 1

    # -- rounds
    def next_request(self, reply: ParityReply) -> ParityRequest | None:
        """Take Alice's reply to the last message; the next request, or None when done."""
        if not isinstance(reply, ParityReply):
            raise TypeError(f"expected a ParityReply, got {type(reply).__name__}")
        par = reply.parities
        if not isinstance(par, np.ndarray) or par.ndim != 1 or par.dtype.kind not in "iub":
            raise ValueError("Alice's reply must be a 1-D integer array of parities")
        if par.dtype != np.uint8:      # uint8 values are checked by the kernels
            if par.size and (par.min() < 0 or par.max() > 1):
                raise ValueError("Alice's reply holds values other than 0 and 1")
            par = par.astype(np.uint8)
        if self._state == "started":
            self._take_top_level(par)
        elif self._state == "searching":
            self._take_search(par)
        elif self._state == "done":
            raise RuntimeError("Cascade is finished; call result()")
        else:
            raise RuntimeError("call start() first")
        self.rounds += 1
        self.leaked_bits += int(par.size)
        return self._next()

    def _take_top_level(self, par: np.ndarray) -> None:
        nb_ = self._nblocks
        expected = int(nb_[0] + np.sum(nb_[1:] - 1))
        if par.size != expected:
            raise ValueError(f"Alice's reply has {par.size} parities, {expected} were asked")
        if par.size and par.max() > 1:
            raise ValueError("Alice's reply holds values other than 0 and 1")
        total = int(np.bitwise_xor.reduce(par[:nb_[0]]))
        off = 0
        for q in range(self.schedule.passes):
            cnt = int(nb_[q]) if q == 0 else int(nb_[q]) - 1
            a = par[off:off + cnt]
            off += cnt
            if q > 0:
                a = np.append(a, np.uint8(total ^ int(np.bitwise_xor.reduce(a))))
            if self._kind[q] == KIND_SPLIT:
                self._alice_split[q] = a
            else:
                sl = slice(self._root_base[q], self._root_base[q + 1])
                self._ne[sl] = a ^ self._bob_par[q]
        del self._bob_par
        self._state = "searching"

    def _take_search(self, par: np.ndarray) -> None:
        if par.size != self._asked:
            raise ValueError(f"Alice's reply has {par.size} parities, {self._asked} were asked")
        need = int(self._cnt[0]) + 2 * self._asked
        if need > self._ne.size:
            self._grow(need)
        code = _process_kernel(self._ids, self._levels, par, self.key, self._flipped,
                               self._cnt, self._kind, self._ksz, self._msplit, self._skey,
                               self._sacc, self._ordered, self._root_base, self._elem2d,
                               self._pos2d, self._bk2d, self._npass, self._nstart, self._nend,
                               self._nleft, self._ne, self._pend, self._inpend)
        if code < 0:
            raise ValueError("Alice's reply holds values other than 0 and 1")

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self._ne.size)
        extra = cap - self._ne.size
        self._npass = np.concatenate([self._npass, np.empty(extra, np.int32)])
        self._nstart = np.concatenate([self._nstart, np.empty(extra, np.int64)])
        self._nend = np.concatenate([self._nend, np.empty(extra, np.int64)])
        self._nleft = np.concatenate([self._nleft, np.full(extra, -1, np.int32)])
        self._ne = np.concatenate([self._ne, np.zeros(extra, np.uint8)])
        self._inpend = np.concatenate([self._inpend, np.zeros(extra, np.uint8)])
        self._pend = np.concatenate([self._pend, np.empty(extra, np.int64)])

    def _start_pass(self, q: int) -> None:
        """Pass ``q`` starts: its odd blocks join the search."""
        if self._kind[q] == KIND_SPLIT:
            self._split_parities(q)
        while _start_pass_kernel(q, self.key, self._flipped, self._cnt, self._kind,
                                 self._ksz, self._msplit, self._skey, self._sacc,
                                 self._ordered, self._root_base, self._elem2d, self._pos2d,
                                 self._bk2d, self._nstart, self._nend, self._nleft,
                                 self._ne, self._pend, self._inpend):
            self._order_split(q, 0)       # a one-bit block of a split pass is odd
            self._order_split(q, 1)

    def _next(self) -> ParityRequest | None:
        sched = self.schedule
        while True:
            if sched.overlap > 0:
                # the next pass starts while at most `overlap` ranges are left to search
                while int(self._cnt[3]) + 1 < sched.passes:
                    left = _count_search_kernel(self._pend, self._cnt, self._ne, self._nleft)
                    if left == 0 or left > sched.overlap:
                        break
                    self._start_pass(int(self._cnt[3]) + 1)
            ids, qs, st, mid = _collect_kernel(self._pend, self._inpend, self._cnt, self._ne,
                                               self._nleft, self._nstart, self._nend,
                                               self._npass, self.n, self._kind, self._msplit,
                                               self._ordered, self._need)
            if ids.size:
                break
            q = int(self._cnt[3]) + 1
            if q >= sched.passes:
                self._state = "done"
                self._ids = ids
                self._asked = 0
                return None
            self._start_pass(q)
        if self._need.any():
            for p, blk in zip(*np.nonzero(self._need), strict=True):
                self._order_split(int(p), int(blk))
            self._need[:] = 0
        self._ids = ids
        self._levels = m = burst_depth(ids.size, sched.burst_levels, sched.burst_width)
        if m > 1:
            qs, st, mid = _request_kernel(qs, st, self._nend[ids], m)
        self._asked = int(st.size)
        return ParityRequest(pass_index=qs, start=st, end=mid)

    def result(self) -> CascadeResult:
        """The outcome, once :meth:`next_request` has returned None."""
        if self._state != "done":
            raise RuntimeError("Cascade is not finished")
        flipped = np.sort(self._flipped[:int(self._cnt[2])])
        return CascadeResult(corrected=self.key.copy(), leaked_bits=self.leaked_bits,
                             rounds=self.rounds, flipped=flipped,
                             passes=self.schedule.passes)


# --------------------------------------------------------------------------- in-process


def reconcile(alice_key: np.ndarray, bob_key: np.ndarray, qber_estimate: float,
              permutation_seed: int, schedule: CascadeSchedule | None = None
              ) -> CascadeResult:
    """Run both roles in one process, passing the messages between them."""
    a = _as_key(alice_key, "Alice's key")
    b = _as_key(bob_key, "Bob's key")
    if a.size != b.size:
        raise ValueError(f"keys of different lengths: Alice {a.size}, Bob {b.size}")
    alice = CascadeAlice(a)
    bob = CascadeBob(b, qber_estimate, permutation_seed, schedule)
    msg = bob.start()
    while msg is not None:
        msg = bob.next_request(alice.handle(msg))
    res = bob.result()
    if res.leaked_bits != alice.leaked_bits:
        raise RuntimeError("Alice and Bob disagree on the number of disclosed parities")
    return res
