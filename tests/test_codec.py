"""The detection-announcement codec: round trips, agreement with a plain-Python reference
written from the format description, strict decoding, and the coded size."""

from __future__ import annotations

import math
import struct
import tracemalloc
from decimal import ROUND_CEILING, Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest

from qkdctl import codec
from qkdctl.codec import decode_pulses, encode_pulses, pack_bases, unpack_bases
from qkdctl.wire import WireError

I64_MAX = (1 << 63) - 1

# ----------------------------------------------------------------------------------------
# reference implementation, from the module docstring only (bit strings, no numpy tricks)
# ----------------------------------------------------------------------------------------

REF_CHUNK = 4096
REF_ESCAPE_Q = 32


def _ref_thresholds() -> list[Fraction]:
    """T_j rounded up to a multiple of 2**-32, j = 1..62."""
    with localcontext() as ctx:
        ctx.prec = 80
        c = -((Decimal(5).sqrt() - 1) / 2).ln()
        out = []
        for j in range(1, 63):
            t = 1 / ((c / Decimal(2) ** (j - 1)).exp() - 1)
            out.append(Fraction(int((t * 2**32).to_integral_value(rounding=ROUND_CEILING)),
                                2**32))
    return out


REF_T = _ref_thresholds()


def _ref_k_of(values: list[int]) -> int:
    mean = Fraction(sum(values), len(values))
    return sum(1 for t in REF_T if mean >= t)


def _ref_choose_k(values: list[int]) -> int:
    k_a = _ref_k_of(values)
    if k_a + 5 >= 63:
        return k_a
    kept = [v for v in values if v >> k_a < REF_ESCAPE_Q]
    return _ref_k_of(kept)


def _ref_gaps(pulses, previous) -> list[int]:
    out, last = [], previous
    for p in pulses:
        p = int(p)
        assert p > last
        out.append(p - last - 1)
        last = p
    return out


def _encode_pulses_reference(pulses, previous: int) -> bytes:
    vs = _ref_gaps(pulses, previous)
    bits = []
    for lo in range(0, len(vs), REF_CHUNK):
        chunk = vs[lo:lo + REF_CHUNK]
        k = _ref_choose_k(chunk)
        bits.append(format(k, "06b"))
        for v in chunk:
            q = v >> k
            if q < REF_ESCAPE_Q:
                bits.append("1" * q + "0" + (format(v & ((1 << k) - 1), f"0{k}b") if k else ""))
            else:
                bits.append("1" * REF_ESCAPE_Q + format(v, "064b"))
    s = "".join(bits)
    s += "0" * (-len(s) % 8)
    body = bytes(int(s[i:i + 8], 2) for i in range(0, len(s), 8))
    return struct.pack("<BQ", 1, len(vs)) + body


def _decode_pulses_reference(data: bytes, previous: int) -> np.ndarray:
    if len(data) < 9:
        raise WireError("short header")
    version, count = struct.unpack_from("<BQ", data)
    if version != 1:
        raise WireError("version")
    if count > 8 * (len(data) - 9):
        raise WireError("count too large")
    s = "".join(format(b, "08b") for b in data[9:])
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(s):
            raise WireError("truncated")
        pos += n
        return s[pos - n:pos]

    out, last = [], previous
    for lo in range(0, count, REF_CHUNK):
        k = int(take(6), 2)
        if k > 62:
            raise WireError("k")
        vs = []
        for _ in range(min(REF_CHUNK, count - lo)):
            q = 0
            while q < REF_ESCAPE_Q and take(1) == "1":
                q += 1
            if q < REF_ESCAPE_Q:
                v = (q << k) | (int(take(k), 2) if k else 0)
            else:
                v = int(take(64), 2)
                if v >> k < REF_ESCAPE_Q:
                    raise WireError("non-canonical escape")
            last = last + v + 1
            if last > I64_MAX:
                raise WireError("overflow")
            vs.append(v)
            out.append(last)
        if _ref_choose_k(vs) != k:
            raise WireError("wrong k")
    rest = s[pos:]
    if len(rest) >= 8:
        raise WireError("trailing")
    if "1" in rest:
        raise WireError("padding")
    return np.array(out, dtype=np.int64)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def geometric_block(rng, p, n, start=-1):
    return start + np.cumsum(rng.geometric(p, n)).astype(np.int64)


def block_from_gaps(gaps, previous=-1):
    return previous + np.cumsum(np.asarray(gaps, dtype=object)).astype(np.int64)


def check(pulses, previous=-1, reference=True):
    pulses = np.asarray(pulses, dtype=np.int64)
    data = encode_pulses(pulses, previous)
    out = decode_pulses(data, previous)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, pulses)
    if reference:
        assert _encode_pulses_reference(pulses, previous) == data
        np.testing.assert_array_equal(_decode_pulses_reference(data, previous), pulses)
    return data


def first_k(data):
    """The Rice parameter of the first chunk (the first 6 bits after the header)."""
    return data[9] >> 2


# ----------------------------------------------------------------------------------------
# format constants
# ----------------------------------------------------------------------------------------

def test_thresholds_match_the_description():
    got = [Fraction(int(w) * 2**32 + int(f), 2**32) for w, f in codec.RICE_THRESHOLDS]
    assert got == REF_T
    # and they are Kiely's optimal-Rice-parameter rule for a geometric law
    phi = (1 + 5 ** 0.5) / 2
    for mean in [0.5, 1.0, 2.0, 7.9, 66.5, 115.3, 999.0, 1e5, 3e9]:
        theta = mean / (1 + mean)
        kiely = max(0, 1 + math.floor(math.log2(math.log(phi - 1) / math.log(theta))))
        assert sum(1 for t in REF_T if mean >= t) == kiely


# ----------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------

def test_empty_block():
    data = check([], -1)
    assert data == struct.pack("<BQ", 1, 0)
    assert check([], 12345) == data


def test_one_pulse_and_pulse_zero():
    data = check([0], -1)             # gap 1, v = 0: k = 0, one zero bit
    assert data == struct.pack("<BQ", 1, 1) + bytes([0])
    check([7], -1)
    check([7], 6)
    check([10**12], 5)


def test_huge_gaps():
    check([10**12], -1)
    check([5, 10**12, 10**12 + 1, 2 * 10**12], 0)
    # one pause of 1e12 pulses in an otherwise ordinary chunk: k stays that of the others
    rng = np.random.default_rng(1)
    gaps = rng.geometric(8.6e-3, 4096).astype(object)
    gaps[2000] = 10**12
    pulses = block_from_gaps(gaps)
    data = check(pulses)
    assert first_k(data) == 6
    bits = 8 * (len(data) - 9)
    assert bits < 4096 * 8.6 + 96


@pytest.mark.parametrize("k_gap", [0, 3, 6, 20])
def test_escape_threshold(k_gap):
    """Gaps with quotient 31 (longest plain code) and 32 (first escape) around them."""
    base = 1 << k_gap                # gaps of v = 2**k - 1 give k = k_gap (mean ~ 2**k)
    vs = [base - 1] * 600 + [(32 << k_gap) - 1, 32 << k_gap, (32 << k_gap) + 1] * 3
    data = check(block_from_gaps([v + 1 for v in vs]))
    k = first_k(data)
    assert k == max(0, k_gap), k
    plain = 600 * (1 + k + ((base - 1) >> k)) + 3 * (32 + k)
    assert 8 * (len(data) - 9) == -(-(6 + plain + 6 * (32 + 64)) // 8) * 8


def test_values_near_2_63():
    check([I64_MAX], -1)                            # one gap of 2**63, v = 2**63 - 1
    check([I64_MAX], I64_MAX - 1)
    check([1 << 62, (1 << 62) + 1, I64_MAX - 1, I64_MAX], (1 << 62) - 1)
    check([3, (1 << 62) + 3, I64_MAX], 2)
    rng = np.random.default_rng(5)
    start = (1 << 62) + int(rng.integers(1 << 40))
    check(geometric_block(rng, 1e-3, 5000, start), start)
    huge = np.unique(rng.integers(0, 1 << 62, 300)) + (1 << 62)
    check(huge, (1 << 62) - 1)


@pytest.mark.parametrize("p", [1e-1, 1e-2, 1e-3, 1e-5])
def test_geometric_round_trip_and_reference(p):
    rng = np.random.default_rng(int(1 / p))
    n = 2 * REF_CHUNK + 777                         # three chunks, the last one partial
    previous = int(rng.integers(-1, 10**9))
    check(geometric_block(rng, p, n, previous), previous)


def test_changing_rate_across_chunks():
    rng = np.random.default_rng(3)
    gaps = np.concatenate([rng.geometric(p, 3000) for p in (0.5, 1e-2, 1e-6, 0.9, 1e-3)])
    check(block_from_gaps(gaps))


def test_large_block_round_trip():
    rng = np.random.default_rng(4)
    pulses = geometric_block(rng, 8.6e-3, 300_000)
    out = decode_pulses(encode_pulses(pulses, -1), -1)
    np.testing.assert_array_equal(out, pulses)


def test_accepts_other_integer_dtypes_and_lists():
    pulses = np.array([0, 3, 9, 200], dtype=np.uint32)
    assert encode_pulses(pulses, -1) == encode_pulses([0, 3, 9, 200], -1)
    assert encode_pulses(pulses, np.int64(-1)) == encode_pulses(pulses.astype(np.int64), -1)


# ----------------------------------------------------------------------------------------
# encoder input checks
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pulses, previous, index", [
    ([5, 4], -1, 1),
    ([1, 2, 2, 3], -1, 2),
    ([0, 1, 2, 1], -1, 3),
    ([5], 5, 0),
    ([3, 9], 7, 0),
])
def test_not_ascending(pulses, previous, index):
    with pytest.raises(ValueError, match=rf"\b{index}\b"):
        encode_pulses(np.array(pulses, dtype=np.int64), previous)


def test_bad_encoder_arguments():
    with pytest.raises(ValueError):
        encode_pulses(np.array([1], dtype=np.int64), -2)
    with pytest.raises(ValueError):
        encode_pulses(np.array([[1, 2]], dtype=np.int64), -1)
    with pytest.raises(ValueError):
        encode_pulses(np.array([1.0, 2.0]), -1)
    with pytest.raises(ValueError):
        encode_pulses(np.array([1 << 63], dtype=np.uint64), -1)
    with pytest.raises(TypeError):
        encode_pulses(np.array([1], dtype=np.int64), 1.5)


# ----------------------------------------------------------------------------------------
# strict decoding
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
    """A small block (previous = 100) with plain codes and escapes, whose last byte has
    1..6 padding bits (too few to hold one more gap)."""
    rng = np.random.default_rng(7)
    gaps = rng.geometric(1e-2, 300).astype(object)
    gaps[[10, 150, 299]] = [10**12, 5 * 10**9, 1 << 40]
    for extra in range(8):
        pulses = block_from_gaps(list(gaps) + [1] * extra, 100)
        nbits = _bit_length(pulses, 100)
        if nbits % 8 >= 2:
            data = encode_pulses(pulses, 100)
            assert data[9] >> 2 >= 6          # a gap costs at least 7 bits
            return pulses, data, nbits
    raise AssertionError("no sample with 1..6 padding bits")


def _bit_length(pulses, previous):
    """Exact number of coded bits, from the reference rules."""
    vs = _ref_gaps(pulses, previous)
    total = 0
    for lo in range(0, len(vs), REF_CHUNK):
        chunk = vs[lo:lo + REF_CHUNK]
        k = _ref_choose_k(chunk)
        total += 6 + sum(q + 1 + k if q < 32 else 96 for q in (v >> k for v in chunk))
    return total


def assert_rejected(data, previous=100, match=None):
    with pytest.raises(WireError, match=match):
        decode_pulses(data, previous)
    with pytest.raises(WireError):
        _decode_pulses_reference(data, previous)


def test_sample_round_trip(sample):
    pulses, data, _ = sample
    np.testing.assert_array_equal(decode_pulses(data, 100), pulses)
    assert _encode_pulses_reference(pulses, 100) == data


def test_every_truncation_is_rejected(sample):
    _, data, _ = sample
    for n in range(len(data)):
        with pytest.raises(WireError):
            decode_pulses(data[:n], 100)
    with pytest.raises(WireError, match="truncated"):
        decode_pulses(data[:-1], 100)


def test_padding_bits_and_trailing_bytes(sample):
    _, data, nbits = sample
    pad = 8 - nbits % 8
    for b in range(pad):
        forged = bytearray(data)
        forged[-1] |= 1 << b
        assert_rejected(bytes(forged), match="padding")
    assert_rejected(data + b"\x00", match="trailing")
    assert_rejected(data + b"\x00" * 8, match="trailing")
    assert_rejected(data + b"\xff")
    empty = encode_pulses(np.zeros(0, np.int64), 100)
    assert_rejected(empty + b"\x00", match="trailing")


def test_forged_counts(sample):
    _, data, _ = sample
    body = data[9:]
    count = struct.unpack_from("<Q", data, 1)[0]
    tracemalloc.start()
    try:
        for forged in [2**64 - 1, 2**63, 2**40, 8 * len(body) + 1]:
            assert_rejected(struct.pack("<BQ", 1, forged) + body, match="count")
        assert_rejected(struct.pack("<BQ", 1, 8 * len(body)) + body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(data) + 100_000
    assert_rejected(struct.pack("<BQ", 1, count + 1) + body)
    assert_rejected(struct.pack("<BQ", 1, count - 1) + body)


def test_header_errors(sample):
    _, data, _ = sample
    assert_rejected(b"", match="truncated")
    assert_rejected(data[:5], match="truncated")
    assert_rejected(b"\x02" + data[1:], match="version")
    assert_rejected(b"\x00" + data[1:], match="version")


def test_forged_rice_parameter(sample):
    _, data, _ = sample
    k = data[9] >> 2
    for other in {0, k - 1, k + 1, 62} - {k}:
        forged = bytes([data[9] & 0b11 | other << 2]) + data[10:]
        assert_rejected(data[:9] + forged)
    assert_rejected(data[:9] + bytes([data[9] | 0xFC]) + data[10:], match="above 62")


def _bits_to_bytes(s: str) -> bytes:
    s += "0" * (-len(s) % 8)
    return bytes(int(s[i:i + 8], 2) for i in range(0, len(s), 8))


def test_noncanonical_escape_and_overflow():
    # one gap v = 5 with k = 2 (mean 5 -> k = 2), sent as an escape
    assert _ref_choose_k([5]) == 2
    good = struct.pack("<BQ", 1, 1) + _bits_to_bytes("000010" + "10" + "01")
    np.testing.assert_array_equal(decode_pulses(good, -1), [5])
    bad = struct.pack("<BQ", 1, 1) + _bits_to_bytes("000010" + "1" * 32 + format(5, "064b"))
    with pytest.raises(WireError, match="escape"):
        decode_pulses(bad, -1)
    with pytest.raises(WireError):
        _decode_pulses_reference(bad, -1)
    # a raw value of 2**64 - 1 overflows whatever the previous pulse
    k = _ref_choose_k([2**64 - 1])
    raw = struct.pack("<BQ", 1, 1) + _bits_to_bytes(format(k, "06b") + "1" * 32 + "1" * 64)
    with pytest.raises(WireError):
        decode_pulses(raw, -1)
    # a valid block decoded with a later `previous` runs past int64
    data = encode_pulses(np.array([I64_MAX], dtype=np.int64), -1)
    for previous in [0, 5, I64_MAX - 1]:
        with pytest.raises(WireError, match="overflow"):
            decode_pulses(data, previous)
    data = encode_pulses(np.array([10, I64_MAX - 3], dtype=np.int64), 0)
    with pytest.raises(WireError, match="overflow"):
        decode_pulses(data, 4)
    # the last pulse at the top of the range, then one more gap
    data = encode_pulses(np.array([I64_MAX - 1, I64_MAX], dtype=np.int64), 0)
    with pytest.raises(WireError, match="overflow"):
        decode_pulses(data, 1)


def test_random_corruption_agrees_with_reference_and_is_canonical():
    rng = np.random.default_rng(11)
    gaps = rng.geometric(3e-2, 200).astype(object)
    gaps[[17, 120]] = [10**11, 1 << 45]
    pulses = block_from_gaps(gaps, 10)
    data = encode_pulses(pulses, 10)
    accepted = 0
    for _ in range(1500):
        forged = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(9, len(forged)))
            forged[i] ^= 1 << int(rng.integers(8))
        forged = bytes(forged)
        try:
            out = decode_pulses(forged, 10)
        except WireError:
            with pytest.raises(WireError):
                _decode_pulses_reference(forged, 10)
            continue
        accepted += 1
        np.testing.assert_array_equal(_decode_pulses_reference(forged, 10), out)
        assert encode_pulses(out, 10) == forged          # only canonical encodings pass
    assert accepted < 1500


def test_random_mutations_agree_with_reference():
    """Small random blocks, mutated (count, bytes, length, k): both decoders accept or
    reject alike, and whatever is accepted is the canonical encoding of what it decodes to."""
    rng = np.random.default_rng(12)
    accepted = rejected = 0
    for _ in range(800):
        n = int(rng.integers(0, 10))
        gaps = [int(g) for g in rng.geometric(10.0 ** -rng.uniform(0, 4), n)]
        if n and rng.random() < 0.3:
            gaps[int(rng.integers(n))] = int(rng.integers(1, 1 << 62))
        previous = int(rng.choice([-1, 0, 1 << 60]))
        data = bytearray(encode_pulses(block_from_gaps(gaps, previous), previous))
        what = int(rng.integers(5))
        if what == 0:
            data[1:9] = struct.pack("<Q", max(0, n + int(rng.integers(-2, 3))))
        elif what == 1 and len(data) > 9:
            data[int(rng.integers(9, len(data)))] = int(rng.integers(256))
        elif what == 2:
            data += bytes(rng.integers(0, 256, int(rng.integers(1, 3)), dtype=np.uint8))
        elif what == 3:
            del data[int(rng.integers(0, len(data))):]
        elif len(data) > 9:
            data[9] = (data[9] & 0b11) | int(rng.integers(64)) << 2
        data = bytes(data)
        try:
            out = decode_pulses(data, previous)
        except WireError:
            with pytest.raises(WireError):
                _decode_pulses_reference(data, previous)
            rejected += 1
            continue
        np.testing.assert_array_equal(_decode_pulses_reference(data, previous), out)
        assert encode_pulses(out, previous) == data
        accepted += 1
    assert accepted > 50 and rejected > 200


def test_decode_argument_types():
    data = encode_pulses(np.array([1, 2], dtype=np.int64), -1)
    np.testing.assert_array_equal(decode_pulses(bytearray(data), -1), [1, 2])
    np.testing.assert_array_equal(decode_pulses(memoryview(data), -1), [1, 2])
    with pytest.raises(TypeError):
        decode_pulses("abc", -1)
    with pytest.raises(ValueError):
        decode_pulses(data, -2)


# ----------------------------------------------------------------------------------------
# bases
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 16, 17, 100_003])
def test_bases_round_trip(n):
    rng = np.random.default_rng(n)
    bases = rng.integers(0, 2, n).astype(np.uint8)
    data = pack_bases(bases)
    assert len(data) == (n + 7) // 8
    out = unpack_bases(data, n)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, bases)


def test_bases_bit_order():
    assert pack_bases(np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=np.uint8)) == b"\x01\x02"
    assert pack_bases(np.array([True, False, True])) == b"\x05"
    assert pack_bases([0, 1]) == b"\x02"


def test_bases_strict():
    with pytest.raises(ValueError, match=r"bases\[2\]"):
        pack_bases(np.array([0, 1, 2], dtype=np.uint8))
    with pytest.raises(ValueError):
        pack_bases(np.array([0, -1], dtype=np.int64))
    with pytest.raises(ValueError):
        pack_bases(np.array([0.0, 1.0]))
    with pytest.raises(WireError):
        unpack_bases(b"\x01", 0)
    with pytest.raises(WireError):
        unpack_bases(b"", 1)
    with pytest.raises(WireError):
        unpack_bases(b"\x01\x00", 8)
    with pytest.raises(WireError):
        unpack_bases(b"\x01", 9)
    for n in range(1, 8):
        for bit in range(n, 8):
            with pytest.raises(WireError, match="padding"):
                unpack_bases(bytes([1 << bit]), n)
        np.testing.assert_array_equal(unpack_bases(bytes([(1 << n) - 1]), n), np.ones(n))
    with pytest.raises(ValueError):
        unpack_bases(b"", -1)


# ----------------------------------------------------------------------------------------
# size
# ----------------------------------------------------------------------------------------

def geometric_entropy(p: float) -> float:
    return (-(1 - p) * math.log2(1 - p) - p * math.log2(p)) / p


@pytest.mark.parametrize("p, slack", [(8.6e-3, 0.1), (1e-3, 0.1), (1e-1, 0.1)])
def test_size_near_entropy(p, slack):
    rng = np.random.default_rng(2024)
    n = 10**6
    pulses = geometric_block(rng, p, n)
    data = encode_pulses(pulses, -1)
    bits = 8 * len(data) / n
    h = geometric_entropy(p)
    print(f"\np = {p:g}: {bits:.4f} bits/gap (with header), entropy {h:.4f}, "
          f"excess {bits - h:+.4f}; + 1 basis bit = {bits + 1:.3f} bits/detection")
    assert bits <= h + slack
    if p == 8.6e-3:
        assert bits + 1 <= 9.5


# ----------------------------------------------------------------------------------------
# symbols with public probabilities (static-model rANS)
# ----------------------------------------------------------------------------------------

REF_M = 1 << 14          # total of the quantised frequencies
REF_L = 1 << 23          # state interval [L, 256 L)

MODELS = {"basis": (0.8, 0.2), "keep": (0.32, 0.68), "intensity": (0.5, 0.3, 0.2)}
EXTREME = (1 - 1e-9, 1e-9)                       # frequencies (16383, 1)


def _ref_quantize(probabilities) -> list[int]:
    """The quantisation rule of the module docstring, written out with Fractions."""
    exact = [Fraction(float(p)) for p in probabilities]
    t = [REF_M * p / sum(exact) for p in exact]
    f = [max(1, math.floor(x)) for x in t]
    idx = range(len(f))
    while sum(f) < REF_M:
        i = sorted(idx, key=lambda j: (f[j] - t[j], j))[0]       # largest t - f, lowest index
        f[i] += 1
    while sum(f) > REF_M:
        i = sorted((j for j in idx if f[j] > 1), key=lambda j: (t[j] - f[j], j))[0]
        f[i] -= 1
    return f


def _ref_cum(f):
    return [sum(f[:i]) for i in range(len(f))]


def _encode_symbols_reference(symbols, probabilities) -> bytes:
    f = _ref_quantize(probabilities)
    c = _ref_cum(f)
    x = REF_L
    emitted = []
    for s in reversed([int(v) for v in symbols]):
        while x >= f[s] << 17:
            emitted.append(x & 0xFF)
            x >>= 8
        x = (x // f[s]) * REF_M + x % f[s] + c[s]
    return bytes([1]) + x.to_bytes(4, "little") + bytes(reversed(emitted))


def _decode_symbols_reference(data: bytes, count: int, probabilities) -> np.ndarray:
    f = _ref_quantize(probabilities)
    c = _ref_cum(f)
    if len(data) < 5:
        raise WireError("truncated header")
    if data[0] != 1:
        raise WireError("version")
    x = int.from_bytes(data[1:5], "little")
    if not REF_L <= x < REF_L << 8:
        raise WireError("initial state")
    pos, out = 5, []
    for _ in range(count):
        slot = x % REF_M
        s = max(i for i in range(len(f)) if c[i] <= slot)
        out.append(s)
        x = f[s] * (x // REF_M) + slot - c[s]
        while x < REF_L:
            if pos >= len(data):
                raise WireError("truncated")
            x = x * 256 + data[pos]
            pos += 1
    if pos != len(data):
        raise WireError("trailing")
    if x != REF_L:
        raise WireError("final state")
    return np.array(out, dtype=np.uint8)


def entropy(p) -> float:
    return -sum(q * math.log2(q) for q in p)


def random_symbols(rng, p, n):
    return rng.choice(len(p), n, p=np.asarray(p) / sum(p)).astype(np.uint8)


def random_model(rng, k, tiny=False):
    p = rng.dirichlet(np.full(k, 0.5))
    if tiny:
        p[rng.integers(k, size=int(rng.integers(1, k)))] = 1e-7 * rng.random()
    p = np.maximum(p, 1e-12)
    p /= p.sum()
    p[0] = 1 - math.fsum(p[1:])
    return tuple(float(q) for q in p)


def check_symbols(symbols, p, reference=True):
    symbols = np.asarray(symbols, dtype=np.uint8)
    data = codec.encode_symbols(symbols, p)
    out = codec.decode_symbols(data, symbols.size, p)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, symbols)
    if reference:
        assert _encode_symbols_reference(symbols, p) == data
        np.testing.assert_array_equal(_decode_symbols_reference(data, symbols.size, p), symbols)
    return data


def assert_symbols_rejected(data, count, p, match=None):
    with pytest.raises(WireError, match=match):
        codec.decode_symbols(data, count, p)
    with pytest.raises(WireError):
        _decode_symbols_reference(data, count, p)


def test_quantisation():
    q = codec.quantize_probabilities
    assert q((0.8, 0.2)).tolist() == [13107, 3277]
    assert q((0.32, 0.68)).tolist() == [5243, 11141]
    assert q((1 - 0.68, 0.68)).tolist() == [5243, 11141]
    assert q((0.5, 0.3, 0.2)).tolist() == [8192, 4915, 3277]
    assert q((0.5, 0.5)).tolist() == [8192, 8192]
    assert q(EXTREME).tolist() == [16383, 1]
    # raised to 1, then taken back from the only symbol above 1
    assert q([1 - 15e-9] + [1e-9] * 15).tolist() == [REF_M - 15] + [1] * 15
    # same floats, any container: same table
    for same in ([0.5, 0.3, 0.2], np.array([0.5, 0.3, 0.2]), [np.float64(0.5), 0.3, 0.2]):
        assert q(same).tolist() == [8192, 4915, 3277]
    rng = np.random.default_rng(21)
    for trial in range(300):
        p = random_model(rng, int(rng.integers(2, 17)), tiny=trial % 3 == 0)
        f = q(p)
        assert f.dtype == np.uint32
        assert f.tolist() == _ref_quantize(p)
        assert int(f.sum()) == REF_M and f.min() >= 1


@pytest.mark.parametrize("name", list(MODELS))
def test_symbols_empty_and_single(name):
    p = MODELS[name]
    data = check_symbols([], p)
    assert data == b"\x01" + REF_L.to_bytes(4, "little") == bytes.fromhex("0100008000")
    assert codec.decode_symbols(data, 0, p).shape == (0,)
    for s in range(len(p)):
        check_symbols([s], p)


@pytest.mark.parametrize("k", range(2, 17))
def test_symbols_every_value(k):
    rng = np.random.default_rng(k)
    for p in (tuple([1 / k] * (k - 1) + [1 - (k - 1) / k]), random_model(rng, k),
              random_model(rng, k, tiny=True)):
        check_symbols(np.arange(k), p)
        check_symbols(np.arange(k)[::-1], p)
        check_symbols(np.repeat(np.arange(k), 5), p)
        check_symbols(random_symbols(rng, np.ones(k), 2000), p)      # not following p
        check_symbols(random_symbols(rng, p, 2000), p)


@pytest.mark.parametrize("p", list(MODELS.values()) + [EXTREME, (1e-9,) * 15 + (1 - 15e-9,)])
def test_symbols_adversarial(p):
    k = len(p)
    rarest = int(np.argmin(p))
    commonest = int(np.argmax(p))
    for n in (1, 2, 3, 100, 10_000):
        check_symbols(np.full(n, rarest), p, reference=n <= 100)
        check_symbols(np.full(n, commonest), p, reference=n <= 100)
    rng = np.random.default_rng(9)
    check_symbols(np.tile([rarest, commonest], 500), p)
    check_symbols(random_symbols(rng, [1 / q for q in p], 3000), p)   # the inverse model
    # the rarest symbol throughout costs -log2(f / M) bits each, plus the header
    f = _ref_quantize(p)
    n = 100_000
    data = check_symbols(np.full(n, rarest), p, reference=False)
    assert 8 * (len(data) - 5) <= n * math.log2(REF_M / f[rarest]) + 16
    check_symbols(np.full(n, k - 1), p, reference=False)


@pytest.mark.parametrize("name", list(MODELS))
def test_symbols_reference_agreement(name):
    p = MODELS[name]
    rng = np.random.default_rng(len(name))
    for n in (5, 17, 255, 4099, 20_000):
        check_symbols(random_symbols(rng, p, n), p)


def test_symbols_reference_agreement_random_models():
    rng = np.random.default_rng(22)
    for trial in range(60):
        k = int(rng.integers(2, 17))
        p = random_model(rng, k, tiny=trial % 2 == 0)
        data_model = p if trial % 3 else tuple(np.ones(k) / k)
        check_symbols(random_symbols(rng, data_model, int(rng.integers(0, 1500))), p)


@pytest.mark.parametrize("name", list(MODELS))
def test_symbols_size_near_entropy(name):
    p = MODELS[name]
    h = entropy(p)
    rng = np.random.default_rng(2025)
    for n in (10**4, 10**6):
        symbols = random_symbols(rng, p, n)
        data = check_symbols(symbols, p, reference=False)
        bits = 8 * len(data) / n
        ideal = -np.log2(np.asarray(p))[symbols].sum() / n     # the sample's cost under p
        print(f"\n{name} {p}, n = {n}: {bits:.4f} bits/symbol (header included), "
              f"entropy {h:.4f}, excess {bits - h:+.4f}; over the sample's ideal code "
              f"length {bits - ideal:+.5f}")
        assert bits - ideal <= (0.005 if n == 10**4 else 0.0002)   # 40 header bits / n
        if n == 10**6:
            assert bits <= h + 0.02
            assert abs(bits - h) < 0.005


def test_bits_are_two_symbol_alphabets():
    rng = np.random.default_rng(3)
    for p_one, n in [(0.2, 10_000), (0.68, 10_000), (0.5, 8), (1e-6, 1000), (0.999, 77)]:
        bits = (rng.random(n) < p_one).astype(np.uint8)
        data = codec.encode_bits(bits, p_one)
        assert data == codec.encode_symbols(bits, (1 - p_one, p_one))
        assert data == codec.encode_bits(bits.astype(bool), p_one)
        assert data == codec.encode_bits(bits.tolist(), p_one)
        assert data == _encode_symbols_reference(bits, (1 - p_one, p_one))
        out = codec.decode_bits(data, n, p_one)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, bits)
    assert codec.encode_bits([], 0.3) == bytes.fromhex("0100008000")


# --- strict decoding ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def symbols_sample():
    p = MODELS["intensity"]
    symbols = random_symbols(np.random.default_rng(8), p, 400)
    return p, symbols, codec.encode_symbols(symbols, p)


def test_symbols_every_truncation_and_appended_byte(symbols_sample):
    p, symbols, data = symbols_sample
    n = symbols.size
    for cut in range(len(data)):
        # (the shortest ones fail the count check first)
        assert_symbols_rejected(data[:cut], n, p, match="truncated|exceeds")
    for b in range(256):
        assert_symbols_rejected(data + bytes([b]), n, p, match="trailing")
    for extra in (b"\x00\x00", b"\xff" * 4, data):
        assert_symbols_rejected(data + extra, n, p, match="trailing")
    empty = codec.encode_symbols([], p)
    for b in range(256):
        assert_symbols_rejected(empty + bytes([b]), 0, p)
    for cut in range(len(empty)):
        assert_symbols_rejected(empty[:cut], 0, p, match="truncated")


def test_symbols_wrong_count_model_and_final_state(symbols_sample):
    p, symbols, data = symbols_sample
    n = symbols.size
    for wrong in (0, 1, n - 1, n + 1, n + 2, 2 * n):
        assert_symbols_rejected(data, wrong, p)
    assert_symbols_rejected(data, n + 1, p, match="truncated")
    for other in [(0.2, 0.3, 0.5), (0.5, 0.2, 0.3), (0.4, 0.3, 0.3)]:
        with pytest.raises(WireError):
            codec.decode_symbols(data, n, other)
    # the last byte is read last: any other value derails the end of the decoding
    for b in range(256):
        if b != data[-1]:
            assert_symbols_rejected(data[:-1] + bytes([b]), n, p, match="final state|truncated")
    # no symbol to decode, and a state other than L
    for state in (REF_L + 1, REF_L + 255, (REF_L << 8) - 1):
        assert_symbols_rejected(b"\x01" + state.to_bytes(4, "little"), 0, p, match="final state")


def test_symbols_header(symbols_sample):
    p, symbols, data = symbols_sample
    n = symbols.size
    for bad in (0, 2, 255):
        assert_symbols_rejected(bytes([bad]) + data[1:], n, p, match="version")
    for state in (0, REF_L - 1, REF_L << 8, 2**32 - 1):
        assert_symbols_rejected(b"\x01" + state.to_bytes(4, "little") + data[5:], n, p,
                                match="initial state")


def test_symbols_initial_state_must_be_canonical():
    """With p = (1/2, 1/2) the state 2**31 decodes 8 zeros down to exactly L without reading
    a byte; the encoder never starts from there, so that stream is refused."""
    p = (0.5, 0.5)
    canonical = check_symbols(np.zeros(8, np.uint8), p)
    assert canonical == bytes.fromhex("010000800000")     # 2**30 emitted its low byte
    forged = b"\x01" + (REF_L << 8).to_bytes(4, "little")
    assert forged != canonical
    assert_symbols_rejected(forged, 8, p, match="initial state")


def test_symbols_forged_counts_do_not_allocate(symbols_sample):
    p, symbols, data = symbols_sample
    tracemalloc.start()
    try:
        for q, d in [(p, data), (EXTREME, codec.encode_symbols(np.zeros(50, np.uint8), EXTREME))]:
            limit = codec.max_symbol_count(len(d), q)
            for forged in (2**64 - 1, 2**63, 2**40, limit + 1):
                with pytest.raises(WireError, match="count"):
                    codec.decode_symbols(d, forged, q)
            with pytest.raises(WireError, match="count"):
                codec.decode_symbols(d[:5], 10**12, q)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000
    # just below the limit: decoding starts and the data run out
    limit = codec.max_symbol_count(len(data), p)
    with pytest.raises(WireError, match="truncated"):
        codec.decode_symbols(data, limit, p)


@pytest.mark.parametrize("p", list(MODELS.values()) + [EXTREME, (0.5, 0.5), (1 / 3,) * 3])
def test_count_limit_is_sound_and_tight(p):
    """The cheapest stream (the most probable symbol throughout) stays under the limit."""
    commonest = int(np.argmax(p))
    f = _ref_quantize(p)
    cost = math.log2(REF_M / max(f))                  # bits per symbol of that stream
    sizes = list(range(0, 300)) + [1000, 4096, 65_537, 1_000_003]
    if p == EXTREME:
        sizes.append(3_000_000)                        # ~260 bits in all
    for n in sizes:
        data = codec.encode_symbols(np.full(n, commonest, np.uint8), p)
        limit = codec.max_symbol_count(len(data), p)
        assert n <= limit
        np.testing.assert_array_equal(codec.decode_symbols(data, n, p), commonest)
        # and the limit is not much above what the data could hold at that cost
        assert limit <= (8 * (len(data) - 4) / cost) * 1.01 + 1


def test_symbols_random_corruption_agrees_with_reference_and_is_canonical():
    rng = np.random.default_rng(13)
    accepted = rejected = 0
    for trial in range(1500):
        k = int(rng.integers(2, 5))
        p = MODELS["intensity"] if k == 3 else random_model(rng, k)
        n = int(rng.integers(0, 40))
        data = bytearray(codec.encode_symbols(random_symbols(rng, p, n), p))
        what = trial % 4
        if what == 0:
            for _ in range(int(rng.integers(1, 3))):
                i = int(rng.integers(len(data)))
                data[i] ^= 1 << int(rng.integers(8))
        elif what == 1:
            data[int(rng.integers(1, len(data)))] = int(rng.integers(256))
        elif what == 2:
            n = max(0, n + int(rng.integers(-2, 3)))
        else:
            data[1:5] = int(rng.integers(REF_L, REF_L << 8)).to_bytes(4, "little")
        data = bytes(data)
        try:
            out = codec.decode_symbols(data, n, p)
        except WireError:
            with pytest.raises(WireError):
                _decode_symbols_reference(data, n, p)
            rejected += 1
            continue
        np.testing.assert_array_equal(_decode_symbols_reference(data, n, p), out)
        assert codec.encode_symbols(out, p) == data          # only canonical encodings pass
        accepted += 1
    assert accepted > 50 and rejected > 1000


def test_symbols_bad_arguments():
    enc, dec = codec.encode_symbols, codec.decode_symbols
    good = enc([0, 1], (0.5, 0.5))
    for p in [(1.0,), (), [1 / 17] * 17, (0.5, 0.5, 0.0), (0.6, -0.1, 0.5), (0.5, float("nan")),
              (float("inf"), 0.5), (0.5, 0.4), (0.5, 0.5 + 1e-6), (0.8, 0.2, 1e-6)]:
        with pytest.raises(ValueError):
            enc([0], p)
        with pytest.raises(ValueError):
            dec(good, 2, p)
        with pytest.raises(ValueError):
            codec.quantize_probabilities(p)
    for p in ["ab", 0.5, (0.5, "0.5"), (True, False), None]:
        with pytest.raises(TypeError):
            enc([0], p)
    with pytest.raises(ValueError, match=r"symbols\[3\] = 3"):
        enc(np.array([0, 1, 2, 3, 0], np.uint8), (0.5, 0.3, 0.2))
    with pytest.raises(ValueError, match=r"symbols\[1\] = -1"):
        enc(np.array([0, -1], np.int8), (0.5, 0.5))
    with pytest.raises(ValueError, match=r"symbols\[0\] = 300"):
        enc(np.array([300], np.int64), [1 / 16] * 16)
    with pytest.raises(ValueError):
        enc(np.zeros((2, 2), np.uint8), (0.5, 0.5))
    with pytest.raises(ValueError):
        enc(np.array([0.0, 1.0]), (0.5, 0.5))
    with pytest.raises(ValueError, match=r"bits\[2\] = 2"):
        codec.encode_bits([0, 1, 2], 0.5)
    for p_one in (0, 1, 0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            codec.encode_bits([0, 1], p_one)
        with pytest.raises(ValueError):
            codec.decode_bits(good, 2, p_one)
    with pytest.raises(TypeError):
        codec.encode_bits([0, 1], "0.5")
    with pytest.raises(ValueError):
        dec(good, -1, (0.5, 0.5))
    with pytest.raises(TypeError):
        dec(good, 2.0, (0.5, 0.5))
    with pytest.raises(TypeError):
        dec("abc", 2, (0.5, 0.5))
    np.testing.assert_array_equal(dec(bytearray(good), 2, (0.5, 0.5)), [0, 1])
    np.testing.assert_array_equal(dec(memoryview(good), np.int64(2), [0.5, 0.5]), [0, 1])
