"""Verification of the corrected keys by polynomial hashing over GF(2^64).

After error correction Alice and Bob each hash their corrected key with the
same randomly drawn hash function and compare the tags; equal tags leave a
probability of at most ``eps_cor`` that the keys differ. The family is the
polynomial evaluation hash, almost universal in the sense of Carter and Wegman
(J. Comput. Syst. Sci. 18, 143 (1979); JCSS 22, 265 (1981)); hashing by
polynomial evaluation over a finite field is due to den Boer (J. Computer
Security 2, 65 (1993)) and Bierbrauer, Johansson, Kabatianskii and Smeets
(CRYPTO '93, LNCS 773). It needs one 64-bit key point per instance where a
Toeplitz matrix would need a seed as long as the key.

Field: GF(2^64) = GF(2)[z] / (z^64 + z^4 + z^3 + z + 1) (the polynomial is
irreducible; the tests check it with Rabin's test). An element is a uint64
whose bit i is the coefficient of z^i. Products use the carry-less multiply
PCLMULQDQ where numba can emit it (:func:`qkdctl.postprocess.privacy.has_pclmul`)
and a shift-and-xor multiply otherwise; both give the same values.

Message: a key of ``n`` bits becomes the words ``w_0 = n`` (its length) and
``w_1 .. w_L``, the bits packed little-endian as in
:func:`qkdctl.postprocess.privacy.pack_bits` (``L = ceil(n/64)``, the last
word zero-padded). With the key point ``k``,

    h_k(w) = sum_{i=0..L} w_i k^(L+1-i)          (Horner: h = (h + w_i) k)

Two different messages of at most ``n`` bits, equal lengths or not, give a
non-zero difference polynomial in ``k`` of degree at most ``L + 1`` (when the
lengths differ, the leading coefficient is the longer one's length word), so
they collide for at most ``L + 1`` of the 2^64 key points: probability
``<= (L + 1) / 2^64``. A tag is ``t`` such hashes with independent uniform key
points, ``t`` the smallest with ``((L + 1) / 2^64)^t <= eps_cor``; the hash key
is ``8 t`` bytes and the tag ``8 t`` bytes, both the key points / hashes as
little-endian uint64. The hash key must be independent of the keys but need
not be secret; the tag reveals ``64 t`` bits about the key, to be counted in
privacy amplification.
"""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Callable

import numba as nb
import numpy as np

from .privacy import _pclmul, has_pclmul, pack_bits

__all__ = [
    "EPS_COR",
    "POLY",
    "collision_probability",
    "draw_hash_key",
    "gf64_mul",
    "gf64_mul_reference",
    "hash_instances",
    "instances_for",
    "key_length_bytes",
    "tag",
    "tag_length_bits",
    "tag_packed",
    "tag_reference",
    "verify",
]

EPS_COR = 1e-15
POLY = (1 << 64) | 0x1B          # z^64 + z^4 + z^3 + z + 1
_MASK = (1 << 64) - 1


# ---------------------------------------------------------------- bounds

def _words(n_bits: int) -> int:
    n_bits = int(n_bits)
    if n_bits < 0:
        raise ValueError(f"n_bits must be >= 0, got {n_bits}")
    return (n_bits + 63) >> 6


def collision_probability(n_bits: int, instances: int) -> float:
    """Bound on the probability that two different keys of <= n_bits bits get equal tags."""
    instances = int(instances)
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    return min(1.0, (_words(n_bits) + 1) / 2.0**64) ** instances


def hash_instances(n_bits: int, eps_cor: float = EPS_COR) -> int:
    """Smallest number of independent 64-bit hashes with collision probability <= eps_cor."""
    eps_cor = float(eps_cor)
    if not 0.0 < eps_cor < 1.0:
        raise ValueError(f"eps_cor must be in (0, 1), got {eps_cor}")
    p = (_words(n_bits) + 1) / 2.0**64
    if p >= 1.0:
        raise ValueError(f"a {n_bits}-bit key is too long for a GF(2^64) polynomial hash")
    t = max(1, math.ceil(math.log(eps_cor) / math.log(p)))
    while t > 1 and p ** (t - 1) <= eps_cor:   # guard against rounding in the logs
        t -= 1
    while p**t > eps_cor:
        t += 1
    return t


instances_for = hash_instances   # the same function, by the name the protocol code uses


def tag_length_bits(n_bits: int, eps_cor: float = EPS_COR) -> int:
    """Bits of the tag (and of the hash key) for an n_bits key: 64 per hash instance."""
    return 64 * hash_instances(n_bits, eps_cor)


def key_length_bytes(n_bits: int, eps_cor: float = EPS_COR) -> int:
    """Bytes of the hash key for an n_bits key."""
    return 8 * hash_instances(n_bits, eps_cor)


def draw_hash_key(n_bits: int, eps_cor: float = EPS_COR,
                  rng_bytes: Callable[[int], bytes] | bytes | None = None) -> bytes:
    """A hash key (``8 t`` bytes) for keys of ``n_bits`` bits.

    ``rng_bytes`` is a function returning the given number of uniformly
    random bytes (``os.urandom`` when None), or those bytes themselves, of
    exactly :func:`key_length_bytes` length.
    """
    need = key_length_bytes(n_bits, eps_cor)
    if rng_bytes is None:
        rng_bytes = os.urandom
    raw = rng_bytes if isinstance(rng_bytes, (bytes, bytearray, memoryview)) else rng_bytes(need)
    raw = bytes(raw)
    if len(raw) != need:
        raise ValueError(f"the hash key needs {need} random bytes, got {len(raw)}")
    return raw


# ---------------------------------------------------------------- field arithmetic

def gf64_mul_reference(a: int, b: int) -> int:
    """Product in GF(2^64) of two ints in [0, 2^64) (shift and xor, reduced bit by bit)."""
    a &= _MASK
    r = 0
    for i in range(64):
        if (b >> i) & 1:
            r ^= a
        a <<= 1
        if a >> 64:
            a ^= POLY
    return r


@nb.njit(cache=True, nogil=True, inline="always")
def _reduce(lo, hi):
    """``lo + hi z^64`` modulo z^64 + z^4 + z^3 + z + 1."""
    # hi z^64 = hi (z^4 + z^3 + z + 1); the bits shifted out (degree < 4) once more
    over = (hi >> np.uint64(63)) ^ (hi >> np.uint64(61)) ^ (hi >> np.uint64(60))
    v = hi ^ over
    return (lo ^ v ^ (v << np.uint64(1)) ^ (v << np.uint64(3)) ^ (v << np.uint64(4)))


@nb.njit(cache=True, nogil=True, inline="always")
def _clmul_soft(a, b):
    """``(lo, hi)`` of the carry-less product of two uint64, without PCLMULQDQ."""
    lo = np.uint64(0)
    hi = np.uint64(0)
    one = np.uint64(1)
    for i in range(64):
        mask = np.uint64(0) - ((b >> np.uint64(i)) & one)
        lo ^= (a << np.uint64(i)) & mask
        if i:
            hi ^= (a >> np.uint64(64 - i)) & mask
    return lo, hi


@nb.njit(cache=True, nogil=True)
def _gf64_mul_hw(a, b):
    lo, hi = _pclmul(a, b)
    return _reduce(lo, hi)


@nb.njit(cache=True, nogil=True)
def _gf64_mul_sw(a, b):
    lo, hi = _clmul_soft(a, b)
    return _reduce(lo, hi)


@nb.njit(cache=True, nogil=True)
def _horner_hw(words, n_bits, keys, out):
    """``out[j] = h_{keys[j]}(n_bits, words...)`` with PCLMULQDQ."""
    for j in range(keys.shape[0]):
        k = keys[j]
        h = _gf64_mul_hw(np.uint64(n_bits), k)
        for i in range(words.shape[0]):
            h = _gf64_mul_hw(h ^ words[i], k)
        out[j] = h


@nb.njit(cache=True, nogil=True)
def _horner_sw(words, n_bits, keys, out):
    """``out[j] = h_{keys[j]}(n_bits, words...)`` with the shift-and-xor multiply."""
    for j in range(keys.shape[0]):
        k = keys[j]
        h = _gf64_mul_sw(np.uint64(n_bits), k)
        for i in range(words.shape[0]):
            h = _gf64_mul_sw(h ^ words[i], k)
        out[j] = h


def gf64_mul(a: int, b: int, *, hardware: bool | None = None) -> int:
    """Product in GF(2^64) by the compiled multiply (PCLMULQDQ when available)."""
    hw = has_pclmul() if hardware is None else bool(hardware)
    f = _gf64_mul_hw if hw else _gf64_mul_sw
    return int(f(np.uint64(a), np.uint64(b)))


# ---------------------------------------------------------------- tags

def _keys(hash_key: bytes) -> np.ndarray:
    raw = bytes(hash_key)
    if not raw or len(raw) % 8:
        raise ValueError(f"a hash key is a non-empty multiple of 8 bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def tag_packed(words: np.ndarray, n_bits: int, hash_key: bytes, *,
               hardware: bool | None = None) -> bytes:
    """Tag of a key of ``n_bits`` bits given as packed little-endian uint64 words.

    Bits past ``n_bits`` in the last word are ignored.
    """
    nw = _words(n_bits)
    w = np.asarray(words)
    if w.ndim != 1 or w.dtype.kind not in "iu" or w.dtype.itemsize != 8 or w.shape[0] < nw:
        raise ValueError(f"words must be a 1-D array of at least {nw} 64-bit words")
    w = np.ascontiguousarray(w[:nw]).view(np.uint64)
    if n_bits & 63:
        w = w.copy()
        w[-1] &= np.uint64((1 << (n_bits & 63)) - 1)
    keys = _keys(hash_key)
    out = np.zeros(keys.shape[0], np.uint64)
    hw = has_pclmul() if hardware is None else bool(hardware)
    (_horner_hw if hw else _horner_sw)(w, np.uint64(n_bits), keys, out)
    return out.astype("<u8").tobytes()


def _as_bits(bits: np.ndarray) -> np.ndarray:
    a = np.asarray(bits)
    if a.ndim != 1:
        raise ValueError(f"bits must be a 1-D array, got shape {a.shape}")
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    if a.dtype.kind not in "iu":
        raise ValueError(f"bits must hold integer 0/1 values, got dtype {a.dtype}")
    if a.size and (a.max() > 1 or (a.dtype.kind == "i" and a.min() < 0)):
        raise ValueError("bits must hold only 0 and 1")
    return a.astype(np.uint8, copy=False)


def tag(bits: np.ndarray, hash_key: bytes, *, hardware: bool | None = None) -> bytes:
    """Tag (``len(hash_key)`` bytes) of a key given as a uint8 (or bool) 0/1 array."""
    b = _as_bits(bits)
    return tag_packed(pack_bits(b), b.shape[0], hash_key, hardware=hardware)


def verify(bits: np.ndarray, hash_key: bytes, other_tag: bytes) -> bool:
    """True when the tag of ``bits`` equals ``other_tag`` (constant-time comparison)."""
    return hmac.compare_digest(tag(bits, hash_key), bytes(other_tag))


def tag_reference(bits: np.ndarray, hash_key: bytes) -> bytes:
    """The tag in plain Python (:func:`gf64_mul_reference`; small keys, for tests)."""
    b = [int(v) for v in _as_bits(bits)]
    n = len(b)
    words = [n] + [sum(bit << i for i, bit in enumerate(b[w:w + 64])) for w in range(0, n, 64)]
    out = b""
    for k in _keys(hash_key):
        h = 0
        for w in words:
            h = gf64_mul_reference(h ^ w, int(k))
        out += h.to_bytes(8, "little")
    return out
