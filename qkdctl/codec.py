"""Compact coding of Bob's detection announcements (pulse numbers and bases).

In sifting, Bob announces per block the pulse numbers he detected (int64, strictly
ascending) and his basis for each (0 or 1). Sent raw that is 9 bytes per detection; this
module codes the pulse numbers as Golomb-Rice coded gaps and the bases as one bit each.
For per-detection symbols whose probabilities are public (Bob's basis, Alice's keep flag,
Alice's intensity class), it also has a static-model entropy coder (rANS), which costs
close to the entropy rather than a whole number of bits per symbol.

Pulses: :func:`encode_pulses` / :func:`decode_pulses`
-----------------------------------------------------

The block is coded as the gaps ``g[0] = pulses[0] - previous``,
``g[i] = pulses[i] - pulses[i-1]``, where ``previous`` is the last pulse number of the
previous block (``-1`` at the start, so that pulse 0 gives gap 1). Every gap is >= 1 and
what is coded is ``v = g - 1`` (0 <= v < 2**63). ``previous`` itself is not sent: both
sides know it.

Layout::

    u8   format version (1)
    u64  count n of pulses, little-endian
    bit stream, most significant bit of each byte first, zero-padded to a whole byte:
        per chunk of CHUNK = 4096 gaps (the last one may be shorter; none if n = 0):
            6 bits  Rice parameter k (0..62), most significant bit first
            per gap, v = g - 1, q = v >> k:
                q < 32:   q one bits, one zero bit, then the k low bits of v (MSB first)
                q >= 32:  escape: 32 one bits, then v in 64 bits (MSB first)

The coded size is thus ``9 + ceil(bits / 8)`` bytes. The parameter k of a chunk is a
function of its gaps: the optimal Rice parameter for a geometric law with the chunk's mean
(Kiely 2004, ``k = max(0, 1 + floor(log2(ln(phi - 1) / ln(theta))))`` for
``theta = mean / (1 + mean)``), i.e. ``k(mean) = #{j in 1..62 : mean >= T_j}`` with
``T_j = 1 / (exp(c / 2**(j-1)) - 1)`` and ``c = -ln((sqrt(5) - 1) / 2)``. To make the
choice exact and identical everywhere, each T_j is rounded up to a multiple of 2**-32
(:data:`RICE_THRESHOLDS`, rows ``(whole, frac)`` computed with :mod:`decimal` at 60 digits)
and ``sum(v) / m >= T_j`` is decided in integer arithmetic. To keep a rare huge gap (a pause
of the acquisition) from dictating k for the 4095 others, k is chosen in two steps:
``k_A = k(mean of all m gaps)``, then ``k = k(mean of the gaps with v < 32 << k_A)``, the
gaps that do not escape with k_A (if ``k_A + 5 >= 63`` no gap can escape and ``k = k_A``).
Such a gap then costs its escape, 96 bits; no gap ever costs more than 96 bits.

The encoding is canonical: one block has exactly one encoding, and :func:`decode_pulses`
accepts only that one. Truncated data, trailing bytes, nonzero padding bits, an unknown
version, a count larger than the bits present, k > 62 or a k other than the encoder's
choice for the decoded gaps, an escape used for a gap that the Rice code can hold, and a
pulse number beyond the int64 range all raise :class:`~qkdctl.wire.WireError` (never an
IndexError); the count is checked against the data size (a gap costs at least one bit)
before anything is allocated.

Why Rice: the gaps between detections are very nearly geometric (independent pulses, each
detected with probability p), and for a geometric law the Golomb code is the optimal prefix
code; Rice (Golomb with a power-of-two parameter) stays within 0.12 bit of the entropy for
every mean (typically 0.03 to 0.09), costs O(1) per gap (a shift, a short unary run and k
raw bits; no tables, no model to send beyond k, no arithmetic coder state), and adapts per
4096-gap chunk to a changing detection rate. Measured on 10**6 geometric gaps, header
included (entropy ``H = (-(1-p) log2(1-p) - p log2 p) / p``)::

    p = 8.6e-3 (default bench, mean gap ~116)   8.356 bits/gap   H =  8.298   k = 6
    p = 1e-3                                    11.496 bits/gap   H = 11.408   k = 9
    p = 1e-1                                     4.757 bits/gap   H =  4.690   k = 3

Encoding runs at ~70-80 M gaps/s and decoding at ~55-65 M gaps/s on one core (numba).

Bases: :func:`pack_bases` / :func:`unpack_bases`
------------------------------------------------

One bit per basis, ``np.packbits(..., bitorder="little")``: basis i is bit ``i % 8`` (least
significant first) of byte ``i // 8``; the padding bits of the last byte are zero. The count
is not included (it is the pulse count). So a detection costs ~8.36 + 1 bits on the default
bench, plus 9 header bytes per block.

Symbols with public probabilities: :func:`encode_symbols` / :func:`decode_symbols`
-----------------------------------------------------------------------------------

A static-model entropy coder for alphabets of K = 2..16 symbols (uint8 values 0..K-1)
whose probabilities p_0..p_{K-1} both sides know (the bench configuration), so that no
model is sent. :func:`encode_bits` / :func:`decode_bits` are the K = 2 case for flags:
``encode_bits(bits, p_one) == encode_symbols(bits, (1 - p_one, p_one))``.

*Arguments.* 2 <= K <= 16; every p_i a finite real number > 0; ``|math.fsum(p) - 1| <=
1e-9``. Otherwise ValueError (TypeError for what is not a number or not a sequence). A
symbol >= K (or < 0) raises ValueError naming its index.

*Quantisation* (:func:`quantize_probabilities`). The p_i are taken as the exact rationals
their binary64 values are, normalised by their exact sum S, and scaled to the total
``M = 2**SYMBOLS_SCALE_BITS = 2**14``: ``t_i = M * p_i / S`` (exact, with
:class:`fractions.Fraction`). Then ``f_i = max(1, floor(t_i))``, and, one unit at a time:
while ``sum(f) < M``, add 1 to the f_i with the largest ``t_i - f_i``; while
``sum(f) > M``, subtract 1 from the f_i > 1 with the largest ``f_i - t_i``; ties go to the
lowest index. When every t_i >= 1 this is plain largest-remainder (Hamilton) rounding;
the second loop only runs when a p_i < 1 / M was raised to f_i = 1. Equal floats give
equal tables on every platform; e.g. (0.8, 0.2) -> (13107, 3277), (0.32, 0.68) ->
(5243, 11141), (0.5, 0.3, 0.2) -> (8192, 4915, 3277). Symbol s owns the slots
``[c_s, c_s + f_s)`` of ``[0, M)``, ``c_s = f_0 + ... + f_{s-1}``.

*Coder:* rANS (Duda 2013) in the byte-wise form of Giesen's public-domain ``rans_byte.h``:
a 32-bit state x kept in ``[L, 256 L)``, ``L = RANS_L = 2**23``, renormalised one byte at
a time. Symbols are encoded last to first, starting from ``x = L``; to encode s::

    while x >= f_s * 2**17:  emit the byte x & 0xFF;  x >>= 8     (at most 2 bytes)
    x = (x // f_s) * M + (x % f_s) + c_s

The decoder runs forward: ``slot = x % M``, s is the symbol owning the slot,
``x = f_s * (x // M) + slot - c_s``, then ``while x < L: x = 256 x + next byte``.

Layout (the byte order is the decoder's reading order)::

    u8   format version (1)
    u32  the encoder's final state = the decoder's initial state, little-endian,
         L <= x < 256 L
    the emitted bytes, last emitted first (i.e. in the order the decoder reads them)

The symbol count is not sent (the caller knows it, e.g. the pulse count), nor is the
model. n = 0 codes as ``01 00 00 80 00`` (the state L). A block thus costs 5 bytes plus
what the symbols emit; no padding.

*Strict, canonical decoding.* :func:`decode_symbols` raises :class:`~qkdctl.wire.WireError`
for a short header, an unknown version, an initial state outside ``[L, 256 L)``, data that
end while a byte is needed (truncation, or a count too large), bytes left over after
``count`` symbols (trailing data, or a count too small), and a final state other than L.
What is accepted is exactly what :func:`encode_symbols` outputs: each decoding step,
restricted to states in ``[L, 256 L)``, is the inverse of an encoding step, so an accepted
stream is the encoding of what it decodes to (one encoding per input). Before allocating
the output, ``count`` is checked against what the data could hold
(:func:`max_symbol_count`)::

    count <= floor(8 * (len(data) - 4) * (1 + 2**-10) / c_min)
    c_min = log2(1 + (M - f_max) / f_max * (1 - 2**-9))

else WireError. c_min is a lower bound on the growth of log2(x) per encoded symbol (the
encoding step gives ``x' >= x + floor(x / f_s) (M - f_s)`` with ``x >= 2**9 f_s``), and a
byte emitted shrinks log2(x) by at most 8.0029 bits (x >= 2**17 when a byte is emitted);
with x from 2**23 to below 2**31 a valid encoding of n symbols therefore has
``n c_min < 8 + 8.0029 (len - 5)``, so the check never rejects one. c_min is just below
``-log2(f_max / M)``, the cost of the cheapest symbol: ~0.32 bit for (0.8, 0.2), i.e.
at most ~25 symbols (bytes of output) per byte of input.

*Why rANS.* With a static model, decoding is a table look-up (``M`` bytes), one multiply
and an add per symbol and encoding one integer division; there is no carry propagation
(as in a range coder) and no interval bookkeeping, the state is exact integers (the same
bytes everywhere), and the 32-bit/byte-wise variant is simple to write twice (the tests
hold a plain-Python reference, compared byte for byte). Its one constraint, encoding in
reverse, costs nothing here: a block is in memory. With ``M = 2**14`` and ``L = 2**23``
the quantisation and state-precision losses measure below 1e-5 bit per symbol for these
models (on 10**7 symbols), so the only visible overhead is the 5-byte header (0.004
bit/symbol at n = 10**4).

Measured on 10**6 random symbols drawn from the model (header included; H the model's
entropy; the small differences to H are the sample's own fluctuation: the excess over the
sample's ideal code length ``-sum(log2 p[s_i])`` is 4e-5 bit/symbol, i.e. the header)::

    (0.8, 0.2)        basis       0.7224 bits/symbol   H = 0.7219
    (0.32, 0.68)      keep flag   0.9043 bits/symbol   H = 0.9044
    (0.5, 0.3, 0.2)   intensity   1.4857 bits/symbol   H = 1.4855

Throughput on one core (numba, 10**6 symbols): encoding ~190-215 M symbols/s, decoding
~170-190 M symbols/s, for any of these models (and for 16 equiprobable symbols).
So a detection costs ~8.36 (gap) + 0.72 (basis) + 0.90 (keep) + 0.68 * 1.49 (class)
= ~11.0 bits instead of 8.36 + 1 + 1 + 0.68 * 2 = 11.7 (plus 5 header bytes per coded
stream and block).
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Sequence
from decimal import ROUND_CEILING, Decimal, localcontext
from fractions import Fraction
from functools import lru_cache

import numba as nb
import numpy as np

from .wire import WireError

__all__ = [
    "CHUNK",
    "ESCAPE_Q",
    "FORMAT_VERSION",
    "MAX_K",
    "MAX_ALPHABET",
    "RANS_L",
    "RICE_THRESHOLDS",
    "SYMBOLS_FORMAT_VERSION",
    "SYMBOLS_HEADER_SIZE",
    "SYMBOLS_SCALE_BITS",
    "SYMBOLS_TOTAL",
    "decode_bits",
    "decode_pulses",
    "decode_symbols",
    "encode_bits",
    "encode_pulses",
    "encode_symbols",
    "max_symbol_count",
    "pack_bases",
    "quantize_probabilities",
    "unpack_bases",
]

FORMAT_VERSION = 1
CHUNK = 4096          # gaps per chunk (one Rice parameter each)
ESCAPE_Q = 32         # a quotient >= this is sent as an escape (ESCAPE_Q ones + 64-bit value)
ESCAPE_BITS = 5       # log2(ESCAPE_Q)
K_BITS = 6            # width of the per-chunk Rice parameter
MAX_K = 62
RAW_BITS = 64
_HEADER = struct.Struct("<BQ")
HEADER_SIZE = _HEADER.size
_INT64_MAX = (1 << 63) - 1


def _rice_thresholds() -> np.ndarray:
    """Rows (whole, frac) with ``whole + frac / 2**32 = ceil(T_j * 2**32) / 2**32``, j = 1..62.

    ``T_j = 1 / (exp(c / 2**(j-1)) - 1)``, ``c = -ln((sqrt(5) - 1) / 2)``, evaluated with
    :mod:`decimal` at 60 digits (deterministic on every platform).
    """
    with localcontext() as ctx:
        ctx.prec = 60
        c = -((Decimal(5).sqrt() - 1) / 2).ln()
        out = []
        for j in range(1, MAX_K + 1):
            t = 1 / ((c / Decimal(2) ** (j - 1)).exp() - 1)
            fixed = int((t * 2**32).to_integral_value(rounding=ROUND_CEILING))
            out.append((fixed >> 32, fixed & 0xFFFFFFFF))
    return np.array(out, dtype=np.int64)


RICE_THRESHOLDS = _rice_thresholds()
RICE_THRESHOLDS.setflags(write=False)

# status codes of the numba decoder
_OK = 0
_TRUNCATED = 1
_BAD_K = 2
_WRONG_K = 3
_NONCANONICAL_ESCAPE = 4
_OVERFLOW = 5
_PADDING = 6
_TRAILING = 7

_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U8 = np.uint64(8)
_U32 = np.uint64(32)
_UFF = np.uint64(0xFF)
_M32 = np.uint64(0xFFFFFFFF)
_UESC = np.uint64(ESCAPE_Q)
_I64_MAX = np.int64(_INT64_MAX)


# ----------------------------------------------------------------------------------------
# numba core
# ----------------------------------------------------------------------------------------

@nb.njit(cache=True, nogil=True, inline="always")
def _mean_k(s_hi, s_lo, m, thresholds):
    """k = #{j : S / m >= thresholds[j-1]} for S = s_hi * 2**32 + s_lo, exactly.

    With S = mean * m + r (0 <= r < m) and a threshold t = whole + frac / 2**32,
    S / m >= t iff mean > whole, or mean == whole and r * 2**32 >= frac * m.
    (s_hi, s_lo <= 2**43 and m <= 4096, so nothing overflows.)
    """
    mm = np.uint64(m)
    q_hi = s_hi // mm
    rest = ((s_hi % mm) << _U32) + s_lo
    mean = (q_hi << _U32) + rest // mm
    r = rest % mm
    k = 0
    while k < MAX_K:
        whole = np.uint64(thresholds[k, 0])
        if mean < whole or (mean == whole and
                            (r << _U32) < np.uint64(thresholds[k, 1]) * mm):
            break
        k += 1
    return k


@nb.njit(cache=True, nogil=True)
def _choose_k(pulses, lo, hi, before, thresholds):
    """Rice parameter of the chunk pulses[lo:hi] (gaps from ``before``), see module doc."""
    s_hi = _U0
    s_lo = _U0
    b = np.uint64(before)
    for i in range(lo, hi):
        p = np.uint64(pulses[i])
        v = p - b - _U1
        b = p
        s_hi += v >> _U32
        s_lo += v & _M32
    k = _mean_k(s_hi, s_lo, hi - lo, thresholds)
    if k + ESCAPE_BITS >= 63:
        return k
    limit = np.uint64(ESCAPE_Q) << np.uint64(k)
    s_hi = _U0
    s_lo = _U0
    m = 0
    b = np.uint64(before)
    for i in range(lo, hi):
        p = np.uint64(pulses[i])
        v = p - b - _U1
        b = p
        if v < limit:
            s_hi += v >> _U32
            s_lo += v & _M32
            m += 1
    if m == hi - lo or m == 0:
        return k
    return _mean_k(s_hi, s_lo, m, thresholds)


@nb.njit(cache=True, nogil=True)
def _first_not_ascending(pulses, previous):
    last = previous
    for i in range(pulses.size):
        if pulses[i] <= last:
            return i
        last = pulses[i]
    return -1


@nb.njit(cache=True, nogil=True, inline="always")
def _put(out, pos, acc, nbits, value, nb_):
    """Append the nb_ (<= 32) low bits of value, MSB first; flush whole bytes."""
    acc = (acc << np.uint64(nb_)) | value
    nbits += nb_
    while nbits >= 8:
        nbits -= 8
        out[pos] = np.uint8((acc >> np.uint64(nbits)) & _UFF)
        pos += 1
    return pos, acc, nbits


@nb.njit(cache=True, nogil=True, inline="always")
def _put_wide(out, pos, acc, nbits, value, nb_):
    """Like _put for nb_ <= 64."""
    if nb_ > 32:
        pos, acc, nbits = _put(out, pos, acc, nbits, value >> _U32, nb_ - 32)
        return _put(out, pos, acc, nbits, value & _M32, 32)
    return _put(out, pos, acc, nbits, value, nb_)


@nb.njit(cache=True, nogil=True)
def _encode_core(pulses, previous, thresholds):
    n = pulses.size
    nchunks = (n + CHUNK - 1) // CHUNK
    ks = np.empty(nchunks, np.int64)
    total = 0
    for c in range(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        before = previous if lo == 0 else pulses[lo - 1]
        k = _choose_k(pulses, lo, hi, before, thresholds)
        ks[c] = k
        uk = np.uint64(k)
        bits = K_BITS
        b = np.uint64(before)
        for i in range(lo, hi):
            p = np.uint64(pulses[i])
            v = p - b - _U1
            b = p
            q = v >> uk
            if q < _UESC:
                bits += np.int64(q) + 1 + k
            else:
                bits += ESCAPE_Q + RAW_BITS
        total += bits
    out = np.empty(HEADER_SIZE + (total + 7) // 8, np.uint8)
    out[0] = FORMAT_VERSION
    un = np.uint64(n)
    for j in range(8):
        out[1 + j] = np.uint8((un >> np.uint64(8 * j)) & _UFF)
    pos = HEADER_SIZE
    acc = _U0
    nbits = 0
    escape = (_U1 << np.uint64(ESCAPE_Q)) - _U1
    for c in range(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        k = ks[c]
        uk = np.uint64(k)
        mask = (_U1 << uk) - _U1
        pos, acc, nbits = _put(out, pos, acc, nbits, uk, K_BITS)
        b = np.uint64(previous if lo == 0 else pulses[lo - 1])
        for i in range(lo, hi):
            p = np.uint64(pulses[i])
            v = p - b - _U1
            b = p
            q = v >> uk
            if q < _UESC:
                # q ones then a zero
                pos, acc, nbits = _put(out, pos, acc, nbits,
                                       ((_U1 << q) - _U1) << _U1, np.int64(q) + 1)
                if k > 0:
                    pos, acc, nbits = _put_wide(out, pos, acc, nbits, v & mask, k)
            else:
                pos, acc, nbits = _put(out, pos, acc, nbits, escape, ESCAPE_Q)
                pos, acc, nbits = _put_wide(out, pos, acc, nbits, v, RAW_BITS)
    if nbits > 0:
        out[pos] = np.uint8((acc << np.uint64(8 - nbits)) & _UFF)
        pos += 1
    return out


@nb.njit(cache=True, nogil=True, inline="always")
def _get(data, pos, acc, nbits, nb_):
    """Read nb_ (<= 32) bits MSB first. Returns (ok, value, pos, acc, nbits)."""
    end = data.size
    while nbits < nb_:
        if pos >= end:
            return False, _U0, pos, acc, nbits
        acc = (acc << _U8) | np.uint64(data[pos])
        pos += 1
        nbits += 8
    nbits -= nb_
    value = (acc >> np.uint64(nbits)) & ((_U1 << np.uint64(nb_)) - _U1)
    return True, value, pos, acc, nbits


@nb.njit(cache=True, nogil=True, inline="always")
def _get_wide(data, pos, acc, nbits, nb_):
    """Like _get for nb_ <= 64."""
    if nb_ > 32:
        ok, hi, pos, acc, nbits = _get(data, pos, acc, nbits, nb_ - 32)
        if not ok:
            return False, _U0, pos, acc, nbits
        ok, lo, pos, acc, nbits = _get(data, pos, acc, nbits, 32)
        return ok, (hi << _U32) | lo, pos, acc, nbits
    return _get(data, pos, acc, nbits, nb_)


@nb.njit(cache=True, nogil=True)
def _decode_core(data, count, previous, thresholds, out):
    """Decode ``count`` gaps from data[HEADER_SIZE:] into out. Returns (status, index)."""
    pos = HEADER_SIZE
    end = data.size
    acc = _U0
    nbits = 0
    last = previous
    for lo in range(0, count, CHUNK):
        hi = min(lo + CHUNK, count)
        ok, uk, pos, acc, nbits = _get(data, pos, acc, nbits, K_BITS)
        if not ok:
            return _TRUNCATED, lo
        k = np.int64(uk)
        if k > MAX_K:
            return _BAD_K, lo
        for i in range(lo, hi):
            # largest v with last + v + 1 <= INT64_MAX (last >= -1)
            if last == _I64_MAX:
                return _OVERFLOW, i
            limit = np.uint64(_I64_MAX - 1 - last) if last >= 0 else np.uint64(_I64_MAX)
            # unary quotient: up to ESCAPE_Q one bits, ended by a zero bit unless capped
            q = 0
            while q < ESCAPE_Q:
                if nbits == 0:
                    if pos >= end:
                        return _TRUNCATED, i
                    acc = (acc << _U8) | np.uint64(data[pos])
                    pos += 1
                    nbits = 8
                nbits -= 1
                if (acc >> np.uint64(nbits)) & _U1 == _U0:
                    break
                q += 1
            if q < ESCAPE_Q:
                ok, r, pos, acc, nbits = _get_wide(data, pos, acc, nbits, k)
                if not ok:
                    return _TRUNCATED, i
                if np.uint64(q) > (limit >> uk):
                    return _OVERFLOW, i
                v = (np.uint64(q) << uk) | r
            else:
                ok, v, pos, acc, nbits = _get_wide(data, pos, acc, nbits, RAW_BITS)
                if not ok:
                    return _TRUNCATED, i
                if (v >> uk) < _UESC:
                    return _NONCANONICAL_ESCAPE, i
            if v > limit:
                return _OVERFLOW, i
            last = last + np.int64(v) + 1
            out[i] = last
        before = previous if lo == 0 else out[lo - 1]
        if _choose_k(out, lo, hi, before, thresholds) != k:
            return _WRONG_K, lo
    if nbits > 0 and (acc & ((_U1 << np.uint64(nbits)) - _U1)) != _U0:
        return _PADDING, count
    if pos != data.size:
        return _TRAILING, data.size - pos
    return _OK, 0


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------

def _check_previous(previous) -> int:
    if isinstance(previous, bool) or not isinstance(previous, int | np.integer):
        raise TypeError(f"previous must be an int, not {type(previous).__name__}")
    previous = int(previous)
    if not -1 <= previous <= _INT64_MAX - 1:
        raise ValueError(f"previous must be in [-1, 2**63 - 2], got {previous}")
    return previous


def encode_pulses(pulses: np.ndarray, previous: int) -> bytes:
    """Code a block of strictly ascending pulse numbers (see the module docstring).

    ``previous`` is the last pulse number of the previous block, or -1 at the start.
    Raises ValueError if the pulses are not strictly ascending or the first is not above
    ``previous`` (naming the index), or if they do not fit int64.
    """
    previous = _check_previous(previous)
    arr = np.asarray(pulses)
    if arr.ndim != 1:
        raise ValueError(f"pulses must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"pulses must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
        raise ValueError("pulse numbers must fit int64")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    bad = _first_not_ascending(arr, previous)
    if bad >= 0:
        if bad == 0:
            raise ValueError(f"pulses[0] = {arr[0]} is not above previous = {previous}")
        raise ValueError(f"pulses not strictly ascending at index {bad}: "
                         f"pulses[{bad - 1}] = {arr[bad - 1]}, pulses[{bad}] = {arr[bad]}")
    return _encode_core(arr, previous, RICE_THRESHOLDS).tobytes()


_MESSAGES = {
    _TRUNCATED: "coded pulses are truncated (data ends inside gap {i})",
    _BAD_K: "chunk starting at gap {i}: Rice parameter above " + str(MAX_K),
    _WRONG_K: "chunk starting at gap {i}: Rice parameter is not the encoder's choice",
    _NONCANONICAL_ESCAPE: "gap {i}: escape used for a gap that the Rice code can hold",
    _OVERFLOW: "gap {i}: pulse number overflows int64",
    _PADDING: "nonzero padding bits after the last gap",
    _TRAILING: "{i} trailing byte(s) after the coded pulses",
}


def decode_pulses(data: bytes, previous: int) -> np.ndarray:
    """Decode :func:`encode_pulses` output back to the int64 pulse numbers.

    ``previous`` must be the value given to the encoder. Anything that is not exactly an
    encoding produced by :func:`encode_pulses` raises :class:`~qkdctl.wire.WireError`.
    """
    previous = _check_previous(previous)
    try:
        buf = np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
    if buf.size < HEADER_SIZE:
        raise WireError(f"coded pulses are truncated: {buf.size} bytes, "
                        f"the header alone is {HEADER_SIZE}")
    version, count = _HEADER.unpack_from(buf)
    if version != FORMAT_VERSION:
        raise WireError(f"unknown coded-pulses format version {version}")
    stream_bytes = buf.size - HEADER_SIZE
    if count > 8 * stream_bytes:
        raise WireError(f"pulse count {count} exceeds what {stream_bytes} bytes can hold")
    out = np.empty(count, dtype=np.int64)
    status, index = _decode_core(buf, count, previous, RICE_THRESHOLDS, out)
    if status != _OK:
        raise WireError(_MESSAGES[status].format(i=index))
    return out


def pack_bases(bases: np.ndarray) -> bytes:
    """Pack bases (0 or 1 each) one bit apiece, least significant bit first."""
    arr = np.asarray(bases)
    if arr.ndim != 1:
        raise ValueError(f"bases must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "biu":
        raise ValueError(f"bases must be integers 0 or 1, got dtype {arr.dtype}")
    if arr.dtype.kind != "b":
        bad = np.flatnonzero((arr != 0) & (arr != 1))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"bases[{i}] = {arr[i]} is not 0 or 1")
    return np.packbits(arr.astype(bool), bitorder="little").tobytes()


def unpack_bases(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bases`: ``count`` bases as uint8 0/1.

    Raises :class:`~qkdctl.wire.WireError` if the length is not ``ceil(count / 8)`` or a
    padding bit is set.
    """
    if isinstance(count, bool) or not isinstance(count, int | np.integer):
        raise TypeError(f"count must be an int, not {type(count).__name__}")
    count = int(count)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    try:
        buf = np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
    expected = (count + 7) // 8
    if buf.size != expected:
        raise WireError(f"packed bases: {buf.size} bytes for {count} bases, "
                        f"expected {expected}")
    if count % 8 and buf[-1] >> (count % 8):
        raise WireError("packed bases: nonzero padding bits in the last byte")
    return np.unpackbits(buf, count=count, bitorder="little")


# ----------------------------------------------------------------------------------------
# symbols with public probabilities: static-model rANS (see the module docstring)
# ----------------------------------------------------------------------------------------

SYMBOLS_FORMAT_VERSION = 1
SYMBOLS_SCALE_BITS = 14
SYMBOLS_TOTAL = 1 << SYMBOLS_SCALE_BITS     # M, the sum of the quantised frequencies
RANS_L = 1 << 23                            # lower end of the state interval [L, 256 L)
MAX_ALPHABET = 16
SYMBOLS_HEADER_SIZE = 5                     # version byte + 32-bit state
PROBABILITY_TOLERANCE = 1e-9                # |sum(p) - 1| allowed
_STATE_HI = RANS_L << 8
_XMAX_UNIT = (RANS_L >> SYMBOLS_SCALE_BITS) << 8   # x_max(s) = f_s * 2**17

_BAD_STATE = 8       # decoder status: final state is not L

_UL = np.uint64(RANS_L)
_USCALE = np.uint64(SYMBOLS_SCALE_BITS)
_UMASK = np.uint64(SYMBOLS_TOTAL - 1)


class _SymbolModel:
    """Quantised model of one probability tuple (arrays read-only, shared via a cache)."""

    __slots__ = ("size", "freq", "cum", "xmax", "slot_symbol", "bytes_per_symbol", "c_min")

    def __init__(self, freqs: list[int]):
        self.size = len(freqs)
        freq = np.array(freqs, dtype=np.uint64)
        cum = np.zeros(self.size, dtype=np.uint64)
        cum[1:] = np.cumsum(freq)[:-1]
        self.freq = freq
        self.cum = cum
        self.xmax = freq * np.uint64(_XMAX_UNIT)
        self.slot_symbol = np.repeat(np.arange(self.size, dtype=np.uint8), freqs)
        for a in (self.freq, self.cum, self.xmax, self.slot_symbol):
            a.setflags(write=False)
        # an encoding step emits at most one byte when f_s >= 64, else at most two
        self.bytes_per_symbol = 1 if min(freqs) >= 64 else 2
        f_max = max(freqs)
        self.c_min = math.log1p((SYMBOLS_TOTAL - f_max) / f_max * (1 - 2.0**-9)) / math.log(2)

    def max_count(self, nbytes: int) -> int:
        if nbytes < SYMBOLS_HEADER_SIZE:
            return 0
        return math.floor(8 * (nbytes - 4) * (1 + 2.0**-10) / self.c_min)


def _check_probabilities(probabilities) -> tuple[float, ...]:
    if isinstance(probabilities, str | bytes) or not hasattr(probabilities, "__len__"):
        raise TypeError("probabilities must be a sequence of numbers, "
                        f"not {type(probabilities).__name__}")
    items = list(probabilities)
    if not 2 <= len(items) <= MAX_ALPHABET:
        raise ValueError(f"the alphabet must have 2 to {MAX_ALPHABET} symbols, "
                         f"got {len(items)} probabilities")
    out = []
    for i, p in enumerate(items):
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"probabilities[{i}] must be a real number, "
                            f"not {type(p).__name__}")
        p = float(p)
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"probabilities[{i}] = {p!r} is not a finite number > 0")
        out.append(p)
    total = math.fsum(out)
    if abs(total - 1) > PROBABILITY_TOLERANCE:
        raise ValueError(f"probabilities sum to {total!r}, not 1")
    return tuple(out)


@lru_cache(maxsize=64)
def _model(probabilities: tuple[float, ...]) -> _SymbolModel:
    """The quantised model of validated probabilities (see the module docstring)."""
    k = len(probabilities)
    exact = [Fraction(p) for p in probabilities]
    total = sum(exact)
    targets = [SYMBOLS_TOTAL * p / total for p in exact]
    freqs = [max(1, math.floor(t)) for t in targets]
    while sum(freqs) < SYMBOLS_TOTAL:
        i = max(range(k), key=lambda j: (targets[j] - freqs[j], -j))
        freqs[i] += 1
    while sum(freqs) > SYMBOLS_TOTAL:
        i = max((j for j in range(k) if freqs[j] > 1), key=lambda j: (freqs[j] - targets[j], -j))
        freqs[i] -= 1
    return _SymbolModel(freqs)


def quantize_probabilities(probabilities: Sequence[float]) -> np.ndarray:
    """The integer frequencies (summing to :data:`SYMBOLS_TOTAL`) the coder uses for these
    probabilities, as uint32 (the quantisation rule is in the module docstring)."""
    return _model(_check_probabilities(probabilities)).freq.astype(np.uint32)


def max_symbol_count(nbytes: int, probabilities: Sequence[float]) -> int:
    """The largest count :func:`decode_symbols` accepts for ``nbytes`` bytes of data before
    decoding (a bound no valid encoding exceeds; see the module docstring)."""
    return _model(_check_probabilities(probabilities)).max_count(int(nbytes))


@nb.njit(cache=True, nogil=True)
def _rans_encode(symbols, freq, cum, xmax, out):
    """Encode symbols into the end of out (version, state, bytes); returns the start."""
    pos = out.size
    x = _UL
    for i in range(symbols.size - 1, -1, -1):
        s = symbols[i]
        f = freq[s]
        x_max = xmax[s]
        while x >= x_max:
            pos -= 1
            out[pos] = np.uint8(x & _UFF)
            x >>= _U8
        x = ((x // f) << _USCALE) + (x % f) + cum[s]
    pos -= 4
    for j in range(4):
        out[pos + j] = np.uint8((x >> np.uint64(8 * j)) & _UFF)
    pos -= 1
    out[pos] = SYMBOLS_FORMAT_VERSION
    return pos


@nb.njit(cache=True, nogil=True)
def _rans_decode(data, x, freq, cum, slot_symbol, out):
    """Decode out.size symbols from the initial state x and data[5:]. Returns (status, i)."""
    end = data.size
    pos = SYMBOLS_HEADER_SIZE
    for i in range(out.size):
        slot = x & _UMASK
        s = slot_symbol[slot]
        out[i] = s
        x = freq[s] * (x >> _USCALE) + slot - cum[s]
        while x < _UL:
            if pos >= end:
                return _TRUNCATED, i
            x = (x << _U8) | np.uint64(data[pos])
            pos += 1
    if pos != end:
        return _TRAILING, end - pos
    if x != _UL:
        return _BAD_STATE, 0
    return _OK, 0


def _check_symbols(symbols, k: int, name: str) -> np.ndarray:
    arr = np.asarray(symbols)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if arr.dtype.kind not in "biu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "b":
        return np.ascontiguousarray(arr).view(np.uint8)
    if int(arr.max()) >= k or (arr.dtype.kind == "i" and int(arr.min()) < 0):
        i = int(np.flatnonzero((arr < 0) | (arr >= k))[0])
        raise ValueError(f"{name}[{i}] = {arr[i]} is not a symbol of the alphabet 0..{k - 1}")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def encode_symbols(symbols: np.ndarray, probabilities: Sequence[float]) -> bytes:
    """Entropy-code symbols (integers 0..K-1) under public probabilities p_0..p_{K-1}.

    Static-model rANS, format in the module docstring; the count is not included. Raises
    ValueError for a bad alphabet or probabilities, or a symbol outside 0..K-1.
    """
    return _encode(symbols, _check_probabilities(probabilities), "symbols")


def _encode(symbols, probabilities: tuple[float, ...], name: str) -> bytes:
    model = _model(probabilities)
    arr = _check_symbols(symbols, model.size, name)
    out = np.empty(SYMBOLS_HEADER_SIZE + model.bytes_per_symbol * arr.size, dtype=np.uint8)
    start = _rans_encode(arr, model.freq, model.cum, model.xmax, out)
    return out[start:].tobytes()


_SYMBOL_MESSAGES = {
    _TRUNCATED: "coded symbols are truncated (data end while decoding symbol {i})",
    _TRAILING: "{i} trailing byte(s) after the coded symbols",
    _BAD_STATE: "coded symbols: the final state is not the initial one (corrupt data, "
                "wrong count or wrong model)",
}


def _check_count(count) -> int:
    if isinstance(count, bool) or not isinstance(count, int | np.integer):
        raise TypeError(f"count must be an int, not {type(count).__name__}")
    count = int(count)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return count


def decode_symbols(data: bytes, count: int, probabilities: Sequence[float]) -> np.ndarray:
    """Decode ``count`` symbols (uint8) coded by :func:`encode_symbols` with the same
    probabilities. Anything that is not exactly such an encoding raises
    :class:`~qkdctl.wire.WireError`; ``count`` is checked against the data size first."""
    count = _check_count(count)
    model = _model(_check_probabilities(probabilities))
    try:
        buf = np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
    if buf.size < SYMBOLS_HEADER_SIZE:
        raise WireError(f"coded symbols are truncated: {buf.size} bytes, "
                        f"the header alone is {SYMBOLS_HEADER_SIZE}")
    if buf[0] != SYMBOLS_FORMAT_VERSION:
        raise WireError(f"unknown coded-symbols format version {buf[0]}")
    x = int.from_bytes(buf[1:SYMBOLS_HEADER_SIZE].tobytes(), "little")
    if not RANS_L <= x < _STATE_HI:
        raise WireError(f"coded symbols: initial state {x:#x} outside [2**23, 2**31)")
    limit = model.max_count(buf.size)
    if count > limit:
        raise WireError(f"symbol count {count} exceeds what {buf.size} bytes can hold "
                        f"under this model (at most {limit})")
    out = np.empty(count, dtype=np.uint8)
    status, index = _rans_decode(buf, np.uint64(x), model.freq, model.cum,
                                 model.slot_symbol, out)
    if status != _OK:
        raise WireError(_SYMBOL_MESSAGES[status].format(i=index))
    return out


def _bit_probabilities(p_one) -> tuple[float, float]:
    if isinstance(p_one, bool) or not isinstance(p_one, numbers.Real):
        raise TypeError(f"p_one must be a real number, not {type(p_one).__name__}")
    p_one = float(p_one)
    if not 0 < p_one < 1:
        raise ValueError(f"p_one must be in (0, 1), got {p_one!r}")
    return (1.0 - p_one, p_one)


def encode_bits(bits: np.ndarray, p_one: float) -> bytes:
    """Entropy-code flags (0/1 or bool), 1 having probability ``p_one``:
    ``encode_symbols(bits, (1 - p_one, p_one))``."""
    return _encode(bits, _check_probabilities(_bit_probabilities(p_one)), "bits")


def decode_bits(data: bytes, count: int, p_one: float) -> np.ndarray:
    """Inverse of :func:`encode_bits`: ``count`` flags as uint8 0/1."""
    return decode_symbols(data, count, _bit_probabilities(p_one))
