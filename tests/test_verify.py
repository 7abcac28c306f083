"""Verification tags: GF(2^64) arithmetic, the polynomial hash and its tag length."""

from __future__ import annotations

import numpy as np
import pytest

from qkdctl.postprocess import verify as ver
from qkdctl.postprocess.privacy import has_pclmul, pack_bits

HW = [True, False] if has_pclmul() else [False]


def _rand64(rng, k):
    return [int(v) for v in rng.integers(0, 2**64, k, dtype=np.uint64)]


def _poly_mod(a: int, p: int) -> int:
    dp = p.bit_length() - 1
    while a and a.bit_length() - 1 >= dp:
        a ^= p << (a.bit_length() - 1 - dp)
    return a


def _poly_gcd(a: int, b: int) -> int:
    while b:
        a, b = b, _poly_mod(a, b)
    return a


# ---------------------------------------------------------------- the field

def test_modulus_is_irreducible():
    # Rabin's test for degree 64 (its only prime divisor is 2):
    # z^(2^64) = z mod p, and gcd(z^(2^32) - z, p) = 1
    z = 2
    a = z
    for i in range(64):
        a = ver.gf64_mul_reference(a, a)
        if i == 31:
            assert _poly_gcd(ver.POLY, a ^ z) == 1
    assert a == z


def test_reference_multiply_small_cases():
    assert ver.gf64_mul_reference(0, 12345) == 0
    assert ver.gf64_mul_reference(1, 12345) == 12345
    assert ver.gf64_mul_reference(2, 1 << 63) == 0x1B              # z * z^63 = z^64
    assert ver.gf64_mul_reference(3, 5) == 15                       # (z+1)(z^2+1)


@pytest.mark.parametrize("hw", HW)
def test_multiply_matches_reference(hw):
    rng = np.random.default_rng(1)
    vals = [0, 1, 2, 0x1B, 2**63, 2**64 - 1] + _rand64(rng, 40)
    for a in vals:
        for b in vals:
            assert ver.gf64_mul(a, b, hardware=hw) == ver.gf64_mul_reference(a, b)


@pytest.mark.parametrize("hw", HW)
def test_field_laws(hw):
    rng = np.random.default_rng(2)
    mul = lambda a, b: ver.gf64_mul(a, b, hardware=hw)  # noqa: E731
    for a, b, c in zip(_rand64(rng, 200), _rand64(rng, 200), _rand64(rng, 200), strict=True):
        assert mul(a, b) == mul(b, a)
        assert mul(a, b ^ c) == mul(a, b) ^ mul(a, c)
        assert mul(mul(a, b), c) == mul(a, mul(b, c))
        assert mul(a, 1) == a and mul(a, 0) == 0
    # a^(2^64 - 1) = 1 for a != 0 (the multiplicative group has order 2^64 - 1)
    a = _rand64(rng, 1)[0] | 1
    r, e, base = 1, 2**64 - 1, a
    while e:
        if e & 1:
            r = mul(r, base)
        base = mul(base, base)
        e >>= 1
    assert r == 1


# ---------------------------------------------------------------- tag lengths

@pytest.mark.parametrize("n", [10**3, 10**5, 10**6, 2**22, 10**8])
@pytest.mark.parametrize("eps", [1e-15, 1e-10, 1e-30])
def test_instances_meet_eps_and_are_minimal(n, eps):
    t = ver.hash_instances(n, eps)
    assert ver.collision_probability(n, t) <= eps
    assert t == 1 or ver.collision_probability(n, t - 1) > eps
    assert ver.instances_for(n, eps) == t
    assert ver.tag_length_bits(n, eps) == 64 * t
    assert ver.key_length_bytes(n, eps) == 8 * t


def test_tag_lengths_at_default_eps():
    assert ver.EPS_COR == 1e-15
    assert ver.tag_length_bits(10**3) == 64
    assert ver.tag_length_bits(10**6) == 64      # (15625 + 1) / 2^64 = 8.5e-16
    assert ver.tag_length_bits(2**22) == 128     # (65536 + 1) / 2^64 = 3.6e-15
    assert ver.tag_length_bits(10**8) == 128
    assert ver.collision_probability(2**22, 1) == pytest.approx(65537 / 2**64)


def test_bad_parameters():
    for eps in (0.0, 1.0, -1e-3, 2.0):
        with pytest.raises(ValueError, match="eps_cor"):
            ver.hash_instances(1000, eps)
    with pytest.raises(ValueError, match="n_bits"):
        ver.hash_instances(-1, 1e-15)
    with pytest.raises(ValueError, match="instances"):
        ver.collision_probability(1000, 0)
    with pytest.raises(ValueError, match="random bytes"):
        ver.draw_hash_key(1000, 1e-15, b"\x00" * 7)
    with pytest.raises(ValueError, match="random bytes"):
        ver.draw_hash_key(1000, 1e-15, lambda k: b"\x01" * (k + 1))
    with pytest.raises(ValueError, match="multiple of 8"):
        ver.tag(np.zeros(10, np.uint8), b"\x00" * 12)
    with pytest.raises(ValueError, match="only 0 and 1"):
        ver.tag(np.array([0, 2], np.uint8), b"\x00" * 8)


# ---------------------------------------------------------------- tags

def test_draw_hash_key_sources():
    assert len(ver.draw_hash_key(2**22)) == 16
    assert ver.draw_hash_key(1000, rng_bytes=b"abcdefgh") == b"abcdefgh"
    rng = np.random.default_rng(3)
    key = ver.draw_hash_key(2**22, 1e-15, lambda k: rng.bytes(k))
    assert len(key) == 16


@pytest.mark.parametrize("hw", HW)
def test_tag_matches_reference(hw):
    rng = np.random.default_rng(4)
    for n in (0, 1, 2, 63, 64, 65, 128, 129, 1000):
        bits = rng.integers(0, 2, n, dtype=np.uint8)
        key = rng.bytes(24)
        t = ver.tag(bits, key, hardware=hw)
        assert len(t) == 24
        assert t == ver.tag_reference(bits, key)


def test_equal_keys_equal_tags_and_verify():
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2, 100_000, dtype=np.uint8)
    key = ver.draw_hash_key(bits.size)
    assert ver.tag(bits, key) == ver.tag(bits.copy(), key)
    assert ver.tag(bits.astype(bool), key) == ver.tag(bits, key)
    assert ver.verify(bits, key, ver.tag(bits, key))
    other = bits.copy()
    other[123] ^= 1
    assert not ver.verify(other, key, ver.tag(bits, key))


@pytest.mark.parametrize("hw", HW)
def test_every_single_bit_flip_changes_the_tag(hw):
    rng = np.random.default_rng(6)
    n = 777
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    key = ver.draw_hash_key(n, rng_bytes=rng.bytes(8))
    t0 = ver.tag(bits, key, hardware=hw)
    for j in range(n):
        flipped = bits.copy()
        flipped[j] ^= 1
        assert ver.tag(flipped, key, hardware=hw) != t0, j


def test_different_lengths_differ():
    # zero padding alone would make these collide; the length word tells them apart
    rng = np.random.default_rng(7)
    key = rng.bytes(16)
    bits = rng.integers(0, 2, 100, dtype=np.uint8)
    tags = {ver.tag(np.concatenate([bits, np.zeros(k, np.uint8)]), key) for k in range(0, 70)}
    assert len(tags) == 70
    assert ver.tag(np.zeros(0, np.uint8), key) != ver.tag(np.zeros(1, np.uint8), key)


def test_packed_tag_ignores_bits_past_the_end():
    rng = np.random.default_rng(8)
    bits = rng.integers(0, 2, 1000, dtype=np.uint8)
    key = rng.bytes(8)
    w = pack_bits(bits)
    w[-1] |= np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(1000 % 64)
    assert ver.tag_packed(w, 1000, key) == ver.tag(bits, key)
    assert ver.tag_packed(np.append(w, np.uint64(99)), 1000, key) == ver.tag(bits, key)


def test_zero_key_point_is_a_root_counted_in_the_bound():
    # h_k has no constant term, so k = 0 maps every message to 0: one of the <= L + 1
    # roots that collision_probability counts
    rng = np.random.default_rng(9)
    a = rng.integers(0, 2, 500, dtype=np.uint8)
    b = rng.integers(0, 2, 500, dtype=np.uint8)
    zero_key = bytes(8)
    assert ver.tag(a, zero_key) == ver.tag(b, zero_key) == bytes(8)
