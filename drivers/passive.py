"""Passive single-photon detectors, and the configuration helpers of the detector drivers.

:class:`PassiveDetectors` is for detectors with no data link at all: free-running
modules whose TTL/NIM outputs go to the time tagger and whose bias is set by a
knob, a jumper or the module's own controller. The driver holds what the bench
file says about them and reports it::

    [instruments.detectors]
    driver = "passive"
    settings = { channels = [1, 2, 3, 4], efficiency = 0.55, dead_time_ns = 22.0,
                 dark_count_rate_hz = { "1" = 150.0, "2" = 180.0, "3" = 140.0, "4" = 160.0 },
                 make = "Excelitas", model = "SPCM-AQRH-14", serial = "a1, a2, a3, a4" }

- ``channels`` (required): the time-tagger inputs the detectors are wired to;
- ``efficiency``, ``dead_time_ns``, ``dark_count_rate_hz``: one number for every
  channel or a table ``{"<channel>" = value}``; reported as configured (the
  dark count rate while biased, 0 while biased down). Asking for a value that
  was not configured is an :class:`~qkdctl.errors.InstrumentError` (the status
  shows None);
- ``make``, ``model``, ``serial``, ``firmware``: the identity reported.

Bias on/off is bookkeeping: the driver records it and logs that the bias is not
under its control. Connecting never fails (there is nothing to open), and the
instrument takes no ``resource``.

The helpers :func:`channel_list`, :func:`per_channel` and
:class:`EfficiencyCurve` are shared with the other detector drivers
(:mod:`.idq_id120`, :mod:`.single_quantum`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from qkdctl.errors import InstrumentError, LimitError

from .base import STATIC, Identity, SinglePhotonDetector, _number

__all__ = [
    "STATIC",
    "EfficiencyCurve",
    "PassiveDetectors",
    "channel_list",
    "check_curves",
    "check_number_table",
    "curves",
    "per_channel",
    "unknown_channels",
]

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------- config helpers
def _channel(key: Any) -> int | None:
    s = str(key).strip()
    if isinstance(key, bool) or not s.lstrip("-").isdigit():
        return None
    return int(s)


def channel_list(value: Any) -> tuple[int, ...]:
    """A list of time-tagger inputs as a tuple (ValueError saying what is wrong)."""
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"expected a non-empty list of time-tagger inputs, got {value!r}")
    out: list[int] = []
    for v in value:
        ch = _channel(v) if isinstance(v, int | str) else None
        if ch is None or not 0 <= ch <= 254:
            raise ValueError(f"{v!r} is not a time-tagger input (an integer from 0 to 254)")
        if ch in out:
            raise ValueError(f"channel {ch} is listed twice")
        out.append(ch)
    return tuple(out)


def per_channel(value: Any, channels: Iterable[int]) -> dict[int, Any]:
    """A setting given as one value for all channels or as ``{"<channel>": value}``."""
    if isinstance(value, Mapping):
        return {int(k): v for k, v in value.items()}
    return dict.fromkeys(channels, value)


def check_number_table(value: Any, unit: str, *, lo: float | None = None,
                       hi: float | None = None) -> str | None:
    """Check a number or a ``{"<channel>": number}`` table; return the problem or None."""
    items = value.items() if isinstance(value, Mapping) else [(None, value)]
    for ch, v in items:
        if ch is not None and _channel(ch) is None:
            return f"channel {ch!r} is not an integer"
        x = _number(v)
        where = f" (channel {ch})" if ch is not None else ""
        if x is None:
            return f"expected a finite number of {unit}{where}, got {v!r}"
        if lo is not None and x < lo:
            return f"{x:g} {unit}{where} is below {lo:g} {unit}"
        if hi is not None and x > hi:
            return f"{x:g} {unit}{where} is above {hi:g} {unit}"
    return None


def unknown_channels(settings: Mapping[str, Any], keys: Iterable[str],
                     channels: Iterable[int]) -> tuple[str, int] | None:
    """The first ``(setting, channel)`` of a per-channel table naming a channel not in use."""
    known = set(channels)
    for key in keys:
        value = settings.get(key)
        if isinstance(value, Mapping):
            for ch in value:
                if int(ch) not in known:
                    return key, int(ch)
    return None


class EfficiencyCurve:
    """Detection efficiency against a control variable (an excess bias, a bias current).

    Built from the bench file's calibration points ``[[x, efficiency], ...]``,
    both strictly increasing; between points it interpolates linearly, and it
    does not extrapolate: an efficiency outside the calibrated range is refused
    (:meth:`x_for` returns None), an ``x`` outside it is clamped to the end
    points by :meth:`efficiency_at`.
    """

    def __init__(self, points: Any, unit: str):
        problem = self.problem(points, unit)
        if problem:
            raise ValueError(problem)
        self.unit = unit
        self.x = np.array([float(p[0]) for p in points])
        self.efficiency = np.array([float(p[1]) for p in points])

    @staticmethod
    def problem(points: Any, unit: str) -> str | None:
        """What is wrong with ``points`` as a calibration curve, or None."""
        if not isinstance(points, list | tuple) or len(points) < 2:
            return ("expected at least two calibration points "
                    f"[[{unit}, efficiency], ...], got {points!r}")
        xs, es = [], []
        for p in points:
            if not isinstance(p, list | tuple) or len(p) != 2 \
                    or _number(p[0]) is None or _number(p[1]) is None:
                return f"calibration point {p!r} is not a pair [{unit}, efficiency]"
            xs.append(float(p[0]))
            es.append(float(p[1]))
        if any(not 0.0 <= e <= 1.0 for e in es):
            return "calibrated efficiencies must be from 0 to 1"
        if any(b <= a for a, b in zip(xs, xs[1:], strict=False)) or \
                any(b <= a for a, b in zip(es, es[1:], strict=False)):
            return f"calibration points must increase strictly in both {unit} and efficiency"
        return None

    @property
    def x_range(self) -> tuple[float, float]:
        return float(self.x[0]), float(self.x[-1])

    @property
    def efficiency_range(self) -> tuple[float, float]:
        return float(self.efficiency[0]), float(self.efficiency[-1])

    def x_for(self, efficiency: float) -> float | None:
        """The control value that gives ``efficiency``; None outside the calibrated range."""
        lo, hi = self.efficiency_range
        if not lo <= efficiency <= hi:
            return None
        return float(np.interp(efficiency, self.efficiency, self.x))

    def efficiency_at(self, x: float) -> float:
        """The efficiency at control value ``x`` (clamped to the calibrated range)."""
        return float(np.interp(x, self.x, self.efficiency))


def curves(value: Any, channels: Iterable[int], unit: str) -> dict[int, EfficiencyCurve]:
    """The ``efficiency_curve`` setting: one curve for all channels or a table of curves."""
    table = value if isinstance(value, Mapping) else dict.fromkeys(channels, value)
    return {int(ch): EfficiencyCurve(points, unit) for ch, points in table.items()}


def check_curves(value: Any, unit: str) -> str | None:
    """Check an ``efficiency_curve`` setting; return the problem or None."""
    table = value.items() if isinstance(value, Mapping) else [(None, value)]
    for ch, points in table:
        if ch is not None and _channel(ch) is None:
            return f"channel {ch!r} is not an integer"
        problem = EfficiencyCurve.problem(points, unit)
        if problem:
            return problem + (f" (channel {ch})" if ch is not None else "")
    return None


# -------------------------------------------------------------------------- the driver
class PassiveDetectors(SinglePhotonDetector):
    """Detectors with no data link: configured values, bias as bookkeeping.

    See the module documentation for the settings. There are no limits.
    """

    SETTINGS = {
        **SinglePhotonDetector.SETTINGS,
        "dark_count_rate_hz": "set_dark_count_rate_hz",
        "channels": STATIC,
        "make": STATIC,
        "model": STATIC,
        "serial": STATIC,
        "firmware": STATIC,
    }
    _IDENTITY_KEYS = ("make", "model", "serial", "firmware")

    def __init__(self, name: str = "detectors", *, resource: str = "", backend: str = "",
                 timeout_s: float | None = None, **kwargs: Any):
        super().__init__(name, **kwargs)
        del backend, timeout_s  # accepted like every driver's, unused: nothing to open
        if resource:
            self._config_fail("resource", f"{resource!r}: passive detectors have no data "
                                          "link; remove the resource")
        if "channels" not in self.settings:
            self._config_fail("settings.channels",
                              "missing: list the time-tagger inputs the detectors are wired "
                              "to, e.g. channels = [1, 2, 3, 4]")
        self._channels: tuple[int, ...] = channel_list(self.settings["channels"])
        bad = unknown_channels(self.settings, ("efficiency", "dead_time_ns",
                                               "dark_count_rate_hz"), self._channels)
        if bad:
            self._config_fail(f"settings.{bad[0]}.{bad[1]}",
                              f"no detector on channel {bad[1]}; channels are "
                              f"{', '.join(map(str, self._channels))}")
        self._efficiency: dict[int, float | None] = dict.fromkeys(self._channels)
        self._dead_time_ns: dict[int, float | None] = dict.fromkeys(self._channels)
        self._dark_hz: dict[int, float | None] = dict.fromkeys(self._channels)
        self._biased = dict.fromkeys(self._channels, False)

    # -- configuration ------------------------------------------------------------------
    def _check_setting(self, key: str, value: Any) -> str | None:
        if key == "channels":
            try:
                channel_list(value)
            except ValueError as e:
                return str(e)
            return None
        if key in self._IDENTITY_KEYS:
            return None if isinstance(value, str) else f"expected a string, got {value!r}"
        if key == "dark_count_rate_hz":
            return check_number_table(value, "Hz", lo=0.0)
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
        return self._channels

    # -- the configured values ----------------------------------------------------------
    def set_dark_count_rate_hz(self, rate_hz: float, channel: int | None = None) -> None:
        """Record the dark count rate of the detector(s) when biased, in Hz."""
        v = _number(rate_hz)
        if v is None or v < 0.0:
            raise LimitError(f"{self.name}: set_dark_count_rate_hz({rate_hz!r}): a rate is "
                             "a finite number of Hz >= 0")
        targets = self._targets(channel, "set_dark_count_rate_hz")
        self._require("set_dark_count_rate_hz")
        for ch in targets:
            self._dark_hz[ch] = v
        log.info("%s: dark count rate %g Hz on channel(s) %s", self.name, v, list(targets))

    def _open(self) -> None:
        log.debug("%s: passive detectors: no link to open", self.name)

    def _close(self) -> None:
        pass

    def _identity(self) -> Identity:
        s = self.settings
        return Identity(make=s.get("make", ""), model=s.get("model", "passive detectors"),
                        serial=s.get("serial", ""), firmware=s.get("firmware", ""))

    def _set_efficiency(self, channel: int, efficiency: float) -> None:
        self._efficiency[channel] = float(efficiency)

    def _configured(self, table: dict[int, float | None], channel: int, what: str) -> float:
        v = table[channel]
        if v is None:
            raise InstrumentError(f"{self.name}: {what}: channel {channel}: not configured "
                                  f"(give settings.{what} in the bench file)")
        return v

    def _get_efficiency(self, channel: int) -> float:
        return self._configured(self._efficiency, channel, "efficiency")

    def _set_dead_time_ns(self, channel: int, dead_time_ns: float) -> None:
        self._dead_time_ns[channel] = float(dead_time_ns)

    def _get_dead_time_ns(self, channel: int) -> float:
        return self._configured(self._dead_time_ns, channel, "dead_time_ns")

    def _get_dark_count_rate_hz(self, channel: int) -> float:
        if not self._biased[channel]:
            return 0.0
        return self._configured(self._dark_hz, channel, "dark_count_rate_hz")

    def _set_bias(self, channel: int, on: bool) -> None:
        self._biased[channel] = bool(on)
        log.info("%s: channel %d: bias %s recorded; a passive detector's bias is not under "
                 "software control (check the module)", self.name, channel,
                 "on" if on else "off")

    def _get_bias(self, channel: int) -> bool:
        return self._biased[channel]

    def _status(self) -> dict[str, Any]:
        return {"configured_only": True, "channels": {
            ch: {"biased": self._biased[ch], "efficiency": self._efficiency[ch],
                 "dead_time_ns": self._dead_time_ns[ch],
                 "dark_count_rate_hz": (self._dark_hz[ch] if self._biased[ch] else 0.0)}
            for ch in self._channels}}

