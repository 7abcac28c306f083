"""Swabian Instruments Time Tagger (Time Tagger 20, Ultra, X) through the vendor's module.

The vendor's ``TimeTagger`` Python module (installed with the Time Tagger
software from swabianinstruments.com) is imported when the instrument
connects, never when this module is imported: a bench without a Swabian tagger
does not need it.

``resource`` is the tagger's serial number (empty: the first tagger found,
``createTimeTagger``), or ``host:port`` / ``tcp://host:port`` of a Time Tagger
server (``createTimeTaggerNetwork``).

Acquisition: ``start()`` creates a ``TimeTagStream`` on the mapped inputs
(``n_max_events`` = the ``buffer_events`` setting) and starts it;
``read_block(d)`` collects the stream for ``d`` seconds, calling ``getData()``
every :attr:`SwabianTimeTagger.poll_s` (50 ms), and returns the tags sorted, in
ps, on the bench's channels. ``stop()`` stops the stream (its buffered tags are
kept); ``start()`` after ``stop()`` resumes it (the tagger's clock runs on, so
the run continues with a gap in time, as on every tagger); ``finish()`` stops
it and returns what is buffered.

Channels: the ``inputs`` setting maps Swabian channel numbers to the bench's
tagger channels, ``inputs = { "1" = 0, "2" = 1, "-3" = 2 }`` (negative numbers
are falling edges, as the Swabian software numbers them). Per-input settings
are keyed by the same Swabian channel numbers.

Data integrity: the stream marks lost data. A buffer that reports
``hasOverflows``, or holds any event that is not a time tag (event types:
0 TimeTag, 1 Error, 2 OverflowBegin, 3 OverflowEnd, 4 MissedEvents), or is
completely full (``size == n_max_events``: the stream discards events arriving
after that) means tags are missing. The block being read is then refused with
an :class:`~qkdctl.errors.InstrumentError` naming what was lost (time span,
missed events), the stream is stopped and the run is over: a block with a gap
is never returned as complete, and every later read of the run says why it was
aborted. ``finish()`` ends such a run (returning nothing); ``start()`` then
begins a new one. The number of aborted runs and the tagger's overflow count
are in :meth:`~SwabianTimeTagger.status`. Tags out of time order are refused
the same way.

Settings (all optional except ``inputs``):

- ``inputs`` (read when the instrument is built): table, Swabian channel ->
  bench channel;
- ``trigger_level_v``: trigger level in V (``setTriggerLevel``), one number for
  every mapped input or a table ``{"<channel>" = V}``;
- ``input_delay_ps``: input delay in ps (``setInputDelay``), number or table;
- ``dead_time_ps``: dead time in ps (``setDeadtime``; the tagger rounds it to
  its clock and the applied value is logged), number or table;
- ``buffer_events`` (read when the instrument is built): ``n_max_events`` of
  the stream (default 2^22).

Limits: ``min_trigger_level_v``, ``max_trigger_level_v`` bound every trigger
level, checked before anything is sent.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from qkdctl.errors import InstrumentError, LimitError

from .base import STATIC, Identity, TimeTagger

__all__ = ["SwabianTimeTagger"]

log = logging.getLogger(__name__)

#: the vendor module's name
MODULE = "TimeTagger"
MISSING = ("the Swabian Time Tagger driver needs the vendor's TimeTagger module "
           "(Time Tagger software from swabianinstruments.com)")
#: event types of ``TimeTagStreamBuffer.getEventTypes()``
EVENT_TYPES = {0: "TimeTag", 1: "Error", 2: "OverflowBegin", 3: "OverflowEnd",
               4: "MissedEvents"}
DEFAULT_BUFFER_EVENTS = 1 << 22


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _whole(value: Any) -> int | None:
    v = _number(value)
    return int(round(v)) if v is not None and v == round(v) else None


class SwabianTimeTagger(TimeTagger):
    """A Swabian Instruments Time Tagger (see the module docstring)."""

    SETTINGS = {
        "inputs": STATIC,
        "buffer_events": STATIC,
        "trigger_level_v": "set_trigger_level_v",
        "input_delay_ps": "set_input_delay_ps",
        "dead_time_ps": "set_dead_time_ps",
    }
    LIMITS = {"min_trigger_level_v": "V", "max_trigger_level_v": "V"}
    PER_INPUT: ClassVar[tuple[str, ...]] = ("trigger_level_v", "input_delay_ps", "dead_time_ps")

    #: seconds between two ``getData()`` calls while a block is read
    poll_s: float = 0.05

    def __init__(self, name: str = "tagger", *, resource: str = "", backend: str = "",
                 timeout_s: float = 2.0, **kwargs: Any):
        super().__init__(name, **kwargs)
        self.resource = (resource or "").strip()
        self.timeout_s = float(timeout_s)
        self._inputs = self._parse_inputs(self.settings.get("inputs"))
        n = self.settings.get("buffer_events", DEFAULT_BUFFER_EVENTS)
        self.buffer_events = int(n)
        for key in self.PER_INPUT:
            value = self.settings.get(key)
            if isinstance(value, Mapping):
                for ch in value:
                    if self._key(ch) not in self._inputs:
                        self._config_fail(f"settings.{key}.{ch}", f"channel {ch} is not in "
                                          "settings.inputs ("
                                          f"{', '.join(map(str, self._inputs))})")
        keys = np.array(sorted(self._inputs), np.int64)
        self._lut_keys = keys
        self._lut_vals = np.array([self._inputs[int(k)] for k in keys], np.uint8)
        self._tt: Any = None
        self._tagger: Any = None
        self._stream: Any = None
        self._state = "idle"  # idle, running, stopped, failed, finished
        self._failure = ""
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._last_ps = -(1 << 62)
        self._tags_read = 0
        self._runs_aborted = 0
        self._model = self._serial = self._firmware = ""

    # -- configuration ----------------------------------------------------------------------
    @staticmethod
    def _key(ch: Any) -> int | None:
        s = str(ch).strip()
        return int(s) if s.lstrip("-").isdigit() else None

    def _parse_inputs(self, value: Any) -> dict[int, int]:
        if value is None:
            self._config_fail("settings.inputs", "missing; map the Swabian channels to the "
                              'bench channels, e.g. inputs = { "1" = 0, "2" = 1 }')
        if not isinstance(value, Mapping) or not value:
            self._config_fail("settings.inputs", "expected a table Swabian channel -> bench "
                              f"channel, got {value!r}")
        out: dict[int, int] = {}
        seen: dict[int, int] = {}
        for key, ch in value.items():
            k = self._key(key)
            if k is None:
                self._config_fail(f"settings.inputs.{key}", "a Swabian channel is an integer "
                                  "(negative: falling edge)")
            c = _whole(ch)
            if c is None or not 0 <= c <= 254:
                self._config_fail(f"settings.inputs.{key}", f"bench channel {ch!r} is not an "
                                  "integer 0..254")
            if c in seen:
                self._config_fail(f"settings.inputs.{key}", f"bench channel {c} is already "
                                  f"Swabian channel {seen[c]}")
            seen[c] = k
            out[k] = c
        return out

    def _check_setting(self, key: str, value: Any) -> str | None:
        if key == "inputs":
            return None
        if key == "buffer_events":
            n = _whole(value)
            return None if n is not None and 1000 <= n <= 1 << 31 else \
                f"{value!r}: expected a whole number of events from 1000 to 2^31"
        values = value.values() if isinstance(value, Mapping) else [value]
        for v in values:
            x = _number(v)
            if x is None:
                return f"expected a finite number, got {v!r}"
            if key == "trigger_level_v":
                problem = self._level_problem(x)
                if problem:
                    return problem
            elif key == "dead_time_ps" and x < 0:
                return f"{x:g} ps: a dead time cannot be negative"
        return None

    def _level_problem(self, volts: float) -> str | None:
        lo = self.limits.get("min_trigger_level_v")
        hi = self.limits.get("max_trigger_level_v")
        if lo is not None and volts < lo:
            return f"{volts:g} V is below the limit min_trigger_level_v = {lo:g} V"
        if hi is not None and volts > hi:
            return f"{volts:g} V is above the limit max_trigger_level_v = {hi:g} V"
        return None

    def _apply_setting(self, key: str, value: Any) -> None:
        if self.SETTINGS[key] == STATIC:
            if value != self.settings.get(key):
                raise InstrumentError(f"{self.name}: configure: {key} is fixed when the "
                                      "instrument is built (change it in the bench file)")
            return
        setter = getattr(self, self.SETTINGS[key])
        if isinstance(value, Mapping):
            for ch, v in value.items():
                setter(v, input=self._key(ch))
        else:
            setter(value)

    def _targets(self, input: int | None, command: str) -> list[int]:
        if input is None:
            return sorted(self._inputs)
        k = self._key(input)
        if k not in self._inputs:
            raise InstrumentError(f"{self.name}: {command}: channel {input!r} is not in "
                                  f"settings.inputs ({', '.join(map(str, self._inputs))})")
        return [k]

    # -- vendor calls -----------------------------------------------------------------------
    def _vendor(self, what: str, fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # the vendor module raises RuntimeError, ValueError, ...
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InstrumentError(f"{self.name}: {what}: {text}") from None

    # -- setpoints --------------------------------------------------------------------------
    def set_trigger_level_v(self, volts: float, input: int | None = None) -> None:
        """Set the trigger level in V of one Swabian channel (None: every mapped one)."""
        v = _number(volts)
        problem = f"{volts!r} is not a finite voltage" if v is None else self._level_problem(v)
        if problem:
            raise LimitError(f"{self.name}: set_trigger_level_v: {problem}")
        targets = self._targets(input, "set_trigger_level_v")
        self._require("set_trigger_level_v")
        for ch in targets:
            self._vendor(f"setTriggerLevel({ch}, {v:g})", self._tagger.setTriggerLevel, ch, v)
        log.info("%s: trigger level %g V on channel(s) %s", self.name, v, targets)

    def set_input_delay_ps(self, delay_ps: int, input: int | None = None) -> None:
        """Set the input delay in ps of one Swabian channel (None: every mapped one)."""
        d = _whole(delay_ps)
        if d is None:
            raise LimitError(f"{self.name}: set_input_delay_ps: {delay_ps!r} is not a whole "
                             "number of ps")
        targets = self._targets(input, "set_input_delay_ps")
        self._require("set_input_delay_ps")
        for ch in targets:
            self._vendor(f"setInputDelay({ch}, {d})", self._tagger.setInputDelay, ch, d)
        log.info("%s: input delay %d ps on channel(s) %s", self.name, d, targets)

    def set_dead_time_ps(self, dead_time_ps: int, input: int | None = None) -> None:
        """Set the dead time in ps of one Swabian channel (None: every mapped one)."""
        d = _whole(dead_time_ps)
        if d is None or d < 0:
            raise LimitError(f"{self.name}: set_dead_time_ps: {dead_time_ps!r} is not a whole "
                             "number of ps >= 0")
        targets = self._targets(input, "set_dead_time_ps")
        self._require("set_dead_time_ps")
        for ch in targets:
            actual = self._vendor(f"setDeadtime({ch}, {d})", self._tagger.setDeadtime, ch, d)
            log.info("%s: dead time %d ps requested on channel %d, %s ps applied", self.name,
                     d, ch, actual)

    # -- connection -------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            self._tt = importlib.import_module(MODULE)
        except ModuleNotFoundError:
            raise InstrumentError(f"{self.name}: connect: {MISSING}") from None
        except ImportError as e:
            raise InstrumentError(f"{self.name}: connect: {MISSING}; importing it failed: "
                                  f"{str(e).splitlines()[0] if str(e) else e!r}") from None
        r = self.resource
        if r.startswith("tcp://") or ":" in r:
            address = r[len("tcp://"):] if r.startswith("tcp://") else r
            self._tagger = self._vendor(f"createTimeTaggerNetwork({address!r})",
                                        self._tt.createTimeTaggerNetwork, address)
        else:
            what = f"createTimeTagger({r!r})" if r else "createTimeTagger()"
            self._tagger = self._vendor(what, self._tt.createTimeTagger, r)
        if self._tagger is None:
            raise InstrumentError(f"{self.name}: connect: no Time Tagger found"
                                  f"{f' with serial {r!r}' if r else ''}")
        try:
            self._model = str(self._vendor("getModel", self._tagger.getModel))
            self._serial = str(self._vendor("getSerial", self._tagger.getSerial))
            fw = getattr(self._tagger, "getFirmwareVersion", None)
            self._firmware = str(self._vendor("getFirmwareVersion", fw)) if fw else ""
            listing = getattr(self._tagger, "getChannelList", None)
            if listing is not None:
                available = {int(c) for c in self._vendor("getChannelList", listing)}
                missing = sorted(set(self._inputs) - available)
                if missing:
                    raise InstrumentError(
                        f"{self.name}: connect: settings.inputs has channel(s) "
                        f"{', '.join(map(str, missing))}, which this {self._model} does not "
                        f"have (its channels: {', '.join(map(str, sorted(available)))})")
        except BaseException:
            self._free()
            raise
        log.info("%s: %s S/N %s", self.name, self._model, self._serial)

    def _free(self) -> None:
        tagger, self._tagger, self._stream = self._tagger, None, None
        if tagger is not None and self._tt is not None:
            self._vendor("freeTimeTagger", self._tt.freeTimeTagger, tagger)

    def _close(self) -> None:
        self._free()

    def _identity(self) -> Identity:
        return Identity(make="Swabian Instruments", model=self._model, serial=self._serial,
                        firmware=self._firmware)

    def _status(self) -> dict[str, Any]:
        t = self._tagger
        def read(what: str, fn, ch: int, kind):
            try:
                return kind(self._vendor(f"{what}({ch})", fn, ch))
            except InstrumentError as e:  # e.g. a falling-edge channel number
                log.debug("%s", e)
                return None

        per = {ch: {"bench_channel": self._inputs[ch],
                    "trigger_level_v": read("getTriggerLevel", t.getTriggerLevel, ch, float),
                    "input_delay_ps": read("getInputDelay", t.getInputDelay, ch, int),
                    "dead_time_ps": read("getDeadtime", t.getDeadtime, ch, int)}
               for ch in sorted(self._inputs)}
        sensors = getattr(t, "getSensorData", None)
        return {"model": self._model, "serial": self._serial, "state": self._state,
                "failure": self._failure or None, "inputs": per,
                "overflows": int(self._vendor("getOverflows", t.getOverflows)),
                "sensor_data": str(self._vendor("getSensorData", sensors)) if sensors else None,
                "buffer_events": self.buffer_events, "tags_read": self._tags_read,
                "runs_aborted": self._runs_aborted}

    # -- acquisition ------------------------------------------------------------------------
    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(sorted(self._inputs.values()))

    @property
    def resolution_ps(self) -> int:
        return 1  # the stream's timestamps are integer ps

    def _get_running(self) -> bool:
        return self._state == "running"

    def _idle_hint(self) -> str:
        if self._state == "failed":
            return f"the run was aborted: {self._failure}; call finish(), then start() a new run"
        return super()._idle_hint()

    def _start(self) -> None:
        if self._state == "running":
            return
        if self._state == "failed":
            raise InstrumentError(f"{self.name}: start: the run was aborted ({self._failure});"
                                  " call finish() first, then start() a new run")
        if self._state == "stopped" and self._stream is not None:
            self._vendor("TimeTagStream.start", self._stream.start)
        else:
            chans = sorted(self._inputs)
            self._stream = self._vendor(
                f"TimeTagStream(n_max_events={self.buffer_events}, channels={chans})",
                self._tt.TimeTagStream, self._tagger, self.buffer_events, chans)
            self._vendor("TimeTagStream.start", self._stream.start)
            self._pending = []
            self._last_ps = -(1 << 62)
            self._failure = ""
        self._state = "running"

    def _stop(self) -> None:
        if self._stream is not None and self._state == "running":
            self._state = "stopped"
            self._vendor("TimeTagStream.stop", self._stream.stop)

    def _read_block(self, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
        deadline = time.monotonic() + duration_s
        while True:
            now = time.monotonic()
            if now < deadline:
                time.sleep(min(self.poll_s, deadline - now))
            self._collect("read_block")
            if time.monotonic() >= deadline:
                break
        return self._take()

    def _finish(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            if self._stream is not None and self._state in ("running", "stopped"):
                if self._state == "running":
                    self._stop()
                self._collect("finish")
            if self._state == "failed":
                self._pending = []
            return self._take()
        finally:
            self._state = "finished"
            self._stream = None

    def _take(self) -> tuple[np.ndarray, np.ndarray]:
        parts, self._pending = self._pending, []
        if not parts:
            return np.empty(0, np.int64), np.empty(0, np.uint8)
        return (np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]))

    def _fail(self, command: str, why: str) -> None:
        self._failure = why
        self._state = "failed"
        self._pending = []
        self._runs_aborted += 1
        try:
            self._vendor("TimeTagStream.stop", self._stream.stop)
        except InstrumentError as e:
            log.error("%s: %s", self.name, e)
        raise InstrumentError(f"{self.name}: {command}: {why}; the run is stopped")

    def _collect(self, command: str) -> None:
        """One ``getData()``: check it is complete, map and keep its tags."""
        buf = self._vendor("TimeTagStream.getData", self._stream.getData)
        size = int(buf.size)
        if size == 0:
            return
        ts = np.asarray(self._vendor("getTimestamps", buf.getTimestamps), dtype=np.int64)
        ch = np.asarray(self._vendor("getChannels", buf.getChannels), dtype=np.int64)
        types = np.asarray(self._vendor("getEventTypes", buf.getEventTypes), dtype=np.uint8)
        if not (ts.shape == ch.shape == types.shape == (size,)):
            self._fail(command, f"stream buffer of {size} events with {ts.shape[0]} "
                       f"timestamps, {ch.shape[0]} channels, {types.shape[0]} event types")
        special = np.flatnonzero(types != 0)
        if bool(buf.hasOverflows) or special.shape[0]:
            missed = np.asarray(self._vendor("getMissedEvents", buf.getMissedEvents))
            self._fail(command, self._overflow_text(ts, ch, types, missed, special))
        if size >= self.buffer_events:
            self._fail(command, f"the stream buffer filled up ({size} events = buffer_events):"
                       " events arriving after that were discarded (raise buffer_events)")
        if int(ts[0]) < self._last_ps or (size > 1 and not bool(np.all(ts[1:] >= ts[:-1]))):
            self._fail(command, "tags out of time order in the stream")
        idx = np.searchsorted(self._lut_keys, ch)
        idx_c = np.minimum(idx, self._lut_keys.shape[0] - 1)
        bad = self._lut_keys[idx_c] != ch
        if bool(bad.any()):
            self._fail(command, f"a tag on Swabian channel {int(ch[np.flatnonzero(bad)[0]])},"
                       " which is not in settings.inputs")
        self._last_ps = int(ts[-1])
        self._tags_read += size
        self._pending.append((ts, self._lut_vals[idx_c]))

    @staticmethod
    def _overflow_text(ts, ch, types, missed, special) -> str:
        kinds = sorted({EVENT_TYPES.get(int(t), f"type {int(t)}") for t in types[special]})
        where = special if special.shape[0] else np.arange(ts.shape[0])
        t0, t1 = int(ts[where[0]]), int(ts[where[-1]])
        text = (f"the tagger reported an overflow ({', '.join(kinds) or 'hasOverflows'}) "
                f"between {t0} ps and {t1} ps: tags were lost, so this block and the rest of "
                "the run are incomplete")
        me = types == 4
        if bool(me.any()) and missed.shape == types.shape:
            per: dict[int, int] = {}
            for c, m in zip(ch[me], missed[me], strict=True):
                per[int(c)] = per.get(int(c), 0) + int(m)
            text += " (missed events: " + ", ".join(
                f"channel {c}: {m}" for c, m in sorted(per.items())) + ")"
        return text
