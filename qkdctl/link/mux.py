"""One TCP connection between the two hosts, carrying numbered channels, surviving drops.

:class:`Link` is what Alice's and Bob's sessions talk over. Alice listens
(:meth:`Link.listen`), Bob connects (:meth:`Link.connect`); either may start
first: Bob retries until ``connect_timeout_s``. Every connection opens with
the authenticated handshake of :mod:`.handshake`.

Frames on the connection (each inside the u32 length prefix of
:class:`~qkdctl.auth.TcpTransport`)::

    b"D" channel u8, seq u64, ack u64, payload    data for one channel
    b"P" ack u64                                  keep-alive and acknowledgement
    b"B" code u8, reason (UTF-8)                  end of the session: code 0 done,
                                                  2 stopped on an error, 3 stopped by
                                                  a tamper alarm

``seq`` numbers the data frames of each direction from 0; ``ack`` is how many
the sender has received. A data frame is kept until the peer acknowledges it.
When the connection drops (an error, or nothing heard for
``idle_timeout_s``: a half-open connection), Bob reconnects; the handshake
tells each side how many frames the other has, and each sends the rest again
(duplicates are recognised by their number and dropped). A link that is not
back within ``link_timeout_s`` has failed: every channel's ``recv_bytes`` and
``send_bytes`` raises :class:`~qkdctl.auth.TransportError`, and the sessions
stop. A ``B`` frame ends the link without a wait.

The channel payloads are :class:`~qkdctl.auth.AuthenticatedEndpoint` frames,
which carry their own numbers and tags; this layer's numbers only repair
drops. Someone on the path can still cut the link (a denial of service no
protocol prevents) but cannot make either side accept a forged, dropped,
reordered or replayed message: those fail authentication above.

While a session runs, Alice keeps listening: a connection that resumes the
session replaces the old one; anything else (no handshake, a failed one, a
new session while this one runs) is dropped and logged, and the session goes
on undisturbed.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections import deque

from ..auth import AuthenticationError, TcpListener, TcpTransport, Transport, TransportError
from . import handshake as hs

__all__ = ["BYE_ALARM", "BYE_DONE", "BYE_ERROR", "Link", "LinkChannel", "LinkError",
           "PeerAlarm"]

log = logging.getLogger(__name__)

_DATA = struct.Struct("<cBQQ")
_PING = struct.Struct("<cQ")
_ACK_EVERY_BYTES = 4 << 20
_HANDSHAKE_MAX_FRAME = 256
_MAX_HANDSHAKES = 8
#: how long Alice still waits for an authentic Bob after a hello that failed
AUTH_GRACE_S = 5.0
#: channel numbers a session uses: control, sifting and up to 64 distillation lanes
MAX_CHANNELS = 2 + 64
_MAX_FRAME = (1 << 31) - 1


class LinkError(TransportError):
    """The link to the other host failed and did not come back in time."""


class PeerAlarm(AuthenticationError):
    """The other host stopped on a tamper alarm (a message that failed authentication,
    or the statistics of a block): this host stops the same way (exit status 3)."""

    exit_code = 3

#: the codes of the end-of-session frame
BYE_DONE, BYE_ERROR, BYE_ALARM = 0, 2, 3


class Link:
    """A reliable, multiplexed, reconnecting link to the other host (see the module doc)."""

    def __init__(self, role: str, psk: bytes, *, link_timeout_s: float = 10.0,
                 idle_timeout_s: float = 5.0, handshake_timeout_s: float = 5.0,
                 max_buffer_bytes: int = 512 << 20, name: str = "link"):
        if role not in ("alice", "bob"):
            raise ValueError("role must be 'alice' or 'bob'")
        self.role = role
        self.peer_role = "bob" if role == "alice" else "alice"
        self.name = name
        self._key = hs.handshake_key(psk)
        self.link_timeout_s = link_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.ping_interval_s = max(0.05, min(0.5, idle_timeout_s / 4))
        self.handshake_timeout_s = handshake_timeout_s
        self.max_buffer_bytes = max_buffer_bytes
        self.link_id = hs.NEW_LINK
        self.nonces = (b"", b"")
        self._cond = threading.Condition()        # receive queues and link state
        # Lock order: _send_lock, then _buf_lock or _cond. The reader thread never takes
        # _send_lock (a sender blocked in a socket write must not stop the reading that
        # would let the peer's own writes, and so this one, complete).
        self._send_lock = threading.RLock()       # sequence numbers and socket writes
        self._buf_lock = threading.Lock()         # the frames kept until acknowledged
        self._queues: dict[int, deque[bytes]] = {}
        self._conn: TcpTransport | None = None
        self._next_seq = 0                        # data frames sent
        self._received = 0                        # data frames received in order
        self._bytes_since_ack = 0
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._unacked_bytes = 0
        self._last_rx = time.monotonic()
        self._down_since: float | None = None
        self._failed: str | None = None
        self._peer_closed: str | None = None
        self._peer_code = BYE_DONE
        self._closed = False
        self._listener: TcpListener | None = None
        self._target: tuple[str, int] | None = None
        self._threads: list[threading.Thread] = []
        self._handshakes = threading.BoundedSemaphore(_MAX_HANDSHAKES)
        self.reconnects = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        #: payload bytes sent per channel (the frames of the messages, without the link's
        #: framing), for the traffic figures
        self.sent_by_channel: dict[int, int] = {}

    def __repr__(self) -> str:
        state = self._failed or ("up" if self._conn is not None else "down")
        return f"Link({self.role}, {self.name}, {state})"

    # ------------------------------------------------------------------ opening
    @classmethod
    def listen(cls, host: str, port: int, psk: bytes, *, connect_timeout_s: float = 60.0,
               on_listening=None, **kw) -> Link:
        """Alice: listen on ``host:port`` and wait for Bob (up to ``connect_timeout_s``).

        ``on_listening(port)`` is called once the socket listens (port 0 picks one).
        A connection that fails the handshake is dropped and the wait goes on. A
        hello with a wrong authentication tag means the pre-shared keys differ (or a
        stranger tries): Alice goes on waiting :data:`AUTH_GRACE_S` for a peer that
        authenticates, so that a stranger cannot end a session about to start, then
        stops (:class:`~qkdctl.auth.AuthenticationError`, exit status 3).
        """
        link = cls("alice", psk, **kw)
        link._listener = TcpListener(host, port, backlog=8)
        if on_listening is not None:
            on_listening(link._listener.port)
        deadline = time.monotonic() + connect_timeout_s
        failed: AuthenticationError | None = None
        grace = float("inf")
        try:
            while True:
                now = time.monotonic()
                if now >= grace:
                    raise failed
                left = deadline - now
                if left <= 0:
                    raise LinkError(f"{link.name}: Bob did not connect to "
                                    f"{link._listener.host}:{link._listener.port} within "
                                    f"{connect_timeout_s:g} s")
                try:
                    conn = link._listener.accept(timeout=min(left, 0.5))
                except TransportError:
                    continue
                try:
                    if link._accept(conn, first=True):
                        break
                except AuthenticationError as e:
                    log.error("%s: %s", link.name, e)
                    if failed is None:
                        failed = e
                        grace = time.monotonic() + AUTH_GRACE_S
        except BaseException:
            link._listener.close()
            raise
        link._start(acceptor=True)
        return link

    @classmethod
    def connect(cls, host: str, port: int, psk: bytes, *, connect_timeout_s: float = 60.0,
                **kw) -> Link:
        """Bob: connect to Alice at ``host:port``, retrying up to ``connect_timeout_s``."""
        link = cls("bob", psk, **kw)
        link._target = (host, port)
        deadline = time.monotonic() + connect_timeout_s
        last = "no attempt"
        while True:
            try:
                link._dial()
                break
            except (AuthenticationError, hs.LinkRefused):
                raise
            except TransportError as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise LinkError(f"{link.name}: cannot reach Alice at {host}:{port} within "
                                f"{connect_timeout_s:g} s ({last})")
            time.sleep(0.2)
        link._start(acceptor=False)
        return link

    def _dial(self) -> None:
        host, port = self._target
        conn = TcpTransport.connect(host, port, timeout=self.handshake_timeout_s,
                                    max_frame=_HANDSHAKE_MAX_FRAME)
        try:
            link_id, peer_received, na, nb = hs.connect_handshake(
                conn, self._key, self.link_id, self._received)
        except BaseException:
            conn.close()
            raise
        if self.link_id == hs.NEW_LINK:
            self.link_id = link_id
            self.nonces = (na, nb)
        self._install(conn, peer_received)

    def _accept(self, conn: TcpTransport, *, first: bool) -> bool:
        """Alice: run the handshake on a new connection; True if it is now the link's."""
        conn.set_timeout(self.handshake_timeout_s)
        conn.max_frame = _HANDSHAKE_MAX_FRAME
        try:
            nonce = hs.challenge(conn)
            hello = hs.check_hello(conn, self._key, nonce)
        except hs.HandshakeError as e:
            log.warning("%s: dropped a connection from %s: %s", self.name, conn.peer, e)
            conn.close()
            return False
        except AuthenticationError as e:
            conn.close()
            if first:
                raise
            log.warning("%s: dropped a connection from %s: %s", self.name, conn.peer, e)
            return False
        except TransportError as e:
            log.warning("%s: dropped a connection from %s: %s", self.name, conn.peer, e)
            conn.close()
            return False
        try:
            if first:
                if hello.link_id != hs.NEW_LINK:
                    hs.welcome(conn, self._key, hello, hs.UNKNOWN_LINK, hello.link_id, 0)
                    log.warning("%s: dropped %s: it resumes a session this process does "
                                "not have", self.name, conn.peer)
                    conn.close()
                    return False
                self.link_id = hs.new_link_id(hello)
                self.nonces = (hello.nonce_a, hello.nonce_b)
            elif hello.link_id != self.link_id:
                hs.welcome(conn, self._key, hello, hs.BUSY, hs.NEW_LINK, 0)
                log.warning("%s: dropped %s: a new session while this one runs", self.name,
                            conn.peer)
                conn.close()
                return False
            hs.welcome(conn, self._key, hello, hs.OK, self.link_id, self._received)
        except TransportError as e:
            log.warning("%s: dropped a connection from %s: %s", self.name, conn.peer, e)
            conn.close()
            return False
        self._install(conn, hello.received)
        return True

    def _install(self, conn: TcpTransport, peer_received: int) -> None:
        """Make ``conn`` the link's connection and send again what the peer lacks."""
        conn.set_timeout(None)
        conn.max_frame = _MAX_FRAME
        conn.on_data = self._heard   # a long frame arriving slowly is not silence
        with self._send_lock:
            if peer_received > self._next_seq:
                conn.close()
                raise hs.HandshakeError(f"the peer claims {peer_received} frames; "
                                        f"{self._next_seq} were sent")
            with self._buf_lock:
                self._trim(peer_received)
                lost = self._unacked and self._unacked[0][0] > peer_received
                first = self._unacked[0][0] if self._unacked else 0
                resend = [frame for _, frame in self._unacked]
            if lost:
                conn.close()
                self._fail(f"frames {peer_received}..{first - 1} to {self.peer_role} are "
                           "lost: the link cannot resume")
                return
            with self._cond:
                old, self._conn = self._conn, conn
                self._down_since = None
                self._last_rx = time.monotonic()
            if old is not None:
                old.close()
            # read before sending again: both sides resend at once after a drop
            t = threading.Thread(target=self._reader, args=(conn,), daemon=True,
                                 name=f"qkdctl-{self.role}-link-reader")
            t.start()
            self._threads.append(t)
            try:
                for frame in resend:
                    conn.send_bytes(frame)
                    self.bytes_sent += len(frame) + 4
            except TransportError as e:
                self._drop(conn, str(e))
                return
        if old is not None or self.reconnects:
            log.info("%s: connection to %s restored", self.name, self.peer_role)

    def _heard(self) -> None:
        self._last_rx = time.monotonic()

    def _start(self, *, acceptor: bool) -> None:
        t = threading.Thread(target=self._maintain, daemon=True,
                             name=f"qkdctl-{self.role}-link")
        t.start()
        self._threads.append(t)
        if acceptor:
            t = threading.Thread(target=self._acceptor, daemon=True,
                                 name=f"qkdctl-{self.role}-link-accept")
            t.start()
            self._threads.append(t)

    # ------------------------------------------------------------------ channels
    def channel(self, number: int) -> LinkChannel:
        """The transport of channel ``number`` (0..255; the same number on both sides)."""
        if not 0 <= number <= 255:
            raise ValueError("channel numbers are 0..255")
        with self._cond:
            self._queues.setdefault(number, deque())
        return LinkChannel(self, number)

    def send(self, number: int, payload: bytes) -> None:
        # wait for room without holding the send lock: the acknowledgements that make
        # room are read meanwhile
        with self._cond:
            while self._unacked_bytes > self.max_buffer_bytes:
                self._check()
                self._cond.wait(0.1)
        with self._send_lock:
            self._check()
            seq = self._next_seq
            frame = _DATA.pack(b"D", number, seq, self._received) + payload
            with self._buf_lock:
                self._unacked.append((seq, frame))
                self._unacked_bytes += len(frame)
            self._next_seq = seq + 1
            self.sent_by_channel[number] = self.sent_by_channel.get(number, 0) + len(payload)
            conn = self._conn
            if conn is not None:
                try:
                    conn.send_bytes(frame)
                    self.bytes_sent += len(frame) + 4
                except TransportError as e:
                    self._drop(conn, str(e))

    def recv(self, number: int, timeout: float | None = None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            q = self._queues.setdefault(number, deque())
            while not q:
                if self._failed is not None:
                    raise LinkError(self._failed)
                if self._peer_closed is not None:
                    cls = PeerAlarm if self._peer_code == BYE_ALARM else LinkError
                    raise cls(f"{self.name}: {self.peer_role} ended the session "
                              f"({self._peer_closed})")
                if self._closed:
                    raise TransportError(f"{self.name}: the link is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TransportError(f"{self.name}: nothing from {self.peer_role} within "
                                         f"{timeout} s")
                self._cond.wait(left)
            return q.popleft()

    # ------------------------------------------------------------------ state
    @property
    def failed(self) -> str | None:
        return self._failed

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _check(self) -> None:
        if self._failed is not None:
            raise LinkError(self._failed)
        if self._closed:
            raise TransportError(f"{self.name}: the link is closed")

    def _fail(self, reason: str) -> None:
        with self._cond:
            if self._failed is None:
                self._failed = reason
                log.error("%s", reason)
            self._cond.notify_all()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _trim(self, acked: int) -> None:
        while self._unacked and self._unacked[0][0] < acked:
            _, frame = self._unacked.popleft()
            self._unacked_bytes -= len(frame)

    def _drop(self, conn: TcpTransport, reason: str) -> None:
        """The connection ``conn`` is gone: wait for it to come back (or fail)."""
        with self._cond:
            if self._conn is not conn:
                conn.close()
                return
            self._conn = None
            if self._down_since is None:
                self._down_since = time.monotonic()
            closed = self._closed or self._peer_closed is not None
        conn.close()
        if not closed and self._failed is None:
            log.warning("%s: connection to %s lost (%s); waiting up to %g s for it to come "
                        "back", self.name, self.peer_role, reason, self.link_timeout_s)

    # ------------------------------------------------------------------ threads
    def _reader(self, conn: TcpTransport) -> None:
        while True:
            try:
                frame = conn.recv_bytes()
            except TransportError as e:
                self._drop(conn, str(e))
                return
            if self._conn is not conn:
                return
            self.bytes_received += len(frame) + 4
            kind = frame[:1]
            with self._cond:
                self._last_rx = time.monotonic()
            if kind == b"D" and len(frame) >= _DATA.size:
                _, number, seq, ack = _DATA.unpack_from(frame)
                if number >= MAX_CHANNELS:
                    self._drop(conn, f"frame on channel {number}, which no session opens")
                    return
                self._on_ack(ack, conn)
                with self._cond:
                    if self._conn is not conn:
                        return
                    gap = seq > self._received
                    if seq == self._received:
                        self._queues.setdefault(number, deque()).append(frame[_DATA.size:])
                        self._received += 1
                        self._cond.notify_all()
                    # seq < received: sent again after a reconnect, already here
                if gap:
                    self._drop(conn, f"frame {seq} on channel {number} out of order "
                               f"(expected {self._received})")
                    return
                self._bytes_since_ack += len(frame)
                if self._bytes_since_ack >= _ACK_EVERY_BYTES:
                    self._ping(conn, wait=False)
            elif kind == b"P" and len(frame) == _PING.size:
                self._on_ack(_PING.unpack(frame)[1], conn)
            elif kind == b"B" and len(frame) >= 2:
                reason = frame[2:].decode("utf-8", "replace")[:500]
                with self._cond:
                    self._peer_code = frame[1]
                    self._peer_closed = reason or "no reason given"
                    self._cond.notify_all()
                log.info("%s: %s ended the link: %s", self.name, self.peer_role,
                         self._peer_closed)
                return
            else:
                self._drop(conn, f"malformed link frame ({len(frame)} bytes)")
                return

    def _on_ack(self, ack: int, conn: TcpTransport) -> None:
        if ack > self._next_seq:
            self._drop(conn, f"acknowledgement of frame {ack} never sent")
            return
        with self._buf_lock:
            self._trim(ack)
        with self._cond:
            self._cond.notify_all()

    def _ping(self, conn: TcpTransport, wait: bool = True) -> None:
        """Send an acknowledgement (and keep-alive), unless a sender holds the socket:
        the reader does not wait (its data frames carry acknowledgements anyway), the
        maintainer waits a ping interval at most."""
        if not self._send_lock.acquire(timeout=self.ping_interval_s if wait else 0):
            return
        try:
            if self._conn is not conn:
                return
            self._bytes_since_ack = 0
            try:
                conn.send_bytes(_PING.pack(b"P", self._received))
                self.bytes_sent += _PING.size + 4
            except TransportError as e:
                self._drop(conn, str(e))
        finally:
            self._send_lock.release()

    def _maintain(self) -> None:
        last_dial = 0.0
        while True:
            time.sleep(self.ping_interval_s)
            if self._closed or self._failed is not None or self._peer_closed is not None:
                return
            conn = self._conn
            now = time.monotonic()
            if conn is not None:
                if now - self._last_rx > self.idle_timeout_s:
                    self._drop(conn, f"nothing heard for {self.idle_timeout_s:g} s")
                else:
                    self._ping(conn)
                continue
            down = self._down_since or now
            if now - down > self.link_timeout_s:
                self._fail(f"{self.name}: the connection to {self.peer_role} was lost and "
                           f"did not come back within {self.link_timeout_s:g} s")
                return
            if self._target is not None and now - last_dial >= 0.25:
                last_dial = now
                try:
                    self._dial()
                    self.reconnects += 1
                except AuthenticationError as e:
                    self._fail(f"{self.name}: reconnecting: {e}")
                    return
                except TransportError as e:
                    log.debug("%s: reconnect failed: %s", self.name, e)

    def _acceptor(self) -> None:
        listener = self._listener
        while not (self._closed or self._failed is not None or self._peer_closed is not None):
            try:
                conn = listener.accept(timeout=0.5)
            except TransportError:
                continue
            # each handshake in its own thread, so that a silent peer does not block the
            # real one; a bounded number at once, so that a flood does not exhaust threads
            if not self._handshakes.acquire(blocking=False):
                log.warning("%s: dropped a connection from %s: %d handshakes under way",
                            self.name, conn.peer, _MAX_HANDSHAKES)
                conn.close()
                continue
            threading.Thread(target=self._accept_later, args=(conn,), daemon=True,
                             name=f"qkdctl-{self.role}-handshake").start()

    def _accept_later(self, conn: TcpTransport) -> None:
        try:
            if self._accept(conn, first=False):
                self.reconnects += 1
        except TransportError as e:
            log.warning("%s: dropped a connection from %s: %s", self.name, conn.peer, e)
            conn.close()
        finally:
            self._handshakes.release()

    # ------------------------------------------------------------------ closing
    def close(self, reason: str = "session ended", code: int = BYE_DONE) -> None:
        """End the link: tell the peer why (so that it does not wait; ``code``
        :data:`BYE_ALARM` makes it stop on a tamper alarm too), close everything."""
        if self._closed:
            return
        conn = self._conn
        if conn is not None and self._failed is None:
            with contextlib.suppress(TransportError):
                with self._send_lock:
                    conn.send_bytes(b"B" + bytes([code]) + reason.encode("utf-8")[:500])
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._conn = None
        if conn is not None:
            conn.close()
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LinkChannel(Transport):
    """One channel of a :class:`Link`, as a :class:`~qkdctl.auth.Transport`."""

    def __init__(self, link: Link, number: int):
        self.link = link
        self.number = number

    def __repr__(self) -> str:
        return f"LinkChannel({self.link!r}, {self.number})"

    def send_bytes(self, data: bytes) -> None:
        self.link.send(self.number, bytes(data))

    def recv_bytes(self) -> bytes:
        return self.link.recv(self.number)

    def close(self) -> None:
        pass  # the link is closed as a whole
