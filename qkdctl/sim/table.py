"""The simulated optical table: the shared physical state behind the mock instruments.

The mock drivers change this state (laser current and output, polarization
rotation, detector bias and dead time); the tag generator reads it. Every
change bumps :attr:`OpticalTable.version` so that the generator rebuilds its
per-state probability tables before simulating the next pulses.

Model (per pulse n, Alice's state: basis a, bit x, intensity class k):

- weak coherent pulse of mean photon number ``mu_k * s`` where ``s`` is the
  laser's power scale ``(I - I_th) / (I_cal - I_th)`` (0 when the laser is off);
- channel transmittance ``10**(-alpha L / 10)`` and Bob's insertion loss;
- passive basis splitter: a photon goes to Z with probability ``p_Z``;
- in the matching basis a photon reaches the wrong detector with probability
  ``e`` (misalignment, combined with the rotation set on the polarization
  controller), in the other basis either detector with probability 1/2;
- detector efficiency ``eta_j``.

A coherent state split by linear optics is a product of coherent states, so
detector j receives a Poisson number of photons of mean ``m_j`` independently of
the others, and clicks with probability ``1 - exp(-m_j)``. Dark counts (Poisson
in continuous time), afterpulses and dead time act in continuous time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..config import BenchConfig
from ..errors import ConfigError
from ..sequence import BASIS_X, BASIS_Z, AliceSequence

__all__ = ["DetectorState", "OpticalTable"]


@dataclass
class DetectorState:
    channel: int
    basis: int
    bit: int
    efficiency: float
    dark_count_rate_hz: float
    dead_time_ns: float
    afterpulse_probability: float
    afterpulse_time_constant_ns: float
    jitter_ps: float
    delay_ps: int
    biased: bool = True


@dataclass
class OpticalTable:
    """Mutable physical state of the simulated bench."""

    rep_rate_hz: float
    mean_photon_numbers: tuple[float, ...]
    sequence: AliceSequence
    sync_period_pulses: int
    sync_channel: int
    channel_transmittance: float
    bob_transmittance: float
    bob_z_probability: float
    misalignment: float
    detectors: list[DetectorState]
    clock_offset_ps: int
    clock_drift_ppm: float
    tagger_resolution_ps: int
    sync_jitter_ps: float
    jitter_clip_sigmas: float
    laser_threshold_ma: float
    laser_calibrated_current_ma: float
    laser_current_ma: float = 0.0
    laser_on: bool = False
    polarization_rotation_rad: float = 0.0
    version: int = field(default=0)

    @classmethod
    def from_config(cls, cfg: BenchConfig, seed: int) -> OpticalTable:
        if cfg.sim is None:
            raise ConfigError(f"{cfg.path}: sim: missing; the mock instruments need a [sim] "
                              "table describing the simulated optical table")
        sim = cfg.sim
        by_channel = {d.channel: d for d in sim.detectors}
        dets = []
        for d in cfg.receiver.detectors:
            s = by_channel[d.channel]
            dets.append(DetectorState(
                channel=d.channel, basis=BASIS_Z if d.basis == "Z" else BASIS_X, bit=d.bit,
                efficiency=s.efficiency, dark_count_rate_hz=s.dark_count_rate_hz,
                dead_time_ns=s.dead_time_ns, afterpulse_probability=s.afterpulse_probability,
                afterpulse_time_constant_ns=s.afterpulse_time_constant_ns,
                jitter_ps=s.jitter_ps, delay_ps=s.delay_ps))
        return cls(
            rep_rate_hz=cfg.source.rep_rate_hz,
            mean_photon_numbers=tuple(cfg.source.mean_photon_numbers),
            sequence=AliceSequence.from_config(cfg.source, seed),
            sync_period_pulses=cfg.source.sync_period_pulses,
            sync_channel=cfg.receiver.sync_channel,
            channel_transmittance=sim.channel_transmittance,
            bob_transmittance=sim.bob_transmittance,
            bob_z_probability=cfg.receiver.z_basis_probability,
            misalignment=sim.misalignment,
            detectors=dets,
            clock_offset_ps=sim.clock_offset_ps,
            clock_drift_ppm=sim.clock_drift_ppm,
            tagger_resolution_ps=sim.tagger_resolution_ps,
            sync_jitter_ps=sim.sync_jitter_ps,
            jitter_clip_sigmas=sim.jitter_clip_sigmas,
            laser_threshold_ma=sim.laser_threshold_ma,
            laser_calibrated_current_ma=sim.laser_calibrated_current_ma,
            laser_current_ma=sim.laser_calibrated_current_ma,
            laser_on=True,
        )

    # -- changes made by the mock drivers -------------------------------------------------
    def touch(self) -> None:
        self.version += 1

    def set(self, **changes) -> None:
        for k, v in changes.items():
            if not hasattr(self, k):
                raise AttributeError(k)
            setattr(self, k, v)
        self.touch()

    def set_detector(self, channel: int, **changes) -> None:
        for d in self.detectors:
            if d.channel == channel:
                for k, v in changes.items():
                    if not hasattr(d, k):
                        raise AttributeError(k)
                    setattr(d, k, v)
                self.touch()
                return
        raise KeyError(f"no simulated detector on channel {channel}")

    # -- derived quantities ---------------------------------------------------------------
    @property
    def period_ps(self) -> float:
        return 1e12 / self.rep_rate_hz

    @property
    def power_scale(self) -> float:
        """Mean photon numbers relative to the calibrated ones (0 with the laser off)."""
        if not self.laser_on:
            return 0.0
        span = self.laser_calibrated_current_ma - self.laser_threshold_ma
        return max(0.0, (self.laser_current_ma - self.laser_threshold_ma) / span)

    @property
    def effective_misalignment(self) -> float:
        """Misalignment combined with the polarization controller's rotation error."""
        e1 = self.misalignment
        e2 = math.sin(self.polarization_rotation_rad) ** 2
        return e1 * (1 - e2) + e2 * (1 - e1)

    @property
    def transmittance(self) -> float:
        return self.channel_transmittance * self.bob_transmittance

    def mean_photons_at_detectors(self) -> np.ndarray:
        """``m[code, j]``: mean photon number reaching detector j for Alice's state ``code``."""
        nint = len(self.mean_photon_numbers)
        e = self.effective_misalignment
        m = np.zeros((4 * nint, len(self.detectors)))
        for code in range(4 * nint):
            x, a, k = code & 1, (code >> 1) & 1, code >> 2
            mu = self.mean_photon_numbers[k] * self.power_scale * self.transmittance
            for j, d in enumerate(self.detectors):
                pz = self.bob_z_probability
                p_basis = pz if d.basis == BASIS_Z else 1 - pz
                if d.basis == a:
                    route = (1 - e) if d.bit == x else e
                else:
                    route = 0.5
                eff = d.efficiency if d.biased else 0.0
                m[code, j] = mu * p_basis * route * eff
        return m

    def click_probabilities(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-state click probabilities: of each detector, of any, of any after j.

        Returns ``p[code, j]``, ``p_any[code] = 1 - prod_j(1 - p[code, j])`` and
        ``p_rest[code, j] = 1 - prod_{i > j}(1 - p[code, i])``, each product
        taken in detector order, the order the generator walks, so that they
        agree with its running products to the last bit.
        """
        p = -np.expm1(-self.mean_photons_at_detectors())
        ncode, ndet = p.shape
        p_any = np.empty(ncode)
        p_rest = np.zeros((ncode, ndet))
        for c in range(ncode):
            q = 1.0
            for j in range(ndet):
                q *= 1.0 - p[c, j]
            p_any[c] = 1.0 - q
            for j in range(ndet):
                q = 1.0
                for i in range(j + 1, ndet):
                    q *= 1.0 - p[c, i]
                p_rest[c, j] = 1.0 - q
        return p, p_any, p_rest
