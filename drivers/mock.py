"""Mock instruments on the simulated optical table.

The mock drivers implement the interfaces of :mod:`qkdctl.drivers.base` on one
shared :class:`~qkdctl.sim.table.OpticalTable`, the physical state of the
simulated bench: the laser's current and output set the mean photon number,
the modulator's rotation adds misalignment, the polarization controller turns
Bob's compensation waveplates (against the fiber's polarization
transformation), the detectors' bias, efficiency and dead time change their
clicks, and the time tagger runs the numba tag generator
(:class:`~qkdctl.sim.engine.TagGenerator`) on the table.

Build a whole bench with :func:`build_mock_bench`; the polarization controller
(``[instruments.polarization] driver = "mock"``) is optional. It powers the simulated
bench up the way a lab bench powers up: laser output off, detectors biased
down, encoder and tagger stopped. A working acquisition is therefore::

    bench = build_mock_bench(load_bench(), seed=1)
    with bench["laser"] as laser, bench["detectors"] as det, \\
            bench["modulator"] as mod, bench["tagger"] as tagger:
        laser.output_on(); det.bias_on(); mod.start(); tagger.start()
        ts, ch = tagger.read_block(duration_s=1e-3)
        tail_ts, tail_ch = tagger.finish()

Simulated time: the tagger's bench time advances only while it reads
(:attr:`MockTimeTagger.elapsed_s`, on Alice's clock). A change made on the
table (a new current, a new dead time) takes effect from the first pulse of
the next read. The drivers write to the table only when a value actually
changes, so that redundant commands (a second ``output_off``, re-applying the
same setting) leave the simulated run bit for bit the same.

Alice's sequence: :meth:`MockPolarizationModulator.load_sequence` loads it
into the table (written only when it differs, so a redundant load changes
nothing), and :attr:`MockPolarizationModulator.pulses_sent` is the encoder's
pulse counter (the pulses simulated so far).

Two hosts: :func:`build_remote_bench` builds one side's instruments -- Alice's
laser and modulator, or Bob's detectors, tagger and polarization controller --
on a :class:`~qkdctl.sim.remote.RemoteTable`, the table of a ``qkdctl
sim-table`` process (:mod:`qkdctl.sim.server`) reached over TCP. The driver
classes are the same; the same seed and the same commands give the same tags as
:func:`build_mock_bench` in one process (the rule is in :mod:`qkdctl.sim.server`).

Not modelled: the laser temperature (a setpoint only) and the encoder's
start/stop (the table always encodes Alice's sequence); both are bookkeeping.
"""

from __future__ import annotations

import logging
import operator
from importlib import metadata
from typing import Any

import numpy as np

from qkdctl.config import SIDES, BenchConfig
from qkdctl.errors import ConfigError, InstrumentError
from qkdctl.sequence import AliceSequence
from qkdctl.sim.engine import TagGenerator
from qkdctl.sim.remote import DEFAULT_TIMEOUT_S, RemoteTable, RemoteTagGenerator
from qkdctl.sim.table import DetectorState, OpticalTable

from .base import (
    ROLES,
    Identity,
    Instrument,
    Laser,
    PolarizationController,
    PolarizationModulator,
    SinglePhotonDetector,
    TimeTagger,
)

__all__ = [
    "MOCK_DRIVERS",
    "MockDetectors",
    "MockLaser",
    "MockPolarizationController",
    "MockPolarizationModulator",
    "MockTimeTagger",
    "REMOTE_SIDES",
    "build_mock_bench",
    "build_remote_bench",
]

log = logging.getLogger(__name__)


def _firmware() -> str:
    try:
        return "qkdctl " + metadata.version("qkdctl")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "qkdctl"


class _MockMixin:
    """Connection bookkeeping shared by the mock drivers (there is no link to open)."""

    table: OpticalTable | RemoteTable
    name: str

    def _open(self) -> None:
        attach = getattr(self.table, "_attach", None)  # a RemoteTable counts its users
        if attach is not None:
            attach()

    def _close(self) -> None:
        detach = getattr(self.table, "_detach", None)
        if detach is not None:
            detach()

    def _identity(self) -> Identity:
        return Identity(make="qkdctl", model=type(self).__name__, serial=f"SIM-{self.name}",
                        firmware=_firmware())

    def _table_set(self, **changes: Any) -> None:
        """Write the values that differ from the table's (a write bumps its version)."""
        diff = {k: v for k, v in changes.items() if getattr(self.table, k) != v}
        if diff:
            self.table.set(**diff)


class MockLaser(_MockMixin, Laser):
    """The pulsed laser of the simulated table.

    The current scales every mean photon number by
    ``(I - I_threshold) / (I_calibrated - I_threshold)`` (0 below threshold);
    with the output off no photon leaves Alice.
    """

    def __init__(self, table: OpticalTable, name: str = "laser", **kwargs: Any):
        self.table = table
        self._temperature_c = 25.0
        super().__init__(name, **kwargs)

    def _set_output(self, on: bool) -> None:
        self._table_set(laser_on=bool(on))

    def _get_output(self) -> bool:
        return self.table.laser_on

    def _set_current_ma(self, current_ma: float) -> None:
        self._table_set(laser_current_ma=float(current_ma))

    def _get_current_ma(self) -> float:
        return self.table.laser_current_ma

    def _set_temperature_c(self, temperature_c: float) -> None:
        self._temperature_c = float(temperature_c)

    def _get_temperature_c(self) -> float:
        return self._temperature_c

    def _status(self) -> dict[str, Any]:
        return {"output_on": self.table.laser_on,
                "current_ma": self.table.laser_current_ma,
                "temperature_c": self._temperature_c,
                "max_current_ma": self.limits["max_current_ma"],
                "power_scale": self.table.power_scale}


class MockPolarizationModulator(_MockMixin, PolarizationModulator):
    """Alice's encoder on the simulated table.

    The rotation adds a misalignment ``sin^2(rotation)`` (combined with the
    table's intrinsic misalignment, see
    :attr:`~qkdctl.sim.table.OpticalTable.effective_misalignment`): an error of
    Alice's states, which Bob's polarization compensation
    (:class:`MockPolarizationController`) cannot undo.
    """

    def __init__(self, table: OpticalTable, name: str = "modulator", **kwargs: Any):
        self.table = table
        self._running = False
        super().__init__(name, **kwargs)

    def _set_running(self, running: bool) -> None:
        self._running = bool(running)

    def _get_running(self) -> bool:
        return self._running

    def _set_rotation_rad(self, rotation_rad: float) -> None:
        self._table_set(polarization_rotation_rad=float(rotation_rad))

    def _get_rotation_rad(self) -> float:
        return self.table.polarization_rotation_rad

    def load_sequence(self, sequence: AliceSequence) -> None:
        """Load Alice's sequence (her choices for every pulse) into the encoder.

        Written to the table only if it differs from the one there (fields
        compared with ``np.array_equal``): an equal load changes nothing, not even
        the table's version, so the run stays bit for bit the same. A sequence
        the simulator cannot run is an :class:`~qkdctl.errors.InstrumentError`.
        """
        self._require("load_sequence")
        try:
            changed = self.table.load_sequence(sequence)
        except ValueError as e:
            raise InstrumentError(f"{self.name}: load_sequence: {e}") from None
        log.info("%s: sequence %s", self.name, "loaded" if changed else "unchanged")

    @property
    def pulses_sent(self) -> int:
        """The encoder's pulse counter: pulses sent so far (simulated by the table)."""
        return int(self.table.pulses_simulated)

    def _status(self) -> dict[str, Any]:
        return {"running": self._running,
                "rotation_rad": self.table.polarization_rotation_rad,
                "effective_misalignment": self.table.effective_misalignment,
                "pulses_sent": self.pulses_sent}


class MockPolarizationController(_MockMixin, PolarizationController):
    """Bob's polarization compensation on the simulated table: one motorized rotation
    mount per waveplate of the table (by default QWP, HWP, QWP, the light passing
    axis 0 first).

    An axis's angle is its waveplate's mount angle
    (:attr:`~qkdctl.sim.table.OpticalTable.waveplate_angles_deg`); the table's
    ``[sim] waveplate_offsets_deg`` says where each fast axis is at the mount's
    zero. Moves are instantaneous and take effect from the first pulse of the next
    read. ``home()`` moves every axis to 0, where the default chain is the identity.
    Mounts turn freely; ``min_angle_deg`` / ``max_angle_deg`` bound the moves when
    configured.
    """

    def __init__(self, table: OpticalTable, name: str = "polarization", **kwargs: Any):
        self.table = table
        super().__init__(name, **kwargs)
        angles = self.settings.get("angles_deg")
        if angles is not None and len(angles) != self.axes:
            self._config_fail("settings.angles_deg",
                              f"{len(angles)} angles for {self.axes} axes (the simulated "
                              "table's waveplates, sim.waveplate_retardances_deg)")

    def _axes(self) -> int:
        return len(self.table.waveplate_retardances_deg)

    def _set_angle_deg(self, axis: int, angle_deg: float) -> None:
        angles = list(self.table.waveplate_angles_deg)
        angles[axis] = float(angle_deg)
        self._table_set(waveplate_angles_deg=tuple(angles))

    def _get_angle_deg(self, axis: int) -> float:
        return float(self.table.waveplate_angles_deg[axis])

    def _home(self) -> None:
        self._table_set(waveplate_angles_deg=(0.0,) * self.axes)

    def _stop(self) -> None:
        pass

    def _status(self) -> dict[str, Any]:
        return {"angles_deg": list(self.table.waveplate_angles_deg),
                "retardances_deg": list(self.table.waveplate_retardances_deg)}


class MockDetectors(_MockMixin, SinglePhotonDetector):
    """All of Bob's simulated detectors (one channel per receiver detector)."""

    def __init__(self, table: OpticalTable, name: str = "detectors", **kwargs: Any):
        self.table = table
        super().__init__(name, **kwargs)
        for key, value in self.settings.items():
            if isinstance(value, dict):
                for ch in value:
                    if int(ch) not in self.channels:
                        self._config_fail(f"settings.{key}.{ch}",
                                          f"no detector on channel {ch}; channels are "
                                          f"{', '.join(map(str, self.channels))}")

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(d.channel for d in self.table.detectors)

    def _det(self, channel: int) -> DetectorState:
        for d in self.table.detectors:
            if d.channel == channel:
                return d
        raise InstrumentError(f"{self.name}: no simulated detector on channel {channel}")

    def _det_set(self, channel: int, **changes: Any) -> None:
        d = self._det(channel)
        diff = {k: v for k, v in changes.items() if getattr(d, k) != v}
        if diff:
            self.table.set_detector(channel, **diff)

    def _set_efficiency(self, channel: int, efficiency: float) -> None:
        self._det_set(channel, efficiency=float(efficiency))

    def _get_efficiency(self, channel: int) -> float:
        return self._det(channel).efficiency

    def _set_dead_time_ns(self, channel: int, dead_time_ns: float) -> None:
        self._det_set(channel, dead_time_ns=float(dead_time_ns))

    def _get_dead_time_ns(self, channel: int) -> float:
        return self._det(channel).dead_time_ns

    def _get_dark_count_rate_hz(self, channel: int) -> float:
        d = self._det(channel)
        return d.dark_count_rate_hz if d.biased else 0.0

    def _set_bias(self, channel: int, on: bool) -> None:
        self._det_set(channel, biased=bool(on))

    def _get_bias(self, channel: int) -> bool:
        return self._det(channel).biased

    def _status(self) -> dict[str, Any]:
        return {"channels": {
            d.channel: {"biased": d.biased, "efficiency": d.efficiency,
                        "dead_time_ns": d.dead_time_ns,
                        "dark_count_rate_hz": d.dark_count_rate_hz if d.biased else 0.0}
            for d in self.table.detectors}}


class MockTimeTagger(_MockMixin, TimeTagger):
    """The time tagger of the simulated table, driving a :class:`TagGenerator`.

    ``read_block(duration_s)`` simulates that much bench time. The pulse count is
    taken from the *total* time asked for, ``round(sum(duration_s) * rep_rate)``
    minus the pulses already simulated, rather than rounding every read: reads
    of 1/3 ms three times give exactly the tags of one read of 1 ms. (Rounding
    each read would drift by up to half a pulse per read.) :meth:`read_pulses`
    simulates an exact number of pulses. The tags of a run do not depend on how
    it is cut into reads.

    ``generator``: the tag generator to drive, by default ``TagGenerator(table,
    seed)``; on a remote table (:func:`build_remote_bench`) a
    :class:`~qkdctl.sim.remote.RemoteTagGenerator`, the sim table's own generator
    (whose seed is the sim table's).
    """

    def __init__(self, table: OpticalTable | RemoteTable, seed: int, name: str = "tagger",
                 generator: TagGenerator | RemoteTagGenerator | None = None, **kwargs: Any):
        self.table = table
        self.seed = int(seed)
        self._generator = TagGenerator(table, self.seed) if generator is None else generator
        self._running = False
        self._finished = False
        self._requested_s = 0.0
        self._tags_read = 0
        super().__init__(name, **kwargs)

    # -- properties of the simulated tagger --------------------------------------------
    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(sorted({self.table.sync_channel}
                            | {d.channel for d in self.table.detectors}))

    @property
    def resolution_ps(self) -> int:
        return int(self.table.tagger_resolution_ps)

    @property
    def rep_rate_hz(self) -> float:
        """Alice's pulse rate, which converts bench time to pulses."""
        return float(self.table.rep_rate_hz)

    @property
    def pulses_simulated(self) -> int:
        return self._generator.pulses_simulated

    @property
    def elapsed_s(self) -> float:
        """Bench time simulated so far (pulses / rep rate, on Alice's clock)."""
        return self._generator.pulses_simulated / self.rep_rate_hz

    @property
    def finished(self) -> bool:
        return self._finished

    # -- acquisition --------------------------------------------------------------------
    def read_pulses(self, n_pulses: int) -> tuple[np.ndarray, np.ndarray]:
        """Simulate the next ``n_pulses`` pulses; return the tags that are final."""
        try:
            n = operator.index(n_pulses)
        except TypeError:
            raise InstrumentError(f"{self.name}: read_pulses({n_pulses!r}): the number of "
                                  "pulses must be an integer") from None
        if n < 0:
            raise InstrumentError(f"{self.name}: read_pulses({n}): the number of pulses "
                                  "must be >= 0")
        self._require_running("read_pulses")
        out = self._generate(n)
        self._requested_s = self._generator.pulses_simulated / self.rep_rate_hz
        return self._checked(*out, "read_pulses")

    def _read_block(self, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
        self._requested_s += duration_s
        target = round(self._requested_s * self.rep_rate_hz)
        return self._generate(max(0, target - self._generator.pulses_simulated))

    def _generate(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n == 0:
            return np.empty(0, np.int64), np.empty(0, np.uint8)
        ts, ch = self._generator.generate(n)
        self._tags_read += ts.shape[0]
        return ts, ch

    def _finish(self) -> tuple[np.ndarray, np.ndarray]:
        self._running = False
        if self._finished:
            return np.empty(0, np.int64), np.empty(0, np.uint8)
        self._finished = True
        ts, ch = self._generator.finish()
        self._tags_read += ts.shape[0]
        return ts, ch

    def _start(self) -> None:
        if self._finished:
            raise InstrumentError(f"{self.name}: start: the run is finished (finish() was "
                                  "called); build a new bench for a new run")
        self._running = True

    def _stop(self) -> None:
        self._running = False

    def _get_running(self) -> bool:
        return self._running

    def _idle_hint(self) -> str:
        return "the run is finished" if self._finished else super()._idle_hint()

    def _status(self) -> dict[str, Any]:
        return {"running": self._running, "finished": self._finished,
                "elapsed_s": self.elapsed_s, "pulses_simulated": self.pulses_simulated,
                "tags_read": self._tags_read, "resolution_ps": self.resolution_ps,
                "channels": self.channels}


MOCK_DRIVERS: dict[str, type[Instrument]] = {
    "laser": MockLaser,
    "modulator": MockPolarizationModulator,
    "detectors": MockDetectors,
    "tagger": MockTimeTagger,
    "polarization": MockPolarizationController,
}
"""Role -> mock driver class."""


def build_mock_bench(cfg: BenchConfig, seed: int) -> dict[str, Instrument]:
    """The mock instruments of ``cfg.instruments`` on one simulated optical table.

    Keys are the instrument names of the bench file, which are their roles
    (``laser``, ``modulator``, ``detectors``, ``tagger`` and, optionally,
    ``polarization``); every instrument must
    have ``driver = "mock"``. Each instrument gets its ``settings`` (applied when
    it connects) and ``limits``; both are checked here, so a bad key or an
    over-limit setting is a :class:`~qkdctl.errors.ConfigError` naming the file
    and the key before anything runs. The table is
    ``OpticalTable.from_config(cfg, seed)`` and powers up safe: laser output off,
    detectors biased down. All instruments share it: ``bench[name].table``.
    """
    table = OpticalTable.from_config(cfg, seed)
    table.set(laser_on=False)
    for d in table.detectors:
        table.set_detector(d.channel, biased=False)
    bench: dict[str, Instrument] = {}
    for name, cls, kwargs in _mock_instruments(cfg, tuple(cfg.instruments)):
        if cls is MockTimeTagger:
            bench[name] = MockTimeTagger(table, seed, **kwargs)
        else:
            bench[name] = cls(table, **kwargs)
    log.debug("mock bench %s: %s", cfg.name, ", ".join(bench))
    return bench


REMOTE_SIDES: dict[str, tuple[str, ...]] = {
    side: tuple(role for role, s in SIDES.items() if s == side) for side in ("alice", "bob")}
"""Side -> the instrument roles its host drives (from :data:`qkdctl.config.SIDES`)."""


def build_remote_bench(cfg: BenchConfig, side: str, host: str, port: int, seed: int, *,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Instrument]:
    """One side's mock instruments on the sim table at ``host:port`` (``qkdctl sim-table``).

    ``side`` ``"alice"`` gives the laser and the modulator, ``"bob"`` the detectors,
    the tagger and, if the bench has one, the polarization controller: the same
    classes as :func:`build_mock_bench`, checked the same way, all on one
    :class:`~qkdctl.sim.remote.RemoteTable` (``bench[name].table``; one connection,
    opened by the first request, normally when the first instrument connects, and
    closed when the last instrument closes). Bob's tagger drives the sim table's
    generator, whose seed is the table's; ``seed`` is only recorded
    (``tagger.seed``). Errors reaching the table are
    :class:`~qkdctl.errors.InstrumentError` naming its address.
    """
    if side not in REMOTE_SIDES:
        raise ValueError(f"side must be one of {', '.join(REMOTE_SIDES)}, not {side!r}")
    for name in cfg.instruments:
        if name not in ROLES:
            raise ConfigError(f"{cfg.path}: instruments.{name}: unknown instrument role "
                              f"{name!r}; the instruments of a bench are named by role: "
                              f"{', '.join(ROLES)}")
    names = tuple(n for n in cfg.instruments if n in REMOTE_SIDES[side])
    specs = _mock_instruments(cfg, names)  # checked before anything is sent
    table = RemoteTable(host, port, side, cfg, timeout_s=timeout_s)
    bench: dict[str, Instrument] = {}
    try:
        for name, cls, kwargs in specs:
            if cls is MockTimeTagger:
                bench[name] = MockTimeTagger(table, seed, generator=RemoteTagGenerator(table),
                                             **kwargs)
            else:
                bench[name] = cls(table, **kwargs)
    finally:
        table.close()  # reopened by the instruments' first request
    log.debug("remote mock bench %s (%s, sim table %s): %s", cfg.name, side, table.address,
              ", ".join(bench))
    return bench


def _mock_instruments(cfg: BenchConfig,
                      names: tuple[str, ...]) -> list[tuple[str, type[Instrument], dict]]:
    """(name, driver class, constructor keywords) of the named instruments, checked."""
    out = []
    for name in names:
        inst = cfg.instruments[name]
        key = f"{cfg.path}: instruments.{name}"
        if name not in ROLES:
            raise ConfigError(f"{key}: unknown instrument role {name!r}; the instruments of "
                              f"a bench are named by role: {', '.join(ROLES)}")
        if inst.driver != "mock":
            raise ConfigError(f"{key}.driver: {inst.driver!r} is not a mock driver; the "
                              'simulated bench needs driver = "mock" for every instrument')
        kwargs: dict[str, Any] = {"name": name, "settings": inst.settings,
                                  "limits": inst.limits, "config_key": key}
        out.append((name, MOCK_DRIVERS[name], kwargs))
    return out
