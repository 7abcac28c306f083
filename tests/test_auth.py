"""Authenticated framing: every kind of tampering is refused with a message saying what
was wrong, the endpoint stays closed afterwards, TCP framing on loopback, and the
Wegman-Carter pads drawn from the key store."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qkdctl import wire
from qkdctl.auth import (
    HEADER,
    AuthenticatedEndpoint,
    AuthenticationError,
    EndpointClosedError,
    FrameError,
    HmacSha256,
    LocalTransport,
    PadError,
    PadExhaustedError,
    PayloadError,
    ReflectionError,
    ReplayError,
    TagError,
    TcpListener,
    TcpTransport,
    TransportError,
    WegmanCarter,
    poly_hash_127,
)
from qkdctl.errors import QkdctlError
from qkdctl.keystore import KeyExhaustedError, KeyStore, PadUnavailableError
from qkdctl.protocol import DetectionAnnouncement, SiftingReply
from qkdctl.wire import WireError

SID = bytes.fromhex("0123456789abcdef0123456789abcdef")
PSK = bytes(range(100, 132))
HASH_KEY = bytes.fromhex("8f1e2d3c4b5a69788796a5b4c3d2e1f0")
POOL = np.random.default_rng(5).bytes(1 << 16)

REG = wire.Registry()


@dataclass(frozen=True)
class Note:
    text: str
    values: np.ndarray


@dataclass(frozen=True)
class Numbered:
    seq: int
    block: int


REG.register(Note)
REG.register(Numbered)
wire.register(DetectionAnnouncement)
wire.register(SiftingReply)


class MemoryPads:
    """An in-memory pad source: the first half of the pool for alice->bob pads, the second
    half for bob->alice; the sender allocates, the receiver claims, no bit twice."""

    def __init__(self, pool: bytes):
        self.pool = pool
        half = len(pool) // 2
        self.regions = ((0, half), (half, len(pool)))
        self.next = [0, half]
        self.used: set[int] = set()
        self.bits_used = 0

    def _take(self, start: int, n: int) -> bytes:
        self.used.update(range(start, start + n))
        self.bits_used += 8 * n
        return self.pool[start:start + n]

    def allocate_pad(self, direction: int, n_bits: int, purpose: str) -> tuple[int, bytes]:
        n = n_bits // 8
        start = self.next[direction]
        if start + n > self.regions[direction][1]:
            raise KeyExhaustedError(f"{n_bits} key bits needed for {purpose}, none left")
        self.next[direction] += n
        return 8 * start, self._take(start, n)

    def claim_pad(self, direction: int, position: int, n_bits: int, purpose: str) -> bytes:
        start, n = position // 8, n_bits // 8
        lo, hi = self.regions[direction]
        if position % 8 or not lo <= start <= hi - n or self.used & set(range(start, start + n)):
            raise PadUnavailableError(f"pad at {position} is not available")
        return self._take(start, n)


def make_auth(kind: str, *, psk: bytes = PSK, hash_key: bytes = HASH_KEY,
              pool: bytes = POOL):
    return HmacSha256(psk) if kind == "hmac" else WegmanCarter(hash_key, MemoryPads(pool))


def pair(kind: str, *, bob_auth=None, bob_sid: bytes = SID, registry=REG, **kw):
    ta, tb = LocalTransport.pair()
    alice = AuthenticatedEndpoint(ta, make_auth(kind), "alice", SID, registry=registry, **kw)
    bob = AuthenticatedEndpoint(tb, bob_auth or make_auth(kind), "bob", bob_sid,
                                registry=registry, **kw)
    return alice, bob, ta, tb


def note(i: int = 0) -> Note:
    return Note(f"note {i}", np.arange(4, dtype=np.int64) + i)


def assert_closed(ep: AuthenticatedEndpoint) -> None:
    assert ep.closed and ep.transport.closed
    with pytest.raises(EndpointClosedError, match=f"{ep.role} endpoint is closed"):
        ep.recv()
    with pytest.raises(EndpointClosedError):
        ep.send(note())


def refused(ep: AuthenticatedEndpoint, exc: type[Exception], match: str) -> str:
    with pytest.raises(exc, match=match) as e:
        ep.recv()
    assert_closed(ep)
    return str(e.value)


KINDS = ["hmac", "wc"]


@pytest.fixture
def fast_tmp(tmp_path):
    """A scratch directory on tmpfs when there is one (file syncs cost nothing there, which
    keeps these tests fast on a busy disk), else pytest's tmp_path."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="qkdctl-test-", dir=shm))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


# ----------------------------------------------------------------------------------------
# normal operation

@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_both_directions(kind):
    alice, bob, _, _ = pair(kind)
    for i in range(5):
        alice.send(note(i))
        got = bob.recv()
        assert got.text == f"note {i}" and np.array_equal(got.values, note(i).values)
        bob.send(Numbered(seq=99, block=i))     # a message seq field is not the frame's
        assert alice.recv() == Numbered(99, i)
    assert (alice.sent, alice.received, bob.sent, bob.received) == (5, 5, 5, 5)
    assert not alice.closed and not bob.closed


@pytest.mark.parametrize("kind", KINDS)
def test_interleaved_directions_and_windows(kind):
    """Several frames in flight each way, in any interleaving (pads stay in step)."""
    alice, bob, _, _ = pair(kind)
    bob.send(note(0))
    bob.send(note(1))
    alice.send(note(10))
    assert bob.recv().text == "note 10"
    bob.send(note(2))
    assert [alice.recv().text for _ in range(3)] == ["note 0", "note 1", "note 2"]
    for i in range(3):
        alice.send(note(20 + i))
    assert [bob.recv().text for _ in range(3)] == ["note 20", "note 21", "note 22"]


@pytest.mark.parametrize("kind", KINDS)
def test_sifting_messages_over_the_default_registry(kind):
    ta, tb = LocalTransport.pair()
    alice = AuthenticatedEndpoint(ta, make_auth(kind), "alice", SID)
    bob = AuthenticatedEndpoint(tb, make_auth(kind), "bob", SID)
    ann = DetectionAnnouncement(0, 0, np.array([5, 9, 2**40], np.int64),
                                np.array([0, 1, 0], np.uint8))
    bob.send(ann)
    got = alice.recv()
    assert isinstance(got, DetectionAnnouncement) and np.array_equal(got.pulses, ann.pulses)
    alice.send(SiftingReply(0, 0, np.array([True, False, True]), np.array([0, 1, 2], np.uint8)))
    assert bob.recv().keep.tolist() == [True, False, True]


# ----------------------------------------------------------------------------------------
# tampering

@pytest.mark.parametrize("kind", KINDS)
def test_flipped_bit_anywhere_is_refused(kind):
    alice, _, _, tb = pair(kind)
    alice.send(Note("x", np.arange(2, dtype=np.int16)))
    frame = tb.inbox[0]
    tampered = "message 0 from alice failed authentication (tampered or wrong key)"
    for bit in range(8 * len(frame)):
        _, bob, _, tb2 = pair(kind)
        bad = bytearray(frame)
        pos = bit // 8
        bad[pos] ^= 1 << (bit % 8)
        tb2.inbox.append(bytes(bad))
        with pytest.raises(AuthenticationError) as e:
            bob.recv()
        err, msg = e.value, str(e.value)
        if pos >= HEADER.size:                              # payload and tag
            assert isinstance(err, TagError) and msg == tampered
        elif pos == 6 and bit % 8 == 0:                     # direction byte 0 -> 1
            if kind == "hmac":
                assert isinstance(err, TagError)
                assert msg == "message 0 from bob failed authentication (tampered or wrong key)"
            else:       # bob holds no pad for a message 0 of his own: refused unchecked
                assert isinstance(err, ReflectionError)
                assert msg == ("message 0 from bob came back to bob (reflected frame) "
                               "(frame not authenticated)")
        elif 16 <= pos < 24:                                # key reference
            if kind == "hmac":
                assert isinstance(err, TagError) and msg == tampered
            else:       # the pad named is claimed, or cannot be
                assert msg == tampered or isinstance(err, PadError), msg
        elif 8 <= pos < 16:                                 # sequence number
            seq = struct.unpack_from("<Q", bad, 8)[0]
            if kind == "hmac":
                assert isinstance(err, TagError)
                assert msg == f"message {seq} from alice failed authentication (tampered or " \
                              "wrong key)"
            else:       # checking it would mean drawing pads ahead: refused unchecked
                assert isinstance(err, ReplayError)
                assert msg.startswith(f"message {seq} from alice out of order: expected 0")
                assert msg.endswith("(frame not authenticated)")
        else:                                               # magic, version, ids, length
            assert isinstance(err, FrameError), msg
        assert_closed(bob)


@pytest.mark.parametrize("kind", KINDS)
def test_tampered_payload_message(kind):
    alice, bob, _, tb = pair(kind)
    alice.send(note())
    alice.send(note(1))
    assert bob.recv().text == "note 0"
    f = bytearray(tb.inbox[0])
    f[HEADER.size + 3] ^= 0x40
    tb.inbox[0] = bytes(f)
    refused(bob, TagError, r"^message 1 from alice failed authentication \(tampered or wrong "
                           r"key\)$")


@pytest.mark.parametrize("kind", KINDS)
def test_replayed_frame(kind):
    alice, bob, ta, tb = pair(kind)
    ta.interceptor = lambda frames: frames + frames[-1:]     # every frame delivered twice
    alice.send(note(0))
    assert bob.recv().text == "note 0"
    refused(bob, ReplayError, r"^message 0 from alice replayed or reordered: expected 1$")


@pytest.mark.parametrize("kind", KINDS)
def test_replay_after_progress(kind):
    alice, bob, _, tb = pair(kind)
    frames = []
    for i in range(3):
        alice.send(note(i))
        frames.append(tb.inbox[-1])
        bob.recv()
    tb.inbox.append(frames[1])
    refused(bob, ReplayError, r"^message 1 from alice replayed or reordered: expected 3$")


@pytest.mark.parametrize("kind", KINDS)
def test_swapped_frames(kind):
    alice, bob, ta, tb = pair(kind)
    alice.send(note(0))
    alice.send(note(1))
    tb.inbox.reverse()
    msg = refused(bob, ReplayError, r"^message 1 from alice out of order: expected 0 \(a "
                                    r"message was dropped or reordered\)")
    assert "failed authentication" not in msg


@pytest.mark.parametrize("kind", KINDS)
def test_swapped_frames_later_in_the_stream(kind):
    alice, bob, _, tb = pair(kind)
    for i in range(3):
        alice.send(note(i))
    assert bob.recv().text == "note 0"
    tb.inbox.rotate(1)     # 2 now comes before 1
    refused(bob, ReplayError, r"^message 2 from alice out of order: expected 1")


@pytest.mark.parametrize("kind", KINDS)
def test_dropped_frame(kind):
    alice, bob, ta, tb = pair(kind)
    dropped = []

    def drop_first(frames: list[bytes]) -> list[bytes]:
        if not dropped:
            dropped.append(frames.pop(0))
        return frames

    ta.interceptor = drop_first
    alice.send(note(0))
    alice.send(note(1))
    assert len(tb.inbox) == 1
    refused(bob, ReplayError, r"^message 1 from alice out of order: expected 0 \(a message "
                              r"was dropped or reordered\)")


@pytest.mark.parametrize("kind", KINDS)
def test_dropped_last_frame_is_a_transport_error(kind):
    alice, bob, ta, _ = pair(kind)
    ta.interceptor = lambda frames: []
    alice.send(note(0))
    with pytest.raises(TransportError, match="no frame waiting"):
        bob.recv()
    assert_closed(bob)


@pytest.mark.parametrize("kind", KINDS)
def test_every_truncation_is_refused(kind):
    alice, _, _, tb = pair(kind)
    alice.send(note())
    frame = tb.inbox[0]
    for n in range(len(frame)):
        _, bob, _, tb2 = pair(kind)
        tb2.inbox.append(frame[:n])
        want = (f"truncated frame: {n} of at least {HEADER.size} bytes" if n < HEADER.size
                else f"truncated frame: {n} of {len(frame)} bytes")
        refused(bob, FrameError, f"^{want}$")


@pytest.mark.parametrize("kind", KINDS)
def test_extra_bytes_refused(kind):
    alice, bob, _, tb = pair(kind)
    alice.send(note())
    n = len(tb.inbox[0])
    tb.inbox[0] += b"\x00\x00"
    refused(bob, FrameError, f"frame of {n + 2} bytes has 2 extra bytes after its tag")


@pytest.mark.parametrize("kind", KINDS)
def test_reflected_frame(kind):
    alice, bob, ta, tb = pair(kind)
    alice.send(note(0))
    ta.inbox.append(tb.inbox[0])        # the frame comes back to alice
    refused(alice, ReflectionError, r"^message 0 from alice came back to alice \(reflected "
                                    r"frame\)$")
    assert bob.recv().text == "note 0"  # the genuine copy still reaches bob


@pytest.mark.parametrize("kind", KINDS)
def test_reflected_frame_after_traffic(kind):
    alice, bob, ta, tb = pair(kind)
    for i in range(3):
        bob.send(note(i))
        alice.recv()
    bob.send(note(3))
    tb.inbox.append(ta.inbox[0])
    refused(bob, ReflectionError, r"^message 3 from bob came back to bob")


@pytest.mark.parametrize("kind, other", [
    ("hmac", HmacSha256(bytes(32))),
    ("hmac", HmacSha256(PSK + b"\x00")),
    ("wc", WegmanCarter(bytes.fromhex("01" * 16), MemoryPads(POOL))),
    ("wc", WegmanCarter(HASH_KEY, MemoryPads(POOL[16:] + POOL[:16]))),   # other pads
])
def test_wrong_key(kind, other):
    alice, bob, _, _ = pair(kind, bob_auth=other)
    alice.send(note())
    refused(bob, TagError, r"^message 0 from alice failed authentication \(tampered or wrong "
                           r"key\)$")


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_session(kind):
    alice, bob, _, _ = pair(kind, bob_sid=b"another session")
    alice.send(note())
    refused(bob, TagError, "failed authentication")


def test_authenticator_mismatch():
    alice, bob, _, _ = pair("hmac", bob_auth=make_auth("wc"))
    alice.send(note())
    refused(bob, FrameError, "^frame authenticated with HMAC-SHA256; this endpoint uses "
                             "Wegman-Carter$")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset, value, match", [
    (0, b"XKDA", "not a qkdctl frame"),
    (4, b"\x02", "frame format version 2"),
    (6, b"\x07", "invalid direction byte 7"),
    (7, b"\x01", "unknown flags 0x01"),
    (24, struct.pack("<I", 2**31), "payload of 2147483648 bytes; the limit is 4096"),
])
def test_bad_header_fields(kind, offset, value, match):
    alice, bob, _, tb = pair(kind, max_payload=4096)
    alice.send(note())
    f = bytearray(tb.inbox[0])
    f[offset:offset + len(value)] = value
    tb.inbox[0] = bytes(f)
    refused(bob, FrameError, match)


@pytest.mark.parametrize("kind", KINDS)
def test_authentic_but_undecodable_payload(kind):
    ta, tb = LocalTransport.pair()
    alice = AuthenticatedEndpoint(ta, make_auth(kind), "alice", SID, registry=REG)
    bob = AuthenticatedEndpoint(tb, make_auth(kind), "bob", SID, registry=wire.Registry())
    alice.send(note())
    with pytest.raises(PayloadError, match="message 0 from alice is authentic but is not a "
                                           "valid message: unknown message type 'Note'") as e:
        bob.recv()
    assert isinstance(e.value, WireError) and isinstance(e.value, AuthenticationError)
    assert_closed(bob)


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_frames_only_raise_authentication_errors(kind):
    rng = np.random.default_rng(77)
    alice, _, _, tb = pair(kind)
    alice.send(note())
    valid = tb.inbox[0]
    for i in range(300):
        _, bob, _, tb2 = pair(kind)
        if i % 2:
            data = rng.bytes(int(rng.integers(0, 120)))
        else:
            data = bytearray(valid)
            for _ in range(int(rng.integers(1, 5))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            data = bytes(data)
            if data == valid:
                continue
        tb2.inbox.append(data)
        with pytest.raises(AuthenticationError):
            bob.recv()
        assert bob.closed


@pytest.mark.parametrize("kind", KINDS)
def test_send_failures_close_the_endpoint(kind):
    alice, _, ta, _ = pair(kind, max_payload=64)
    with pytest.raises(FrameError, match="message 0 to bob is .* bytes; the limit is 64"):
        alice.send(Note("x" * 100, np.zeros(0)))
    assert_closed(alice)
    alice, _, _, _ = pair(kind)
    with pytest.raises(WireError, match="not a registered message type"):
        alice.send(object())
    assert alice.closed


def test_close_by_application():
    alice, bob, ta, _ = pair("hmac")
    alice.close()
    assert ta.closed
    with pytest.raises(EndpointClosedError, match=r"closed \(closed by the application\)"):
        alice.send(note())
    with pytest.raises(TransportError, match="the peer closed the connection"):
        bob.send(note())
    assert bob.closed


def test_constructor_checks():
    ta, _ = LocalTransport.pair()
    with pytest.raises(ValueError, match="at least 32 bytes"):
        HmacSha256(b"short")
    with pytest.raises(ValueError, match="16 bytes"):
        WegmanCarter(b"x" * 15, MemoryPads(POOL))
    with pytest.raises(ValueError, match="hash point 0"):
        WegmanCarter(bytes(16), MemoryPads(POOL))
    with pytest.raises(ValueError, match="role"):
        AuthenticatedEndpoint(ta, HmacSha256(PSK), "eve", SID)
    with pytest.raises(ValueError, match="session_id"):
        AuthenticatedEndpoint(ta, HmacSha256(PSK), "alice", b"")
    assert issubclass(AuthenticationError, QkdctlError) and issubclass(TransportError,
                                                                       QkdctlError)


def test_no_key_material_in_reprs_or_logs(caplog):
    with caplog.at_level(logging.DEBUG, logger="qkdctl"):
        alice, bob, _, tb = pair("wc")
        alice.send(note())
        f = bytearray(tb.inbox[0])
        f[-1] ^= 1
        tb.inbox[0] = bytes(f)
        with pytest.raises(TagError):
            bob.recv()
        h = HmacSha256(PSK)
    texts = [repr(alice), repr(bob), repr(alice.authenticator), repr(h), str(h), caplog.text]
    for secret in (PSK, HASH_KEY, POOL[:16]):
        for t in texts:
            assert secret.hex() not in t and repr(secret)[2:-1] not in t
    assert "not shown" in repr(h) and "not shown" in repr(alice.authenticator)


# ----------------------------------------------------------------------------------------
# Wegman-Carter with the key store

def twin_stores(tmp_path, n_bits: int) -> tuple[KeyStore, KeyStore, np.ndarray]:
    key = np.random.default_rng(11).integers(0, 2, n_bits).astype(np.uint8)
    a, b = KeyStore(tmp_path / "alice"), KeyStore(tmp_path / "bob")
    a.add(key, 1e-10, key_id="k0")
    b.add(key, 1e-10, key_id="k0")
    return a, b, key


def wc_pair(sa: KeyStore, sb: KeyStore, sid: bytes = SID):
    ta, tb = LocalTransport.pair()
    return (AuthenticatedEndpoint(ta, WegmanCarter(HASH_KEY, sa), "alice", sid, registry=REG),
            AuthenticatedEndpoint(tb, WegmanCarter(HASH_KEY, sb), "bob", sid, registry=REG),
            ta, tb)


def key_ref(frame: bytes) -> int:
    return struct.unpack_from("<Q", frame, 16)[0]


def expected_tag(frame: bytes, direction: int, sid: bytes, key: np.ndarray) -> bytes:
    """The tag recomputed from the frame, the session and the key bits, independently."""
    body = frame[:-16]
    label = (b"alice->bob", b"bob->alice")[direction]
    mac_input = (b"qkdctl-auth-v1\x00" + label + struct.pack("<H", len(sid)) + sid + body)
    k = (int.from_bytes(HASH_KEY, "little") & (2**127 - 1)) % (2**127 - 1)
    pos = key_ref(frame)
    pad = np.packbits(key[pos:pos + 128]).tobytes()
    t = (poly_hash_127(k, mac_input) + int.from_bytes(pad, "little")) % 2**128
    return t.to_bytes(16, "little")


def test_wc_pads_come_from_the_key_store_128_bits_per_message(fast_tmp):
    sa, sb, key = twin_stores(fast_tmp, 4096)
    alice, bob, ta, tb = wc_pair(sa, sb)
    sent_frames = []
    ta.interceptor = lambda frames: sent_frames.append((0, frames[-1])) or frames
    tb.interceptor = lambda frames: sent_frames.append((1, frames[-1])) or frames
    n = 4
    for i in range(n):
        alice.send(note(i))
        bob.recv()
        bob.send(note(i))
        alice.recv()
        assert sa.available_bits() == sb.available_bits() == 4096 - 2 * 128 * (i + 1)
    # alice->bob pads from the first half of the block, bob->alice pads from the second,
    # each 128 bits, in order: no bit is used twice
    refs = [(d, key_ref(f)) for d, f in sent_frames]
    assert refs == [(d, 2048 * d + 128 * i) for i in range(n) for d in (0, 1)]
    for d, frame in sent_frames:
        assert frame[-16:] == expected_tag(frame, d, SID, key)
    # a new session (reopened stores) continues after the used bits
    sa2, sb2 = KeyStore(sa.path), KeyStore(sb.path)
    alice, bob, ta, tb = wc_pair(sa2, sb2, sid=b"second session")
    alice.send(note(9))
    frame = tb.inbox[0]
    assert key_ref(frame) == 128 * n
    assert frame[-16:] == expected_tag(frame, 0, b"second session", key)
    assert bob.recv().text == "note 9"
    assert sa2.available_bits() == sb2.available_bits() == 4096 - 256 * n - 128
    assert sa2.get("k0").pad_used == (((0, 128 * (n + 1)),), ((2048, 2048 + 128 * n),))


def test_wc_channels_interleaved_across_threads_share_the_stores(fast_tmp):
    """Two channels on the same pair of stores, driven from two threads at once."""
    sa, sb, _ = twin_stores(fast_tmp, 1 << 14)
    channels = [wc_pair(sa, sb, sid=f"channel {c}".encode()) for c in range(2)]
    errors: list[BaseException] = []

    def run(c: int) -> None:
        alice, bob, _, _ = channels[c]
        try:
            for i in range(6):
                if (i + c) % 2:
                    bob.send(note(i))
                    bob.send(note(i + 100))
                    assert alice.recv().text == f"note {i}"
                    assert alice.recv().text == f"note {i + 100}"
                else:
                    alice.send(note(i))
                    assert bob.recv().text == f"note {i}"
        except BaseException as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    messages = 2 * (3 * 2 + 3)
    assert sa.available_bits() == sb.available_bits() == (1 << 14) - 128 * messages


def test_wc_pad_already_used_is_refused(fast_tmp):
    sa, sb, _ = twin_stores(fast_tmp, 2048)
    alice, bob, _, tb = wc_pair(sa, sb)
    alice.send(note(0))
    assert bob.recv().text == "note 0"
    alice.send(note(1))
    f = bytearray(tb.inbox[0])
    f[16:24] = struct.pack("<Q", 0)          # point at the pad of message 0
    tb.inbox[0] = bytes(f)
    refused(bob, PadError, r"^message 1 from alice refused: its one-time pad is not "
                           r"available: .*alice->bob pad at key bits 0\.\.127 is used already")


def test_wc_forged_sequence_numbers_do_not_drain_the_store(fast_tmp):
    sa, sb, _ = twin_stores(fast_tmp, 2048)
    alice, bob, _, tb = wc_pair(sa, sb)
    alice.send(note())
    f = bytearray(tb.inbox[0])
    f[8:16] = struct.pack("<Q", 2**40)
    tb.inbox[0] = bytes(f)
    refused(bob, ReplayError, r"message 1099511627776 from alice out of order: expected 0 .*"
                              r"\(frame not authenticated\)")
    assert sb.available_bits() == 2048     # bob claimed nothing for the forged number


def test_wc_exhausted_store(fast_tmp):
    sa, sb, _ = twin_stores(fast_tmp, 256)     # one pad each way
    alice, bob, _, _ = wc_pair(sa, sb)
    alice.send(note(0))
    assert bob.recv().text == "note 0"
    bob.send(note(1))
    assert alice.recv().text == "note 1"
    assert sa.available_bits() == sb.available_bits() == 0
    with pytest.raises(PadExhaustedError, match=r"^no one-time pad for message 1 from alice: "
                                                r".*128 key bits needed .* only 0 unused "
                                                r"alice->bob pad bits left"):
        alice.send(note(2))
    assert_closed(alice)
    assert issubclass(PadExhaustedError, KeyExhaustedError)


def test_wc_with_memory_pads_counts_bits():
    pads_a, pads_b = MemoryPads(POOL), MemoryPads(POOL)
    ta, tb = LocalTransport.pair()
    alice = AuthenticatedEndpoint(ta, WegmanCarter(HASH_KEY, pads_a), "alice", SID, registry=REG)
    bob = AuthenticatedEndpoint(tb, WegmanCarter(HASH_KEY, pads_b), "bob", SID, registry=REG)
    for i in range(10):
        bob.send(note(i))
        alice.recv()
        alice.send(note(i))
        bob.recv()
    assert pads_a.bits_used == pads_b.bits_used == 128 * 20


# ----------------------------------------------------------------------------------------
# TCP on loopback

def serve(listener: TcpListener, handler: Callable[[TcpTransport], None]) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with listener.accept(timeout=5) as t:
                handler(t)
        except BaseException as e:   # reported by the test through the thread's list
            errors.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.errors = errors  # type: ignore[attr-defined]
    th.start()
    return th


@pytest.mark.parametrize("kind", KINDS)
def test_tcp_session(kind):
    with TcpListener("127.0.0.1", 0) as lst:
        def bob_side(t: TcpTransport) -> None:
            bob = AuthenticatedEndpoint(t, make_auth(kind), "bob", SID, registry=REG)
            for _ in range(3):
                m = bob.recv()
                bob.send(Note(m.text.upper(), m.values * 2))

        th = serve(lst, bob_side)
        with TcpTransport.connect("127.0.0.1", lst.port, timeout=5) as t:
            alice = AuthenticatedEndpoint(t, make_auth(kind), "alice", SID, registry=REG)
            for i in range(3):
                alice.send(note(i))
                got = alice.recv()
                assert got.text == f"NOTE {i}" and np.array_equal(got.values, note(i).values * 2)
            big = Note("big", np.arange(300_000, dtype=np.int64))
            th.join(5)
            assert not th.errors
            with pytest.raises(TransportError):   # bob hung up after three messages
                alice.send(big)
                alice.recv()
            assert alice.closed


def test_tcp_eof_and_truncation():
    with TcpListener() as lst:
        def server(t: TcpTransport) -> None:
            with pytest.raises(TransportError, match=r"^connection closed by 127\.0\.0\.1:\d+$"):
                t.recv_bytes()

        th = serve(lst, server)
        socket.create_connection(("127.0.0.1", lst.port)).close()
        th.join(5)
        assert not th.errors

        def server2(t: TcpTransport) -> None:
            assert t.recv_bytes() == b"hello"
            with pytest.raises(TransportError, match="in the middle of a frame: got 12 of 40 "
                                                     "bytes"):
                t.recv_bytes()

        th = serve(lst, server2)
        with socket.create_connection(("127.0.0.1", lst.port)) as s:
            s.sendall(struct.pack("<I", 5) + b"hello" + struct.pack("<I", 40) + b"x" * 12)
        th.join(5)
        assert not th.errors

        def server3(t: TcpTransport) -> None:
            with pytest.raises(TransportError, match="in the middle of a length prefix: got 2 "
                                                     "of 4 bytes"):
                t.recv_bytes()

        th = serve(lst, server3)
        with socket.create_connection(("127.0.0.1", lst.port)) as s:
            s.sendall(b"\x01\x00")
        th.join(5)
        assert not th.errors


def test_tcp_timeout_and_oversized_frame():
    with TcpListener() as lst:
        with socket.create_connection(("127.0.0.1", lst.port)) as s:
            t = lst.accept(timeout=0.2, max_frame=1000)
            with pytest.raises(TransportError, match=r"no data from .* within 0\.2 s"):
                t.recv_bytes()
            with pytest.raises(TransportError, match="is closed"):
                t.recv_bytes()
        with socket.create_connection(("127.0.0.1", lst.port)) as s:
            t = lst.accept(timeout=2, max_frame=1000)
            s.sendall(struct.pack("<I", 2**31))
            with pytest.raises(TransportError, match="announced a frame of 2147483648 bytes; "
                                                     "the limit is 1000"):
                t.recv_bytes()
            with pytest.raises(TransportError, match="exceeds the limit"):
                TcpTransport(s, max_frame=10).send_bytes(b"x" * 11)


def test_tcp_connect_refused():
    with TcpListener() as lst:
        port = lst.port
    with pytest.raises(TransportError, match=f"cannot connect to 127.0.0.1:{port}"):
        TcpTransport.connect("127.0.0.1", port, timeout=2)


def test_tcp_endpoint_peer_vanishes_mid_session():
    with TcpListener() as lst:
        def bob_side(t: TcpTransport) -> None:
            bob = AuthenticatedEndpoint(t, HmacSha256(PSK), "bob", SID, registry=REG)
            bob.recv()
            raw = bytearray(HEADER.pack(b"QKDA", 1, 1, 1, 0, 0, 0, 100))
            t.send_bytes(bytes(raw) + b"short")    # a frame cut short, then hang up

        th = serve(lst, bob_side)
        with TcpTransport.connect("127.0.0.1", lst.port, timeout=5) as t:
            alice = AuthenticatedEndpoint(t, HmacSha256(PSK), "alice", SID, registry=REG)
            alice.send(note())
            with pytest.raises(FrameError, match="truncated frame: 33 of 160 bytes"):
                alice.recv()
            assert alice.closed
        th.join(5)
        assert not th.errors


def test_local_transport_hooks():
    a, b = LocalTransport.pair()
    a.interceptor = lambda frames: [f.upper() for f in frames]
    a.send_bytes(b"abc")
    a.send_bytes(b"def")
    assert list(b.inbox) == [b"ABC", b"DEF"]
    assert b.recv_bytes() == b"ABC"
    with pytest.raises(TypeError):
        a.send_bytes("text")  # type: ignore[arg-type]
    b.close()
    with pytest.raises(TransportError, match="peer closed"):
        a.send_bytes(b"x")
