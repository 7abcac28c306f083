"""Single Quantum SNSPD systems (Eos, Atlas drivers) through their JSON-over-TCP interface.

The system's driver electronics serve two TCP ports:

- the **control port** (12000 by default): JSON messages. The client sends bare
  JSON objects, one after the other without separator; the system answers with
  JSON objects each ended by the byte ``0x17`` (ETB), and may pack several
  objects into one, ``{...}{...}``. Everything the system says is a *label*
  and its value, ``{"label": "BiasCurrent", "value": [12.0, 8.0, 0.0, 0.0]}``;
  asked for its labels (``{"request": "labelProps", "value": "None"}``) it
  sends each label with its properties, ``{"label": L, "value": {"value": v,
  ...}}``; a label whose name contains ``Error`` reports an error. Commands
  set a label and carry the whole array, one value per detector::

      {"command": "SetAllBiasCurrents", "label": "BiasCurrent", "value": [uA, ...]}
      {"command": "SetAllTriggerLevels", "label": "TriggerLevel", "value": [mV, ...]}
      {"command": "DetectorEnable", "label": "DetectorEnable", "value": true}
      {"command": "SetMeasurementPeriod", "label": "InptMeasurementPeriod", "value": ms}
      {"request": "BiasVoltage"}      -> {"label": "BiasVoltage", "value": [mV, ...]}

  Labels read: ``NumberOfDetectors``, ``BiasCurrent`` (uA), ``TriggerLevel``
  (mV), ``DetectorEnable``, ``InptMeasurementPeriod`` (ms), ``BiasVoltage``
  (mV). Commands are not acknowledged: after each one the driver asks for the
  labels and waits until the system reports the value it was sent (within
  ``timeout_s``); a different value, an error label or silence is an
  :class:`~qkdctl.errors.InstrumentError` naming the instrument and the command.
  A value read is the latest the system has sent for that label.
- the **counts port** (12345 by default): text lines ``time,c1,c2,...,cN``, one
  per measurement period, the counts of each detector in that period.
  :meth:`SingleQuantumSnspd.count_rates_hz` opens it, reads one line and
  closes it, so that the counts are always fresh.

The instrument's ``resource`` is ``host:port`` of the control port
(``host`` alone means port 12000)::

    [instruments.detectors]
    driver = "single-quantum"
    resource = "192.168.1.1:12000"
    settings = { channels = [1, 2, 3, 4], bias_current_ua = { "1" = 11.5, "2" = 12.0,
                 "3" = 11.8, "4" = 12.2 }, trigger_level_mv = 25.0,
                 measurement_period_ms = 100, dead_time_ns = 50.0, model = "Eos",
                 serial = "SQ-2023-117" }
    limits = { max_bias_current_ua = 15.0 }

Settings: ``channels`` (required): the time-tagger inputs, in the order of the
system's detectors 1, 2, ... (or a table ``{"<input>" = <detector>}``);
``bias_current_ua``, ``efficiency`` (through ``efficiency_curve``
``[[uA, efficiency], ...]``, per channel or one for all), ``trigger_level_mv``,
``measurement_period_ms`` (>= 10), ``dead_time_ns`` and
``dark_count_rate_hz`` (characterised values, reported as configured: the
system has no dead-time setting and cannot tell dark counts from photons),
``counts_port``, ``model``, ``serial`` (reported by :meth:`identity`; the
interface has no identity query). Limits: ``max_bias_current_ua`` (required),
``min_trigger_level_mv``, ``max_trigger_level_mv``, all checked before
anything is sent.

The driver owns the whole system: detectors not listed in ``channels`` are
held at 0 uA. Connecting only reads. :meth:`bias_on` sends the bias setpoints,
then enables the detectors; :meth:`bias_off` zeroes the channels' currents and
disables the detectors once none is biased. Safe state: every bias current to
zero, then the detectors disabled; a link that was lost is reconnected once
for it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from qkdctl.errors import InstrumentError, LimitError

from .base import Identity, SinglePhotonDetector, _number
from .passive import (
    STATIC,
    channel_list,
    check_curves,
    check_number_table,
    curves,
    per_channel,
    unknown_channels,
)
from .transport import DEFAULT_TIMEOUT_S, Link, TcpLink

__all__ = ["SingleQuantumSnspd"]

log = logging.getLogger(__name__)

CONTROL_PORT = 12000
COUNTS_PORT = 12345
ETB = b"\x17"
LABEL_REQUEST = {"request": "labelProps", "value": "None"}
MIN_MEASUREMENT_PERIOD_MS = 10.0

_decoder = json.JSONDecoder()


def parse_frame(text: str) -> list[Any]:
    """The JSON objects of one frame (``{...}`` or several packed ``{...}{...}``)."""
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out
        obj, i = _decoder.raw_decode(text, i)
        out.append(obj)


class SingleQuantumSnspd(SinglePhotonDetector):
    """A Single Quantum SNSPD system (see the module documentation)."""

    SETTINGS = {
        **SinglePhotonDetector.SETTINGS,
        "bias_current_ua": "set_bias_current_ua",
        "trigger_level_mv": "set_trigger_level_mv",
        "measurement_period_ms": "set_measurement_period_ms",
        "dark_count_rate_hz": STATIC,
        "channels": STATIC,
        "efficiency_curve": STATIC,
        "counts_port": STATIC,
        "model": STATIC,
        "serial": STATIC,
    }
    LIMITS = {"max_bias_current_ua": "uA", "min_trigger_level_mv": "mV",
              "max_trigger_level_mv": "mV"}
    REQUIRED_LIMITS = ("max_bias_current_ua",)
    _PER_CHANNEL = ("efficiency", "dead_time_ns", "bias_current_ua", "trigger_level_mv",
                    "dark_count_rate_hz", "efficiency_curve")

    def __init__(self, name: str = "detectors", *, resource: str = "", backend: str = "",
                 timeout_s: float = DEFAULT_TIMEOUT_S, link: Link | None = None,
                 **kwargs: Any):
        """``link``: a ready-made control link instead of one to ``resource``."""
        super().__init__(name, **kwargs)
        del backend  # not a VISA instrument
        s = self.settings
        if "channels" not in s:
            self._config_fail("settings.channels",
                              "missing: list the time-tagger inputs in the order of the "
                              "system's detectors, e.g. channels = [1, 2, 3, 4]")
        self._detector = self._channel_map(s["channels"])
        bad = unknown_channels(s, self._PER_CHANNEL, self._detector)
        if bad:
            self._config_fail(f"settings.{bad[0]}.{bad[1]}",
                              f"no detector on channel {bad[1]}; channels are "
                              f"{', '.join(map(str, self.channels))}")
        if link is None:
            if resource and ":" not in resource.removeprefix("tcp://"):
                resource = f"{resource}:{CONTROL_PORT}"
            link = TcpLink(name, resource, timeout_s=timeout_s)
        self.link = link
        self._counts_resource = f"{getattr(link, 'host', 'localhost')}:" \
                                f"{int(s.get('counts_port', COUNTS_PORT))}"
        self._timeout_s = float(timeout_s)
        self._curves = curves(s["efficiency_curve"], self.channels, "uA") \
            if "efficiency_curve" in s else {}
        self._dark_hz = per_channel(s.get("dark_count_rate_hz"), self.channels) \
            if "dark_count_rate_hz" in s else {}
        self._dead_time_ns: dict[int, float | None] = dict.fromkeys(self.channels)
        self._setpoint_ua: dict[int, float | None] = dict.fromkeys(self.channels)
        self._on: dict[int, bool] = dict.fromkeys(self.channels, False)
        self._labels: dict[str, Any] = {}
        self.n_detectors = 0

    # -- configuration --------------------------------------------------------------------
    def _channel_map(self, value: Any) -> dict[int, int]:
        if isinstance(value, Mapping):
            return {int(ch): int(det) for ch, det in sorted(value.items(),
                                                            key=lambda kv: int(kv[1]))}
        return {ch: i + 1 for i, ch in enumerate(channel_list(value))}

    def _check_setting(self, key: str, value: Any) -> str | None:
        if key == "channels":
            if isinstance(value, Mapping):
                if not value:
                    return "expected a table { \"<input>\" = <detector number> }"
                dets = []
                for ch, det in value.items():
                    if not str(ch).isdigit() or not 0 <= int(ch) <= 254:
                        return f"channel {ch!r} is not a time-tagger input (0 to 254)"
                    if isinstance(det, bool) or not isinstance(det, int) or det < 1:
                        return f"channel {ch}: {det!r} is not a detector number (1, 2, ...)"
                    dets.append(det)
                if len(set(dets)) != len(dets):
                    return "a detector is wired to two channels"
                return None
            try:
                channel_list(value)
            except ValueError as e:
                return str(e)
            return None
        if key == "efficiency_curve":
            return check_curves(value, "uA")
        if key in ("model", "serial"):
            return None if isinstance(value, str) else f"expected a string, got {value!r}"
        if key == "counts_port":
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536
            return None if ok else f"expected a TCP port number, got {value!r}"
        if key == "measurement_period_ms":
            return check_number_table(value, "ms", lo=MIN_MEASUREMENT_PERIOD_MS) \
                if not isinstance(value, Mapping) else "one period for the whole system"
        units = {"bias_current_ua": "uA", "trigger_level_mv": "mV", "dark_count_rate_hz": "Hz"}
        if key in units:
            return check_number_table(value, units[key],
                                      lo=None if key == "trigger_level_mv" else 0.0)
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
        return tuple(self._detector)

    def detector_of(self, channel: int) -> int:
        """The system's detector number (1, 2, ...) wired to time-tagger input ``channel``."""
        (ch,) = self._targets(channel, "detector_of")
        return self._detector[ch]

    # -- protocol -------------------------------------------------------------------------
    def _send(self, message: dict[str, Any], command: str) -> None:
        self.link.write_bytes(json.dumps(message).encode("utf-8"), command=command)

    def _frames(self, command: str) -> list[dict[str, Any]]:
        raw = self.link.read_until(ETB, command=command)
        try:
            objs = parse_frame(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise self.link.fail(command, f"garbled reply {raw[:60]!r}") from None
        if not all(isinstance(o, dict) for o in objs):
            raise self.link.fail(command, f"garbled reply {raw[:60]!r} (expected JSON "
                                          "objects)")
        return objs

    def _await(self, label: str, command: str, expect: Any = None) -> Any:
        """Read until the system reports ``label`` (with the value ``expect``, if given)."""
        deadline = time.monotonic() + self._timeout_s
        seen: list[Any] = []
        while True:
            try:
                frames = self._frames(command)
            except InstrumentError as e:
                if seen and "no reply within" in str(e):  # silence after a different value
                    raise self.link.fail(command, f"the system reports {label} = {seen[-1]!r}"
                                                  f", not {expect!r}") from None
                raise
            for obj in frames:
                lab = str(obj.get("label", ""))
                if "Error" in lab:
                    raise InstrumentError(f"{self.name}: {command}: device error: {lab}: "
                                          f"{obj.get('value')!r} ({self.link.resource})")
                if "label" not in obj or "value" not in obj:
                    continue
                value = obj["value"]
                if isinstance(value, dict):
                    if "value" not in value:
                        continue
                    value = value["value"]
                self._labels[lab] = value
                if lab != label:
                    continue
                if expect is None or self._same(value, expect):
                    return value
                seen.append(value)
            if time.monotonic() >= deadline:
                raise self.link.fail(command, f"the system reports {label} = {seen[-1]!r}, "
                                              f"not {expect!r}" if seen else
                                              f"no {label} within {self._timeout_s:g} s")

    @staticmethod
    def _same(value: Any, expect: Any) -> bool:
        if isinstance(expect, bool):
            return value is expect
        if isinstance(expect, list):
            return isinstance(value, list) and len(value) == len(expect) and all(
                _number(v) is not None and math.isclose(float(v), e, abs_tol=1e-6)
                for v, e in zip(value, expect, strict=True))
        v = _number(value)
        return v is not None and math.isclose(v, float(expect), abs_tol=1e-6)

    def label(self, label: str) -> Any:
        """The value of one of the system's labels, as it reports it now."""
        self._require("label")
        return self._read_label(label)

    def _read_label(self, label: str) -> Any:
        command = f"labelProps {label}"
        self._send(LABEL_REQUEST, command)
        return self._await(label, command)

    def _command(self, command: str, label: str, value: Any) -> None:
        """Send a command, then wait until the system reports the value sent."""
        self._send({"command": command, "label": label, "value": value}, command)
        self._send(LABEL_REQUEST, command)
        self._await(label, command, expect=value)

    def _array(self, label: str, command: str) -> list[float]:
        value = self._read_label(label)
        if not isinstance(value, list) or len(value) != self.n_detectors or \
                any(_number(v) is None for v in value):
            raise self.link.fail(command, f"{label}: expected {self.n_detectors} numbers, "
                                          f"got {value!r}")
        return [float(v) for v in value]

    # -- connection -----------------------------------------------------------------------
    def _open(self) -> None:
        self.link.open()
        try:
            self._on_open()
        except BaseException:
            self.link.close()
            raise

    def _on_open(self) -> None:
        n = self._read_label("NumberOfDetectors")
        if isinstance(n, bool) or _number(n) is None or int(n) != n or n < 1:
            raise self.link.fail("labelProps NumberOfDetectors", f"garbled value {n!r}")
        self.n_detectors = int(n)
        missing = [f"{ch} (detector {d})" for ch, d in self._detector.items()
                   if d > self.n_detectors]
        if missing:
            raise InstrumentError(f"{self.name}: connect: the system has {self.n_detectors} "
                                  f"detectors; no detector for channel(s) "
                                  f"{', '.join(missing)} ({self.link.resource})")
        enabled = bool(self._read_label("DetectorEnable"))
        currents = self._array("BiasCurrent", "labelProps BiasCurrent")
        for ch, d in self._detector.items():
            i = currents[d - 1]
            self._on[ch] = enabled and i != 0.0
            if i != 0.0 and self._setpoint_ua[ch] is None:
                self._setpoint_ua[ch] = i

    def _close(self) -> None:
        self.link.close()

    def reconnect(self, attempts: int = 3, delay_s: float = 0.2) -> None:
        """Reopen the control link (after the system vanished) and read its state again."""
        self._require("reconnect")
        self.link.reconnect(attempts=attempts, delay_s=delay_s)
        self._on_open()

    def _identity(self) -> Identity:
        s = self.settings
        return Identity(make="Single Quantum", model=s.get("model", "SNSPD system"),
                        serial=s.get("serial", ""), firmware="")

    def system_info(self) -> dict[str, Any]:
        """What the system reports about itself: detectors, measurement period, labels."""
        self._require("system_info")
        return {"number_of_detectors": self.n_detectors,
                "measurement_period_ms": self._read_label("InptMeasurementPeriod"),
                "labels": sorted(self._labels)}

    # -- bias -----------------------------------------------------------------------------
    def _check_current(self, current_ua: Any, command: str) -> float:
        v = _number(current_ua)
        cap = self.limits["max_bias_current_ua"]
        if v is None or v < 0.0:
            raise LimitError(f"{self.name}: {command}: {current_ua!r} is not a bias current "
                             "in uA >= 0")
        if v > cap:
            raise LimitError(f"{self.name}: {command}: {v:g} uA is above the limit "
                             f"max_bias_current_ua = {cap:g} uA")
        return v

    def _currents(self, on: Mapping[int, bool], setpoints: Mapping[int, float | None]
                  ) -> list[float]:
        out = [0.0] * self.n_detectors
        for ch, d in self._detector.items():
            if on[ch]:
                out[d - 1] = float(setpoints[ch])
        return out

    def _send_currents(self, on: Mapping[int, bool],
                       setpoints: Mapping[int, float | None]) -> None:
        self._command("SetAllBiasCurrents", "BiasCurrent", self._currents(on, setpoints))

    def set_bias_current_ua(self, current_ua: float, channel: int | None = None) -> None:
        """Set the bias current setpoint in uA (applied now to a biased channel)."""
        v = self._check_current(current_ua, "set_bias_current_ua")
        targets = self._targets(channel, "set_bias_current_ua")
        self._require("set_bias_current_ua")
        self._set_setpoints(dict.fromkeys(targets, v))
        log.info("%s: bias current %g uA on channel(s) %s", self.name, v, list(targets))

    def _set_setpoints(self, new: Mapping[int, float]) -> None:
        setpoints = {**self._setpoint_ua, **new}
        if any(self._on[ch] for ch in new):
            self._send_currents(self._on, setpoints)
        self._setpoint_ua = setpoints

    def bias_current_ua(self, channel: int) -> float:
        """The bias current the system reports for the channel's detector, in uA."""
        (ch,) = self._targets(channel, "bias_current_ua")
        self._require("bias_current_ua")
        return self._array("BiasCurrent", "labelProps BiasCurrent")[self._detector[ch] - 1]

    def bias_voltage_mv(self, channel: int) -> float:
        """The voltage across the channel's detector, in mV."""
        (ch,) = self._targets(channel, "bias_voltage_mv")
        self._require("bias_voltage_mv")
        return self._bias_voltages()[self._detector[ch] - 1]

    def _bias_voltages(self) -> list[float]:
        self._send({"request": "BiasVoltage"}, "BiasVoltage")
        value = self._await("BiasVoltage", "BiasVoltage")
        if not isinstance(value, list) or any(_number(v) is None for v in value):
            raise self.link.fail("BiasVoltage", f"expected numbers, got {value!r}")
        return [float(v) for v in value]

    def _current_for(self, ch: int, efficiency: float, command: str) -> float:
        curve = self._curves.get(ch)
        if curve is None:
            raise LimitError(f"{self.name}: {command}: channel {ch}: no efficiency_curve "
                             "configured (or set bias_current_ua)")
        x = curve.x_for(efficiency)
        if x is None:
            lo, hi = curve.efficiency_range
            raise LimitError(f"{self.name}: {command}: channel {ch}: efficiency "
                             f"{efficiency:g} is outside the calibrated range {lo:g} to {hi:g}")
        return self._check_current(x, command)

    def set_efficiency(self, efficiency: float, channel: int | None = None) -> None:
        """Set the efficiency through the calibrated bias current (limits checked first)."""
        v = _number(efficiency)
        if v is not None and 0.0 <= v <= 1.0:
            for ch in self._targets(channel, "set_efficiency"):
                self._current_for(ch, v, "set_efficiency")
        super().set_efficiency(efficiency, channel)

    def _set_efficiency(self, channel: int, efficiency: float) -> None:
        self._set_setpoints({channel: self._current_for(channel, efficiency,
                                                        "set_efficiency")})

    def _get_efficiency(self, channel: int) -> float:
        curve = self._curves.get(channel)
        if curve is None:
            raise InstrumentError(f"{self.name}: efficiency: channel {channel}: no "
                                  "efficiency_curve configured")
        i = self.bias_current_ua(channel) if self._on[channel] else self._setpoint_ua[channel]
        return curve.efficiency_at(i) if i else 0.0

    def bias_on(self, channel: int | None = None) -> None:
        """Send the bias setpoints of the channel(s), then enable the detectors."""
        targets = self._targets(channel, "bias_on")
        for ch in targets:
            sp = self._setpoint_ua[ch]
            if sp is None:
                raise LimitError(f"{self.name}: bias_on: channel {ch}: no bias setpoint; set "
                                 "bias_current_ua or the efficiency first")
            self._check_current(sp, "bias_on")
        self._require("bias_on")
        self._set_biases(targets, True)
        log.info("%s: bias on, channel(s) %s", self.name, list(targets))

    def bias_off(self, channel: int | None = None) -> None:
        """Zero the bias current of the channel(s); disable the detectors once none is on."""
        targets = self._targets(channel, "bias_off")
        self._require("bias_off")
        self._set_biases(targets, False)
        log.info("%s: bias off, channel(s) %s", self.name, list(targets))

    def _set_bias(self, channel: int, on: bool) -> None:
        self._set_biases((channel,), on)

    def _set_biases(self, channels: tuple[int, ...], on: bool) -> None:
        new_on = {**self._on, **dict.fromkeys(channels, on)}
        self._send_currents(new_on, self._setpoint_ua)
        self._on = new_on
        enabled = bool(self._read_label("DetectorEnable"))
        if any(new_on.values()) != enabled:
            self._command("DetectorEnable", "DetectorEnable", any(new_on.values()))

    def _get_bias(self, channel: int) -> bool:
        if not self._read_label("DetectorEnable"):
            return False
        return self._array("BiasCurrent", "labelProps BiasCurrent")[
            self._detector[channel] - 1] != 0.0

    def _safe_state(self) -> None:
        try:
            self._zero()
        except InstrumentError as e:
            log.warning("%s: safe state: %s; reconnecting once", self.name, e)
            self.link.reconnect(attempts=2, delay_s=0.1)
            self._zero()

    def _zero(self) -> None:
        errors = []
        for command, label, value in (
                ("SetAllBiasCurrents", "BiasCurrent", [0.0] * self.n_detectors),
                ("DetectorEnable", "DetectorEnable", False)):
            try:
                self._command(command, label, value)
            except InstrumentError as e:
                errors.append(e)
        self._on = dict.fromkeys(self.channels, False)
        if errors:
            raise errors[0]

    # -- trigger levels, measurement period, counts ----------------------------------------
    def set_trigger_level_mv(self, level_mv: float, channel: int | None = None) -> None:
        """Set the counter trigger level of the channel(s), in mV."""
        v = _number(level_mv)
        cmd = "set_trigger_level_mv"
        if v is None:
            raise LimitError(f"{self.name}: {cmd}: {level_mv!r} is not a level in mV")
        lo, hi = self.limits.get("min_trigger_level_mv"), self.limits.get("max_trigger_level_mv")
        if lo is not None and v < lo:
            raise LimitError(f"{self.name}: {cmd}: {v:g} mV is below the limit "
                             f"min_trigger_level_mv = {lo:g} mV")
        if hi is not None and v > hi:
            raise LimitError(f"{self.name}: {cmd}: {v:g} mV is above the limit "
                             f"max_trigger_level_mv = {hi:g} mV")
        targets = self._targets(channel, cmd)
        self._require(cmd)
        levels = self._array("TriggerLevel", "labelProps TriggerLevel")
        for ch in targets:
            levels[self._detector[ch] - 1] = v
        self._command("SetAllTriggerLevels", "TriggerLevel", levels)
        log.info("%s: trigger level %g mV on channel(s) %s", self.name, v, list(targets))

    def trigger_level_mv(self, channel: int) -> float:
        (ch,) = self._targets(channel, "trigger_level_mv")
        self._require("trigger_level_mv")
        return self._array("TriggerLevel", "labelProps TriggerLevel")[self._detector[ch] - 1]

    def set_measurement_period_ms(self, period_ms: float) -> None:
        """Set the counters' measurement period (integration time), in ms (>= 10)."""
        v = _number(period_ms)
        if v is None or v < MIN_MEASUREMENT_PERIOD_MS:
            raise LimitError(f"{self.name}: set_measurement_period_ms: {period_ms!r} ms; the "
                             f"period is at least {MIN_MEASUREMENT_PERIOD_MS:g} ms")
        self._require("set_measurement_period_ms")
        value: float | int = int(v) if v == int(v) else v
        self._command("SetMeasurementPeriod", "InptMeasurementPeriod", value)
        log.info("%s: measurement period %g ms", self.name, v)

    def measurement_period_ms(self) -> float:
        self._require("measurement_period_ms")
        v = _number(self._read_label("InptMeasurementPeriod"))
        if v is None or v <= 0:
            raise self.link.fail("labelProps InptMeasurementPeriod", "garbled period")
        return v

    def count_rates_hz(self) -> dict[int, float]:
        """Count rate of every channel over one fresh measurement period, in Hz."""
        self._require("count_rates_hz")
        period_s = self.measurement_period_ms() / 1000
        counts = TcpLink(self.name, self._counts_resource, timeout_s=max(
            self._timeout_s, 2 * period_s))
        command = "read counts"
        counts.open()
        try:
            line = counts.read_until(b"\n", command=command).decode("ascii", "replace")
        finally:
            counts.close()
        try:
            values = [float(x) for x in line.strip().split(",")]
        except ValueError:
            raise counts.fail(command, f"garbled counts line {line[:60]!r}") from None
        if len(values) != self.n_detectors + 1 or not all(map(math.isfinite, values)):
            raise counts.fail(command, f"expected time and {self.n_detectors} counts, got "
                                       f"{line[:60]!r}")
        return {ch: values[d] / period_s for ch, d in self._detector.items()}

    # -- configured values ----------------------------------------------------------------
    def _set_dead_time_ns(self, channel: int, dead_time_ns: float) -> None:
        self._dead_time_ns[channel] = float(dead_time_ns)

    def _get_dead_time_ns(self, channel: int) -> float:
        v = self._dead_time_ns[channel]
        if v is None:
            raise InstrumentError(f"{self.name}: dead_time_ns: channel {channel}: not "
                                  "configured (the system has no dead-time setting; give the "
                                  "characterised settings.dead_time_ns)")
        return v

    def _get_dark_count_rate_hz(self, channel: int) -> float:
        if channel not in self._dark_hz:
            raise InstrumentError(
                f"{self.name}: dark_count_rate_hz: channel {channel}: no dark_count_rate_hz "
                "configured (measure count_rates_hz() with the input dark and put it in the "
                "bench file)")
        return float(self._dark_hz[channel]) if self._get_bias(channel) else 0.0

    def _status(self) -> dict[str, Any]:
        enabled = bool(self._read_label("DetectorEnable"))
        currents = self._array("BiasCurrent", "labelProps BiasCurrent")
        levels = self._array("TriggerLevel", "labelProps TriggerLevel")
        voltages = self._bias_voltages()
        chans = {}
        for ch, d in self._detector.items():
            entry = {"detector": d, "biased": enabled and currents[d - 1] != 0.0,
                     "bias_current_ua": currents[d - 1],
                     "bias_setpoint_ua": self._setpoint_ua[ch],
                     "bias_voltage_mv": voltages[d - 1] if d <= len(voltages) else None,
                     "trigger_level_mv": levels[d - 1],
                     "dead_time_ns": self._dead_time_ns[ch]}
            curve = self._curves.get(ch)
            if curve is not None:
                entry["efficiency"] = curve.efficiency_at(currents[d - 1]) \
                    if currents[d - 1] else 0.0
            chans[ch] = entry
        return {"detectors_enabled": enabled, "number_of_detectors": self.n_detectors,
                "measurement_period_ms": self._read_label("InptMeasurementPeriod"),
                "channels": chans}
