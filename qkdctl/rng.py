"""Counter-based random numbers for numba kernels (SplitMix64).

A stream is a 64-bit counter; value i of the stream keyed ``k`` is
``mix64(k + i * GOLDEN)``. This gives any draw in O(1) from its index, which
is what Alice's per-pulse choices need (the state of pulse n without storing
pulses 0..n-1), and it lets every random process of the simulator own its
own stream, so that results do not depend on how the work is cut into chunks.
SplitMix64 (Steele, Lea, Flood, OOPSLA 2014) passes BigCrush as a sequence.
"""

from __future__ import annotations

import hashlib
import math
from statistics import NormalDist

import numba as nb
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53


@nb.njit(cache=True, inline="always")
def mix64(z):
    """SplitMix64 finaliser: a bijective 64-bit mix."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@nb.njit(cache=True, inline="always")
def hash_index(key, i):
    """Value ``i`` of the stream keyed ``key`` (both uint64-convertible)."""
    return mix64(np.uint64(key) + np.uint64(i) * GOLDEN)


@nb.njit(cache=True, inline="always")
def next_u64(state):
    """Advance ``state`` (a uint64[1] array, the stream's counter) and return a draw."""
    state[0] += GOLDEN
    return mix64(state[0])


@nb.njit(cache=True, inline="always")
def uniform_at(ctr):
    """Advance a stream counter held in a local variable: (draw in (0, 1], new counter).

    The same values as :func:`next_uniform`, without a round trip through memory
    for the counter, for the hottest loops.
    """
    ctr = ctr + GOLDEN
    return (np.float64(mix64(ctr) >> _S11) + 1.0) * _INV53, ctr


@nb.njit(cache=True, inline="always")
def next_uniform(state):
    """A double in (0, 1]: never 0, so that log() is always finite."""
    return (np.float64(next_u64(state) >> _S11) + 1.0) * _INV53


_NCELLS = 4096
# Quantiles of the standard normal law at i/_NCELLS, i = 0.._NCELLS (ends unused).
_NORMAL_Q = np.array([0.0] + [NormalDist().inv_cdf(i / _NCELLS) for i in range(1, _NCELLS)]
                     + [0.0])
_TAIL = float(_NORMAL_Q[_NCELLS - 1])


@nb.njit(cache=True)
def _normal_tail(state):
    """|x| given |x| > _TAIL, exactly (Marsaglia 1964)."""
    while True:
        x = -math.log(next_uniform(state)) / _TAIL
        y = -math.log(next_uniform(state))
        if 2.0 * y > x * x:
            return _TAIL + x


@nb.njit(cache=True, inline="always")
def next_normal(state):
    """Standard normal draw by inverse CDF.

    Each of the 4096 equal-probability cells of the law is sampled uniformly
    between its exact quantiles (so every cell has its exact probability and
    quantiles are exact at the cell edges; inside a cell the deviation from
    the normal quantile function is below 2e-3 sigma); the two outer cells are
    sampled exactly with Marsaglia's tail method.
    """
    x = next_uniform(state) * _NCELLS
    i = int(x)
    if 1 <= i < _NCELLS - 1:
        return _NORMAL_Q[i] + (x - i) * (_NORMAL_Q[i + 1] - _NORMAL_Q[i])
    t = _normal_tail(state)
    return -t if i == 0 else t


@nb.njit(cache=True, inline="always")
def normal_clipped_at(ctr, clip):
    """:func:`next_normal_clipped` on a counter held in a local variable."""
    while True:
        u, ctr = uniform_at(ctr)
        x = u * _NCELLS
        i = int(x)
        if 1 <= i < _NCELLS - 1:
            z = _NORMAL_Q[i] + (x - i) * (_NORMAL_Q[i + 1] - _NORMAL_Q[i])
        else:
            st = np.empty(1, np.uint64)
            st[0] = ctr
            z = _normal_tail(st)
            ctr = st[0]
            if i == 0:
                z = -z
        if -clip <= z <= clip:
            return z, ctr


@nb.njit(cache=True, inline="always")
def next_normal_clipped(state, clip):
    """Standard normal draw, redrawn until |x| <= clip."""
    while True:
        x = next_normal(state)
        if -clip <= x <= clip:
            return x


def derive_key(seed: int, label: str) -> int:
    """A 64-bit key for the named stream of a run with the given seed."""
    h = hashlib.blake2b(f"{int(seed)}:{label}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def role_seed(seed: int, role: str) -> int:
    """The seed of one role's own random choices, derived one-way from the run's seed.

    On the simulated bench Bob's process is given only ``role_seed(seed, "bob")``
    (his multi-click choices, his side of distillation): from it he cannot
    compute Alice's sequence key ``derive_key(seed, "alice")``. ``qkdctl run``
    derives Bob's seed the same way, so that one process and two give the same
    key.
    """
    return derive_key(seed, f"role {role}") & ((1 << 63) - 1)
