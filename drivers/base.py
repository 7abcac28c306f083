"""The instrument interfaces of a QKD bench.

One abstract class per device role: :class:`Laser`, :class:`PolarizationModulator`,
:class:`SinglePhotonDetector` and :class:`TimeTagger`, all derived from
:class:`Instrument`.

Two layers, so that safety does not depend on every driver getting it right:

- the **public methods** (``set_current_ma``, ``output_on``, ``read_block``, ...)
  live here, in the interface. They check the connection, the value (finite, in
  its physical range) and the configured safety limits *before* anything is sent,
  log the change, and then call
- the **driver hooks** (``_set_current_ma``, ``_set_output``, ``_read_block``, ...),
  the only methods a driver implements. A hook talks to the hardware and nothing
  else; it may assume its arguments are valid.

Lifecycle::

    laser = SomeLaser("laser", settings={"current_ma": 45.0},
                      limits={"max_current_ma": 60.0})
    with laser:              # connect(): open the link, apply the settings
        laser.output_on()
        ...
    # on every exit path (normal, exception, Ctrl-C): safe_state(), then close()

``connect()`` applies the configured settings, which are setpoints only: it never
turns a laser output on, biases a detector or starts an acquisition. Those are
explicit calls. Settings and limits come from the bench file
(``[instruments.<name>] settings = {...}, limits = {...}``); unknown keys are a
:class:`~qkdctl.errors.ConfigError` when the instrument is built.

Errors name the instrument and the command: ``laser: set_current_ma: 70 mA is
above the limit max_current_ma = 60 mA``.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from qkdctl.errors import ConfigError, InstrumentError, LimitError

__all__ = [
    "ROLES",
    "STATIC",
    "Identity",
    "Instrument",
    "Laser",
    "PolarizationController",
    "PolarizationModulator",
    "SinglePhotonDetector",
    "TimeTagger",
]

log = logging.getLogger(__name__)

STATIC = "(read when the instrument is built)"
"""``SETTINGS`` value of a setting that configures the driver rather than the device
(a channel map, a calibration curve): it is read when the instrument is built and
never sent to the instrument."""


@dataclass(frozen=True)
class Identity:
    """Who an instrument says it is (the ``*IDN?`` answer, or its equivalent)."""

    make: str
    model: str
    serial: str
    firmware: str


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not one (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


class Instrument(ABC):
    """Base of every instrument: connection, context manager, settings, limits.

    Subclasses declare:

    - ``role``: the bench role (``"laser"``, ``"modulator"``, ``"detectors"``,
      ``"tagger"``);
    - ``SETTINGS``: setting name -> name of the public setter that applies it;
    - ``LIMITS``: the limit names understood (value: unit, for messages);
      ``REQUIRED_LIMITS``: those that must be configured.

    Drivers implement ``_open``, ``_close``, ``_identity``, ``_status`` and
    ``_safe_state`` (the interface classes below already implement
    ``_safe_state`` from their own hooks) plus the role's hooks.

    ``config_key`` is where the instrument comes from in the bench file (for
    example ``"sim.toml: instruments.laser"``); configuration errors are reported
    against it.
    """

    role: ClassVar[str] = "instrument"
    SETTINGS: ClassVar[dict[str, str]] = {}
    LIMITS: ClassVar[dict[str, str]] = {}
    REQUIRED_LIMITS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, *, settings: Mapping[str, Any] | None = None,
                 limits: Mapping[str, Any] | None = None, config_key: str | None = None):
        self.name = name
        self.config_key = config_key or name
        self.limits: dict[str, float] = self._check_limits(dict(limits or {}))
        self.settings: dict[str, Any] = dict(settings or {})
        for key, value in self.settings.items():
            if key not in self.SETTINGS:
                allowed = ", ".join(self.SETTINGS) or "none"
                self._config_fail(f"settings.{key}",
                                  f"unknown setting for a {self.role}; allowed: {allowed}")
            problem = self._check_setting(key, value)
            if problem:
                self._config_fail(f"settings.{key}", problem)
        self._connected = False

    # -- configuration --------------------------------------------------------------------
    def _config_fail(self, key: str, msg: str) -> None:
        raise ConfigError(f"{self.config_key}.{key}: {msg}")

    def _check_limits(self, limits: dict[str, Any]) -> dict[str, float]:
        out = {}
        for key, value in limits.items():
            if key not in self.LIMITS:
                allowed = ", ".join(self.LIMITS) or "none"
                self._config_fail(f"limits.{key}",
                                  f"unknown limit for a {self.role}; allowed: {allowed}")
            v = _number(value)
            if v is None:
                self._config_fail(f"limits.{key}", f"expected a finite number, got {value!r}")
            out[key] = v
        for key in self.REQUIRED_LIMITS:
            if key not in out:
                self._config_fail(f"limits.{key}",
                                  f"missing; a {self.role} needs this safety limit "
                                  f"({self.LIMITS[key]})")
        return out

    def _check_setting(self, key: str, value: Any) -> str | None:
        """Static check of one configured setting; return what is wrong, or None."""
        if _number(value) is None:
            return f"expected a finite number, got {value!r}"
        return None

    def configure(self, settings: Mapping[str, Any]) -> None:
        """Apply settings (name -> value, names from ``SETTINGS``) through the setters."""
        for key, value in settings.items():
            if key not in self.SETTINGS:
                raise InstrumentError(f"{self.name}: configure: unknown setting {key!r}; "
                                      f"allowed: {', '.join(self.SETTINGS) or 'none'}")
            self._apply_setting(key, value)

    def _apply_setting(self, key: str, value: Any) -> None:
        if self.SETTINGS[key] == STATIC:
            return
        getattr(self, self.SETTINGS[key])(value)

    # -- connection -----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        """Open the link and apply the configured settings (setpoints only).

        Does nothing when already connected. If applying a setting fails, the
        instrument is put in its safe state and closed before the error is raised.
        """
        if self._connected:
            return
        self._open()
        self._connected = True
        log.debug("%s: connected", self.name)
        try:
            self.configure(self.settings)
        except BaseException:
            self._cleanup()
            raise

    def close(self) -> None:
        """Close the link. Idempotent. Does not change the instrument's state."""
        if not self._connected:
            return
        try:
            self._close()
        finally:
            self._connected = False
            log.debug("%s: closed", self.name)

    def _cleanup(self) -> None:
        try:
            if self._connected:
                self.safe_state()
        except BaseException as e:
            log.error("%s: could not reach the safe state: %s", self.name, e)
            raise
        finally:
            self.close()

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # Safe state, then close, on every exit path. A failure of the safe state is
        # raised (chained to the error that ended the block, if any): it must not
        # pass unnoticed.
        self._cleanup()
        return False

    def _require(self, command: str) -> None:
        if not self._connected:
            raise InstrumentError(f"{self.name}: {command}: not connected "
                                  "(call connect() or use the instrument in a with block)")

    # -- common queries -------------------------------------------------------------------
    def identity(self) -> Identity:
        """Make, model, serial number and firmware reported by the instrument."""
        self._require("identity")
        return self._identity()

    def status(self) -> dict[str, Any]:
        """Live values read from the instrument (name -> value, units in the names)."""
        self._require("status")
        return self._status()

    def safe_state(self) -> None:
        """Put the instrument in its safe state (idempotent). Needs a connection."""
        self._require("safe_state")
        self._safe_state()
        log.info("%s: safe state", self.name)

    def __repr__(self) -> str:
        state = "connected" if self._connected else "not connected"
        return f"<{type(self).__name__} {self.name!r} ({state})>"

    # -- driver hooks ---------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _identity(self) -> Identity: ...

    @abstractmethod
    def _status(self) -> dict[str, Any]: ...

    @abstractmethod
    def _safe_state(self) -> None: ...


# ------------------------------------------------------------------------------- laser


class Laser(Instrument):
    """A laser diode (Alice's pulsed source) on a current and temperature controller.

    Settings: ``current_ma``, ``temperature_c``. Limits: ``max_current_ma``
    (required), ``min_temperature_c``, ``max_temperature_c``. Safe state: output off.

    The current limit is checked before any command: by :meth:`set_current_ma` on
    the requested value and by :meth:`output_on` on the setpoint the instrument
    reports (it may have been left above the limit by another program).
    """

    role = "laser"
    SETTINGS = {"current_ma": "set_current_ma", "temperature_c": "set_temperature_c"}
    LIMITS = {"max_current_ma": "mA", "min_temperature_c": "degC", "max_temperature_c": "degC"}
    REQUIRED_LIMITS = ("max_current_ma",)

    def _check_setting(self, key: str, value: Any) -> str | None:
        problem = super()._check_setting(key, value)
        if problem:
            return problem
        if key == "current_ma":
            return self._current_problem(float(value))
        return self._temperature_problem(float(value))

    def _current_problem(self, current_ma: float) -> str | None:
        limit = self.limits["max_current_ma"]
        if current_ma < 0.0:
            return f"{current_ma:g} mA: a current cannot be negative"
        if current_ma > limit:
            return f"{current_ma:g} mA is above the limit max_current_ma = {limit:g} mA"
        return None

    def _temperature_problem(self, temperature_c: float) -> str | None:
        lo = self.limits.get("min_temperature_c")
        hi = self.limits.get("max_temperature_c")
        if lo is not None and temperature_c < lo:
            return (f"{temperature_c:g} degC is below the limit "
                    f"min_temperature_c = {lo:g} degC")
        if hi is not None and temperature_c > hi:
            return (f"{temperature_c:g} degC is above the limit "
                    f"max_temperature_c = {hi:g} degC")
        return None

    def _check_current_ma(self, current_ma: Any, command: str) -> float:
        v = _number(current_ma)
        problem = (f"{current_ma!r} is not a finite current in mA" if v is None
                   else self._current_problem(v))
        if problem:
            raise LimitError(f"{self.name}: {command}: {problem}")
        return v

    def _check_temperature_c(self, temperature_c: Any, command: str) -> float:
        v = _number(temperature_c)
        problem = (f"{temperature_c!r} is not a finite temperature in degC" if v is None
                   else self._temperature_problem(v))
        if problem:
            raise LimitError(f"{self.name}: {command}: {problem}")
        return v

    def set_current_ma(self, current_ma: float) -> None:
        """Set the drive current setpoint in mA (checked against ``max_current_ma`` first)."""
        v = self._check_current_ma(current_ma, "set_current_ma")
        self._require("set_current_ma")
        self._set_current_ma(v)
        log.info("%s: current setpoint %g mA", self.name, v)

    @property
    def current_ma(self) -> float:
        """The drive current setpoint in mA, as the instrument reports it."""
        self._require("current_ma")
        return float(self._get_current_ma())

    def set_temperature_c(self, temperature_c: float) -> None:
        """Set the diode temperature setpoint in degrees Celsius."""
        v = self._check_temperature_c(temperature_c, "set_temperature_c")
        self._require("set_temperature_c")
        self._set_temperature_c(v)
        log.info("%s: temperature setpoint %g degC", self.name, v)

    @property
    def temperature_c(self) -> float:
        """The temperature setpoint in degrees Celsius."""
        self._require("temperature_c")
        return float(self._get_temperature_c())

    def output_on(self) -> None:
        """Switch the laser output on (refused if the setpoint is above the limit)."""
        self._require("output_on")
        self._check_current_ma(self._get_current_ma(), "output_on: setpoint")
        self._set_output(True)
        log.info("%s: output on", self.name)

    def output_off(self) -> None:
        """Switch the laser output off."""
        self._require("output_off")
        self._set_output(False)
        log.info("%s: output off", self.name)

    @property
    def is_on(self) -> bool:
        """Whether the laser output is on."""
        self._require("is_on")
        return bool(self._get_output())

    def _safe_state(self) -> None:
        self._set_output(False)

    # driver hooks
    @abstractmethod
    def _set_output(self, on: bool) -> None: ...

    @abstractmethod
    def _get_output(self) -> bool: ...

    @abstractmethod
    def _set_current_ma(self, current_ma: float) -> None: ...

    @abstractmethod
    def _get_current_ma(self) -> float: ...

    @abstractmethod
    def _set_temperature_c(self, temperature_c: float) -> None: ...

    @abstractmethod
    def _get_temperature_c(self) -> float: ...


# ------------------------------------------------------------------- polarization modulator


class PolarizationModulator(Instrument):
    """Alice's per-pulse polarization encoder, and the polarization controller.

    While running, the encoder sets each pulse's state from Alice's sequence (a
    pattern in its memory or a stream of random choices, as the bench file says).
    :meth:`set_rotation_rad` sets the compensation rotation of the polarization
    controller (found by the polarization calibration).

    Settings: ``rotation_rad``. Safe state: encoder stopped (the rotation is kept).
    """

    role = "modulator"
    SETTINGS = {"rotation_rad": "set_rotation_rad"}

    def start(self) -> None:
        """Start encoding Alice's sequence onto the pulses."""
        self._require("start")
        self._set_running(True)
        log.info("%s: encoder started", self.name)

    def stop(self) -> None:
        """Stop the encoder."""
        self._require("stop")
        self._set_running(False)
        log.info("%s: encoder stopped", self.name)

    @property
    def running(self) -> bool:
        self._require("running")
        return bool(self._get_running())

    def set_rotation_rad(self, rotation_rad: float) -> None:
        """Set the polarization controller's compensation rotation, in radians."""
        v = _number(rotation_rad)
        if v is None:
            raise LimitError(f"{self.name}: set_rotation_rad({rotation_rad!r}): not a finite "
                             "angle in rad")
        self._require("set_rotation_rad")
        self._set_rotation_rad(v)
        log.info("%s: rotation %g rad", self.name, v)

    @property
    def rotation_rad(self) -> float:
        self._require("rotation_rad")
        return float(self._get_rotation_rad())

    def _safe_state(self) -> None:
        self._set_running(False)

    # driver hooks
    @abstractmethod
    def _set_running(self, running: bool) -> None: ...

    @abstractmethod
    def _get_running(self) -> bool: ...

    @abstractmethod
    def _set_rotation_rad(self, rotation_rad: float) -> None: ...

    @abstractmethod
    def _get_rotation_rad(self) -> float: ...


# ---------------------------------------------------------------- single-photon detectors


class SinglePhotonDetector(Instrument):
    """One or more single-photon detector channels (named by their time-tagger input).

    Every per-channel method takes ``channel``; for the setters and the bias,
    ``channel=None`` means all channels.

    Settings: ``efficiency``, ``dead_time_ns``, each either one number for all
    channels or a table ``{"<channel>" = value}``. Safe state: bias down on every
    channel.
    """

    role = "detectors"
    SETTINGS = {"efficiency": "set_efficiency", "dead_time_ns": "set_dead_time_ns"}

    @property
    @abstractmethod
    def channels(self) -> tuple[int, ...]:
        """The channels of this instrument (their time-tagger inputs)."""

    def _check_setting(self, key: str, value: Any) -> str | None:
        values = value.items() if isinstance(value, Mapping) else [(None, value)]
        for ch, v in values:
            if ch is not None and not str(ch).lstrip("-").isdigit():
                return f"channel {ch!r} is not an integer"
            x = _number(v)
            if x is None:
                return f"expected a finite number, got {v!r}"
            if key == "efficiency" and not 0.0 <= x <= 1.0:
                return f"{x:g} is out of range; allowed 0 to 1"
            if key == "dead_time_ns" and x < 0.0:
                return f"{x:g} ns is negative"
        return None

    def _apply_setting(self, key: str, value: Any) -> None:
        setter = getattr(self, self.SETTINGS[key])
        if isinstance(value, Mapping):
            for ch, v in value.items():
                setter(v, channel=int(ch))
        else:
            setter(value)

    def _targets(self, channel: int | None, command: str) -> tuple[int, ...]:
        if channel is None:
            return self.channels
        if isinstance(channel, bool) or not isinstance(channel, int | np.integer) \
                or int(channel) not in self.channels:
            raise InstrumentError(f"{self.name}: {command}: no channel {channel!r}; "
                                  f"channels are {', '.join(map(str, self.channels))}")
        return (int(channel),)

    def set_efficiency(self, efficiency: float, channel: int | None = None) -> None:
        """Set the detection efficiency (0 to 1)."""
        v = _number(efficiency)
        if v is None or not 0.0 <= v <= 1.0:
            raise LimitError(f"{self.name}: set_efficiency({efficiency!r}): an efficiency is "
                             "a number from 0 to 1")
        targets = self._targets(channel, "set_efficiency")
        self._require("set_efficiency")
        for ch in targets:
            self._set_efficiency(ch, v)
        log.info("%s: efficiency %g on channel(s) %s", self.name, v, list(targets))

    def efficiency(self, channel: int) -> float:
        (ch,) = self._targets(channel, "efficiency")
        self._require("efficiency")
        return float(self._get_efficiency(ch))

    def set_dead_time_ns(self, dead_time_ns: float, channel: int | None = None) -> None:
        """Set the dead time after a click, in ns."""
        v = _number(dead_time_ns)
        if v is None or v < 0.0:
            raise LimitError(f"{self.name}: set_dead_time_ns({dead_time_ns!r}): a dead time "
                             "is a finite number of ns >= 0")
        targets = self._targets(channel, "set_dead_time_ns")
        self._require("set_dead_time_ns")
        for ch in targets:
            self._set_dead_time_ns(ch, v)
        log.info("%s: dead time %g ns on channel(s) %s", self.name, v, list(targets))

    def dead_time_ns(self, channel: int) -> float:
        (ch,) = self._targets(channel, "dead_time_ns")
        self._require("dead_time_ns")
        return float(self._get_dead_time_ns(ch))

    def dark_count_rate_hz(self, channel: int) -> float:
        """Dark count rate at the present bias (0 when biased down), in Hz."""
        (ch,) = self._targets(channel, "dark_count_rate_hz")
        self._require("dark_count_rate_hz")
        return float(self._get_dark_count_rate_hz(ch))

    def bias_on(self, channel: int | None = None) -> None:
        """Bias the detector(s) up: they start detecting."""
        targets = self._targets(channel, "bias_on")
        self._require("bias_on")
        for ch in targets:
            self._set_bias(ch, True)
        log.info("%s: bias on, channel(s) %s", self.name, list(targets))

    def bias_off(self, channel: int | None = None) -> None:
        """Bias the detector(s) down."""
        targets = self._targets(channel, "bias_off")
        self._require("bias_off")
        for ch in targets:
            self._set_bias(ch, False)
        log.info("%s: bias off, channel(s) %s", self.name, list(targets))

    def is_biased(self, channel: int) -> bool:
        (ch,) = self._targets(channel, "is_biased")
        self._require("is_biased")
        return bool(self._get_bias(ch))

    def _safe_state(self) -> None:
        for ch in self.channels:
            self._set_bias(ch, False)

    # driver hooks (channel is always one of self.channels)
    @abstractmethod
    def _set_efficiency(self, channel: int, efficiency: float) -> None: ...

    @abstractmethod
    def _get_efficiency(self, channel: int) -> float: ...

    @abstractmethod
    def _set_dead_time_ns(self, channel: int, dead_time_ns: float) -> None: ...

    @abstractmethod
    def _get_dead_time_ns(self, channel: int) -> float: ...

    @abstractmethod
    def _get_dark_count_rate_hz(self, channel: int) -> float: ...

    @abstractmethod
    def _set_bias(self, channel: int, on: bool) -> None: ...

    @abstractmethod
    def _get_bias(self, channel: int) -> bool: ...


# ---------------------------------------------------------------------------- time tagger


class TimeTagger(Instrument):
    """A time tagger: streams (timestamp, channel) tags in blocks.

    Timestamps are ``int64`` picoseconds on the tagger's clock, multiples of
    :attr:`resolution_ps`; channels are ``uint8`` inputs. Every block is sorted by
    time and follows the previous one; the concatenation of all blocks of a run,
    then :meth:`finish`, is the run's tag stream, whatever the block sizes.

    Safe state: acquisition stopped. Stopping keeps the tags not yet read;
    :meth:`finish` stops and returns them, and ends the run.
    """

    role = "tagger"

    @property
    @abstractmethod
    def channels(self) -> tuple[int, ...]:
        """The inputs in use (sync and detectors)."""

    @property
    @abstractmethod
    def resolution_ps(self) -> int:
        """The timestamp bin size in ps."""

    def start(self) -> None:
        """Start acquiring."""
        self._require("start")
        self._start()
        log.info("%s: acquisition started", self.name)

    def stop(self) -> None:
        """Stop acquiring; tags not yet read are kept for :meth:`finish`."""
        self._require("stop")
        self._stop()
        log.info("%s: acquisition stopped", self.name)

    @property
    def running(self) -> bool:
        self._require("running")
        return bool(self._get_running())

    def read_block(self, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Acquire for ``duration_s`` seconds; return the tags that are final.

        Returns ``(timestamps, channels)``: ``int64`` ps and ``uint8``, sorted by time.
        Raises :class:`~qkdctl.errors.InstrumentError` if the tagger is not acquiring.
        """
        v = _number(duration_s)
        if v is None or v < 0.0:
            raise LimitError(f"{self.name}: read_block(duration_s={duration_s!r}): "
                             "a duration is a finite number of seconds >= 0")
        self._require_running("read_block")
        return self._checked(*self._read_block(v), "read_block")

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Stop acquiring and return the tags still buffered; ends the run."""
        self._require("finish")
        ts, ch = self._checked(*self._finish(), "finish")
        log.info("%s: run finished", self.name)
        return ts, ch

    def _require_running(self, command: str) -> None:
        self._require(command)
        if not self._get_running():
            raise InstrumentError(f"{self.name}: {command}: not acquiring "
                                  f"({self._idle_hint()})")

    def _idle_hint(self) -> str:
        """What to do when a read finds the tagger stopped (drivers may say more)."""
        return "call start() first"

    def _checked(self, ts: Any, ch: Any, command: str) -> tuple[np.ndarray, np.ndarray]:
        ts = np.asarray(ts)
        ch = np.asarray(ch)
        if ts.dtype != np.int64 or ch.dtype != np.uint8 or ts.ndim != 1 \
                or ts.shape != ch.shape:
            raise InstrumentError(
                f"{self.name}: {command}: driver returned timestamps {ts.dtype}{ts.shape} and "
                f"channels {ch.dtype}{ch.shape}; expected int64 and uint8 of one length")
        return ts, ch

    def _safe_state(self) -> None:
        self._stop()

    # driver hooks
    @abstractmethod
    def _start(self) -> None: ...

    @abstractmethod
    def _stop(self) -> None: ...

    @abstractmethod
    def _get_running(self) -> bool: ...

    @abstractmethod
    def _read_block(self, duration_s: float) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def _finish(self) -> tuple[np.ndarray, np.ndarray]: ...


# ------------------------------------------------------------ polarization controller


class PolarizationController(Instrument):
    """Motorized polarization compensation: waveplates on rotation mounts, or the
    paddles of a fiber polarization controller; one axis per waveplate or paddle.

    Angles are in degrees, as the devices count them (a mount's full turn is
    360 degrees; a paddle's travel is limited, see the driver). Limits
    ``min_angle_deg`` / ``max_angle_deg`` bound every move and are checked before
    anything is sent. Settings: ``angles_deg`` (a list, one per axis). Safe state:
    motion stopped (the position is kept).
    """

    role = "polarization"
    SETTINGS = {"angles_deg": "set_angles_deg"}
    LIMITS = {"min_angle_deg": "deg", "max_angle_deg": "deg"}

    def _check_setting(self, key: str, value: Any) -> str | None:
        if not isinstance(value, list | tuple) or any(_number(v) is None for v in value):
            return f"expected a list of angles in degrees, got {value!r}"
        return None

    @property
    def axes(self) -> int:
        """Number of axes (waveplates or paddles)."""
        return int(self._axes())

    def _check_angle(self, axis: int, angle_deg: Any, command: str) -> float:
        v = _number(angle_deg)
        if v is None:
            raise LimitError(f"{self.name}: {command}: {angle_deg!r} is not a finite angle "
                             "in degrees")
        if not (isinstance(axis, int | np.integer) and 0 <= axis < self.axes):
            raise LimitError(f"{self.name}: {command}: no axis {axis!r}; axes 0..{self.axes - 1}")
        lo, hi = self.limits.get("min_angle_deg"), self.limits.get("max_angle_deg")
        if lo is not None and v < lo:
            raise LimitError(f"{self.name}: {command}: {v:g} deg is below the limit "
                             f"min_angle_deg = {lo:g} deg")
        if hi is not None and v > hi:
            raise LimitError(f"{self.name}: {command}: {v:g} deg is above the limit "
                             f"max_angle_deg = {hi:g} deg")
        return v

    def set_angle_deg(self, axis: int, angle_deg: float) -> None:
        """Move one axis to ``angle_deg`` (waits until the move is done)."""
        command = f"set_angle_deg({axis}, {angle_deg!r})"
        v = self._check_angle(axis, angle_deg, command)
        self._require(command)
        self._set_angle_deg(int(axis), v)
        log.info("%s: axis %d at %g deg", self.name, axis, v)

    def set_angles_deg(self, angles_deg) -> None:
        """Move every axis (a sequence of angles, one per axis)."""
        angles = list(angles_deg)
        if len(angles) != self.axes:
            raise LimitError(f"{self.name}: set_angles_deg: {len(angles)} angles for "
                             f"{self.axes} axes")
        checked = [self._check_angle(i, a, "set_angles_deg") for i, a in enumerate(angles)]
        for i, a in enumerate(checked):
            self.set_angle_deg(i, a)

    def angle_deg(self, axis: int) -> float:
        self._require("angle_deg")
        return float(self._get_angle_deg(int(axis)))

    def angles_deg(self) -> list[float]:
        return [self.angle_deg(i) for i in range(self.axes)]

    def home(self) -> None:
        """Move every axis to its home (reference) position."""
        self._require("home")
        self._home()
        log.info("%s: homed", self.name)

    def _safe_state(self) -> None:
        self._stop()

    # driver hooks
    @abstractmethod
    def _axes(self) -> int: ...

    @abstractmethod
    def _set_angle_deg(self, axis: int, angle_deg: float) -> None: ...

    @abstractmethod
    def _get_angle_deg(self, axis: int) -> float: ...

    @abstractmethod
    def _home(self) -> None: ...

    @abstractmethod
    def _stop(self) -> None: ...


ROLES: dict[str, type[Instrument]] = {
    "laser": Laser,
    "modulator": PolarizationModulator,
    "detectors": SinglePhotonDetector,
    "tagger": TimeTagger,
    "polarization": PolarizationController,
}
"""Bench role (the instrument's name in ``[instruments.<role>]``) -> its interface."""
