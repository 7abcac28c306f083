"""The ELL14 driver through pyserial against a simulated Elliptec bus.

The simulated bus holds several modules, each answering to its address as an
ELLx module does (unterminated host commands, replies ending in CR LF), at the
device end of a pseudo-terminal (the driver opens the terminal's path) or of a
loopback TCP server (``socket://127.0.0.1:<port>``).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
import tty

import pytest

from qkdctl.drivers.base import PolarizationController
from qkdctl.drivers.elliptec import (
    ELL14,
    STATUS_CODES,
    from_hex32,
    parse_info,
    to_hex32,
)
from qkdctl.errors import ConfigError, InstrumentError, LimitError

#: data length of each host command the simulated modules know
COMMAND_DATA = {"in": 0, "gs": 0, "gp": 0, "st": 0, "ho": 1, "ma": 8}


class SimMount:
    """One simulated ELL14 on the bus."""

    def __init__(self, address: str, serial: str, pulses: int = 0x23000, travel: int = 360):
        self.address = address
        self.serial = serial
        self.pulses = pulses
        self.travel = travel
        self.position = 0
        self.move_status: int | None = None  # answer a move with this GS status instead
        self.busy_first = False              # answer a move with GS09 before the PO
        self.silent = False                  # answer nothing
        self.raw_reply: bytes | None = None  # answer the next command with these bytes
        self.vanish_on_move = False          # close the connection on a move
        self.pending_status = 0

    def info(self) -> str:
        return (f"{self.address}IN0E{self.serial}2021"
                f"1501{self.travel:04X}{self.pulses:08X}")


class PtyWire:
    """The device end of a pseudo-terminal; the driver opens ``path``, a symlink to
    the terminal (as ``/dev/serial/by-id/...`` points to ``/dev/ttyUSB0``)."""

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
        """Bytes from the driver; None when nothing came; b"" when the wire is gone."""
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
        self.master = self.slave = -1

    def restore(self):
        self._open()


class SocketWire:
    """A loopback TCP server: the driver opens ``socket://127.0.0.1:<port>``."""

    def __init__(self):
        self.port = 0
        self.conn = None
        self._open()

    def _open(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(1)
        s.settimeout(0.02)
        self.port = s.getsockname()[1]
        self.lsock = s

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def accept(self, stop) -> bool:
        while not stop.is_set():
            try:
                self.conn, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return False
            self.conn.settimeout(0.02)
            return True
        return False

    def recv(self) -> bytes | None:
        try:
            return self.conn.recv(4096)
        except TimeoutError:
            return None
        except OSError:
            return b""

    def send(self, data: bytes):
        self.conn.sendall(data)

    def drop(self):
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            self.conn.close()
        self.lsock.close()

    def restore(self):
        self._open()


class SimBus:
    """The simulated modules at the device end of a wire (pseudo-terminal or socket)."""

    def __init__(self, mounts, wire):
        self.mounts = {m.address: m for m in mounts}
        self.wire = wire
        self.received = bytearray()
        self.commands: list[str] = []
        self._start()

    @property
    def url(self) -> str:
        return self.wire.url

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
                    self.wire.drop()  # the device vanished
                    self._stop.set()
                    return

    def _handle(self, buf: bytearray) -> bool:
        """Answer every complete command in ``buf``; False: the device vanished."""
        while len(buf) >= 3:
            addr, cmd = chr(buf[0]), bytes(buf[1:3]).decode()
            n = 3 + COMMAND_DATA.get(cmd, 0)
            if len(buf) < n:
                return True
            command = bytes(buf[:n]).decode()
            del buf[:n]
            self.commands.append(command)
            mount = self.mounts.get(addr)
            if mount is None or mount.silent:
                continue
            if mount.raw_reply is not None:
                raw, mount.raw_reply = mount.raw_reply, None
                self.wire.send(raw)
                continue
            reply = self._reply(mount, cmd, command[3:])
            if reply is None:
                return False
            self.wire.send(reply.encode() + b"\r\n")
        return True

    def _reply(self, m: SimMount, cmd: str, data: str):
        a = m.address
        if cmd == "in":
            return m.info()
        if cmd == "gs":
            st, m.pending_status = m.pending_status, 0
            return f"{a}GS{st:02X}"
        if cmd == "gp":
            return f"{a}PO{to_hex32(m.position)}"
        if cmd == "st":
            return f"{a}GS00"
        if cmd == "ho":
            m.position = 0
            return f"{a}PO{to_hex32(0)}"
        if cmd == "ma":
            if m.vanish_on_move:
                return None
            if m.move_status is not None:
                m.pending_status = m.move_status
                return f"{a}GS{m.move_status:02X}"
            time.sleep(0.02)  # the move takes a little time
            m.position = from_hex32(data)
            po = f"{a}PO{to_hex32(m.position)}"
            return f"{a}GS09\r\n{po}" if m.busy_first else po
        return f"{a}GS03"

    def revive(self):
        """The device comes back (same port, or the same symlink to a new terminal)."""
        self._thread.join(timeout=1)
        self.wire.restore()
        self._start()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=1)
        self.wire.drop()


def three_mounts():
    return [SimMount("0", "11400284"), SimMount("1", "11400285"),
            SimMount("2", "11400286", pulses=0x40000)]


@pytest.fixture
def bus(tmp_path):
    b = SimBus(three_mounts(), PtyWire(tmp_path / "ttyELL"))
    yield b
    b.close()


@pytest.fixture(autouse=True)
def _short_move_gap(monkeypatch):
    monkeypatch.setattr(ELL14, "MOVE_GAP_S", 0.0)


def make(bus, **settings):
    settings.setdefault("addresses", ["0", "1", "2"])
    return ELL14("polarization", resource=bus.url, timeout_s=0.3, settings=settings,
                 limits={"min_angle_deg": -360.0, "max_angle_deg": 360.0},
                 config_key="bench.toml: instruments.polarization")


def test_protocol_helpers():
    assert to_hex32(17920) == "00004600"
    assert to_hex32(-35840) == "FFFF7400"
    assert from_hex32("FFFF7400") == -35840
    # type 0E, serial, year, firmware, hardware, travel 0x168 = 360 deg, 0x23000 pulses
    info = parse_info("0", "0E" "11400284" "2021" "15" "01" "0168" "00023000")
    assert (info.device_type, info.serial, info.year, info.firmware, info.hardware) == \
        (14, "11400284", "2021", "15", "01")
    assert info.travel == 360 and info.pulses == 143360
    assert info.counts_per_deg == pytest.approx(398.2222, abs=1e-4)
    assert STATUS_CODES[1] == "communication time out"
    assert STATUS_CODES[2] == "mechanical time out"
    with pytest.raises(ValueError):
        parse_info("0", "0E1140")
    assert issubclass(ELL14, PolarizationController)


def test_config_is_checked_when_built(bus):
    with pytest.raises(ConfigError, match=r"instruments.polarization.settings.addresses: 'G'"):
        make(bus, addresses=["0", "G"])
    with pytest.raises(ConfigError, match="listed twice"):
        make(bus, addresses=["1", 1])
    with pytest.raises(ConfigError, match="2 angles for 3 mounts"):
        make(bus, angles_deg=[0.0, 1.0])
    with pytest.raises(ConfigError, match="home_direction"):
        make(bus, home_direction="up")
    with pytest.raises(ConfigError, match="unknown setting"):
        make(bus, speed=3)
    with pytest.raises(ConfigError, match="expected a serial port"):
        ELL14("polarization", resource="USB0::1::2::INSTR")
    with pytest.raises(ConfigError, match="leave backend empty"):
        ELL14("polarization", resource=bus.url, backend="x.yaml@sim")


def test_connect_reads_every_mount_and_moves(bus):
    with make(bus) as pol:
        assert bytes(bus.received) == b"0in1in2in"
        assert pol.axes == 3
        ident = pol.identity()
        assert ident.make == "Thorlabs" and ident.model == "ELL14 x3"
        assert ident.serial == "11400284,11400285,11400286"
        # degrees -> counts from each mount's own info reply
        n = len(bus.received)
        pol.set_angle_deg(1, 45.0)
        assert bytes(bus.received[n:]) == b"1ma00004600"     # 45 * 143360 / 360
        n = len(bus.received)
        pol.set_angle_deg(2, 45.0)
        assert bytes(bus.received[n:]) == b"2ma00008000"     # 45 * 262144 / 360
        n = len(bus.received)
        pol.set_angle_deg(0, -90.0)
        assert bytes(bus.received[n:]) == b"0maFFFF7400"     # two's complement
        assert bus.mounts["0"].position == -35840
        assert pol.angle_deg(0) == pytest.approx(-90.0)
        assert pol.angles_deg() == pytest.approx([-90.0, 45.0, 45.0])
        n = len(bus.received)
        pol.home()
        assert bytes(bus.received[n:]) == b"0ho01ho02ho0"
        st = pol.status()
        assert [a["status"] for a in st["axes"]] == ["ok"] * 3
    # safe state: stop every mount, then close
    assert bus.commands[-3:] == ["0st", "1st", "2st"]
    assert not pol.connected


def test_settings_applied_on_connect_and_busy_is_waited_out(bus):
    bus.mounts["1"].busy_first = True
    with make(bus, angles_deg=[10.0, 20.0, 30.0], home_direction="ccw"):
        assert bus.commands[:6] == ["0in", "1in", "2in", "0ma00000F8E", "1ma00001F1C",
                                    "2ma00005555"]
        assert bus.mounts["1"].position == round(20 * 143360 / 360)


def test_limits_are_checked_before_any_byte(bus):
    with make(bus) as pol:
        n = len(bus.received)
        with pytest.raises(LimitError, match="above the limit max_angle_deg = 360"):
            pol.set_angle_deg(0, 400.0)
        with pytest.raises(LimitError, match="no axis 3"):
            pol.set_angle_deg(3, 10.0)
        with pytest.raises(LimitError, match="not a finite angle"):
            pol.set_angle_deg(0, float("nan"))
        with pytest.raises(LimitError, match="below the limit"):
            pol.set_angles_deg([0.0, 0.0, -361.0])   # checked for all axes first
        assert len(bus.received) == n


def test_error_status_names_the_code(bus):
    bus.mounts["2"].move_status = 2
    with make(bus) as pol:
        with pytest.raises(InstrumentError,
                           match=r"polarization: '2ma00004000': mount at address 2 reports "
                                 r"status 2 \(mechanical time out\) \(/"):
            pol.set_angle_deg(2, 22.5)
        # the fault status was read back once to clear it
        assert bus.commands[-2:] == ["2ma00004000", "2gs"]
        bus.mounts["2"].move_status = None
        pol.set_angle_deg(2, 22.5)
        assert bus.mounts["2"].position == 0x4000


def test_no_reply_and_missing_mount(bus):
    pol = make(bus, addresses=["0", "5"])
    t0 = time.monotonic()
    with pytest.raises(InstrumentError, match=r"polarization: '5in': no reply within 0.3 s"):
        pol.connect()
    assert time.monotonic() - t0 < 2
    assert not pol.connected
    with make(bus) as pol:
        bus.mounts["1"].silent = True
        with pytest.raises(InstrumentError, match=r"'1gp': no reply within 0.3 s"):
            pol.angle_deg(1)
        bus.mounts["1"].silent = False
        assert pol.angle_deg(1) == 0.0


def test_garbled_and_truncated_replies(bus):
    with make(bus) as pol:
        bus.mounts["0"].raw_reply = b"0PO00ZZ1234\r\n"
        with pytest.raises(InstrumentError, match=r"'0gp': garbled reply b'0PO00ZZ1234'"):
            pol.angle_deg(0)
        bus.mounts["0"].raw_reply = b"0PO0000"
        with pytest.raises(InstrumentError, match=r"'0gp': truncated reply b'0PO0000'"):
            pol.angle_deg(0)
        bus.mounts["0"].raw_reply = b"\xff\xfe\r\n"
        with pytest.raises(InstrumentError, match="garbled reply"):
            pol.angle_deg(0)
        bus.mounts["0"].raw_reply = b"0IN0E11400284\r\n"
        with pytest.raises(InstrumentError, match="garbled reply"):
            pol.angle_deg(0)
        assert pol.angle_deg(0) == 0.0   # the next exchange is clean
        # a stray reply from another address is skipped
        bus.mounts["0"].raw_reply = b"1PO00000000\r\n0PO0000018E\r\n"
        assert pol.angle_deg(0) == pytest.approx(398 / (143360 / 360))


def test_move_that_never_finishes(bus):
    with make(bus, move_timeout_s=0.4) as pol:
        bus.mounts["0"].silent = True
        t0 = time.monotonic()
        with pytest.raises(InstrumentError, match=r"'0ma00000000': not done within 0.4 s"):
            pol.set_angle_deg(0, 0.0)
        assert 0.35 < time.monotonic() - t0 < 1.5
        bus.mounts["0"].silent = False


@pytest.mark.parametrize("wire", ["pty", "socket"])
def test_device_vanishes_then_reconnect(tmp_path, wire):
    bus = SimBus(three_mounts(),
                 PtyWire(tmp_path / "ttyELL") if wire == "pty" else SocketWire())
    pol = make(bus)
    pol.connect()
    try:
        bus.mounts["1"].vanish_on_move = True
        with pytest.raises(InstrumentError, match=r"polarization: '1ma00004600': link lost"):
            pol.set_angle_deg(1, 45.0)
        with pytest.raises(InstrumentError, match="polarization: '0gp'"):
            pol.angle_deg(0)
        bus.mounts["1"].vanish_on_move = False
        bus.revive()
        pol.reconnect()
        assert bus.commands[-3:] == ["0in", "1in", "2in"]
        pol.set_angle_deg(1, 45.0)
        assert bus.mounts["1"].position == 0x4600
    finally:
        pol.close()
        bus.close()
