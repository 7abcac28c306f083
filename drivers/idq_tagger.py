"""ID Quantique ID900 / ID1000 Time Controller: SCPI over ZeroMQ, time tags from its DataLink.

Control: SCPI text commands on a ZeroMQ REQ socket, port 5555 of the Time
Controller (``resource = "169.254.99.100"`` or ``"tcp://169.254.99.100:5555"``),
through :class:`~qkdctl.drivers.transport.ZmqReqLink` (timeouts, reopen after
a lost reply).

Time tags do not come from the Time Controller's SCPI port: the Time
Controller sends them to ID Quantique's *DataLinkTargetService* (DLT), a
program of the Time Controller software that runs on the host computer. The
driver controls the DLT on its own ZeroMQ REQ port (6060, JSON replies) and
receives each input's time tags from it on a ZeroMQ PAIR socket (port
4241 + input), as ID Quantique's example programs do:

- per mapped input ``n`` (1..4): ``RAW<n>:ERRORS:CLEAR``; DLT ``start-stream
  --address <Time Controller> --channel <n> --stream-port <4241+n>`` (its reply
  holds the acquisition ``id``); ``RAW<n>:SEND ON``;
- acquisition timer: ``REC:TRIG:ARM:MODE MANUal``, ``REC:ENABle ON``,
  ``REC:STOP``, ``REC:NUM INF``, ``REC:PWID <ps>``, ``REC:PPER <ps>``, then
  ``REC:PLAY``: an endless series of *sub-acquisitions* of ``PWID`` ps, one
  every ``PPER`` ps (``PPER - PWID`` >= 40 ns of dead time between them);
- stream messages: little-endian uint64 timestamps of one input, each message
  one sub-acquisition, times counted from the start of that sub-acquisition
  (every input's raw stream has ``RAW<n>:REF:LINK NONE``);
- end: ``REC:STOP``, DLT ``stop --id <id>`` (its status lists errors),
  ``RAW<n>:SEND OFF``, ``RAW<n>:ERRORS?``.

The driver places sub-acquisition ``k`` at ``k * PPER`` ps, merges the inputs
and sorts. Tags in the dead time between sub-acquisitions are not recorded;
blocks lag the acquisition by up to one sub-acquisition (a sub-acquisition's
tags arrive when it ends).

Connecting reads ``*IDN?`` (an ID900 or ID1000 is required) and
``DEVI:RES:BWID?`` and applies the configured setpoints, nothing else. Signal path
set up by ``start()``, for every mapped input ``n``:
``INPU<n>:ENAB ON``, ``DELA<n>:LINK INPU<n>``, ``TSCO<n>:FIR:LINK DELA<n>``,
``TSCO<n>:OPIN ONLYFIR``, ``TSCO<n>:OPOU ONLYFIR``, ``TSCO<n>:WIND:ENAB OFF``,
``RAW<n>:STOP:LINK TSCO<n>``, ``RAW<n>:REF:LINK NONE`` (input -> delay block ->
combiner -> raw time-tag stream), so that ``input_delay_ps`` (``DELA<n>:VALU``)
applies to the tags. ``start()`` first asks the DataLink for its acquisitions
(``list``): if it is not running, nothing is changed.

**What could not be verified against the instrument** (only against ID
Quantique's public example programs and public client code): that the
timestamps are in ps (the examples add ``PPER`` in ps to them); that the DLT
sends exactly one message per sub-acquisition and input; the DLT's ``status``
fields (``acquisitions_count``, ``inactivity``, ``error``); the reply of the
Time Controller to a rejected command. The driver therefore trusts none of it
silently:

- every set command must be answered with an empty reply (as the examples
  expect); any other reply is reported as a device error with its text;
- a sub-acquisition is handed out only once the DLT's ``acquisitions_count`` of
  every input equals the number of messages received on it; a count that does
  not settle within ``timeout_s`` (a message missing, e.g. for an empty
  sub-acquisition, or one sub-acquisition split in two) is an error, since
  the stream could no longer be placed in time;
- a message whose timestamps decrease or exceed ``PPER`` is an error;
- ``RAW<n>:ERRORS?`` other than 0, a DLT status with an ``error``, or a DLT
  stop status with errors is data loss: an error.

Every such error refuses the block being read, stops the acquisition and ends
the run (later reads say why); a block with a gap is never returned as
complete. A stopped run cannot be resumed (the sub-acquisition count restarts
with ``REC:PLAY``); ``finish()`` ends it, ``start()`` then begins a new run.

Settings (all optional except ``inputs``):

- ``inputs``: table, input (1..4) -> bench channel, ``inputs = { "1" = 0, "2" = 1 }``;
  it, the sub-acquisition timing, ``dlt_address`` and ``stream_port_base`` are
  read when the instrument is built;
- ``threshold_v`` (``INPU<n>:THRE <V>V``), ``edge`` ``"rising"``/``"falling"``
  (``INPU<n>:EDGE``), ``coupling`` ``"dc"``/``"ac"`` (``INPU<n>:COUP``),
  ``input_delay_ps`` (``DELA<n>:VALU``): one value for every mapped input or a
  table ``{"<input>" = value}``;
- ``clock``: ``"internal"`` or ``"external"`` (``DEVI:SYNC``; ``EXTERNAL`` is the
  form seen in public client code, ``INTERNAL`` its counterpart);
- ``sub_acquisition_s`` (default 0.5, at least 0.2 as ID Quantique advises),
  ``sub_acquisition_gap_ns`` (default 400, at least 40);
- ``dlt_address`` (default ``"127.0.0.1:6060"``), ``stream_port_base``
  (default 4241: input ``n`` streams on ``4241 + n``).

Limits: ``min_threshold_v``, ``max_threshold_v`` bound every threshold.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from qkdctl.errors import InstrumentError, LimitError

from .base import STATIC, Identity, TimeTagger
from .scpi import ScpiInstrument, parse_idn
from .transport import DEFAULT_TIMEOUT_S, Link, open_link

__all__ = ["IdqTimeController"]

log = logging.getLogger(__name__)

SCPI_PORT = 5555
DLT_ADDRESS = "127.0.0.1:6060"
STREAM_PORT_BASE = 4241
INPUTS = (1, 2, 3, 4)
MODELS = ("ID900", "ID1000")

_WORDS = {"edge": {"rising": "RISING", "falling": "FALLING"},
          "coupling": {"dc": "DC", "ac": "AC"},
          "clock": {"internal": "INTERNAL", "external": "EXTERNAL"}}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _whole(value: Any) -> int | None:
    v = _number(value)
    return int(round(v)) if v is not None and v == round(v) else None


def _scpi_resource(resource: str) -> str:
    r = (resource or "").strip()
    if r.startswith("tcp://"):
        r = r[len("tcp://"):]
    if r and not r.rsplit(":", 1)[-1].isdigit():
        r = f"{r}:{SCPI_PORT}"
    return f"tcp://{r}" if r else ""


@dataclass
class _Stream:
    """One input's time-tag stream from the DataLink."""

    input: int
    bench: int
    port: int
    socket: Any
    acq_id: str = ""
    messages: list[np.ndarray] = field(default_factory=list)
    ended: bool = False


class IdqTimeController(ScpiInstrument, TimeTagger):
    """An ID Quantique ID900 or ID1000 Time Controller (see the module docstring)."""

    ERROR_QUERY = None  # no error queue is documented publicly; replies are checked instead
    LINK_OPTIONS: ClassVar[dict[str, Any]] = {"kind": "zmq"}
    SETTINGS = {
        "inputs": STATIC,
        "clock": "set_clock",
        "threshold_v": "set_threshold_v",
        "edge": "set_edge",
        "coupling": "set_coupling",
        "input_delay_ps": "set_input_delay_ps",
        "sub_acquisition_s": STATIC,
        "sub_acquisition_gap_ns": STATIC,
        "dlt_address": STATIC,
        "stream_port_base": STATIC,
    }
    LIMITS = {"min_threshold_v": "V", "max_threshold_v": "V"}
    PER_INPUT: ClassVar[tuple[str, ...]] = ("threshold_v", "edge", "coupling", "input_delay_ps")

    #: seconds without a new DataLink message before a finished run is taken as complete
    settle_s: float = 1.0
    #: seconds between two drains of the streams while a block is read
    poll_s: float = 0.05

    def __init__(self, name: str = "tagger", *, resource: str = "", backend: str = "",
                 timeout_s: float = DEFAULT_TIMEOUT_S, link: Link | None = None,
                 dlt_link: Link | None = None, **kwargs: Any):
        super().__init__(name, resource=_scpi_resource(resource), backend="",
                         timeout_s=timeout_s, link=link, **kwargs)
        self.timeout_s = float(timeout_s)
        self._inputs = self._parse_inputs(self.settings.get("inputs"))
        for key in self.PER_INPUT:
            value = self.settings.get(key)
            if isinstance(value, Mapping):
                for inp in value:
                    if _whole(_number_or_none(inp)) not in self._inputs:
                        self._config_fail(f"settings.{key}.{inp}", f"input {inp} is not in "
                                          "settings.inputs ("
                                          f"{', '.join(map(str, self._inputs))})")
        s = self.settings
        sub = float(s.get("sub_acquisition_s", 0.5))
        gap = float(s.get("sub_acquisition_gap_ns", 400.0))
        self.pwid_ps = int(round(sub * 1e12))
        self.pper_ps = self.pwid_ps + int(round(gap * 1e3))
        dlt = str(s.get("dlt_address", DLT_ADDRESS)).strip()
        if dlt.startswith("tcp://"):
            dlt = dlt[len("tcp://"):]
        if ":" not in dlt:
            self._config_fail("settings.dlt_address", f"{dlt!r}: expected host:port")
        self.dlt_host = dlt.rsplit(":", 1)[0].strip("[]")
        self.stream_port_base = int(s.get("stream_port_base", STREAM_PORT_BASE))
        self.tc_host = self.link.resource[len("tcp://"):].rsplit(":", 1)[0] \
            if self.link.resource.startswith("tcp://") else self.link.resource
        self.dlt = dlt_link if dlt_link is not None else open_link(
            f"{name}: DataLink", f"tcp://{dlt}", kind="zmq", timeout_s=timeout_s)
        self._streams: dict[int, _Stream] = {}
        self._state = "idle"  # idle, running, stopped, failed, finished
        self._failure = ""
        self._emitted = 0
        self._bin_width_ps: int | None = None
        self._idn = None
        self._tags_read = 0

    # -- configuration ----------------------------------------------------------------------
    def _parse_inputs(self, value: Any) -> dict[int, int]:
        if value is None:
            self._config_fail("settings.inputs", "missing; map the Time Controller's inputs "
                              '(1..4) to the bench channels, e.g. inputs = { "1" = 0, "2" = 1 }')
        if not isinstance(value, Mapping) or not value:
            self._config_fail("settings.inputs", f"expected a table input -> bench channel, "
                              f"got {value!r}")
        out: dict[int, int] = {}
        seen: dict[int, int] = {}
        for key, ch in value.items():
            k = _whole(_number_or_none(key))
            if k not in INPUTS:
                self._config_fail(f"settings.inputs.{key}", "an input with a time-tag stream "
                                  "is 1, 2, 3 or 4")
            c = _whole(ch)
            if c is None or not 0 <= c <= 254:
                self._config_fail(f"settings.inputs.{key}", f"bench channel {ch!r} is not an "
                                  "integer 0..254")
            if c in seen:
                self._config_fail(f"settings.inputs.{key}", f"bench channel {c} is already "
                                  f"input {seen[c]}")
            seen[c] = k
            out[k] = c
        return dict(sorted(out.items()))

    def _check_setting(self, key: str, value: Any) -> str | None:
        if key == "inputs":
            return None
        if key == "dlt_address":
            return None if isinstance(value, str) and value.strip() else \
                f"{value!r}: expected host:port"
        if key == "stream_port_base":
            p = _whole(value)
            return None if p is not None and 1024 <= p <= 65530 else \
                f"{value!r}: expected a port number 1024..65530"
        if key == "sub_acquisition_s":
            v = _number(value)
            return None if v is not None and 0.2 <= v <= 3600 else \
                f"{value!r}: expected 0.2 to 3600 s (ID Quantique advises at least 0.2 s)"
        if key == "sub_acquisition_gap_ns":
            v = _number(value)
            return None if v is not None and 40 <= v <= 1e6 else \
                f"{value!r}: expected 40 to 1e6 ns (the Time Controller needs at least 40 ns)"
        values = value.values() if isinstance(value, Mapping) and key in self.PER_INPUT \
            else [value]
        for v in values:
            if key in _WORDS:
                if not isinstance(v, str) or v.lower() not in _WORDS[key]:
                    return f"{v!r}: expected one of {', '.join(_WORDS[key])}"
            elif key == "input_delay_ps":
                if _whole(v) is None or v < 0:
                    return f"{v!r}: expected a whole number of ps >= 0"
            else:
                x = _number(v)
                if x is None:
                    return f"expected a finite number, got {v!r}"
                problem = self._threshold_problem(x)
                if problem:
                    return problem
        return None

    def _threshold_problem(self, volts: float) -> str | None:
        lo = self.limits.get("min_threshold_v")
        hi = self.limits.get("max_threshold_v")
        if lo is not None and volts < lo:
            return f"{volts:g} V is below the limit min_threshold_v = {lo:g} V"
        if hi is not None and volts > hi:
            return f"{volts:g} V is above the limit max_threshold_v = {hi:g} V"
        return None

    def _apply_setting(self, key: str, value: Any) -> None:
        if self.SETTINGS[key] == STATIC:
            if value != self.settings.get(key):
                raise InstrumentError(f"{self.name}: configure: {key} is fixed when the "
                                      "instrument is built (change it in the bench file)")
            return
        setter = getattr(self, self.SETTINGS[key])
        if key in self.PER_INPUT and isinstance(value, Mapping):
            for inp, v in value.items():
                setter(v, input=_whole(_number_or_none(inp)))
        else:
            setter(value)

    def _targets(self, input: int | None, command: str) -> list[int]:
        if input is None:
            return list(self._inputs)
        if input not in self._inputs:
            raise InstrumentError(f"{self.name}: {command}: input {input!r} is not in "
                                  f"settings.inputs ({', '.join(map(str, self._inputs))})")
        return [int(input)]

    # -- SCPI -------------------------------------------------------------------------------
    @staticmethod
    def _is_error_reply(reply: str) -> bool:
        r = reply.strip().upper()
        return r.startswith(("ERROR", "ERR:", "ERR ")) or "SCPI_ERR" in r

    def send(self, command: str) -> None:
        """Send a set command; any non-empty reply is the device refusing it."""
        reply = self.link.query(command)
        if reply.strip():
            raise InstrumentError(f"{self.name}: {command}: device error: {reply.strip()[:80]!r}"
                                  f" ({self.link.resource})")

    def ask(self, command: str) -> str:
        reply = self.link.query(command)
        if reply == "":
            raise self.link.fail(f"query {command!r}", "empty reply")
        if self._is_error_reply(reply):
            raise InstrumentError(f"{self.name}: {command}: device error: {reply.strip()[:80]!r}"
                                  f" ({self.link.resource})")
        return reply

    def _ask_int(self, command: str) -> int:
        v = self.ask_float(command)
        if v != round(v):
            raise self.link.fail(f"query {command!r}", f"expected an integer, got {v!r}")
        return int(round(v))

    # -- DataLink ---------------------------------------------------------------------------
    def _dlt(self, command: str) -> Any:
        reply = self.dlt.query(command)
        if not reply.strip():
            return None
        try:
            answer = json.loads(reply)
        except ValueError:
            raise self.dlt.fail(f"query {command!r}", f"garbled reply {reply[:60]!r} "
                                                      "(expected JSON)") from None
        if isinstance(answer, dict) and answer.get("error"):
            err = answer["error"]
            text = err.get("description") if isinstance(err, dict) else err
            raise InstrumentError(f"{self.name}: DataLink {command!r}: {text or err}")
        return answer

    # -- connection -------------------------------------------------------------------------
    def _on_open(self) -> None:
        self._idn = parse_idn(self.ask("*IDN?"))
        model = self._idn.model.upper().replace(" ", "")
        if not any(m in model for m in MODELS):
            raise InstrumentError(f"{self.name}: connect: the instrument at "
                                  f"{self.link.resource} is {self._idn.make} {self._idn.model},"
                                  " not an ID Quantique ID900 or ID1000 Time Controller")
        self._bin_width_ps = self._ask_int("DEVI:RES:BWID?")
        self.dlt.open()  # no traffic yet: the DataLink is first asked at start()
        log.info("%s: %s %s S/N %s, %s ps bins", self.name, self._idn.make, self._idn.model,
                 self._idn.serial, self._bin_width_ps)

    def _open(self) -> None:
        try:
            super()._open()
        except BaseException:
            self.dlt.close()
            self.link.close()
            raise

    def _close(self) -> None:
        try:
            self._teardown(report=False)
        finally:
            self.dlt.close()
            super()._close()

    def _identity(self) -> Identity:
        return self._idn if self._idn is not None else parse_idn(self.ask("*IDN?"))

    def _status(self) -> dict[str, Any]:
        errors = {n: self._ask_int(f"RAW{n}:ERRORS?") for n in self._inputs}
        return {"model": self._idn.model if self._idn else None,
                "state": self._state, "failure": self._failure or None,
                "record_stage": self.ask("REC:STAGe?"), "bin_width_ps": self._bin_width_ps,
                "raw_errors": errors, "sub_acquisition_ps": self.pwid_ps,
                "sub_acquisition_period_ps": self.pper_ps,
                "sub_acquisitions_read": self._emitted, "tags_read": self._tags_read,
                "inputs": dict(self._inputs)}

    # -- setpoints --------------------------------------------------------------------------
    def set_threshold_v(self, volts: float, input: int | None = None) -> None:
        """Set the discriminator threshold in V of one input (None: every mapped input)."""
        v = _number(volts)
        problem = f"{volts!r} is not a finite voltage" if v is None else \
            self._threshold_problem(v)
        if problem:
            raise LimitError(f"{self.name}: set_threshold_v: {problem}")
        targets = self._targets(input, "set_threshold_v")
        self._require("set_threshold_v")
        for n in targets:
            self.send(f"INPU{n}:THRE {v:g}V")
        log.info("%s: threshold %g V on input(s) %s", self.name, v, targets)

    def _set_word(self, key: str, scpi: str, value: str, input: int | None) -> None:
        if not isinstance(value, str) or value.lower() not in _WORDS[key]:
            raise InstrumentError(f"{self.name}: set_{key}: {value!r}: expected one of "
                                  f"{', '.join(_WORDS[key])}")
        word = _WORDS[key][value.lower()]
        targets = self._targets(input, f"set_{key}")
        self._require(f"set_{key}")
        for n in targets:
            self.send(f"INPU{n}:{scpi} {word}")
        log.info("%s: %s %s on input(s) %s", self.name, key, word, targets)

    def set_edge(self, edge: str, input: int | None = None) -> None:
        """Set the active edge (``"rising"``/``"falling"``) of one input (None: all)."""
        self._set_word("edge", "EDGE", edge, input)

    def set_coupling(self, coupling: str, input: int | None = None) -> None:
        """Set the coupling (``"dc"``/``"ac"``) of one input (None: all)."""
        self._set_word("coupling", "COUP", coupling, input)

    def set_input_delay_ps(self, delay_ps: int, input: int | None = None) -> None:
        """Set the delay block of one input, in ps (None: every mapped input)."""
        d = _whole(delay_ps)
        if d is None or d < 0:
            raise LimitError(f"{self.name}: set_input_delay_ps: {delay_ps!r} is not a whole "
                             "number of ps >= 0")
        targets = self._targets(input, "set_input_delay_ps")
        self._require("set_input_delay_ps")
        for n in targets:
            self.send(f"DELA{n}:VALU {d}")
        log.info("%s: delay %d ps on input(s) %s", self.name, d, targets)

    def set_clock(self, clock: str) -> None:
        """Use the internal clock or an external reference (``DEVI:SYNC``)."""
        if not isinstance(clock, str) or clock.lower() not in _WORDS["clock"]:
            raise InstrumentError(f"{self.name}: set_clock: {clock!r}: expected internal or "
                                  "external")
        self._require("set_clock")
        self.send(f"DEVI:SYNC {_WORDS['clock'][clock.lower()]}")

    # -- acquisition ------------------------------------------------------------------------
    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(sorted(self._inputs.values()))

    @property
    def resolution_ps(self) -> int:
        return 1  # the streamed timestamps are integer ps

    def _get_running(self) -> bool:
        return self._state == "running"

    def _idle_hint(self) -> str:
        if self._state == "failed":
            return f"the run was aborted: {self._failure}; call finish(), then start() a new run"
        if self._state == "stopped":
            return "the run is stopped; call finish() to collect its last tags"
        return super()._idle_hint()

    def _start(self) -> None:
        if self._state == "running":
            return
        if self._state in ("stopped", "failed"):
            raise InstrumentError(f"{self.name}: start: a stopped run cannot be resumed (the "
                                  "sub-acquisition count restarts with REC:PLAY); call "
                                  "finish(), then start() a new run")
        self._dlt("list")  # the DataLink must answer before anything is changed
        for n in self._inputs:
            for cmd in (f"INPU{n}:ENAB ON", f"DELA{n}:LINK INPU{n}", f"TSCO{n}:FIR:LINK DELA{n}",
                        f"TSCO{n}:OPIN ONLYFIR", f"TSCO{n}:OPOU ONLYFIR",
                        f"TSCO{n}:WIND:ENAB OFF", f"RAW{n}:STOP:LINK TSCO{n}",
                        f"RAW{n}:REF:LINK NONE"):
                self.send(cmd)
        for cmd in ("REC:TRIG:ARM:MODE MANUal", "REC:ENABle ON", "REC:STOP", "REC:NUM INF",
                    f"REC:PWID {self.pwid_ps}", f"REC:PPER {self.pper_ps}"):
            self.send(cmd)
        import zmq

        self._emitted = 0
        self._failure = ""
        try:
            for n, bench in self._inputs.items():
                self.send(f"RAW{n}:ERRORS:CLEAR")
                port = self.stream_port_base + n
                sock = zmq.Context.instance().socket(zmq.PAIR)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, 0)
                sock.connect(f"tcp://{self.dlt_host}:{port}")
                st = _Stream(n, bench, port, sock)
                self._streams[n] = st
                answer = self._dlt(f"start-stream --address {self.tc_host} --channel {n} "
                                   f"--stream-port {port}")
                if not isinstance(answer, dict) or not answer.get("id"):
                    raise InstrumentError(f"{self.name}: DataLink start-stream (input {n}): "
                                          f"no acquisition id in its reply {answer!r}")
                st.acq_id = str(answer["id"])
                self.send(f"RAW{n}:SEND ON")
            self.send("REC:PLAY")
        except BaseException:
            self._teardown(report=False)
            raise
        self._state = "running"

    def _stop(self) -> None:
        if self._state == "running":
            self._state = "stopped"
            self.send("REC:STOP")

    def _safe_state(self) -> None:
        if self._state == "running":
            self._state = "stopped"
        self.send("REC:STOP")

    def _read_block(self, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
        deadline = time.monotonic() + duration_s
        while True:
            self._drain("read_block")
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(self.poll_s, deadline - now))
        return self._collect("read_block", final=False)

    def _finish(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            if self._state == "running":
                self._stop()
            if self._state == "stopped" and self._streams:
                out = self._collect("finish", final=True)
                self._teardown(report=True)
                return out
            return np.empty(0, np.int64), np.empty(0, np.uint8)
        finally:
            if self._state != "failed":
                self._teardown(report=False)
            self._state = "finished"

    # -- streams ----------------------------------------------------------------------------
    def _fail(self, command: str, why: str) -> None:
        self._failure = why
        self._state = "failed"
        try:
            self.send("REC:STOP")
        except InstrumentError as e:
            log.error("%s: %s", self.name, e)
        self._teardown(report=False)
        raise InstrumentError(f"{self.name}: {command}: {why}; the run is stopped")

    def _drain(self, command: str) -> None:
        import zmq

        for st in self._streams.values():
            while True:
                try:
                    msg = st.socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(msg) == 0:
                    st.ended = True
                    continue
                if st.ended or len(msg) % 8:
                    self._fail(command, f"input {st.input}: unexpected DataLink message of "
                               f"{len(msg)} bytes" + (" after the end of its stream"
                                                      if st.ended else
                                                      " (not whole 64-bit timestamps)"))
                t = np.frombuffer(msg, dtype="<u8")
                if t.shape[0] and (int(t[-1]) >= self.pper_ps or
                                   not bool(np.all(t[1:] >= t[:-1]))):
                    self._fail(command, f"input {st.input}: the timestamps of sub-acquisition "
                               f"{len(st.messages)} do not fit in one sub-acquisition period "
                               f"of {self.pper_ps} ps (or decrease); the stream cannot be placed"
                               " in time")
                st.messages.append(t.astype(np.int64))

    def _counts(self, command: str) -> dict[int, dict[str, Any]]:
        out = {}
        for n, st in self._streams.items():
            status = self._dlt(f"status --id {st.acq_id}")
            if not isinstance(status, dict) or "acquisitions_count" not in status:
                self._fail(command, f"input {n}: DataLink status without acquisitions_count: "
                           f"{str(status)[:80]}")
            if status.get("error"):
                self._fail(command, f"input {n}: DataLink reports {status['error']}")
            out[n] = status
        return out

    def _collect(self, command: str, final: bool) -> tuple[np.ndarray, np.ndarray]:
        """Wait (up to timeout_s, or for the run to settle) until the DataLink's count of
        sub-acquisitions matches the messages of every input; hand out what is complete."""
        start = time.monotonic()
        limit = self.timeout_s + (self.settle_s if final else 0.0)
        while True:
            self._drain(command)
            status = self._counts(command)
            self._drain(command)
            counts = {n: int(s["acquisitions_count"]) for n, s in status.items()}
            got = {n: len(st.messages) for n, st in self._streams.items()}
            settled = len(set(counts.values())) == 1 and counts == got
            if settled and final:
                idle = [float(s.get("inactivity", 0.0)) for s in status.values()]
                settled = min(idle) >= self.settle_s
            if settled:
                break
            if time.monotonic() - start > limit:
                detail = ", ".join(f"input {n}: {counts[n]} registered, {got[n]} received"
                                   for n in self._streams)
                self._fail(command, f"the DataLink's sub-acquisitions and the streamed messages"
                           f" disagree ({detail}); a message is missing or split, so the "
                           "stream cannot be placed in time")
            time.sleep(0.01)
        for n in self._streams:
            errors = self._ask_int(f"RAW{n}:ERRORS?")
            if errors:
                self._fail(command, f"the Time Controller reports {errors} time-tag "
                           f"acquisition error(s) on input {n} (RAW{n}:ERRORS?): tags were lost")
        k_end = next(iter(counts.values())) if counts else 0
        return self._merge(k_end)

    def _merge(self, k_end: int) -> tuple[np.ndarray, np.ndarray]:
        ts_parts, ch_parts = [], []
        for k in range(self._emitted, k_end):
            offset = np.int64(k) * np.int64(self.pper_ps)
            t = [st.messages[k] + offset for st in self._streams.values()]
            c = [np.full(st.messages[k].shape[0], st.bench, np.uint8)
                 for st in self._streams.values()]
            ts = np.concatenate(t) if t else np.empty(0, np.int64)
            ch = np.concatenate(c) if c else np.empty(0, np.uint8)
            order = np.argsort(ts, kind="stable")
            ts_parts.append(ts[order])
            ch_parts.append(ch[order])
            for st in self._streams.values():
                st.messages[k] = st.messages[k][:0]  # release the memory, keep the index
        self._emitted = max(self._emitted, k_end)
        if not ts_parts:
            return np.empty(0, np.int64), np.empty(0, np.uint8)
        ts, ch = np.concatenate(ts_parts), np.concatenate(ch_parts)
        self._tags_read += ts.shape[0]
        return ts, ch

    def _teardown(self, report: bool) -> None:
        """Stop the DataLink acquisitions and the raw streams; close the sockets.

        With ``report``, errors the DataLink or the Time Controller list are raised.
        """
        streams, self._streams = self._streams, {}
        problems = []
        for n, st in streams.items():
            try:
                if st.acq_id:
                    answer = self._dlt(f"stop --id {st.acq_id}")
                    status = answer.get("status", {}) if isinstance(answer, dict) else {}
                    for err in status.get("errors", []) or []:
                        text = err.get("description") if isinstance(err, dict) else err
                        problems.append(f"input {n}: DataLink: {text}")
                self.send(f"RAW{n}:SEND OFF")
                if report:
                    errors = self._ask_int(f"RAW{n}:ERRORS?")
                    if errors:
                        problems.append(f"input {n}: {errors} acquisition error(s) "
                                        f"(RAW{n}:ERRORS?)")
            except InstrumentError as e:
                if report:
                    raise
                log.debug("%s: closing the stream of input %d: %s", self.name, n, e)
            finally:
                st.socket.close(linger=0)
        if problems and report:
            self._failure = "; ".join(problems)
            self._state = "failed"
            raise InstrumentError(f"{self.name}: finish: the end of the run lost tags: "
                                  f"{self._failure}")


def _number_or_none(key: Any) -> float | None:
    """A table key ("1", 1) as a number, or None."""
    try:
        return float(str(key).strip())
    except ValueError:
        return None
