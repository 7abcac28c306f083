"""Links to real instruments: VISA (PyVISA), serial (pyserial), TCP and ZeroMQ.

A driver talks to its instrument through one :class:`Link`. Every link:

- is opened by :meth:`Link.open` and closed by :meth:`Link.close` (idempotent);
- sends text commands with :meth:`Link.write` and reads replies with
  :meth:`Link.read` / :meth:`Link.query`; binary protocols use
  :meth:`Link.write_bytes` and :meth:`Link.read_exact`;
- reports every failure as :class:`~qkdctl.errors.InstrumentError` naming the
  instrument, the command and the resource: ``laser: query 'SOUR:CURR?':
  no reply within 2 s (USB0::0x1313::0x804A::M00412345::INSTR)``; a garbled
  reply is the driver's to report (:meth:`Link.fail` builds the message);
- can be reopened with :meth:`Link.reconnect` after the device vanished, where
  the device allows it.

Which link a resource string selects (:func:`open_link`):

============================================  ==================================
``USB0::...::INSTR``, ``TCPIP0::...``,         :class:`VisaLink` (PyVISA; the
``GPIB0::...``, ``ASRL/dev/ttyUSB0::INSTR``     ``backend`` chooses the VISA
                                               library: ``"@py"`` for pyvisa-py,
                                               ``"devices.yaml@sim"`` for
                                               pyvisa-sim, empty for the system's)
``/dev/ttyUSB0``, ``COM3``, ``socket://h:p``,  :class:`SerialLink` (pyserial's
``loop://``, ``rfc2217://h:p``                 ``serial_for_url``)
``tcp://host:port`` with ``kind="zmq"``         :class:`ZmqReqLink` (pyzmq REQ)
``host:port``, ``tcp://host:port``             :class:`TcpLink` (a TCP socket)
============================================  ==================================

Tests talk to simulated devices through the same links: pyvisa-sim YAML
devices behind ``@sim``, a loopback ``socket://127.0.0.1:port`` server or a
pseudo-terminal for serial devices, and loopback TCP/ZeroMQ servers.
"""

from __future__ import annotations

import logging
import socket
import termios
import threading
import time
from typing import Any

from qkdctl.errors import ConfigError, InstrumentError

__all__ = [
    "Link",
    "SerialLink",
    "TcpLink",
    "VisaLink",
    "ZmqReqLink",
    "close_resource_managers",
    "link_kind",
    "open_link",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0


class Link:
    """A connection to one instrument (see the module documentation)."""

    kind = "link"

    def __init__(self, name: str, resource: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 write_termination: str = "\n", read_termination: str = "\n",
                 encoding: str = "ascii"):
        if not resource:
            raise ConfigError(f"{name}: resource: missing (where is the instrument?)")
        if not (timeout_s > 0):
            raise ConfigError(f"{name}: timeout_s: {timeout_s!r}: must be > 0")
        self.name = name
        self.resource = resource
        self.timeout_s = float(timeout_s)
        self.write_termination = write_termination
        self.read_termination = read_termination
        self.encoding = encoding
        self._lock = threading.RLock()
        self._open_ = False

    # -- errors -------------------------------------------------------------------------
    def fail(self, command: str, problem: str) -> InstrumentError:
        """The error for ``problem`` with ``command`` (for the driver to raise)."""
        return InstrumentError(f"{self.name}: {command}: {problem} ({self.resource})")

    def _timeout(self, command: str) -> InstrumentError:
        return self.fail(command, f"no reply within {self.timeout_s:g} s")

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._open_

    def open(self) -> None:
        with self._lock:
            if self._open_:
                return
            self._do_open()
            self._open_ = True
            log.debug("%s: opened %s", self.name, self.resource)

    def close(self) -> None:
        with self._lock:
            if not self._open_:
                return
            try:
                self._do_close()
            except Exception as e:  # closing a dead link must not hide the real error
                log.debug("%s: closing %s: %s", self.name, self.resource, e)
            finally:
                self._open_ = False

    def reconnect(self, attempts: int = 3, delay_s: float = 0.2) -> None:
        """Close and reopen the link, a few times if needed."""
        last: Exception | None = None
        for i in range(max(1, attempts)):
            self.close()
            try:
                self.open()
                log.warning("%s: reconnected to %s", self.name, self.resource)
                return
            except InstrumentError as e:
                last = e
                time.sleep(delay_s * (i + 1))
        raise self.fail("reconnect", f"failed after {attempts} attempts: {last}")

    def _require(self, command: str) -> None:
        if not self._open_:
            raise self.fail(command, "link not open")

    # -- text ---------------------------------------------------------------------------
    def write(self, command: str) -> None:
        with self._lock:
            self._require(f"write {command!r}")
            self.write_bytes((command + self.write_termination).encode(self.encoding),
                             command=f"write {command!r}")

    def read(self, command: str = "read") -> str:
        with self._lock:
            self._require(command)
            raw = self.read_until(self.read_termination.encode(self.encoding), command=command)
            try:
                return raw.decode(self.encoding).strip()
            except UnicodeDecodeError:
                raise self.fail(command, f"garbled reply {raw[:40]!r}") from None

    def query(self, command: str) -> str:
        with self._lock:
            self.write(command)
            return self.read(f"query {command!r}")

    # -- bytes (hooks) --------------------------------------------------------------------
    def write_bytes(self, data: bytes, *, command: str = "write") -> None:
        raise NotImplementedError

    def read_exact(self, n: int, *, command: str = "read") -> bytes:
        raise NotImplementedError

    def read_until(self, terminator: bytes, *, command: str = "read",
                   max_bytes: int = 1 << 20) -> bytes:
        """Bytes up to (not including) ``terminator``."""
        buf = bytearray()
        while not buf.endswith(terminator):
            buf += self.read_exact(1, command=command)
            if len(buf) > max_bytes:
                raise self.fail(command, f"reply longer than {max_bytes} bytes without "
                                         f"{terminator!r}")
        return bytes(buf[:-len(terminator)])

    def _do_open(self) -> None:
        raise NotImplementedError

    def _do_close(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.resource!r}>"


# ------------------------------------------------------------------------------ VISA
_RESOURCE_MANAGERS: dict[str, Any] = {}
_RM_LOCK = threading.Lock()


def _resource_manager(backend: str):
    import pyvisa

    with _RM_LOCK:
        rm = _RESOURCE_MANAGERS.get(backend)
        if rm is None:
            rm = pyvisa.ResourceManager(backend) if backend else pyvisa.ResourceManager()
            _RESOURCE_MANAGERS[backend] = rm
        return rm


def close_resource_managers() -> None:
    """Close the cached PyVISA resource managers (a fresh one is made on the next open).

    A pyvisa-sim backend keeps its simulated devices' state in its resource
    manager; tests close them to start each from the YAML file's state.
    """
    with _RM_LOCK:
        for rm in _RESOURCE_MANAGERS.values():
            try:
                rm.close()
            except Exception as e:  # a manager already closed
                log.debug("closing a VISA resource manager: %s", e)
        _RESOURCE_MANAGERS.clear()


class VisaLink(Link):
    """An instrument through PyVISA (USBTMC, VXI-11/HiSLIP, GPIB, serial over VISA).

    Text commands go through PyVISA's ``write``/``read`` with the link's
    terminations and timeout, so the driver's exact command strings reach the
    instrument (and a pyvisa-sim device's dialogues).
    """

    kind = "visa"

    def __init__(self, name: str, resource: str, *, backend: str = "", **kw: Any):
        super().__init__(name, resource, **kw)
        self.backend = backend
        self._inst = None

    def _do_open(self) -> None:
        import pyvisa

        try:
            rm = _resource_manager(self.backend)
            self._inst = rm.open_resource(
                self.resource, read_termination=self.read_termination,
                write_termination=self.write_termination,
                timeout=round(self.timeout_s * 1000))
        except (pyvisa.errors.Error, OSError, ValueError) as e:
            raise self.fail("open", f"cannot open: {e}") from None

    def _do_close(self) -> None:
        if self._inst is not None:
            self._inst.close()
            self._inst = None

    def _call(self, command: str, fn, *args):
        import pyvisa

        try:
            return fn(*args)
        except pyvisa.errors.VisaIOError as e:
            if e.error_code == pyvisa.constants.StatusCode.error_timeout:
                raise self._timeout(command) from None
            raise self.fail(command, f"I/O error: {e.description}") from None
        except (pyvisa.errors.Error, OSError) as e:
            raise self.fail(command, f"I/O error: {e}") from None

    def write(self, command: str) -> None:
        with self._lock:
            self._require(f"write {command!r}")
            self._call(f"write {command!r}", self._inst.write, command)

    def read(self, command: str = "read") -> str:
        with self._lock:
            self._require(command)
            reply = self._call(command, self._inst.read)
            return reply.strip()

    def query(self, command: str) -> str:
        with self._lock:
            self._require(f"query {command!r}")
            reply = self._call(f"query {command!r}", self._inst.query, command)
            return reply.strip()

    def write_bytes(self, data: bytes, *, command: str = "write") -> None:
        with self._lock:
            self._require(command)
            self._call(command, self._inst.write_raw, data)

    def read_exact(self, n: int, *, command: str = "read") -> bytes:
        with self._lock:
            self._require(command)
            return self._call(command, self._inst.read_bytes, n)


# ------------------------------------------------------------------------------ serial
class SerialLink(Link):
    """A serial device through pyserial: a device path or a pyserial URL
    (``socket://host:port``, ``rfc2217://host:port``, ``loop://``)."""

    kind = "serial"

    def __init__(self, name: str, resource: str, *, baudrate: int = 9600, **kw: Any):
        super().__init__(name, resource, **kw)
        self.baudrate = int(baudrate)
        self._port = None

    def _do_open(self) -> None:
        import serial

        try:
            self._port = serial.serial_for_url(self.resource, baudrate=self.baudrate,
                                               timeout=self.timeout_s,
                                               write_timeout=self.timeout_s)
        except (serial.SerialException, OSError, ValueError) as e:
            raise self.fail("open", f"cannot open: {e}") from None

    def _do_close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None

    def flush_input(self) -> None:
        """Drop bytes waiting to be read (a late reply to a timed-out command)."""
        import serial

        with self._lock:
            if self._port is not None:
                try:
                    self._port.reset_input_buffer()
                except (serial.SerialException, OSError, termios.error):
                    pass

    def write_bytes(self, data: bytes, *, command: str = "write") -> None:
        import serial

        with self._lock:
            self._require(command)
            try:
                self._port.write(data)
                self._port.flush()
            except serial.SerialTimeoutException:
                raise self.fail(command, f"write not accepted within {self.timeout_s:g} s") \
                    from None
            except (serial.SerialException, OSError, termios.error) as e:
                raise self.fail(command, f"link lost: {e}") from None

    def read_exact(self, n: int, *, command: str = "read") -> bytes:
        import serial

        with self._lock:
            self._require(command)
            try:
                data = self._port.read(n)
            except (serial.SerialException, OSError, termios.error) as e:
                raise self.fail(command, f"link lost: {e}") from None
            if len(data) < n:
                if data:
                    raise self.fail(command, f"truncated reply: {len(data)} of {n} bytes "
                                             f"{bytes(data)[:40]!r}")
                raise self._timeout(command)
            return bytes(data)

    def read_until(self, terminator: bytes, *, command: str = "read",
                   max_bytes: int = 1 << 20) -> bytes:
        import serial

        with self._lock:
            self._require(command)
            try:
                data = self._port.read_until(terminator, max_bytes)
            except (serial.SerialException, OSError, termios.error) as e:
                raise self.fail(command, f"link lost: {e}") from None
            if not data.endswith(terminator):
                if data:
                    raise self.fail(command, f"truncated reply {bytes(data)[:40]!r}")
                raise self._timeout(command)
            return bytes(data[:-len(terminator)])


# ------------------------------------------------------------------------------ TCP
def _host_port(name: str, resource: str) -> tuple[str, int]:
    r = resource[len("tcp://"):] if resource.startswith("tcp://") else resource
    host, sep, port = r.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: resource: {resource!r}: expected host:port")
    return host.strip("[]"), int(port)


class TcpLink(Link):
    """A TCP socket (line-based text or raw bytes)."""

    kind = "tcp"

    def __init__(self, name: str, resource: str, **kw: Any):
        super().__init__(name, resource, **kw)
        self.host, self.port = _host_port(name, resource)
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def _do_open(self) -> None:
        try:
            self._sock = socket.create_connection((self.host, self.port), self.timeout_s)
            self._sock.settimeout(self.timeout_s)
        except OSError as e:
            raise self.fail("open", f"cannot connect: {e.strerror or e}") from None
        self._buf.clear()

    def _do_close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def write_bytes(self, data: bytes, *, command: str = "write") -> None:
        with self._lock:
            self._require(command)
            try:
                self._sock.sendall(data)
            except TimeoutError:
                raise self.fail(command, f"write not accepted within {self.timeout_s:g} s") \
                    from None
            except OSError as e:
                raise self.fail(command, f"link lost: {e.strerror or e}") from None

    def _fill(self, command: str) -> None:
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            if self._buf:
                raise self.fail(command, f"truncated reply {bytes(self._buf)[:40]!r}") \
                    from None
            raise self._timeout(command) from None
        except OSError as e:
            raise self.fail(command, f"link lost: {e.strerror or e}") from None
        if not chunk:
            raise self.fail(command, "the instrument closed the connection")
        self._buf += chunk

    def read_exact(self, n: int, *, command: str = "read") -> bytes:
        with self._lock:
            self._require(command)
            while len(self._buf) < n:
                self._fill(command)
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out

    def read_until(self, terminator: bytes, *, command: str = "read",
                   max_bytes: int = 1 << 20) -> bytes:
        with self._lock:
            self._require(command)
            while True:
                i = self._buf.find(terminator)
                if i >= 0:
                    out = bytes(self._buf[:i])
                    del self._buf[:i + len(terminator)]
                    return out
                if len(self._buf) > max_bytes:
                    raise self.fail(command, f"reply longer than {max_bytes} bytes")
                self._fill(command)


# ------------------------------------------------------------------------------ ZeroMQ
class ZmqReqLink(Link):
    """A ZeroMQ REQ socket (request/reply; one reply per request).

    After a timeout the REQ socket cannot send again, so it is closed and
    reopened (the "lazy pirate" pattern) before the error is raised: the next
    command starts clean.
    """

    kind = "zmq"

    def __init__(self, name: str, resource: str, **kw: Any):
        super().__init__(name, resource, **kw)
        host, port = _host_port(name, resource)
        self.endpoint = f"tcp://{host}:{port}"
        self._ctx = None
        self._sock = None

    def _do_open(self) -> None:
        try:
            import zmq
        except ImportError:
            raise self.fail("open", "needs the pyzmq package (pip install pyzmq)") from None
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)

    def _do_close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def query(self, command: str) -> str:
        import zmq

        with self._lock:
            self._require(f"query {command!r}")
            cmd = f"query {command!r}"
            try:
                self._sock.send(command.encode(self.encoding))
                if not self._sock.poll(round(self.timeout_s * 1000), zmq.POLLIN):
                    self.close()
                    self.open()
                    raise self._timeout(cmd)
                raw = self._sock.recv()
            except zmq.ZMQError as e:
                raise self.fail(cmd, f"link error: {e}") from None
            try:
                return raw.decode(self.encoding).strip()
            except UnicodeDecodeError:
                raise self.fail(cmd, f"garbled reply {raw[:40]!r}") from None

    def write(self, command: str) -> None:
        # REQ/REP: every request has a reply; a write is a query whose reply is ignored
        self.query(command)


# ------------------------------------------------------------------------------ choice
_VISA_PREFIXES = ("USB", "TCPIP", "GPIB", "ASRL", "VXI", "PXI")


def link_kind(resource: str, kind: str | None = None) -> str:
    """Which link a resource string selects: ``visa``, ``serial``, ``tcp`` or ``zmq``."""
    if kind:
        return kind
    r = resource.strip()
    if r.upper().startswith(_VISA_PREFIXES) and "::" in r:
        return "visa"
    if r.startswith(("socket://", "loop://", "rfc2217://", "/", "spy://")) or \
            r.upper().startswith("COM"):
        return "serial"
    return "tcp"


def open_link(name: str, resource: str, *, kind: str | None = None, **options: Any) -> Link:
    """A link for ``resource`` (not yet opened); ``kind`` forces one."""
    k = link_kind(resource, kind)
    cls = {"visa": VisaLink, "serial": SerialLink, "tcp": TcpLink, "zmq": ZmqReqLink}.get(k)
    if cls is None:
        raise ConfigError(f"{name}: unknown link kind {k!r}")
    return cls(name, resource, **options)
