"""The simulated optical table as a process of its own: ``qkdctl sim-table``.

On a deployed link Alice's host drives the laser and the modulator, Bob's host
the detectors, the polarization controller and the time tagger, and the light
between them is physics. On the simulated bench that physics is this server: it
holds the one :class:`~qkdctl.sim.table.OpticalTable` and its
:class:`~qkdctl.sim.engine.TagGenerator`, and the mock instruments of each side
reach it over TCP (through :class:`~qkdctl.sim.remote.RemoteTable`) the way real
instruments reach their hardware. Bob's process gets time tags and his own
instruments' read-backs from it, nothing else; Alice's process gets her
instruments' read-backs. Neither side can read the other's state, and Bob can
never read Alice's sequence (``table.sequence``), the table's seed (from which
her default sequence is derived) or the hidden physics (fiber, offsets).

Connection
----------
The server listens on loopback by default (binding beyond it is an explicit
choice), one thread per connection. The server first sends :data:`MAGIC`
(8 bytes); the client sends :data:`MAGIC` too. A peer that does not is not a
sim-table client (an HTTP probe, the classical channel's peer on the wrong
port): it is dropped and logged. Then frames, each a u32 little-endian length
and a :mod:`qkdctl.wire` encoding (:class:`~qkdctl.auth.TcpTransport`), one
reply per request, in order.

The first frame must be :class:`Hello` ``{side, protocol_version,
bench_digest}``, answered by :class:`Welcome`, or by :class:`Error` and a
close when the side is unknown, the protocol version differs, or the bench
digest (:func:`bench_digest`: the ``[source]``, ``[receiver]`` and ``[sim]``
tables the table is built from; the message names both digests) differs from
the server's. The handshake must complete within ``hello_timeout_s``: a
half-open connection is dropped without holding a thread for ever.

Messages (wire type names ``simtable.<Name>``)::

    request                                  reply      sides
    Hello(side, protocol_version,            Welcome    first frame
          bench_digest)
    Get(name)                                Value      see the allowlists
    Set(changes: ((name, value), ...))       Ok         see the allowlists
    LoadSequence(mode, key, z_thr,           Ok         alice
                 cum_thr uint64[], pattern uint8[])
    GetDetectors()                           Detectors  bob
    SetDetector(channel, changes)            Ok         bob
    Generate(n_pulses)                       Tags       bob
    Finish()                                 Tags       bob
    Stop()                                   Ok         either, if the server allows it

    Welcome(protocol_version, side, bench_digest)
    Value(name, value)
    Detectors(fields: (name, ...), rows: ((value, ...), ...))   DetectorState copies
    Ok(changed)
    Tags(timestamps int64[], channels uint8[], pulses_simulated)
    Error(request, message)

Allowlists:

=================  =======================================================================
side               may
=================  =======================================================================
alice              get and set ``laser_on``, ``laser_current_ma``,
                   ``polarization_rotation_rad``; get ``power_scale``,
                   ``effective_misalignment``, ``pulses_simulated`` (her encoder's pulse
                   counter); ``LoadSequence``
bob                get and set ``waveplate_angles_deg``; get ``waveplate_retardances_deg``,
                   ``sync_channel``, ``tagger_resolution_ps``, ``rep_rate_hz``,
                   ``pulses_simulated``; ``GetDetectors``, ``SetDetector`` (``biased``,
                   ``efficiency``, ``dead_time_ns``); ``Generate``, ``Finish``
=================  =======================================================================

Every request is validated before it touches the table: a request type the
side may not send, an attribute not on its list, a value of the wrong type or
out of range, an unknown detector channel -- each is answered by an
:class:`Error` naming what is wrong, and the connection stays usable. After the handshake, a
frame that is not a valid encoding is answered by an :class:`Error` and the
connection closed; before it (garbage instead of a Hello), or on a broken frame
(EOF inside it, a length above 64 MiB), the connection is dropped and logged.
Other clients never notice. A ``Generate`` simulates at most
:data:`MAX_GENERATE_PULSES` pulses, so that a reply fits a frame whatever the
click rate; :class:`~qkdctl.sim.remote.RemoteTagGenerator` cuts longer reads.

Requests are serialized on the table by one lock (replies are sent outside
it), so each request sees the table as the previous one left it.

A sim table serves one run: after ``Finish`` a ``Generate`` is refused; start a
new ``qkdctl sim-table`` for a new run. (A tagger connecting to a table that has
already simulated pulses continues that run's pulse count.)

Determinism
-----------
The tags are a function of the seed, the table's state at each ``Generate``
and, where the table changed since the previous one, of its
:attr:`~qkdctl.sim.table.OpticalTable.version` there: every write bumps the
version, and after a change the generator redraws each detector's next dark
count, and its next photon candidate when the read starts inside one of its
65536-pulse sub-chunks, from a seed made of the seed, the pulse and the
version. (So the number of writes often makes no difference -- at the first
read of a run with rare dark counts, none -- but it can.) Hence the rule:

    The same seed, and the same writes between the same reads, give the same
    tags, whichever side makes them, in whatever order, in one process
    (:func:`~qkdctl.drivers.mock.build_mock_bench`) or through this server
    (:func:`~qkdctl.drivers.mock.build_remote_bench`). In particular all
    settings made before the first read give identical tags whatever their
    order or interleaving.

"The same writes" means the same number of *effective* writes: the mock
drivers write only values that differ from the table's, and
``LoadSequence`` of the sequence already loaded writes nothing, so redundant
commands change nothing. A write that is undone before the next read
(laser off then on) still counts: it redraws the random streams. The server
applies each ``Set`` / ``SetDetector`` / ``LoadSequence`` exactly as the
in-process drivers would (one ``table.set`` per command, one version bump), so
the counts agree between the layouts. Between reads, a change made by Alice
takes effect from the first pulse of Bob's next ``Generate``, as a change made
in one process takes effect from the next read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import wire
from ..auth import TcpTransport, TransportError
from ..config import BenchConfig
from ..errors import QkdctlError
from ..sequence import AliceSequence
from ..wire import WireError
from .engine import TagGenerator
from .table import DetectorState, OpticalTable

__all__ = [
    "DEFAULT_PORT",
    "MAGIC",
    "MAX_GENERATE_PULSES",
    "PROTOCOL_VERSION",
    "READABLE",
    "SIDES",
    "WRITABLE",
    "Detectors",
    "Error",
    "Finish",
    "Generate",
    "Get",
    "GetDetectors",
    "Hello",
    "LoadSequence",
    "Ok",
    "Set",
    "SetDetector",
    "Stop",
    "TableServer",
    "Tags",
    "Value",
    "Welcome",
    "bench_digest",
    "serve_table",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAGIC = b"QKDSIMTB"
DEFAULT_PORT = 47611
#: pulses one Generate may simulate: 2**24 (16.8 ms at 1 GHz). Even a click on every
#: detector at every pulse then fits the transport's 1 GiB frame limit.
MAX_GENERATE_PULSES = 1 << 24
MAX_REQUEST_BYTES = 64 << 20
SIDES = ("alice", "bob")

READABLE: dict[str, frozenset[str]] = {
    "alice": frozenset({"laser_on", "laser_current_ma", "polarization_rotation_rad",
                        "power_scale", "effective_misalignment", "pulses_simulated"}),
    "bob": frozenset({"waveplate_angles_deg", "waveplate_retardances_deg", "sync_channel",
                      "tagger_resolution_ps", "rep_rate_hz", "pulses_simulated"}),
}
"""Table attributes each side may ``Get``."""

WRITABLE: dict[str, frozenset[str]] = {
    "alice": frozenset({"laser_on", "laser_current_ma", "polarization_rotation_rad"}),
    "bob": frozenset({"waveplate_angles_deg"}),
}
"""Table attributes each side may ``Set``."""

DETECTOR_WRITABLE = frozenset({"biased", "efficiency", "dead_time_ns"})
DETECTOR_FIELDS = tuple(f.name for f in dataclasses.fields(DetectorState))


# ----------------------------------------------------------------------------------------
# messages

def _msg(name: str):
    return wire.message(f"simtable.{name}")


@_msg("Hello")
@dataclasses.dataclass(frozen=True)
class Hello:
    side: str
    protocol_version: int
    bench_digest: str


@_msg("Welcome")
@dataclasses.dataclass(frozen=True)
class Welcome:
    protocol_version: int
    side: str
    bench_digest: str


@_msg("Error")
@dataclasses.dataclass(frozen=True)
class Error:
    request: str
    message: str


@_msg("Get")
@dataclasses.dataclass(frozen=True)
class Get:
    name: str


@_msg("Value")
@dataclasses.dataclass(frozen=True)
class Value:
    name: str
    value: Any


@_msg("Set")
@dataclasses.dataclass(frozen=True)
class Set:
    changes: tuple  # ((name, value), ...)


@_msg("Ok")
@dataclasses.dataclass(frozen=True)
class Ok:
    changed: bool


@_msg("LoadSequence")
@dataclasses.dataclass(frozen=True)
class LoadSequence:
    mode: int
    key: int
    z_thr: int
    cum_thr: np.ndarray
    pattern: np.ndarray

    @classmethod
    def of(cls, seq: AliceSequence) -> LoadSequence:
        return cls(int(seq.mode), int(seq.key), int(seq.z_thr), np.asarray(seq.cum_thr),
                   np.asarray(seq.pattern))


@_msg("GetDetectors")
@dataclasses.dataclass(frozen=True)
class GetDetectors:
    pass


@_msg("Detectors")
@dataclasses.dataclass(frozen=True)
class Detectors:
    fields: tuple[str, ...]
    rows: tuple


@_msg("SetDetector")
@dataclasses.dataclass(frozen=True)
class SetDetector:
    channel: int
    changes: tuple  # ((name, value), ...)


@_msg("Generate")
@dataclasses.dataclass(frozen=True)
class Generate:
    n_pulses: int


@_msg("Finish")
@dataclasses.dataclass(frozen=True)
class Finish:
    pass


@_msg("Tags")
@dataclasses.dataclass(frozen=True)
class Tags:
    timestamps: np.ndarray
    channels: np.ndarray
    pulses_simulated: int


@_msg("Stop")
@dataclasses.dataclass(frozen=True)
class Stop:
    pass


_REQUESTS: dict[str, tuple[type, ...]] = {
    "alice": (Get, Set, LoadSequence, Stop),
    "bob": (Get, Set, GetDetectors, SetDetector, Generate, Finish, Stop),
}


def describe(msg: Any) -> str:
    """A request as it appears in messages and logs (never the sequence's key or codes)."""
    if isinstance(msg, LoadSequence):
        return (f"LoadSequence(mode={msg.mode!r}, pattern of "
                f"{getattr(msg.pattern, 'size', '?')} codes)")
    if isinstance(msg, Get):
        return f"Get({msg.name!r})"
    if isinstance(msg, Set | SetDetector):
        try:
            items = ", ".join(f"{k}={v!r}" for k, v in msg.changes)
        except (TypeError, ValueError):
            items = repr(msg.changes)
        return (f"Set({items})" if isinstance(msg, Set)
                else f"SetDetector(channel={msg.channel!r}, {items})")
    if isinstance(msg, Generate):
        return f"Generate(n_pulses={msg.n_pulses!r})"
    if isinstance(msg, Hello):
        return f"Hello(side={msg.side!r})"
    if dataclasses.is_dataclass(msg):
        return f"{type(msg).__name__}()"
    return type(msg).__name__


# ----------------------------------------------------------------------------------------
# the bench digest

def bench_digest(cfg: BenchConfig) -> str:
    """SHA-256 (hex) of the bench tables the optical table is built from.

    ``[source]``, ``[receiver]`` and ``[sim]`` as validated (defaults filled in,
    so a key written out at its default value changes nothing), as canonical
    JSON. ``[instruments]``, ``[link]``, ``[analysis]`` and ``[postprocess]`` are
    left out: they may differ between the hosts (their own instruments, key
    files, a calibration record's analysis settings) without changing the physics.
    """
    doc = {name: _plain(getattr(cfg, name)) for name in ("source", "receiver", "sim")}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


# ----------------------------------------------------------------------------------------
# validation

class _Refused(QkdctlError):
    """A request the server answers with an Error (the connection stays open)."""


def _real(name: str, v: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Refused(f"{name}: expected a number, got {type(v).__name__} {v!r}")
    x = float(v)
    if not math.isfinite(x):
        raise _Refused(f"{name}: {v!r} is not finite")
    if lo is not None and x < lo:
        raise _Refused(f"{name}: {x:g} is out of range (at least {lo:g})")
    if hi is not None and x > hi:
        raise _Refused(f"{name}: {x:g} is out of range (at most {hi:g})")
    return x


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Refused(f"{name}: expected true or false, got {type(v).__name__} {v!r}")
    return v


def _integer(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Refused(f"{name}: expected an integer, got {type(v).__name__} {v!r}")
    return v


def _pairs(changes: Any, what: str) -> list[tuple[str, Any]]:
    if not isinstance(changes, tuple) or not changes or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in changes):
        raise _Refused(f"{what}: expected a non-empty tuple of (name, value) pairs")
    names = [p[0] for p in changes]
    if len(set(names)) != len(names):
        raise _Refused(f"{what}: a name appears twice")
    return list(changes)


# ----------------------------------------------------------------------------------------
# the server

class TableServer:
    """The simulated optical table serving the mock instruments of both sides over TCP.

    ``TableServer(cfg, seed)`` builds the table as
    :func:`~qkdctl.drivers.mock.build_mock_bench` does
    (``OpticalTable.from_config(cfg, seed)``, laser output off, detectors biased
    down) and a ``TagGenerator(table, seed)``, and binds ``host:port`` (``port=0``:
    a free port, see :attr:`port`). Serve with :meth:`serve_forever` (blocks) or
    :meth:`start` (a thread); :meth:`close` stops it from any thread and is
    idempotent. Also a context manager (``with TableServer(...) as s: s.start()``).

    ``hello_timeout_s``: time a new connection has to complete its handshake.
    ``allow_stop``: whether a client's :class:`Stop` shuts the server down (tests,
    scripted runs). ``max_connections``: connections beyond are refused.
    """

    def __init__(self, cfg: BenchConfig, seed: int, host: str = "127.0.0.1", port: int = 0,
                 *, hello_timeout_s: float = 10.0, allow_stop: bool = False,
                 max_connections: int = 16):
        self.cfg = cfg
        self.digest = bench_digest(cfg)
        table = OpticalTable.from_config(cfg, seed)
        table.set(laser_on=False)
        for d in table.detectors:
            table.set_detector(d.channel, biased=False)
        self.table = table
        self.generator = TagGenerator(table, seed)
        self.hello_timeout_s = hello_timeout_s
        self.allow_stop = allow_stop
        self.max_connections = max_connections
        self._finished = False
        self._lock = threading.Lock()          # the table and the generator
        self._state_lock = threading.Lock()    # the connection bookkeeping
        self._conns: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._next_id = 0
        self._closed = threading.Event()
        self._serving = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._sock = socket.create_server((host, port), backlog=16)
        except OSError as e:
            raise TransportError(f"sim table: cannot listen on {host}:{port}: "
                                 f"{e.strerror or e}") from None
        self.host, self.port = self._sock.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        log.info("sim table %s listening on %s (bench digest %s)", cfg.name, self.address,
                 self.digest[:16])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else "open"
        return f"TableServer({self.address!r}, {state})"

    def __enter__(self) -> TableServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connections(self) -> int:
        """Connections open now."""
        with self._state_lock:
            return len(self._conns)

    # -- serving ----------------------------------------------------------------------------
    def start(self) -> TableServer:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever,
                                            name=f"sim-table {self.address}", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Accept connections until :meth:`close` (from any thread); then close."""
        if self._closed.is_set():
            return
        self._serving.set()
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._closed.is_set():
                        return
                    try:
                        conn, addr = self._sock.accept()
                    except OSError as e:
                        if self._closed.is_set():
                            return
                        log.warning("sim table %s: accept failed: %s", self.address, e)
                        continue
                    self._admit(conn, addr)
        finally:
            sel.close()
            self._serving.clear()
            self.close()

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        with self._state_lock:
            if self._closed.is_set() or len(self._conns) >= self.max_connections:
                log.warning("sim table %s: refused %s: %d connections open (the limit)",
                            self.address, peer, len(self._conns))
                with contextlib.suppress(OSError):
                    conn.close()
                return
            cid = self._next_id
            self._next_id += 1
            t = threading.Thread(target=self._serve_conn, args=(cid, conn, peer),
                                 name=f"sim-table {peer}", daemon=True)
            self._conns[cid] = (conn, t)
        log.info("sim table %s: connection from %s", self.address, peer)
        t.start()

    def close(self) -> None:
        """Stop serving and drop every connection. Safe from any thread; idempotent.

        Waits (up to a few seconds) for the serving thread of :meth:`start` and the
        connection threads; a request being simulated completes first.
        """
        with self._state_lock:
            first = not self._closed.is_set()
            self._closed.set()
            conns = list(self._conns.values())
        if first:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        for conn, _ in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        me = threading.current_thread()
        if self._thread is not None and self._thread is not me:
            self._thread.join(timeout=5.0)
        for _, t in conns:
            if t is not me:
                t.join(timeout=5.0)
        if not self._serving.is_set():
            # the serving loop (if any) has ended; it closes them itself otherwise
            for s in (self._sock, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    s.close()
        if first:
            log.info("sim table %s: closed", self.address)

    # -- one connection ---------------------------------------------------------------------
    def _serve_conn(self, cid: int, conn: socket.socket, peer: str) -> None:
        who = peer
        transport = None
        try:
            conn.settimeout(self.hello_timeout_s)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            conn.sendall(MAGIC)
            got = _recv_exact(conn, len(MAGIC))
            if got != MAGIC:
                log.warning("sim table %s: dropped %s: not a sim-table client (it sent %r)",
                            self.address, peer, got)
                return
            transport = TcpTransport(conn, timeout=self.hello_timeout_s,
                                     max_frame=MAX_REQUEST_BYTES)
            side = self._handshake(transport, peer)
            if side is None:
                return
            who = f"{peer} ({side})"
            transport.timeout = None
            conn.settimeout(None)
            while not self._closed.is_set():
                try:
                    msg = wire.decode(transport.recv_bytes())
                except WireError as e:
                    log.warning("sim table %s: %s: undecodable request, closing: %s",
                                self.address, who, e)
                    transport.send_bytes(wire.encode(Error("?", f"undecodable request: {e}")))
                    return
                reply = self._reply(side, msg, who)
                transport.send_bytes(wire.encode(reply))
                if isinstance(msg, Stop) and isinstance(reply, Ok):
                    log.info("sim table %s: stop requested by %s", self.address, who)
                    threading.Thread(target=self.close, daemon=True).start()
                    return
        except (TransportError, OSError) as e:
            if self._closed.is_set():
                log.debug("sim table %s: %s: closed with the server", self.address, who)
            elif isinstance(e, TransportError) and str(e).startswith("connection closed by") \
                    and "middle" not in str(e):
                log.info("sim table %s: %s disconnected", self.address, who)
            else:
                log.warning("sim table %s: dropped %s: %s", self.address, who,
                            e if isinstance(e, TransportError) else _os_msg(e))
        except Exception:  # a bug must not take the table down for the other side
            log.exception("sim table %s: %s: internal error, connection dropped",
                          self.address, who)
        finally:
            if transport is not None:
                transport.close()
            else:
                with contextlib.suppress(OSError):
                    conn.close()
            with self._state_lock:
                self._conns.pop(cid, None)

    def _handshake(self, transport: TcpTransport, peer: str) -> str | None:
        try:
            msg = wire.decode(transport.recv_bytes())
        except WireError as e:
            log.warning("sim table %s: dropped %s: its first frame is not a request: %s",
                        self.address, peer, e)
            return None
        problem = None
        if not isinstance(msg, Hello):
            problem = f"expected Hello first, got {type(msg).__name__}"
        elif msg.side not in SIDES:
            problem = f"unknown side {msg.side!r}; sides are {', '.join(SIDES)}"
        elif msg.protocol_version != PROTOCOL_VERSION:
            problem = (f"protocol version {msg.protocol_version!r}; this sim table speaks "
                       f"version {PROTOCOL_VERSION}")
        elif msg.bench_digest != self.digest:
            problem = (f"bench mismatch: the client's bench digest is {msg.bench_digest}, the "
                       f"sim table's ({self.cfg.name}) is {self.digest}; both sides and the "
                       "table must use the same [source], [receiver] and [sim]")
        if problem is not None:
            log.warning("sim table %s: refused %s: %s", self.address, peer, problem)
            with contextlib.suppress(TransportError):
                transport.send_bytes(wire.encode(Error(describe(msg), problem)))
            return None
        transport.send_bytes(wire.encode(Welcome(PROTOCOL_VERSION, msg.side, self.digest)))
        log.info("sim table %s: %s is %s", self.address, peer, msg.side)
        return msg.side

    def _reply(self, side: str, msg: Any, who: str) -> Any:
        try:
            if not isinstance(msg, _REQUESTS[side]):
                allowed = ", ".join(c.__name__ for c in _REQUESTS[side])
                raise _Refused(f"{type(msg).__name__} is not a request {side} may send "
                               f"(allowed: {allowed})")
            return self._handle(side, msg)
        except _Refused as e:
            log.warning("sim table %s: %s: refused %s: %s", self.address, who, describe(msg), e)
            return Error(describe(msg), str(e))
        except Exception as e:  # a bug must not take the table down for the other side
            log.exception("sim table %s: %s: %s failed", self.address, who, describe(msg))
            return Error(describe(msg), f"internal error of the sim table: "
                         f"{type(e).__name__}: {e}")

    # -- requests ---------------------------------------------------------------------------
    def _handle(self, side: str, msg: Any) -> Any:
        t = self.table
        if isinstance(msg, Get):
            if msg.name not in READABLE[side]:
                raise _Refused(f"{side} may not read {msg.name!r}; readable: "
                               f"{', '.join(sorted(READABLE[side]))}")
            with self._lock:
                return Value(msg.name, _wire_value(getattr(t, msg.name)))
        if isinstance(msg, Set):
            pairs = _pairs(msg.changes, "changes")
            changes = {}
            for name, v in pairs:
                if name not in WRITABLE[side]:
                    raise _Refused(f"{side} may not set {name!r}; settable: "
                                   f"{', '.join(sorted(WRITABLE[side]))}")
                changes[name] = self._check_value(name, v)
            with self._lock:
                t.set(**changes)
            return Ok(True)
        if isinstance(msg, SetDetector):
            channel = _integer("channel", msg.channel)
            pairs = _pairs(msg.changes, "changes")
            changes = {}
            for name, v in pairs:
                if name not in DETECTOR_WRITABLE:
                    raise _Refused(f"may not set a detector's {name!r}; settable: "
                                   f"{', '.join(sorted(DETECTOR_WRITABLE))}")
                changes[name] = self._check_value(name, v)
            with self._lock:
                if channel not in {d.channel for d in t.detectors}:
                    raise _Refused(f"no detector on channel {channel}; channels are "
                                   f"{', '.join(str(d.channel) for d in t.detectors)}")
                t.set_detector(channel, **changes)
            return Ok(True)
        if isinstance(msg, GetDetectors):
            with self._lock:
                rows = tuple(tuple(_wire_value(getattr(d, f)) for f in DETECTOR_FIELDS)
                             for d in t.detectors)
            return Detectors(DETECTOR_FIELDS, rows)
        if isinstance(msg, LoadSequence):
            seq = self._sequence(msg)
            with self._lock:
                try:
                    changed = t.load_sequence(seq)
                except ValueError as e:
                    raise _Refused(str(e)) from None
            return Ok(changed)
        if isinstance(msg, Generate):
            n = _integer("n_pulses", msg.n_pulses)
            if not 0 <= n <= MAX_GENERATE_PULSES:
                raise _Refused(f"n_pulses: {n} is out of range (0 to {MAX_GENERATE_PULSES} "
                               "per request)")
            with self._lock:
                if self._finished:
                    raise _Refused("the run is finished (Finish was sent); start a new sim "
                                   "table for a new run")
                ts, ch = self.generator.generate(n)
                return Tags(ts, ch, self.generator.pulses_simulated)
        if isinstance(msg, Finish):
            with self._lock:
                if self._finished:
                    ts, ch = np.empty(0, np.int64), np.empty(0, np.uint8)
                else:
                    self._finished = True
                    ts, ch = self.generator.finish()
                return Tags(ts, ch, self.generator.pulses_simulated)
        if isinstance(msg, Stop):
            if not self.allow_stop:
                raise _Refused("this sim table does not take Stop (stop its process instead)")
            return Ok(True)
        raise _Refused(f"unknown request {type(msg).__name__}")  # pragma: no cover

    def _check_value(self, name: str, v: Any) -> Any:
        if name in ("laser_on", "biased"):
            return _flag(name, v)
        if name == "laser_current_ma":
            return _real(name, v, lo=0.0, hi=1e6)
        if name == "polarization_rotation_rad":
            return _real(name, v, lo=-1e6, hi=1e6)
        if name == "efficiency":
            return _real(name, v, lo=0.0, hi=1.0)
        if name == "dead_time_ns":
            return _real(name, v, lo=0.0, hi=1e9)
        if name == "waveplate_angles_deg":
            n = len(self.table.waveplate_retardances_deg)
            if not isinstance(v, tuple) or len(v) != n:
                raise _Refused(f"{name}: expected a tuple of {n} angles (one per waveplate), "
                               f"got {v!r}")
            return tuple(_real(f"{name}[{i}]", a, lo=-1e6, hi=1e6) for i, a in enumerate(v))
        raise _Refused(f"{name!r} cannot be set")  # pragma: no cover

    def _sequence(self, msg: LoadSequence) -> AliceSequence:
        mode = _integer("mode", msg.mode)
        key = _integer("key", msg.key)
        z_thr = _integer("z_thr", msg.z_thr)
        if not 0 <= key < 1 << 64:
            raise _Refused("key: expected an unsigned 64-bit integer")
        if not 0 <= z_thr <= 1 << 31:
            raise _Refused(f"z_thr: {z_thr} is out of range (0 to 2**31)")
        for name in ("cum_thr", "pattern"):
            if not isinstance(getattr(msg, name), np.ndarray):
                raise _Refused(f"{name}: expected an array")
        return AliceSequence(mode, np.uint64(key), np.uint64(z_thr),
                             np.ascontiguousarray(msg.cum_thr),
                             np.ascontiguousarray(msg.pattern))


def _wire_value(v: Any) -> Any:
    """A table value as the wire carries it (tuples for lists, Python scalars)."""
    if isinstance(v, list | tuple):
        return tuple(_wire_value(x) for x in v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes (fewer if the peer closes first)."""
    parts, got = [], 0
    while got < n:
        chunk = conn.recv(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _os_msg(e: OSError) -> str:
    if isinstance(e, TimeoutError):
        return "no handshake within the timeout (half-open connection?)"
    return e.strerror or str(e) or type(e).__name__


def serve_table(cfg: BenchConfig, seed: int, host: str = "127.0.0.1",
                port: int = DEFAULT_PORT, ready: Callable[[int], None] | None = None,
                **kwargs: Any) -> None:
    """Run a :class:`TableServer` until it is closed (``qkdctl sim-table``).

    ``ready(port)`` is called once it listens, with the port bound (the one asked
    for, or the free one picked for ``port=0``). Prints nothing; logs. A
    KeyboardInterrupt (Ctrl-C, or a SIGTERM handler raising it) ends it cleanly:
    connections dropped, sockets closed. Other keyword arguments go to
    :class:`TableServer` (``hello_timeout_s``, ``allow_stop``, ``max_connections``).
    """
    with TableServer(cfg, seed, host, port, **kwargs) as server:
        if ready is not None:
            ready(server.port)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("sim table %s: interrupted", server.address)
