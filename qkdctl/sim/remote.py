"""Client side of the sim-table protocol: the optical table seen from one side's host.

:class:`RemoteTable` stands in for :class:`~qkdctl.sim.table.OpticalTable` under the
mock drivers of :mod:`qkdctl.drivers.mock` when the table runs in its own process
(:mod:`qkdctl.sim.server`, ``qkdctl sim-table``): it has the attributes and
methods those drivers use, each one a request to the server, so the same
``Mock*`` classes work unchanged on it. :class:`RemoteTagGenerator` stands in for
:class:`~qkdctl.sim.engine.TagGenerator` under the mock time tagger. Build a
side's instruments with :func:`qkdctl.drivers.mock.build_remote_bench`.

The surface is the side's allowlist (see :mod:`qkdctl.sim.server`), nothing
more: on Bob's side ``table.sequence`` or ``table.laser_on`` is an
``AttributeError`` without a word sent to the server, and the server refuses
such a request anyway. Alice's side has no ``detectors``.

=============================  ==========================================================
Alice's side                   ``laser_on``, ``laser_current_ma``,
                               ``polarization_rotation_rad`` (get, ``set``),
                               ``power_scale``, ``effective_misalignment``,
                               ``pulses_simulated``, :meth:`RemoteTable.load_sequence`
Bob's side                     ``waveplate_angles_deg`` (get, ``set``),
                               ``waveplate_retardances_deg``, ``sync_channel``,
                               ``tagger_resolution_ps``, ``rep_rate_hz``,
                               ``pulses_simulated``, ``detectors`` (copies),
                               :meth:`RemoteTable.set_detector`; the tag generator
=============================  ==========================================================

The connection is opened on the first request and kept; the instruments built
on a table share it, and it is closed when the last of them closes (or by
:meth:`RemoteTable.close`). Any failure -- the server unreachable, the
connection dropped, an :class:`~qkdctl.sim.server.Error` reply -- raises
:class:`~qkdctl.errors.InstrumentError` naming the sim table's address and the
request; after a dropped connection the next request connects afresh.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
from typing import Any

import numpy as np

from .. import wire
from ..auth import TcpTransport, TransportError
from ..config import BenchConfig
from ..errors import InstrumentError
from ..sequence import AliceSequence
from ..wire import WireError
from .server import (
    MAGIC,
    MAX_GENERATE_PULSES,
    PROTOCOL_VERSION,
    READABLE,
    SIDES,
    Detectors,
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
    Tags,
    Value,
    Welcome,
    bench_digest,
    describe,
)
from .table import DetectorState

__all__ = ["DEFAULT_TIMEOUT_S", "RemoteTable", "RemoteTagGenerator"]

log = logging.getLogger(__name__)

#: seconds to wait for the sim table in any one request (the first reads of a fresh
#: server may compile the simulator's kernels)
DEFAULT_TIMEOUT_S = 60.0


class RemoteTable:
    """One side's view of the sim table at ``host:port`` (see the module documentation).

    ``side`` is ``"alice"`` or ``"bob"``; ``cfg`` is this host's bench, whose digest
    (:func:`~qkdctl.sim.server.bench_digest`) must match the server's;
    ``timeout_s`` bounds every request.
    """

    def __init__(self, host: str, port: int, side: str, cfg: BenchConfig,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}, not {side!r}")
        self.host = host
        self.port = int(port)
        self.side = side
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.digest = bench_digest(cfg)
        self._transport: TcpTransport | None = None
        self._lock = threading.RLock()
        self._users = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "connected" if self._transport is not None else "not connected"
        return f"RemoteTable({self.address!r}, side={self.side!r}, {state})"

    def __enter__(self) -> RemoteTable:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | READABLE[self.side])

    # -- connection -------------------------------------------------------------------------
    def _fail(self, request: str, detail: str) -> InstrumentError:
        return InstrumentError(f"sim table at {self.address}: {request}: {detail}")

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def connect(self) -> None:
        """Connect and shake hands (done by the first request if not called)."""
        with self._lock:
            if self._transport is None:
                self._transport = self._open()

    def _open(self) -> TcpTransport:
        what = f"connect as {self.side}"
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as e:
            raise self._fail(what, f"cannot connect: {e.strerror or e} (is `qkdctl "
                                   "sim-table` running there?)") from None
        transport = TcpTransport(sock, timeout=self.timeout_s)
        try:
            sock.sendall(MAGIC)
            got = b""
            while len(got) < len(MAGIC):
                chunk = sock.recv(len(MAGIC) - len(got))
                if not chunk:
                    break
                got += chunk
            if got != MAGIC:
                raise self._fail(what, f"not a qkdctl sim table (it answered {got!r})")
            transport.send_bytes(wire.encode(Hello(self.side, PROTOCOL_VERSION, self.digest)))
            reply = wire.decode(transport.recv_bytes())
        except TimeoutError:
            transport.close()
            raise self._fail(what, f"no answer within {self.timeout_s} s (not a qkdctl "
                                   "sim table?)") from None
        except (OSError, TransportError, WireError) as e:
            transport.close()
            raise self._fail(what, str(e)) from None
        except InstrumentError:
            transport.close()
            raise
        if isinstance(reply, Error):
            transport.close()
            raise self._fail(what, f"refused: {reply.message}")
        if not isinstance(reply, Welcome) or reply.side != self.side:
            transport.close()
            raise self._fail(what, f"unexpected answer {describe(reply)}")
        log.debug("sim table %s: connected as %s", self.address, self.side)
        return transport

    def close(self) -> None:
        """Close the connection (a later request opens a new one). Idempotent."""
        with self._lock:
            transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
            log.debug("sim table %s: %s disconnected", self.address, self.side)

    def _attach(self) -> None:
        """An instrument on this table connected (see :meth:`_detach`)."""
        with self._lock:
            self._users += 1

    def _detach(self) -> None:
        """An instrument closed; the connection closes with the last one."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                self.close()

    def request(self, msg: Any, expect: type | None = None) -> Any:
        """Send one request, return the reply; :class:`InstrumentError` on any failure.

        ``expect``: the reply type wanted (an :class:`~qkdctl.sim.server.Error`
        reply, or any other type, raises).
        """
        what = describe(msg)
        try:
            data = wire.encode(msg)
        except WireError as e:
            raise self._fail(what, f"cannot encode the request: {e}") from None
        with self._lock:
            if self._transport is None:
                self._transport = self._open()
            transport = self._transport
            try:
                transport.send_bytes(data)
                reply = wire.decode(transport.recv_bytes())
            except (TransportError, WireError) as e:
                self._transport = None
                transport.close()
                raise self._fail(what, str(e)) from None
        if isinstance(reply, Error):
            raise self._fail(what, reply.message)
        if expect is not None and not isinstance(reply, expect):
            raise self._fail(what, f"unexpected reply {describe(reply)}")
        return reply

    # -- the OpticalTable surface -----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # only called for names not found the ordinary way
        if name.startswith("_") or name not in READABLE.get(self.__dict__.get("side"), ()):
            raise AttributeError(f"{type(self).__name__} ({self.__dict__.get('side')}'s side) "
                                 f"has no attribute {name!r}")
        value = self.request(Get(name), Value).value
        return value

    def set(self, **changes: Any) -> None:
        """Change table attributes, like :meth:`OpticalTable.set` (one version bump)."""
        self.request(Set(tuple(changes.items())), Ok)

    @property
    def detectors(self) -> list[DetectorState]:
        """Copies of Bob's detectors' states (writing to them changes nothing)."""
        if self.side != "bob":
            raise AttributeError(f"{type(self).__name__} ({self.side}'s side) has no "
                                 "attribute 'detectors'")
        reply = self.request(GetDetectors(), Detectors)
        return [DetectorState(**dict(zip(reply.fields, row, strict=True)))
                for row in reply.rows]

    def set_detector(self, channel: int, **changes: Any) -> None:
        """Change one detector, like :meth:`OpticalTable.set_detector` (one version bump)."""
        self.request(SetDetector(int(channel), tuple(changes.items())), Ok)

    def load_sequence(self, seq: AliceSequence) -> bool:
        """Load Alice's sequence (written only if it differs); True if it was written."""
        return bool(self.request(LoadSequence.of(seq), Ok).changed)


class RemoteTagGenerator:
    """The sim table's tag generator seen from Bob's host: the surface of
    :class:`~qkdctl.sim.engine.TagGenerator` that :class:`MockTimeTagger` uses.

    A ``generate(n)`` of more than :data:`~qkdctl.sim.server.MAX_GENERATE_PULSES`
    pulses is cut into several requests; the tags do not depend on the cut (the
    generator's own guarantee), unless another client changes the table in
    between, which then takes effect from that pulse as it would on hardware.
    """

    def __init__(self, table: RemoteTable, max_pulses: int = MAX_GENERATE_PULSES):
        if table.side != "bob":
            raise ValueError("the tag generator is on Bob's side")
        self.table = table
        self.max_pulses = max(1, min(int(max_pulses), MAX_GENERATE_PULSES))

    @property
    def pulses_simulated(self) -> int:
        return int(self.table.pulses_simulated)

    def generate(self, n_pulses: int) -> tuple[np.ndarray, np.ndarray]:
        n = int(n_pulses)
        parts_t, parts_c = [], []
        for _ in range(max(1, math.ceil(n / self.max_pulses))):
            k = min(n, self.max_pulses)
            tags = self.table.request(Generate(k), Tags)
            parts_t.append(tags.timestamps)
            parts_c.append(tags.channels)
            n -= k
        return _joined(parts_t, parts_c)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        tags = self.table.request(Finish(), Tags)
        return _joined([tags.timestamps], [tags.channels])


def _joined(ts: list[np.ndarray], ch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    t = np.concatenate(ts) if len(ts) > 1 else ts[0]
    c = np.concatenate(ch) if len(ch) > 1 else ch[0]
    return (np.ascontiguousarray(t, np.int64), np.ascontiguousarray(c, np.uint8))

