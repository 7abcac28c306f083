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
- polarization (see below): a photon of Alice's state ``s`` reaches the
  detector of outcome ``b`` of basis ``B`` with probability ``P(b | s, B)``;
  without a polarization transformation that is ``1 - e`` for the right
  detector of the matching basis, ``e`` for the wrong one (misalignment,
  combined with the rotation set on the polarization modulator) and 1/2 for
  either detector of the other basis;
- detector efficiency ``eta_j``.

Polarization. Alice's states are H, V (Z basis, bits 0, 1) and D, A (X
basis); Bob's detectors measure the same. The fiber applies a unitary
``U`` (a Jones matrix in SU(2), ``[sim] channel_rotation_deg`` or
``polarization_seed``; default the identity) and Bob's compensation, a chain
of waveplates on motorized mounts (the mock polarization controller's axes,
by default QWP, HWP, QWP), applies ``W(angles)``. The photon reaches Bob's
analyser in the state ``W U |s>``, and

    P_U(b | s, B) = |<B_b| W U |s>|^2 = (1 + S_b . R S_s) / 2

where ``S`` are the Stokes vectors of the states on the Poincare sphere
(H = +S1, V = -S1, D = +S2, A = -S2) and ``R`` in SO(3) is the rotation of
the sphere that ``W U`` induces. The table works with ``R`` (the product of
the fiber's rotation and one rotation per waveplate: a waveplate of
retardance ``delta`` whose fast axis is at ``theta`` from H turns the sphere
by ``delta`` about ``(cos 2 theta, sin 2 theta, 0)``), which gives exactly
0, 1/2 and 1 where the states are aligned. The intrinsic imperfection ``e``
(the effective misalignment) acts as a depolarizing-like flip on top:

    P(b | s, B) = (1 - e) P_U + e (1 - P_U)

When ``W U`` is exactly the identity (no fiber transformation, waveplates at
their neutral position) the table uses the scalar routes above as they are,
so that such a bench gives the scalar model's numbers to the last bit.

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
from ..sequence import BASIS_X, BASIS_Z, MODE_PATTERN, MODE_STREAM, AliceSequence

__all__ = ["EVE_INTERCEPT_RESEND", "EVE_NONE", "EVE_PNS", "DetectorState", "EveTables",
           "OpticalTable", "euler_rotation", "random_rotation", "retarder_rotation",
           "same_sequence", "sequence_problem", "waveplate_rotation"]

EVE_NONE = 0
EVE_INTERCEPT_RESEND = 1
EVE_PNS = 2
_EVE_ATTACKS = {"none": EVE_NONE, "intercept-resend": EVE_INTERCEPT_RESEND, "pns": EVE_PNS}
#: photon numbers modelled exactly in the photon-number-splitting attack (the
#: Poisson tail beyond is below 1e-30 for every allowed mean photon number <= 10)
PNS_MAX_PHOTONS = 64


# ------------------------------------------------------------------ polarization optics
def _cos_sin_deg(angle_deg: float) -> tuple[float, float]:
    """``cos`` and ``sin`` of an angle in degrees, exact at multiples of 90 degrees."""
    q, r = divmod(float(angle_deg), 90.0)
    if r == 0.0:
        return ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))[int(q) % 4]
    a = math.radians(angle_deg)
    return math.cos(a), math.sin(a)


def _axis_rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotation of the Poincare sphere by ``angle_deg`` about the unit vector ``axis``
    (right-handed; Rodrigues' formula)."""
    c, s = _cos_sin_deg(angle_deg)
    n = np.asarray(axis, np.float64)
    k = np.array([[0.0, -n[2], n[1]], [n[2], 0.0, -n[0]], [-n[1], n[0], 0.0]])
    return c * np.eye(3) + (1.0 - c) * np.outer(n, n) + s * k


def retarder_rotation(axis_deg: float, retardance_deg: float) -> np.ndarray:
    """Poincare-sphere rotation of a linear retarder whose fast axis is ``axis_deg`` from H.

    It is the image of the Jones matrix ``exp(-i delta/2 (cos 2t sigma_1 + sin 2t
    sigma_2))``, ``sigma_1 = diag(1, -1)`` and ``sigma_2`` the Pauli matrices of the
    S1 (H/V) and S2 (D/A) axes: a turn by ``delta`` about ``(cos 2t, sin 2t, 0)``.
    """
    c2, s2 = _cos_sin_deg(2.0 * float(axis_deg))
    return _axis_rotation(np.array([c2, s2, 0.0]), retardance_deg)


def waveplate_rotation(angles_deg, retardances_deg=(90.0, 180.0, 90.0),
                       offsets_deg=None) -> np.ndarray:
    """Rotation of a chain of waveplates, the light passing ``angles_deg[0]`` first.

    Plate i has retardance ``retardances_deg[i]`` and its fast axis at
    ``angles_deg[i] + offsets_deg[i]`` from H. At angle 0 the default chain
    (QWP, HWP, QWP) is exactly the identity.
    """
    offsets = (0.0,) * len(retardances_deg) if offsets_deg is None else offsets_deg
    r = np.eye(3)
    for a, d, o in zip(angles_deg, retardances_deg, offsets, strict=True):
        r = retarder_rotation(float(a) + float(o), float(d)) @ r
    return r


def euler_rotation(a_deg: float, b_deg: float, c_deg: float) -> np.ndarray:
    """``R_S1(a) R_S2(b) R_S1(c)``: rotations of the Poincare sphere about S1, S2, S1.

    Every rotation has such angles (a, c in [0, 360), b in [0, 180]); as a Jones
    matrix it is ``exp(-i a/2 sigma_1) exp(-i b/2 sigma_2) exp(-i c/2 sigma_1)``.
    """
    e1, e2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    return _axis_rotation(e1, a_deg) @ _axis_rotation(e2, b_deg) @ _axis_rotation(e1, c_deg)


def random_rotation(seed: int) -> np.ndarray:
    """A rotation of the Poincare sphere drawn uniformly (Haar measure on SU(2), a
    uniformly distributed unit quaternion) from ``seed``."""
    q = np.random.default_rng([int(seed), 0x706F6C]).normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


@dataclass
class EveTables:
    """What the tag generator needs to simulate the eavesdropper.

    Codes are extended: ``code`` (0 <= code < C = 4 * classes) is a pulse Eve
    leaves alone; ``C + code`` a pulse she intercepted and resent in the state
    ``code`` (intensity class kept), detected by her with probability
    ``ir_scale[class]``; ``2 C + code`` a pulse of Alice's state ``code`` after
    photon-number splitting. ``p_any[ext]`` is Bob's probability of any click for
    each extended code. For the splitting attack, ``m_cdf[code]`` is the
    cumulative law of the number of photons reaching Bob given that he detects
    at least one, and ``w_cum[code, j]`` the cumulative probability that a
    photon reaching Bob is detected by detector 0..j.
    """

    p_any: np.ndarray
    ir_scale: np.ndarray
    m_cdf: np.ndarray
    w_cum: np.ndarray
    pns_transmittance: float
    pns_block_single: float


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
    #: the fiber's polarization transformation, a rotation of the Poincare sphere (None:
    #: the identity)
    fiber_rotation: np.ndarray | None = None
    #: Bob's compensation waveplates, in the order the light passes them: the mount
    #: angles (set by the polarization controller), the retardances and the angle of
    #: each fast axis from H when its mount reads 0
    waveplate_angles_deg: tuple[float, ...] = (0.0, 0.0, 0.0)
    waveplate_retardances_deg: tuple[float, ...] = (90.0, 180.0, 90.0)
    waveplate_offsets_deg: tuple[float, ...] = (0.0, 0.0, 0.0)
    #: eavesdropper: EVE_NONE, EVE_INTERCEPT_RESEND or EVE_PNS, on ``eve_fraction`` of pulses
    eve_attack: int = 0
    eve_fraction: float = 0.0
    eve_pns_transmittance: float | None = None
    eve_pns_block_single: float | None = None
    version: int = field(default=0)
    #: pulses simulated so far by the tag generator: Alice's encoder's pulse counter. A
    #: read-back, not a setting: the generator updates it without bumping ``version``.
    pulses_simulated: int = field(default=0)

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
            eve_attack=_EVE_ATTACKS[sim.eavesdropper.attack],
            eve_fraction=sim.eavesdropper.fraction,
            eve_pns_transmittance=sim.eavesdropper.pns_channel_transmittance,
            eve_pns_block_single=sim.eavesdropper.pns_single_photon_block_fraction,
            fiber_rotation=_fiber_rotation(cfg),
            waveplate_angles_deg=(0.0,) * len(sim.waveplate_retardances_deg),
            waveplate_retardances_deg=tuple(float(d) for d in sim.waveplate_retardances_deg),
            waveplate_offsets_deg=tuple(float(o) for o in sim.waveplate_offsets_deg),
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

    def load_sequence(self, seq: AliceSequence) -> bool:
        """Make ``seq`` Alice's sequence; True if it differs from the present one.

        An equal sequence (same mode, key and thresholds, same arrays by
        ``np.array_equal``) is not written, so the version is not bumped and a
        redundant load leaves the simulated run bit for bit the same.
        ``ValueError`` names what is wrong with a sequence the generator cannot run
        (see :func:`sequence_problem`).
        """
        problem = sequence_problem(seq, len(self.mean_photon_numbers))
        if problem:
            raise ValueError(problem)
        if same_sequence(seq, self.sequence):
            return False
        self.set(sequence=seq)
        return True

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
    def polarization_rotation(self) -> np.ndarray | None:
        """The Poincare-sphere rotation ``R`` of ``W U``: Bob's waveplates after the fiber.

        None when it is exactly the identity (no fiber transformation, waveplates at
        their neutral position); the routes are then the scalar ones.
        """
        r = waveplate_rotation(self.waveplate_angles_deg, self.waveplate_retardances_deg,
                               self.waveplate_offsets_deg)
        if self.fiber_rotation is not None:
            r = r @ self.fiber_rotation
        return None if np.array_equal(r, np.eye(3)) else r

    def route_probabilities(self) -> np.ndarray:
        """``r[a, x, B, b]``: probability that a photon of Alice's state (basis a, bit x)
        reaches Bob's detector of outcome b in basis B, given that the basis splitter
        sent it to B: ``(1 - e) P_U + e (1 - P_U)`` with ``P_U = (1 + S_b . R S_s) / 2``
        (see the module documentation), ``e`` the effective misalignment."""
        e = self.effective_misalignment
        rot = self.polarization_rotation
        r = np.empty((2, 2, 2, 2))
        for a in (BASIS_Z, BASIS_X):
            for x in (0, 1):
                for b_basis in (BASIS_Z, BASIS_X):
                    for b in (0, 1):
                        if rot is None:
                            if b_basis == a:
                                route = (1 - e) if b == x else e
                            else:
                                route = 0.5
                        else:
                            sign = 1.0 if x == b else -1.0
                            pu = min(1.0, max(0.0, 0.5 * (1.0 + sign * rot[b_basis, a])))
                            route = (1 - e) * pu + e * (1 - pu)
                        r[a, x, b_basis, b] = route
        return r

    @property
    def transmittance(self) -> float:
        return self.channel_transmittance * self.bob_transmittance

    def photon_detection_probabilities(self) -> np.ndarray:
        """``w[code, j]``: probability that one photon entering Bob's receiver in Alice's
        state ``code`` is detected by detector j (Bob's loss, basis splitter,
        polarization routes, efficiency)."""
        nint = len(self.mean_photon_numbers)
        routes = self.route_probabilities()
        w = np.zeros((4 * nint, len(self.detectors)))
        for code in range(4 * nint):
            x, a = code & 1, (code >> 1) & 1
            for j, d in enumerate(self.detectors):
                pz = self.bob_z_probability
                p_basis = pz if d.basis == BASIS_Z else 1 - pz
                route = routes[a, x, d.basis, d.bit]
                eff = d.efficiency if d.biased else 0.0
                w[code, j] = self.bob_transmittance * p_basis * route * eff
        return w

    def mean_photons_at_source(self) -> np.ndarray:
        """Mean photon number of each intensity class leaving Alice."""
        return np.array(self.mean_photon_numbers, float) * self.power_scale

    def mean_photons_at_detectors(self) -> np.ndarray:
        """``m[code, j]``: mean photon number reaching detector j for Alice's state ``code``."""
        nint = len(self.mean_photon_numbers)
        routes = self.route_probabilities()
        m = np.zeros((4 * nint, len(self.detectors)))
        for code in range(4 * nint):
            x, a, k = code & 1, (code >> 1) & 1, code >> 2
            mu = self.mean_photon_numbers[k] * self.power_scale * self.transmittance
            for j, d in enumerate(self.detectors):
                pz = self.bob_z_probability
                p_basis = pz if d.basis == BASIS_Z else 1 - pz
                route = routes[a, x, d.basis, d.bit]
                eff = d.efficiency if d.biased else 0.0
                m[code, j] = mu * p_basis * route * eff
        return m

    def eve_tables(self) -> EveTables:
        """Bob's click laws under the configured attack (see :class:`EveTables`)."""
        _, p_any, _ = self.click_probabilities()
        ncode = p_any.shape[0]
        mu = self.mean_photons_at_source()
        ir_scale = -np.expm1(-mu)  # Eve's ideal detector sees at least one photon
        w = self.photon_detection_probabilities()
        w_cum = np.cumsum(w, axis=1)
        W = w_cum[:, -1] if w.shape[1] else np.zeros(ncode)
        t_e, b = 1.0, 1.0
        m_cdf = np.zeros((ncode, PNS_MAX_PHOTONS + 1))
        p_pns = np.zeros(ncode)
        if self.eve_attack == EVE_PNS:
            t_e, b = self._pns_parameters(mu, W, p_any)
            for code in range(ncode):
                pm = _pns_photons_at_bob(mu[code >> 2], t_e, b)
                pc = pm * -np.expm1(np.arange(pm.shape[0]) * np.log1p(-min(W[code], 1.0)))
                p_pns[code] = pc.sum()
                if p_pns[code] > 0:
                    m_cdf[code] = np.cumsum(pc) / p_pns[code]
                    m_cdf[code, -1] = 1.0
        p_ext = np.concatenate([p_any, ir_scale[np.arange(ncode) >> 2] * p_any, p_pns])
        return EveTables(p_any=p_ext, ir_scale=ir_scale, m_cdf=m_cdf, w_cum=w_cum,
                         pns_transmittance=t_e, pns_block_single=b)

    def _pns_parameters(self, mu: np.ndarray, W: np.ndarray,
                        p_any: np.ndarray) -> tuple[float, float]:
        """Eve's channel transmittance and single-photon block fraction.

        Unless configured, chosen so that Bob's mean signal gain (class 0, over
        Alice's four states) is the honest channel's: first her transmittance
        with every single photon blocked; if even a lossless channel gives too
        few clicks, she lets that fraction of single photons through.
        """
        codes = np.arange(4)
        target = float(p_any[codes].mean())

        def gain(t_e: float, b: float) -> float:
            pm = _pns_photons_at_bob(mu[0], t_e, b)
            m = np.arange(pm.shape[0])
            return float(np.mean([(pm * -np.expm1(m * np.log1p(-min(W[c], 1.0)))).sum()
                                  for c in codes]))

        def solve(f, lo=0.0, hi=1.0) -> float:
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                if f(mid) < target:
                    lo = mid
                else:
                    hi = mid
            return 0.5 * (lo + hi)

        t_e, b = self.eve_pns_transmittance, self.eve_pns_block_single
        if t_e is None and b is None:
            b = 1.0
            if gain(1.0, 1.0) >= target:
                t_e = solve(lambda t: gain(t, 1.0))
            else:
                t_e = 1.0
                b = 1.0 - solve(lambda f: gain(1.0, 1.0 - f))
        elif t_e is None:
            t_e = solve(lambda t: gain(t, b)) if gain(1.0, b) >= target else 1.0
        elif b is None:
            b = 1.0 - solve(lambda f: gain(t_e, 1.0 - f)) if gain(t_e, 0.0) >= target else 0.0
        return float(t_e), float(b)

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


def same_sequence(a: AliceSequence, b: AliceSequence) -> bool:
    """Whether two sequences give every pulse the same code (field by field)."""
    return (int(a.mode) == int(b.mode) and int(a.key) == int(b.key)
            and int(a.z_thr) == int(b.z_thr) and np.array_equal(a.cum_thr, b.cum_thr)
            and np.array_equal(a.pattern, b.pattern))


def sequence_problem(seq: object, n_intensities: int) -> str | None:
    """What makes ``seq`` unusable on a table of ``n_intensities`` classes, or None.

    The generator's kernels index per-state tables with the codes and take the
    pulse number modulo the pattern length without bounds checks, so a sequence
    is checked before it reaches them: ``mode`` 0 (stream) or 1 (pattern), ``key``
    a u64, ``z_thr`` in 0..2**31, ``cum_thr`` a 1-d uint64 array of
    ``n_intensities - 1`` ascending thresholds <= 2**32, ``pattern`` a non-empty
    1-d uint8 array of codes below ``4 * n_intensities``.
    """
    if not isinstance(seq, AliceSequence):
        return f"expected an AliceSequence, got {type(seq).__name__}"

    def integer(v: object) -> int | None:
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            return None
        return int(v)

    mode, key, z_thr = integer(seq.mode), integer(seq.key), integer(seq.z_thr)
    if mode not in (MODE_STREAM, MODE_PATTERN):
        return f"mode {seq.mode!r}: expected {MODE_STREAM} (stream) or {MODE_PATTERN} (pattern)"
    if key is None or not 0 <= key < 1 << 64:
        return "key: expected an unsigned 64-bit integer"
    if z_thr is None or not 0 <= z_thr <= 1 << 31:
        return f"z_thr {seq.z_thr!r}: expected an integer from 0 to 2**31"
    cum, pat = seq.cum_thr, seq.pattern
    if not isinstance(cum, np.ndarray) or cum.dtype != np.uint64 or cum.ndim != 1 \
            or cum.shape[0] != n_intensities - 1:
        got = f"{cum.dtype}{cum.shape}" if isinstance(cum, np.ndarray) else type(cum).__name__
        return (f"cum_thr: expected a uint64 array of shape ({n_intensities - 1},) for "
                f"{n_intensities} intensity classes, got {got}")
    if cum.size and (bool(np.any(cum[1:] < cum[:-1])) or int(cum.max()) > 1 << 32):
        return "cum_thr: thresholds must ascend and be at most 2**32"
    if not isinstance(pat, np.ndarray) or pat.dtype != np.uint8 or pat.ndim != 1 \
            or pat.shape[0] == 0:
        got = f"{pat.dtype}{pat.shape}" if isinstance(pat, np.ndarray) else type(pat).__name__
        return f"pattern: expected a non-empty 1-d uint8 array, got {got}"
    if int(pat.max()) >= 4 * n_intensities:
        return (f"pattern: code {int(pat.max())} is not a state of {n_intensities} intensity "
                f"classes (codes are below {4 * n_intensities})")
    return None


def _fiber_rotation(cfg: BenchConfig) -> np.ndarray | None:
    """The fiber's rotation from ``[sim]`` (None: the identity); checks the waveplate keys."""
    sim = cfg.sim
    n = len(sim.waveplate_retardances_deg)
    if n == 0:
        raise ConfigError(f"{cfg.path}: sim.waveplate_retardances_deg: give at least one "
                          "waveplate")
    if len(sim.waveplate_offsets_deg) != n:
        raise ConfigError(f"{cfg.path}: sim.waveplate_offsets_deg: has "
                          f"{len(sim.waveplate_offsets_deg)} entries but "
                          f"sim.waveplate_retardances_deg has {n}")
    angles, seed = sim.channel_rotation_deg, sim.polarization_seed
    if angles is not None and seed is not None:
        raise ConfigError(f"{cfg.path}: sim.polarization_seed: give sim.channel_rotation_deg "
                          "or sim.polarization_seed, not both")
    if angles is not None:
        if len(angles) != 3:
            raise ConfigError(f"{cfg.path}: sim.channel_rotation_deg: {list(angles)}: give "
                              "three Euler angles [a, b, c] in degrees")
        r = euler_rotation(*angles)
    elif seed is not None:
        r = random_rotation(seed)
    else:
        return None
    return None if np.array_equal(r, np.eye(3)) else r


def _pns_photons_at_bob(mu: float, t_e: float, block_single: float) -> np.ndarray:
    """Law of the number of photons reaching Bob's receiver under photon-number splitting.

    Alice's pulse has a Poisson photon number n of mean ``mu``. Eve blocks a
    single photon with probability ``block_single`` and otherwise forwards it;
    of n >= 2 photons she keeps one and forwards n - 1. Each forwarded photon
    survives her channel with probability ``t_e``.
    """
    nmax = PNS_MAX_PHOTONS
    n = np.arange(nmax + 1)
    pn = np.exp(-mu + n * math.log(mu) - np.array([math.lgamma(i + 1) for i in n])) \
        if mu > 0 else (n == 0).astype(float)
    fwd = np.zeros(nmax + 1)  # photons forwarded
    fwd[0] = pn[0] + pn[1] * block_single
    fwd[1] = pn[1] * (1 - block_single) + pn[2]
    fwd[2:nmax] = pn[3:]
    out = np.zeros(nmax + 1)  # binomial thinning by t_e
    for f in range(nmax + 1):
        if fwd[f] == 0:
            continue
        k = np.arange(f + 1)
        logc = np.array([math.lgamma(f + 1) - math.lgamma(i + 1) - math.lgamma(f - i + 1)
                         for i in k])
        with np.errstate(divide="ignore"):
            lp = logc + k * np.log(t_e) + (f - k) * np.log1p(-t_e) if 0 < t_e < 1 else None
        if lp is None:
            out[f if t_e >= 1 else 0] += fwd[f]
        else:
            out[:f + 1] += fwd[f] * np.exp(lp)
    return out
