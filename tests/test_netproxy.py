"""The loopback TCP proxy used by fault and latency tests (tests/netproxy.py): data
integrity, delay without a throughput limit, cut, block, freeze and the byte counters."""

from __future__ import annotations

import queue
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from netproxy import NetProxy, parse_target

MB = 1_000_000


class Server:
    """A loopback TCP server: each connection goes to ``handler(sock)`` in a thread, or,
    without a handler, into ``self.accepted`` for the test to drive."""

    def __init__(self, handler=None):
        self.handler = handler
        self.accepted: queue.Queue[socket.socket] = queue.Queue()
        self.count = 0
        self.conns: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            self.conns.append(c)
            if self.handler is None:
                c.settimeout(10)  # a test that waits for bytes that never come fails
                self.accepted.put(c)
            else:
                threading.Thread(target=self.handler, args=(c,), daemon=True).start()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        self.sock.close()
        self._t.join(2)
        for c in self.conns:
            c.close()


def echo(c: socket.socket) -> None:
    """Echo until EOF, then pass the EOF back."""
    try:
        while data := c.recv(1 << 18):
            c.sendall(data)
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.fixture
def echo_server():
    srv = Server(echo)
    yield srv
    srv.close()


@pytest.fixture
def raw_server():
    srv = Server()
    yield srv
    srv.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def outcome(sock: socket.socket, timeout: float = 2.0) -> str:
    """What the next recv sees: "closed" (b""), "reset", "timeout" or "data"."""
    sock.settimeout(timeout)
    try:
        return "closed" if sock.recv(1) == b"" else "data"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"


def connect(port: int, timeout: float = 2.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def transfer(port: int, payload: bytes) -> tuple[bytearray, float]:
    """Send ``payload`` to an echo server through ``port`` (then EOF) while reading the
    echo until EOF; returns (echo, seconds from first byte sent to EOF seen)."""
    got = bytearray(len(payload) + 1)
    view = memoryview(got)
    with connect(port, timeout=30) as s:
        def send():
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        t0 = time.perf_counter()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        n = 0
        while k := s.recv_into(view[n:], min(1 << 20, len(view) - n)):
            n += k
        dt = time.perf_counter() - t0
        sender.join(5)
    return got[:n], dt


def eventually(pred, timeout: float = 2.0) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


def proxy_threads(port: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith(f"netproxy-{port}-") and t.is_alive()]


# -- data path -------------------------------------------------------------------------

def test_integrity_50mb_each_way_with_eof(echo_server):
    payload = random.Random(84).randbytes(50 * MB)
    with NetProxy(("127.0.0.1", echo_server.port), delay=0.002) as proxy:
        got, dt = transfer(proxy.port, payload)
        assert len(got) == len(payload)
        assert got == payload  # same bytes, same order, EOF passed both ways
        assert eventually(lambda: proxy.bytes_down == len(payload))
        assert proxy.bytes_up == len(payload)
        assert proxy.wait_connections(0)  # both FINs forwarded: the connection is gone
    print(f"\n50 MB each way through 2 ms delay: {dt:.3f} s, {len(payload) / dt / MB:.0f} MB/s")


def rtts(port: int, n: int) -> list[float]:
    with connect(port) as s:
        s.sendall(b"w")
        recv_exact(s, 1)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(b"p")
            recv_exact(s, 1)
            out.append(time.perf_counter() - t0)
    return out


def test_rtt_grows_by_twice_the_delay(echo_server):
    with NetProxy(("127.0.0.1", echo_server.port)) as proxy:
        base = rtts(proxy.port, 50)
        proxy.delay = 0.005
        delayed = rtts(proxy.port, 30)
    b, d = statistics.median(base), statistics.median(delayed)
    print(f"\nRTT through the proxy: no delay {b * 1e3:.3f} ms median; delay 5 ms each way: "
          f"median {d * 1e3:.3f} ms, min {min(delayed) * 1e3:.3f}, max {max(delayed) * 1e3:.3f}")
    assert min(delayed) >= 0.010 - 1e-4  # never early
    assert d <= 0.014


def test_delay_does_not_limit_throughput(echo_server):
    payload = bytes(range(256)) * (100 * MB // 256)
    got, direct = transfer(echo_server.port, payload)
    assert len(got) == len(payload)
    with NetProxy(("127.0.0.1", echo_server.port), delay=0.010) as proxy:
        got, dt = transfer(proxy.port, payload)
        assert got == payload
    rate = len(payload) / dt / MB
    print(f"\n100 MB each way: direct {len(payload) / direct / MB:.0f} MB/s; "
          f"through the proxy with 10 ms delay {rate:.0f} MB/s ({dt:.3f} s)")
    assert rate >= 50


def test_delay_lowered_at_run_time_keeps_order(echo_server):
    with NetProxy(("127.0.0.1", echo_server.port), delay=0.05) as proxy, \
            connect(proxy.port) as s:
        s.sendall(b"first")
        time.sleep(0.005)
        proxy.delay = 0.0
        s.sendall(b"second")
        assert recv_exact(s, 11) == b"firstsecond"


# -- faults ----------------------------------------------------------------------------

def test_cut_resets_both_ends(raw_server):
    with NetProxy(("127.0.0.1", raw_server.port)) as proxy:
        c = connect(proxy.port)
        c.sendall(b"hi")
        srv = raw_server.accepted.get(timeout=2)
        assert recv_exact(srv, 2) == b"hi"
        srv.sendall(b"yo")
        assert recv_exact(c, 2) == b"yo"
        assert proxy.connections == 1
        assert proxy.cut() == 1
        assert proxy.connections == 0
        seen = outcome(c), outcome(srv)
        print(f"\nafter cut(): client sees {seen[0]}, server sees {seen[1]}")
        assert set(seen) <= {"closed", "reset"}
        c.close()
        with connect(proxy.port) as c2:  # not blocked: the next connection works
            c2.sendall(b"again")
            srv2 = raw_server.accepted.get(timeout=2)
            assert recv_exact(srv2, 5) == b"again"


def test_cut_while_the_proxy_is_stuck_writing(raw_server):
    """The target never reads: the proxy's writer blocks in send(); cut() still returns
    at once and the client's sendall() fails."""
    with NetProxy(("127.0.0.1", raw_server.port), max_buffer=1 << 20) as proxy:
        c = connect(proxy.port, timeout=10)
        errors = []

        def flood():
            try:
                c.sendall(b"x" * (64 * MB))
            except OSError as e:
                errors.append(e)

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        raw_server.accepted.get(timeout=2)
        time.sleep(0.3)
        assert t.is_alive()  # stuck: nothing drains the target
        t0 = time.perf_counter()
        assert proxy.cut() == 1
        took = time.perf_counter() - t0
        t.join(3)
        assert not t.is_alive()
        assert errors and isinstance(errors[0], ConnectionError)
        assert took < 0.5
        c.close()


def connect_fails(port: int) -> str | None:
    """How a new connection through the proxy fails ("refused", "reset", "closed"), or
    None when it works (an echo answers)."""
    try:
        s = connect(port, timeout=1)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:  # the RST came before connect() returned
        return "reset"
    with s:
        try:
            s.sendall(b"?")
        except ConnectionError:
            return "reset"
        r = outcome(s, 1)
        return None if r == "data" else r


def test_block_resets_new_connections_until_unblock(echo_server):
    with NetProxy(("127.0.0.1", echo_server.port)) as proxy:
        assert connect_fails(proxy.port) is None
        proxy.block()
        assert proxy.blocked
        how = [connect_fails(proxy.port) for _ in range(3)]
        print(f"\nblocked (reset): {how}")
        assert all(h in ("reset", "closed") for h in how)
        assert echo_server.count == 1  # never reached the target
        proxy.unblock()
        assert not proxy.blocked
        assert connect_fails(proxy.port) is None
        assert echo_server.count == 2


def test_block_for_a_while_then_reconnect(echo_server):
    with NetProxy(("127.0.0.1", echo_server.port)) as proxy:
        proxy.block(0.3)
        assert connect_fails(proxy.port) in ("reset", "closed")
        t0 = time.monotonic()
        while connect_fails(proxy.port) is not None:  # a client retrying
            time.sleep(0.02)
        waited = time.monotonic() - t0
        assert 0.15 < waited < 1.0
        assert not proxy.blocked


def test_block_refuse_mode(echo_server):
    with NetProxy(("127.0.0.1", echo_server.port)) as proxy:
        port = proxy.port
        proxy.block(mode="refuse")
        assert connect_fails(port) == "refused"
        assert connect_fails(port) == "refused"
        proxy.unblock()
        assert proxy.port == port
        assert connect_fails(port) is None
        proxy.block(0.2, mode="refuse")
        assert connect_fails(port) == "refused"
        assert eventually(lambda: connect_fails(port) is None, 2)
        assert echo_server.count == 2


def test_block_blackhole_mode(echo_server):
    with NetProxy(("127.0.0.1", echo_server.port)) as proxy:
        proxy.block(mode="blackhole")
        with connect(proxy.port) as s:  # the kernel still completes the handshake
            s.sendall(b"anyone?")
            assert outcome(s, 0.3) == "timeout"  # ... and then: silence
            assert echo_server.count == 0
            proxy.unblock()
            assert outcome(s) in ("reset", "closed")  # left over from the outage
        assert connect_fails(proxy.port) is None
        assert echo_server.count == 1


def test_freeze_and_thaw(raw_server):
    with NetProxy(("127.0.0.1", raw_server.port), delay=0.001) as proxy:
        c = connect(proxy.port)
        c.sendall(b"a")
        srv = raw_server.accepted.get(timeout=2)
        assert recv_exact(srv, 1) == b"a"
        proxy.freeze()
        assert proxy.frozen
        c.sendall(b"up")
        srv.sendall(b"down")
        assert outcome(srv, 0.3) == "timeout"
        assert outcome(c, 0.01) == "timeout"
        assert (proxy.bytes_up, proxy.bytes_down) == (1, 0)
        assert proxy.connections == 1
        proxy.thaw()
        c.settimeout(2)
        srv.settimeout(2)
        assert recv_exact(srv, 2) == b"up"
        assert recv_exact(c, 4) == b"down"
        c.sendall(b"more")
        assert recv_exact(srv, 4) == b"more"
        c.close()


def test_byte_counters_are_exact(raw_server):
    with NetProxy(("127.0.0.1", raw_server.port)) as proxy:
        # one connection at a time, so that the server's accepted sockets pair up
        c1 = connect(proxy.port)
        c1.sendall(b"u" * 123_457)
        s1 = raw_server.accepted.get(timeout=2)
        c2 = connect(proxy.port)
        c2.sendall(b"v" * 1000)
        s2 = raw_server.accepted.get(timeout=2)
        for s in (c1, c2, s1, s2):
            s.settimeout(10)
        recv_exact(s1, 123_457)
        recv_exact(s2, 1000)
        s1.sendall(b"d" * 6789)
        s2.sendall(b"e")
        recv_exact(c1, 6789)
        recv_exact(c2, 1)
        assert eventually(lambda: (proxy.bytes_up, proxy.bytes_down) == (124_457, 6790))
        time.sleep(0.05)
        assert (proxy.bytes_up, proxy.bytes_down) == (124_457, 6790)
        assert proxy.reset_counters() == (124_457, 6790)
        assert (proxy.bytes_up, proxy.bytes_down) == (0, 0)
        c1.sendall(b"z")
        recv_exact(s1, 1)
        assert eventually(lambda: proxy.bytes_up == 1)
        for s in (c1, c2):
            s.close()


def test_unreachable_target_resets_the_client():
    spare = socket.create_server(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()
    with NetProxy(("127.0.0.1", port)) as proxy:
        assert connect_fails(proxy.port) in ("reset", "closed")
        assert proxy.wait_connections(0)


def test_close_joins_every_thread(echo_server):
    proxy = NetProxy(("127.0.0.1", echo_server.port), delay=0.002).start()
    port = proxy.port
    socks = [connect(port) for _ in range(3)]
    for s in socks:
        s.sendall(b"x")
        recv_exact(s, 1)
    assert proxy.connections == 3
    assert len(proxy_threads(port)) >= 1 + 3 * 4
    t0 = time.perf_counter()
    proxy.close()
    assert time.perf_counter() - t0 < 1
    proxy.close()  # idempotent
    assert proxy_threads(port) == []
    assert all(outcome(s) in ("reset", "closed") for s in socks)
    with pytest.raises(ConnectionRefusedError):
        connect(port)
    for s in socks:
        s.close()


def test_parse_target():
    assert parse_target("localhost:80") == ("localhost", 80)
    assert parse_target("[::1]:9000") == ("::1", 9000)
    assert parse_target(("h", "7")) == ("h", 7)
    with pytest.raises(ValueError):
        parse_target("nohost")


def test_command_line(echo_server):
    script = Path(__file__).with_name("netproxy.py")
    p = subprocess.Popen(
        [sys.executable, str(script), "--listen", "0",
         "--target", f"127.0.0.1:{echo_server.port}", "--delay-ms", "3"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+) ->", first).group(1))
        rtt = rtts(port, 3)
        assert min(rtt) >= 0.006 - 1e-4
        p.stdin.write("stats\nquit\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0
    assert out.splitlines()[-1] == "netproxy: up 4 B, down 4 B"


def test_corrupt_flips_one_bit_at_the_offset_asked(raw_server):
    with NetProxy(("127.0.0.1", raw_server.port)) as proxy:
        c = connect(proxy.port)
        s = raw_server.accepted.get(timeout=2)
        proxy.corrupt(up=True, after=1000)
        payload = bytes(5000)
        c.sendall(payload[:700])
        c.sendall(payload[700:])
        got = recv_exact(s, 5000)
        assert proxy.corrupted
        diff = [i for i in range(5000) if got[i] != payload[i]]
        assert diff == [1000] and got[1000] == 1
        s.sendall(b"back")
        assert recv_exact(c, 4) == b"back"  # the other direction untouched
