"""The MPC320 driver through pyserial against a simulated APT controller.

The simulated controller parses APT frames and answers them as an MPC320
does, at the device end of a pseudo-terminal; the driver opens the terminal
through a symlink, as it opens ``/dev/serial/by-id/...`` on a bench.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import threading
import time
import tty

import pytest

from qkdctl.drivers.base import PolarizationController
from qkdctl.drivers.thorlabs_mpc320 import (
    COUNTS_PER_DEG,
    MGMSG_HW_GET_INFO,
    MGMSG_HW_REQ_INFO,
    MGMSG_HW_RICHRESPONSE,
    MGMSG_HW_STOP_UPDATEMSGS,
    MGMSG_MOD_SET_CHANENABLESTATE,
    MGMSG_MOT_GET_USTATUSUPDATE,
    MGMSG_MOT_MOVE_ABSOLUTE,
    MGMSG_MOT_MOVE_COMPLETED,
    MGMSG_MOT_MOVE_HOME,
    MGMSG_MOT_MOVE_HOMED,
    MGMSG_MOT_MOVE_STOP,
    MGMSG_MOT_MOVE_STOPPED,
    MGMSG_MOT_REQ_USTATUSUPDATE,
    MGMSG_POL_GET_PARAMS,
    MGMSG_POL_REQ_PARAMS,
    MGMSG_POL_SET_PARAMS,
    MPC320,
    pack_data,
    pack_header,
)
from qkdctl.errors import ConfigError, InstrumentError, LimitError

HOST, DEV = 0x01, 0x50


def header(mid, p1=0, p2=0):
    """A header-only message from the controller to the host."""
    return struct.pack("<HBBBB", mid, p1, p2, HOST, DEV)


def with_data(mid, data):
    """A message with data from the controller to the host."""
    return struct.pack("<HHBB", mid, len(data), HOST | 0x80, DEV) + data


class PtyWire:
    """The device end of a pseudo-terminal, reached through the symlink ``path``."""

    def __init__(self, path):
        self.path = path
        self._open()

    def _open(self):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        tmp = self.path.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(self.slave))
        os.replace(tmp, self.path)

    @property
    def url(self) -> str:
        return str(self.path)

    def accept(self, stop) -> bool:
        return True

    def recv(self) -> bytes | None:
        try:
            ready, _, _ = select.select([self.master], [], [], 0.02)
            return os.read(self.master, 4096) if ready else None
        except (OSError, ValueError):
            return b""

    def send(self, data: bytes):
        os.write(self.master, data)

    def drop(self):
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def restore(self):
        self._open()


class SimMPC320:
    """A simulated MPC320: three paddles, APT framing, replies as the device sends them."""

    def __init__(self, wire):
        self.wire = wire
        self.received = bytearray()
        self.messages: list[tuple[int, bytes]] = []   # (message id, the whole frame)
        self.positions = [0, 0, 0]
        self.enabled = 0
        self.params = [0, 50, 0, 10, 10, 10]
        self.send_completed = True       # False: no MOVE_COMPLETED, only status on request
        self.fault_on_move: bytes | None = None   # a message sent instead of moving
        self.status_bits_extra = 0
        self.raw_reply: bytes | None = None
        self.silent = False
        self.vanish_on_move = False
        self._start()

    @property
    def url(self) -> str:
        return self.wire.url

    def ids(self) -> list[int]:
        return [m for m, _ in self.messages]

    def sync(self):
        """Wait until the controller has read everything the driver sent."""
        n = -1
        while n != len(self.received):
            n = len(self.received)
            time.sleep(0.05)

    def _start(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set() and self.wire.accept(self._stop):
            buf = bytearray()
            while not self._stop.is_set():
                chunk = self.wire.recv()
                if chunk is None:
                    continue
                if not chunk:
                    break
                self.received += chunk
                buf += chunk
                if not self._handle(buf):
                    self.wire.drop()
                    self._stop.set()
                    return

    def _handle(self, buf: bytearray) -> bool:
        while len(buf) >= 6:
            mid, length, dest, _ = struct.unpack_from("<HHBB", buf)
            n = 6 + (length if dest & 0x80 else 0)
            if len(buf) < n:
                return True
            frame = bytes(buf[:n])
            del buf[:n]
            self.messages.append((mid, frame))
            if self.silent:
                continue
            if self.raw_reply is not None and mid != MGMSG_MOD_SET_CHANENABLESTATE:
                raw, self.raw_reply = self.raw_reply, None
                self.wire.send(raw)
                continue
            reply = self._reply(mid, frame)
            if reply is None:
                return False
            if reply:
                self.wire.send(reply)
        return True

    def _status(self, bit: int) -> bytes:
        i = (1, 2, 4).index(bit)
        bits = 0x00000100 | (0x80000000 if self.enabled & bit else 0) | self.status_bits_extra
        return with_data(MGMSG_MOT_GET_USTATUSUPDATE,
                         struct.pack("<HiHhI", bit, self.positions[i], 0, 0, bits))

    def _reply(self, mid: int, frame: bytes):
        p1 = frame[2]
        if mid == MGMSG_HW_REQ_INFO:
            data = struct.pack("<I8sHBBBB", 38123456, b"MPC320\0\0", 44, 3, 0, 1, 0)
            data += bytes(60) + struct.pack("<HHH", 1, 0, 3)
            return with_data(MGMSG_HW_GET_INFO, data)
        if mid == MGMSG_HW_STOP_UPDATEMSGS:
            return b""
        if mid == MGMSG_MOD_SET_CHANENABLESTATE:
            self.enabled = p1
            return b""
        if mid == MGMSG_MOT_REQ_USTATUSUPDATE:
            return self._status(p1)
        if mid == MGMSG_MOT_MOVE_ABSOLUTE:
            if self.vanish_on_move:
                return None
            if self.fault_on_move is not None:
                return self.fault_on_move
            bit, pos = struct.unpack_from("<Hi", frame, 6)
            if not self.enabled & bit:
                return b""  # a disabled paddle does not move
            time.sleep(0.02)
            self.positions[(1, 2, 4).index(bit)] = pos
            return header(MGMSG_MOT_MOVE_COMPLETED, bit) if self.send_completed else b""
        if mid == MGMSG_MOT_MOVE_HOME:
            self.positions[(1, 2, 4).index(p1)] = self.params[2]
            return header(MGMSG_MOT_MOVE_HOMED, p1)
        if mid == MGMSG_MOT_MOVE_STOP:
            return header(MGMSG_MOT_MOVE_STOPPED, p1)
        if mid == MGMSG_POL_REQ_PARAMS:
            return with_data(MGMSG_POL_GET_PARAMS, struct.pack("<6H", *self.params))
        if mid == MGMSG_POL_SET_PARAMS:
            self.params = list(struct.unpack_from("<6H", frame, 6))
            return b""
        return b""

    def revive(self):
        self._thread.join(timeout=1)
        self.wire.restore()
        self._start()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=1)
        self.wire.drop()


@pytest.fixture
def dev(tmp_path):
    d = SimMPC320(PtyWire(tmp_path / "ttyMPC"))
    yield d
    d.close()


def make(dev, **settings):
    return MPC320("polarization", resource=dev.url, timeout_s=0.2, settings=settings,
                  limits={"min_angle_deg": 0.0, "max_angle_deg": 160.0},
                  config_key="bench.toml: instruments.polarization")


def test_message_framing():
    # header-only: id LE, param1, param2, destination, source
    assert pack_header(0x0005) == bytes.fromhex("05 00 00 00 50 01")
    assert pack_header(0x0210, 0x02, 0x01) == bytes.fromhex("10 02 02 01 50 01")
    # with data: id LE, length LE, destination | 0x80, source, data
    assert pack_data(0x0453, struct.pack("<Hi", 1, 685)) == \
        bytes.fromhex("53 04 06 00 d0 01 01 00 ad 02 00 00")
    assert COUNTS_PER_DEG == pytest.approx(1370 / 170)
    assert issubclass(MPC320, PolarizationController)


def test_config_is_checked_when_built(dev):
    with pytest.raises(ConfigError, match=r"polarization.settings.angles_deg: 2 angles"):
        make(dev, angles_deg=[1.0, 2.0])
    with pytest.raises(ConfigError, match="outside the paddle travel"):
        make(dev, angles_deg=[1.0, 2.0, 171.0])
    with pytest.raises(ConfigError, match="velocity_percent"):
        make(dev, velocity_percent=5)
    with pytest.raises(ConfigError, match="expected a serial port"):
        MPC320("polarization", resource="TCPIP0::10.0.0.2::inst0::INSTR")


def test_connect_identity_and_moves(dev):
    with make(dev) as pol:
        assert dev.received[:12] == pack_header(0x0012) + pack_header(0x0005)
        ident = pol.identity()
        assert (ident.make, ident.model, ident.serial, ident.firmware) == \
            ("Thorlabs", "MPC320", "38123456", "1.0.3")
        assert pol.axes == 3
        n = len(dev.received)
        pol.set_angle_deg(1, 85.0)
        dev.sync()
        target = round(85.0 * 1370 / 170)                   # 685 counts
        assert dev.positions == [0, target, 0]
        sent = bytes(dev.received[n:])
        assert sent.startswith(
            pack_header(0x0210, 0x02, 0x01)                  # enable paddle 2
            + bytes.fromhex("53 04 06 00 d0 01 02 00") + struct.pack("<i", target))
        assert sent.endswith(pack_header(0x0490, 0x02)       # status check after the move
                             + pack_header(0x0210, 0x00, 0x01))  # motors off
        assert dev.enabled == 0
        assert pol.angle_deg(1) == pytest.approx(target / COUNTS_PER_DEG)
        pol.set_angles_deg([10.0, 20.0, 30.0])
        assert dev.positions == [round(a * 1370 / 170) for a in (10, 20, 30)]
        st = pol.status()
        assert [p["faults"] for p in st["paddles"]] == [[], [], []]
        assert st["velocity_percent"] == 50
        pol.home()
        dev.sync()
        assert dev.positions == [0, 0, 0]
        assert dev.ids()[-3:] == [0x0210, 0x0443, 0x0210]
    # safe state: every paddle stopped, motors off
    stops = [f for m, f in dev.messages if m == MGMSG_MOT_MOVE_STOP]
    assert stops == [pack_header(0x0465, b, 0x01) for b in (1, 2, 4)]
    assert dev.messages[-1][1] == pack_header(0x0210, 0x00, 0x01)


def test_settings_velocity_first(dev):
    with make(dev, angles_deg=[5.0, 6.0, 7.0], velocity_percent=80):
        ids = dev.ids()
        assert ids.index(MGMSG_POL_SET_PARAMS) < ids.index(MGMSG_MOT_MOVE_ABSOLUTE)
        set_params = next(f for m, f in dev.messages if m == MGMSG_POL_SET_PARAMS)
        assert set_params == pack_data(0x0530, struct.pack("<6H", 0, 80, 0, 10, 10, 10))
        assert dev.params[1] == 80
        assert dev.positions == [round(a * 1370 / 170) for a in (5, 6, 7)]


def test_move_without_completion_message_is_polled(dev):
    dev.send_completed = False
    with make(dev) as pol:
        pol.set_angle_deg(0, 100.0)
        assert dev.positions[0] == round(100 * 1370 / 170)
        assert MGMSG_MOT_REQ_USTATUSUPDATE in dev.ids()


def test_limits_before_any_byte(dev):
    with make(dev) as pol:
        n = len(dev.received)
        with pytest.raises(LimitError, match="above the limit max_angle_deg = 160"):
            pol.set_angle_deg(0, 165.0)
        with pytest.raises(LimitError, match="below the limit min_angle_deg = 0"):
            pol.set_angles_deg([10.0, 10.0, -1.0])
        with pytest.raises(LimitError, match="velocity"):
            pol.set_velocity_percent(101)
        assert len(dev.received) == n
    pol = MPC320("polarization", resource=dev.url, timeout_s=0.2)  # no configured limits
    with pol, pytest.raises(LimitError, match="outside the paddle travel 0 to 170"):
        pol.set_angle_deg(2, 175.0)


def test_controller_fault_and_status_error(dev):
    with make(dev) as pol:
        notes = b"Paddle obstructed".ljust(64, b"\0")
        dev.fault_on_move = with_data(MGMSG_HW_RICHRESPONSE,
                                      struct.pack("<HH", 0x0453, 42) + notes)
        with pytest.raises(InstrumentError,
                           match=r"polarization: MOT_MOVE_ABSOLUTE \(paddle 1, 81 counts\): "
                                 r"controller fault 42 on message 0x0453: Paddle obstructed"):
            pol.set_angle_deg(0, 10.0)
        dev.sync()
        assert dev.enabled == 0   # motors off after the failed move
        dev.fault_on_move = None
        dev.status_bits_extra = 0x00004000
        with pytest.raises(InstrumentError, match="paddle 1 reports position error"):
            pol.set_angle_deg(0, 10.0)
        dev.status_bits_extra = 0


def test_no_reply_garbled_and_truncated(dev):
    with make(dev, move_timeout_s=0.3) as pol:
        dev.silent = True
        with pytest.raises(InstrumentError, match=r"MOT_REQ_USTATUSUPDATE \(paddle 1\): "
                                                  r"no reply within 0.2 s"):
            pol.angle_deg(0)
        with pytest.raises(InstrumentError, match=r"the end of the move did not come within "
                                                  r"0.3 s"):
            pol.set_angle_deg(0, 10.0)
        dev.sync()
        dev.silent = False
        dev.raw_reply = bytes.fromhex("91 04 0e 00 81 50 01 00")   # header, then 2 of 14
        with pytest.raises(InstrumentError, match=r"truncated reply: 2 of 14 bytes"):
            pol.angle_deg(0)
        dev.raw_reply = bytes.fromhex("ff ff 00 00 13 37")
        with pytest.raises(InstrumentError, match=r"garbled reply ff ff 00 00 13 37"):
            pol.angle_deg(0)
        dev.raw_reply = bytes.fromhex("91 04 ff 00 81 50")       # impossible length
        with pytest.raises(InstrumentError, match="garbled reply"):
            pol.angle_deg(0)
        assert pol.angle_deg(0) == 0.0   # the next exchange is clean


def test_controller_vanishes_then_reconnect(tmp_path):
    # the USB device goes away and comes back under the same /dev/serial/by-id/ name
    dev = SimMPC320(PtyWire(tmp_path / "ttyMPC"))
    pol = make(dev)
    pol.connect()
    try:
        dev.vanish_on_move = True
        with pytest.raises(InstrumentError,
                           match=r"polarization: MOT_MOVE_ABSOLUTE \(paddle 3, 403 counts\): "
                                 r"link lost"):
            pol.set_angle_deg(2, 50.0)
        dev.vanish_on_move = False
        dev.revive()
        pol.reconnect()
        pol.set_angle_deg(2, 50.0)
        assert dev.positions[2] == 403
    finally:
        pol.close()
        dev.close()
