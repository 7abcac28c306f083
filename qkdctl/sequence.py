"""Alice's per-pulse choices: basis, bit value and intensity class.

Each pulse's choice is one ``uint8`` code::

    bit 0     bit value (0 or 1)
    bit 1     basis (0 = Z, 1 = X)
    bits 2-3  intensity class (0 = strongest, as listed in the bench file)

A sequence is either a *stream* (every pulse drawn independently, as a QRNG
would; here from a keyed counter-based generator, so pulse n's code costs
O(1) and nothing is stored) or a *pattern* (a fixed sequence of length L
loaded into the modulators' pattern memory and repeated). Alice only ever
looks up the pulses Bob announces.

Probabilities are applied by comparing 31- and 32-bit slices of a 64-bit
hash with integer thresholds, so they are exact to 2**-31; the effective
values are given by :attr:`AliceSequence.effective_z_probability` and
:attr:`AliceSequence.effective_intensity_probabilities`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numba as nb
import numpy as np

from .rng import derive_key, hash_index

__all__ = ["AliceSequence", "BASIS_Z", "BASIS_X", "decode", "encode"]

BASIS_Z = 0
BASIS_X = 1
MODE_STREAM = 0
MODE_PATTERN = 1

_B31 = 1 << 31
_B32 = 1 << 32
_MASK31 = np.uint64(_B31 - 1)
_MASK32 = np.uint64(_B32 - 1)
_ONE = np.uint64(1)
_S1 = np.uint64(1)
_S32 = np.uint64(32)


def encode(basis, bit, intensity):
    """Pack arrays (or scalars) of basis, bit and intensity class into codes."""
    return (np.asarray(bit, np.uint8) | (np.asarray(basis, np.uint8) << 1)
            | (np.asarray(intensity, np.uint8) << 2)).astype(np.uint8)


def decode(codes):
    """Split codes into (basis, bit, intensity) uint8 arrays."""
    c = np.asarray(codes, np.uint8)
    return (c >> 1) & 1, c & 1, c >> 2


@nb.njit(cache=True, inline="always")
def code_from_hash(z, z_thr, cum_thr):
    bit = np.uint8(z & _ONE)
    basis = np.uint8(0) if ((z >> _S1) & _MASK31) < z_thr else np.uint8(1)
    u = (z >> _S32) & _MASK32
    k = 0
    for i in range(cum_thr.shape[0]):  # thresholds ascend: count those passed, no branch
        k += u >= cum_thr[i]
    return np.uint8(bit | (basis << 1) | (k << 2))


@nb.njit(cache=True, inline="always")
def alice_code(n, mode, key, z_thr, cum_thr, pattern):
    """Code of pulse ``n`` (int64 >= 0)."""
    if mode == MODE_PATTERN:
        return pattern[n % pattern.shape[0]]
    return code_from_hash(hash_index(key, n), z_thr, cum_thr)


_NEVER_U = np.uint64(_B32)  # a threshold no 32-bit slice reaches


@nb.njit(cache=True)
def codes_into(pulses, start, stop, mode, key, z_thr, cum_thr, pattern, out):
    """``out[i] = code of pulses[i]`` for start <= i < stop (the bulk form of alice_code)."""
    if mode == MODE_PATTERN:
        L = pattern.shape[0]
        for i in range(start, stop):
            out[i] = pattern[pulses[i] % L]
        return
    # stream: the loop of code_from_hash unrolled for up to four classes, branch-free
    nc = cum_thr.shape[0]
    c0 = cum_thr[0] if nc > 0 else _NEVER_U
    c1 = cum_thr[1] if nc > 1 else _NEVER_U
    c2 = cum_thr[2] if nc > 2 else _NEVER_U
    for i in range(start, stop):
        z = hash_index(key, pulses[i])
        u = (z >> _S32) & _MASK32
        k = np.uint8(u >= c0) + np.uint8(u >= c1) + np.uint8(u >= c2)
        basis = np.uint8(((z >> _S1) & _MASK31) >= z_thr)
        out[i] = np.uint8(z & _ONE) | (basis << 1) | (k << 2)


@nb.njit(cache=True, nogil=True)
def _lookup(pulses, mode, key, z_thr, cum_thr, pattern, out):
    codes_into(pulses, 0, pulses.shape[0], mode, key, z_thr, cum_thr, pattern, out)


@dataclass(frozen=True)
class AliceSequence:
    """Alice's choices for every pulse of a run.

    Build with :meth:`from_config`. ``params`` is the tuple handed to the
    numba kernels: ``(mode, key, z_thr, cum_thr, pattern)``.
    """

    mode: int
    key: np.uint64
    z_thr: np.uint64
    cum_thr: np.ndarray
    pattern: np.ndarray

    @classmethod
    def from_config(cls, source, seed: int, *, secret: bool = False) -> AliceSequence:
        """Alice's sequence for a run of the bench's ``[source]`` with the given seed.

        ``secret``: a real bench's sequence, keyed by 64 bits from the operating system's
        random source instead of the seed (the seed is printed in the summary, and a
        few public bases would give away a 32-bit one); the recording of the run keeps
        the key, so that it can be replayed. On the simulated bench the seed decides
        everything, so that a run can be repeated.
        """
        key = np.uint64(int.from_bytes(os.urandom(8), "little") if secret
                        else derive_key(seed, "alice"))
        z_thr = np.uint64(round(source.z_basis_probability * _B31))
        cum = np.cumsum(source.intensity_probabilities)[:-1]
        cum_thr = np.array([min(round(c * _B32), _B32) for c in cum], dtype=np.uint64)
        stub = np.zeros(1, np.uint8)
        seq = cls(MODE_STREAM, key, z_thr, cum_thr, stub)
        if source.sequence == "pattern":
            pat = seq.codes(np.arange(source.pattern_length, dtype=np.int64))
            seq = cls(MODE_PATTERN, key, z_thr, cum_thr, pat)
        return seq

    @property
    def params(self):
        return (self.mode, self.key, self.z_thr, self.cum_thr, self.pattern)

    def codes(self, pulses) -> np.ndarray:
        """Codes of the given pulse numbers."""
        p = np.ascontiguousarray(pulses, dtype=np.int64)
        if p.size and p.min() < 0:
            raise ValueError("pulse numbers must be >= 0")
        out = np.empty(p.shape[0], np.uint8)
        _lookup(p, *self.params, out)
        return out

    @property
    def effective_z_probability(self) -> float:
        return int(self.z_thr) / _B31

    @property
    def effective_intensity_probabilities(self) -> np.ndarray:
        edges = np.concatenate([[0], self.cum_thr.astype(np.float64), [_B32]]) / _B32
        return np.diff(edges)
