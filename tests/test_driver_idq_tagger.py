"""ID Quantique ID900 / ID1000 driver against loopback ZeroMQ servers (127.0.0.1).

- a REP server thread speaking SCPI stands in for the Time Controller: it records
  every command, answers queries from a table and set commands with an empty
  reply (or, for the fault tests, with nothing, garbage or a device error);
- a REP server thread speaking the DataLinkTargetService's JSON commands
  (``list``, ``start-stream``, ``status``, ``stop``);
- the test binds the DataLink's PAIR stream sockets itself and sends the
  sub-acquisitions' timestamps (little-endian uint64) on them.
"""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest

from qkdctl.drivers import STATIC
from qkdctl.drivers.idq_tagger import IdqTimeController
from qkdctl.errors import ConfigError, InstrumentError, LimitError

zmq = pytest.importorskip("zmq")

IDN = "ID Quantique,ID1000,1903012T010,7.3.1"
QUERIES = {"*IDN?": IDN, "DEVI:RES:BWID?": "1", "REC:STAGe?": "PLAYING",
           **{f"RAW{n}:ERRORS?": "0" for n in range(1, 5)}}


class RepServer(threading.Thread):
    """A ZeroMQ REP server on 127.0.0.1 answering with ``self.answer(command)``.

    An answer of None leaves the request unanswered (the server then stops
    serving, as a hung instrument would).
    """

    def __init__(self, answer):
        super().__init__(daemon=True)
        self.answer = answer
        self.sock = zmq.Context.instance().socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.commands: list[str] = []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            if not self.sock.poll(20):
                continue
            cmd = self.sock.recv().decode()
            self.commands.append(cmd)
            reply = self.answer(cmd)
            if reply is None:
                self._halt.wait()
                break
            self.sock.send(reply if isinstance(reply, bytes) else reply.encode())

    def close(self):
        self._halt.set()
        self.join(2)
        self.sock.close(linger=0)


class Scpi(RepServer):
    def __init__(self, special=None):
        self.special = dict(special or {})
        super().__init__(self._answer)

    def _answer(self, cmd):
        if cmd in self.special:
            return self.special[cmd]
        if cmd.endswith("?"):
            return QUERIES.get(cmd, "")
        return ""


class DataLink(RepServer):
    def __init__(self):
        self.counts: dict[str, int] = {}
        self.errors: dict[str, list] = {}
        super().__init__(self._answer)

    def _answer(self, cmd):
        words = cmd.split()
        if words[0] == "list":
            return json.dumps(sorted(self.counts))
        if words[0] == "start-stream":
            ch = words[words.index("--channel") + 1]
            acq = f"acq{ch}"
            self.counts.setdefault(acq, 0)
            return json.dumps({"id": acq})
        acq = words[words.index("--id") + 1]
        if words[0] == "status":
            return json.dumps({"acquisitions_count": self.counts[acq], "inactivity": 5.0,
                               "error": None, "timestamps_count": 0})
        if words[0] == "stop":
            return json.dumps({"status": {"acquisitions_count": self.counts[acq],
                                          "errors": self.errors.get(acq, [])}})
        return json.dumps({"error": {"description": f"unknown command {words[0]}"}})


def stream_sockets(inputs):
    """PAIR sockets bound where the DataLink would stream inputs ``inputs``: (base, sockets)."""
    ctx = zmq.Context.instance()
    for _ in range(100):
        base = random.randint(20000, 60000)
        socks = {}
        try:
            for n in inputs:
                s = ctx.socket(zmq.PAIR)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDTIMEO, 3000)
                socks[n] = s
                s.bind(f"tcp://127.0.0.1:{base + n}")
            return base, socks
        except zmq.ZMQError:
            for s in socks.values():
                s.close(linger=0)
    raise RuntimeError("no free ports")


@pytest.fixture
def servers():
    made = []

    def make(special=None, with_dlt=True):
        scpi = Scpi(special)
        scpi.start()
        made.append(scpi)
        dlt = None
        if with_dlt:
            dlt = DataLink()
            dlt.start()
            made.append(dlt)
        return scpi, dlt

    yield make
    for s in made:
        s.close()


def tagger(scpi, dlt, timeout_s=1.0, **settings):
    s = {"inputs": {"1": 0, "2": 1}, "sub_acquisition_s": 0.2,
         "dlt_address": f"127.0.0.1:{dlt.port if dlt is not None else 9}"}
    s.update(settings)
    t = IdqTimeController("tagger", resource=f"127.0.0.1:{scpi.port}", timeout_s=timeout_s,
                          settings=s, limits={"min_threshold_v": -1.0, "max_threshold_v": 1.0},
                          config_key="bench.toml: instruments.tagger")
    t.settle_s = 0.0
    t.poll_s = 0.005
    return t


ROUTE = ["INPU{n}:ENAB ON", "DELA{n}:LINK INPU{n}", "TSCO{n}:FIR:LINK DELA{n}",
         "TSCO{n}:OPIN ONLYFIR", "TSCO{n}:OPOU ONLYFIR", "TSCO{n}:WIND:ENAB OFF",
         "RAW{n}:STOP:LINK TSCO{n}", "RAW{n}:REF:LINK NONE"]


def test_connect_sends_the_exact_commands(servers):
    scpi, dlt = servers()
    t = tagger(scpi, dlt, clock="external", threshold_v={"1": -0.2, "2": 0.5}, edge="falling",
               coupling="dc", input_delay_ps={"2": 1500})
    with t:
        ident = t.identity()
        assert (ident.make, ident.model, ident.serial) == \
            ("ID Quantique", "ID1000", "1903012T010")
        assert t.channels == (0, 1)
    assert scpi.commands == [
        "*IDN?", "DEVI:RES:BWID?",
        "DEVI:SYNC EXTERNAL", "INPU1:THRE -0.2V", "INPU2:THRE 0.5V",
        "INPU1:EDGE FALLING", "INPU2:EDGE FALLING", "INPU1:COUP DC", "INPU2:COUP DC",
        "DELA2:VALU 1500",
        "REC:STOP",  # the safe state on leaving the with block
    ]
    assert dlt.commands == []  # the DataLink is first asked at start()


def test_read_only_connection_changes_nothing(servers):
    """Built with its driver settings only (as the read-only instruments commands do),
    connecting and reading the status send queries only."""
    scpi, dlt = servers()
    t = tagger(scpi, dlt)
    assert {k for k, v in t.SETTINGS.items() if v == STATIC} >= {"inputs", "dlt_address"}
    t.connect()
    st = t.status()
    t.close()
    assert st["record_stage"] == "PLAYING" and st["raw_errors"] == {1: 0, 2: 0}
    assert all(c.endswith("?") for c in scpi.commands), scpi.commands


def send(sock, values):
    sock.send(np.asarray(values, "<u8").tobytes())


def test_sub_acquisitions_are_placed_merged_and_sorted(servers):
    scpi, dlt = servers()
    base, socks = stream_sockets((1, 2))
    t = tagger(scpi, dlt, stream_port_base=base)
    pper = t.pper_ps
    assert (t.pwid_ps, pper) == (200_000_000_000, 200_000_400_000)
    try:
        with t:
            n0 = len(scpi.commands)
            t.start()
            assert scpi.commands[n0:] == [c.format(n=n) for n in (1, 2) for c in ROUTE] + [
                "REC:TRIG:ARM:MODE MANUal", "REC:ENABle ON", "REC:STOP", "REC:NUM INF",
                "REC:PWID 200000000000", "REC:PPER 200000400000",
                "RAW1:ERRORS:CLEAR", "RAW1:SEND ON", "RAW2:ERRORS:CLEAR", "RAW2:SEND ON",
                "REC:PLAY"]
            assert dlt.commands == [
                "list",
                f"start-stream --address 127.0.0.1 --channel 1 --stream-port {base + 1}",
                f"start-stream --address 127.0.0.1 --channel 2 --stream-port {base + 2}"]
            # nothing is complete yet
            ts, ch = t.read_block(0)
            assert ts.shape == (0,)
            # sub-acquisition 0 ends
            send(socks[1], [10, 500, 9000])
            send(socks[2], [20, 400])
            dlt.counts.update(acq1=1, acq2=1)
            ts, ch = t.read_block(0.01)
            assert ts.dtype == np.int64 and ch.dtype == np.uint8
            assert ts.tolist() == [10, 20, 400, 500, 9000]
            assert ch.tolist() == [0, 1, 1, 0, 0]
            # sub-acquisition 1, then the run is stopped and finished
            send(socks[1], [5, 7])
            send(socks[2], [3, 199_000_000_000])
            dlt.counts.update(acq1=2, acq2=2)
            t.stop()
            ts, ch = t.finish()
            assert ts.tolist() == [pper + 3, pper + 5, pper + 7, pper + 199_000_000_000]
            assert ch.tolist() == [1, 0, 0, 1]
            st = t.status()
            assert (st["sub_acquisitions_read"], st["tags_read"]) == (2, 9)
        assert "REC:STOP" in scpi.commands
        assert "RAW1:SEND OFF" in scpi.commands and "RAW2:SEND OFF" in scpi.commands
        assert "stop --id acq1" in dlt.commands and "stop --id acq2" in dlt.commands
    finally:
        for s in socks.values():
            s.close(linger=0)


def test_a_missing_message_cannot_be_placed_and_ends_the_run(servers):
    scpi, dlt = servers()
    base, socks = stream_sockets((1, 2))
    t = tagger(scpi, dlt, timeout_s=0.3, stream_port_base=base)
    try:
        with t:
            t.start()
            send(socks[1], [10])
            send(socks[2], [20])
            send(socks[1], [30])  # input 2 sends nothing for sub-acquisition 1
            dlt.counts.update(acq1=2, acq2=2)
            with pytest.raises(InstrumentError) as e:
                t.read_block(0)
            msg = str(e.value)
            assert "\n" not in msg
            assert ("input 1: 2 registered, 2 received, input 2: 2 registered, 1 received"
                    in msg)
            assert "cannot be placed in time; the run is stopped" in msg
            assert scpi.commands[-3:] == ["REC:STOP", "RAW1:SEND OFF", "RAW2:SEND OFF"]
            with pytest.raises(InstrumentError, match="run was aborted: the DataLink's"):
                t.read_block(0)
            with pytest.raises(InstrumentError, match="cannot be resumed"):
                t.start()
            assert t.finish()[0].shape == (0,)
    finally:
        for s in socks.values():
            s.close(linger=0)


def test_timestamps_outside_the_sub_acquisition_are_refused(servers):
    scpi, dlt = servers()
    base, socks = stream_sockets((1,))
    t = tagger(scpi, dlt, inputs={"1": 0}, stream_port_base=base)
    try:
        with t:
            t.start()
            send(socks[1], [10, t.pper_ps + 1])
            dlt.counts.update(acq1=1)
            with pytest.raises(InstrumentError, match="do not fit in one sub-acquisition"):
                t.read_block(0.05)
    finally:
        socks[1].close(linger=0)


def test_raw_errors_of_the_time_controller_are_data_loss(servers):
    scpi, dlt = servers({"RAW1:ERRORS?": "3"})
    base, socks = stream_sockets((1,))
    t = tagger(scpi, dlt, inputs={"1": 0}, stream_port_base=base)
    try:
        with t:
            t.start()
            send(socks[1], [10])
            dlt.counts.update(acq1=1)
            with pytest.raises(InstrumentError, match=r"reports 3 time-tag acquisition "
                                                      r"error\(s\) on input 1"):
                t.read_block(0)
    finally:
        socks[1].close(linger=0)


def test_no_reply_is_a_timeout_naming_the_command(servers):
    scpi, dlt = servers({"DEVI:RES:BWID?": None})
    t = tagger(scpi, dlt, timeout_s=0.2)
    with pytest.raises(InstrumentError) as e:
        t.connect()
    assert str(e.value) == (f"tagger: query 'DEVI:RES:BWID?': no reply within 0.2 s "
                            f"(tcp://127.0.0.1:{scpi.port})")
    assert not t.connected


def test_datalink_not_running(servers):
    scpi, _ = servers(with_dlt=False)
    t = tagger(scpi, None, timeout_s=0.2)
    with t:
        n = len(scpi.commands)
        with pytest.raises(InstrumentError, match="tagger: DataLink: query 'list': no reply "
                                                  "within 0.2 s"):
            t.start()
        assert scpi.commands[n:] == []  # nothing was changed
        assert not t.running


@pytest.mark.parametrize("special, text", [
    ({"*IDN?": b"\xff\xfe\x80"}, "garbled reply"),
    ({"DEVI:RES:BWID?": "lots"}, "garbled reply 'lots' (expected a number)"),
    ({"*IDN?": "Keysight Technologies,33522B,MY1234,4.0"},
     "is Keysight Technologies 33522B, not an ID Quantique ID900 or ID1000"),
])
def test_garbled_or_foreign_replies(servers, special, text):
    scpi, dlt = servers(special)
    with pytest.raises(InstrumentError) as e:
        tagger(scpi, dlt).connect()
    assert text in str(e.value) and "\n" not in str(e.value)


def test_garbled_datalink_reply(servers):
    scpi, dlt = servers()
    dlt.answer = lambda cmd: "<html>"
    with tagger(scpi, dlt) as t, \
            pytest.raises(InstrumentError, match="DataLink: query 'list': garbled reply "
                                                 "'<html>' \\(expected JSON\\)"):
        t.start()


def test_device_errors_name_the_command(servers):
    scpi, dlt = servers({"INPU1:THRE 0.9V": "Error: value out of range",
                         "REC:STAGe?": "ERROR -113 undefined header"})
    t = tagger(scpi, dlt, threshold_v={"1": 0.9, "2": 0.1})
    with pytest.raises(InstrumentError) as e:
        t.connect()
    assert str(e.value) == (f"tagger: INPU1:THRE 0.9V: device error: 'Error: value out of "
                            f"range' (tcp://127.0.0.1:{scpi.port})")
    assert not t.connected
    with tagger(scpi, dlt) as t2:
        with pytest.raises(InstrumentError, match="REC:STAGe\\?: device error"):
            t2.status()


def test_threshold_limits_are_checked_before_anything_is_sent(servers):
    scpi, dlt = servers()
    with tagger(scpi, dlt) as t:
        n = len(scpi.commands)
        with pytest.raises(LimitError, match="1.5 V is above the limit max_threshold_v"):
            t.set_threshold_v(1.5, input=2)
        assert len(scpi.commands) == n
        t.set_threshold_v(-0.3, input=2)
        assert scpi.commands[-1] == "INPU2:THRE -0.3V"


@pytest.mark.parametrize("settings, text", [
    ({"inputs": None}, "settings.inputs: missing"),
    ({"inputs": {"5": 0}}, "settings.inputs.5: an input with a time-tag stream is 1, 2, 3 or 4"),
    ({"sub_acquisition_s": 0.1}, "at least 0.2 s"),
    ({"sub_acquisition_gap_ns": 10}, "at least 40 ns"),
    ({"edge": "up"}, "expected one of rising, falling"),
    ({"input_delay_ps": {"3": 10}}, "settings.input_delay_ps.3: input 3 is not in"),
])
def test_bad_settings_are_config_errors(settings, text):
    s = {"inputs": {"1": 0, "2": 1}, **settings}
    if s["inputs"] is None:
        del s["inputs"]
    with pytest.raises(ConfigError, match=text):
        IdqTimeController("tagger", resource="127.0.0.1", settings=s)


def test_resource_gets_the_default_scpi_port():
    t = IdqTimeController("tagger", resource="169.254.99.100", settings={"inputs": {"1": 0}})
    assert t.link.resource == "tcp://169.254.99.100:5555"
    assert t.tc_host == "169.254.99.100"
    assert t.dlt.resource == "tcp://127.0.0.1:6060"
