"""Thorlabs laser diode and TEC controllers: the ITC4000 series and the CLD101x.

Two drivers of the :class:`~qkdctl.drivers.base.Laser` interface, both SCPI over
USBTMC (PyVISA resources ``USB0::0x1313::0x804A::<serial>::INSTR`` for an
ITC4000, ``USB0::0x1313::0x804F::<serial>::INSTR`` for a CLD101x):

- :class:`ITC4000`: ITC4001, ITC4002QCL, ITC4005, ITC4005QCL, ITC4020;
- :class:`CLD1015`: the compact CLD1010LP, CLD1011LP and CLD1015.

Commands are quoted below as the ITC4000 driver sends them; :class:`CLD1015`
lists the forms of the CLD101x. The public API works in mA and degC; the
instrument in A and in its own temperature unit (``UNIT:TEMP?``, read once at
connect: Celsius, Kelvin or Fahrenheit are converted, the instrument's unit is
never changed).

Connecting (``_open``)
    Opens the link, clears the status (``*CLS``), reads ``*IDN?`` and refuses an
    instrument that is not of the driver's family. It then reads, without
    changing anything on the instrument: the temperature unit, the LD source
    mode (``SOUR:FUNC:MODE?``, which must be constant current) and the
    instrument's own LD current limit (``SOUR:CURR:LIM?``, A). The configured
    ``limits.max_current_ma`` must not exceed that hardware limit: a bench file
    that allows more than the instrument does describes another diode or another
    instrument, so the connection is refused with a
    :class:`~qkdctl.errors.ConfigError` naming the limit. The driver never
    writes the hardware limit, neither up (that limit protects the diode and is
    the business of whoever mounted it) nor down (it is kept by the instrument
    and would silently change other users' setups). A configured limit below the
    hardware limit is the normal case: the configured one is then the stricter
    and is the one checked before every command.

Switching on (``output_on``)
    1. read the LD current setpoint and the temperature setpoint and check them
       against the configured limits (LimitError, nothing sent);
    2. check the keylock, the interlock and the over-temperature protection
       (``OUTP:PROT:KEYL:TRIP?``, ``OUTP:PROT:INTL:TRIP?``, ``OUTP:PROT:OTEM:TRIP?``);
    3. switch the TEC on if it is off and wait until the measured temperature has
       stayed within ``temperature_window_c`` of its setpoint for
       ``settle_hold_s`` (polling every :attr:`SETTLE_POLL_S`). If it does not
       within ``settle_timeout_s``, an InstrumentError says so, the LD output
       stays off and a TEC switched on by this call is switched off again;
    4. check the protections again, set the LD current to 0, switch the LD
       output on and ramp the current up to the setpoint in steps of at most
       ``ramp_step_ma``, ``ramp_step_s`` apart. A failure (or Ctrl-C) during the
       ramp ramps the current down and switches the output off before the
       error is raised.

    A current change while the output is on (``set_current_ma``) is ramped the
    same way, from the present setpoint. Every value sent is checked against
    ``max_current_ma`` once more just before it is written and rounded down to
    1 uA on the wire, so no step of a ramp can exceed the limit.

Switching off (``output_off``) and the safe state
    Ramp the current down to 0, switch the LD output off, then write the
    setpoint back (the output being off, this only restores the setpoint that
    the next ``output_on`` ramps to). The TEC stays on: the diode stays at its
    temperature, ready for the next ``output_on``; :meth:`tec_off` switches it
    off (refused while the LD output is on).

    If the ramp fails (device error, timeout, link lost), the output is switched
    off directly (``OUTP 0``; ``OUTP:STAT 0`` on a CLD101x), after reconnecting
    the link once if needed; the
    state is confirmed by reading the output state back. If even that fails,
    an InstrumentError says that the output could not be switched off and must
    be switched off at the instrument.

Errors
    Every error names the instrument and the command: a timeout
    (``laser: query 'MEAS:TEMP?': no reply within 2 s (USB0::...)``), a garbled
    reply, a device error read from the queue after a command
    (``laser: SOUR2:TEMP 60.000: device error: -222,"Data out of range"``) and a
    device that vanished (``laser: write 'OUTP 1': I/O error: ...``).

Driver settings (``[instruments.laser] settings``), besides ``current_ma`` and
``temperature_c``: ``ramp_step_ma`` (default 2, at least 0.001), ``ramp_step_s``
(0.05), ``temperature_window_c`` (0.1), ``settle_timeout_s`` (60),
``settle_hold_s`` (2). Limits: ``max_current_ma`` (required), ``min_temperature_c``,
``max_temperature_c``.

Command references
    - Thorlabs, *Series 4000 SCPI Programmer's Reference Manual* (LDC40xx,
      TED4015, ITC40xx), version 3.1 (2012) and 3.3 (2015): the ``*IDN?`` reply
      ``THORLABS,<model>,<serial>,<fw>/<fw>/<fw>``, ``*CLS``, ``SYSTem:ERRor?``, the
      LD output (``OUTPut[1]``), the TEC output (``OUTPut2``), the LD source
      (``SOURce[1]:CURRent``, ``SOURce[1]:CURRent:LIMit``, ``SOURce:FUNCtion:MODE``),
      the TEC setpoint (``SOURce2:TEMPerature``), ``UNIT:TEMPerature``, the
      measurements (``MEASure:TEMPerature?``, ``MEASure:CURRent?``) and the LD
      protection queries (``OUTPut:PROTection:KEYLock|INTLock|OTEMp:TRIPped?``).
    - Thorlabs' SCPI example for the CLD10xx controllers: ``OUTPut1:STATe``,
      ``OUTPut2:STATe``, ``SOURce1:CURRent:LIMit:AMPLitude``,
      ``SOURce2:TEMPerature:SPOint``, ``SENSe2:TEMPerature:DATA?``,
      ``OUTPut1:PROTection:KEYLock:TRIPped?``, ``SOURce1:FUNCtion:MODE CURR``, and
      the start-up sequence (TEC on, wait until the measured temperature is within
      a window of the setpoint, then LD on); USB product id 0x804F.
    - Public drivers using the same command strings: lantz' ``ITC4020`` and
      ``CLD101XLP`` drivers, the ITC4001 MATLAB class (``OUTP1``, ``OUTP2``,
      ``SOUR1:CURR:LIM``, ``SOUR2:TEMP``, ``MEAS:TEMP``, ``MEAS:CURR1``,
      ``OUTP1:PROT:INTL:TRIP``, ``OUTP1:PROT:OTEM:TRIP``), and PyVISA drivers of the
      ITC4001/ITC4005 (``SOUR:CURR:LIM?``, ``OUTP2?``, ``SOUR2:TEMP?``) and of the
      CLD1010LP/CLD1015 (``OUTP:STAT``, ``OUTP2:STAT``, ``SOUR:CURR:LIM:AMPL?``,
      ``SENS3:CURR:DATA?``, ``OUTP:PROT:INTL:TRIP?``, ``OUTP:PROT:OTEM:TRIP?``).

Not covered: constant-power operation, modulation, QCW pulses, the photodiode
inputs, the instrument's own temperature-window protection (the settle check is
done here, by polling), the TEC current limit and PID settings (set at the
instrument).
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, ClassVar

from qkdctl.errors import InstrumentError, LimitError

from .base import Identity, Laser, _number
from .scpi import ScpiInstrument, parse_idn

__all__ = ["CLD1015", "ITC4000", "ThorlabsLaserDiodeController"]

log = logging.getLogger(__name__)

_TEMPERATURE_UNITS = {"C": "C", "CEL": "C", "CELSIUS": "C",
                      "K": "K", "KEL": "K", "KELVIN": "K",
                      "F": "F", "FAR": "F", "FAHRENHEIT": "F"}

# name -> (default, lowest value allowed, whether that lowest value is excluded)
_DRIVER_SETTINGS: dict[str, tuple[float, float, bool]] = {
    "ramp_step_ma": (2.0, 0.001, False),  # 1 uA: the resolution on the wire
    "ramp_step_s": (0.05, 0.0, False),
    "temperature_window_c": (0.1, 0.0, True),
    "settle_timeout_s": (60.0, 0.0, False),
    "settle_hold_s": (2.0, 0.0, False),
}


class ThorlabsLaserDiodeController(ScpiInstrument, Laser):
    """Common part of the Thorlabs LD/TEC controller drivers (see the module docs).

    Subclasses set the model check and the command strings of their family.
    The driver settings are attributes (``ramp_step_ma``, ``ramp_step_s``,
    ``temperature_window_c``, ``settle_timeout_s``, ``settle_hold_s``) that
    take effect as soon as the instrument is built.
    """

    FAMILY: ClassVar[str] = ""
    #: models accepted (the second ``*IDN?`` field)
    MODEL_PATTERN: ClassVar[re.Pattern[str]] = re.compile(r"(?!)")

    # commands (a state command is sent as "<cmd> 1" / "<cmd> 0", queried as "<cmd>?")
    LD_OUTPUT: ClassVar[str] = "OUTP"
    TEC_OUTPUT: ClassVar[str] = "OUTP2"
    CURRENT: ClassVar[str] = "SOUR:CURR"
    CURRENT_LIMIT_QUERY: ClassVar[str] = "SOUR:CURR:LIM?"
    SOURCE_MODE_QUERY: ClassVar[str] = "SOUR:FUNC:MODE?"
    TEMPERATURE: ClassVar[str] = "SOUR2:TEMP"
    TEMPERATURE_UNIT_QUERY: ClassVar[str] = "UNIT:TEMP?"
    MEASURED_TEMPERATURE_QUERY: ClassVar[str] = "MEAS:TEMP?"
    MEASURED_CURRENT_QUERY: ClassVar[str] = "MEAS:CURR?"
    #: (status key, query, what a 1 means, what to do about it), checked before the LD
    #: output goes on
    PROTECTIONS: ClassVar[tuple[tuple[str, str, str, str], ...]] = (
        ("keylock_tripped", "OUTP:PROT:KEYL:TRIP?", "the keylock is tripped",
         "turn the key switch on the instrument to enable the LD output"),
        ("interlock_tripped", "OUTP:PROT:INTL:TRIP?", "the interlock is open",
         "close the interlock circuit of the laser diode connector"),
        ("over_temperature_tripped", "OUTP:PROT:OTEM:TRIP?",
         "the over-temperature protection has tripped",
         "let the instrument cool down and check the TEC and its sensor"),
    )

    #: polling interval while waiting for the temperature to settle, s
    SETTLE_POLL_S: ClassVar[float] = 0.5
    #: reconnection attempts and delay when the link is lost while switching off
    RECONNECT_ATTEMPTS: ClassVar[int] = 3
    RECONNECT_DELAY_S: ClassVar[float] = 0.5

    SETTINGS = {**Laser.SETTINGS, **{k: k for k in _DRIVER_SETTINGS}}

    ramp_step_ma: float
    ramp_step_s: float
    temperature_window_c: float
    settle_timeout_s: float
    settle_hold_s: float

    def __init__(self, name: str = "laser", **kwargs: Any):
        super().__init__(name, **kwargs)
        for key, (default, _lo, _open) in _DRIVER_SETTINGS.items():
            setattr(self, key, float(self.settings.get(key, default)))
        self._unit = "C"
        self.hardware_current_limit_ma: float | None = None

    # -- configuration --------------------------------------------------------------------
    def _check_setting(self, key: str, value: Any) -> str | None:
        if key not in _DRIVER_SETTINGS:
            return super()._check_setting(key, value)
        v = _number(value)
        if v is None:
            return f"expected a finite number, got {value!r}"
        _default, lo, excluded = _DRIVER_SETTINGS[key]
        if v < lo or (excluded and v == lo):
            return f"{v:g} is out of range; must be {'>' if excluded else '>='} {lo:g}"
        return None

    def _apply_setting(self, key: str, value: Any) -> None:
        if key in _DRIVER_SETTINGS:
            problem = self._check_setting(key, value)
            if problem:
                raise InstrumentError(f"{self.name}: configure: {key}: {problem}")
            setattr(self, key, float(value))
            return
        super()._apply_setting(key, value)

    # -- lifecycle ------------------------------------------------------------------------
    def _on_open(self) -> None:
        try:
            super()._on_open()  # *CLS
            self._check_model()
            self._read_unit()
            mode = self.ask(self.SOURCE_MODE_QUERY).strip().strip('"').upper()
            if not mode.startswith("CURR"):
                raise InstrumentError(
                    f"{self.name}: connect: the LD source is in {mode!r} mode "
                    f"({self.SOURCE_MODE_QUERY}); this driver sets currents: switch the "
                    f"instrument to constant-current mode ({self.link.resource})")
            self._check_hardware_limit()
            if self.ask_bool(f"{self.LD_OUTPUT}?"):
                log.warning("%s: the LD output is already on (left on by another program); "
                            "it is left as it is", self.name)
        except BaseException:
            self.link.close()
            raise

    def _check_model(self) -> None:
        idn = parse_idn(self.ask("*IDN?"))
        if idn.make.upper() != "THORLABS" or not self.MODEL_PATTERN.match(idn.model.upper()):
            raise InstrumentError(
                f"{self.name}: connect: the instrument is {idn.make} {idn.model} "
                f"(*IDN?); this driver drives Thorlabs {self.FAMILY} controllers "
                f"({self.link.resource})")

    def _read_unit(self) -> None:
        reply = self.ask(self.TEMPERATURE_UNIT_QUERY)
        unit = _TEMPERATURE_UNITS.get(reply.strip().strip('"').upper())
        if unit is None:
            raise self.link.fail(f"query {self.TEMPERATURE_UNIT_QUERY!r}",
                                 f"unknown temperature unit {reply[:20]!r}")
        self._unit = unit

    def _check_hardware_limit(self) -> None:
        hw_ma = self.ask_float(self.CURRENT_LIMIT_QUERY) * 1000.0
        self.hardware_current_limit_ma = hw_ma
        limit = self.limits["max_current_ma"]
        if limit > hw_ma + 1e-6:
            self._config_fail(
                "limits.max_current_ma",
                f"{limit:g} mA is above the instrument's own LD current limit "
                f"{hw_ma:g} mA ({self.CURRENT_LIMIT_QUERY} on {self.link.resource}); "
                "lower max_current_ma to at most the hardware limit (the driver never "
                "changes the hardware limit)")

    def _identity(self) -> Identity:
        return parse_idn(self.ask("*IDN?"))

    # -- units ----------------------------------------------------------------------------
    def _to_c(self, value: float) -> float:
        if self._unit == "K":
            return value - 273.15
        if self._unit == "F":
            return (value - 32.0) * 5.0 / 9.0
        return value

    def _from_c(self, celsius: float) -> float:
        if self._unit == "K":
            return celsius + 273.15
        if self._unit == "F":
            return celsius * 9.0 / 5.0 + 32.0
        return celsius

    # -- Laser hooks ----------------------------------------------------------------------
    def _get_current_ma(self) -> float:
        return self.ask_float(f"{self.CURRENT}?") * 1000.0

    def _set_current_ma(self, current_ma: float) -> None:
        if self.ask_bool(f"{self.LD_OUTPUT}?"):
            self._ramp(self._get_current_ma(), current_ma, "set_current_ma")
        else:
            self._write_current_ma(current_ma, "set_current_ma")

    def _get_temperature_c(self) -> float:
        return self._to_c(self.ask_float(f"{self.TEMPERATURE}?"))

    def _set_temperature_c(self, temperature_c: float) -> None:
        self.send(f"{self.TEMPERATURE} {self._from_c(temperature_c):.3f}")

    def _get_output(self) -> bool:
        return self.ask_bool(f"{self.LD_OUTPUT}?")

    def _set_output(self, on: bool) -> None:
        if on:
            self._switch_on()
        else:
            self._switch_off("output_off")

    def _safe_state(self) -> None:
        self._switch_off("safe_state")

    def _status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "output_on": self.ask_bool(f"{self.LD_OUTPUT}?"),
            "tec_on": self.ask_bool(f"{self.TEC_OUTPUT}?"),
            "current_ma": self._get_current_ma(),
            "current_measured_ma": self.ask_float(self.MEASURED_CURRENT_QUERY) * 1000.0,
            "temperature_c": self._get_temperature_c(),
            "temperature_measured_c": self.measured_temperature_c(),
            "hardware_current_limit_ma": self.ask_float(self.CURRENT_LIMIT_QUERY) * 1000.0,
            "max_current_ma": self.limits["max_current_ma"],
        }
        for key, query, _what, _fix in self.PROTECTIONS:
            status[key] = self.ask_bool(query)
        status["device_errors"] = self.read_errors()
        return status

    # -- extras ---------------------------------------------------------------------------
    def measured_temperature_c(self) -> float:
        """The diode temperature measured by the TEC sensor, in degC."""
        self._require("measured_temperature_c")
        return self._to_c(self.ask_float(self.MEASURED_TEMPERATURE_QUERY))

    def tec_off(self) -> None:
        """Switch the TEC off (refused while the LD output is on)."""
        self._require("tec_off")
        if self.ask_bool(f"{self.LD_OUTPUT}?"):
            raise InstrumentError(f"{self.name}: tec_off: the LD output is on; switch it off "
                                  "first (output_off)")
        self.send(f"{self.TEC_OUTPUT} 0")
        log.info("%s: TEC off", self.name)

    def read_errors(self) -> list[str]:
        """Read the error queue empty; return the errors it held (oldest first)."""
        errors: list[str] = []
        for _ in range(32):
            reply = self.ask(self.ERROR_QUERY)
            code = reply.split(",", 1)[0].strip().lstrip("+")
            try:
                if int(code) == 0:
                    break
            except ValueError:
                raise self.link.fail(f"query {self.ERROR_QUERY!r}",
                                     f"garbled error-queue reply {reply[:60]!r}") from None
            errors.append(reply)
        return errors

    # -- switching on ---------------------------------------------------------------------
    def _drain_stale_errors(self, command: str) -> None:
        """Empty the error queue before a sequence, so that errors left by earlier
        queries are not taken for errors of the sequence's commands."""
        for err in self.read_errors():
            log.warning("%s: %s: earlier device error: %s", self.name, command, err)

    def _switch_on(self) -> None:
        command = "output_on"
        self._drain_stale_errors(command)
        if self.ask_bool(f"{self.LD_OUTPUT}?"):
            log.info("%s: LD output already on", self.name)
            return
        target = self._check_current_ma(self._get_current_ma(), "output_on: setpoint")
        setpoint_c = self._check_temperature_c(self._get_temperature_c(),
                                               "output_on: temperature setpoint")
        self._check_protections(command)
        tec_was_on = self.ask_bool(f"{self.TEC_OUTPUT}?")
        if not tec_was_on:
            self.send(f"{self.TEC_OUTPUT} 1")
            log.info("%s: TEC on", self.name)
        try:
            self._wait_settled(command, setpoint_c)
            self._check_protections(command)
        except BaseException:
            if not tec_was_on:
                try:
                    self.send(f"{self.TEC_OUTPUT} 0")
                except InstrumentError as e:
                    log.error("%s: output_on: could not switch the TEC off again: %s",
                              self.name, e)
            raise
        try:
            self._write_current_ma(0.0, command)
            self.send(f"{self.LD_OUTPUT} 1")
            self._ramp(0.0, target, command)
        except BaseException as e:
            log.error("%s: output_on failed while switching the diode on (%s); switching "
                      "it off", self.name, str(e) or type(e).__name__)
            self._switch_off(command, restore_ma=target)
            raise

    def _check_protections(self, command: str) -> None:
        for _key, query, what, fix in self.PROTECTIONS:
            if self.ask_bool(query):
                raise InstrumentError(f"{self.name}: {command}: {what} ({query} -> 1): "
                                      f"{fix} ({self.link.resource})")

    def _wait_settled(self, command: str, setpoint_c: float) -> float:
        """Wait until the measured temperature stays within the window; return it."""
        window, hold = self.temperature_window_c, self.settle_hold_s
        timeout = self.settle_timeout_s
        start = time.monotonic()
        inside_since: float | None = None
        while True:
            t = self._to_c(self.ask_float(self.MEASURED_TEMPERATURE_QUERY))
            now = time.monotonic()
            if abs(t - setpoint_c) <= window:
                if inside_since is None:
                    inside_since = now
                if now - inside_since >= hold:
                    log.info("%s: temperature settled at %.3f degC (setpoint %.3f degC)",
                             self.name, t, setpoint_c)
                    return t
            else:
                inside_since = None
            if now - start >= timeout:
                raise InstrumentError(
                    f"{self.name}: {command}: the diode temperature did not settle within "
                    f"{timeout:g} s: {t:.3f} degC measured ({self.MEASURED_TEMPERATURE_QUERY}), "
                    f"setpoint {setpoint_c:.3f} +/- {window:g} degC; the LD output stays off "
                    f"({self.link.resource})")
            time.sleep(max(0.0, min(self.SETTLE_POLL_S, timeout - (now - start))))

    # -- current --------------------------------------------------------------------------
    def _write_current_ma(self, current_ma: float, command: str) -> None:
        """Send one current setpoint: checked against the limit, rounded down to 1 uA."""
        problem = self._current_problem(current_ma)
        if problem:
            raise LimitError(f"{self.name}: {command}: {problem}")
        microamps = math.floor(current_ma * 1000.0 + 1e-6)
        self.send(f"{self.CURRENT} {microamps / 1e6:.6f}")

    def _ramp(self, from_ma: float, to_ma: float, command: str) -> None:
        """Step the current setpoint from ``from_ma`` to ``to_ma`` (both ends within limits).

        A start above the limit (a setpoint left by another program) is taken as the
        limit: the first step is then a step down.
        """
        start = min(max(from_ma, 0.0), self.limits["max_current_ma"])
        span = to_ma - start
        if from_ma == to_ma:
            return
        n = max(1, math.ceil(abs(span) / self.ramp_step_ma - 1e-9))
        for i in range(1, n + 1):
            self._write_current_ma(to_ma if i == n else start + span * i / n, command)
            if i < n and self.ramp_step_s > 0:
                time.sleep(self.ramp_step_s)
        log.debug("%s: %s: ramped %g -> %g mA in %d steps", self.name, command, from_ma,
                  to_ma, n)

    # -- switching off --------------------------------------------------------------------
    def _switch_off(self, command: str, restore_ma: float | None = None) -> None:
        """Ramp down, switch the LD output off, restore the setpoint (see the module docs)."""
        try:
            self._drain_stale_errors(command)
            was_on = self.ask_bool(f"{self.LD_OUTPUT}?")
            present = self._get_current_ma()
            if was_on:
                self._ramp(present, 0.0, command)
            self.send(f"{self.LD_OUTPUT} 0")
        except InstrumentError as e:
            self._force_off(command, e)
            return
        except BaseException:  # Ctrl-C during the ramp down: off without the rest of it
            self._force_off(command, InstrumentError(f"{self.name}: {command}: interrupted"))
            raise
        restore = restore_ma if restore_ma is not None else (present if was_on else None)
        if restore is not None:
            try:
                self._write_current_ma(restore, command)
            except InstrumentError as e:
                log.warning("%s: %s: output off, but the setpoint could not be restored: %s",
                            self.name, command, e)

    def _force_off(self, command: str, cause: InstrumentError) -> None:
        """Switch the LD output off without a ramp, reconnecting once if needed."""
        log.error("%s: %s: %s; switching the LD output off directly", self.name, command,
                  cause)
        last: InstrumentError = cause
        for attempt in range(2):
            try:
                if attempt:
                    self.link.reconnect(attempts=self.RECONNECT_ATTEMPTS,
                                        delay_s=self.RECONNECT_DELAY_S)
                    self.write("*CLS")
                self.write(f"{self.LD_OUTPUT} 0")
                if not self.ask_bool(f"{self.LD_OUTPUT}?"):
                    log.warning("%s: %s: LD output off (without a current ramp)", self.name,
                                command)
                    return
                last = InstrumentError(f"{self.name}: {command}: the LD output still reports "
                                       f"on after '{self.LD_OUTPUT} 0'")
            except InstrumentError as e:
                last = e
        where = "" if self.link.resource in str(last) else f" ({self.link.resource})"
        raise InstrumentError(
            f"{self.name}: {command}: could not switch the laser diode output off "
            f"[{last}]; switch it off at the instrument{where}") from cause


class ITC4000(ThorlabsLaserDiodeController):
    """Thorlabs ITC4000-series laser diode and TEC controller (ITC4001, ITC4002QCL,
    ITC4005, ITC4005QCL, ITC4020), SCPI over USBTMC.

    Commands: ``OUTP`` (LD output), ``OUTP2`` (TEC output), ``SOUR:CURR`` (A),
    ``SOUR:CURR:LIM?``, ``SOUR:FUNC:MODE?``, ``SOUR2:TEMP``, ``UNIT:TEMP?``,
    ``MEAS:TEMP?``, ``MEAS:CURR?``, ``OUTP:PROT:{KEYL|INTL|OTEM}:TRIP?``,
    ``SYST:ERR?``. See the module documentation for the sequences.
    """

    FAMILY = "ITC4000-series (ITC4001, ITC4002QCL, ITC4005, ITC4005QCL, ITC4020)"
    MODEL_PATTERN = re.compile(r"ITC40\d\d")


class CLD1015(ThorlabsLaserDiodeController):
    """Thorlabs CLD101x compact laser diode and TEC controller (CLD1010LP, CLD1011LP,
    CLD1015), SCPI over USBTMC.

    Same command family as the ITC4000, with the explicit forms of its manual:
    ``OUTP:STAT`` (LD output), ``OUTP2:STAT`` (TEC output), ``SOUR:CURR`` (A),
    ``SOUR:CURR:LIM:AMPL?``, ``SOUR2:TEMP:SPO``, ``SENS2:TEMP:DATA?``,
    ``SENS3:CURR:DATA?``; the protection queries as for the ITC4000.
    """

    FAMILY = "CLD101x (CLD1010LP, CLD1011LP, CLD1015)"
    MODEL_PATTERN = re.compile(r"CLD101\d")
    LD_OUTPUT = "OUTP:STAT"
    TEC_OUTPUT = "OUTP2:STAT"
    CURRENT_LIMIT_QUERY = "SOUR:CURR:LIM:AMPL?"
    TEMPERATURE = "SOUR2:TEMP:SPO"
    MEASURED_TEMPERATURE_QUERY = "SENS2:TEMP:DATA?"
    MEASURED_CURRENT_QUERY = "SENS3:CURR:DATA?"
