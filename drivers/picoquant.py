"""PicoQuant HydraHarp 400 and MultiHarp 150/160 time taggers in T2 mode.

The instruments are driven through PicoQuant's programming libraries, loaded
with ctypes when the instrument connects (never at import):

==================  =========================================  ================
instrument          library (Linux / Windows)                   functions
==================  =========================================  ================
HydraHarp 400       ``libhh400.so`` or ``hhlib.so`` /           ``HH_*`` (HHLib
                    ``hhlib64.dll`` or ``hhlib.dll``            3.x)
MultiHarp 150/160   ``libmh150.so`` or ``mhlib.so`` /           ``MH_*`` (MHLib
                    ``mhlib64.dll`` or ``mhlib.dll``            3.x)
==================  =========================================  ================

The bench file's ``backend`` may name the library file (a path or a name);
empty tries the names above. ``resource`` is the device's serial number (empty:
the first device found).

Acquisition (T2 mode): ``start()`` starts a measurement (``HH_StartMeas`` with
the longest acquisition time the library takes, 100 h); ``read_block(d)`` reads
the FIFO (``HH_ReadFiFo``) for ``d`` seconds and decodes the records with the
decoder of the PTU reader, :class:`qkdctl.importers.PtuRecordDecoder` (the
overflow count is carried from one FIFO read to the next, exactly as between
the chunks of a PTU file). Times are ``ticks * base resolution`` in ps, the
base resolution as ``HH_GetBaseResolution`` reports it (HydraHarp: 1 ps; a
MultiHarp: 5 or 80 ps, depending on the model); it must be a whole number of ps.

Channels: the ``inputs`` setting maps the instrument's inputs to the bench's
tagger channels, ``inputs = { sync = 0, "0" = 1, "1" = 2 }``. Inputs are
counted from 0 as in the library and the records (PicoQuant's front panel and
demo programs count them from 1); ``sync`` is the sync input, a timing input
in T2 mode. ``start()`` disables the unmapped inputs
(``HH_SetInputChannelEnable``; the sync input is left as it is); tags still
arriving from an unmapped input are dropped and counted in :meth:`status`.

Data integrity: a FIFO overrun (``FLAG_FIFOFULL`` in ``HH_GetFlags``, checked
before every FIFO read) means records were lost. The block being read is then
refused with an :class:`~qkdctl.errors.InstrumentError`, the measurement is
stopped and the run is over (every later read says so): a block with a gap is
never returned as complete. Records out of time order are refused the same way.

The instrument's clock restarts at zero with every measurement, so a stopped
run cannot be resumed: ``stop()`` ends the acquisition (the FIFO is drained
first; its tags are returned by ``finish()``), and ``start()`` after
``finish()`` begins a new run.

Connecting opens the device, initializes it in T2 mode (the library needs this
before any other call) and, on a HydraHarp, calibrates it; the configured
setpoints are applied after that, and nothing else is changed before ``start()``.

Settings (all optional except ``inputs``):

- ``inputs`` (read when the instrument is built): table, input -> bench channel;
- ``ref_source`` (read when the instrument is built): ``"internal"`` (default) or
  ``"external"`` (10 MHz reference), the ``refsource`` of ``HH_Initialize``;
- ``sync_divider``: ``HH_SetSyncDiv``;
- ``sync_offset_ps``, ``input_offset_ps``: channel offsets in ps
  (``HH_SetSyncChannelOffset``, ``HH_SetInputChannelOffset``); ``input_offset_ps``
  is one number for every mapped input or a table ``{"<input>" = ps}``;
- HydraHarp: ``sync_cfd_level_mv`` with ``sync_cfd_zerox_mv``
  (``HH_SetSyncCFD``), ``input_cfd_level_mv`` with ``input_cfd_zerox_mv``
  (``HH_SetInputCFD``, numbers or per-input tables), each pair given together;
- MultiHarp: ``sync_trigger_level_mv`` with ``sync_trigger_edge``
  (``MH_SetSyncEdgeTrg``), ``input_trigger_level_mv`` with
  ``input_trigger_edge`` (``MH_SetInputEdgeTrg``), edges ``"rising"`` or
  ``"falling"``.

Values the library takes as integers (mV, ps) must be whole numbers. The
library checks the ranges; its error is reported with its own text
(``HH_GetErrorString``).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from qkdctl.errors import InstrumentError

from .base import STATIC, Identity, TimeTagger

__all__ = ["HydraHarp400", "MultiHarp150"]

log = logging.getLogger(__name__)

#: T2 mode (``MODE_T2`` of hhdefin.h / mhdefin.h)
MODE_T2 = 2
#: FIFO overrun flag of ``HH_GetFlags`` / ``MH_GetFlags``
FLAG_FIFOFULL = 0x0002
#: longest acquisition time of ``HH_StartMeas`` in ms (100 h)
ACQ_TIME_MAX_MS = 360_000_000
#: device indices the libraries scan
MAX_DEVICES = 8
#: ``refsource`` of ``HH_Initialize``
REF_SOURCES = {"internal": 0, "external": 1}
#: ``edge`` of ``MH_SetSyncEdgeTrg`` / ``MH_SetInputEdgeTrg``
EDGES = {"falling": 0, "rising": 1}

_INT64_MAX = np.iinfo(np.int64).max


def _importers():
    """:mod:`qkdctl.importers` (h5py, ptufile), imported when a PicoQuant tagger is built."""
    from qkdctl import importers

    return importers


def _whole(value: Any) -> int | None:
    """``value`` as an int if it is a finite whole number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    v = float(value)
    if not math.isfinite(v) or v != round(v):
        return None
    return int(round(v))


class _PicoQuantT2(TimeTagger):
    """Common part of the HydraHarp and MultiHarp drivers (see the module docstring)."""

    PREFIX: ClassVar[str] = ""
    FAMILY: ClassVar[str] = ""
    LIBRARIES: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: records one FIFO read may return (``TTREADMAX``)
    TTREADMAX: ClassVar[int] = 0
    #: setting pairs applied together: (first, second) -> applier name
    PAIRS: ClassVar[dict[tuple[str, str], str]] = {}
    #: per-input settings (a number for every mapped input, or a table)
    PER_INPUT: ClassVar[tuple[str, ...]] = ()
    #: settings that are words, with their allowed values
    WORDS: ClassVar[dict[str, tuple[str, ...]]] = {"ref_source": tuple(REF_SOURCES)}

    def __init__(self, name: str = "tagger", *, resource: str = "", backend: str = "",
                 timeout_s: float = 2.0, library: Any = None, **kwargs: Any):
        super().__init__(name, **kwargs)
        self.serial_wanted = (resource or "").strip()
        self.backend = backend or ""
        self.timeout_s = float(timeout_s)
        self._lib_given = library
        self._lib: Any = None
        self._dev: int | None = None
        self._sync_channel = _importers().PTU_T2_SYNC_CHANNEL
        self._inputs = self._parse_inputs(self.settings.get("inputs"))
        self._check_pairs()
        # channel lookup: decoder channel (0..63 inputs, 64 sync) -> bench channel or -1
        self._lut = np.full(self._sync_channel + 1, -1, np.int16)
        for inp, bench in self._inputs.items():
            self._lut[self._record_channel(inp)] = bench
        self._state = "idle"  # idle, running, stopped, failed, finished
        self._failure = ""
        self._buf = np.zeros(self.TTREADMAX + 1, np.uint32)
        self._decoder: Any = None  # a qkdctl.importers.PtuRecordDecoder while running
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._last_ps = -1
        self._tick_ps = 0
        self._info: dict[str, Any] = {}
        self._records_read = 0
        self._tags_read = 0
        self._dropped = 0
        self._warned_unmapped = False

    # -- configuration ----------------------------------------------------------------------
    def _record_channel(self, inp: str) -> int:
        return self._sync_channel if inp == "sync" else int(inp)

    def _parse_inputs(self, value: Any) -> dict[str, int]:
        if value is None:
            self._config_fail("settings.inputs", "missing; map the instrument's inputs to the "
                              'bench channels, e.g. inputs = { sync = 0, "0" = 1, "1" = 2 } '
                              "(inputs counted from 0, as in the PicoQuant library)")
        if not isinstance(value, Mapping) or not value:
            self._config_fail("settings.inputs", f"expected a table input -> bench channel, "
                              f"got {value!r}")
        out: dict[str, int] = {}
        seen: dict[int, str] = {}
        for key, ch in value.items():
            k = str(key).strip().lower()
            if k != "sync" and not (k.isdigit() and 0 <= int(k) < self._sync_channel):
                self._config_fail(f"settings.inputs.{key}", "an input is 'sync' or a number "
                                  f"0..{self._sync_channel - 1} (counted from 0)")
            c = _whole(ch)
            if c is None or not 0 <= c <= 254:
                self._config_fail(f"settings.inputs.{key}", f"bench channel {ch!r} is not an "
                                  "integer 0..254")
            if c in seen:
                self._config_fail(f"settings.inputs.{key}", f"bench channel {c} is already "
                                  f"input {seen[c]}")
            seen[c] = k
            out["sync" if k == "sync" else str(int(k))] = c
        return out

    def _check_setting(self, key: str, value: Any) -> str | None:
        if key == "inputs":
            return None  # checked by _parse_inputs
        if key in self.WORDS:
            return self._word_problem(key, value)
        if key in self.PER_INPUT and isinstance(value, Mapping):
            for inp, v in value.items():
                problem = self._number_problem(v)
                if problem:
                    return f"input {inp}: {problem}"
            return None
        if key in self.PER_INPUT or key not in self.WORDS:
            return self._number_problem(value)
        return None

    def _word_problem(self, key: str, value: Any) -> str | None:
        values = value.values() if isinstance(value, Mapping) and key in self.PER_INPUT \
            else [value]
        for v in values:
            if not isinstance(v, str) or v.lower() not in self.WORDS[key]:
                return f"{v!r}: expected one of {', '.join(self.WORDS[key])}"
        return None

    @staticmethod
    def _number_problem(value: Any) -> str | None:
        if _whole(value) is None:
            return f"expected a whole number, got {value!r}"
        return None

    def _check_pairs(self) -> None:
        for a, b in self.PAIRS:
            if (a in self.settings) != (b in self.settings):
                given, missing = (a, b) if a in self.settings else (b, a)
                self._config_fail(f"settings.{missing}", f"missing; {given} and {missing} are "
                                  "applied together, give both")
        for key in self.PER_INPUT:
            value = self.settings.get(key)
            if isinstance(value, Mapping):
                for inp in value:
                    k = str(inp).strip().lower()
                    if k not in self._inputs:
                        self._config_fail(f"settings.{key}.{inp}", f"input {inp} is not in "
                                          f"settings.inputs ({', '.join(self._inputs)})")

    def _per_input(self, key: str, value: Any) -> dict[str, Any]:
        """A per-input setting as input -> value, for the mapped non-sync inputs."""
        if isinstance(value, Mapping):
            return {str(k).strip().lower(): v for k, v in value.items()}
        return {inp: value for inp in self._inputs if inp != "sync"}

    def configure(self, settings: Mapping[str, Any]) -> None:
        # pairs are applied once, with both values
        done: set[str] = set()
        for key in settings:
            if key not in self.SETTINGS:
                raise InstrumentError(f"{self.name}: configure: unknown setting {key!r}; "
                                      f"allowed: {', '.join(self.SETTINGS)}")
        for key, value in settings.items():
            if key in done:
                continue
            for (a, b), applier in self.PAIRS.items():
                if key in (a, b):
                    if a not in settings or b not in settings:
                        raise InstrumentError(f"{self.name}: configure: {a} and {b} are "
                                              "applied together, give both")
                    self._apply_pair(applier, settings[a], settings[b], a in self.PER_INPUT)
                    done.update((a, b))
                    break
            else:
                self._apply_setting(key, value)
                done.add(key)

    def _apply_setting(self, key: str, value: Any) -> None:
        if self.SETTINGS[key] == STATIC:
            if value != self.settings.get(key):
                raise InstrumentError(f"{self.name}: configure: {key} is fixed when the "
                                      "instrument is built (change it in the bench file)")
            return
        if key in self.PER_INPUT:
            for inp, v in self._per_input(key, value).items():
                getattr(self, self.SETTINGS[key])(v, input=inp)
            return
        getattr(self, self.SETTINGS[key])(value)

    def _apply_pair(self, applier: str, first: Any, second: Any, per_input: bool) -> None:
        if not per_input:
            getattr(self, applier)(first, second)
            return
        firsts = self._per_input("", first)
        seconds = self._per_input("", second)
        for inp in sorted(set(firsts) | set(seconds)):
            if inp not in firsts or inp not in seconds:
                raise InstrumentError(f"{self.name}: configure: input {inp} has only one of "
                                      "a pair of settings; give both")
            getattr(self, applier)(firsts[inp], seconds[inp], input=inp)

    # -- library ----------------------------------------------------------------------------
    def _load_library(self) -> Any:
        if self._lib_given is not None:
            return self._lib_given
        names = (self.backend,) if self.backend else \
            self.LIBRARIES["nt" if os.name == "nt" else "posix"]
        loader = getattr(ctypes, "WinDLL", ctypes.CDLL) if os.name == "nt" else ctypes.CDLL
        errors = []
        for n in names:
            try:
                return loader(n)
            except OSError as e:
                errors.append(f"{n}: {e}")
        raise InstrumentError(
            f"{self.name}: connect: the {self.FAMILY} driver needs PicoQuant's "
            f"{self.PREFIX}Lib programming library ({' or '.join(names)}, installed with "
            "the instrument's software from picoquant.com; or give its path as the bench "
            f"file's backend); could not load it ({'; '.join(errors)[:200]})")

    def _fn(self, fname: str):
        return getattr(self._lib, f"{self.PREFIX}_{fname}")

    def _error_text(self, code: int) -> str:
        buf = ctypes.create_string_buffer(64)
        try:
            self._fn("GetErrorString")(buf, code)
            return buf.value.decode("ascii", "replace").strip() or "unknown error"
        except Exception:  # the error text is a courtesy; never hide the error code
            return "unknown error"

    def _call(self, fname: str, *args: Any, what: str = "") -> None:
        """Call ``<PREFIX>_<fname>(*args)``; a negative return code is an InstrumentError."""
        rc = int(self._fn(fname)(*args))
        if rc < 0:
            detail = f"({what}) " if what else ""
            raise InstrumentError(f"{self.name}: {self.PREFIX}_{fname} {detail}failed: error "
                                  f"{rc} ({self._error_text(rc)})")

    def _int_out(self, fname: str, *args: Any) -> int:
        v = ctypes.c_int(0)
        self._call(fname, *args, ctypes.byref(v))
        return int(v.value)

    # -- connection -------------------------------------------------------------------------
    def _open(self) -> None:
        self._lib = self._load_library()
        ver = ctypes.create_string_buffer(16)
        self._call("GetLibraryVersion", ver)
        version = ver.value.decode("ascii", "replace").strip()
        dev, serial = self._open_device()
        self._dev = dev
        try:
            ref = REF_SOURCES[str(self.settings.get("ref_source", "internal")).lower()]
            self._call("Initialize", dev, MODE_T2, ref, what="T2 mode")
            model = ctypes.create_string_buffer(64)
            partno = ctypes.create_string_buffer(64)
            hwver = ctypes.create_string_buffer(64)
            self._call("GetHardwareInfo", dev, model, partno, hwver)
            n_inputs = self._int_out("GetNumOfInputChannels", dev)
            for inp in self._inputs:
                if inp != "sync" and int(inp) >= n_inputs:
                    raise InstrumentError(f"{self.name}: connect: settings.inputs has input "
                                          f"{inp}, but the instrument has inputs 0.."
                                          f"{n_inputs - 1}")
            res = ctypes.c_double(0.0)
            steps = ctypes.c_int(0)
            self._call("GetBaseResolution", dev, ctypes.byref(res), ctypes.byref(steps))
            tick = round(res.value)
            if tick < 1 or abs(res.value - tick) > 1e-6 * max(tick, 1):
                raise InstrumentError(f"{self.name}: connect: base resolution "
                                      f"{res.value:g} ps is not a whole number of ps")
            self._tick_ps = int(tick)
            self._after_initialize(dev)
            self._info = {
                "library_version": version, "serial": serial,
                "model": model.value.decode("ascii", "replace").strip(),
                "part_number": partno.value.decode("ascii", "replace").strip(),
                "hardware_version": hwver.value.decode("ascii", "replace").strip(),
                "n_inputs": n_inputs, "record_type": self._record_type(version),
            }
        except BaseException:
            self._close_device()
            raise
        log.info("%s: %s %s (S/N %s), library %s, %d ps ticks", self.name, self.FAMILY,
                 self._info["model"], serial, version, self._tick_ps)

    def _open_device(self) -> tuple[int, str]:
        found = []
        for idx in range(MAX_DEVICES):
            sbuf = ctypes.create_string_buffer(16)
            rc = int(self._fn("OpenDevice")(idx, sbuf))
            if rc < 0:
                continue
            serial = sbuf.value.decode("ascii", "replace").strip()
            if self.serial_wanted and serial != self.serial_wanted:
                found.append(serial)
                self._fn("CloseDevice")(idx)
                continue
            return idx, serial
        want = f"with serial number {self.serial_wanted!r} " if self.serial_wanted else ""
        also = f"; found: {', '.join(found)}" if found else ""
        raise InstrumentError(f"{self.name}: connect: no {self.FAMILY} {want}could be opened "
                              f"(connected, powered, not in use by another program?){also}")

    def _after_initialize(self, dev: int) -> None:
        """Hook: model-specific steps after ``Initialize`` (HydraHarp: calibration)."""

    def _record_type(self, library_version: str) -> int:
        raise NotImplementedError

    def _close_device(self) -> None:
        if self._dev is not None and self._lib is not None:
            try:
                self._fn("CloseDevice")(self._dev)
            finally:
                self._dev = None

    def _close(self) -> None:
        self._close_device()

    def _identity(self) -> Identity:
        i = self._info
        return Identity(make="PicoQuant", model=i.get("model") or self.FAMILY,
                        serial=i.get("serial", ""),
                        firmware=f"hardware {i.get('hardware_version', '?')}, "
                                 f"{self.PREFIX}Lib {i.get('library_version', '?')}")

    def _status(self) -> dict[str, Any]:
        dev = self._dev
        rates = {}
        for inp, bench in sorted(self._inputs.items(), key=lambda kv: kv[1]):
            if inp == "sync":
                rates[bench] = self._int_out("GetSyncRate", dev)
            else:
                rates[bench] = self._int_out("GetCountRate", dev, int(inp))
        return {**self._info, "state": self._state, "failure": self._failure or None,
                "resolution_ps": self._tick_ps, "count_rates_hz": rates,
                "flags": self._int_out("GetFlags", dev),
                "warnings": self._int_out("GetWarnings", dev),
                "records_read": self._records_read, "tags_read": self._tags_read,
                "tags_dropped_unmapped": self._dropped}

    # -- setpoints --------------------------------------------------------------------------
    def _setpoint(self, value: Any, what: str) -> int:
        v = _whole(value)
        if v is None:
            raise InstrumentError(f"{self.name}: {what}: {value!r} is not a whole number")
        return v

    def _input_index(self, inp: Any, what: str) -> int:
        k = str(inp).strip().lower()
        if k not in self._inputs or k == "sync":
            raise InstrumentError(f"{self.name}: {what}: input {inp!r} is not one of the "
                                  "mapped inputs "
                                  f"({', '.join(i for i in self._inputs if i != 'sync')})")
        return int(k)

    def set_sync_divider(self, divider: int) -> None:
        """Set the sync divider (``SetSyncDiv``)."""
        v = self._setpoint(divider, "set_sync_divider")
        self._require("set_sync_divider")
        self._call("SetSyncDiv", self._dev, v)
        log.info("%s: sync divider %d", self.name, v)

    def set_sync_offset_ps(self, offset_ps: int) -> None:
        """Set the sync channel offset in ps (``SetSyncChannelOffset``)."""
        v = self._setpoint(offset_ps, "set_sync_offset_ps")
        self._require("set_sync_offset_ps")
        self._call("SetSyncChannelOffset", self._dev, v)
        log.info("%s: sync offset %d ps", self.name, v)

    def set_input_offset_ps(self, offset_ps: int, input: str | int) -> None:
        """Set an input's channel offset in ps (``SetInputChannelOffset``)."""
        v = self._setpoint(offset_ps, "set_input_offset_ps")
        ch = self._input_index(input, "set_input_offset_ps")
        self._require("set_input_offset_ps")
        self._call("SetInputChannelOffset", self._dev, ch, v, what=f"input {ch}")
        log.info("%s: input %d offset %d ps", self.name, ch, v)

    # -- acquisition ------------------------------------------------------------------------
    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(sorted(self._inputs.values()))

    @property
    def resolution_ps(self) -> int:
        return int(self._tick_ps or 1)

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
            raise InstrumentError(
                f"{self.name}: start: a stopped run cannot be resumed (the {self.FAMILY}'s "
                "clock restarts at zero with every measurement); call finish(), then start() "
                "a new run")
        for ch in range(self._info["n_inputs"]):  # only the mapped inputs send tags
            self._call("SetInputChannelEnable", self._dev, ch, int(str(ch) in self._inputs),
                       what=f"input {ch}")
        self._decoder = _importers().PtuRecordDecoder(self._info["record_type"])
        self._pending = []
        self._last_ps = -1
        self._failure = ""
        self._call("StartMeas", self._dev, ACQ_TIME_MAX_MS)
        self._state = "running"

    def _stop(self) -> None:
        if self._state != "running":
            return
        try:
            for _ in range(64):  # drain what the FIFO holds (bounded: the clock still runs)
                if self._read_fifo_once("stop") == 0:
                    break
        finally:
            if self._state == "running":
                self._state = "stopped"
            self._call("StopMeas", self._dev)

    def _safe_state(self) -> None:
        # no FIFO draining here: the safe state must be reached even if reading fails
        if self._state == "running":
            self._state = "stopped"
        if self._dev is not None:
            self._call("StopMeas", self._dev)

    def _read_block(self, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
        deadline = time.monotonic() + duration_s
        while True:
            n = self._read_fifo_once("read_block")
            now = time.monotonic()
            if now >= deadline:
                break
            if n == 0:
                if self._int_out("CTCStatus", self._dev) > 0:
                    self._fail("read_block", "the measurement reached the longest "
                               "acquisition time of the library (100 h) and ended")
                time.sleep(min(0.005, deadline - now))
        return self._take()

    def _finish(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            if self._state == "running":
                self._stop()
            if self._state == "failed":
                self._pending = []
            return self._take()
        finally:
            self._state = "finished"
            self._decoder = None

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
        try:
            self._call("StopMeas", self._dev)
        except InstrumentError as e:
            log.error("%s: could not stop the measurement: %s", self.name, e)
        raise InstrumentError(f"{self.name}: {command}: {why}; the run is stopped")

    def _read_fifo_once(self, command: str) -> int:
        """Check the FIFO flag, read the FIFO once, decode; return the records read."""
        flags = self._int_out("GetFlags", self._dev)
        if flags & FLAG_FIFOFULL:
            self._fail(command, f"FIFO overrun (FLAG_FIFOFULL): the {self.FAMILY}'s FIFO "
                       "filled up and records were lost, so this block and the rest of the "
                       "run are incomplete (lower the count rate or read more often)")
        n = self._read_fifo()
        if n < 0 or n > self.TTREADMAX:
            self._fail(command, f"{self.PREFIX}_ReadFiFo returned {n} records for a buffer "
                       f"of {self.TTREADMAX}")
        if n == 0:
            return 0
        self._records_read += n
        self._buf[n] = 0  # the decoder's carry probe
        t, c, _marker, _ = self._decoder.decode_padded(self._buf[:n + 1])
        sel = c >= 0
        ticks = t[sel]
        bench = self._lut[c[sel].astype(np.intp)]
        keep = bench >= 0
        dropped = int(keep.shape[0] - np.count_nonzero(keep))
        if dropped:
            self._dropped += dropped
            if not self._warned_unmapped:
                self._warned_unmapped = True
                log.warning("%s: tags from inputs not in settings.inputs are dropped "
                            "(counted in status)", self.name)
            ticks, bench = ticks[keep], bench[keep]
        if ticks.shape[0] == 0:
            return n
        if int(ticks[-1]) > _INT64_MAX // self._tick_ps:
            self._fail(command, "time beyond the int64 ps range")
        ts = ticks * np.int64(self._tick_ps)
        if int(ts[0]) < self._last_ps or (ts.shape[0] > 1 and
                                          not bool(np.all(ts[1:] >= ts[:-1]))):
            self._fail(command, "records out of time order (corrupted FIFO data)")
        self._last_ps = int(ts[-1])
        self._tags_read += ts.shape[0]
        self._pending.append((ts, bench.astype(np.uint8)))
        return n

    def _read_fifo(self) -> int:
        raise NotImplementedError

    def _buffer_pointer(self):
        return self._buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))


class HydraHarp400(_PicoQuantT2):
    """PicoQuant HydraHarp 400 in T2 mode, through HHLib (see the module docstring).

    T2 records: HydraHarp V2 (record type 0x01010204) with HHLib 3.x, V1
    (0x00010204) with older libraries. The device is calibrated
    (``HH_Calibrate``) when it connects.
    """

    PREFIX = "HH"
    FAMILY = "HydraHarp 400"
    LIBRARIES = {"posix": ("libhh400.so", "hhlib.so"), "nt": ("hhlib64.dll", "hhlib.dll")}
    TTREADMAX = 131072
    SETTINGS = {
        "inputs": STATIC,
        "ref_source": STATIC,
        "sync_divider": "set_sync_divider",
        "sync_offset_ps": "set_sync_offset_ps",
        "input_offset_ps": "set_input_offset_ps",
        "sync_cfd_level_mv": "set_sync_cfd_mv",
        "sync_cfd_zerox_mv": "set_sync_cfd_mv",
        "input_cfd_level_mv": "set_input_cfd_mv",
        "input_cfd_zerox_mv": "set_input_cfd_mv",
    }
    PAIRS = {("sync_cfd_level_mv", "sync_cfd_zerox_mv"): "set_sync_cfd_mv",
             ("input_cfd_level_mv", "input_cfd_zerox_mv"): "set_input_cfd_mv"}
    PER_INPUT = ("input_offset_ps", "input_cfd_level_mv", "input_cfd_zerox_mv")

    def _after_initialize(self, dev: int) -> None:
        self._call("Calibrate", dev)

    def _record_type(self, library_version: str) -> int:
        try:
            major = int(library_version.split(".")[0])
        except ValueError:
            major = 3
        return 0x01010204 if major >= 3 else 0x00010204

    def set_sync_cfd_mv(self, level_mv: int, zerox_mv: int) -> None:
        """Set the sync input's CFD level and zero cross, in mV (``HH_SetSyncCFD``)."""
        lv = self._setpoint(level_mv, "set_sync_cfd_mv")
        zc = self._setpoint(zerox_mv, "set_sync_cfd_mv")
        self._require("set_sync_cfd_mv")
        self._call("SetSyncCFD", self._dev, lv, zc)
        log.info("%s: sync CFD %d mV, zero cross %d mV", self.name, lv, zc)

    def set_input_cfd_mv(self, level_mv: int, zerox_mv: int, input: str | int) -> None:
        """Set an input's CFD level and zero cross, in mV (``HH_SetInputCFD``)."""
        lv = self._setpoint(level_mv, "set_input_cfd_mv")
        zc = self._setpoint(zerox_mv, "set_input_cfd_mv")
        ch = self._input_index(input, "set_input_cfd_mv")
        self._require("set_input_cfd_mv")
        self._call("SetInputCFD", self._dev, ch, lv, zc, what=f"input {ch}")
        log.info("%s: input %d CFD %d mV, zero cross %d mV", self.name, ch, lv, zc)

    def _read_fifo(self) -> int:
        n = ctypes.c_int(0)
        self._call("ReadFiFo", self._dev, self._buffer_pointer(), self.TTREADMAX,
                   ctypes.byref(n))
        return int(n.value)


class MultiHarp150(_PicoQuantT2):
    """PicoQuant MultiHarp 150 / 160 in T2 mode, through MHLib (see the module docstring).

    T2 records: record type 0x00010207 (the MultiHarp / generic T2 layout). The
    inputs have edge triggers: level in mV and edge (``"rising"``/``"falling"``).
    """

    PREFIX = "MH"
    FAMILY = "MultiHarp"
    LIBRARIES = {"posix": ("libmh150.so", "mhlib.so"), "nt": ("mhlib64.dll", "mhlib.dll")}
    TTREADMAX = 1048576
    SETTINGS = {
        "inputs": STATIC,
        "ref_source": STATIC,
        "sync_divider": "set_sync_divider",
        "sync_offset_ps": "set_sync_offset_ps",
        "input_offset_ps": "set_input_offset_ps",
        "sync_trigger_level_mv": "set_sync_trigger",
        "sync_trigger_edge": "set_sync_trigger",
        "input_trigger_level_mv": "set_input_trigger",
        "input_trigger_edge": "set_input_trigger",
    }
    PAIRS = {("sync_trigger_level_mv", "sync_trigger_edge"): "set_sync_trigger",
             ("input_trigger_level_mv", "input_trigger_edge"): "set_input_trigger"}
    PER_INPUT = ("input_offset_ps", "input_trigger_level_mv", "input_trigger_edge")
    WORDS = {"ref_source": tuple(REF_SOURCES), "sync_trigger_edge": tuple(EDGES),
             "input_trigger_edge": tuple(EDGES)}

    def _record_type(self, library_version: str) -> int:
        return 0x00010207

    def _edge(self, edge: Any, what: str) -> int:
        if not isinstance(edge, str) or edge.lower() not in EDGES:
            raise InstrumentError(f"{self.name}: {what}: edge {edge!r}: expected "
                                  "'rising' or 'falling'")
        return EDGES[edge.lower()]

    def set_sync_trigger(self, level_mv: int, edge: str) -> None:
        """Set the sync input's trigger level (mV) and edge (``MH_SetSyncEdgeTrg``)."""
        lv = self._setpoint(level_mv, "set_sync_trigger")
        e = self._edge(edge, "set_sync_trigger")
        self._require("set_sync_trigger")
        self._call("SetSyncEdgeTrg", self._dev, lv, e)
        log.info("%s: sync trigger %d mV, %s edge", self.name, lv, edge)

    def set_input_trigger(self, level_mv: int, edge: str, input: str | int) -> None:
        """Set an input's trigger level (mV) and edge (``MH_SetInputEdgeTrg``)."""
        lv = self._setpoint(level_mv, "set_input_trigger")
        e = self._edge(edge, "set_input_trigger")
        ch = self._input_index(input, "set_input_trigger")
        self._require("set_input_trigger")
        self._call("SetInputEdgeTrg", self._dev, ch, lv, e, what=f"input {ch}")
        log.info("%s: input %d trigger %d mV, %s edge", self.name, ch, lv, edge)

    def _read_fifo(self) -> int:
        n = ctypes.c_int(0)
        self._call("ReadFiFo", self._dev, self._buffer_pointer(), ctypes.byref(n))
        return int(n.value)
