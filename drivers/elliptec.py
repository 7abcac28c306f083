"""Thorlabs Elliptec ELL14 rotation mounts (waveplates) sharing one serial bus.

The ELLx modules speak a short ASCII protocol over a half-duplex bus (9600
baud, 8 data bits, no parity, 1 stop bit, no flow control). Up to 16 modules
share one port, each answering to its address, a hex digit ``0``-``F``.

A host command is ``<address><command>[data]`` -- two lower-case letters,
data as upper-case hex -- and is **not** terminated; a module counts the
characters of the command it knows. Every reply is ``<address><REPLY>[data]``
with upper-case letters, terminated by CR LF. The commands used here:

========  ===============================  ============================================
command   host sends                       module answers
========  ===============================  ============================================
``in``    ``0in``                          ``0IN`` + 30 characters: type (2 hex),
                                           serial (8), year (4), firmware (2 hex),
                                           hardware (2 hex), travel (4 hex, degrees on
                                           a rotation mount), pulses over that travel
                                           (8 hex)
``gs``    ``0gs``                          ``0GS`` + status (2 hex), see
                                           :data:`STATUS_CODES`
``gp``    ``0gp``                          ``0PO`` + position (8 hex, 32-bit two's
                                           complement encoder counts)
``ma``    ``0ma`` + position (8 hex)       ``0PO`` + position once the move is done,
                                           or ``0GS`` + an error status
``ho``    ``0ho0`` (clockwise) / ``0ho1``  ``0PO`` + position once homed
``st``    ``0st``                          ``0GS`` + status (on modules without the
                                           command: "not supported", or nothing)
========  ===============================  ============================================

Positions are encoder counts. The conversion to degrees is read from each
module's own ``IN`` reply: on a rotation mount the "pulses" field counts a
full turn (143360 on an ELL14, i.e. 398.2 counts per degree), so counts per
degree = pulses / travel.

The bench file names the mounts by address, one axis each, in order::

    [instruments.polarization]
    driver = "thorlabs-ell14"
    resource = "/dev/serial/by-id/usb-FTDI_FT230X_Basic_UART_D30ABCDE-if00-port0"
    settings = { addresses = ["0", "1", "2"], angles_deg = [0.0, 22.5, 45.0] }
    limits = { min_angle_deg = -360.0, max_angle_deg = 360.0 }

Settings: ``addresses`` (list of hex digits, default ``["0"]``; axis *i* is
``addresses[i]``), ``angles_deg`` (applied when connecting), ``home_direction``
(``"cw"`` or ``"ccw"``, default ``"cw"``), ``move_timeout_s`` (how long a move
or a homing may take, default 10 s). Limits: ``min_angle_deg``,
``max_angle_deg`` (checked before anything is sent; a move is also refused
beyond the travel the mount reports).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from qkdctl.errors import InstrumentError, LimitError

from .base import STATIC, Identity, PolarizationController, _number
from .transport import DEFAULT_TIMEOUT_S, SerialLink, link_kind

__all__ = [
    "ELL14",
    "STATUS_CODES",
    "ElliptecBus",
    "MountInfo",
    "NoReplyError",
    "WaitingSerialLink",
    "parse_info",
]

log = logging.getLogger(__name__)

try:
    import termios
    _TTY_ERRORS: tuple[type[Exception], ...] = (termios.error,)
except ImportError:  # pragma: no cover - not a POSIX system
    _TTY_ERRORS = ()

BAUD_RATE = 9600
REPLY_END = b"\r\n"

STATUS_CODES: dict[int, str] = {
    0: "ok",
    1: "communication time out",
    2: "mechanical time out",
    3: "command error or not supported",
    4: "value out of range",
    5: "module isolated",
    6: "module out of isolation",
    7: "initializing error",
    8: "thermal error",
    9: "busy",
    10: "sensor error",
    11: "motor error",
    12: "out of range",
    13: "over current error",
    14: "general error",
}
"""``GS`` status codes of the ELLx modules (15-255 are reserved)."""

STATUS_OK = 0
STATUS_NOT_SUPPORTED = 3
STATUS_BUSY = 9

#: data length of each reply the driver reads
_REPLY_DATA = {"IN": 30, "GS": 2, "PO": 8}
_REPLY = re.compile(r"([0-9A-F])([A-Z]{2})([0-9A-F]*)")
_HOME_DIRECTIONS = {"cw": "0", "ccw": "1"}


def status_name(code: int) -> str:
    """The name of a ``GS`` status code."""
    return STATUS_CODES.get(code, "reserved status")


def to_hex32(counts: int) -> str:
    """Encoder counts as the 8 hex digits of a 32-bit two's complement number."""
    return f"{counts & 0xFFFFFFFF:08X}"


def from_hex32(text: str) -> int:
    """8 hex digits (32-bit two's complement) as a signed integer."""
    v = int(text, 16)
    return v - (1 << 32) if v & 0x80000000 else v


@dataclass(frozen=True)
class MountInfo:
    """What a module says about itself in its ``IN`` reply."""

    address: str
    device_type: int
    serial: str
    year: str
    firmware: str
    hardware: str
    travel: int
    pulses: int

    @property
    def counts_per_deg(self) -> float:
        """Encoder counts per degree (pulses over the travel / the travel)."""
        return self.pulses / self.travel


def parse_info(address: str, data: str) -> MountInfo:
    """The 30 data characters of an ``IN`` reply; ValueError if they make no sense."""
    if len(data) != _REPLY_DATA["IN"]:
        raise ValueError(f"{len(data)} data characters, expected 30")
    info = MountInfo(address=address, device_type=int(data[0:2], 16), serial=data[2:10],
                     year=data[10:14], firmware=data[14:16], hardware=data[16:18],
                     travel=int(data[18:22], 16), pulses=int(data[22:30], 16))
    if info.travel <= 0 or info.pulses <= 0:
        raise ValueError(f"travel {info.travel} and pulses {info.pulses} must be positive")
    return info


class NoReplyError(InstrumentError):
    """The device did not answer within the time allowed."""


class WaitingSerialLink(SerialLink):
    """A pyserial link for devices that answer late (moves): a timeout raises
    :class:`NoReplyError`, :meth:`waiting` lengthens the read timeout for a block,
    and a device that vanished (termios errors) is reported as a lost link."""

    def _timeout(self, command: str) -> InstrumentError:
        return NoReplyError(str(super()._timeout(command)))

    @contextlib.contextmanager
    def waiting(self, seconds: float, *, command: str = "read") -> Iterator[None]:
        """Reads inside the block wait up to ``seconds`` (not ``timeout_s``)."""
        import serial

        with self._lock:
            self._require(command)
            port = self._port
            old = port.timeout
            try:
                port.timeout = seconds
            except (serial.SerialException, OSError, *_TTY_ERRORS) as e:
                raise self.fail(command, f"link lost: {e}") from None
            try:
                yield
            finally:
                if self._port is port:
                    with contextlib.suppress(Exception):
                        port.timeout = old

    # A serial device that vanished (USB adapter unplugged, terminal hung up) makes
    # termios raise termios.error, which is not an OSError: report it as a lost link.
    def flush_input(self) -> None:
        with contextlib.suppress(*_TTY_ERRORS):
            super().flush_input()

    def write_bytes(self, data: bytes, *, command: str = "write") -> None:
        try:
            super().write_bytes(data, command=command)
        except _TTY_ERRORS as e:
            raise self.fail(command, f"link lost: {e}") from None

    def read_exact(self, n: int, *, command: str = "read") -> bytes:
        try:
            return super().read_exact(n, command=command)
        except _TTY_ERRORS as e:
            raise self.fail(command, f"link lost: {e}") from None

    def read_until(self, terminator: bytes, *, command: str = "read",
                   max_bytes: int = 1 << 20) -> bytes:
        try:
            return super().read_until(terminator, command=command, max_bytes=max_bytes)
        except _TTY_ERRORS as e:
            raise self.fail(command, f"link lost: {e}") from None


class ElliptecBus(WaitingSerialLink):
    """The serial port of an Elliptec bus: 9600 baud 8N1, commands unterminated,
    replies ending in CR LF."""

    def __init__(self, name: str, resource: str, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(name, resource, baudrate=BAUD_RATE, timeout_s=timeout_s,
                         write_termination="", read_termination="\r\n")


def serial_resource_problem(resource: str) -> str | None:
    """What is wrong with ``resource`` as a pyserial port, or None."""
    if resource and link_kind(resource) != "serial" and not resource.startswith("/"):
        return f"{resource!r}: expected a serial port (/dev/ttyUSB0, COM3, socket://host:port)"
    return None


def _address(value: Any) -> str | None:
    """A bus address (hex digit or 0..15) as one upper-case hex digit, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 <= value <= 15:
        return f"{value:X}"
    if isinstance(value, str) and len(value) == 1 and value.upper() in "0123456789ABCDEF":
        return value.upper()
    return None


class ELL14(PolarizationController):
    """Waveplates on Thorlabs ELL14 rotation mounts, one axis per bus address.

    See the module documentation for the protocol and the bench file. Every
    move waits until the mount reports its new position. Safe state: ``st``
    to every mount (motion stopped; a mount that cannot stop is idle anyway,
    since moves return only once they are done).
    """

    SETTINGS = {**PolarizationController.SETTINGS, "addresses": STATIC,
                "home_direction": STATIC, "move_timeout_s": STATIC}
    DEFAULT_MOVE_TIMEOUT_S = 10.0
    #: pause before a move command (a module may mis-read a move sent right after a reply)
    MOVE_GAP_S = 0.1
    #: stray replies (from another address) skipped while waiting for an answer
    MAX_STRAY_REPLIES = 4

    def __init__(self, name: str = "polarization", *, resource: str = "", backend: str = "",
                 timeout_s: float = DEFAULT_TIMEOUT_S, settings: Mapping[str, Any] | None = None,
                 limits: Mapping[str, Any] | None = None, config_key: str | None = None,
                 link: ElliptecBus | None = None):
        super().__init__(name, settings=settings, limits=limits, config_key=config_key)
        if backend:
            self._config_fail("backend", f"{backend!r}: the Elliptec bus is a serial port "
                                         "opened with pyserial; leave backend empty")
        if link is None:
            problem = serial_resource_problem(resource)
            if problem:
                self._config_fail("resource", problem)
            link = ElliptecBus(name, resource, timeout_s=timeout_s)
        self.link = link
        self.addresses: tuple[str, ...] = tuple(
            _address(a) for a in self.settings.get("addresses", ["0"]))
        self.home_direction = str(self.settings.get("home_direction", "cw")).lower()
        self.move_timeout_s = float(self.settings.get("move_timeout_s",
                                                      self.DEFAULT_MOVE_TIMEOUT_S))
        self.mounts: dict[str, MountInfo] = {}

    # -- configuration ------------------------------------------------------------------
    def _check_setting(self, key: str, value: Any) -> str | None:
        if key == "addresses":
            if not isinstance(value, list | tuple) or not value:
                return f"expected a list of bus addresses ('0' to 'F'), got {value!r}"
            addrs = [_address(a) for a in value]
            if None in addrs:
                bad = value[addrs.index(None)]
                return f"{bad!r} is not a bus address ('0' to 'F')"
            if len(set(addrs)) != len(addrs):
                return f"{list(value)!r}: an address is listed twice"
            return None
        if key == "home_direction":
            if str(value).lower() not in _HOME_DIRECTIONS:
                return f"{value!r}: expected 'cw' or 'ccw'"
            return None
        if key == "move_timeout_s":
            v = _number(value)
            if v is None or v <= 0:
                return f"expected a positive number of seconds, got {value!r}"
            return None
        problem = super()._check_setting(key, value)
        if problem is None and key == "angles_deg":
            n = len(self.settings.get("addresses", ["0"]))
            if len(value) != n:
                return f"{len(value)} angles for {n} mounts (settings.addresses)"
        return problem

    def _check_angle(self, axis: int, angle_deg: Any, command: str) -> float:
        v = super()._check_angle(axis, angle_deg, command)
        info = self.mounts.get(self.addresses[int(axis)])
        if info is not None and abs(v) > info.travel:
            raise LimitError(f"{self.name}: {command}: {v:g} deg is beyond the travel of the "
                             f"mount at address {info.address} (+-{info.travel} deg)")
        return v

    # -- protocol -----------------------------------------------------------------------
    def _label(self, command: str) -> str:
        return f"{command!r}"

    def _read_reply(self, address: str, label: str) -> tuple[str, str]:
        """The next reply from ``address``: (reply code, data)."""
        for _ in range(self.MAX_STRAY_REPLIES + 1):
            raw = self.link.read_until(REPLY_END, command=label)
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                text = None
            m = _REPLY.fullmatch(text) if text is not None else None
            if m is None or _REPLY_DATA.get(m.group(2), len(m.group(3))) != len(m.group(3)):
                self.link.flush_input()
                raise self.link.fail(label, f"garbled reply {raw[:40]!r}")
            addr, code, data = m.groups()
            if addr == address:
                return code, data
            log.warning("%s: %s: skipped a reply from address %s: %r", self.name, label, addr,
                        raw)
        raise self.link.fail(label, f"no reply from address {address} (only from others)")

    def _status_error(self, address: str, label: str, code: int) -> InstrumentError:
        err = self.link.fail(label, f"mount at address {address} reports status {code} "
                                    f"({status_name(code)})")
        # a module repeats a fault status until it is read: read it once to clear it
        with contextlib.suppress(InstrumentError):
            self._transact(address, "gs", expect=("GS",), clear=False)
        return err

    def _transact(self, address: str, cmd: str, data: str = "", *, expect: tuple[str, ...],
                  wait_s: float | None = None, clear: bool = True) -> tuple[str, str]:
        """Send ``<address><cmd><data>``; return the first expected reply (code, data).

        A ``GS`` reply that was not asked for is the module's error status (busy
        is waited out while ``wait_s`` allows). ``wait_s`` lengthens the wait for
        replies (moves).
        """
        command = f"{address}{cmd}{data}"
        label = self._label(command)
        self.link.flush_input()
        self.link.write_bytes(command.encode("ascii"), command=label)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            if deadline is None:
                code, reply = self._read_reply(address, label)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoReplyError(str(self.link.fail(
                        label, f"not done within {wait_s:g} s (move_timeout_s)")))
                with self.link.waiting(left, command=label):
                    try:
                        code, reply = self._read_reply(address, label)
                    except NoReplyError:
                        raise NoReplyError(str(self.link.fail(
                            label, f"not done within {wait_s:g} s (move_timeout_s)"))) from None
            if code == "GS":
                status = int(reply, 16)
                if expect == ("GS",) or (status == STATUS_OK and "GS" in expect):
                    return code, reply
                if status == STATUS_BUSY and wait_s is not None:
                    continue  # still moving
                if clear:
                    raise self._status_error(address, label, status)
                raise self.link.fail(label, f"mount at address {address} reports status "
                                            f"{status} ({status_name(status)})")
            if code in expect:
                return code, reply
            self.link.flush_input()
            raise self.link.fail(label, f"unexpected reply {code}{reply} "
                                        f"(expected {' or '.join(expect)})")

    # -- lifecycle ----------------------------------------------------------------------
    def _open(self) -> None:
        self.link.open()
        try:
            self._read_mounts()
        except BaseException:
            self.link.close()
            raise

    def _read_mounts(self) -> None:
        mounts = {}
        for a in self.addresses:
            _, data = self._transact(a, "in", expect=("IN",))
            try:
                mounts[a] = parse_info(a, data)
            except ValueError as e:
                raise self.link.fail(self._label(f"{a}in"),
                                     f"garbled info reply {data!r}: {e}") from None
            info = mounts[a]
            if info.device_type != 14:
                log.warning("%s: the module at address %s is an ELL%d, not an ELL14", self.name,
                            a, info.device_type)
        self.mounts = mounts

    def _close(self) -> None:
        self.link.close()

    def reconnect(self) -> None:
        """Reopen the bus after the port vanished and read every mount's info again."""
        self.link.reconnect()
        self._read_mounts()

    def _identity(self) -> Identity:
        infos = [self.mounts[a] for a in self.addresses]
        models = sorted({f"ELL{i.device_type}" for i in infos})
        return Identity(make="Thorlabs", model=f"{'/'.join(models)} x{len(infos)}",
                        serial=",".join(i.serial for i in infos),
                        firmware=",".join(i.firmware for i in infos))

    def _status(self) -> dict[str, Any]:
        axes = []
        for i, a in enumerate(self.addresses):
            _, st = self._transact(a, "gs", expect=("GS",))
            code = int(st, 16)
            axes.append({"axis": i, "address": a, "serial": self.mounts[a].serial,
                         "angle_deg": self._get_angle_deg(i), "status_code": code,
                         "status": status_name(code)})
        return {"axes": axes}

    # -- motion -------------------------------------------------------------------------
    def _axes(self) -> int:
        return len(self.addresses)

    def _set_angle_deg(self, axis: int, angle_deg: float) -> None:
        a = self.addresses[axis]
        counts = round(angle_deg * self.mounts[a].counts_per_deg)
        if self.MOVE_GAP_S > 0:
            time.sleep(self.MOVE_GAP_S)
        code, data = self._transact(a, "ma", to_hex32(counts), expect=("PO", "GS"),
                                    wait_s=self.move_timeout_s)
        if code == "PO":
            reached = from_hex32(data) / self.mounts[a].counts_per_deg
            log.debug("%s: axis %d (address %s) at %.4f deg", self.name, axis, a, reached)

    def _get_angle_deg(self, axis: int) -> float:
        a = self.addresses[axis]
        _, data = self._transact(a, "gp", expect=("PO",))
        return from_hex32(data) / self.mounts[a].counts_per_deg

    def _home(self) -> None:
        direction = _HOME_DIRECTIONS[self.home_direction]
        for a in self.addresses:
            self._transact(a, "ho", direction, expect=("PO", "GS"), wait_s=self.move_timeout_s)

    def _stop(self) -> None:
        for a in self.addresses:
            try:
                _, st = self._transact(a, "st", expect=("GS",), clear=False)
            except NoReplyError as e:
                log.warning("%s: stop: %s (moves are waited for, so the mount is idle)",
                            self.name, e)
                continue
            code = int(st, 16)
            if code not in (STATUS_OK, STATUS_NOT_SUPPORTED, STATUS_BUSY):
                raise self._status_error(a, self._label(f"{a}st"), code)

