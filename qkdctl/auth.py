"""Authenticated framing of the classical channel.

Layers, bottom up:

* A :class:`Transport` moves opaque frames (``bytes``) between the two ends:
  :class:`LocalTransport` in one process (with a hook to tamper with frames
  in flight, for tests), :class:`TcpTransport` over a TCP connection.
* An :class:`Authenticator` computes the tag of a frame:
  :class:`HmacSha256` (computationally secure, pre-shared key) or
  :class:`WegmanCarter` (information-theoretically secure universal hashing
  with one-time-pad encrypted tags; pads come from the key store).
* An :class:`AuthenticatedEndpoint` is one role's end of the session: it
  encodes messages with :mod:`qkdctl.wire`, numbers them, tags them, and on
  receipt accepts a frame only if it is well formed, its tag is right, it was
  sent by the other role, and it is exactly the next message expected.

Frame layout (integers little-endian)::

    offset  size  field
         0     4  magic b"QKDA"
         4     1  frame format version (1)
         5     1  authenticator id (1 = HMAC-SHA256, 2 = Wegman-Carter)
         6     1  direction (0 = alice -> bob, 1 = bob -> alice)
         7     1  flags (0)
         8     8  sequence number (u64; counts from 0 in each direction)
        16     8  key reference (u64; Wegman-Carter: position of the tag's one-time
                  pad in the key store; HMAC-SHA256: 0)
        24     4  payload length N (u32)
        28     N  payload: the wire encoding of the message
      28+N     T  tag (T = 32 for HMAC-SHA256, 16 for Wegman-Carter)

The tag is computed over the *MAC input*: the domain string
``b"qkdctl-auth-v1\\0"``, the direction label (``b"alice->bob"`` or
``b"bob->alice"``), the session ID (u16 length, then the bytes), the 28-byte
header and the payload. The header carries the direction, sequence number,
key reference and length, so all of them are authenticated; the session ID
is authenticated without being sent. A frame from another session,
reflected to its sender, replayed, reordered, or following a dropped frame
is refused, as is any frame that was modified.

Any failure -- a malformed or truncated frame, a bad tag, a frame in the
wrong direction or out of sequence, an authentic payload that does not decode,
no pad left, a transport error -- closes the endpoint (and its transport):
every later :meth:`~AuthenticatedEndpoint.send` or
:meth:`~AuthenticatedEndpoint.recv` raises :class:`EndpointClosedError`. The
session has to stop and produce no key. Authentication failures raise
subclasses of :class:`AuthenticationError`; transport failures raise
:class:`TransportError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from . import wire
from .errors import QkdctlError
from .keystore import KeyExhaustedError, PadUnavailableError
from .wire import WireError

__all__ = [
    "AuthenticatedEndpoint",
    "AuthenticationError",
    "Authenticator",
    "EndpointClosedError",
    "FrameError",
    "HmacSha256",
    "LocalTransport",
    "PadError",
    "PadExhaustedError",
    "PadSource",
    "PayloadError",
    "ReflectionError",
    "ReplayError",
    "TagError",
    "TcpListener",
    "TcpTransport",
    "Transport",
    "TransportError",
    "WegmanCarter",
]

log = logging.getLogger(__name__)

MAGIC = b"QKDA"
FRAME_VERSION = 1
HEADER = struct.Struct("<4sBBBBQQI")
ROLES = ("alice", "bob")
DIRECTION_LABELS = (b"alice->bob", b"bob->alice")
_DOMAIN = b"qkdctl-auth-v1\x00"
DEFAULT_MAX_PAYLOAD = 1 << 30
DEFAULT_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------------------
# errors

class TransportError(QkdctlError):
    """The transport failed: connection closed, timed out, or no frame waiting."""


class AuthenticationError(QkdctlError):
    """A frame of the classical channel was refused; the session must stop with no key."""


class FrameError(AuthenticationError):
    """A frame is malformed or truncated, or a message is too large to frame."""


class TagError(AuthenticationError):
    """A frame's tag is wrong: the frame was tampered with, or the keys differ."""


class ReplayError(AuthenticationError):
    """A frame's sequence number is not the next one expected (replay, reorder, drop)."""


class ReflectionError(AuthenticationError):
    """A frame sent by this endpoint's own role came back to it."""


class PayloadError(AuthenticationError, WireError):
    """An authentic frame's payload is not a valid message encoding."""


class PadExhaustedError(AuthenticationError, KeyExhaustedError):
    """The key store has no bits left for a one-time pad of a tag."""


class PadError(AuthenticationError, PadUnavailableError):
    """The one-time pad a frame names cannot be taken from the receiver's key store."""


class EndpointClosedError(AuthenticationError):
    """The endpoint was closed, by the application or after a failure."""


# ----------------------------------------------------------------------------------------
# transports

class Transport:
    """Moves whole frames (``bytes``) between the two ends of a session, in order."""

    def send_bytes(self, data: bytes) -> None:
        """Send one frame."""
        raise NotImplementedError

    def recv_bytes(self) -> bytes:
        """Receive the next frame; :class:`TransportError` if there is none."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the transport; later calls raise :class:`TransportError`."""


Interceptor = Callable[[list[bytes]], "list[bytes] | None"]


class LocalTransport(Transport):
    """One end of an in-process transport; make both ends with :meth:`pair`.

    Frames sent by one end wait in the other end's :attr:`inbox` (a deque,
    oldest first) until received. Receiving with an empty inbox raises
    :class:`TransportError` at once (the two ends run in one thread).

    Test hook: :attr:`interceptor`, if set, is called after every frame this
    end sends, with the list of this end's frames in flight (the peer's inbox,
    newest last). It may modify the list in place and return ``None``, or return
    a new list; the in-flight frames become that list -- so it can tamper with,
    drop, duplicate, reorder or inject frames. Tests may also edit
    :attr:`inbox` directly.
    """

    def __init__(self, name: str = "local"):
        self.name = name
        self.inbox: deque[bytes] = deque()
        self.peer: LocalTransport | None = None
        self.interceptor: Interceptor | None = None
        self.closed = False

    @classmethod
    def pair(cls, names: tuple[str, str] = ("alice", "bob")) -> tuple[LocalTransport,
                                                                      LocalTransport]:
        """Two connected ends."""
        a, b = cls(names[0]), cls(names[1])
        a.peer, b.peer = b, a
        return a, b

    def __repr__(self) -> str:
        return f"LocalTransport({self.name!r}, waiting={len(self.inbox)}, closed={self.closed})"

    def send_bytes(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"frames are bytes, not {type(data).__name__}")
        if self.closed:
            raise TransportError(f"{self.name}: transport is closed")
        peer = self.peer
        if peer is None or peer.closed:
            raise TransportError(f"{self.name}: the peer closed the connection")
        peer.inbox.append(bytes(data))
        if self.interceptor is not None:
            frames = list(peer.inbox)
            new = self.interceptor(frames)
            new = frames if new is None else list(new)
            if not all(isinstance(f, bytes) for f in new):
                raise TypeError("interceptor must leave a list of bytes")
            peer.inbox.clear()
            peer.inbox.extend(new)

    def recv_bytes(self) -> bytes:
        if self.closed:
            raise TransportError(f"{self.name}: transport is closed")
        if not self.inbox:
            if self.peer is None or self.peer.closed:
                raise TransportError(f"{self.name}: the peer closed the connection")
            raise TransportError(f"{self.name}: no frame waiting from the peer")
        return self.inbox.popleft()

    def close(self) -> None:
        self.closed = True


class TcpTransport(Transport):
    """Frames over a connected TCP socket: each frame is a u32 little-endian length, then
    the frame.

    ``timeout``: seconds to wait for the peer in any one send or receive (``None``:
    wait forever). ``max_frame``: frames announced larger than this are refused
    before anything is allocated. After any error the socket is closed.
    """

    _LEN = struct.Struct("<I")
    _CHUNK = 1 << 20

    def __init__(self, sock: socket.socket, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                 max_frame: int = DEFAULT_MAX_PAYLOAD + 4096):
        if not 0 < max_frame <= 0xFFFFFFFF:
            raise ValueError("max_frame must be in 1 .. 2**32 - 1")
        self._sock: socket.socket | None = sock
        self.timeout = timeout
        self.max_frame = max_frame
        #: called whenever bytes arrive (a frame may take a while: the link's idle check)
        self.on_data: Callable[[], None] | None = None
        try:
            host, port = sock.getpeername()[:2]
            self.peer = f"{host}:{port}"
        except OSError:
            self.peer = "peer"
        sock.settimeout(timeout)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def connect(cls, host: str, port: int, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                max_frame: int = DEFAULT_MAX_PAYLOAD + 4096) -> TcpTransport:
        """Connect to a :class:`TcpListener` (or any peer speaking this framing)."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise TransportError(f"cannot connect to {host}:{port}: {_os_msg(e)}") from None
        return cls(sock, timeout=timeout, max_frame=max_frame)

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "open"
        return f"TcpTransport({self.peer!r}, {state})"

    def set_timeout(self, timeout: float | None) -> None:
        """Seconds to wait for the peer in any one send or receive from now on."""
        self.timeout = timeout
        if self._sock is not None:
            self._sock.settimeout(timeout)

    def __enter__(self) -> TcpTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise TransportError(f"connection to {self.peer} is closed")
        return self._sock

    def send_bytes(self, data: bytes) -> None:
        sock = self._require()
        if len(data) > self.max_frame:
            raise TransportError(f"frame of {len(data)} bytes exceeds the limit of "
                                 f"{self.max_frame} bytes")
        try:
            sock.sendall(self._LEN.pack(len(data)) + bytes(data))
        except TimeoutError:
            self.close()
            raise TransportError(f"{self.peer} did not accept data within "
                                 f"{self.timeout} s") from None
        except OSError as e:
            self.close()
            raise TransportError(f"sending to {self.peer}: {_os_msg(e)}") from None

    def recv_bytes(self) -> bytes:
        self._require()
        n = self._LEN.unpack(self._recv_exact(self._LEN.size, prefix=True))[0]
        if n > self.max_frame:
            self.close()
            raise TransportError(f"{self.peer} announced a frame of {n} bytes; the limit is "
                                 f"{self.max_frame}")
        return self._recv_exact(n, prefix=False)

    def _recv_exact(self, n: int, *, prefix: bool) -> bytes:
        sock = self._require()
        parts: list[bytes] = []
        got = 0
        try:
            while got < n:
                chunk = sock.recv(min(n - got, self._CHUNK))
                if not chunk:
                    self.close()
                    if prefix and got == 0:
                        raise TransportError(f"connection closed by {self.peer}")
                    what = "length prefix" if prefix else "frame"
                    raise TransportError(f"connection closed by {self.peer} in the middle of "
                                         f"a {what}: got {got} of {n} bytes")
                parts.append(chunk)
                got += len(chunk)
                if self.on_data is not None:
                    self.on_data()
        except TimeoutError:
            self.close()
            raise TransportError(f"no data from {self.peer} within {self.timeout} s "
                                 f"(got {got} of {n} bytes)") from None
        except OSError as e:
            self.close()
            raise TransportError(f"receiving from {self.peer}: {_os_msg(e)}") from None
        return b"".join(parts)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpListener:
    """A listening TCP socket handing out :class:`TcpTransport` connections.

    ``port=0`` picks a free port (see :attr:`port`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, backlog: int = 1):
        try:
            self._sock: socket.socket | None = socket.create_server((host, port),
                                                                    backlog=backlog)
        except OSError as e:
            raise TransportError(f"cannot listen on {host}:{port}: {_os_msg(e)}") from None
        self.host, self.port = self._sock.getsockname()[:2]

    def __repr__(self) -> str:
        return f"TcpListener({self.host!r}, {self.port})"

    def __enter__(self) -> TcpListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def accept(self, *, timeout: float | None = DEFAULT_TIMEOUT_S,
               max_frame: int = DEFAULT_MAX_PAYLOAD + 4096) -> TcpTransport:
        """Wait up to ``timeout`` seconds for one connection."""
        if self._sock is None:
            raise TransportError(f"listener on {self.host}:{self.port} is closed")
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise TransportError(f"no connection on {self.host}:{self.port} within "
                                 f"{timeout} s") from None
        except OSError as e:
            raise TransportError(f"accepting on {self.host}:{self.port}: "
                                 f"{_os_msg(e)}") from None
        return TcpTransport(conn, timeout=timeout, max_frame=max_frame)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _os_msg(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


# ----------------------------------------------------------------------------------------
# authenticators

class Authenticator:
    """Computes frame tags for the endpoints of a session.

    :meth:`begin_send` is called once per outgoing frame before its header is
    built and returns the *key reference* put in the header (0 if unused).
    :meth:`tag` returns the tag of a frame over its MAC input ``parts``
    (concatenated), or ``None`` if the key for that frame is not at hand and
    ``claim`` is false (the endpoint sets ``claim`` only for the frame it
    expects next, so that no key material is spent on frames refused anyway).
    """

    name = "none"
    alg_id = 0
    tag_size = 0

    def begin_send(self, session_id: bytes, direction: int, seq: int) -> int:
        return 0

    def tag(self, session_id: bytes, direction: int, seq: int, key_ref: int,
            parts: Sequence[bytes], *, claim: bool) -> bytes | None:
        raise NotImplementedError


class HmacSha256(Authenticator):
    """HMAC-SHA256 tags (32 bytes) under a pre-shared key of at least 32 bytes.

    The HMAC key is SHA-256 of a domain string, the key length and the key, so
    that keys differing only in trailing zero bytes (which HMAC itself would
    treat as the same key) are different keys here.

    Security is computational, not information-theoretic: accepting a forged
    or modified frame requires breaking HMAC-SHA256 as a pseudorandom function;
    a guessed tag is accepted with probability 2^-256. No key-store bits are
    used, and the same key may serve many sessions as long as each session has
    a fresh session ID (e.g. 16 random bytes), which is part of every MAC input
    so that frames of one session are refused in another. Suitable for bench
    work and where computational security of the classical channel is
    acceptable; for composable information-theoretic security use
    :class:`WegmanCarter`.
    """

    name = "HMAC-SHA256"
    alg_id = 1
    tag_size = 32

    def __init__(self, psk: bytes):
        if not isinstance(psk, (bytes, bytearray)):
            raise TypeError("psk must be bytes")
        if len(psk) < 32:
            raise ValueError(f"psk must be at least 32 bytes, got {len(psk)}")
        self._len = len(psk)
        self._key = hashlib.sha256(b"qkdctl-hmac-key-v1\x00" + struct.pack("<I", len(psk))
                                   + bytes(psk)).digest()

    def __repr__(self) -> str:
        return f"HmacSha256(psk=<{self._len} bytes, not shown>)"

    def tag(self, session_id: bytes, direction: int, seq: int, key_ref: int,
            parts: Sequence[bytes], *, claim: bool) -> bytes:
        h = hmac.new(self._key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.digest()


class PadSource(Protocol):
    """Where one-time pads come from (a :class:`~qkdctl.keystore.KeyStore`).

    ``allocate_pad`` takes the next unused pad for a message in ``direction``
    and returns (position, packed bits); ``claim_pad`` takes the pad at a
    position named by the sender and raises
    :class:`~qkdctl.keystore.PadUnavailableError` if it is not an unused pad
    of that direction. Both mark the bits used before returning them.
    """

    def allocate_pad(self, direction: int, n_bits: int, purpose: str) -> tuple[int, bytes]: ...

    def claim_pad(self, direction: int, position: int, n_bits: int, purpose: str) -> bytes: ...


_P127 = (1 << 127) - 1
_CHUNK_BYTES = 15
_PAD_HISTORY = 1024


def poly_hash_127(key: int, data: bytes) -> int:
    """Polynomial hash of ``data`` over GF(2^127 - 1) at the point ``key``.

    The coefficients are c_1 = len(data) + 1 followed by the 15-byte
    little-endian chunks of ``data`` (the last may be shorter), c_2 .. c_L;
    the hash is sum(c_i * key^(L - i + 1)) mod p, a polynomial of degree
    exactly L = 1 + ceil(len(data) / 15) with no constant term.
    """
    p = _P127
    h = len(data) + 1
    mv = memoryview(data)
    from_bytes = int.from_bytes
    for i in range(0, len(data), _CHUNK_BYTES):
        h = (h * key + from_bytes(mv[i:i + _CHUNK_BYTES], "little")) % p
    return h * key % p


class _PadCache:
    """The pads of one session's recent messages, by (direction, sequence number), kept
    to check replayed and reflected frames."""

    def __init__(self) -> None:
        self.pads: dict[tuple[int, int], tuple[int, bytes]] = {}
        self.top = [-1, -1]         # highest sequence number seen, per direction
        self.kept_from = [0, 0]     # pads below this were forgotten, per direction

    def put(self, direction: int, seq: int, position: int, pad: bytes) -> None:
        self.pads[(direction, seq)] = (position, pad)
        if seq > self.top[direction]:
            self.top[direction] = seq
            stop = seq - _PAD_HISTORY
            for s in range(self.kept_from[direction], stop):
                self.pads.pop((direction, s), None)
            self.kept_from[direction] = max(stop, self.kept_from[direction])


class WegmanCarter(Authenticator):
    """Wegman-Carter tags: a universal hash under a reusable secret key, encrypted with
    a fresh one-time pad per message.

    ``hash_key``: 16 secret, uniformly random bytes shared by Alice and Bob (a
    pre-shared key, or for example 128 bits taken with
    ``store.consume(128, "wegman-carter hash key")`` at the same point on both
    sides); it may be reused for many sessions. Its low 127 bits, reduced
    modulo p = 2^127 - 1, are the hash point k (k = 0 is refused). ``pads``: this
    side's key store (any :class:`PadSource`); Alice and Bob each use their own
    copy of the shared key.

    Tag of a frame with MAC input M (n bytes):
    ``t = (h_k(M) + s) mod 2^128`` (16 bytes), where h_k is
    :func:`poly_hash_127` and s a 128-bit one-time pad used for that frame
    only. The sender allocates s from its direction's part of the key store
    (:meth:`~qkdctl.keystore.KeyStore.allocate_pad`) and puts its position in
    the frame header, which is part of M; the receiver claims the pad at that
    position in its own copy (:meth:`~qkdctl.keystore.KeyStore.claim_pad`),
    which refuses bits already used. Each message thus uses exactly 128 pad
    bits on each side, never bits used before, and the stores stay in step
    however the messages of several channels and both directions interleave.
    Bits are marked used before they are used. The receiver claims a pad only
    for the frame it expects next, so frames with forged sequence numbers
    cannot drain the store; they are refused without a check. An empty store
    raises :class:`PadExhaustedError`; a pad that cannot be claimed raises
    :class:`PadError`.

    Security (information-theoretic, no computational assumption): for
    distinct MAC inputs M != M' of at most n bytes, h_k(M) - h_k(M') mod p is
    a non-zero polynomial in k of degree at most L = 1 + ceil(n / 15) with no
    constant term, so it takes any given value for at most L of the p - 1
    equally likely values of k. As both hashes are below 2^127 and the pad is
    added modulo 2^128, a tag difference fixes the integer difference of the
    hashes, so the hash is (L / (p - 1))-almost-delta-universal for this
    addition. The tags an adversary sees are encrypted by uniform pads that
    are never reused, so they reveal nothing about k, and a forged or modified
    frame (any payload, sequence number, direction, pad position or session)
    is accepted with probability at most

        eps_tag = L / (2^127 - 2)   per forgery attempt

    e.g. about 2^-121 for a 1 kB message and 2^-111 for a 1 MiB message. As an
    endpoint closes after the first refused frame, a session allows one
    attempt; over q attempts in all sessions sharing a hash key the chance
    that any succeeds is at most q * eps_tag. If the hash key and pads come
    from QKD keys that are eps_key-secret, add their eps_key.

    Hashing runs in pure Python, at about 50 ms per MiB of payload; every pad
    costs one synced index update of the key store on each side.
    """

    name = "Wegman-Carter"
    alg_id = 2
    tag_size = 16
    PAD_BITS = 128

    def __init__(self, hash_key: bytes, pads: PadSource):
        if not isinstance(hash_key, (bytes, bytearray)):
            raise TypeError("hash_key must be bytes")
        if len(hash_key) != 16:
            raise ValueError(f"hash_key must be 16 bytes, got {len(hash_key)}")
        k = (int.from_bytes(hash_key, "little") & _P127) % _P127
        if k == 0:
            raise ValueError("hash_key gives the hash point 0; use a random key")
        self._k = k
        self.pads = pads
        self._sessions: dict[bytes, _PadCache] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WegmanCarter(hash_key=<not shown>, pads={self.pads!r})"

    def _purpose(self, session_id: bytes, direction: int, seq: int) -> str:
        return (f"wegman-carter pad of message {seq} {DIRECTION_LABELS[direction].decode()}, "
                f"session {session_id.hex()}")

    def begin_send(self, session_id: bytes, direction: int, seq: int) -> int:
        try:
            pos, pad = self.pads.allocate_pad(direction, self.PAD_BITS,
                                              self._purpose(session_id, direction, seq))
        except KeyExhaustedError as e:
            raise PadExhaustedError(f"no one-time pad for message {seq} from "
                                    f"{ROLES[direction]}: {e}") from None
        if len(pad) != self.PAD_BITS // 8 or not 0 <= pos < 1 << 64:
            raise PadError(f"key store returned a bad pad for message {seq}")
        with self._lock:
            self._sessions.setdefault(session_id, _PadCache()).put(direction, seq, pos, pad)
        return pos

    def tag(self, session_id: bytes, direction: int, seq: int, key_ref: int,
            parts: Sequence[bytes], *, claim: bool) -> bytes | None:
        with self._lock:
            cache = self._sessions.setdefault(session_id, _PadCache())
            hit = cache.pads.get((direction, seq))
        if hit is not None:
            pos, pad = hit
            if pos != key_ref:
                return None
        elif claim:
            try:
                pad = self.pads.claim_pad(direction, key_ref, self.PAD_BITS,
                                          self._purpose(session_id, direction, seq))
            except PadUnavailableError as e:
                raise PadError(f"message {seq} from {ROLES[direction]} refused: its one-time "
                               f"pad is not available: {e}") from None
            with self._lock:
                cache.put(direction, seq, key_ref, pad)
        else:
            return None
        h = poly_hash_127(self._k, b"".join(parts))
        t = (h + int.from_bytes(pad, "little")) & ((1 << 128) - 1)
        return t.to_bytes(16, "little")


ALGORITHMS = {HmacSha256.alg_id: HmacSha256.name, WegmanCarter.alg_id: WegmanCarter.name}


# ----------------------------------------------------------------------------------------
# endpoint

class AuthenticatedEndpoint:
    """One role's end of an authenticated session (see the module documentation).

    ``role``: ``"alice"`` or ``"bob"``; ``session_id``: 1 to 255 bytes, the same on
    both sides and fresh for every session (it is authenticated, not sent).
    ``registry``: the :class:`~qkdctl.wire.Registry` of message types (default:
    the global one). ``max_payload``: larger messages are refused on both send
    and receive.

    Sequence numbers are the endpoint's own (0, 1, 2, ... per direction);
    a ``seq`` field the message may have is sent as part of the payload but not
    used by this layer. An endpoint is used by one thread at a time; endpoints
    of different channels may run in different threads and share key stores.
    """

    def __init__(self, transport: Transport, authenticator: Authenticator, role: str,
                 session_id: bytes, *, registry: wire.Registry | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD):
        if role not in ROLES:
            raise ValueError(f"role must be 'alice' or 'bob', got {role!r}")
        if not isinstance(session_id, (bytes, bytearray)) or not 1 <= len(session_id) <= 255:
            raise ValueError("session_id must be 1 to 255 bytes")
        if not 0 < max_payload <= 0xFFFFFFFF:
            raise ValueError("max_payload must be in 1 .. 2**32 - 1")
        self.transport = transport
        self.authenticator = authenticator
        self.role = role
        self.peer = ROLES[1 - ROLES.index(role)]
        self.session_id = bytes(session_id)
        self.registry = wire.REGISTRY if registry is None else registry
        self.max_payload = max_payload
        self._out = ROLES.index(role)
        self._in = 1 - self._out
        self._sent = 0
        self._received = 0
        self._closed: str | None = None
        self._sid_field = struct.pack("<H", len(self.session_id)) + self.session_id

    def __repr__(self) -> str:
        state = "open" if self._closed is None else "closed"
        return (f"AuthenticatedEndpoint(role={self.role!r}, session={self.session_id.hex()}, "
                f"authenticator={self.authenticator!r}, sent={self._sent}, "
                f"received={self._received}, {state})")

    def __enter__(self) -> AuthenticatedEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sent(self) -> int:
        """Messages sent so far (the sequence number of the next one)."""
        return self._sent

    @property
    def received(self) -> int:
        """Messages accepted so far (the sequence number expected next)."""
        return self._received

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def close_reason(self) -> str | None:
        """Why the endpoint was closed (``None`` while open)."""
        return self._closed

    def close(self) -> None:
        """Close the endpoint and its transport."""
        if self._closed is None:
            self._closed = "closed by the application"
            self._close_transport()

    def send(self, msg: object) -> None:
        """Encode, number, tag and send one message."""
        self._check_open()
        try:
            payload = wire.encode(msg, self.registry)
            if len(payload) > self.max_payload:
                raise FrameError(f"message {self._sent} to {self.peer} is {len(payload)} bytes; "
                                 f"the limit is {self.max_payload}")
            seq = self._sent
            auth = self.authenticator
            key_ref = auth.begin_send(self.session_id, self._out, seq)
            header = HEADER.pack(MAGIC, FRAME_VERSION, auth.alg_id, self._out, 0, seq, key_ref,
                                 len(payload))
            tag = auth.tag(self.session_id, self._out, seq, key_ref,
                           self._mac_parts(self._out, header, payload), claim=False)
            assert tag is not None and len(tag) == self.authenticator.tag_size
            self.transport.send_bytes(header + payload + tag)
        except BaseException as e:
            self._fail(e)
            raise
        self._sent += 1
        log.debug("%s: sent message %d (%d bytes)", self.role, seq, len(payload))

    def recv(self) -> object:
        """Receive, check and decode the next message."""
        self._check_open()
        try:
            frame = self.transport.recv_bytes()
            msg = self._open(frame)
        except BaseException as e:
            self._fail(e)
            raise
        self._received += 1
        return msg

    # ------------------------------------------------------------------ internals

    def _mac_parts(self, direction: int, header: bytes, payload: bytes) -> list[bytes]:
        return [_DOMAIN, DIRECTION_LABELS[direction], self._sid_field, header, payload]

    def _open(self, frame: bytes) -> object:
        n = len(frame)
        if n < HEADER.size:
            raise FrameError(f"truncated frame: {n} of at least {HEADER.size} bytes")
        magic, version, alg, direction, flags, seq, key_ref, length = HEADER.unpack_from(frame)
        if magic != MAGIC:
            raise FrameError("received data is not a qkdctl frame (bad magic bytes)")
        if version != FRAME_VERSION:
            raise FrameError(f"frame format version {version} is not supported "
                             f"(expected {FRAME_VERSION})")
        auth = self.authenticator
        if alg != auth.alg_id:
            other = ALGORITHMS.get(alg, f"unknown authenticator {alg}")
            raise FrameError(f"frame authenticated with {other}; this endpoint uses {auth.name}")
        if direction > 1:
            raise FrameError(f"frame has an invalid direction byte {direction}")
        if flags:
            raise FrameError(f"frame has unknown flags 0x{flags:02x}")
        if length > self.max_payload:
            raise FrameError(f"frame announces a payload of {length} bytes; the limit is "
                             f"{self.max_payload}")
        expected = HEADER.size + length + auth.tag_size
        if n < expected:
            raise FrameError(f"truncated frame: {n} of {expected} bytes")
        if n > expected:
            raise FrameError(f"frame of {n} bytes has {n - expected} extra bytes after its "
                             f"tag (expected {expected})")
        header = frame[:HEADER.size]
        payload = frame[HEADER.size:HEADER.size + length]
        tag = frame[HEADER.size + length:]
        sender = ROLES[direction]
        want = self._received
        expected_frame = direction == self._in and seq == want
        good = auth.tag(self.session_id, direction, seq, key_ref,
                        self._mac_parts(direction, header, payload), claim=expected_frame)
        if good is not None and not hmac.compare_digest(good, tag):
            raise TagError(f"message {seq} from {sender} failed authentication "
                           "(tampered or wrong key)")
        if good is None and expected_frame:
            raise TagError(f"message {seq} from {sender} cannot be authenticated "
                           "(no key for its tag)")
        note = "" if good is not None else " (frame not authenticated)"
        if direction == self._out:
            raise ReflectionError(f"message {seq} from {sender} came back to {self.role} "
                                  f"(reflected frame){note}")
        if seq < want:
            raise ReplayError(f"message {seq} from {sender} replayed or reordered: "
                              f"expected {want}{note}")
        if seq > want:
            raise ReplayError(f"message {seq} from {sender} out of order: expected {want} "
                              f"(a message was dropped or reordered){note}")
        try:
            msg = wire.decode(payload, self.registry)
        except WireError as e:
            raise PayloadError(f"message {seq} from {sender} is authentic but is not a valid "
                               f"message: {e}") from None
        log.debug("%s: received message %d (%d bytes)", self.role, seq, length)
        return msg

    def _check_open(self) -> None:
        if self._closed is not None:
            raise EndpointClosedError(f"{self.role} endpoint is closed ({self._closed}); "
                                      "the session must stop")

    def _fail(self, e: BaseException) -> None:
        if self._closed is None:
            reason = str(e) or type(e).__name__
            self._closed = f"after an earlier failure: {reason}"
            log.warning("%s: %s; closing the session", self.role, reason)
            self._close_transport()

    def _close_transport(self) -> None:
        try:
            self.transport.close()
        except Exception as e:  # closing is best effort; the endpoint is closed anyway
            log.debug("%s: closing the transport: %s", self.role, e)
