"""The sim table as a process of its own: protocol, allowlists, robustness, determinism.

The determinism rule under test (see :mod:`qkdctl.sim.server`): the same seed and
the same writes between the same reads give the same tags, in one process or
through the sim table, whichever side makes the writes and in whatever order.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

import numpy as np
import pytest

from qkdctl import wire
from qkdctl.auth import TcpTransport
from qkdctl.config import load_bench, parse_bench
from qkdctl.drivers.mock import build_mock_bench, build_remote_bench
from qkdctl.errors import InstrumentError
from qkdctl.sequence import MODE_PATTERN, AliceSequence
from qkdctl.sim.remote import RemoteTable, RemoteTagGenerator
from qkdctl.sim.server import (
    MAGIC,
    PROTOCOL_VERSION,
    READABLE,
    Error,
    Finish,
    Generate,
    Get,
    GetDetectors,
    Hello,
    LoadSequence,
    Ok,
    Set,
    SetDetector,
    Stop,
    TableServer,
    Value,
    Welcome,
    bench_digest,
)
from qkdctl.sim.table import OpticalTable

SEED = 20240607
READS = 8
BLOCK_S = 0.25e-3          # 8 reads: 2 ms of bench time, 2e6 pulses at 1 GHz
ARM = ("detectors", "laser", "modulator", "tagger")


@pytest.fixture(scope="module")
def cfg():
    return load_bench()


def variant(cfg, polarization: bool = False, det: dict | None = None, **sim):
    raw = copy.deepcopy(cfg.raw)
    raw["sim"].update(sim)
    for d in raw["sim"]["detectors"]:
        d.update(det or {})
    if polarization:
        raw["instruments"]["polarization"] = {"driver": "mock"}
    return parse_bench(raw, cfg.path)


@pytest.fixture
def server(cfg):
    with TableServer(cfg, SEED, hello_timeout_s=1.0) as s:
        s.start()
        yield s


def remote(cfg, port: int, seed: int = SEED) -> dict:
    return {**build_remote_bench(cfg, "alice", "127.0.0.1", port, seed),
            **build_remote_bench(cfg, "bob", "127.0.0.1", port, seed)}


Step = Callable[[dict], object]


def alice_first(cfg, seq: AliceSequence | None = None) -> list[Step]:
    seq = seq or AliceSequence.from_config(cfg.source, SEED)
    return [lambda b: b["laser"].output_on(), lambda b: b["modulator"].load_sequence(seq),
            lambda b: b["modulator"].start(), lambda b: b["detectors"].bias_on(),
            lambda b: b["tagger"].start()]


def bob_first(cfg, seq: AliceSequence | None = None) -> list[Step]:
    seq = seq or AliceSequence.from_config(cfg.source, SEED)
    steps: list[Step] = [(lambda b, c=c: b["detectors"].bias_on(c)) for c in (4, 3, 2, 1)]
    return [*steps, lambda b: b["tagger"].start(), lambda b: b["modulator"].start(),
            lambda b: b["modulator"].load_sequence(seq), lambda b: b["laser"].output_on()]


def interleaved(cfg, seq: AliceSequence | None = None) -> list[Step]:
    seq = seq or AliceSequence.from_config(cfg.source, SEED)
    return [lambda b: b["detectors"].bias_on(2), lambda b: b["modulator"].load_sequence(seq),
            lambda b: b["detectors"].bias_on(4), lambda b: b["laser"].output_on(),
            lambda b: b["tagger"].start(), lambda b: b["detectors"].bias_on(1),
            lambda b: b["laser"].output_on(),        # redundant: writes nothing
            lambda b: b["modulator"].start(), lambda b: b["detectors"].bias_on()]


ORDERS = {"alice_first": alice_first, "bob_first": bob_first, "interleaved": interleaved}


def run(bench: dict, arm: list[Step], between: dict[int, list[Step]] | None = None,
        reads: int = READS) -> tuple[np.ndarray, np.ndarray, int]:
    """Arm the bench with ``arm``, read ``reads`` blocks (``between[i]`` runs before read
    i), finish; returns the tags and Alice's pulse counter."""
    parts = []
    with ExitStack() as stack:
        extra = [r for r in bench if r not in ARM]
        for role in (*extra, *ARM):
            stack.enter_context(bench[role])
        for step in arm:
            step(bench)
        for i in range(reads):
            for step in (between or {}).get(i, []):
                step(bench)
            parts.append(bench["tagger"].read_block(BLOCK_S))
        parts.append(bench["tagger"].finish())
        sent = bench["modulator"].pulses_sent
    ts = np.concatenate([p[0] for p in parts])
    ch = np.concatenate([p[1] for p in parts])
    return ts, ch, sent


def assert_same(a, b) -> None:
    assert a[0].size > 1000
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[2] == b[2]


@pytest.fixture(scope="module")
def reference(cfg):
    """The one-process run, Alice's commands first."""
    return run(build_mock_bench(cfg, SEED), alice_first(cfg))


# ------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("order", ORDERS)
def test_remote_run_gives_the_one_process_tags(cfg, server, reference, order):
    got = run(remote(cfg, server.port), ORDERS[order](cfg))
    assert_same(got, reference)
    assert got[2] == round(READS * BLOCK_S * cfg.source.rep_rate_hz)


@pytest.mark.parametrize("order", ["bob_first", "interleaved"])
def test_one_process_order_before_the_first_read_does_not_matter(cfg, reference, order):
    assert_same(run(build_mock_bench(cfg, SEED), ORDERS[order](cfg)), reference)


def test_settings_before_the_first_read_in_any_order(cfg):
    """Every setting of both sides (with a polarization controller) before the first read:
    one process in one order, the sim table in the reverse order, the same tags."""
    bench_cfg = variant(cfg, polarization=True, polarization_seed=5)
    settings: list[Step] = [
        lambda b: b["laser"].set_current_ma(50.0),
        lambda b: b["detectors"].set_dead_time_ns(60.0, channel=2),
        lambda b: b["modulator"].set_rotation_rad(0.05),
        lambda b: b["polarization"].set_angle_deg(1, 12.5),
        lambda b: b["detectors"].set_efficiency(0.55, channel=3),
    ]
    local = run(build_mock_bench(bench_cfg, SEED), [*settings, *alice_first(bench_cfg)])
    with TableServer(bench_cfg, SEED) as srv:
        srv.start()
        got = run(remote(bench_cfg, srv.port),
                  [*bob_first(bench_cfg), *reversed(settings)])
    assert_same(got, local)


def test_changes_between_reads_give_the_same_tags(cfg, server):
    """Writes of both sides between reads take effect from the next read, in both layouts."""
    between: dict[int, list[Step]] = {
        3: [lambda b: b["laser"].set_current_ma(40.0),
            lambda b: b["detectors"].set_dead_time_ns(80.0, channel=1)],
        5: [lambda b: b["detectors"].bias_off(4), lambda b: b["modulator"].set_rotation_rad(0.1)],
        6: [lambda b: b["detectors"].bias_on(4)],
    }
    local = run(build_mock_bench(cfg, SEED), alice_first(cfg), between)
    got = run(remote(cfg, server.port), interleaved(cfg), between)
    assert_same(got, local)


def test_the_number_of_writes_counts_in_both_layouts(cfg):
    """A write undone before the first read (laser off, then on again) still bumps the
    version, which seeds the redraw of the next dark count: with dark counts frequent
    enough to show it, other tags than without the toggle, but the same in both layouts."""
    noisy = variant(cfg, det={"dark_count_rate_hz": 2e5})
    toggle = [lambda b: b["laser"].output_off(), lambda b: b["laser"].output_on()]
    plain = run(build_mock_bench(noisy, SEED), alice_first(noisy))
    local = run(build_mock_bench(noisy, SEED), [*alice_first(noisy), *toggle])
    with TableServer(noisy, SEED) as srv:
        srv.start()
        got = run(remote(noisy, srv.port), [*toggle[1:], *bob_first(noisy), *toggle])
    assert_same(got, local)
    assert not np.array_equal(local[0], plain[0])


def test_another_sequence_gives_the_same_tags_in_both_layouts(cfg, server):
    mine = AliceSequence.from_config(cfg.source, SEED + 1)
    local = run(build_mock_bench(cfg, SEED), alice_first(cfg, mine))
    got = run(remote(cfg, server.port), bob_first(cfg, mine))
    assert_same(got, local)


def test_long_reads_are_cut_into_requests_without_changing_the_tags(cfg, server, reference):
    bench = remote(cfg, server.port)
    tagger = bench["tagger"]
    tagger._generator = RemoteTagGenerator(tagger.table, max_pulses=99_991)
    assert_same(run(bench, alice_first(cfg)), reference)


# ----------------------------------------------------------------- the mock modulator
def test_load_sequence_writes_only_a_different_sequence(cfg):
    bench = build_mock_bench(cfg, SEED)
    mod, table = bench["modulator"], bench["modulator"].table
    with mod:
        v = table.version
        mod.load_sequence(AliceSequence.from_config(cfg.source, SEED))
        assert table.version == v
        other = AliceSequence.from_config(cfg.source, SEED + 1)
        mod.load_sequence(other)
        assert table.version == v + 1 and table.sequence is other
        copy_ = AliceSequence(other.mode, other.key, other.z_thr, other.cum_thr.copy(),
                              other.pattern.copy())
        mod.load_sequence(copy_)
        assert table.version == v + 1
        bad = AliceSequence(MODE_PATTERN, other.key, other.z_thr, other.cum_thr,
                            np.array([0, 1, 12], np.uint8))
        with pytest.raises(InstrumentError, match="modulator: load_sequence: pattern: code 12"):
            mod.load_sequence(bad)
        assert table.version == v + 1


def test_pulses_sent_does_not_bump_the_version(cfg):
    bench = build_mock_bench(cfg, SEED)
    table = bench["tagger"].table
    with bench["tagger"] as tagger:
        tagger.start()
        v = table.version
        tagger.read_pulses(12_345)
        assert table.version == v and table.pulses_simulated == 12_345
        assert bench["modulator"].pulses_sent == 12_345


def test_remote_load_sequence_reports_a_change(cfg, server):
    table = RemoteTable("127.0.0.1", server.port, "alice", cfg)
    with table:
        v = server.table.version
        assert table.load_sequence(AliceSequence.from_config(cfg.source, SEED)) is False
        assert server.table.version == v
        assert table.load_sequence(AliceSequence.from_config(cfg.source, 3)) is True
        assert server.table.version == v + 1


# ---------------------------------------------------------------------- the allowlists
def test_bob_cannot_read_alices_sequence(cfg, server):
    bob = RemoteTable("127.0.0.1", server.port, "bob", cfg)
    with bob:
        assert not hasattr(bob, "sequence") and "sequence" not in dir(bob)
        with pytest.raises(AttributeError, match="sequence"):
            bob.sequence  # noqa: B018
        with pytest.raises(InstrumentError, match=rf"127\.0\.0\.1:{server.port}.*bob may "
                                                  r"not read 'sequence'"):
            bob.request(Get("sequence"))
        for name in ("laser_on", "power_scale", "effective_misalignment", "version",
                     "misalignment", "fiber_rotation", "waveplate_offsets_deg"):
            assert not hasattr(bob, name)
            with pytest.raises(InstrumentError, match="may not read"):
                bob.request(Get(name))
        with pytest.raises(InstrumentError, match="LoadSequence is not a request bob may"):
            bob.load_sequence(AliceSequence.from_config(cfg.source, 1))


def test_alice_cannot_reach_bobs_instruments(cfg, server):
    alice = RemoteTable("127.0.0.1", server.port, "alice", cfg)
    with alice:
        assert not hasattr(alice, "detectors") and not hasattr(alice, "sync_channel")
        forbidden = [GetDetectors(), SetDetector(1, (("biased", True),)), Generate(10),
                     Finish(), Get("waveplate_angles_deg"), Get("sequence"),
                     Set((("waveplate_angles_deg", (0.0, 0.0, 0.0)),)),
                     Set((("misalignment", 0.0),)), Set((("sequence", 0),))]
        for msg in forbidden:
            with pytest.raises(InstrumentError, match=f"127.0.0.1:{server.port}"):
                alice.request(msg)
        assert alice.laser_on is False


@pytest.mark.parametrize("side", ["alice", "bob"])
def test_each_side_reads_its_allowlist(cfg, server, side):
    table = RemoteTable("127.0.0.1", server.port, side, cfg)
    with table:
        for name in READABLE[side]:
            assert getattr(table, name) == _plain(getattr(server.table, name)), name
        if side == "bob":
            got = table.detectors
            assert [(d.channel, d.biased, d.efficiency) for d in got] == \
                [(d.channel, d.biased, d.efficiency) for d in server.table.detectors]
            got[0].biased = True          # a copy: the table is unchanged
            assert server.table.detectors[0].biased is False


def _plain(v):
    return tuple(float(x) for x in v) if isinstance(v, tuple) else v


@pytest.mark.parametrize("side, msg, match", [
    ("alice", Set((("laser_current_ma", -1.0),)), "laser_current_ma: -1 is out of range"),
    ("alice", Set((("laser_current_ma", "45"),)), "expected a number, got str"),
    ("alice", Set((("laser_current_ma", float("nan")),)), "not finite"),
    ("alice", Set((("laser_on", 1),)), "laser_on: expected true or false"),
    ("alice", Set(()), "non-empty tuple"),
    ("alice", Set((("laser_on", True), ("laser_on", False))), "appears twice"),
    ("alice", Set((("nonsense", 1),)), "alice may not set 'nonsense'"),
    ("alice", Get("nonsense"), "alice may not read 'nonsense'"),
    ("alice", LoadSequence(0, 1, 2, np.zeros(2, np.uint64), np.zeros(1, np.int64)),
     "pattern: expected a non-empty 1-d uint8 array"),
    ("alice", LoadSequence(0, 1, 2, np.zeros(3, np.uint64), np.zeros(1, np.uint8)),
     r"cum_thr: expected a uint64 array of shape \(2,\)"),
    ("alice", LoadSequence(1, 1, 2, np.zeros(2, np.uint64), np.array([0, 200], np.uint8)),
     "code 200"),
    ("alice", LoadSequence(5, 1, 2, np.zeros(2, np.uint64), np.zeros(1, np.uint8)), "mode 5"),
    ("alice", LoadSequence(0, -1, 2, np.zeros(2, np.uint64), np.zeros(1, np.uint8)), "key"),
    ("bob", SetDetector(99, (("biased", True),)), "no detector on channel 99"),
    ("bob", SetDetector(1, (("efficiency", 1.5),)), "efficiency: 1.5 is out of range"),
    ("bob", SetDetector(1, (("dead_time_ns", -3),)), "dead_time_ns: -3 is out of range"),
    ("bob", SetDetector(1, (("dark_count_rate_hz", 0.0),)),
     "may not set a detector's 'dark_count_rate_hz'"),
    ("bob", Set((("waveplate_angles_deg", (1.0, 2.0)),)), "tuple of 3 angles"),
    ("bob", Generate(-1), "n_pulses: -1 is out of range"),
    ("bob", Generate(1 << 40), "out of range"),
    ("bob", Welcome(PROTOCOL_VERSION, "bob", "x"), "Welcome is not a request bob may send"),
    ("bob", Hello("bob", PROTOCOL_VERSION, "x"), "Hello is not a request"),
    ("bob", Stop(), "does not take Stop"),
])
def test_bad_requests_are_refused_and_change_nothing(cfg, server, side, msg, match):
    table = RemoteTable("127.0.0.1", server.port, side, cfg)
    with table:
        v = server.table.version
        with pytest.raises(InstrumentError, match=match):
            table.request(msg)
        assert server.table.version == v
        assert table.pulses_simulated == 0     # the connection is still usable


# ------------------------------------------------------------------------- robustness
def _drained(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:   # it closed with our bytes unread
            return data
        if not chunk:
            return data
        data += chunk


def test_bad_peers_are_dropped_without_disturbing_a_client(cfg, server, reference, caplog):
    caplog.set_level(logging.INFO, logger="qkdctl.sim.server")
    port = server.port

    def http(s):
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    def wrong_magic(s):
        s.sendall(b"QKDA\x01\x01\x00\x00" + bytes(40))   # the classical channel's frames

    def garbage_frame(s):
        s.sendall(MAGIC + struct.pack("<I", 12) + b"\xff" * 12)

    def huge_frame(s):
        s.sendall(MAGIC + struct.pack("<I", 0xFFFFFFF0))

    def half_frame(s):
        s.sendall(MAGIC + struct.pack("<I", 100) + b"\x01\x00")

    def silent(s):
        pass

    def silent_after_magic(s):
        s.sendall(MAGIC)

    peers = [http, wrong_magic, garbage_frame, huge_frame, half_frame, silent,
             silent_after_magic]
    socks = []

    def disturb(b):
        for p in peers:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            p(s)
            socks.append(s)

    t0 = time.monotonic()
    got = run(remote(cfg, port), alice_first(cfg), {2: [disturb]})
    assert_same(got, reference)
    for s, p in zip(socks, peers, strict=True):
        data = _drained(s)       # returns: the server closed the connection
        assert data in (b"", MAGIC), p.__name__
        s.close()
    assert time.monotonic() - t0 < 10
    text = caplog.text
    assert "not a sim-table client (it sent b'GET / HT'" in text
    assert "not a sim-table client (it sent b'QKDA" in text
    assert "its first frame is not a request" in text
    assert "announced a frame of" in text
    assert "half-open" in text or "within 1.0 s" in text
    # the server still serves
    with RemoteTable("127.0.0.1", port, "alice", cfg) as alice:
        assert alice.laser_on is False
    deadline = time.monotonic() + 5
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.connections == 0


def test_an_undecodable_request_after_the_handshake_closes_only_that_connection(cfg, server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        assert _recv_n(s, len(MAGIC)) == MAGIC
        s.sendall(MAGIC)
        t = TcpTransport(s, timeout=5)
        t.send_bytes(wire.encode(Hello("bob", PROTOCOL_VERSION, bench_digest(cfg))))
        assert isinstance(wire.decode(t.recv_bytes()), Welcome)
        t.send_bytes(b"\x01garbage")
        reply = wire.decode(t.recv_bytes())
        assert isinstance(reply, Error) and "undecodable request" in reply.message
        assert _drained(s) == b""
    with RemoteTable("127.0.0.1", server.port, "bob", cfg) as bob:
        assert bob.sync_channel == 0


def _recv_n(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _hello(port: int, hello: Hello):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert _recv_n(s, len(MAGIC)) == MAGIC
        s.sendall(MAGIC)
        t = TcpTransport(s, timeout=5)
        t.send_bytes(wire.encode(hello))
        reply = wire.decode(t.recv_bytes())
        return reply, _drained(s) if isinstance(reply, Error) else None


def test_handshake_refusals(cfg, server):
    digest = bench_digest(cfg)
    reply, rest = _hello(server.port, Hello("eve", PROTOCOL_VERSION, digest))
    assert isinstance(reply, Error) and "unknown side 'eve'" in reply.message and rest == b""
    reply, rest = _hello(server.port, Hello("bob", PROTOCOL_VERSION + 1, digest))
    assert isinstance(reply, Error) and "protocol version" in reply.message and rest == b""
    reply, _ = _hello(server.port, Hello("alice", PROTOCOL_VERSION, digest))
    assert reply == Welcome(PROTOCOL_VERSION, "alice", digest)
    with pytest.raises(ValueError, match="side"):
        RemoteTable("127.0.0.1", server.port, "eve", cfg)


def test_a_bench_mismatch_is_refused_naming_both_digests(cfg, server):
    other = variant(cfg, fiber_length_km=25.0)
    mine, theirs = bench_digest(other), bench_digest(cfg)
    assert mine != theirs
    bench = build_remote_bench(other, "bob", "127.0.0.1", server.port, SEED)
    with pytest.raises(InstrumentError) as e:
        bench["detectors"].table.connect()
    msg = str(e.value)
    assert f"127.0.0.1:{server.port}" in msg and mine in msg and theirs in msg


def test_bench_digest_covers_the_physics_only(cfg):
    d = bench_digest(cfg)
    raw = copy.deepcopy(cfg.raw)
    raw["instruments"]["laser"]["limits"] = {"max_current_ma": 55.0}
    raw.setdefault("analysis", {})["gate_width_ps"] = 250.0
    assert bench_digest(parse_bench(raw, cfg.path)) == d
    raw = copy.deepcopy(cfg.raw)
    raw["sim"]["clock_drift_ppm"] = 2.0   # written at its present value: same physics
    assert bench_digest(parse_bench(raw, cfg.path)) == d
    assert bench_digest(variant(cfg, misalignment=0.02)) != d
    raw = copy.deepcopy(cfg.raw)
    raw["source"]["z_basis_probability"] = 0.7
    assert bench_digest(parse_bench(raw, cfg.path)) != d


def test_an_unreachable_sim_table_names_its_address(cfg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bench = build_remote_bench(cfg, "alice", "127.0.0.1", port, SEED)
    with pytest.raises(InstrumentError, match=rf"sim table at 127\.0\.0\.1:{port}: "
                                              r"connect as alice: cannot connect"):
        bench["laser"].connect()
    assert not bench["laser"].connected


def test_a_peer_that_is_not_a_sim_table(cfg):
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]

        def answer():
            conn, _ = srv.accept()
            with conn:
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
                time.sleep(0.5)

        t = threading.Thread(target=answer)
        t.start()
        table = RemoteTable("127.0.0.1", port, "bob", cfg, timeout_s=5)
        with pytest.raises(InstrumentError, match=r"not a qkdctl sim table \(it answered "
                                                  r"b'HTTP/1.0'\)"):
            table.connect()
        t.join()


def test_the_server_closing_mid_read_is_an_instrument_error(cfg, server):
    bench = remote(cfg, server.port)
    gen = server.generator
    real = gen.generate

    def generate_then_die(n):
        if gen.pulses_simulated > 0:
            threading.Thread(target=server.close).start()
            time.sleep(0.3)
        return real(n)

    gen.generate = generate_then_die
    with ExitStack() as stack:
        for role in ARM:
            stack.enter_context(bench[role])
        for step in alice_first(cfg):
            step(bench)
        bench["tagger"].read_block(BLOCK_S)
        with pytest.raises(InstrumentError, match=rf"sim table at 127\.0\.0\.1:{server.port}: "
                                                  r"Generate\(n_pulses=250000\): connection "
                                                  "closed"):
            bench["tagger"].read_block(BLOCK_S)
        stack.pop_all()   # the safe state cannot be reached: the table is gone
    with pytest.raises(InstrumentError, match=rf"127\.0\.0\.1:{server.port}"):
        bench["laser"].output_off()


def test_finish_ends_the_run(cfg, server):
    with RemoteTable("127.0.0.1", server.port, "bob", cfg) as bob:
        gen = RemoteTagGenerator(bob)
        gen.generate(1000)
        gen.finish()
        ts, ch = gen.finish()
        assert ts.size == 0 and ts.dtype == np.int64 and ch.dtype == np.uint8
        with pytest.raises(InstrumentError, match="the run is finished"):
            gen.generate(10)
        assert gen.pulses_simulated == 1000


def test_stop_closes_the_server_when_allowed(cfg):
    with TableServer(cfg, SEED, allow_stop=True) as srv:
        srv.start()
        with RemoteTable("127.0.0.1", srv.port, "bob", cfg) as bob:
            assert bob.request(Stop()) == Ok(True)
        srv._thread.join(5)
        assert not srv._thread.is_alive()
        with pytest.raises(InstrumentError, match="cannot connect"):
            RemoteTable("127.0.0.1", srv.port, "bob", cfg).connect()


def test_close_is_safe_from_any_thread_and_idempotent(cfg):
    srv = TableServer(cfg, SEED)
    t = threading.Thread(target=srv.serve_forever)
    t.start()
    with RemoteTable("127.0.0.1", srv.port, "alice", cfg) as alice:
        assert alice.power_scale == 0.0
        closer = threading.Thread(target=srv.close)
        closer.start()
        closer.join(5)
        t.join(5)
        assert not t.is_alive()
        srv.close()
        with pytest.raises(InstrumentError, match="127.0.0.1"):
            alice.request(Get("laser_on"))


# ------------------------------------------------------------------ a separate process
def test_the_sim_table_as_a_separate_process(cfg, reference):
    code = textwrap.dedent(f"""
        from qkdctl.config import load_bench
        from qkdctl.sim.server import serve_table
        serve_table(load_bench(), {SEED}, "127.0.0.1", 0, allow_stop=True,
                    ready=lambda port: print(port, flush=True))
    """)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.stderr.read() if proc.poll() is not None else line
        port = int(line)
        assert_same(run(remote(cfg, port), interleaved(cfg)), reference)
        with RemoteTable("127.0.0.1", port, "alice", cfg) as alice:
            assert alice.laser_on is False
            proc.send_signal(signal.SIGINT)   # KeyboardInterrupt: a clean end
            assert proc.wait(timeout=30) == 0
            with pytest.raises(InstrumentError, match=f"127.0.0.1:{port}"):
                alice.request(Get("laser_on"))
        assert proc.stdout.read() == ""       # serve_table prints nothing itself
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_value_reply_types(cfg, server):
    """Read-backs arrive as the table holds them (bool, int, float, tuples of floats)."""
    with RemoteTable("127.0.0.1", server.port, "bob", cfg) as bob:
        reply = bob.request(Get("waveplate_angles_deg"), Value)
        assert reply.value == (0.0, 0.0, 0.0)
        assert isinstance(bob.tagger_resolution_ps, int) and isinstance(bob.rep_rate_hz, float)
    assert isinstance(OpticalTable.from_config(cfg, SEED).pulses_simulated, int)
