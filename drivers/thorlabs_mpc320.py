"""Thorlabs MPC320 motorized fiber polarization controller (three paddles), APT protocol.

The MPC320 is a USB device with an FTDI serial port (115200 baud, 8N1,
RTS/CTS flow control) speaking Thorlabs' binary APT protocol ("Thorlabs APT
Controllers Host-Controller Communications Protocol"). Every message starts
with a 6-byte header:

- header only: message id (u16, little-endian), param1 (u8), param2 (u8),
  destination (u8), source (u8);
- with data: message id (u16 LE), data length (u16 LE), destination | 0x80,
  source, then that many bytes of data (little-endian fields).

The host is 0x01, the controller (a single USB device) 0x50. The paddles are
channels 1, 2, 3, addressed by the bits 0x01, 0x02, 0x04 of the channel field.
The messages used here:

==========================  ======  ================================================
message                     id      use
==========================  ======  ================================================
HW_REQ_INFO / HW_GET_INFO   0x0005  identity; GET_INFO (0x0006) carries 84 bytes:
                                    serial (u32), model (8 chars), type (u16),
                                    firmware (minor, interim, major, 0), 60 bytes,
                                    hardware version, modification state, channels
HW_STOP_UPDATEMSGS          0x0012  no unsolicited status messages
HW_RESPONSE / RICHRESPONSE  0x0080  a fault reported by the controller (0x0081 carries
                                    the message id, a code and 64 characters of text)
MOD_SET_CHANENABLESTATE     0x0210  param1 = paddle bits to enable (0: all off),
                                    param2 = 0x01 (the MPC320 takes a bit mask)
MOT_MOVE_HOME / HOMED       0x0443  home a paddle; 0x0444 when done
MOT_MOVE_ABSOLUTE           0x0453  6 bytes: channel (u16), position (i32 counts)
MOT_MOVE_COMPLETED          0x0464  the move is done (header only on the MPC320)
MOT_MOVE_STOP / STOPPED     0x0465  param2 = 0x01 immediate, 0x02 profiled
MOT_REQ/GET_USTATUSUPDATE   0x0490  14 bytes: channel (u16), position (i32),
                                    velocity (u16), current (i16), status bits (u32)
POL_REQ/GET/SET_PARAMS      0x0531  12 bytes: 0 (u16), velocity (u16, 10-100 % of
                                    400 deg/s), home position, jog step 1, 2, 3 (u16)
==========================  ======  ================================================

A paddle travels 0 to 170 degrees; the encoder counts 1370 over that travel
(8.06 counts per degree).

Bench file::

    [instruments.polarization]
    driver = "thorlabs-mpc320"
    resource = "/dev/serial/by-id/usb-FTDI_APT_Polarization_Controller_38123456-if00-port0"
    settings = { angles_deg = [85.0, 40.0, 120.0], velocity_percent = 50 }
    limits = { min_angle_deg = 0.0, max_angle_deg = 170.0 }

Settings: ``angles_deg`` (three angles), ``velocity_percent`` (10 to 100),
``move_timeout_s`` (default 10 s). Limits: ``min_angle_deg``,
``max_angle_deg``; a move outside the paddle travel (0 to 170 deg) is refused
too, before anything is sent.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qkdctl.errors import InstrumentError, LimitError

from .base import STATIC, Identity, PolarizationController, _number
from .elliptec import NoReplyError, WaitingSerialLink, serial_resource_problem
from .transport import DEFAULT_TIMEOUT_S

__all__ = ["MPC320", "AptLink", "AptMessage", "pack_data", "pack_header"]

log = logging.getLogger(__name__)

BAUD_RATE = 115200
HOST = 0x01
CONTROLLER = 0x50

MGMSG_HW_REQ_INFO = 0x0005
MGMSG_HW_GET_INFO = 0x0006
MGMSG_HW_STOP_UPDATEMSGS = 0x0012
MGMSG_HW_RESPONSE = 0x0080
MGMSG_HW_RICHRESPONSE = 0x0081
MGMSG_MOD_SET_CHANENABLESTATE = 0x0210
MGMSG_MOT_MOVE_HOME = 0x0443
MGMSG_MOT_MOVE_HOMED = 0x0444
MGMSG_MOT_MOVE_ABSOLUTE = 0x0453
MGMSG_MOT_MOVE_COMPLETED = 0x0464
MGMSG_MOT_MOVE_STOP = 0x0465
MGMSG_MOT_MOVE_STOPPED = 0x0466
MGMSG_MOT_REQ_USTATUSUPDATE = 0x0490
MGMSG_MOT_GET_USTATUSUPDATE = 0x0491
MGMSG_POL_SET_PARAMS = 0x0530
MGMSG_POL_REQ_PARAMS = 0x0531
MGMSG_POL_GET_PARAMS = 0x0532

CHANNEL_ENABLED = 0x01
STOP_IMMEDIATE = 0x01

TRAVEL_DEG = 170.0
TRAVEL_COUNTS = 1370
COUNTS_PER_DEG = TRAVEL_COUNTS / TRAVEL_DEG
PADDLE_BITS = (0x01, 0x02, 0x04)

#: data lengths of the messages with data the driver reads
_DATA_LENGTHS = {MGMSG_HW_GET_INFO: 84, MGMSG_MOT_GET_USTATUSUPDATE: 14,
                 MGMSG_POL_GET_PARAMS: 12, MGMSG_HW_RICHRESPONSE: 68,
                 MGMSG_MOT_MOVE_COMPLETED: 14, MGMSG_MOT_MOVE_STOPPED: 14}
_MAX_DATA = 255

# status bits of GET_USTATUSUPDATE
MOTION_BITS = 0x10 | 0x20 | 0x40 | 0x80 | 0x200  # moving cw/ccw, jogging cw/ccw, homing
FAULT_BITS = {
    0x00004000: "position error",
    0x00008000: "instrument error",
    0x00020000: "over temperature",
    0x00040000: "bus voltage fault",
    0x00080000: "commutation error",
    0x01000000: "overload",
    0x02000000: "encoder fault",
    0x04000000: "over current",
    0x08000000: "bus current fault",
    0x40000000: "error",
}


def pack_header(message_id: int, param1: int = 0, param2: int = 0, *,
                dest: int = CONTROLLER, source: int = HOST) -> bytes:
    """A header-only message."""
    return struct.pack("<HBBBB", message_id, param1, param2, dest, source)


def pack_data(message_id: int, data: bytes, *, dest: int = CONTROLLER,
              source: int = HOST) -> bytes:
    """A message with data (the destination byte carries 0x80)."""
    return struct.pack("<HHBB", message_id, len(data), dest | 0x80, source) + data


@dataclass(frozen=True)
class AptMessage:
    """A message received from the controller."""

    message_id: int
    param1: int = 0
    param2: int = 0
    data: bytes = b""

    @property
    def channel(self) -> int:
        """The channel field: param1, or the first data word."""
        if len(self.data) >= 2:
            return struct.unpack_from("<H", self.data)[0]
        return self.param1


@dataclass(frozen=True)
class PaddleStatus:
    """A GET_USTATUSUPDATE: where a paddle is and what it is doing."""

    channel: int
    position: int
    velocity: int
    current_ma: int
    bits: int

    @classmethod
    def parse(cls, data: bytes) -> PaddleStatus:
        return cls(*struct.unpack("<HiHhI", data))

    @property
    def moving(self) -> bool:
        return bool(self.bits & MOTION_BITS)

    @property
    def faults(self) -> list[str]:
        return [name for bit, name in FAULT_BITS.items() if self.bits & bit]


class AptLink(WaitingSerialLink):
    """The MPC320's FTDI port: 115200 baud 8N1 with RTS/CTS flow control."""

    def __init__(self, name: str, resource: str, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(name, resource, baudrate=BAUD_RATE, timeout_s=timeout_s)

    def _do_open(self) -> None:
        super()._do_open()
        try:
            self._port.rtscts = True
        except Exception as e:  # a port without hardware handshake lines
            log.debug("%s: RTS/CTS not available on %s: %s", self.name, self.resource, e)


def _hex(raw: bytes) -> str:
    return raw[:24].hex(" ")


class MPC320(PolarizationController):
    """The three paddles of a Thorlabs MPC320, axes 0, 1, 2 (paddles 1, 2, 3).

    See the module documentation for the protocol and the bench file. A move
    enables the paddle's motor, sends MOVE_ABSOLUTE, waits for MOVE_COMPLETED
    (or, if none comes, polls the paddle's status until it stands at the
    target), checks the status for faults and the position reached, then
    disables the motors. Safe state: every paddle stopped, motors disabled.
    """

    SETTINGS = {**PolarizationController.SETTINGS,
                "velocity_percent": "set_velocity_percent", "move_timeout_s": STATIC}
    DEFAULT_MOVE_TIMEOUT_S = 10.0
    #: with no message from the controller for this long during a move, ask for the status
    POLL_S = 0.2
    #: how far (counts) a paddle may stop from its target
    POSITION_TOLERANCE = 2

    def __init__(self, name: str = "polarization", *, resource: str = "", backend: str = "",
                 timeout_s: float = DEFAULT_TIMEOUT_S, settings: Mapping[str, Any] | None = None,
                 limits: Mapping[str, Any] | None = None, config_key: str | None = None,
                 link: AptLink | None = None):
        super().__init__(name, settings=settings, limits=limits, config_key=config_key)
        if backend:
            self._config_fail("backend", f"{backend!r}: the MPC320 is a serial port opened "
                                         "with pyserial; leave backend empty")
        if link is None:
            problem = serial_resource_problem(resource)
            if problem:
                self._config_fail("resource", problem)
            link = AptLink(name, resource, timeout_s=timeout_s)
        self.link = link
        self.move_timeout_s = float(self.settings.get("move_timeout_s",
                                                      self.DEFAULT_MOVE_TIMEOUT_S))
        self.info: dict[str, Any] = {}

    # -- configuration ------------------------------------------------------------------
    def _check_setting(self, key: str, value: Any) -> str | None:
        if key == "velocity_percent":
            v = _number(value)
            if v is None or not 10 <= v <= 100:
                return f"{value!r}: expected a velocity from 10 to 100 (% of 400 deg/s)"
            return None
        if key == "move_timeout_s":
            v = _number(value)
            if v is None or v <= 0:
                return f"expected a positive number of seconds, got {value!r}"
            return None
        problem = super()._check_setting(key, value)
        if problem is None and key == "angles_deg":
            if len(value) != 3:
                return f"{len(value)} angles for the 3 paddles"
            bad = [a for a in value if not 0.0 <= a <= TRAVEL_DEG]
            if bad:
                return f"{bad[0]:g} deg is outside the paddle travel 0 to {TRAVEL_DEG:g} deg"
        return problem

    def configure(self, settings: Mapping[str, Any]) -> None:
        # the velocity first, so that the configured moves run at it
        order = sorted(settings, key=lambda k: k != "velocity_percent")
        super().configure({k: settings[k] for k in order})

    def _check_angle(self, axis: int, angle_deg: Any, command: str) -> float:
        v = super()._check_angle(axis, angle_deg, command)
        if not 0.0 <= v <= TRAVEL_DEG:
            raise LimitError(f"{self.name}: {command}: {v:g} deg is outside the paddle travel "
                             f"0 to {TRAVEL_DEG:g} deg")
        return v

    # -- messages -----------------------------------------------------------------------
    def _send(self, raw: bytes, label: str) -> None:
        self.link.write_bytes(raw, command=label)

    def _read_message(self, label: str) -> AptMessage:
        header = self.link.read_exact(6, command=label)
        mid, p1, p2, dest, source = struct.unpack("<HBBBB", header)
        if dest & 0x80:
            (length,) = struct.unpack_from("<H", header, 2)
            if (dest & 0x7F) != HOST or source != CONTROLLER or not 0 < length <= _MAX_DATA \
                    or _DATA_LENGTHS.get(mid, length) != length:
                self.link.flush_input()
                raise self.link.fail(label, f"garbled reply {_hex(header)}")
            data = self.link.read_exact(length, command=label)
            return AptMessage(mid, data=data)
        if dest != HOST or source != CONTROLLER or (mid in _DATA_LENGTHS and mid not in (
                MGMSG_MOT_MOVE_COMPLETED, MGMSG_MOT_MOVE_STOPPED)):
            self.link.flush_input()
            raise self.link.fail(label, f"garbled reply {_hex(header)}")
        return AptMessage(mid, p1, p2)

    def _fault(self, msg: AptMessage, label: str) -> InstrumentError:
        if msg.message_id == MGMSG_HW_RICHRESPONSE:
            ident, code = struct.unpack_from("<HH", msg.data)
            notes = msg.data[4:].split(b"\0", 1)[0].decode("latin-1").strip()
            return self.link.fail(label, f"controller fault {code} on message 0x{ident:04X}: "
                                         f"{notes or 'no description'}")
        return self.link.fail(label, f"controller fault (HW_RESPONSE {msg.param1}, "
                                     f"{msg.param2})")

    def _wait_for(self, label: str, match: Callable[[AptMessage], bool], *,
                  wait_s: float | None = None, poll: Callable[[], None] | None = None,
                  what: str = "a reply") -> AptMessage:
        """Read messages until ``match`` accepts one; faults are raised, others skipped.

        The wait lasts up to ``wait_s`` (default: the link's timeout). With ``poll``,
        ``poll()`` is called whenever nothing arrives for ``POLL_S``.
        """
        if wait_s is None:
            wait_s = self.link.timeout_s
            expired = f"no reply within {wait_s:g} s"
        else:
            expired = f"{what} did not come within {wait_s:g} s (move_timeout_s)"
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoReplyError(str(self.link.fail(label, expired)))
            try:
                with self.link.waiting(min(left, self.POLL_S) if poll else left,
                                       command=label):
                    msg = self._read_message(label)
            except NoReplyError:
                if poll is None:
                    raise NoReplyError(str(self.link.fail(label, expired))) from None
                poll()
                continue
            if msg.message_id in (MGMSG_HW_RESPONSE, MGMSG_HW_RICHRESPONSE):
                raise self._fault(msg, label)
            if match(msg):
                return msg
            log.debug("%s: %s: skipped message 0x%04X", self.name, label, msg.message_id)

    def _request(self, raw: bytes, reply_id: int, label: str, *,
                 channel: int | None = None) -> AptMessage:
        self.link.flush_input()
        self._send(raw, label)
        return self._wait_for(label, lambda m: m.message_id == reply_id and (
            channel is None or m.channel == channel))

    def _paddle_status(self, axis: int) -> PaddleStatus:
        bit = PADDLE_BITS[axis]
        msg = self._request(pack_header(MGMSG_MOT_REQ_USTATUSUPDATE, bit),
                            MGMSG_MOT_GET_USTATUSUPDATE,
                            f"MOT_REQ_USTATUSUPDATE (paddle {axis + 1})", channel=bit)
        return PaddleStatus.parse(msg.data)

    def _enable(self, bits: int, label: str) -> None:
        self._send(pack_header(MGMSG_MOD_SET_CHANENABLESTATE, bits, CHANNEL_ENABLED), label)

    # -- lifecycle ----------------------------------------------------------------------
    def _open(self) -> None:
        self.link.open()
        try:
            self.link.flush_input()
            self._send(pack_header(MGMSG_HW_STOP_UPDATEMSGS), "HW_STOP_UPDATEMSGS")
            self.info = self._read_info()
        except BaseException:
            self.link.close()
            raise

    def _read_info(self) -> dict[str, Any]:
        msg = self._request(pack_header(MGMSG_HW_REQ_INFO), MGMSG_HW_GET_INFO, "HW_REQ_INFO")
        serial, model, hw_type, fw_minor, fw_interim, fw_major, _ = struct.unpack_from(
            "<I8sHBBBB", msg.data)
        hw_version, mod_state, channels = struct.unpack_from("<HHH", msg.data, 78)
        info = {"serial": str(serial), "model": model.split(b"\0", 1)[0].decode("latin-1"),
                "type": hw_type, "firmware": f"{fw_major}.{fw_interim}.{fw_minor}",
                "hardware_version": hw_version, "modification_state": mod_state,
                "channels": channels}
        if not info["model"].startswith("MPC320"):
            log.warning("%s: the controller reports model %r, not MPC320", self.name,
                        info["model"])
        return info

    def _close(self) -> None:
        self.link.close()

    def reconnect(self) -> None:
        """Reopen the port after the controller vanished and read its info again."""
        self.link.reconnect()
        self._send(pack_header(MGMSG_HW_STOP_UPDATEMSGS), "HW_STOP_UPDATEMSGS")
        self.info = self._read_info()

    def _identity(self) -> Identity:
        return Identity(make="Thorlabs", model=self.info.get("model", "MPC320"),
                        serial=self.info.get("serial", ""),
                        firmware=self.info.get("firmware", ""))

    def _status(self) -> dict[str, Any]:
        paddles = []
        for axis in range(3):
            st = self._paddle_status(axis)
            paddles.append({"axis": axis, "paddle": axis + 1,
                            "angle_deg": st.position / COUNTS_PER_DEG, "moving": st.moving,
                            "faults": st.faults, "status_bits": st.bits})
        return {"paddles": paddles, "velocity_percent": self.velocity_percent()}

    # -- parameters ---------------------------------------------------------------------
    def _pol_params(self) -> list[int]:
        msg = self._request(pack_header(MGMSG_POL_REQ_PARAMS), MGMSG_POL_GET_PARAMS,
                            "POL_REQ_PARAMS")
        return list(struct.unpack("<6H", msg.data))

    def velocity_percent(self) -> int:
        """The paddle velocity, in % of 400 deg/s."""
        self._require("velocity_percent")
        return self._pol_params()[1]

    def set_velocity_percent(self, velocity_percent: float) -> None:
        """Set the paddle velocity (10 to 100 % of 400 deg/s, applies to all paddles)."""
        v = _number(velocity_percent)
        if v is None or not 10 <= v <= 100:
            raise LimitError(f"{self.name}: set_velocity_percent({velocity_percent!r}): "
                             "expected 10 to 100")
        self._require("set_velocity_percent")
        params = self._pol_params()
        params[1] = round(v)
        self._send(pack_data(MGMSG_POL_SET_PARAMS, struct.pack("<6H", *params)),
                   "POL_SET_PARAMS")
        log.info("%s: velocity %d %%", self.name, params[1])

    # -- motion -------------------------------------------------------------------------
    def _axes(self) -> int:
        return 3

    def _set_angle_deg(self, axis: int, angle_deg: float) -> None:
        bit = PADDLE_BITS[axis]
        target = round(angle_deg * COUNTS_PER_DEG)
        label = f"MOT_MOVE_ABSOLUTE (paddle {axis + 1}, {target} counts)"
        status_req = pack_header(MGMSG_MOT_REQ_USTATUSUPDATE, bit)

        def done(msg: AptMessage) -> bool:
            if msg.message_id == MGMSG_MOT_MOVE_COMPLETED:
                return msg.channel == bit
            if msg.message_id == MGMSG_MOT_GET_USTATUSUPDATE and msg.channel == bit:
                st = PaddleStatus.parse(msg.data)
                if st.faults:
                    raise self.link.fail(label, f"paddle {axis + 1} reports "
                                                f"{', '.join(st.faults)}")
                return not st.moving and abs(st.position - target) <= self.POSITION_TOLERANCE
            return False

        self.link.flush_input()
        self._enable(bit, label)
        try:
            self._send(pack_data(MGMSG_MOT_MOVE_ABSOLUTE, struct.pack("<Hi", bit, target)),
                       label)
            self._wait_for(label, done, wait_s=self.move_timeout_s,
                           poll=lambda: self._send(status_req, label),
                           what="the end of the move")
            st = self._paddle_status(axis)
        finally:
            self._disable_quietly(label)
        if st.faults:
            raise self.link.fail(label, f"paddle {axis + 1} reports {', '.join(st.faults)}")
        if abs(st.position - target) > self.POSITION_TOLERANCE:
            raise self.link.fail(label, f"paddle {axis + 1} stopped at "
                                        f"{st.position / COUNTS_PER_DEG:.2f} deg "
                                        f"({st.position} counts), not at {angle_deg:g} deg")

    def _disable_quietly(self, label: str) -> None:
        try:
            self._enable(0, label)
        except InstrumentError as e:  # the error that ended the move is the one to report
            log.warning("%s: could not disable the paddle motors: %s", self.name, e)

    def _get_angle_deg(self, axis: int) -> float:
        return self._paddle_status(axis).position / COUNTS_PER_DEG

    def _home(self) -> None:
        for axis, bit in enumerate(PADDLE_BITS):
            label = f"MOT_MOVE_HOME (paddle {axis + 1})"
            self.link.flush_input()
            self._enable(bit, label)
            try:
                self._send(pack_header(MGMSG_MOT_MOVE_HOME, bit), label)
                self._wait_for(label, lambda m, b=bit: m.message_id == MGMSG_MOT_MOVE_HOMED
                               and m.channel == b, wait_s=self.move_timeout_s,
                               what="MOT_MOVE_HOMED")
            finally:
                self._disable_quietly(label)

    def _stop(self) -> None:
        for axis, bit in enumerate(PADDLE_BITS):
            self._send(pack_header(MGMSG_MOT_MOVE_STOP, bit, STOP_IMMEDIATE),
                       f"MOT_MOVE_STOP (paddle {axis + 1})")
        self._enable(0, "MOD_SET_CHANENABLESTATE (all off)")
        # MOVE_STOPPED replies are not waited for: moves are waited for, so nothing moves
        time.sleep(0.05)
        self.link.flush_input()
