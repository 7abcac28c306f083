"""Alice's per-pulse polarization encoder: an electro-optic modulator driven by a
Keysight 33500B / 33600A (Trueform) arbitrary waveform generator.

The generator plays Alice's state pattern as an arbitrary waveform, one level
per BB84 state, ``samples_per_state`` samples per pulse, at
``pulse_rate_hz * samples_per_state`` samples per second, repeated for as long
as the output is on. The EO modulator (and its driver amplifier) turns each
level into the pulse's polarization state.

State codes are Alice's pulse codes (:mod:`qkdctl.sequence`): bit 0 the bit
value, bit 1 the basis; the intensity bits (2-3) belong to the intensity
modulator and are ignored here. The polarization state index is
``code & 3``: 0 = Z/0, 1 = Z/1, 2 = X/0, 3 = X/1, and ``state_voltages``
lists the output voltage of each, in that order.

SCPI used (``<c>`` is the channel, 1 or 2)::

    *IDN?  *CLS  SYST:ERR?                       (after every command)
    OUTP<c> OFF                                  before an upload
    OUTP<c>:LOAD 50|INF                          if output_load is set
    ROSC:SOUR INT|EXT                            if reference_clock is set
    SOUR<c>:DATA:VOL:CLE                         clear the volatile arbs
    SOUR<c>:DATA:ARB:DAC <name>,<d1>,<d2>,...    the pattern, DAC codes -32767..32767
    SOUR<c>:FUNC:ARB <name>
    SOUR<c>:FUNC ARB
    SOUR<c>:FUNC:ARB:SRAT <Sa/s>
    SOUR<c>:FUNC:ARB:FILT NORM|STEP|OFF          if filter is set
    SOUR<c>:VOLT <Vpp>                           max - min of the state voltages
    SOUR<c>:VOLT:OFFS <V>                        their mid-point
    OUTP<c> ON | OUTP<c> OFF | OUTP<c>?          start / stop / running

The DAC code of a level v is ``round((v - offset) / (amplitude / 2) * 32767)``;
the lowest and highest state voltages map to -32767 and +32767 exactly. The
voltages are those across the load the generator assumes (``OUTP:LOAD``: 50
ohm by default on these generators; set ``output_load = "INF"`` for a
high-impedance modulator driver input).

Bench file::

    [instruments.modulator]
    driver = "keysight-33500"
    resource = "USB0::0x0957::0x2807::MY59000001::INSTR"
    settings = { state_voltages = [0.0, 1.2, 0.6, 1.8], pulse_rate_hz = 1e6,
                 samples_per_state = 1, pattern = [0, 1, 2, 3, 1, 0, 3, 2],
                 output_load = "INF", filter = "OFF" }
    limits = { min_voltage_v = 0.0, max_voltage_v = 2.0, max_amplitude_vpp = 2.0 }

Settings: ``state_voltages`` (4 volts), ``pattern`` (state codes 0..15),
``pulse_rate_hz``, ``samples_per_state`` (default 1), ``channel`` (1 or 2,
default 1), ``arb_name`` (default ``"QKDPAT"``), ``output_load`` (ohm or
``"INF"``), ``filter`` (``"NORMAL"``, ``"STEP"`` or ``"OFF"``),
``reference_clock`` (``"INT"`` or ``"EXT"``). The session (or a calibration)
can load Alice's pattern with :meth:`KeysightAWG.load_pattern`. Limits:
``min_voltage_v`` and ``max_voltage_v`` (required: every level played),
``max_amplitude_vpp``, ``max_sample_rate_hz``; all are checked before anything
is sent. Safe state: output off.

This instrument only encodes; it has no polarization compensation
(:meth:`set_rotation_rad` raises): use a polarization controller.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qkdctl.errors import InstrumentError, LimitError

from .base import STATIC, PolarizationModulator, _number
from .scpi import ScpiInstrument, parse_idn
from .transport import DEFAULT_TIMEOUT_S, Link

__all__ = ["KeysightAWG", "dac_codes"]

log = logging.getLogger(__name__)

DAC_FULL_SCALE = 32767
#: fewest points of an arbitrary waveform on these generators
MIN_POINTS = 8
#: most points of an arbitrary waveform (standard memory of the 33500B)
MAX_POINTS = 1_048_576
N_STATES = 4
_ARB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,11}")
_FILTERS = {"NORMAL": "NORM", "NORM": "NORM", "STEP": "STEP", "OFF": "OFF"}


def dac_codes(state_voltages: Sequence[float]) -> tuple[list[int], float, float]:
    """DAC code of each state voltage, and the amplitude (Vpp) and offset (V) to set."""
    lo, hi = min(state_voltages), max(state_voltages)
    amplitude = hi - lo
    offset = (hi + lo) / 2
    codes = [round((v - offset) / (amplitude / 2) * DAC_FULL_SCALE) for v in state_voltages]
    return codes, amplitude, offset


def _fmt(v: float) -> str:
    return f"{v:.10g}"


class KeysightAWG(ScpiInstrument, PolarizationModulator):
    """A Keysight 33500B / 33600A playing Alice's state pattern into an EO modulator.

    See the module documentation for the commands, settings and limits.
    """

    SETTINGS = {"state_voltages": "set_state_voltages", "pattern": "load_pattern",
                "pulse_rate_hz": "set_pulse_rate_hz",
                "samples_per_state": "set_samples_per_state",
                "channel": STATIC, "arb_name": STATIC, "output_load": STATIC,
                "filter": STATIC, "reference_clock": STATIC}
    LIMITS = {"min_voltage_v": "V", "max_voltage_v": "V", "max_amplitude_vpp": "Vpp",
              "max_sample_rate_hz": "Sa/s"}
    REQUIRED_LIMITS = ("min_voltage_v", "max_voltage_v")
    MODELS = ("335", "336")

    def __init__(self, name: str = "modulator", *, resource: str = "", backend: str = "",
                 timeout_s: float = DEFAULT_TIMEOUT_S, link: Link | None = None,
                 settings: Mapping[str, Any] | None = None,
                 limits: Mapping[str, Any] | None = None, config_key: str | None = None):
        super().__init__(name, resource=resource, backend=backend, timeout_s=timeout_s,
                         link=link, settings=settings, limits=limits, config_key=config_key)
        s = self.settings
        self.channel = int(s.get("channel", 1))
        self.arb_name = str(s.get("arb_name", "QKDPAT"))
        load = s.get("output_load")
        self.output_load = None if load is None else self._load_text(load)
        f = s.get("filter")
        self.filter = None if f is None else _FILTERS[str(f).upper()]
        ref = s.get("reference_clock")
        self.reference_clock = None if ref is None else str(ref).upper()
        # the setpoints, checked already; connect() applies them again through the setters
        v = s.get("state_voltages")
        self._state_voltages: list[float] | None = None if v is None else [float(x) for x in v]
        p = s.get("pattern")
        self._pattern: np.ndarray | None = None if p is None else np.asarray(p).astype(np.uint8)
        r = s.get("pulse_rate_hz")
        self._pulse_rate_hz: float | None = None if r is None else float(r)
        self._samples_per_state = int(s.get("samples_per_state", 1))
        self._uploaded = False

    # -- configuration ------------------------------------------------------------------
    @staticmethod
    def _load_text(value: Any) -> str:
        if isinstance(value, str):
            return "INF"
        return _fmt(float(value))

    def _check_setting(self, key: str, value: Any) -> str | None:
        if key == "state_voltages":
            return self._voltages_problem(value)
        if key == "pattern":
            return self._pattern_problem(value)
        if key == "pulse_rate_hz":
            v = _number(value)
            if v is None or v <= 0:
                return f"expected a positive rate in Hz, got {value!r}"
            return None
        if key == "samples_per_state":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                return f"expected a whole number of samples >= 1, got {value!r}"
            return None
        if key == "channel":
            return None if value in (1, 2) and not isinstance(value, bool) else \
                f"{value!r}: expected channel 1 or 2"
        if key == "arb_name":
            if not isinstance(value, str) or not _ARB_NAME.fullmatch(value):
                return (f"{value!r}: an arbitrary waveform name is 1 to 12 letters, digits or "
                        "underscores, starting with a letter")
            return None
        if key == "output_load":
            if isinstance(value, str):
                return None if value.upper() in ("INF", "INFINITY") else \
                    f"{value!r}: expected a load in ohm (1 to 10000) or 'INF'"
            v = _number(value)
            return None if v is not None and 1 <= v <= 10000 else \
                f"{value!r}: expected a load in ohm (1 to 10000) or 'INF'"
        if key == "filter":
            return None if str(value).upper() in _FILTERS else \
                f"{value!r}: expected 'NORMAL', 'STEP' or 'OFF'"
        if key == "reference_clock":
            return None if str(value).upper() in ("INT", "EXT") else \
                f"{value!r}: expected 'INT' or 'EXT'"
        return super()._check_setting(key, value)

    def _voltages_problem(self, value: Any) -> str | None:
        if not isinstance(value, list | tuple | np.ndarray) or len(value) != N_STATES:
            return (f"expected {N_STATES} voltages (states Z/0, Z/1, X/0, X/1), "
                    f"got {value!r}")
        vs = [_number(v) for v in value]
        if None in vs:
            return f"expected finite voltages, got {list(value)!r}"
        lo, hi = self.limits.get("min_voltage_v"), self.limits.get("max_voltage_v")
        for v in vs:
            if lo is not None and v < lo:
                return f"{v:g} V is below the limit min_voltage_v = {lo:g} V"
            if hi is not None and v > hi:
                return f"{v:g} V is above the limit max_voltage_v = {hi:g} V"
        amp = max(vs) - min(vs)
        if amp <= 0:
            return "the state voltages must hold at least two different levels"
        amax = self.limits.get("max_amplitude_vpp")
        if amax is not None and amp > amax:
            return f"{amp:g} Vpp is above the limit max_amplitude_vpp = {amax:g} Vpp"
        return None

    @staticmethod
    def _pattern_problem(value: Any) -> str | None:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):
            return f"expected a list of state codes, got {value!r}"
        if arr.ndim != 1 or arr.size == 0:
            return "expected a non-empty list of state codes"
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            return "expected whole-number state codes (0 to 15)"
        if arr.min() < 0 or arr.max() > 15:
            return f"state codes run from 0 to 15; got {int(arr.min())} to {int(arr.max())}"
        if arr.size > MAX_POINTS:
            return f"{arr.size} states: more than the {MAX_POINTS} points of the memory"
        return None

    def _limit(self, command: str, problem: str | None) -> None:
        if problem:
            raise LimitError(f"{self.name}: {command}: {problem}")

    # -- setpoints (stored; sent by start) -----------------------------------------------
    def set_state_voltages(self, state_voltages: Sequence[float]) -> None:
        """Set the output voltage of each state (Z/0, Z/1, X/0, X/1); used from the next
        :meth:`start`."""
        self._limit("set_state_voltages", self._voltages_problem(state_voltages))
        self._state_voltages = [float(v) for v in state_voltages]
        self._uploaded = False

    def load_pattern(self, codes: Sequence[int] | np.ndarray) -> None:
        """Set Alice's state pattern (pulse codes, repeated); uploaded by the next
        :meth:`start`."""
        self._limit("load_pattern", self._pattern_problem(codes))
        self._pattern = np.asarray(codes).astype(np.uint8)
        self._uploaded = False

    def set_pulse_rate_hz(self, pulse_rate_hz: float) -> None:
        """Set the pulse (state) rate in Hz; used from the next :meth:`start`."""
        v = _number(pulse_rate_hz)
        if v is None or v <= 0:
            raise LimitError(f"{self.name}: set_pulse_rate_hz({pulse_rate_hz!r}): expected "
                             "a positive rate in Hz")
        self._pulse_rate_hz = v
        self._uploaded = False

    def set_samples_per_state(self, samples: int) -> None:
        """Set the number of samples per pulse; used from the next :meth:`start`."""
        self._limit("set_samples_per_state", self._check_setting("samples_per_state", samples))
        self._samples_per_state = int(samples)
        self._uploaded = False

    @property
    def sample_rate_hz(self) -> float | None:
        """The sample rate start() sets (pulse rate x samples per state)."""
        if self._pulse_rate_hz is None:
            return None
        return self._pulse_rate_hz * self._samples_per_state

    def waveform(self) -> tuple[np.ndarray, float, float, float]:
        """The arbitrary waveform start() uploads: (DAC codes, amplitude Vpp, offset V,
        sample rate Sa/s). Raises if the pattern, voltages or rate are missing or out
        of the limits."""
        cmd = "start"
        missing = [what for what, v in (("state_voltages", self._state_voltages),
                                        ("pattern", self._pattern),
                                        ("pulse_rate_hz", self._pulse_rate_hz)) if v is None]
        if missing:
            raise InstrumentError(f"{self.name}: {cmd}: {', '.join(missing)} not set "
                                  "(settings, or load_pattern() and the setters)")
        self._limit(cmd, self._voltages_problem(self._state_voltages))
        srat = self.sample_rate_hz
        smax = self.limits.get("max_sample_rate_hz")
        if smax is not None and srat > smax:
            self._limit(cmd, f"{srat:g} Sa/s is above the limit max_sample_rate_hz = "
                             f"{smax:g} Sa/s")
        levels, amplitude, offset = dac_codes(self._state_voltages)
        samples = np.repeat(np.asarray(levels, np.int32)[self._pattern & 3],
                            self._samples_per_state)
        if samples.size < MIN_POINTS:  # whole repeats of the pattern keep it periodic
            samples = np.tile(samples, math.ceil(MIN_POINTS / samples.size))
        if samples.size > MAX_POINTS:
            self._limit(cmd, f"{samples.size} points: more than the {MAX_POINTS} points of "
                             "the memory")
        return samples, amplitude, offset, srat

    # -- lifecycle ----------------------------------------------------------------------
    def _open(self) -> None:
        self.link.open()
        try:
            self._on_open()
            ident = parse_idn(self.ask("*IDN?"))
            if not ident.model.startswith(self.MODELS):
                raise self.link.fail("query '*IDN?'", f"model {ident.model!r} is not a "
                                                      "Keysight 33500B/33600A")
        except BaseException:
            self.link.close()
            raise
        self._uploaded = False

    def _upload(self) -> None:
        samples, amplitude, offset, srat = self.waveform()
        c = self.channel
        self.send(f"OUTP{c} OFF")
        if self.output_load is not None:
            self.send(f"OUTP{c}:LOAD {self.output_load}")
        if self.reference_clock is not None:
            self.send(f"ROSC:SOUR {self.reference_clock}")
        self.send(f"SOUR{c}:DATA:VOL:CLE")
        self._send_long(f"SOUR{c}:DATA:ARB:DAC {self.arb_name},"
                        + ",".join(map(str, samples.tolist())),
                        f"SOUR{c}:DATA:ARB:DAC {self.arb_name},<{samples.size} points>")
        self.send(f"SOUR{c}:FUNC:ARB {self.arb_name}")
        self.send(f"SOUR{c}:FUNC ARB")
        self.send(f"SOUR{c}:FUNC:ARB:SRAT {_fmt(srat)}")
        if self.filter is not None:
            self.send(f"SOUR{c}:FUNC:ARB:FILT {self.filter}")
        self.send(f"SOUR{c}:VOLT {_fmt(amplitude)}")
        self.send(f"SOUR{c}:VOLT:OFFS {_fmt(offset)}")
        self._uploaded = True
        log.info("%s: pattern of %d points uploaded (%g Sa/s, %g Vpp, %g V offset)", self.name,
                 samples.size, srat, amplitude, offset)

    def _send_long(self, command: str, label: str) -> None:
        """:meth:`send` for a command too long to quote in an error: named ``label``."""
        try:
            self.check_errors(f"before {label!r}")
        except InstrumentError as e:
            if "device error" not in str(e):
                raise
            log.warning("%s (left by an earlier command)", e)
        self.link.write_bytes((command + self.link.write_termination).encode("ascii"),
                              command=f"write {label!r}")
        self.check_errors(label)

    def _set_running(self, running: bool) -> None:
        c = self.channel
        if running:
            if not self._uploaded:
                self._upload()  # every check is made before its first command
            self.send(f"OUTP{c} ON")
        else:
            self.send(f"OUTP{c} OFF")

    def _get_running(self) -> bool:
        return self.ask_bool(f"OUTP{self.channel}?")

    def _no_compensation(self, command: str) -> InstrumentError:
        return InstrumentError(f"{self.name}: {command}: this arbitrary waveform generator "
                               "only encodes Alice's states; it has no polarization "
                               "compensation (use a polarization controller, "
                               "[instruments.polarization])")

    def _set_rotation_rad(self, rotation_rad: float) -> None:
        raise self._no_compensation("set_rotation_rad")

    def _get_rotation_rad(self) -> float:
        raise self._no_compensation("rotation_rad")

    def _status(self) -> dict[str, Any]:
        c = self.channel
        return {"running": self.ask_bool(f"OUTP{c}?"),
                "function": self.ask(f"SOUR{c}:FUNC?"),
                "arb": self.ask(f"SOUR{c}:FUNC:ARB?").strip('"'),
                "sample_rate_hz": self.ask_float(f"SOUR{c}:FUNC:ARB:SRAT?"),
                "amplitude_vpp": self.ask_float(f"SOUR{c}:VOLT?"),
                "offset_v": self.ask_float(f"SOUR{c}:VOLT:OFFS?"),
                "pattern_length": None if self._pattern is None else int(self._pattern.size),
                "uploaded": self._uploaded}
