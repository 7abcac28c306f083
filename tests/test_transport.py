"""The links to real instruments, through the real stacks: PyVISA with pyvisa-sim,
pyserial on a loopback socket, TCP and ZeroMQ servers on 127.0.0.1."""

from __future__ import annotations

import socket
import threading

import pytest

from qkdctl.drivers.transport import (
    SerialLink,
    TcpLink,
    VisaLink,
    ZmqReqLink,
    link_kind,
    open_link,
)
from qkdctl.errors import ConfigError, InstrumentError


class LineServer:
    """A loopback TCP server answering each line with ``reply(line)`` (None: silence)."""

    def __init__(self, reply):
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.conns: list[socket.socket] = []
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._client, args=(c,), daemon=True).start()

    def _client(self, c):
        buf = b""
        while True:
            try:
                chunk = c.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.received.append(line)
                r = self.reply(line)
                if r is not None:
                    try:
                        c.sendall(r)
                    except OSError:  # the test dropped this client
                        return

    def drop_clients(self):
        for c in self.conns:
            c.close()
        self.conns.clear()

    def close(self):
        self.drop_clients()
        self.sock.close()


@pytest.fixture
def echo_server():
    def reply(line):
        if line == b"SILENT?":
            return None
        if line == b"HALF?":
            return b"12"
        if line == b"BIN?":
            return bytes([0xFF, 0xFE, 0x0A])
        return b"ECHO " + line + b"\n"

    s = LineServer(reply)
    yield s
    s.close()


def test_link_kind_by_resource():
    assert link_kind("USB0::0x1313::0x804A::M00412345::INSTR") == "visa"
    assert link_kind("TCPIP0::192.168.1.5::inst0::INSTR") == "visa"
    assert link_kind("ASRL/dev/ttyUSB0::INSTR") == "visa"
    assert link_kind("/dev/ttyUSB0") == "serial"
    assert link_kind("COM3") == "serial"
    assert link_kind("socket://127.0.0.1:5000") == "serial"
    assert link_kind("192.168.1.7:5555") == "tcp"
    assert link_kind("192.168.1.7:5555", "zmq") == "zmq"
    with pytest.raises(ConfigError, match="resource: missing"):
        open_link("laser", "")
    with pytest.raises(ConfigError, match="expected host:port"):
        TcpLink("tagger", "nohost")


def test_serial_over_socket(echo_server):
    link = SerialLink("ell", f"socket://127.0.0.1:{echo_server.port}", timeout_s=0.5)
    link.open()
    assert link.query("in") == "ECHO in"
    assert echo_server.received == [b"in"]
    with pytest.raises(InstrumentError, match=r"ell: query 'SILENT\?': no reply within 0.5 s "
                                              r"\(socket://127"):
        link.query("SILENT?")
    with pytest.raises(InstrumentError, match="truncated reply"):
        link.query("HALF?")
    link.flush_input()
    with pytest.raises(InstrumentError, match="garbled reply"):
        link.query("BIN?")
    link.close()
    with pytest.raises(InstrumentError, match="link not open"):
        link.query("in")


def test_tcp_link_vanishing_device_and_reconnect(echo_server):
    link = TcpLink("sq", f"127.0.0.1:{echo_server.port}", timeout_s=0.5)
    link.open()
    assert link.query("GetCounts") == "ECHO GetCounts"
    echo_server.drop_clients()
    with pytest.raises(InstrumentError, match="sq: query 'GetCounts': .*(closed|lost)"):
        link.query("GetCounts")
    link.reconnect()
    assert link.query("again") == "ECHO again"
    link.close()


def test_tcp_link_refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    link = TcpLink("sq", f"127.0.0.1:{port}", timeout_s=0.5)
    with pytest.raises(InstrumentError, match="sq: open: cannot connect"):
        link.open()
    with pytest.raises(InstrumentError, match="reconnect: failed after 2 attempts"):
        link.reconnect(attempts=2, delay_s=0.01)


def test_zmq_req_timeout_then_recovers():
    """A request left unanswered times out; the REQ socket is reopened, so the next
    request goes through (a ROUTER server, which may ignore a request)."""
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    seen = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if router.poll(50):
                ident, empty, msg = router.recv_multipart()
                seen.append(msg)
                if len(seen) == 1:
                    continue  # never answer the first request
                router.send_multipart([ident, empty, b"ID Quantique,ID1000,1234,1.0"])
        router.close(linger=0)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        link = ZmqReqLink("tagger", f"127.0.0.1:{port}", timeout_s=0.3)
        link.open()
        with pytest.raises(InstrumentError, match=r"tagger: query '\*IDN\?': no reply within"):
            link.query("*IDN?")
        assert link.query("*IDN?").startswith("ID Quantique")
        assert seen == [b"*IDN?", b"*IDN?"]
        link.close()
    finally:
        stop.set()
        t.join()


def test_visa_link_through_pyvisa_sim():
    pytest.importorskip("pyvisa_sim")
    # pyvisa-sim's built-in default devices
    link = VisaLink("dev", "USB0::0x1111::0x2222::0x1234::0::INSTR", backend="@sim",
                    timeout_s=0.5)
    link.open()
    assert link.query("?IDN") == "LSG Serial #1234"
    link.close()
    with pytest.raises(InstrumentError, match="link not open"):
        link.query("?IDN")
