"""Toeplitz hashing for privacy amplification: every backend against the explicit matrix."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from qkdctl.postprocess import privacy as pa

CLMUL = [b for b in pa.available_backends() if b != "fft"]
ALL = pa.available_backends()
needs_clmul = pytest.mark.skipif(not CLMUL, reason="no carry-less multiply on this CPU")

EDGE_SIZES = [(1, 0), (1, 1), (2, 1), (2, 2), (63, 63), (64, 1), (64, 64), (65, 64),
              (65, 65), (127, 63), (127, 127), (128, 64), (128, 128), (129, 1), (129, 128),
              (129, 129), (200, 199), (257, 3), (640, 320), (1000, 1000), (1029, 515)]


def _random_case(rng, n, m):
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, pa.seed_length(n, m), dtype=np.uint8)
    return x, s


def _rand_words(rng, k):
    return rng.integers(0, 2**64, k, dtype=np.uint64)


def _int_of(words) -> int:
    return sum(int(w) << (64 * i) for i, w in enumerate(words))


# ---------------------------------------------------------------- the convention

def test_convention_small():
    # T[i, j] = s[i - j + n - 1]: row 0 is s[n-1] .. s[0], column 0 is s[n-1] .. s[n+m-2]
    n, m = 3, 2
    s = np.array([1, 0, 0, 1], np.uint8)
    t = [[int(s[i - j + n - 1]) for j in range(n)] for i in range(m)]
    assert t == [[0, 0, 1], [1, 0, 0]]
    assert list(pa.toeplitz_reference(np.array([1, 0, 0], np.uint8), m, s)) == [0, 1]
    assert list(pa.toeplitz_reference(np.array([0, 0, 1], np.uint8), m, s)) == [1, 0]
    for meth in ALL:
        assert list(pa.toeplitz_hash(np.array([1, 1, 1], np.uint8), m, s, method=meth)) == [1, 1]


def test_seed_length():
    assert pa.seed_length(10, 4) == 13
    assert pa.seed_length(1, 1) == 1
    assert pa.seed_length(5, 0) == 4
    assert pa.seed_length(0, 0) == 0


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("meth", ALL)
def test_edge_sizes_match_matrix(meth):
    rng = np.random.default_rng(11)
    for n, m in EDGE_SIZES:
        x, s = _random_case(rng, n, m)
        want = pa.toeplitz_reference(x, m, s)
        got = pa.toeplitz_hash(x, m, s, method=meth)
        assert got.dtype == np.uint8 and got.shape == (m,)
        assert np.array_equal(got, want), (meth, n, m)


@pytest.mark.parametrize("meth", ALL)
def test_random_sizes_match_matrix(meth):
    rng = np.random.default_rng(12)
    for _ in range(150):
        n = int(rng.integers(1, 700))
        m = int(rng.integers(0, n + 1))
        x, s = _random_case(rng, n, m)
        assert np.array_equal(pa.toeplitz_hash(x, m, s, method=meth),
                              pa.toeplitz_reference(x, m, s)), (meth, n, m)


@needs_clmul
@pytest.mark.parametrize("meth", CLMUL)
@pytest.mark.parametrize("base", [1, 2, 3, 5])
def test_square_kernel_matches_product(meth, base):
    # the word-level Karatsuba recursion against the middle of a big-int carry-less product:
    # y[I] = word n + I of S * X; small schoolbook thresholds exercise every branch
    rng = np.random.default_rng(13 + base)
    tag = pa._MARKERS[meth]
    for n in list(range(1, 34)) + [47, 64, 95]:
        s = _rand_words(rng, 2 * n + 8)
        x = _rand_words(rng, n)
        y0 = _rand_words(rng, n)
        y = y0.copy()
        ws = np.zeros(pa._workspace_words(n, base), np.uint64)
        pa._square(tag, base, s, 0, x, 0, y, 0, n, ws, np.empty((pa._STACK, 9), np.int64))
        prod = pa.clmul_reference(_int_of(s[:2 * n]), _int_of(x))
        want = ((prod >> (64 * n)) & ((1 << (64 * n)) - 1)) ^ _int_of(y0)
        assert _int_of(y) == want, (meth, base, n)


@needs_clmul
@pytest.mark.parametrize("meth", CLMUL)
def test_rectangular_kernel_matches_product(meth):
    rng = np.random.default_rng(14)
    tag = pa._MARKERS[meth]
    for _ in range(60):
        r = int(rng.integers(1, 40))
        c = int(rng.integers(1, 40))
        s = _rand_words(rng, r + c + 8)
        x = _rand_words(rng, c)
        y = np.zeros(r, np.uint64)
        ws = np.zeros(pa._workspace_words(min(r, c), 3), np.uint64)
        pa._toeplitz_words(tag, 3, s, x, y, r, c, ws)
        prod = pa.clmul_reference(_int_of(s[:r + c]), _int_of(x))
        assert _int_of(y) == (prod >> (64 * c)) & ((1 << (64 * r)) - 1), (r, c)


@needs_clmul
def test_clmul64_matches_reference():
    rng = np.random.default_rng(15)
    vals = [0, 1, 2**63, 2**64 - 1, 0x8000000000000001]
    vals += [int(v) for v in _rand_words(rng, 50)]
    for a in vals:
        for b in vals[:12]:
            lo, hi = pa.clmul64(a, b)
            assert (hi << 64) | lo == pa.clmul_reference(a, b)


def test_fft_matches_fast_path_on_a_larger_size():
    rng = np.random.default_rng(16)
    n = (1 << 16) + 37
    for m in (n // 2, 1000, n):
        x, s = _random_case(rng, n, m)
        want = pa.toeplitz_fft(x, m, s)
        for meth in CLMUL:
            assert np.array_equal(pa.toeplitz_hash(x, m, s, method=meth), want), (meth, m)
        # an independent check of the FFT itself on a slice of rows
        rows = slice(m // 3, m // 3 + 200)
        sub = s[rows.start:rows.start + n + 199]
        assert np.array_equal(pa.toeplitz_fft(x, 200, sub), want[rows])


def test_fft_blocks(monkeypatch):
    rng = np.random.default_rng(17)
    monkeypatch.setattr(pa, "FFT_BLOCK_BITS", 37)
    for n, m in [(1, 1), (37, 37), (38, 1), (100, 99), (250, 75), (301, 301)]:
        x, s = _random_case(rng, n, m)
        assert np.array_equal(pa.toeplitz_fft(x, m, s), pa.toeplitz_reference(x, m, s))


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize("meth", ALL)
def test_linearity(meth):
    rng = np.random.default_rng(18)
    for n, m in [(1000, 400), (4097, 4097), (20000, 7001)]:
        x1, s = _random_case(rng, n, m)
        x2 = rng.integers(0, 2, n, dtype=np.uint8)
        y1 = pa.toeplitz_hash(x1, m, s, method=meth)
        y2 = pa.toeplitz_hash(x2, m, s, method=meth)
        assert np.array_equal(pa.toeplitz_hash(x1 ^ x2, m, s, method=meth), y1 ^ y2)
        assert not pa.toeplitz_hash(np.zeros(n, np.uint8), m, s, method=meth).any()


def test_output_of_random_seed_is_balanced():
    # for a fixed non-zero x each output bit is the parity of independent uniform seed bits
    rng = np.random.default_rng(19)
    n, m, trials = 3000, 1000, 100
    x = np.zeros(n, np.uint8)
    x[[5, 700, 2999]] = 1
    total = np.zeros(m)
    for _ in range(trials):
        s = rng.integers(0, 2, pa.seed_length(n, m), dtype=np.uint8)
        total += pa.toeplitz_hash(x, m, s)
    frac = total.sum() / (m * trials)
    assert abs(frac - 0.5) < 5 * 0.5 / np.sqrt(m * trials)
    per_bit = total / trials
    assert abs(per_bit.mean() - 0.5) < 0.01 and per_bit.min() > 0.2 and per_bit.max() < 0.8


# ---------------------------------------------------------------- packed form

def test_pack_unpack_roundtrip():
    rng = np.random.default_rng(20)
    for n in (0, 1, 7, 8, 63, 64, 65, 1000):
        b = rng.integers(0, 2, n, dtype=np.uint8)
        w = pa.pack_bits(b)
        assert w.shape == ((n + 63) // 64,) and w.dtype == np.dtype("<u8")
        assert np.array_equal(pa.unpack_bits(w, n), b)
        for j in range(n):
            assert (int(w[j >> 6]) >> (j & 63)) & 1 == b[j]


@pytest.mark.parametrize("meth", ALL)
def test_packed_matches_unpacked_and_ignores_padding(meth):
    rng = np.random.default_rng(21)
    for n, m in [(1, 1), (100, 37), (129, 65), (5000, 2500)]:
        x, s = _random_case(rng, n, m)
        xw = pa.pack_bits(x)
        sw = pa.pack_bits(s)
        if n % 64:
            xw[-1] |= np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(n % 64)   # garbage past n
        if len(s) % 64:
            sw[-1] |= np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(len(s) % 64)
        y = pa.toeplitz_hash_packed(xw, n, m, sw, method=meth)
        assert y.shape == ((m + 63) // 64,)
        assert np.array_equal(pa.unpack_bits(y, m), pa.toeplitz_reference(x, m, s))
        assert np.array_equal(pa.unpack_bits(y, 64 * len(y))[m:], np.zeros(64 * len(y) - m))


# ---------------------------------------------------------------- API and errors

def test_backend_selection(monkeypatch):
    assert ALL[-1] == "fft"
    monkeypatch.delenv("QKDCTL_PA_BACKEND", raising=False)
    assert pa.backend() == ALL[0]
    monkeypatch.setenv("QKDCTL_PA_BACKEND", "fft")
    assert pa.backend() == "fft"
    monkeypatch.setenv("QKDCTL_PA_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="not available"):
        pa.backend()
    with pytest.raises(ValueError, match="not available"):
        pa.toeplitz_hash(np.ones(4, np.uint8), 2, np.ones(5, np.uint8), method="cuda")
    if pa.has_pclmul():
        assert "pclmulqdq" in ALL


def test_zero_output_bits():
    x = np.ones(10, np.uint8)
    for meth in ALL:
        y = pa.toeplitz_hash(x, 0, np.ones(9, np.uint8), method=meth)
        assert y.shape == (0,) and y.dtype == np.uint8
    assert pa.toeplitz_hash_packed(pa.pack_bits(x), 10, 0, pa.pack_bits(np.ones(9))).shape == (0,)


def test_bool_input():
    rng = np.random.default_rng(22)
    x, s = _random_case(rng, 300, 100)
    assert np.array_equal(pa.toeplitz_hash(x.astype(bool), 100, s.astype(bool)),
                          pa.toeplitz_reference(x, 100, s))


@pytest.mark.parametrize(("n", "m", "ns", "msg"), [
    (10, 11, 20, "exceeds"),
    (10, -1, 8, ">= 0"),
    (10, 4, 12, "n \\+ m - 1 = 13"),
    (10, 4, 14, "n \\+ m - 1 = 13"),
])
def test_bad_sizes(n, m, ns, msg):
    with pytest.raises(ValueError, match=msg):
        pa.toeplitz_hash(np.ones(n, np.uint8), m, np.ones(ns, np.uint8))
    with pytest.raises(ValueError, match=msg):
        pa.toeplitz_reference(np.ones(n, np.uint8), m, np.ones(ns, np.uint8))


def test_bad_values():
    s = np.ones(13, np.uint8)
    with pytest.raises(ValueError, match="only 0 and 1"):
        pa.toeplitz_hash(np.array([0, 1, 2, 0, 0, 0, 0, 0, 0, 0], np.uint8), 4, s)
    with pytest.raises(ValueError, match="only 0 and 1"):
        pa.toeplitz_hash(np.array([0, 1, -1, 0, 0, 0, 0, 0, 0, 0]), 4, s)
    with pytest.raises(ValueError, match="only 0 and 1"):
        pa.toeplitz_hash(np.ones(10, np.uint8), 4, s * 3)
    with pytest.raises(ValueError, match="dtype"):
        pa.toeplitz_hash(np.ones(10), 4, s)
    with pytest.raises(ValueError, match="1-D"):
        pa.toeplitz_hash(np.ones((2, 5), np.uint8), 4, s)
    with pytest.raises(ValueError, match="words"):
        pa.toeplitz_hash_packed(np.ones(1, np.uint32), 10, 4, np.ones(1, np.uint64))
    with pytest.raises(ValueError, match="words"):
        pa.toeplitz_hash_packed(np.ones(1, np.uint64), 100, 4, np.ones(2, np.uint64))


def test_generic_cpu_falls_back_to_fft():
    # numba targeting a generic x86 CPU cannot emit PCLMULQDQ: only the FFT backend is offered
    code = (
        "import numpy as np\n"
        "from qkdctl.postprocess import privacy as pa, verify as ver\n"
        "assert pa.available_backends() == ['fft'], pa.available_backends()\n"
        "assert pa.backend() == 'fft' and not pa.has_pclmul()\n"
        "import pytest\n"
        "with pytest.raises(RuntimeError):\n"
        "    pa.clmul64(3, 3)\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.integers(0, 2, 300, dtype=np.uint8)\n"
        "s = rng.integers(0, 2, 449, dtype=np.uint8)\n"
        "assert np.array_equal(pa.toeplitz_hash(x, 150, s), pa.toeplitz_reference(x, 150, s))\n"
        "key = bytes(range(16))\n"
        "assert ver.tag(x, key) == ver.tag_reference(x, key)\n"
    )
    env = dict(os.environ, NUMBA_CPU_NAME="generic")
    env.pop("QKDCTL_PA_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr


def test_amplify_is_identity_beside_toeplitz_matrix():
    """``amplify`` is ``(I | T) x`` with T the m x (n - m) Toeplitz matrix of n - 1 seed
    bits, computed here from the explicit matrices."""
    rng = np.random.default_rng(11)
    for n, m in ((1, 1), (2, 1), (64, 1), (100, 37), (4098, 2049), (4099, 2048), (10_000, 3)):
        x = rng.integers(0, 2, n, dtype=np.uint8)
        s = rng.integers(0, 2, pa.amplify_seed_length(n, m), dtype=np.uint8)
        if m == n:
            want = x
        elif 2 * m <= n:
            assert s.shape[0] == n - 1
            want = x[:m] ^ pa.toeplitz_reference(x[m:], m, s)
        else:  # more than half kept: the plain Toeplitz hash
            assert s.shape[0] == n + m - 1
            want = pa.toeplitz_reference(x, m, s)
        assert np.array_equal(pa.amplify(x, m, s), want)


def test_amplify_is_universal_on_a_small_family():
    """Over every seed of a small family, two distinct inputs collide on at most a
    2^-m fraction of the seeds (universal_2)."""
    n, m = 6, 2
    seeds = [np.array([(k >> i) & 1 for i in range(n - 1)], np.uint8)
             for k in range(1 << (n - 1))]
    xs = [np.array([(v >> i) & 1 for i in range(n)], np.uint8) for v in range(1 << n)]
    outs = np.array([[pa.amplify(x, m, s) @ (1 << np.arange(m)) for s in seeds] for x in xs])
    worst = max(np.mean(outs[i] == outs[j]) for i in range(len(xs)) for j in range(i))
    assert worst <= 2.0 ** -m


def test_amplify_refuses_a_seed_of_the_wrong_length():
    with pytest.raises(ValueError, match="seed has 10 bits; 99 needed"):
        pa.amplify(np.zeros(100, np.uint8), 10, np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match="must be in 0..n"):
        pa.amplify_seed_length(10, 11)
