"""ID Quantique ID120: free-running silicon single-photon avalanche diode (visible, NIR).

One ID120 unit is one detector channel. Bob's four detectors are four units,
each on its own USB (USBTMC) VISA resource; one :class:`IdqId120` instrument
drives them all, one unit per time-tagger input::

    [instruments.detectors]
    driver = "idq-id120"
    timeout_s = 5.0
    settings = { resources = { "1" = "USB0::0x1DDC::0x0330::002008::INSTR",
                               "2" = "USB0::0x1DDC::0x0330::002009::INSTR",
                               "3" = "USB0::0x1DDC::0x0330::002010::INSTR",
                               "4" = "USB0::0x1DDC::0x0330::002011::INSTR" },
                 efficiency_curve = [[0.0, 0.0], [5.0, 0.45], [10.0, 0.7], [15.0, 0.8]],
                 efficiency = 0.7, dead_time_ns = 1000.0, threshold_mv = 100.0,
                 temperature_c = -40.0 }
    limits = { max_excess_bias_v = 15.0, max_bias_v = 240.0 }

A bench with a single unit may give ``resource`` (the instrument's) and
``channel`` (its time-tagger input) instead of ``resources``.

Commands (text over USBTMC, one per line, replies one line; integers in the
device's units, booleans ``TRUE``/``FALSE``)::

    *IDN?                                   identity
    INFO:BIAS_BREAKDOWN_VOLTAGE?            breakdown voltage (uV, read on connect)
    BIAS:VOLTAGE <uV> / BIAS:VOLTAGE?       APD bias voltage
    BIAS:ERROR_STATUS?                      bias supply fault, TRUE/FALSE
    DEADTIME:TIME <n> / DEADTIME:TIME?      dead time, in us (DEAD_TIME_UNIT_NS)
    THRESHOLD:VOLTAGE <uV> / ...?           discriminator threshold
    REG:TEMP_SET_POINT <mdegC> / ...?       cooler set point
    REG:MEASURED_TEMP?                      APD temperature (mdegC)
    REG:RUN TRUE|FALSE / REG:RUN?           run state of the unit (started / stopped)
    REG:STATE?                              the unit's state, as text
    COUNTERS:INTEGRATION_TIME <ms> / ...?   counter gate
    COUNTERS:DETECTION_FREQ?                count rate over the last gate (Hz)
    COUNTERS:DETECTION_COUNT?               counts in the last gate
    SYST:ERR?                               error queue (``settings.error_queue``)

**Efficiency.** The ID120 has no efficiency command: its detection efficiency
is set by the excess bias, the bias voltage above the APD's breakdown voltage.
``efficiency_curve`` (one curve for every unit or a table per channel) gives the
calibration ``[[excess_bias_v, efficiency], ...]``; :meth:`set_efficiency`
interpolates it (no extrapolation) and sets ``breakdown + excess``.
:meth:`set_excess_bias_v` (setting ``excess_bias_v``) sets the excess bias
directly. Both are checked against ``max_excess_bias_v`` and ``max_bias_v``
before any command is sent.

**Bias.** Setpoints are only sent to a unit that is running; connecting never
biases a detector. :meth:`bias_on` starts the unit (``REG:RUN TRUE``), waits
until the APD temperature is within ``settle_tolerance_c`` of its set point
(at most ``settle_timeout_s``; a unit that does not settle is stopped and the
error raised), then applies the bias. Safe state, per unit: ``BIAS:VOLTAGE 0``
(below breakdown: no detection), then ``REG:RUN FALSE``.

**Dark counts.** A SPAD cannot tell dark counts from photons; the dark count
rate reported is the one characterised and configured
(``dark_count_rate_hz``). :meth:`count_rate_hz` reads the unit's counter.

Settings: ``resources`` or ``channel``; ``efficiency``, ``excess_bias_v``,
``dead_time_ns``, ``threshold_mv``, ``temperature_c``, ``integration_time_ms``,
``dark_count_rate_hz`` (each a number or a per-channel table);
``efficiency_curve``; ``settle_tolerance_c`` (default 1), ``settle_timeout_s``
(default 300), ``settle_poll_s`` (default 1); ``error_queue`` (default true:
every command is followed by ``SYST:ERR?``; false for firmware without one).
Limits: ``max_excess_bias_v`` (required), ``max_bias_v``,
``min_temperature_c``, ``max_temperature_c``, ``min_dead_time_ns``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from qkdctl.errors import InstrumentError, LimitError

from .base import Identity, SinglePhotonDetector, _number
from .passive import (
    STATIC,
    check_curves,
    check_number_table,
    curves,
    per_channel,
    unknown_channels,
)
from .scpi import ScpiInstrument
from .transport import DEFAULT_TIMEOUT_S, Link

__all__ = ["IdqId120"]

log = logging.getLogger(__name__)


class _Named:
    """End of the mixin chain of a unit (gives it a name, like an Instrument)."""

    def __init__(self, name: str):
        self.name = name


class _Unit(ScpiInstrument, _Named):
    """One ID120 on its VISA link (the SCPI helpers: send + error queue, ask_float)."""

    LINK_OPTIONS = {"write_termination": "\n", "read_termination": "\n"}

    def ask_flag(self, command: str) -> bool:
        reply = self.ask(command).strip().upper()
        if reply in ("TRUE", "1", "ON"):
            return True
        if reply in ("FALSE", "0", "OFF"):
            return False
        raise self.link.fail(f"query {command!r}",
                             f"garbled reply {reply[:40]!r} (expected TRUE or FALSE)")

    def ask_int(self, command: str) -> int:
        return round(self.ask_float(command))


class IdqId120(SinglePhotonDetector):
    """ID Quantique ID120 units, one per detector channel (see the module documentation)."""

    #: dead time unit of ``DEADTIME:TIME`` in ns
    DEAD_TIME_UNIT_NS: ClassVar[float] = 1000.0
    #: device ranges, in the device's units
    BIAS_RANGE_UV: ClassVar[tuple[int, int]] = (0, 250_000_000)
    DEAD_TIME_RANGE: ClassVar[tuple[int, int]] = (40, 1_000_000)
    THRESHOLD_RANGE_UV: ClassVar[tuple[int, int]] = (0, 1_047_000)
    TEMPERATURE_RANGE_MC: ClassVar[tuple[int, int]] = (-50_000, -10_000)
    INTEGRATION_RANGE_MS: ClassVar[tuple[int, int]] = (200, 100_000)

    SETTINGS = {
        **SinglePhotonDetector.SETTINGS,
        "excess_bias_v": "set_excess_bias_v",
        "threshold_mv": "set_threshold_mv",
        "temperature_c": "set_temperature_c",
        "integration_time_ms": "set_integration_time_ms",
        "dark_count_rate_hz": STATIC,
        "resources": STATIC,
        "channel": STATIC,
        "efficiency_curve": STATIC,
        "settle_tolerance_c": STATIC,
        "settle_timeout_s": STATIC,
        "settle_poll_s": STATIC,
        "error_queue": STATIC,
    }
    LIMITS = {"max_excess_bias_v": "V", "max_bias_v": "V", "min_temperature_c": "degC",
              "max_temperature_c": "degC", "min_dead_time_ns": "ns"}
    REQUIRED_LIMITS = ("max_excess_bias_v",)
    _PER_CHANNEL = ("efficiency", "excess_bias_v", "dead_time_ns", "threshold_mv",
                    "temperature_c", "integration_time_ms", "dark_count_rate_hz",
                    "efficiency_curve")

    def __init__(self, name: str = "detectors", *, resource: str = "", backend: str = "",
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 links: Mapping[int, Link] | None = None, **kwargs: Any):
        """``links``: ready-made links by channel, instead of opening the resources."""
        super().__init__(name, **kwargs)
        resources = self._resources(resource)
        bad = unknown_channels(self.settings, self._PER_CHANNEL, resources)
        if bad:
            self._config_fail(f"settings.{bad[0]}.{bad[1]}",
                              f"no ID120 on channel {bad[1]}; channels are "
                              f"{', '.join(map(str, sorted(resources)))}")
        s = self.settings
        error_queue = s.get("error_queue", True)
        self._units: dict[int, _Unit] = {}
        for ch in sorted(resources):
            unit = _Unit(f"{name} channel {ch}", resource=resources[ch], backend=backend,
                         timeout_s=timeout_s, link=(links or {}).get(ch))
            if not error_queue:
                unit.ERROR_QUERY = None
            self._units[ch] = unit
        self._curves = curves(s["efficiency_curve"], self.channels, "V") \
            if "efficiency_curve" in s else {}
        self._dark_hz = per_channel(s.get("dark_count_rate_hz"), self.channels) \
            if "dark_count_rate_hz" in s else {}
        self.settle_tolerance_c = float(s.get("settle_tolerance_c", 1.0))
        self.settle_timeout_s = float(s.get("settle_timeout_s", 300.0))
        self.settle_poll_s = float(s.get("settle_poll_s", 1.0))
        self._excess_v: dict[int, float | None] = dict.fromkeys(self.channels)
        self._breakdown_v: dict[int, float] = {}

    # -- configuration --------------------------------------------------------------------
    def _resources(self, resource: str) -> dict[int, str]:
        s = self.settings
        if "resources" in s:
            if resource:
                self._config_fail("resource", "give either resource (one unit) or "
                                              "settings.resources (a unit per channel)")
            return {int(ch): str(r) for ch, r in s["resources"].items()}
        if not resource:
            self._config_fail("settings.resources",
                              "missing: map each detector channel to its ID120, e.g. "
                              'resources = { "1" = "USB0::0x1DDC::0x0330::002008::INSTR" }')
        if "channel" not in s:
            self._config_fail("settings.channel", "missing: the time-tagger input of this "
                                                  "ID120 (or use settings.resources)")
        return {int(s["channel"]): resource}

    def _check_setting(self, key: str, value: Any) -> str | None:
        if key == "resources":
            if not isinstance(value, Mapping) or not value:
                return "expected a table { \"<channel>\" = \"<VISA resource>\" }"
            for ch, r in value.items():
                if not str(ch).isdigit() or not 0 <= int(ch) <= 254:
                    return f"channel {ch!r} is not a time-tagger input (0 to 254)"
                if not isinstance(r, str) or not r:
                    return f"channel {ch}: expected a VISA resource string, got {r!r}"
            return None
        if key == "channel":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 254:
                return f"expected a time-tagger input (an integer 0 to 254), got {value!r}"
            return None
        if key == "efficiency_curve":
            return check_curves(value, "V")
        if key == "error_queue":
            return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        if key in ("settle_tolerance_c", "settle_timeout_s", "settle_poll_s"):
            v = _number(value)
            return None if v is not None and v > 0 else f"expected a number > 0, got {value!r}"
        units = {"excess_bias_v": "V", "threshold_mv": "mV", "temperature_c": "degC",
                 "integration_time_ms": "ms", "dark_count_rate_hz": "Hz"}
        if key in units:
            return check_number_table(value, units[key],
                                      lo=None if key == "temperature_c" else 0.0)
        return super()._check_setting(key, value)

    def _apply_setting(self, key: str, value: Any) -> None:
        if self.SETTINGS[key] == STATIC:
            if value != self.settings.get(key):
                raise InstrumentError(f"{self.name}: configure: {key} is fixed when the "
                                      "instrument is built (change it in the bench file)")
            return
        super()._apply_setting(key, value)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self._units)

    def unit(self, channel: int) -> _Unit:
        """The unit on ``channel`` (its ``link`` and SCPI helpers)."""
        (ch,) = self._targets(channel, "unit")
        return self._units[ch]

    # -- connection -----------------------------------------------------------------------
    def _open(self) -> None:
        opened = []
        try:
            for ch, unit in self._units.items():
                opened.append(unit)
                unit._open()
                self._check_model(ch, unit)
                self._breakdown_v[ch] = self._read_breakdown(ch, unit)
        except BaseException:
            for unit in opened:
                unit._close()
            raise

    def _check_model(self, ch: int, unit: _Unit) -> None:
        ident = unit._identity()
        if "ID120" not in ident.model.upper():
            raise InstrumentError(f"{unit.name}: *IDN?: {ident.make} {ident.model} is not an "
                                  f"ID Quantique ID120 ({unit.link.resource})")

    def _read_breakdown(self, ch: int, unit: _Unit) -> float:
        cmd = "INFO:BIAS_BREAKDOWN_VOLTAGE?"
        v = unit.ask_float(cmd) * 1e-6
        lo, hi = (x * 1e-6 for x in self.BIAS_RANGE_UV)
        if not lo < v < hi:
            raise unit.link.fail(f"query {cmd!r}", f"implausible breakdown voltage {v:g} V")
        return v

    def _close(self) -> None:
        for unit in self._units.values():
            unit._close()

    def _identity(self) -> Identity:
        ids = [self._units[ch]._identity() for ch in self.channels]
        firmware = {i.firmware for i in ids}
        return Identity(make=ids[0].make, model=ids[0].model,
                        serial=", ".join(i.serial for i in ids),
                        firmware=ids[0].firmware if len(firmware) == 1
                        else ", ".join(i.firmware for i in ids))

    def unit_identities(self) -> dict[int, Identity]:
        """The identity of each unit, by channel."""
        self._require("unit_identities")
        return {ch: u._identity() for ch, u in self._units.items()}

    def breakdown_v(self, channel: int) -> float:
        """The unit's APD breakdown voltage in V (read when connecting)."""
        (ch,) = self._targets(channel, "breakdown_v")
        self._require("breakdown_v")
        return self._breakdown_v[ch]

    # -- checks ---------------------------------------------------------------------------
    def _fail(self, command: str, problem: str) -> LimitError:
        return LimitError(f"{self.name}: {command}: {problem}")

    def _check_excess(self, ch: int, excess_v: float, command: str) -> None:
        cap = self.limits["max_excess_bias_v"]
        if excess_v > cap:
            raise self._fail(command, f"channel {ch}: excess bias {excess_v:g} V is above the "
                                      f"limit max_excess_bias_v = {cap:g} V")
        vbr = self._breakdown_v.get(ch)
        if vbr is None:
            return
        bias = vbr + excess_v
        cap = self.limits.get("max_bias_v")
        if cap is not None and bias > cap:
            raise self._fail(command, f"channel {ch}: bias {bias:g} V (breakdown {vbr:g} V + "
                                      f"{excess_v:g} V) is above the limit max_bias_v = "
                                      f"{cap:g} V")
        hi = self.BIAS_RANGE_UV[1] * 1e-6
        if bias > hi:
            raise self._fail(command, f"channel {ch}: bias {bias:g} V is above the ID120's "
                                      f"{hi:g} V")

    def _excess_for(self, ch: int, efficiency: float, command: str) -> float:
        curve = self._curves.get(ch)
        if curve is None:
            raise self._fail(command, f"channel {ch}: no efficiency_curve configured (the "
                                      "ID120 sets its efficiency through the excess bias)")
        x = curve.x_for(efficiency)
        if x is None:
            lo, hi = curve.efficiency_range
            raise self._fail(command, f"channel {ch}: efficiency {efficiency:g} is outside "
                                      f"the calibrated range {lo:g} to {hi:g}")
        return x

    @staticmethod
    def _in_range(value: float, rng: tuple[int, int]) -> bool:
        return rng[0] <= value <= rng[1]

    # -- efficiency and bias --------------------------------------------------------------
    def set_efficiency(self, efficiency: float, channel: int | None = None) -> None:
        """Set the efficiency through the calibrated excess bias (checked first)."""
        v = _number(efficiency)
        if v is not None and 0.0 <= v <= 1.0:
            for ch in self._targets(channel, "set_efficiency"):
                self._check_excess(ch, self._excess_for(ch, v, "set_efficiency"),
                                   "set_efficiency")
        super().set_efficiency(efficiency, channel)

    def _set_efficiency(self, channel: int, efficiency: float) -> None:
        self._set_excess(channel, self._excess_for(channel, efficiency, "set_efficiency"))

    def _get_efficiency(self, channel: int) -> float:
        curve = self._curves.get(channel)
        if curve is None:
            raise InstrumentError(f"{self.name}: efficiency: channel {channel}: no "
                                  "efficiency_curve configured")
        excess = self._excess_now(channel)
        if excess is None:
            return 0.0
        return curve.efficiency_at(excess) if excess > 0 else 0.0

    def set_excess_bias_v(self, excess_v: float, channel: int | None = None) -> None:
        """Set the bias above breakdown, in V (checked against the limits first)."""
        v = _number(excess_v)
        if v is None or v < 0.0:
            raise self._fail("set_excess_bias_v", f"{excess_v!r} is not an excess bias in "
                                                  "V >= 0")
        targets = self._targets(channel, "set_excess_bias_v")
        for ch in targets:
            self._check_excess(ch, v, "set_excess_bias_v")
        self._require("set_excess_bias_v")
        for ch in targets:
            self._set_excess(ch, v)
        log.info("%s: excess bias %g V on channel(s) %s", self.name, v, list(targets))

    def excess_bias_v(self, channel: int) -> float | None:
        """The excess bias in V: applied (running unit) or the setpoint (None if unset)."""
        (ch,) = self._targets(channel, "excess_bias_v")
        self._require("excess_bias_v")
        return self._excess_now(ch)

    def bias_voltage_v(self, channel: int) -> float:
        """The bias voltage the unit reports, in V."""
        (ch,) = self._targets(channel, "bias_voltage_v")
        self._require("bias_voltage_v")
        return self._units[ch].ask_float("BIAS:VOLTAGE?") * 1e-6

    def _set_excess(self, ch: int, excess_v: float) -> None:
        self._excess_v[ch] = float(excess_v)
        if self._units[ch].ask_flag("REG:RUN?"):
            self._apply_bias(ch)

    def _excess_now(self, ch: int) -> float | None:
        unit = self._units[ch]
        if unit.ask_flag("REG:RUN?"):
            return unit.ask_float("BIAS:VOLTAGE?") * 1e-6 - self._breakdown_v[ch]
        return self._excess_v[ch]

    def _apply_bias(self, ch: int) -> None:
        excess = self._excess_v[ch]
        self._check_excess(ch, excess, "bias")
        uv = round((self._breakdown_v[ch] + excess) * 1e6)
        self._units[ch].send(f"BIAS:VOLTAGE {uv}")

    def bias_on(self, channel: int | None = None) -> None:
        """Start the unit(s), wait for the temperature to settle, apply the bias setpoint."""
        for ch in self._targets(channel, "bias_on"):
            excess = self._excess_v[ch]
            if excess is None:
                raise self._fail("bias_on", f"channel {ch}: no bias setpoint; set the "
                                            "efficiency or the excess bias first")
            self._check_excess(ch, excess, "bias_on")
        super().bias_on(channel)

    def _set_bias(self, channel: int, on: bool) -> None:
        unit = self._units[channel]
        if not on:
            # both commands, even if the first fails: stopping the unit also ends detection
            errors = []
            for command in ("BIAS:VOLTAGE 0", "REG:RUN FALSE"):
                try:
                    unit.send(command)
                except InstrumentError as e:
                    errors.append(e)
            if errors:
                raise errors[0]
            return
        unit.send("REG:RUN TRUE")
        try:
            self._settle(channel)
            self._apply_bias(channel)
        except BaseException:
            try:
                self._set_bias(channel, False)
            except InstrumentError as e:
                log.error("%s: channel %d: could not stop the unit: %s", self.name, channel, e)
            raise

    def _get_bias(self, channel: int) -> bool:
        unit = self._units[channel]
        if not unit.ask_flag("REG:RUN?"):
            return False
        return unit.ask_float("BIAS:VOLTAGE?") * 1e-6 > self._breakdown_v[channel]

    def _safe_state(self) -> None:
        # every unit, even when one fails
        errors = []
        for ch in self.channels:
            try:
                self._set_bias(ch, False)
            except InstrumentError as e:
                errors.append(str(e))
        if errors:
            raise InstrumentError(f"{self.name}: safe_state: " + "; ".join(errors))

    # -- temperature ----------------------------------------------------------------------
    def set_temperature_c(self, temperature_c: float, channel: int | None = None) -> None:
        """Set the APD cooler set point in degC (the ID120 takes -50 to -10 degC)."""
        v = _number(temperature_c)
        cmd = "set_temperature_c"
        if v is None:
            raise self._fail(cmd, f"{temperature_c!r} is not a temperature in degC")
        lo, hi = self.limits.get("min_temperature_c"), self.limits.get("max_temperature_c")
        if lo is not None and v < lo:
            raise self._fail(cmd, f"{v:g} degC is below the limit min_temperature_c = "
                                  f"{lo:g} degC")
        if hi is not None and v > hi:
            raise self._fail(cmd, f"{v:g} degC is above the limit max_temperature_c = "
                                  f"{hi:g} degC")
        mc = round(v * 1000)
        if not self._in_range(mc, self.TEMPERATURE_RANGE_MC):
            a, b = (x / 1000 for x in self.TEMPERATURE_RANGE_MC)
            raise self._fail(cmd, f"{v:g} degC is outside the ID120's range {a:g} to {b:g} "
                                  "degC")
        targets = self._targets(channel, cmd)
        self._require(cmd)
        for ch in targets:
            self._units[ch].send(f"REG:TEMP_SET_POINT {mc}")
        log.info("%s: temperature set point %g degC on channel(s) %s", self.name, v,
                 list(targets))

    def temperature_c(self, channel: int) -> float:
        """The APD temperature the unit measures, in degC."""
        (ch,) = self._targets(channel, "temperature_c")
        self._require("temperature_c")
        return self._units[ch].ask_float("REG:MEASURED_TEMP?") / 1000

    def temperature_setpoint_c(self, channel: int) -> float:
        (ch,) = self._targets(channel, "temperature_setpoint_c")
        self._require("temperature_setpoint_c")
        return self._units[ch].ask_float("REG:TEMP_SET_POINT?") / 1000

    def _settle(self, ch: int) -> None:
        unit = self._units[ch]
        deadline = time.monotonic() + self.settle_timeout_s
        while True:
            t = unit.ask_float("REG:MEASURED_TEMP?") / 1000
            t_set = unit.ask_float("REG:TEMP_SET_POINT?") / 1000
            if abs(t - t_set) <= self.settle_tolerance_c:
                log.info("%s: channel %d: temperature %g degC (set point %g degC)", self.name,
                         ch, t, t_set)
                return
            if time.monotonic() >= deadline:
                raise InstrumentError(
                    f"{self.name}: bias_on: channel {ch}: the temperature did not settle "
                    f"within {self.settle_timeout_s:g} s: {t:g} degC, set point {t_set:g} "
                    f"degC, tolerance {self.settle_tolerance_c:g} degC "
                    f"({unit.link.resource})")
            time.sleep(self.settle_poll_s)

    # -- dead time, threshold, counters ---------------------------------------------------
    def set_dead_time_ns(self, dead_time_ns: float, channel: int | None = None) -> None:
        """Set the dead time in ns (in the ID120's range; ``min_dead_time_ns`` checked)."""
        v = _number(dead_time_ns)
        if v is not None and v >= 0.0:
            lo = self.limits.get("min_dead_time_ns")
            if lo is not None and v < lo:
                raise self._fail("set_dead_time_ns", f"{v:g} ns is below the limit "
                                                     f"min_dead_time_ns = {lo:g} ns")
            if not self._in_range(round(v / self.DEAD_TIME_UNIT_NS), self.DEAD_TIME_RANGE):
                a, b = (x * self.DEAD_TIME_UNIT_NS for x in self.DEAD_TIME_RANGE)
                raise self._fail("set_dead_time_ns", f"{v:g} ns is outside the ID120's range "
                                                     f"{a:g} to {b:g} ns")
        super().set_dead_time_ns(dead_time_ns, channel)

    def _set_dead_time_ns(self, channel: int, dead_time_ns: float) -> None:
        n = round(dead_time_ns / self.DEAD_TIME_UNIT_NS)
        self._units[channel].send(f"DEADTIME:TIME {n}")

    def _get_dead_time_ns(self, channel: int) -> float:
        return self._units[channel].ask_float("DEADTIME:TIME?") * self.DEAD_TIME_UNIT_NS

    def set_threshold_mv(self, threshold_mv: float, channel: int | None = None) -> None:
        """Set the discriminator threshold in mV (0 to 1047 mV)."""
        v = _number(threshold_mv)
        uv = None if v is None else round(v * 1000)
        if uv is None or not self._in_range(uv, self.THRESHOLD_RANGE_UV):
            a, b = (x / 1000 for x in self.THRESHOLD_RANGE_UV)
            raise self._fail("set_threshold_mv", f"{threshold_mv!r} mV is outside the ID120's "
                                                 f"range {a:g} to {b:g} mV")
        targets = self._targets(channel, "set_threshold_mv")
        self._require("set_threshold_mv")
        for ch in targets:
            self._units[ch].send(f"THRESHOLD:VOLTAGE {uv}")
        log.info("%s: threshold %g mV on channel(s) %s", self.name, v, list(targets))

    def threshold_mv(self, channel: int) -> float:
        (ch,) = self._targets(channel, "threshold_mv")
        self._require("threshold_mv")
        return self._units[ch].ask_float("THRESHOLD:VOLTAGE?") / 1000

    def set_integration_time_ms(self, integration_time_ms: float,
                                channel: int | None = None) -> None:
        """Set the counter gate in ms (200 to 100000 ms)."""
        v = _number(integration_time_ms)
        ms = None if v is None else round(v)
        if ms is None or not self._in_range(ms, self.INTEGRATION_RANGE_MS):
            a, b = self.INTEGRATION_RANGE_MS
            raise self._fail("set_integration_time_ms", f"{integration_time_ms!r} ms is "
                                                        f"outside the ID120's range {a} to "
                                                        f"{b} ms")
        targets = self._targets(channel, "set_integration_time_ms")
        self._require("set_integration_time_ms")
        for ch in targets:
            self._units[ch].send(f"COUNTERS:INTEGRATION_TIME {ms}")
        log.info("%s: integration time %d ms on channel(s) %s", self.name, ms, list(targets))

    def count_rate_hz(self, channel: int) -> float:
        """The unit's count rate over its last counter gate, in Hz (light and dark)."""
        (ch,) = self._targets(channel, "count_rate_hz")
        self._require("count_rate_hz")
        return self._units[ch].ask_float("COUNTERS:DETECTION_FREQ?")

    def _get_dark_count_rate_hz(self, channel: int) -> float:
        if channel not in self._dark_hz:
            raise InstrumentError(
                f"{self.name}: dark_count_rate_hz: channel {channel}: no dark_count_rate_hz "
                "configured (an ID120 cannot tell dark counts from photons; measure "
                "count_rate_hz() with the input dark and put it in the bench file)")
        return float(self._dark_hz[channel]) if self._get_bias(channel) else 0.0

    # -- status ---------------------------------------------------------------------------
    def _status(self) -> dict[str, Any]:
        out: dict[int, dict[str, Any]] = {}
        for ch, unit in self._units.items():
            try:
                running = unit.ask_flag("REG:RUN?")
                bias_v = unit.ask_float("BIAS:VOLTAGE?") * 1e-6
                entry: dict[str, Any] = {
                    "running": running,
                    "state": unit.ask("REG:STATE?"),
                    "bias_v": bias_v,
                    "breakdown_v": self._breakdown_v[ch],
                    "excess_bias_setpoint_v": self._excess_v[ch],
                    "bias_error": unit.ask_flag("BIAS:ERROR_STATUS?"),
                    "temperature_c": unit.ask_float("REG:MEASURED_TEMP?") / 1000,
                    "temperature_setpoint_c": unit.ask_float("REG:TEMP_SET_POINT?") / 1000,
                    "dead_time_ns": self._get_dead_time_ns(ch),
                    "threshold_mv": unit.ask_float("THRESHOLD:VOLTAGE?") / 1000,
                    "count_rate_hz": unit.ask_float("COUNTERS:DETECTION_FREQ?"),
                }
                curve = self._curves.get(ch)
                if curve is not None:
                    excess = bias_v - self._breakdown_v[ch] if running else self._excess_v[ch]
                    entry["efficiency"] = (curve.efficiency_at(excess)
                                           if excess is not None and excess > 0 else 0.0)
                out[ch] = entry
            except InstrumentError as e:
                out[ch] = {"error": str(e)}
        return {"channels": out}
