"""Privacy amplification by Toeplitz hashing.

The corrected key ``x`` (``n`` bits) is compressed to ``m`` bits by a random
Toeplitz matrix over GF(2), a 2-universal family (Krawczyk, CRYPTO '94, LNCS
839; Hayashi and Tsurumaru, IEEE Trans. Inf. Theory 62, 2213 (2016) for its
use in QKD with the leftover hash lemma). The matrix is given by a seed of
``n + m - 1`` uniformly random bits ``s``:

    T[i, j] = s[i - j + n - 1]        0 <= i < m, 0 <= j < n
    y[i]    = XOR_j T[i, j] & x[j]

so row 0 is ``s[n-1], s[n-2], ..., s[0]`` and column 0 is
``s[n-1], s[n], ..., s[n+m-2]``. Written with polynomials over GF(2),
``S(z) = sum s_k z^k`` and ``X(z) = sum x_j z^j``, ``y[i]`` is the coefficient
of ``z^(i + n - 1)`` in ``S(z) X(z)``: the Toeplitz product is the middle part
of a carry-less product.

Packed bit order: a bit string is packed into little-endian 64-bit words,
bit ``j`` being ``(words[j >> 6] >> (j & 63)) & 1``; this is
``np.packbits(bits, bitorder="little")`` viewed as ``"<u8"``
(:func:`pack_bits`, :func:`unpack_bits`). Bits past the end of a packed
input are ignored; the packed output has them zero.

Backends (:func:`available_backends` lists those usable here, fastest first;
:func:`backend` tells which one is used by default):

``"vpclmulqdq512"``, ``"vpclmulqdq256"``, ``"pclmulqdq"``
    Exact GF(2)[z] arithmetic on packed words with the x86 carry-less
    multiply, reached from numba through intrinsics that emit
    ``llvm.x86.pclmulqdq`` (128-bit, one 64 x 64 product per instruction) or
    its AVX2 / AVX-512 forms ``llvm.x86.pclmulqdq.256`` / ``.512`` (2 or 4
    products). The m x n product is cut into square Toeplitz blocks; each
    square block is done by the Karatsuba recursion for Toeplitz matrices
    (the transposed Karatsuba, or middle product, of Hanrot, Quercia and
    Zimmermann, AAECC 14, 415 (2004)): with ``T = [[A, B], [C, A]]`` of
    half-size Toeplitz blocks and ``x = (x0, x1)``,

        P0 = A (x0 + x1),  P1 = (B + A) x1,  P2 = (C + A) x0
        y0 = P0 + P1,      y1 = P0 + P2

    three half-size products instead of four, and only the m wanted output
    words are ever formed (half or less of the work of taking them out of the
    full product). Blocks of at most 16 vectors' worth of words are done by
    schoolbook products summed along the anti-diagonals. Each variant needs
    its instructions both on the CPU and in numba's target machine
    (``+pclmul``; ``+vpclmulqdq`` with ``+avx`` or ``+avx512f``).
``"fft"``
    The same convolution in float64 with numpy's FFT, rounded and reduced
    mod 2 (:func:`toeplitz_fft`, with the rounding bound that makes it
    exact). The portable fallback, about 10 times slower.

Setting ``QKDCTL_PA_BACKEND`` to one of these names overrides the default.
"""

from __future__ import annotations

import functools
import os

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "amplify",
    "amplify_seed_length",
    "available_backends",
    "backend",
    "clmul64",
    "clmul_reference",
    "has_pclmul",
    "pack_bits",
    "seed_length",
    "toeplitz_fft",
    "toeplitz_hash",
    "toeplitz_hash_packed",
    "toeplitz_reference",
    "unpack_bits",
]

FFT_BLOCK_BITS = 1 << 22   # the FFT backend cuts larger products into blocks of this size

# carry-less backends, best first: (name, numba target features needed, words per vector).
# Square blocks of up to 16 x (words per vector) words are done by schoolbook products
# (the best threshold measured on an AMD Zen 4 for each width).
_CLMUL_BACKENDS = (
    ("vpclmulqdq512", ("+vpclmulqdq", "+avx512f"), 8),
    ("vpclmulqdq256", ("+vpclmulqdq", "+avx"), 4),
    ("pclmulqdq", ("+pclmul",), 2),
)
_BASE_WORDS = {name: 16 * lanes for name, _, lanes in _CLMUL_BACKENDS}
# The kernels take a marker scalar whose numba type picks the vector width, so that
# each variant is compiled (and cached) only when it is used on a CPU that has it.
_MARKERS = {"vpclmulqdq512": np.int32(0), "vpclmulqdq256": np.int16(0), "pclmulqdq": np.int8(0)}
_LANES = {types.int32: 8, types.int16: 4, types.int8: 2}


# ---------------------------------------------------------------- CPU support

@functools.cache
def _target_features() -> frozenset[str]:
    """Features enabled in numba's JIT target machine, when the host CPU agrees."""
    try:
        import llvmlite.binding as llvm
        from numba.core.registry import cpu_target

        host = llvm.get_host_cpu_features()
        feats = str(cpu_target.target_context.codegen()._tm_features).split(",")
    except Exception:  # pragma: no cover - unusual numba/llvmlite builds
        return frozenset()
    return frozenset(f for f in feats if f.startswith("+") and host.get(f[1:], False))


def has_pclmul() -> bool:
    """True when PCLMULQDQ can be used from numba-compiled code on this machine.

    Both must hold: the host CPU reports ``pclmul`` (llvmlite's view of CPUID)
    and the feature string of numba's JIT target machine enables ``+pclmul``
    (it does not when ``NUMBA_CPU_NAME=generic`` or ``NUMBA_CPU_FEATURES``
    leaves it out, and emitting the instruction would then fail).
    """
    return "+pclmul" in _target_features()


def available_backends() -> list[str]:
    """The Toeplitz backends usable here, fastest first; ``"fft"`` is always last."""
    names = [name for name, need, _ in _CLMUL_BACKENDS
             if has_pclmul() and all(f in _target_features() for f in need)]
    return names + ["fft"]


def backend() -> str:
    """The Toeplitz backend used by default (see the module docstring).

    The fastest of :func:`available_backends`, unless the environment variable
    ``QKDCTL_PA_BACKEND`` names another one (ValueError if it is not available).
    """
    forced = os.environ.get("QKDCTL_PA_BACKEND", "").strip().lower()
    avail = available_backends()
    if forced:
        if forced not in avail:
            raise ValueError(f"QKDCTL_PA_BACKEND={forced!r} is not available here: {avail}")
        return forced
    return avail[0]


# ---------------------------------------------------------------- carry-less multiply

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _clmul_fn(builder: ir.IRBuilder, lanes: int) -> tuple[ir.Function, ir.VectorType]:
    vt = ir.VectorType(_I64, lanes)
    name = {2: "llvm.x86.pclmulqdq", 4: "llvm.x86.pclmulqdq.256",
            8: "llvm.x86.pclmulqdq.512"}[lanes]
    fnty = ir.FunctionType(vt, [vt, vt, _I8])
    return cgutils.get_or_insert_function(builder.module, fnty, name), vt


@intrinsic
def _pclmul(typingctx, a, b):
    """``(lo, hi)`` of the 128-bit carry-less product of two uint64 (PCLMULQDQ)."""
    sig = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        fn, v2 = _clmul_fn(builder, 2)
        zero = ir.Constant(_I32, 0)
        va = builder.insert_element(ir.Constant(v2, None), args[0], zero)
        vb = builder.insert_element(ir.Constant(v2, None), args[1], zero)
        r = builder.call(fn, [va, vb, ir.Constant(_I8, 0)])
        lo = builder.extract_element(r, zero)
        hi = builder.extract_element(r, ir.Constant(_I32, 1))
        return context.make_tuple(builder, signature.return_type, [lo, hi])

    return sig, codegen


def _is_words(t) -> bool:
    return (isinstance(t, types.Array) and t.dtype == types.uint64 and t.ndim == 1
            and t.layout == "C")


@intrinsic
def _clmul_rows(typingctx, tag, s, si, x, xi, c, out, oi):
    """Carry-less products summed along anti-diagonals, a vector of them at once.

    With ``L`` words per vector (from the type of ``tag``), for ``t < L``:
    ``P_t = XOR_{b < c} s[si + t - b] * x[xi + b]`` (128 bits), stored as
    ``out[oi + 2t]`` (low word) and ``out[oi + 2t + 1]`` (high word). Reads
    ``s[si - c + 1 .. si + L - 1]``. Returns ``L``.
    """
    lanes = _LANES.get(tag)
    if lanes is None or not (_is_words(s) and _is_words(x) and _is_words(out)):
        return None
    sig = types.intp(tag, s, types.intp, x, types.intp, types.intp, out, types.intp)

    def codegen(context, builder, signature, args):
        _, sv_, si_, xv_, xi_, c_, ov_, oi_ = args
        fn, vt = _clmul_fn(builder, lanes)
        sa = context.make_array(signature.args[1])(context, builder, sv_)
        xa = context.make_array(signature.args[3])(context, builder, xv_)
        oa = context.make_array(signature.args[6])(context, builder, ov_)
        zero = ir.Constant(vt, [0] * lanes)
        acc_even = cgutils.alloca_once_value(builder, zero)   # P_t for even t
        acc_odd = cgutils.alloca_once_value(builder, zero)    # P_t for odd t
        splat = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
        with cgutils.for_range(builder, c_) as loop:
            b = loop.index
            sp = builder.gep(sa.data, [builder.sub(si_, b)])
            sw = builder.load(builder.bitcast(sp, vt.as_pointer()), align=8)
            xw = builder.load(builder.gep(xa.data, [builder.add(xi_, b)]))
            xw = builder.insert_element(ir.Constant(vt, None), xw, ir.Constant(_I32, 0))
            xw = builder.shuffle_vector(xw, ir.Constant(vt, None), splat)
            pe = builder.call(fn, [sw, xw, ir.Constant(_I8, 0x00)])   # even words of s
            po = builder.call(fn, [sw, xw, ir.Constant(_I8, 0x01)])   # odd words of s
            builder.store(builder.xor(builder.load(acc_even), pe), acc_even)
            builder.store(builder.xor(builder.load(acc_odd), po), acc_odd)
        mask = []
        for t in range(lanes):
            mask += [t, t + 1] if t % 2 == 0 else [lanes + t - 1, lanes + t]
        res = builder.shuffle_vector(builder.load(acc_even), builder.load(acc_odd),
                                     ir.Constant(ir.VectorType(_I32, 2 * lanes), mask))
        op = builder.gep(oa.data, [oi_])
        builder.store(res, builder.bitcast(op, ir.VectorType(_I64, 2 * lanes).as_pointer()),
                      align=8)
        return context.get_constant(types.intp, lanes)

    return sig, codegen


@nb.njit(cache=True)
def _clmul64(a, b):
    return _pclmul(a, b)


def clmul64(a: int, b: int) -> tuple[int, int]:
    """``(lo, hi)`` words of the carry-less product of two uint64, by PCLMULQDQ.

    RuntimeError where :func:`has_pclmul` is false (the instruction cannot be emitted).
    """
    if not has_pclmul():
        raise RuntimeError("PCLMULQDQ is not available to numba on this machine")
    lo, hi = _clmul64(np.uint64(a), np.uint64(b))
    return int(lo), int(hi)


def clmul_reference(a: int, b: int) -> int:
    """Carry-less product of two non-negative Python ints (shift and xor)."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        b >>= 1
    return r


# ---------------------------------------------------------------- numba kernels
#
# Word-level form. With x packed into K words and the seed into K + R words
# (aligned as in _hash_words_clmul), output word I of an R x K Toeplitz product is
#
#     y[I] = XOR_b  hi(s[K+I-b-1] * x[b])  ^  lo(s[K+I-b] * x[b])
#
# a block-Toeplitz structure in which each entry is a window of two seed
# words. A sub-block of rows I0.. (R' of them) and columns b0.. (C' of them)
# is again of this form with the seed words from s[K + I0 - b0 - C'].
# Seed arrays carry 8 readable words past every window (the vector loads of
# _clmul_rows run past it; those products are not used).

@nb.njit(cache=True, nogil=True)
def _base(tag, s, so, x, xo, y, yo, r, c, ws, wo):
    """Schoolbook: ``y[yo:yo+r] ^= T x`` for an r x c block, seed s[so:so+c+r].

    ``P_k = XOR_b s[k-b] x[b]`` for ``k = c-1 .. c+r-1`` goes to ws[wo:], then
    ``y[I] = lo(P_{c+I}) ^ hi(P_{c+I-1})``. Needs ``2 (r + 9)`` scratch words.
    """
    g = 0
    while g <= r:
        g += _clmul_rows(tag, s, so + c - 1 + g, x, xo, c, ws, wo + 2 * g)
    for i in range(r):
        y[yo + i] ^= ws[wo + 2 * i + 2] ^ ws[wo + 2 * i + 1]


_STACK = 160   # frames of the explicit recursion stack (one per halving level, plus one)


@nb.njit(cache=True, nogil=True)
def _square(tag, base, s, so, x, xo, y, yo, n, ws, st):
    """``y[yo:yo+n] ^= T x`` for an n x n block, seed s[so:so+2n]; ws, st are scratch.

    With ``h = n/2``: ``x0, x1`` the halves of x, ``y0, y1`` of y, and the
    half-size Toeplitz blocks ``A = s[so+h : so+3h]``, ``B = s[so : so+2h]``,
    ``C = s[so+2h : so+4h]``:

        P0 = A (x0 + x1)  -> y0 and y1
        P1 = (B + A) x1   -> y0
        P2 = (C + A) x0   -> y1

    An odd n peels the last column and row off first. Blocks of at most
    ``base`` words are done by :func:`_base`. The recursion runs on an
    explicit stack (numba's cache cannot hold recursive functions, numba
    issue #6061); a frame's scratch (x0 + x1, P0, the seed sums: 4h words)
    is at ws[wo:], its children's after it; ``st`` is the stack, int64
    ``(_STACK, 9)``. Arrays are named by 0 (the caller's s, x or y) or 1 (ws).
    """
    # frame: s id, s offset, x id, x offset, y id, y offset, n, ws offset, stage
    st[0, 0] = 0
    st[0, 1] = so
    st[0, 2] = 0
    st[0, 3] = xo
    st[0, 4] = 0
    st[0, 5] = yo
    st[0, 6] = n
    st[0, 7] = 0
    st[0, 8] = 0
    top = 1
    while top > 0:
        top -= 1
        sid, fo, xid, fx, yid, fy, m, wo, stage = st[top]
        ss_ = s if sid == 0 else ws
        xx = x if xid == 0 else ws
        yy = y if yid == 0 else ws
        if m <= base:
            _base(tag, ss_, fo, xx, fx, yy, fy, m, m, ws, wo)
            continue
        if m & 1:
            # last column and last row, then the (m-1) x (m-1) block in this frame
            xl = xx[fx + m - 1]
            for i in range(m - 1):
                _, hi = _pclmul(ss_[fo + i], xl)
                lo, _ = _pclmul(ss_[fo + i + 1], xl)
                yy[fy + i] ^= hi ^ lo
            acc = np.uint64(0)
            for b in range(m):
                _, hi = _pclmul(ss_[fo + 2 * m - 2 - b], xx[fx + b])
                lo, _ = _pclmul(ss_[fo + 2 * m - 1 - b], xx[fx + b])
                acc ^= hi ^ lo
            yy[fy + m - 1] ^= acc
            st[top, 1] = fo + 1
            st[top, 6] = m - 1
            top += 1
            continue
        h = m >> 1
        xs = wo            # x0 ^ x1     (h words)
        tp = wo + h        # P0          (h words)
        sm = wo + 2 * h    # seed sums   (2h words)
        child = wo + 4 * h
        st[top, 8] = stage + 1   # come back to this frame after the child below
        if stage == 0:
            for i in range(h):
                ws[xs + i] = xx[fx + i] ^ xx[fx + h + i]
                ws[tp + i] = 0
            top += 1
            ch = (sid, fo + h, 1, xs, 1, tp, h, child, 0)              # P0 = A (x0 + x1)
        elif stage == 1:
            for i in range(h):
                p = ws[tp + i]
                yy[fy + i] ^= p
                yy[fy + h + i] ^= p
            for i in range(2 * h):
                ws[sm + i] = ss_[fo + i] ^ ss_[fo + h + i]
            top += 1
            ch = (1, sm, xid, fx + h, yid, fy, h, child, 0)            # P1 = (B + A) x1
        else:
            for i in range(2 * h):
                ws[sm + i] = ss_[fo + 2 * h + i] ^ ss_[fo + h + i]
            ch = (1, sm, xid, fx, yid, fy + h, h, child, 0)            # P2 = (C + A) x0
        for k in range(9):
            st[top, k] = ch[k]
        top += 1


def _workspace_words(n: int, base: int) -> int:
    """Scratch words that _square needs for an n x n block."""
    return 4 * n + 2 * base + 64


@nb.njit(cache=True, nogil=True)
def _toeplitz_words(tag, base, s, x, y, r, c, ws):
    """``y[:r] ^= T x`` for the r x c word-level Toeplitz product, seed s[:c+r].

    Cut into square blocks (like Euclid's algorithm on (r, c)), each done by
    :func:`_square`.
    """
    st = np.empty((_STACK, 9), np.int64)
    so = 0
    xo = 0
    yo = 0
    while r > 0 and c > 0:
        if c >= r:
            q = c // r
            for t in range(q):
                _square(tag, base, s, so + c - t * r - r, x, xo + t * r, y, yo, r, ws, st)
            xo += q * r
            c -= q * r
        else:
            q = r // c
            for t in range(q):
                _square(tag, base, s, so + t * c, x, xo, y, yo + t * c, c, ws, st)
            so += q * c
            yo += q * c
            r -= q * c


@nb.njit(cache=True, nogil=True)
def _shift_into(src, nbits, shift, dst):
    """Write bits 0..nbits-1 of the packed ``src`` at bit ``shift`` (< 64) of zeroed ``dst``."""
    nw = (nbits + 63) >> 6
    rem = nbits & 63
    for w in range(nw):
        v = src[w]
        if w == nw - 1 and rem:
            v &= (np.uint64(1) << np.uint64(rem)) - np.uint64(1)
        if shift == 0:
            dst[w] ^= v
        else:
            dst[w] ^= v << np.uint64(shift)
            if w + 1 < dst.shape[0]:
                dst[w + 1] ^= v >> np.uint64(64 - shift)


# ---------------------------------------------------------------- packing

def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a 0/1 uint8 (or bool) array into little-endian uint64 words (see module docstring).

    Any non-zero byte counts as 1; the last word is zero-padded.
    """
    bits = np.ascontiguousarray(bits)
    if bits.dtype != np.uint8 and bits.dtype != np.bool_:
        bits = bits != 0
    n = bits.shape[0]
    nbytes = ((n + 63) >> 6) << 3
    packed = np.packbits(bits.view(np.uint8), bitorder="little")
    if packed.shape[0] != nbytes:
        packed = np.concatenate([packed, np.zeros(nbytes - packed.shape[0], np.uint8)])
    return packed.view("<u8")


def unpack_bits(words: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` bits of packed little-endian uint64 ``words`` as a uint8 0/1 array."""
    w = np.ascontiguousarray(words, dtype="<u8")
    return np.unpackbits(w.view(np.uint8), count=n, bitorder="little")


# ---------------------------------------------------------------- validation

def seed_length(n: int, m: int) -> int:
    """Seed bits of an m x n Toeplitz matrix: ``n + m - 1`` (0 when n == 0)."""
    n = int(n)
    m = int(m)
    if n < 0:
        raise ValueError(f"input length n must be >= 0, got {n}")
    if m < 0:
        raise ValueError(f"output length m must be >= 0, got {m}")
    if m > n:
        raise ValueError(f"output length m={m} exceeds input length n={n}")
    return max(n + m - 1, 0)


def _check_bits(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of bits, got shape {a.shape}")
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer 0/1 values, got dtype {a.dtype}")
    if a.size and (a.max() > 1 or (a.dtype.kind == "i" and a.min() < 0)):
        raise ValueError(f"{name} must hold only 0 and 1")
    return a.astype(np.uint8, copy=False)


def _check_sizes(n: int, m: int, seed_bits: int) -> None:
    need = seed_length(n, m)
    if seed_bits != need:
        raise ValueError(
            f"seed has {seed_bits} bits, a {m} x {n} Toeplitz matrix needs n + m - 1 = {need}")


def _check_words(w: np.ndarray, nbits: int, name: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 1 or w.dtype.kind not in "iu" or w.dtype.itemsize != 8:
        raise ValueError(f"{name} must be a 1-D array of 64-bit words, got {w.dtype} {w.shape}")
    need = (nbits + 63) >> 6
    if w.shape[0] < need:
        raise ValueError(f"{name} has {w.shape[0]} words, {nbits} bits need {need}")
    return np.ascontiguousarray(w).astype("<u8", copy=False).view(np.uint64)


# ---------------------------------------------------------------- public API

def _hash_words_clmul(xw: np.ndarray, n: int, m: int, sw: np.ndarray, meth: str) -> np.ndarray:
    """Packed Toeplitz product on a carry-less backend (sizes already validated, m >= 1)."""
    kw = (n + 63) >> 6
    rw = (m + 63) >> 6
    # X'(z) = X(z) z^d fills kw words exactly at the top; S'(z) = S(z) z. Then
    # y[i] is the coefficient of z^(i + 64 kw) of S' X': output word I is word kw + I.
    d = (-n) & 63
    xp = np.zeros(kw, np.uint64)
    _shift_into(xw, n, d, xp)
    sp = np.zeros(kw + rw + 8, np.uint64)
    _shift_into(sw, n + m - 1, 1, sp)
    y = np.zeros(rw, np.uint64)
    base = _BASE_WORDS[meth]
    ws = np.zeros(_workspace_words(min(kw, rw), base), np.uint64)
    _toeplitz_words(_MARKERS[meth], base, sp, xp, y, rw, kw, ws)
    if m & 63:
        y[-1] &= np.uint64((1 << (m & 63)) - 1)
    return y


def toeplitz_hash_packed(words: np.ndarray, n: int, out_bits: int, seed_words: np.ndarray,
                         *, method: str | None = None) -> np.ndarray:
    """Toeplitz hash of ``n`` packed bits to ``out_bits`` packed bits.

    ``words`` holds the input (at least ``ceil(n/64)`` uint64 words),
    ``seed_words`` the ``n + out_bits - 1`` seed bits, both in the packed bit
    order of the module docstring; bits past the end are ignored. Returns
    ``ceil(out_bits/64)`` uint64 words with the bits past ``out_bits`` zero.
    ``method`` is ``None`` (the :func:`backend`) or one of :func:`available_backends`.
    """
    n = int(n)
    m = int(out_bits)
    ns = seed_length(n, m)
    xw = _check_words(words, n, "words")
    sw = _check_words(seed_words, ns, "seed_words")
    meth = _method(method)
    if m == 0:
        return np.zeros(0, np.uint64)
    if meth != "fft":
        return _hash_words_clmul(xw, n, m, sw, meth)
    y = toeplitz_fft(unpack_bits(xw, n), m, unpack_bits(sw, ns))
    return pack_bits(y)


def toeplitz_hash(bits: np.ndarray, out_bits: int, seed_bits: np.ndarray,
                  *, method: str | None = None) -> np.ndarray:
    """``y = T x`` over GF(2) with ``T[i, j] = seed_bits[i - j + n - 1]``.

    ``bits``: the ``n`` input bits (uint8 or bool, values 0/1); ``seed_bits``:
    ``n + out_bits - 1`` uniformly random bits. Returns ``out_bits`` bits as a
    uint8 0/1 array. ``method`` is ``None`` (the :func:`backend`) or one of
    :func:`available_backends`. Raises ValueError on bad sizes or non-bit values.
    """
    x = _check_bits(bits, "bits")
    s = _check_bits(seed_bits, "seed_bits")
    n = x.shape[0]
    m = int(out_bits)
    _check_sizes(n, m, s.shape[0])
    meth = _method(method)
    if m == 0:
        return np.zeros(0, np.uint8)
    if meth == "fft":
        return toeplitz_fft(x, m, s)
    y = _hash_words_clmul(pack_bits(x), n, m, pack_bits(s), meth)
    return unpack_bits(y, m)


def amplify_seed_length(n: int, m: int) -> int:
    """Seed bits of :func:`amplify` from ``n`` bits to ``m``: ``n - 1`` when ``m <= n / 2``,
    else ``n + m - 1`` (the plain Toeplitz hash), 0 when ``m == n``."""
    n, m = int(n), int(m)
    if not 0 <= m <= n:
        raise ValueError(f"output length m={m} must be in 0..n={n}")
    if m == n:
        return 0
    return seed_length(n - m, m) if 2 * m <= n else seed_length(n, m)


def amplify(bits: np.ndarray, out_bits: int, seed_bits: np.ndarray,
            *, method: str | None = None) -> np.ndarray:
    """Privacy amplification by the modified Toeplitz hash ``y = (I | T) x``.

    ``y = x[:m] XOR T x[m:]`` with ``T`` the ``m x (n - m)`` Toeplitz matrix of
    :func:`toeplitz_hash` over the ``n - 1`` seed bits. The family is universal_2
    (for ``x != x'`` with ``d = x - x'``: if ``d[m:] = 0`` the outputs differ; else
    ``T d[m:]`` is uniform, so they collide with probability ``2^-m``), as the
    leftover hash lemma needs, with ``m`` fewer seed bits than the plain Toeplitz
    hash: Hayashi and Tsurumaru, IEEE Trans. Inf. Theory 62, 2213 (2016). The seed
    is sent over the classical channel for every block, so this saves a quarter
    of privacy amplification's traffic at the default bench's compression. When
    ``m > n / 2`` the plain Toeplitz hash ``T x`` (``n + m - 1`` seed bits) is used.
    """
    x = _check_bits(bits, "bits")
    n, m = x.shape[0], int(out_bits)
    s = _check_bits(seed_bits, "seed_bits")
    if s.shape[0] != amplify_seed_length(n, m):
        raise ValueError(f"seed has {s.shape[0]} bits; {amplify_seed_length(n, m)} needed "
                         f"to hash {n} bits to {m}")
    if m == n:
        return x.copy()
    if 2 * m > n:
        return toeplitz_hash(x, m, s, method=method)
    return x[:m] ^ toeplitz_hash(x[m:], m, s, method=method)


def _method(method: str | None) -> str:
    if method is None:
        return backend()
    avail = available_backends()
    if method not in avail:
        raise ValueError(f"method {method!r} is not available here; available: {avail}")
    return method


def _fast_len(k: int) -> int:
    """Smallest 2^a 3^b 5^c >= k (sizes numpy's pocketfft handles fastest)."""
    best = 1 << max(k - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            q = p35
            while q < k:
                q <<= 1
            best = min(best, q)
            p35 *= 3
        p5 *= 5
    return best


def _fft_block(x: np.ndarray, m: int, s: np.ndarray) -> np.ndarray:
    """One m x n Toeplitz product by float64 FFT, as exact integer parities."""
    n = x.shape[0]
    size = _fast_len(n + m - 1)
    fs = np.fft.rfft(s.astype(np.float64), size)
    fs *= np.fft.rfft(x.astype(np.float64), size)
    c = np.fft.irfft(fs, size)[n - 1:n - 1 + m]
    r = np.rint(c)
    if float(np.max(np.abs(c - r))) > 0.25:
        raise RuntimeError("FFT rounding error too large for an exact Toeplitz product")
    return (r.astype(np.int64) & 1).astype(np.uint8)


def toeplitz_fft(bits: np.ndarray, out_bits: int, seed_bits: np.ndarray) -> np.ndarray:
    """Toeplitz hash by float64 FFT convolution (the portable backend).

    ``S * X`` is computed as a cyclic convolution of length ``L >= n + m - 1``
    (the smallest 2^a 3^b 5^c): the wanted coefficients ``n-1 .. n+m-2`` of
    the linear convolution (length ``2n + m - 2``) do not wrap. The exact
    coefficients are integers in ``[0, n]``; they are rounded and taken mod 2.
    Matrices larger than ``FFT_BLOCK_BITS`` in either dimension are cut into
    Toeplitz blocks of at most that size (block rows ``i0..``, columns
    ``j0..j0+C-1`` use the seed bits from ``i0 - j0 + n - C``), so ``L <= 2^23``.

    Rounding: with 0/1 inputs, ``||s||_2 ||x||_2 <= L``. Percival's bound for
    an FFT convolution of length ``2^k`` (Math. Comp. 72, 387 (2003)) is
    ``||s|| ||x|| ((1+e)^(3k) (1+e sqrt 5)^(3k+1) (1+b)^(3k) - 1)`` with
    ``e = 2^-53`` and ``b`` the error of the twiddle factors (about ``e``
    with pocketfft's accurate tables): about ``L * 300 e`` = 3e-7 at
    ``L = 2^23``, six orders of magnitude below the 0.5 that rounding
    tolerates (mixed radices change only the constant). The largest distance
    to an integer is also checked at run time (RuntimeError above 0.25).
    """
    x = _check_bits(bits, "bits")
    s = _check_bits(seed_bits, "seed_bits")
    n = x.shape[0]
    m = int(out_bits)
    _check_sizes(n, m, s.shape[0])
    if m == 0:
        return np.zeros(0, np.uint8)
    y = np.zeros(m, np.uint8)
    blk = FFT_BLOCK_BITS
    for i0 in range(0, m, blk):
        r = min(blk, m - i0)
        for j0 in range(0, n, blk):
            c = min(blk, n - j0)
            lo = i0 - j0 + n - c
            y[i0:i0 + r] ^= _fft_block(x[j0:j0 + c], r, s[lo:lo + c + r - 1])
    return y


def toeplitz_reference(bits: np.ndarray, out_bits: int, seed_bits: np.ndarray) -> np.ndarray:
    """Toeplitz hash from the explicit m x n matrix (plain numpy; small sizes, for tests)."""
    x = _check_bits(bits, "bits")
    s = _check_bits(seed_bits, "seed_bits")
    n = x.shape[0]
    m = int(out_bits)
    _check_sizes(n, m, s.shape[0])
    if m == 0:
        return np.zeros(0, np.uint8)
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    t = s[i - j + n - 1].astype(np.int64)
    return ((t @ x.astype(np.int64)) & 1).astype(np.uint8)
