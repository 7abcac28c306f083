"""The link between the two hosts (qkdctl.link.mux, .handshake): real TCP on loopback.

Both ends run in threads of the test process; a NetProxy between them cuts,
blocks and freezes the connection.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest
from netproxy import NetProxy

from qkdctl.auth import AuthenticationError, TransportError
from qkdctl.link.mux import Link, LinkError
from qkdctl.link.transport import QueueTransport

PSK = bytes(range(32))
FAST = {"link_timeout_s": 3.0, "idle_timeout_s": 0.6, "handshake_timeout_s": 1.0}


class Pair:
    """Alice listening, Bob connected (through ``proxy`` if given)."""

    def __init__(self, *, psk_a=PSK, psk_b=PSK, proxy: bool = False, **kw):
        opts = {**FAST, **kw}
        self.proxy = None
        ports: list[int] = []
        box: dict = {}

        def listen():
            try:
                box["alice"] = Link.listen("127.0.0.1", 0, psk_a, connect_timeout_s=10,
                                           on_listening=ports.append, **opts)
            except BaseException as e:  # reported by the test
                box["error"] = e
                ports.append(-1)

        self.thread = threading.Thread(target=listen, daemon=True)
        self.thread.start()
        while not ports:
            time.sleep(0.005)
        self.port = ports[0]
        target = self.port
        if proxy:
            self.proxy = NetProxy(("127.0.0.1", self.port)).start()
            target = self.proxy.port
        self.box = box
        self.bob_error = None
        try:
            self.bob = Link.connect("127.0.0.1", target, psk_b, connect_timeout_s=10, **opts)
        except BaseException as e:
            self.bob_error = e
            self.bob = None
        self.thread.join(10)
        self.alice = box.get("alice")
        self.alice_error = box.get("error")

    def close(self):
        for link in (self.alice, self.bob):
            if link is not None:
                link.close()
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture
def pair():
    made = []

    def make(**kw):
        p = Pair(**kw)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


def test_channels_carry_frames_in_order_both_ways(pair):
    p = pair()
    a1, b1 = p.alice.channel(1), p.bob.channel(1)
    a2, b2 = p.alice.channel(2), p.bob.channel(2)
    big = os.urandom(8 << 20)
    for i in range(200):
        b1.send_bytes(b"one %d" % i)
        b2.send_bytes(b"two %d" % i)
    b1.send_bytes(big)
    a2.send_bytes(b"back")
    assert [a1.recv_bytes() for _ in range(200)] == [b"one %d" % i for i in range(200)]
    assert [a2.recv_bytes() for _ in range(200)] == [b"two %d" % i for i in range(200)]
    assert a1.recv_bytes() == big
    assert b2.recv_bytes() == b"back"
    assert p.bob.link_id == p.alice.link_id and p.bob.link_id != bytes(16)


def test_frames_sent_before_the_peer_opens_its_channel_wait_for_it(pair):
    p = pair()
    p.bob.send(7, b"early")
    time.sleep(0.1)
    assert p.alice.channel(7).recv_bytes() == b"early"


def test_garbage_and_silent_connections_are_dropped_and_the_session_goes_on(pair, caplog):
    p = pair()
    a, b = p.alice.channel(1), p.bob.channel(1)
    junk = socket.create_connection(("127.0.0.1", p.port))
    junk.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
    silent = socket.create_connection(("127.0.0.1", p.port))
    for i in range(50):
        b.send_bytes(b"%d" % i)
        a.send_bytes(b"%d" % i)
    assert [a.recv_bytes() for _ in range(50)] == [b"%d" % i for i in range(50)]
    assert [b.recv_bytes() for _ in range(50)] == [b"%d" % i for i in range(50)]
    deadline = time.monotonic() + 5
    while "dropped a connection" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "dropped a connection" in caplog.text
    # the junk connection is closed by Alice; the session is still up
    junk.settimeout(5)
    assert junk.recv(1 << 16) is not None
    junk.close()
    silent.close()
    assert p.alice.connected and p.bob.connected and p.alice.reconnects == 0


def test_a_second_session_while_one_runs_is_refused(pair):
    p = pair()
    with pytest.raises(TransportError, match="another session"):
        Link.connect("127.0.0.1", p.port, PSK, connect_timeout_s=2, **FAST)
    p.bob.send(1, b"still here")
    assert p.alice.recv(1) == b"still here"


def test_wrong_pre_shared_key_stops_both_sides(pair):
    p = pair(psk_b=bytes(32))
    assert isinstance(p.alice_error, AuthenticationError)
    assert "pre-shared keys differ" in str(p.alice_error)
    assert isinstance(p.bob_error, AuthenticationError)
    assert "refused our authentication" in str(p.bob_error)


def test_dropped_connection_resumes_without_losing_or_repeating_a_frame(pair):
    p = pair(proxy=True)
    a, b = p.alice.channel(1), p.bob.channel(1)
    got: list[bytes] = []

    def receive():
        for _ in range(3000):
            got.append(a.recv_bytes())
    t = threading.Thread(target=receive, daemon=True)
    t.start()
    for i in range(3000):
        b.send_bytes(b"frame %d " % i + bytes(2000))
        if i in (500, 1500, 2500):
            p.proxy.cut()
    t.join(20)
    assert got == [b"frame %d " % i + bytes(2000) for i in range(3000)]
    assert p.bob.reconnects >= 1 and p.alice.reconnects >= 1
    a.send_bytes(b"and back")
    assert b.recv_bytes() == b"and back"


def test_outage_within_the_link_timeout_is_survived(pair):
    p = pair(proxy=True)
    p.proxy.block()
    p.proxy.cut()
    p.bob.send(1, b"during the outage")
    time.sleep(1.0)
    p.proxy.unblock()
    assert p.alice.recv(1, timeout=5) == b"during the outage"


def test_outage_beyond_the_link_timeout_stops_both_sides(pair):
    p = pair(proxy=True, link_timeout_s=1.0)
    p.proxy.block()
    p.proxy.cut()
    t0 = time.monotonic()
    with pytest.raises(LinkError, match="did not come back within 1 s"):
        p.alice.recv(1)
    with pytest.raises(LinkError, match="did not come back"):
        p.bob.recv(1)
    assert time.monotonic() - t0 < 4.0
    with pytest.raises(LinkError):
        p.bob.send(1, b"too late")


def test_half_open_connection_is_noticed_by_silence(pair):
    p = pair(proxy=True, link_timeout_s=1.0, idle_timeout_s=0.5)
    p.proxy.block(mode="blackhole")
    p.proxy.freeze()
    t0 = time.monotonic()
    with pytest.raises(LinkError):
        p.bob.recv(1)
    assert time.monotonic() - t0 < 4.0


def test_orderly_close_wakes_the_peer_with_the_reason(pair):
    p = pair()
    p.bob.send(1, b"last")
    p.bob.close("Bob stopped: detector overheated")
    assert p.alice.recv(1) == b"last"
    with pytest.raises(LinkError, match="detector overheated"):
        p.alice.recv(1)


def test_bob_waits_for_alice_to_start():
    ports = []
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    box = {}

    def late_alice():
        time.sleep(1.0)
        box["alice"] = Link.listen("127.0.0.1", port, PSK, connect_timeout_s=10,
                                   on_listening=ports.append, **FAST)
    t = threading.Thread(target=late_alice, daemon=True)
    t.start()
    bob = Link.connect("127.0.0.1", port, PSK, connect_timeout_s=10, **FAST)
    t.join(10)
    try:
        bob.send(1, b"hello")
        assert box["alice"].recv(1, timeout=5) == b"hello"
    finally:
        bob.close()
        box["alice"].close()


def test_nobody_listening_is_a_clear_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(LinkError, match=f"cannot reach Alice at 127.0.0.1:{port} within 0.5 s"):
        Link.connect("127.0.0.1", port, PSK, connect_timeout_s=0.5, **FAST)
    with pytest.raises(LinkError, match="Bob did not connect"):
        Link.listen("127.0.0.1", 0, PSK, connect_timeout_s=0.5, **FAST)


def test_queue_transport_blocks_until_a_frame_or_close():
    a, b = QueueTransport.pair(timeout=2)
    threading.Timer(0.1, lambda: a.send_bytes(b"x")).start()
    assert b.recv_bytes() == b"x"
    threading.Timer(0.1, a.close).start()
    with pytest.raises(TransportError, match="peer closed"):
        b.recv_bytes()
    c, d = QueueTransport.pair(timeout=0.1)
    with pytest.raises(TransportError, match="within 0.1 s"):
        d.recv_bytes()


def test_key_store_reconciliation_keeps_exactly_the_common_keys(tmp_path):
    """A key on one side only, or under one ID with different digests, goes on both
    sides; the common ones stay, in order."""
    from qkdctl.auth import AuthenticatedEndpoint, HmacSha256
    from qkdctl.keystore import KeyStore
    from qkdctl.link.common import reconcile_keystores

    a, b = KeyStore(tmp_path / "alice"), KeyStore(tmp_path / "bob")
    bits = np.random.default_rng(1).integers(0, 2, (5, 256), dtype=np.uint8)
    for i in range(5):
        if i != 3:
            a.add(bits[i], 1e-9, {"digest": f"d{i}", "link": True}, key_id=f"k{i}")
        if i != 1:
            b.add(bits[i], 1e-9, {"digest": "other" if i == 4 else f"d{i}", "link": True},
                  key_id=f"k{i}")
    # a one-process run's key is not the other host's business
    a.add(bits[0], 1e-9, {"digest": "d0"}, key_id="local")
    ta, tb = QueueTransport.pair(timeout=5)
    ea = AuthenticatedEndpoint(ta, HmacSha256(PSK), "alice", b"test")
    eb = AuthenticatedEndpoint(tb, HmacSha256(PSK), "bob", b"test")
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("b", reconcile_keystores(eb, b, "bob")))
    t.start()
    ra = reconcile_keystores(ea, a, "alice")
    t.join(10)
    assert ra == {"kept": 2, "discarded": ["k1", "k4"], "unmatched": []}
    assert out["b"] == {"kept": 2, "discarded": ["k3", "k4"], "unmatched": []}
    assert [r.key_id for r in a.list()] == ["k0", "k2", "local"]
    assert [r.key_id for r in b.list()] == ["k0", "k2"]
    assert not (tmp_path / "alice" / "k1.key").exists()
    assert np.array_equal(a.read("k2"), b.read("k2"))


def test_both_sides_sending_large_frames_at_once_do_not_lock_each_other(pair):
    """Writers on both sides blocked on full socket buffers: the readers keep reading
    (they never wait for the send lock), so every frame arrives."""
    p = pair()
    big = os.urandom(16 << 20)

    def pump(link):
        for _ in range(3):
            link.send(1, big)
    threads = [threading.Thread(target=pump, args=(link,), daemon=True)
               for link in (p.alice, p.bob) for _ in range(2)]
    for t in threads:
        t.start()
    got = {"alice": 0, "bob": 0}

    def drain(name, link):
        for _ in range(6):
            assert link.recv(1, timeout=60) == big
            got[name] += 1
    readers = [threading.Thread(target=drain, args=(n, link), daemon=True)
               for n, link in (("alice", p.alice), ("bob", p.bob))]
    for t in readers:
        t.start()
    for t in threads + readers:
        t.join(90)
    assert got == {"alice": 6, "bob": 6}


def test_a_small_send_buffer_waits_for_acknowledgements_instead_of_locking(pair):
    p = pair(max_buffer_bytes=10_000)
    out = []
    t = threading.Thread(target=lambda: out.extend(p.alice.recv(1, timeout=30)
                                                   for _ in range(200)), daemon=True)
    t.start()
    for i in range(200):
        p.bob.send(1, b"%d" % i + bytes(3000))
    t.join(60)
    assert out == [b"%d" % i + bytes(3000) for i in range(200)]


def reconcile_pair(a, b):
    """Run the reconciliation of two stores (None: a side that keeps no keys)."""
    from qkdctl.auth import AuthenticatedEndpoint, HmacSha256
    from qkdctl.link.common import reconcile_keystores

    ta, tb = QueueTransport.pair(timeout=5)
    ea = AuthenticatedEndpoint(ta, HmacSha256(PSK), "alice", b"test")
    eb = AuthenticatedEndpoint(tb, HmacSha256(PSK), "bob", b"test")
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("b", reconcile_keystores(eb, b, "bob")))
    t.start()
    ra = reconcile_keystores(ea, a, "alice")
    t.join(10)
    return ra, out["b"]


def test_reconciliation_never_discards_a_delivered_key_nor_for_a_new_store(tmp_path):
    from qkdctl.keystore import KeyStore

    a, b = KeyStore(tmp_path / "alice"), KeyStore(tmp_path / "bob")
    bits = np.ones(64, np.uint8)
    for k in ("k0", "k1"):
        a.add(bits, 1e-9, {"digest": k, "link": True}, key_id=k)
    # a new (empty) store on Bob's side, or none at all: nothing is thrown away
    ra, rb = reconcile_pair(a, b)
    assert ra["discarded"] == [] and ra["unmatched"] == ["k0", "k1"]
    ra, rb = reconcile_pair(a, None)
    assert ra == {"kept": 2, "discarded": [], "unmatched": []}
    assert [r.key_id for r in a.list()] == ["k0", "k1"]
    # Bob holds k0 only; Alice already handed k1 to an application: reported, kept
    b.add(bits, 1e-9, {"digest": "k0", "link": True}, key_id="k0")
    a.read("k1")
    ra, rb = reconcile_pair(a, b)
    assert ra == {"kept": 1, "discarded": [], "unmatched": ["k1"]}
    assert [r.key_id for r in a.list()] == ["k0", "k1"]


def test_a_strangers_failed_hello_does_not_stop_a_session_about_to_start():
    """A hello with a wrong tag before Bob arrives: Alice logs it and waits on, for
    AUTH_GRACE_S, for a peer that authenticates."""
    from qkdctl.auth import TcpTransport
    from qkdctl.link import handshake as hs

    ports, box = [], {}
    t = threading.Thread(target=lambda: box.setdefault("alice", Link.listen(
        "127.0.0.1", 0, PSK, connect_timeout_s=10, on_listening=ports.append, **FAST)),
        daemon=True)
    t.start()
    while not ports:
        time.sleep(0.005)
    stranger = TcpTransport.connect("127.0.0.1", ports[0], timeout=5)
    with pytest.raises(AuthenticationError):
        hs.connect_handshake(stranger, hs.handshake_key(bytes(32)), hs.NEW_LINK, 0)
    stranger.close()
    bob = Link.connect("127.0.0.1", ports[0], PSK, connect_timeout_s=10, **FAST)
    t.join(10)
    try:
        bob.send(1, b"made it")
        assert box["alice"].recv(1, timeout=5) == b"made it"
    finally:
        bob.close()
        box["alice"].close()
