"""Single Quantum SNSPD driver against a loopback server speaking the system's JSON protocol."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from qkdctl.drivers.single_quantum import SingleQuantumSnspd, parse_frame
from qkdctl.errors import ConfigError, InstrumentError, LimitError

ETB = b"\x17"
LABEL_REQUEST = b'{"request": "labelProps", "value": "None"}'
CURVE = [[0.0, 0.0], [8.0, 0.5], [11.0, 0.8], [13.0, 0.85]]


class FakeSq:
    """The control port (12000) and counts port (12345) of an SNSPD system, on loopback.

    Control: reads bare JSON objects from the stream, keeps the labels, answers
    ``labelProps`` with every label and its properties (one ETB-ended frame each,
    or all packed in one frame with ``packed``), broadcasts a label after a
    command sets it, reports an ``Error`` label for a command it refuses.
    ``mode``: ``"ok"``, ``"mute"`` (reads, never answers), ``"garbled"``,
    ``"truncated"`` (half a frame, then silence). Counts: one line
    ``time,c1,...`` every 5 ms to each client.
    """

    def __init__(self, n=4, port=0, counts_port=0, mode="ok", packed=False):
        self.n, self.mode, self.packed = n, mode, packed
        self.step_ua = 0.0  # bias current resolution (0: exact)
        self.labels = {"NumberOfDetectors": n, "InptMeasurementPeriod": 100,
                       "BiasCurrent": [0.0] * n, "TriggerLevel": [20.0] * n,
                       "DetectorEnable": False}
        self.counts = [1000 + 100 * i for i in range(n)]
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self.server = self._listen(port)
        self.counts_server = self._listen(counts_port)
        self.port = self.server.getsockname()[1]
        self.counts_port = self.counts_server.getsockname()[1]
        self._acceptors = [threading.Thread(target=self._accept, args=(srv, fn), daemon=True)
                           for srv, fn in ((self.server, self._control),
                                           (self.counts_server, self._stream))]
        for t in self._acceptors:
            t.start()

    @staticmethod
    def _listen(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(4)
        s.settimeout(0.01)
        return s

    def _accept(self, srv, fn):
        while not self._stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=fn, args=(conn,), daemon=True).start()

    def stop(self):
        """The system vanishes: listening sockets and connections closed."""
        self._stop.set()
        for t in self._acceptors:
            t.join()
        for s in (self.server, self.counts_server):
            s.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()

    # -- control ----------------------------------------------------------------------
    def _control(self, conn):
        buf = ""
        dec = json.JSONDecoder()
        while not self._stop.is_set():
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk.decode()
            while True:
                buf = buf.lstrip()
                try:
                    msg, end = dec.raw_decode(buf)
                except ValueError:
                    break
                with self._lock:
                    self.messages.append(buf[:end].encode())
                buf = buf[end:]
                self._reply(conn, msg)

    def _send(self, conn, objs):
        if self.mode == "mute":
            return
        if self.mode == "garbled":
            data = b'{"label": "BiasCurrent", "value": [1.0, 2.0,,]}' + ETB
        elif self.mode == "truncated":
            data = json.dumps(objs[0]).encode()[:20]
        elif self.packed:
            data = "".join(json.dumps(o) for o in objs).encode() + ETB
        else:
            data = b"".join(json.dumps(o).encode() + ETB for o in objs)
        try:
            conn.sendall(data)
        except OSError:
            pass

    def _reply(self, conn, msg):
        with self._lock:
            if msg.get("request") == "labelProps":
                objs = [{"label": k, "value": {"value": v}} for k, v in self.labels.items()]
            elif msg.get("request") == "BiasVoltage":
                objs = [{"label": "BiasVoltage",
                         "value": [round(0.9 * i, 3) for i in self.labels["BiasCurrent"]]}]
            elif "command" in msg:
                objs = self._command(msg)
            else:
                objs = [{"label": "Error", "value": f"unknown message {msg}"}]
        if objs:
            self._send(conn, objs)

    def _command(self, msg):
        cmd, value = msg["command"], msg.get("value")
        if cmd in ("SetAllBiasCurrents", "SetAllTriggerLevels"):
            label = "BiasCurrent" if cmd == "SetAllBiasCurrents" else "TriggerLevel"
            if not isinstance(value, list) or len(value) != self.n:
                return [{"label": "Error", "value": f"{cmd}: need {self.n} values"}]
            if label == "TriggerLevel" and any(abs(v) > 1000 for v in value):
                return [{"label": "Error", "value": "TriggerLevel out of range"}]
            if label == "BiasCurrent" and self.step_ua:
                value = [round(v / self.step_ua) * self.step_ua for v in value]
            self.labels[label] = [float(v) for v in value]
        elif cmd == "DetectorEnable":
            label = "DetectorEnable"
            self.labels[label] = bool(value)
        elif cmd == "SetMeasurementPeriod":
            label = "InptMeasurementPeriod"
            self.labels[label] = value
        else:
            return [{"label": "Error", "value": f"unknown command {cmd}"}]
        return [{"label": label, "value": self.labels[label]}]

    # -- counts -----------------------------------------------------------------------
    def _stream(self, conn):
        t = 0
        while not self._stop.is_set():
            t += 1
            line = ",".join([str(t)] + [str(c) for c in self.counts]) + "\n"
            try:
                conn.sendall(line.encode())
            except OSError:
                return
            time.sleep(0.005)

    def sent(self):
        """The messages received so far, without the label requests."""
        with self._lock:
            return [m for m in self.messages if m != LABEL_REQUEST]


@pytest.fixture
def server():
    srv = FakeSq()
    yield srv
    srv.stop()


def make(server, settings=None, limits=None, timeout_s=0.3):
    s = {"channels": [1, 2, 3, 4], "counts_port": server.counts_port}
    s.update(settings or {})
    return SingleQuantumSnspd(name="detectors", resource=f"127.0.0.1:{server.port}",
                              backend="", timeout_s=timeout_s, settings=s,
                              limits={"max_bias_current_ua": 14.0, **(limits or {})},
                              config_key="bench.toml: instruments.detectors")


# ----------------------------------------------------------------------------- framing
def test_frames_hold_one_or_several_objects():
    assert parse_frame('{"label": "a", "value": 1}') == [{"label": "a", "value": 1}]
    assert parse_frame('{"a": 1}{"b": [2]} ') == [{"a": 1}, {"b": [2]}]
    with pytest.raises(ValueError):
        parse_frame('{"a": 1')


# ---------------------------------------------------------------------------- identity
def test_connect_reads_only_and_identity_comes_from_settings(server):
    with make(server, {"model": "Eos", "serial": "SQ-117"}) as det:
        assert server.sent() == []
        assert server.messages[0] == LABEL_REQUEST
        ident = det.identity()
        assert (ident.make, ident.model, ident.serial) == ("Single Quantum", "Eos", "SQ-117")
        info = det.system_info()
        assert info["number_of_detectors"] == 4 and info["measurement_period_ms"] == 100
        assert {"BiasCurrent", "TriggerLevel", "DetectorEnable"} <= set(info["labels"])


def test_packed_frames_are_understood():
    srv = FakeSq(packed=True)
    try:
        with make(srv) as det:
            assert det.trigger_level_mv(3) == 20.0
    finally:
        srv.stop()


def test_a_channel_beyond_the_systems_detectors_is_refused(server):
    det = make(server, {"channels": {"1": 1, "7": 5}})
    with pytest.raises(InstrumentError, match=r"has 4 detectors; no detector for channel\(s\) "
                                              r"7 \(detector 5\)"):
        det.connect()
    assert not det.link.is_open


# --------------------------------------------------------------------------- setpoints
def test_exact_messages_for_setpoints_bias_and_safe_state(server):
    det = make(server, {"channels": [5, 6, 7, 8],
                        "bias_current_ua": {"5": 12.0, "6": 8.5, "7": 11.0, "8": 11.25},
                        "trigger_level_mv": {"5": 25.0}, "measurement_period_ms": 50,
                        "dead_time_ns": 45.0})
    with det:
        assert server.sent() == [
            b'{"command": "SetAllTriggerLevels", "label": "TriggerLevel", '
            b'"value": [25.0, 20.0, 20.0, 20.0]}',
            b'{"command": "SetMeasurementPeriod", "label": "InptMeasurementPeriod", '
            b'"value": 50}']
        assert server.labels["BiasCurrent"] == [0.0] * 4  # connecting does not bias
        del server.messages[:]
        det.bias_on(6)
        assert server.sent() == [
            b'{"command": "SetAllBiasCurrents", "label": "BiasCurrent", '
            b'"value": [0.0, 8.5, 0.0, 0.0]}',
            b'{"command": "DetectorEnable", "label": "DetectorEnable", "value": true}']
        assert det.is_biased(6) and not det.is_biased(5)
        det.bias_on()
        assert server.labels["BiasCurrent"] == [12.0, 8.5, 11.0, 11.25]
        assert det.bias_current_ua(8) == 11.25
        assert det.bias_voltage_mv(5) == pytest.approx(10.8)
        assert det.dead_time_ns(7) == 45.0
        det.set_bias_current_ua(12.5, channel=5)  # biased: applied at once
        assert server.labels["BiasCurrent"][0] == 12.5
        status = det.status()
        assert status["detectors_enabled"] and status["channels"][5]["bias_current_ua"] == 12.5
        del server.messages[:]
    assert server.sent() == [
        b'{"command": "SetAllBiasCurrents", "label": "BiasCurrent", '
        b'"value": [0.0, 0.0, 0.0, 0.0]}',
        b'{"command": "DetectorEnable", "label": "DetectorEnable", "value": false}']
    assert server.labels["DetectorEnable"] is False


def test_efficiency_through_the_calibrated_bias_current(server):
    with make(server, {"efficiency_curve": CURVE, "efficiency": {"1": 0.8, "2": 0.5}}) as det:
        assert det.efficiency(1) == pytest.approx(0.8)  # setpoint
        det.bias_on(1)
        det.bias_on(2)
        assert server.labels["BiasCurrent"] == [11.0, 8.0, 0.0, 0.0]
        assert det.efficiency(2) == pytest.approx(0.5)
        det.bias_off(1)
        assert server.labels["BiasCurrent"] == [0.0, 8.0, 0.0, 0.0]
        assert server.labels["DetectorEnable"] is True
        det.bias_off(2)
        assert server.labels["DetectorEnable"] is False


def test_count_rates_from_the_counts_port(server):
    with make(server, {"channels": {"3": 2, "1": 4}}) as det:
        # period 100 ms: counts per period x 10
        assert det.count_rates_hz() == {3: 11_000.0, 1: 13_000.0}


def test_dark_count_rate_is_configured_and_zero_while_unbiased(server):
    with make(server, {"bias_current_ua": 10.0, "dark_count_rate_hz": 30.0}) as det:
        assert det.dark_count_rate_hz(1) == 0.0
        det.bias_on(1)
        assert det.dark_count_rate_hz(1) == 30.0


# ------------------------------------------------------------------------------ limits
@pytest.mark.parametrize("call, match", [
    (lambda d: d.set_bias_current_ua(14.5), "14.5 uA is above the limit "
                                            "max_bias_current_ua = 14 uA"),
    (lambda d: d.set_bias_current_ua(-1.0), "not a bias current"),
    (lambda d: d.set_efficiency(0.85, channel=1), "no efficiency_curve"),
    (lambda d: d.set_trigger_level_mv(600.0), "above the limit max_trigger_level_mv = 500"),
    (lambda d: d.set_measurement_period_ms(5), "at least 10 ms"),
    (lambda d: d.bias_on(), "no bias setpoint"),
])
def test_limits_are_checked_before_sending(server, mocker, call, match):
    with make(server, limits={"max_trigger_level_mv": 500.0}) as det:
        write = mocker.spy(det.link, "write_bytes")
        with pytest.raises(LimitError, match=match):
            call(det)
        write.assert_not_called()


def test_curve_beyond_the_current_limit_is_refused_before_sending(server, mocker):
    with make(server, {"efficiency_curve": CURVE}, limits={"max_bias_current_ua": 12.0}) as det:
        write = mocker.spy(det.link, "write_bytes")
        with pytest.raises(LimitError, match="12.5 uA is above the limit"):
            det.set_efficiency(0.8375)
        with pytest.raises(LimitError, match="outside the calibrated range 0 to 0.85"):
            det.set_efficiency(0.9)
        write.assert_not_called()


@pytest.mark.parametrize("settings, limits, match", [
    ({}, {"max_bias_current_ua": None}, "max_bias_current_ua: missing"),
    ({"channels": None}, {}, "settings.channels: missing"),
    ({"channels": [1, 1]}, {}, "listed twice"),
    ({"channels": {"1": 1, "2": 1}}, {}, "wired to two channels"),
    ({"bias_current_ua": {"9": 1.0}}, {}, r"settings.bias_current_ua.9: no detector"),
    ({"measurement_period_ms": 2}, {}, "below 10 ms"),
    ({"counts_port": "x"}, {}, "TCP port"),
])
def test_configuration_errors(server, settings, limits, match):
    s = {"channels": [1, 2, 3, 4], **settings}
    s = {k: v for k, v in s.items() if v is not None}
    lim = {k: v for k, v in {"max_bias_current_ua": 14.0, **limits}.items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        SingleQuantumSnspd(name="detectors", resource=f"127.0.0.1:{server.port}", settings=s,
                           limits=lim, config_key="bench.toml: instruments.detectors")


# ------------------------------------------------------------------------------ faults
def test_device_error_label_is_raised_with_the_command(server):
    with make(server) as det:
        with pytest.raises(InstrumentError, match=r"detectors: SetAllTriggerLevels: device "
                                                  r"error: Error: 'TriggerLevel out of range'"):
            det.set_trigger_level_mv(1500.0)


@pytest.mark.parametrize("mode, match", [
    ("mute", r"detectors: labelProps NumberOfDetectors: no reply within 0.2 s "
             r"\(127.0.0.1:\d+\)"),
    ("garbled", r"detectors: labelProps NumberOfDetectors: garbled reply"),
    ("truncated", r"detectors: labelProps NumberOfDetectors: truncated reply"),
])
def test_no_reply_garbled_or_truncated(mode, match):
    srv = FakeSq(mode=mode)
    try:
        det = make(srv, timeout_s=0.2)
        with pytest.raises(InstrumentError, match=match):
            det.connect()
        assert not det.connected and not det.link.is_open
    finally:
        srv.stop()


def test_a_value_the_system_does_not_confirm_is_an_error(server):
    server.step_ua = 0.5
    with make(server, {"bias_current_ua": 8.3}, timeout_s=0.1) as det:
        with pytest.raises(InstrumentError, match=r"detectors: SetAllBiasCurrents: the system "
                                                  r"reports BiasCurrent = \[8.5, 0.0, 0.0, "
                                                  r"0.0\], not \[8.3, 0.0, 0.0, 0.0\]"):
            det.bias_on(1)


def test_silence_after_a_command_is_a_timeout_and_safe_state_still_runs(server):
    det = make(server, {"bias_current_ua": 10.0}, timeout_s=0.1)
    with pytest.raises(InstrumentError, match=r"detectors: SetAllBiasCurrents: no reply "
                                              r"within 0.1 s"), det:
        server.mode = "mute"
        det.bias_on()
    # the safe state was attempted: its commands reached the system
    assert server.labels["BiasCurrent"] == [0.0] * 4
    assert server.labels["DetectorEnable"] is False


def test_system_vanishing_then_reconnect(server):
    det = make(server, {"bias_current_ua": 10.0}, timeout_s=0.2)
    det.connect()
    det.bias_on(1)
    server.stop()
    with pytest.raises(InstrumentError) as e:
        det.set_bias_current_ua(11.0, channel=1)
    msg = str(e.value)
    assert msg.startswith("detectors: SetAllBiasCurrents: ") and str(server.port) in msg
    assert "closed the connection" in msg or "link lost" in msg
    back = FakeSq(port=server.port, counts_port=server.counts_port)
    back.labels["BiasCurrent"] = [10.0, 0.0, 0.0, 0.0]  # the system kept its state
    back.labels["DetectorEnable"] = True
    try:
        det.reconnect(attempts=2, delay_s=0.05)
        assert det.is_biased(1)
        det.set_bias_current_ua(11.0, channel=1)
        assert back.labels["BiasCurrent"] == [11.0, 0.0, 0.0, 0.0]
        det.safe_state()
        det.close()
        assert back.labels["BiasCurrent"] == [0.0] * 4
        assert back.labels["DetectorEnable"] is False
    finally:
        back.stop()


def test_safe_state_reconnects_once_when_the_link_was_lost(server):
    det = make(server, {"bias_current_ua": 10.0}, timeout_s=0.2)
    det.connect()
    det.bias_on()
    server.stop()
    back = FakeSq(port=server.port, counts_port=server.counts_port)
    back.labels["BiasCurrent"] = [10.0] * 4
    back.labels["DetectorEnable"] = True
    try:
        with det:  # already connected: __exit__ makes it safe over a fresh link
            pass
        assert back.labels["BiasCurrent"] == [0.0] * 4
        assert back.labels["DetectorEnable"] is False
    finally:
        back.stop()


def test_safe_state_on_an_exception(server):
    with pytest.raises(KeyboardInterrupt), make(server, {"bias_current_ua": 9.0}) as det:
        det.bias_on()
        assert server.labels["BiasCurrent"] == [9.0] * 4
        raise KeyboardInterrupt
    assert server.labels["BiasCurrent"] == [0.0] * 4
    assert server.labels["DetectorEnable"] is False
