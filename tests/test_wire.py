"""The byte encoding of channel messages: round trips, determinism, and strict decoding.

Test message classes live in a private :class:`~qkdctl.wire.Registry` so that the
global registry only sees the protocol's own messages (registered here too, which is
a no-op if the protocol module already did it).
"""

from __future__ import annotations

import dataclasses
import struct
import tracemalloc
from dataclasses import dataclass

import numpy as np
import pytest

from qkdctl import wire
from qkdctl.errors import QkdctlError
from qkdctl.protocol import DetectionAnnouncement, SiftingReply
from qkdctl.wire import Registry, WireError

REG = Registry()


@dataclass(frozen=True)
class Scalars:
    a: int
    b: float
    c: bool
    d: str
    e: bytes
    f: None


@dataclass(frozen=True)
class Anything:
    x: object


@dataclass(frozen=True)
class Arrays:
    seq: int
    pulses: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class Tuples:
    ints: tuple[int, ...]
    pair: tuple[str, float]
    maybe: int | None


@dataclass(frozen=True)
class Empty:
    pass


@dataclass(frozen=True)
class Positive:
    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError("n must be positive")


for _cls in (Scalars, Anything, Arrays, Tuples, Empty, Positive):
    REG.register(_cls)


def rt(msg):
    data = REG.encode(msg)
    assert REG.encode(msg) == data          # deterministic
    out = REG.decode(data)
    assert type(out) is type(msg)
    return out, data


def same(a, b) -> bool:
    """Deep equality that treats arrays by dtype, shape and value, and NaN as equal."""
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype.newbyteorder("=") == b.dtype
                and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------------------
# round trips

SCALARS = [
    Scalars(0, 0.0, False, "", b"", None),
    Scalars(-1, -0.0, True, "ÅliCE → βob ✓", bytes(range(256)), None),
    Scalars(2**63 - 1, float("inf"), True, "x" * 1000, b"\x00" * 70000, None),
    Scalars(-2**63, float("nan"), False, "\x00", b"\xff", None),
    Scalars(2**2039 - 1, 1e-308, True, "a", b"b", None),
    Scalars(-2**2039, -5e-324, False, "z", b"", None),
]


@pytest.mark.parametrize("msg", SCALARS)
def test_scalar_round_trip(msg):
    out, _ = rt(msg)
    assert same(msg, out)


@pytest.mark.parametrize("value", [
    None, True, False, 0, 1, -1, 127, 128, -128, -129, 255, 256, 2**64, -(2**64),
    0.5, float("-inf"), "s", b"b", (), (1,), (1, (2, (3, ())), "x", None, b"", 1.5),
    tuple(range(300)), (np.arange(3), (np.zeros(0, bool),)),
])
def test_untyped_values_round_trip(value):
    out, _ = rt(Anything(value))
    assert same(value, out.x)


DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (5,), (0, 7), (3, 0, 2), (), (2, 3, 4)])
def test_array_round_trip(dtype, shape):
    rng = np.random.default_rng(7)
    a = np.asarray(rng.integers(0, 2, shape) if dtype == "bool"
                   else rng.normal(size=shape) * 100).astype(dtype)
    out, _ = rt(Anything(a))
    assert same(a, out.x)
    assert out.x.flags.writeable and out.x.flags.c_contiguous


def test_int64_extremes_and_big_arrays():
    a = np.array([np.iinfo(np.int64).min, -1, 0, 1, np.iinfo(np.int64).max], np.int64)
    u = np.array([0, np.iinfo(np.uint64).max], np.uint64)
    out, _ = rt(Arrays(2**40, a, u))
    assert same(a, out.pulses) and same(u, out.mask) and out.seq == 2**40
    big = np.arange(2_000_000, dtype=np.int64) * (2**40)
    out, data = rt(Arrays(0, big, np.ones(2_000_000, bool)))
    assert np.array_equal(out.pulses, big) and out.mask.all() and out.mask.dtype == bool
    assert len(data) < 8 * 2_000_000 + 2_000_000 + 200


def test_byte_order_and_layout_do_not_change_the_encoding():
    a = np.arange(24, dtype="<i4").reshape(4, 6)
    ref = REG.encode(Anything(a))
    for variant in (a.astype(">i4"), np.asfortranarray(a), a.T.copy().T):
        assert REG.encode(Anything(variant)) == ref
    sliced = np.arange(48, dtype=np.int32)[::2].reshape(4, 6)
    assert REG.encode(Anything(sliced)) == REG.encode(Anything(np.ascontiguousarray(sliced)))
    out = REG.decode(REG.encode(Anything(a.astype(">f8"))))
    assert out.x.dtype == np.dtype("=f8") and np.array_equal(out.x, a)


def test_numpy_scalars_are_sent_as_python_scalars():
    out, data = rt(Tuples((np.int64(3), np.uint8(4)), ("a", np.float32(0.5)), np.int16(-2)))
    assert out == Tuples((3, 4), ("a", 0.5), -2)
    assert data == REG.encode(Tuples((3, 4), ("a", 0.5), -2))
    assert type(out.ints[0]) is int and type(out.pair[1]) is float


def test_equal_messages_equal_bytes():
    m1 = Tuples((1, 2), ("x", 1.0), None)
    m2 = Tuples((1, 2), ("x", 1.0), None)
    assert REG.encode(m1) == REG.encode(m2)
    assert REG.encode(m1) != REG.encode(Tuples((1, 2), ("x", 1.0), 0))


def test_empty_dataclass():
    out, data = rt(Empty())
    assert out == Empty()
    assert data == bytes([1]) + struct.pack("<H", 5) + b"Empty" + struct.pack("<H", 0)


def test_protocol_messages_round_trip():
    wire.register(DetectionAnnouncement)
    wire.register(SiftingReply)
    ann = DetectionAnnouncement(4, 2, np.array([3, 17, 2**40], np.int64),
                                np.array([0, 1, 1], np.uint8))
    out = wire.decode(wire.encode(ann))
    assert same(ann, out)
    rep = SiftingReply(5, 2, np.array([True, False, True]), np.zeros(3, np.uint8))
    assert same(rep, wire.decode(wire.encode(rep)))
    empty = DetectionAnnouncement(0, 0, np.zeros(0, np.int64), np.zeros(0, np.uint8))
    assert same(empty, wire.decode(wire.encode(empty)))


# ----------------------------------------------------------------------------------------
# registry and encode-side refusals

def nested(depth: int) -> tuple:
    value: tuple = ()
    for _ in range(depth):
        value = (value,)
    return value


def test_registry_rules():
    r = Registry()

    @wire.message(registry=r)
    @dataclass(frozen=True)
    class A:
        x: int

    @wire.message("Renamed", registry=r)
    @dataclass(frozen=True)
    class B:
        y: int

    assert r.name_of(A) == "A" and r.name_of(B) == "Renamed"
    assert r.register(A) is A and r.register(A, "A") is A      # idempotent
    with pytest.raises(ValueError, match="already registered"):
        r.register(A, "Other")

    @dataclass(frozen=True)
    class C:
        z: int

    with pytest.raises(ValueError, match="already used"):
        r.register(C, "A")

    @dataclass
    class Mutable:
        z: int

    with pytest.raises(TypeError, match="frozen"):
        r.register(Mutable)
    with pytest.raises(TypeError, match="not a dataclass"):
        r.register(int)
    assert r.decode(r.encode(B(3))) == B(3)
    assert "Renamed" in r.names()


@pytest.mark.parametrize("msg, match", [
    (Anything([1, 2]), "list.*use a tuple"),
    (Anything({"a": 1}), "dict"),
    (Anything(np.array([object()])), "dtype object"),
    (Anything(np.zeros(2, dtype=[("a", "i4")])), "cannot be sent"),
    (Anything(np.zeros(2, "datetime64[s]")), "cannot be sent"),
    (Anything(np.zeros(2, np.longdouble) if np.dtype(np.longdouble).itemsize > 8
              else np.zeros(2, "U1")), "cannot be sent"),
    (Anything(2**2040), "integer too large"),
    (Anything("\ud800"), "UTF-8"),
    (Anything(nested(40)), "nested"),
    (Scalars("1", 0.0, False, "", b"", None), r"Scalars.a: expected int, got str"),
    (Scalars(True, 0.0, False, "", b"", None), r"Scalars.a: expected int, got bool"),
    (Scalars(1, 0.0, 1, "", b"", None), r"Scalars.c: expected bool, got int"),
    (Tuples((1, "2"), ("a", 1.0), None), r"Tuples.ints\[1\]: expected int"),
    (Tuples((1,), ("a",), None), r"Tuples.pair: expected a tuple of 2 items"),
    (Arrays(0, [1, 2], np.zeros(2)), r"Arrays.pulses: expected ndarray, got list"),
])
def test_encode_refuses_unsupported_values(msg, match):
    with pytest.raises(WireError, match=match):
        REG.encode(msg)


def test_encode_refuses_unregistered_class():
    @dataclass(frozen=True)
    class Unknown:
        x: int

    with pytest.raises(WireError, match="not a registered message type"):
        REG.encode(Unknown(1))


def test_float_field_accepts_int():
    out, _ = rt(Scalars(1, 3, True, "", b"", None))
    assert out.b == 3


# ----------------------------------------------------------------------------------------
# strict decoding

def header(name: str, nfields: int) -> bytes:
    raw = name.encode()
    return bytes([1]) + struct.pack("<H", len(raw)) + raw + struct.pack("<H", nfields)


def field(name: str, value: bytes) -> bytes:
    return struct.pack("<H", len(name)) + name.encode() + value


def array_value(code: int, shape: tuple[int, ...], data: bytes = b"") -> bytes:
    return (bytes([8, code, len(shape)]) + b"".join(struct.pack("<Q", d) for d in shape)
            + data)


def anything(value: bytes) -> bytes:
    return header("Anything", 1) + field("x", value)


BAD = [
    (b"", "truncated"),
    (bytes([2]) + REG.encode(Empty())[1:], "version 2"),
    (header("Nope", 0), "unknown message type 'Nope'"),
    (header("Empty", 1) + field("x", b"\x00"), "1 fields, expected 0"),
    (header("Anything", 0), "0 fields, expected 1"),
    (header("Anything", 1) + field("y", b"\x00"), "field 'y' where 'x' was expected"),
    (anything(b"\x00") + b"\x00", "1 bytes after the end"),
    (anything(b"\x09"), "unknown value tag 0x09"),
    (anything(b"\x03\x00"), "integer of length 0"),
    (anything(b"\x03\x02\x05\x00"), "shortest form"),
    (anything(b"\x03\x02\xff\xff"), "shortest form"),
    (anything(b"\x05\x02\x00\x00\x00\xc3\x28"), "invalid UTF-8"),
    (anything(b"\x05\xff\xff\xff\xff"), "truncated"),
    (anything(b"\x06\xff\xff\xff\x7f" + b"ab"), "truncated"),
    (anything(b"\x07\xff\xff\xff\xff"), "tuple of 4294967295 items"),
    (anything(array_value(14, (1,), b"\x00")), "unknown array dtype code 14"),
    (anything(array_value(4, (2**30,))), "needs 8589934592 bytes"),
    (anything(array_value(4, (2**63, 2**63))), "too large"),
    (anything(array_value(4, (0, 2**62))), "too large"),
    (anything(bytes([8, 4, 33]) + b"\x00" * 8 * 33), "33 dimensions"),
    (anything(array_value(0, (3,), b"\x00\x01\x02")), "bool array with a byte other"),
    (header("Arrays", 3) + field("seq", b"\x03\x01\x00") + field("pulses", b"\x03\x01\x00")
     + field("mask", b"\x00"), "Arrays.pulses: expected ndarray, got int"),
    (header("Scalars", 6) + field("a", b"\x02") + b"", "Scalars.a: expected int, got bool"),
    (header("Positive", 1) + field("n", b"\x03\x01\x00"), "Positive: n must be positive"),
    (b"\x01\xff\xff", "truncated"),
]


@pytest.mark.parametrize("data, match", BAD)
def test_decode_refuses(data, match):
    with pytest.raises(WireError, match=match):
        REG.decode(data)


def test_deep_nesting_refused_without_recursion_error():
    data = anything(b"\x07\x01\x00\x00\x00" * 10_000 + b"\x00")
    with pytest.raises(WireError, match="nested more than 32"):
        REG.decode(data)


def test_absurd_lengths_do_not_allocate():
    tracemalloc.start()
    try:
        for data in (anything(array_value(4, (2**40,))), anything(array_value(13, (2**20, 2**20))),
                     anything(b"\x07\xff\xff\xff\x0f" + b"\x00" * 100),
                     anything(b"\x06\xff\xff\xff\xff")):
            with pytest.raises(WireError):
                REG.decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


VALID = [REG.encode(m) for m in (
    SCALARS[1], Arrays(3, np.arange(5, dtype=np.int64), np.array([True, False])),
    Tuples((1, 2, 3), ("é", 2.5), 7), Anything((np.zeros((2, 0)), b"x", None)), Empty())]


@pytest.mark.parametrize("data", VALID, ids=["scalars", "arrays", "tuples", "nested", "empty"])
def test_every_truncation_is_refused(data):
    for n in range(len(data)):
        with pytest.raises(WireError):
            REG.decode(data[:n])
    with pytest.raises(WireError, match="after the end"):
        REG.decode(data + b"\x00")


def test_garbage_never_crashes():
    rng = np.random.default_rng(1234)
    outcomes = {"ok": 0, "refused": 0}

    def attempt(data: bytes) -> None:
        try:
            REG.decode(data)
            outcomes["ok"] += 1
        except WireError:
            outcomes["refused"] += 1

    for _ in range(2000):
        attempt(rng.bytes(int(rng.integers(0, 64))))
    for _ in range(3000):      # mutations of valid encodings reach deeper into the decoder
        data = bytearray(VALID[int(rng.integers(len(VALID)))])
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        attempt(bytes(data))
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 5000


def test_decode_accepts_only_bytes_like():
    with pytest.raises(WireError, match="expected bytes"):
        REG.decode("not bytes")  # type: ignore[arg-type]
    assert REG.decode(bytearray(REG.encode(Empty()))) == Empty()
    assert REG.decode(memoryview(REG.encode(Empty()))) == Empty()


def test_wire_error_is_a_qkdctl_error():
    assert issubclass(WireError, QkdctlError)


def test_nesting_limit_is_the_same_both_ways():
    deepest = nested(wire.MAX_DEPTH - 1)       # MAX_DEPTH tuples, one inside the other
    out, data = rt(Anything(deepest))
    assert out.x == deepest
    with pytest.raises(WireError, match="nested more than 32"):
        REG.encode(Anything(nested(wire.MAX_DEPTH)))
    deeper = data.replace(b"\x07\x00\x00\x00\x00", b"\x07\x01\x00\x00\x00\x07\x00\x00\x00\x00")
    with pytest.raises(WireError, match="nested more than 32"):
        REG.decode(deeper)
