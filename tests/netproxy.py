"""A loopback TCP proxy for fault and latency tests (pure stdlib).

It sits between two processes of a link (say Alice's client and Bob's server)::

    with NetProxy(("127.0.0.1", bob_port), delay=0.005) as proxy:
        alice_connects_to(("127.0.0.1", proxy.port))
        ...
        proxy.cut()            # both ends see their connection reset
        proxy.block(2.0)       # reconnects fail for 2 s
        proxy.freeze()         # silence in both directions, nothing closed
        proxy.thaw()
        print(proxy.bytes_up, proxy.bytes_down)

* **Delay line.** Each direction of each connection has a reader thread that reads
  large chunks into a timestamped queue and a writer thread that forwards every chunk
  ``delay`` seconds after it was read (never earlier), so the round-trip time grows by
  ``2 * delay`` while the throughput stays that of loopback copying. The proxy
  terminates TCP on both sides: the end points' own flow control does not see the
  delay (up to ``max_buffer`` bytes per direction are held in flight).
* **Faults.** :meth:`NetProxy.cut` resets every current connection (SO_LINGER 0, so
  both peers get an RST); :meth:`NetProxy.block` makes new connections fail until
  :meth:`NetProxy.unblock` or a deadline; :meth:`NetProxy.freeze` stops forwarding
  without closing anything, like a dead network, until :meth:`NetProxy.thaw`.
* **Counters.** ``bytes_up`` (client to target) and ``bytes_down`` (target to client)
  count the bytes actually written to the far side, over all connections.

Listens on 127.0.0.1 only. Importable by path (no package imports) and runnable::

    python tests/netproxy.py --listen PORT --target HOST:PORT --delay-ms D

which then reads commands on standard input (``help`` lists them).
"""

from __future__ import annotations

import argparse
import collections
import errno
import itertools
import math
import selectors
import socket
import struct
import sys
import threading
import time

__all__ = ["LISTEN_HOST", "NetProxy", "main", "parse_target"]

LISTEN_HOST = "127.0.0.1"
CHUNK_SIZE = 256 * 1024
MAX_BUFFER = 64 * 1024 * 1024
BLOCK_MODES = ("reset", "refuse", "blackhole")

_JOIN_S = 2.0
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


def parse_target(target: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``(host, port)`` -> ``(host, port)``."""
    if isinstance(target, str):
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"target must be HOST:PORT, not {target!r}")
        return host.strip("[]"), int(port)
    host, port = target
    return str(host), int(port)


def _reset_on_close(sock: socket.socket) -> None:
    """Make the next close() send an RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _reset(sock: socket.socket) -> None:
    _reset_on_close(sock)
    sock.close()


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class _Pipe:
    """One direction of one connection: a reader thread filling a queue of
    ``(due, data)`` and a writer thread sending each item once it is due.
    ``data`` is bytes, ``b""`` for the source's FIN, or None for its RST."""

    def __init__(self, conn: _Connection, src: socket.socket, dst: socket.socket, up: bool):
        self.conn = conn
        self.src = src
        self.dst = dst
        self.up = up
        self.lock = threading.Lock()
        self.can_read = threading.Condition(self.lock)
        self.can_write = threading.Condition(self.lock)
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.last_due = 0.0

    def wake_all(self) -> None:
        with self.lock:
            self.can_read.notify_all()
            self.can_write.notify_all()

    def _put(self, data: bytes | None) -> None:
        if data:
            data = self.conn.proxy._tamper(self.up, data)
        # FIFO even when `delay` is lowered at run time
        due = max(time.monotonic() + self.conn.proxy.delay, self.last_due)
        self.last_due = due
        with self.lock:
            if not self.queue:
                self.can_write.notify()
            self.queue.append((due, data))
            self.queued += len(data) if data else 0

    def read_loop(self) -> None:
        conn, proxy = self.conn, self.conn.proxy
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.src, _READ)
            sel.register(conn.wake_r, _READ)
            while True:
                with self.lock:
                    while not conn.dead and (proxy._frozen or self.queued >= proxy.max_buffer):
                        self.can_read.wait()
                    if conn.dead:
                        return
                try:
                    data = self.src.recv(proxy.chunk_size)
                except (BlockingIOError, InterruptedError):
                    sel.select()
                    continue
                except OSError:
                    self._put(None)
                    return
                self._put(data)
                if not data:
                    return
        finally:
            sel.close()
            conn._exit()

    def write_loop(self) -> None:
        conn, proxy = self.conn, self.conn.proxy
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.dst, _WRITE)
            sel.register(conn.wake_r, _READ)
            while True:
                with self.lock:
                    while True:
                        if conn.dead:
                            return
                        wait = None
                        if self.queue and not proxy._frozen:
                            due, data = self.queue[0]
                            wait = due - time.monotonic()
                            if wait <= 0:
                                self.queue.popleft()
                                self.queued -= len(data) if data else 0
                                self.can_read.notify()
                                break
                        self.can_write.wait(wait)
                if data is None:  # the source reset: reset the destination too
                    conn.abort()
                    return
                if not data:  # the source finished sending: pass the FIN on
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                if not self._send(data, sel):
                    conn.abort()
                    return
        finally:
            sel.close()
            conn._exit()

    def _send(self, data: bytes, sel: selectors.BaseSelector) -> bool:
        view = memoryview(data)
        while view:
            try:
                n = self.dst.send(view)
            except (BlockingIOError, InterruptedError):
                sel.select()
                if self.conn.dead:
                    return False
                continue
            except OSError:
                return False
            self.conn.proxy._count(self.up, n)
            view = view[n:]
        return True


class _Connection:
    """A client socket, its upstream socket and the threads moving bytes between them.
    The last thread out closes the sockets (abortively after :meth:`abort`)."""

    def __init__(self, proxy: NetProxy, client: socket.socket, cid: int):
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.name = f"netproxy-{proxy.port}-c{cid}"
        self.dead = False
        self.done = threading.Event()
        self.pipes: list[_Pipe] = []
        self.threads: list[threading.Thread] = []
        self.wake_r, self.wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._alive = 1  # the setup thread
        self._closed = False
        _tune(client)

    def start(self) -> None:
        t = threading.Thread(target=self._setup, name=f"{self.name}-setup", daemon=True)
        self.threads.append(t)
        t.start()

    def _setup(self) -> None:
        try:
            upstream = self._connect()
            if upstream is None:
                self.abort()
                return
            with self._lock:
                if self.dead:
                    _reset(upstream)
                    return
                self.upstream = upstream
                self.pipes = [_Pipe(self, self.client, upstream, True),
                              _Pipe(self, upstream, self.client, False)]
                self._alive += 4
            for pipe, direction in zip(self.pipes, ("up", "down"), strict=True):
                for loop, role in ((pipe.read_loop, "r"), (pipe.write_loop, "w")):
                    t = threading.Thread(target=loop, name=f"{self.name}-{direction}-{role}",
                                         daemon=True)
                    self.threads.append(t)
                    t.start()
        finally:
            self._exit()

    def _connect(self) -> socket.socket | None:
        host, port = self.proxy.target
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return None
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                with selectors.DefaultSelector() as sel:
                    sel.register(sock, _WRITE)
                    sel.register(self.wake_r, _READ)
                    ready = [k.fileobj for k, _ in sel.select(self.proxy.connect_timeout)]
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if self.dead or (sock not in ready and not err):
                    err = errno.ETIMEDOUT
            if err == 0:
                _tune(sock)
                return sock
            sock.close()
            if self.dead:
                return None
        return None

    def abort(self) -> None:
        """Reset both sides (RST) and stop all threads; idempotent, any thread."""
        with self._lock:
            if self.dead:
                return
            self.dead = True
            if self._closed:
                return
            for sock in (self.client, self.upstream):
                if sock is not None:
                    _reset_on_close(sock)
            try:
                self.wake_w.send(b"!")
            except OSError:
                pass
            pipes = list(self.pipes)
        for pipe in pipes:
            pipe.wake_all()

    def _exit(self) -> None:
        with self._lock:
            self._alive -= 1
            if self._alive:
                return
            self._closed = True
            for sock in (self.client, self.upstream, self.wake_r, self.wake_w):
                if sock is not None:
                    sock.close()
        self.proxy._forget(self)
        self.done.set()

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        self.done.wait(timeout)
        for t in list(self.threads):
            t.join(max(0.0, end - time.monotonic()))


class NetProxy:
    """TCP proxy from 127.0.0.1:``port`` to ``target`` with a one-way ``delay``
    (seconds, each direction; may be changed at run time) and fault injection.

    ``max_buffer`` bounds the bytes in flight per direction and connection (the reader
    stops reading beyond it); ``chunk_size`` is the read size.
    """

    def __init__(self, target: str | tuple[str, int], delay: float = 0.0, *, port: int = 0,
                 chunk_size: int = CHUNK_SIZE, max_buffer: int = MAX_BUFFER,
                 connect_timeout: float = 5.0):
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.target = parse_target(target)
        self.delay = float(delay)
        self.chunk_size = int(chunk_size)
        self.max_buffer = int(max_buffer)
        self.connect_timeout = float(connect_timeout)
        self._port = int(port)
        self._listener: socket.socket | None = None
        self._placeholder: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._ids = itertools.count(1)
        self._closing = False
        self._closed = False
        self._frozen = False
        self._corrupt: list | None = None   # [up?, bytes to let through first]
        self._block_until = 0.0
        self._block_mode = "reset"
        self._gen = self._applied = 0  # block state changes asked / seen by the acceptor
        self._applied_cond = threading.Condition(self._lock)
        self._bytes = [0, 0]  # down, up
        self._count_lock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> NetProxy:
        """Bind, listen and start accepting; returns self. ``.port`` is known after."""
        if self._closed:
            raise RuntimeError("NetProxy is closed")
        if self._accept_thread is None:
            self._listener = self._listen()
            self._port = self._listener.getsockname()[1]
            self._accept_thread = threading.Thread(
                target=self._accept_loop, name=f"netproxy-{self._port}-accept", daemon=True)
            self._accept_thread.start()
        return self

    def close(self, timeout: float = _JOIN_S) -> None:
        """Stop listening, reset every connection and join all threads (idempotent)."""
        if self._closed:
            return
        self._closed = self._closing = True
        self._wake()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._accept_thread is None or not self._accept_thread.is_alive():
            self._close_listeners()
        self.cut(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> NetProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"NetProxy({LISTEN_HOST}:{self._port} -> {self.target[0]}:{self.target[1]}, "
                f"delay={self.delay * 1e3:g} ms)")

    # -- state --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (LISTEN_HOST, self._port)

    @property
    def bytes_up(self) -> int:
        """Bytes forwarded from clients to the target (all connections so far)."""
        return self._bytes[1]

    @property
    def bytes_down(self) -> int:
        """Bytes forwarded from the target to clients (all connections so far)."""
        return self._bytes[0]

    def reset_counters(self) -> tuple[int, int]:
        """Zero the counters; returns the old ``(bytes_up, bytes_down)``."""
        with self._count_lock:
            old = (self._bytes[1], self._bytes[0])
            self._bytes[:] = [0, 0]
        return old

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy."""
        with self._lock:
            return len(self._conns)

    def wait_connections(self, n: int, timeout: float = 2.0) -> bool:
        """Wait until exactly ``n`` connections are open; False on timeout."""
        end = time.monotonic() + timeout
        while self.connections != n:
            if time.monotonic() >= end:
                return False
            time.sleep(0.001)
        return True

    # -- faults -------------------------------------------------------------------------

    def cut(self, timeout: float = _JOIN_S) -> int:
        """Reset every current connection on both sides (RST; peers see
        ConnectionResetError, or b"" from recv). Returns how many were cut.
        New connections are still accepted: call :meth:`block` first to refuse them."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.abort()
        for c in conns:
            c.join(timeout)
        return len(conns)

    def block(self, seconds: float | None = None, *, mode: str = "reset") -> None:
        """Make new connections fail, for ``seconds`` or until :meth:`unblock`.

        ``mode``: "reset" accepts and resets them at once (the client's connect() may
        succeed, its first recv then sees ConnectionResetError or b""); "refuse"
        stops listening (connect() raises ConnectionRefusedError; the port stays
        reserved); "blackhole" stops accepting (connect() succeeds through the kernel
        backlog, or hangs when the backlog is full, and nothing is ever answered; the
        connections still pending at the end of the block are reset).
        Current connections are left alone (see :meth:`cut`)."""
        if mode not in BLOCK_MODES:
            raise ValueError(f"mode must be one of {BLOCK_MODES}, not {mode!r}")
        if mode == "refuse" and not hasattr(socket, "SO_REUSEPORT"):
            mode = "reset"
        until = math.inf if seconds is None else time.monotonic() + max(0.0, seconds)
        self._set_block(until, mode)

    def unblock(self) -> None:
        self._set_block(0.0, self._block_mode)

    @property
    def blocked(self) -> bool:
        return self._block_state()[1] is not None

    def corrupt(self, *, up: bool = True, after: int = 0) -> None:
        """Flip the lowest bit of one byte in one direction (``up``: client to target):
        the byte ``after`` bytes from now. For tests of tampering on the path."""
        with self._lock:
            self._corrupt = [up, int(after)]

    @property
    def corrupted(self) -> bool:
        """The byte asked for with :meth:`corrupt` has been flipped."""
        return self._corrupt is None

    def _tamper(self, up: bool, data: bytes) -> bytes:
        with self._lock:
            c = self._corrupt
            if c is None or c[0] != up:
                return data
            if c[1] >= len(data):
                c[1] -= len(data)
                return data
            i = c[1]
            self._corrupt = None
        return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]

    def freeze(self) -> None:
        """Stop forwarding in both directions of every connection (new ones too) without
        closing anything: the peers see silence. A chunk already being written when
        freeze() is called may still complete; what is read meanwhile is held."""
        self._frozen = True
        for pipe in self._pipes():  # barrier: no writer starts a chunk after this
            with pipe.lock:
                pass

    def thaw(self) -> None:
        """Resume forwarding; held chunks whose delay has passed go out at once."""
        self._frozen = False
        for pipe in self._pipes():
            pipe.wake_all()

    @property
    def frozen(self) -> bool:
        return self._frozen

    # -- internals ----------------------------------------------------------------------

    def _pipes(self) -> list[_Pipe]:
        with self._lock:
            return [p for c in self._conns for p in c.pipes]

    def _count(self, up: bool, n: int) -> None:
        with self._count_lock:
            self._bytes[up] += n

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"!")
        except OSError:
            pass

    def _set_block(self, until: float, mode: str) -> None:
        """Change the block state, then wait (briefly) until the acceptor applied it, so
        that e.g. the listener really is closed when block(mode="refuse") returns."""
        with self._lock:
            self._block_until, self._block_mode = until, mode
            self._gen += 1
            gen = self._gen
        self._wake()
        t = self._accept_thread
        if t is None or not t.is_alive():
            return
        with self._lock:
            self._applied_cond.wait_for(lambda: self._applied >= gen or self._closing, _JOIN_S)

    def _block_state(self) -> tuple[int, str | None, float | None]:
        """(generation, mode or None when not blocked, seconds left or None if unbounded)."""
        with self._lock:
            left = self._block_until - time.monotonic()
            if left <= 0:
                return self._gen, None, None
            return self._gen, self._block_mode, (None if math.isinf(left) else left)

    def _applied_state(self, gen: int) -> None:
        with self._lock:
            self._applied = gen
            self._applied_cond.notify_all()

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if hasattr(socket, "SO_REUSEPORT"):  # lets block(mode="refuse") keep the port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((LISTEN_HOST, self._port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _stop_listening(self) -> None:
        """Close the listener but keep the port bound by a socket that does not listen,
        so that connects are refused and nobody else gets the port."""
        hold = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            hold.bind((LISTEN_HOST, self._port))
        except OSError:  # cannot keep the port: keep listening, reset instead
            hold.close()
            with self._lock:
                self._block_mode = "reset"
            return
        self._placeholder = hold
        assert self._listener is not None
        self._listener.close()
        self._listener = None

    def _resume_listening(self) -> None:
        self._listener = self._listen()
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def _close_listeners(self) -> None:
        for sock in (self._listener, self._placeholder):
            if sock is not None:
                sock.close()
        self._listener = self._placeholder = None

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, _READ)
        registered: socket.socket | None = None
        blackholing = False
        try:
            while not self._closing:
                gen, mode, left = self._block_state()
                if mode == "refuse" and self._listener is not None:
                    if registered is not None:
                        sel.unregister(registered)
                        registered = None
                    self._stop_listening()
                elif mode != "refuse" and self._listener is None:
                    self._resume_listening()
                if blackholing and mode != "blackhole":
                    self._accept_pending(reset_all=True)  # queued while blackholed
                blackholing = mode == "blackhole"
                want = None if blackholing else self._listener
                if want is not registered:
                    if registered is not None:
                        sel.unregister(registered)
                    if want is not None:
                        sel.register(want, _READ)
                    registered = want
                self._applied_state(gen)
                for key, _ in sel.select(left):
                    if key.fileobj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    else:
                        self._accept_pending()
        finally:
            sel.close()
            self._close_listeners()
            with self._lock:
                self._closing = True
                self._applied_cond.notify_all()

    def _accept_pending(self, reset_all: bool = False) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: do not spin
                time.sleep(0.01)
                return
            if reset_all or self._closing or self._block_state()[1] is not None:
                _reset(client)
                continue
            try:
                conn = _Connection(self, client, next(self._ids))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns.add(conn)
            conn.start()


# -- command line ---------------------------------------------------------------------

_HELP = """commands: cut | block [S] | refuse [S] | blackhole [S] | unblock | freeze | thaw
          delay MS | stats | zero | quit"""


def _command(proxy: NetProxy, line: str) -> str | None:
    words = line.split()
    if not words:
        return ""
    cmd, args = words[0].lower(), words[1:]
    seconds = float(args[0]) if args else None
    if cmd == "cut":
        return f"cut {proxy.cut()} connection(s)"
    if cmd in ("block", "refuse", "blackhole"):
        proxy.block(seconds, mode="reset" if cmd == "block" else cmd)
        return f"{cmd} " + (f"{seconds:g} s" if seconds is not None else "until unblock")
    if cmd == "unblock":
        proxy.unblock()
        return "unblocked"
    if cmd == "freeze":
        proxy.freeze()
        return "frozen"
    if cmd == "thaw":
        proxy.thaw()
        return "thawed"
    if cmd == "delay" and args:
        proxy.delay = float(args[0]) / 1e3
        return f"delay {proxy.delay * 1e3:g} ms each way"
    if cmd == "stats":
        return (f"up {proxy.bytes_up} B, down {proxy.bytes_down} B, "
                f"{proxy.connections} connection(s), blocked={proxy.blocked}, "
                f"frozen={proxy.frozen}, delay {proxy.delay * 1e3:g} ms")
    if cmd == "zero":
        up, down = proxy.reset_counters()
        return f"zeroed (were up {up} B, down {down} B)"
    if cmd in ("quit", "exit"):
        return None
    return _HELP


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Loopback TCP proxy with delay and faults.")
    ap.add_argument("--listen", type=int, default=0, metavar="PORT",
                    help="port on 127.0.0.1 (default: any free port)")
    ap.add_argument("--target", required=True, metavar="HOST:PORT")
    ap.add_argument("--delay-ms", type=float, default=0.0, metavar="D",
                    help="one-way delay per direction, ms (RTT grows by 2 D)")
    args = ap.parse_args(argv)
    try:
        target = parse_target(args.target)
    except ValueError as e:
        ap.error(str(e))
    proxy = NetProxy(target, delay=args.delay_ms / 1e3, port=args.listen).start()
    print(f"netproxy: {LISTEN_HOST}:{proxy.port} -> {target[0]}:{target[1]}, "
          f"delay {args.delay_ms:g} ms each way", flush=True)
    print(_HELP, flush=True)
    try:
        for line in sys.stdin:
            try:
                reply = _command(proxy, line)
            except ValueError as e:
                reply = f"error: {e}"
            if reply is None:
                break
            if reply:
                print(reply, flush=True)
        else:  # standard input closed (e.g. run in the background): serve until ^C
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.close()
        print(f"netproxy: up {proxy.bytes_up} B, down {proxy.bytes_down} B", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
