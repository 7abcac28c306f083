"""The polarization model of the simulated bench against the Jones-matrix formula.

The fiber applies a unitary U (Euler angles or a seeded random draw), Bob's
compensation waveplates W(angles); a photon of Alice's state |s> reaches the
detector of outcome b of Bob's basis B with probability

    P = (1 - e) |<B_b| W U |s>|^2 + e (1 - |<B_b| W U |s>|^2)

(e: the table's effective misalignment). The expectations here are computed
with 2x2 Jones matrices built in this file, independently of the table's
Poincare-sphere rotations. Without a polarization transformation the bench must
simulate exactly what it did before the model existed: the scalar routes
1 - e, e and 1/2, bit for bit.

Detections are assigned to pulses from the known truth of the simulation (as in
test_sim_physics.py); statistical checks use 5 sigma bounds.
"""

from __future__ import annotations

import copy
import math
import tomllib
from contextlib import ExitStack

import numpy as np
import pytest
from scipy import optimize

from qkdctl.config import BenchConfig, default_bench_path, parse_bench
from qkdctl.drivers import DRIVERS, ROLES, build_mock_bench
from qkdctl.drivers.mock import MOCK_DRIVERS, MockPolarizationController
from qkdctl.errors import ConfigError, LimitError
from qkdctl.sequence import AliceSequence
from qkdctl.sim.engine import TagGenerator
from qkdctl.sim.table import OpticalTable, euler_rotation, random_rotation

NSIG = 5.0
SIM_PATH = default_bench_path()
RAW = tomllib.loads(SIM_PATH.read_text(encoding="utf-8"))
SEED = 20240612

# Pauli matrices of the S1 (H/V) and S2 (D/A) axes; Alice's and Bob's states
SIG1 = np.diag([1.0, -1.0]).astype(complex)
SIG2 = np.array([[0.0, 1.0], [1.0, 0.0]], complex)
STATES = {(0, 0): np.array([1.0, 0.0], complex), (0, 1): np.array([0.0, 1.0], complex),
          (1, 0): np.array([1.0, 1.0], complex) / math.sqrt(2),
          (1, 1): np.array([1.0, -1.0], complex) / math.sqrt(2)}


# --------------------------------------------------------------------------- helpers
def bench(sim: dict | None = None, polarization: dict | None = None, **det) -> BenchConfig:
    """configs/sim.toml with ``sim`` keys set, ``det`` on every simulated detector, and
    a mock polarization controller when ``polarization`` is given (its table)."""
    raw = copy.deepcopy(RAW)
    raw["sim"].update(sim or {})
    for d in raw["sim"]["detectors"]:
        d.update(det)
    if polarization is not None:
        raw["instruments"]["polarization"] = {"driver": "mock", **polarization}
    return parse_bench(raw, str(SIM_PATH))


def spin(n: np.ndarray, angle_deg: float) -> np.ndarray:
    """exp(-i angle/2 n.sigma) for a Pauli combination ``n``."""
    a = math.radians(angle_deg) / 2
    return math.cos(a) * np.eye(2) - 1j * math.sin(a) * n


def jones_retarder(axis_deg: float, retardance_deg: float) -> np.ndarray:
    t = math.radians(2 * axis_deg)
    return spin(math.cos(t) * SIG1 + math.sin(t) * SIG2, retardance_deg)


def jones_chain(angles, retardances=(90.0, 180.0, 90.0), offsets=(0.0, 0.0, 0.0)):
    """Jones matrix of the waveplates, the light passing the first one first."""
    m = np.eye(2, dtype=complex)
    for a, d, o in zip(angles, retardances, offsets, strict=True):
        m = jones_retarder(a + o, d) @ m
    return m


def jones_fiber(a: float, b: float, c: float) -> np.ndarray:
    return spin(SIG1, a) @ spin(SIG2, b) @ spin(SIG1, c)


def routes_formula(m: np.ndarray, e: float) -> np.ndarray:
    """P[a, x, B, b] from the Jones matrix ``m`` of W U and the misalignment e."""
    p = np.zeros((2, 2, 2, 2))
    for (a, x), s in STATES.items():
        for (bb, b), v in STATES.items():
            pu = abs(np.vdot(v, m @ s)) ** 2
            p[a, x, bb, b] = (1 - e) * pu + e * (1 - pu)
    return p


def mean_photons_formula(cfg: BenchConfig, routes: np.ndarray) -> np.ndarray:
    """m[code, j] = mu_k * channel * Bob * split * route * eta, in the table's order."""
    s, sim = cfg.source, cfg.sim
    trans = (10 ** (-sim.fiber_length_km * sim.fiber_attenuation_db_per_km / 10)
             * 10 ** (-sim.bob_insertion_loss_db / 10))
    pz = cfg.receiver.z_basis_probability
    eff = {d.channel: d.efficiency for d in sim.detectors}
    m = np.zeros((4 * len(s.mean_photon_numbers), 4))
    for code in range(m.shape[0]):
        x, a, k = code & 1, (code >> 1) & 1, code >> 2
        for j, d in enumerate(cfg.receiver.detectors):
            bb = 0 if d.basis == "Z" else 1
            split = pz if bb == 0 else 1 - pz
            m[code, j] = s.mean_photon_numbers[k] * trans * split * routes[a, x, bb, d.bit] \
                * eff[d.channel]
    return m


def simulate(table: OpticalTable, n_pulses: int, seed: int = SEED):
    gen = TagGenerator(table, seed)
    t1, c1 = gen.generate(n_pulses)
    t2, c2 = gen.finish()
    return np.concatenate([t1, t2]), np.concatenate([c1, c2])


def basis_qber(cfg: BenchConfig, t: np.ndarray, ch: np.ndarray, n_pulses: int,
               m: np.ndarray) -> list[tuple[int, int, float, float]]:
    """Per basis: observed basis-matched single clicks and errors, expected QBER and its
    binomial sigma per click, with detections assigned to pulses from the truth
    (no dead time, dark counts or afterpulses in these benches)."""
    p_tag = cfg.period_ps * (1.0 + cfg.sim.clock_drift_ppm * 1e-6)
    half = cfg.analysis.gate_width_ps / 2
    delay = {d.channel: d.delay_ps for d in cfg.sim.detectors}
    dets = cfg.receiver.detectors
    det_basis = np.array([0 if d.basis == "Z" else 1 for d in dets])
    det_bit = np.array([d.bit for d in dets])
    pulses, who = [], []
    for j, d in enumerate(dets):
        x = (t[ch == d.channel] - cfg.sim.clock_offset_ps - delay[d.channel]).astype(float)
        n = np.rint(x / p_tag).astype(np.int64)
        keep = (np.abs(x - n * p_tag) < half) & (n >= 1) & (n < n_pulses - 1)
        pulses.append(np.unique(n[keep]))
        who.append(np.full(pulses[-1].shape[0], j))
    n_all, j_all = np.concatenate(pulses), np.concatenate(who)
    uniq, first, mult = np.unique(n_all, return_index=True, return_counts=True)
    n1, j1 = uniq[mult == 1], j_all[first[mult == 1]]
    seq = AliceSequence.from_config(cfg.source, SEED)
    code = seq.codes(n1)
    basis, bit = (code >> 1) & 1, code & 1
    matched = det_basis[j1] == basis
    error = matched & (det_bit[j1] != bit)

    p = -np.expm1(-m)  # [code, detector]
    only = np.stack([p[:, j] * np.prod(np.delete(1 - p, j, axis=1), axis=1)
                     for j in range(4)], axis=1)
    codes = np.arange(m.shape[0])
    match = det_basis[None, :] == ((codes >> 1) & 1)[:, None]
    wrong = match & (det_bit[None, :] != (codes & 1)[:, None])
    n_code = np.bincount(seq.codes(np.arange(1, n_pulses - 1)), minlength=m.shape[0])
    out = []
    for b in (0, 1):
        sel = ((codes >> 1) & 1) == b
        e_match = float(np.sum(n_code[sel] * (only * match).sum(axis=1)[sel]))
        q = float(np.sum(n_code[sel] * (only * wrong).sum(axis=1)[sel])) / e_match
        m_obs = int(np.count_nonzero(matched & (basis == b)))
        e_obs = int(np.count_nonzero(error & (basis == b)))
        out.append((m_obs, e_obs, q, math.sqrt(q * (1 - q) / m_obs)))
    return out


QUIET = dict(dead_time_ns=0.0, afterpulse_probability=0.0, dark_count_rate_hz=0.0)


# ---------------------------------------------------------------- a. identity: old numbers
def test_identity_keeps_the_scalar_routes_bit_for_bit():
    """No fiber transformation, waveplates at 0: the routes are 1 - e, e and 1/2 and the
    mean photon numbers equal the scalar chain of the bench to the last bit."""
    cfg = bench()
    e = cfg.sim.misalignment
    scalar = np.zeros((2, 2, 2, 2))
    for a, x, bb, b in np.ndindex(2, 2, 2, 2):
        scalar[a, x, bb, b] = ((1 - e) if b == x else e) if bb == a else 0.5
    for c in (cfg, bench({"channel_rotation_deg": [0.0, 0.0, 0.0]}),
              bench(polarization={"settings": {"angles_deg": [0.0, 0.0, 0.0]}})):
        table = OpticalTable.from_config(c, SEED)
        assert table.fiber_rotation is None and table.polarization_rotation is None
        assert np.array_equal(table.route_probabilities(), scalar)
        assert np.array_equal(table.mean_photons_at_detectors(),
                              mean_photons_formula(c, scalar))
        w = table.photon_detection_probabilities()
        mu = np.repeat(np.array(c.source.mean_photon_numbers) * table.channel_transmittance,
                       4)
        np.testing.assert_allclose(w * mu[:, None], table.mean_photons_at_detectors(),
                                   rtol=1e-14)


def test_identity_reproduces_the_tags():
    """A zero rotation configured, or a mock controller at its neutral position, gives
    exactly the tags of the bench without them."""
    ref = simulate(OpticalTable.from_config(bench(), SEED), 3_000_000)
    zero = simulate(OpticalTable.from_config(bench({"channel_rotation_deg": [0, 0, 0]}),
                                             SEED), 3_000_000)
    assert all(np.array_equal(a, b) for a, b in zip(ref, zero, strict=True))

    def bench_tags(cfg):
        b = build_mock_bench(cfg, SEED)
        with ExitStack() as stack:
            for inst in b.values():
                stack.enter_context(inst)
            b["laser"].output_on()
            b["detectors"].bias_on()
            b["tagger"].start()
            ts, ch = b["tagger"].read_block(2e-3)
            t2, c2 = b["tagger"].finish()
        return np.concatenate([ts, t2]), np.concatenate([ch, c2])

    plain = bench_tags(bench())
    with_ctl = bench_tags(bench(polarization={"settings": {"angles_deg": [0.0, 0.0, 0.0]}}))
    assert plain[0].shape[0] > 10_000
    assert all(np.array_equal(a, b) for a, b in zip(plain, with_ctl, strict=True))


# ------------------------------------------------------------ b. the model, per state
@pytest.mark.parametrize("case", range(4))
def test_routes_match_the_jones_formula(case):
    rng = np.random.default_rng([SEED, case])
    euler = [float(v) for v in rng.uniform(-180, 180, 3)]
    rets = [90.0, 180.0, 90.0] if case < 2 else [float(v) for v in rng.uniform(60, 200, 3)]
    offs = [0.0, 0.0, 0.0] if case < 2 else [float(v) for v in rng.uniform(-10, 10, 3)]
    angles = tuple(float(v) for v in rng.uniform(0, 360, 3))
    cfg = bench({"channel_rotation_deg": euler, "waveplate_retardances_deg": rets,
                 "waveplate_offsets_deg": offs, "misalignment": 0.02})
    table = OpticalTable.from_config(cfg, SEED)
    table.set(waveplate_angles_deg=angles, polarization_rotation_rad=0.05 * case)
    e = table.effective_misalignment
    m = jones_chain(angles, rets, offs) @ jones_fiber(*euler)
    expected = routes_formula(m, e)
    np.testing.assert_allclose(table.route_probabilities(), expected, atol=1e-13)
    np.testing.assert_allclose(table.mean_photons_at_detectors(),
                               mean_photons_formula(cfg, expected), rtol=1e-12)
    # the eavesdropper's tables use the same per-state routes
    w = table.photon_detection_probabilities()
    mu = np.repeat(np.array(cfg.source.mean_photon_numbers) * table.channel_transmittance, 4)
    np.testing.assert_allclose(w * mu[:, None], table.mean_photons_at_detectors(), rtol=1e-13)


@pytest.mark.parametrize("case", range(3))
def test_simulated_qber_matches_the_formula(case):
    """QBER of each basis (basis-matched single clicks) for a random fiber and random
    waveplate angles: the simulation against the Jones formula, 5 sigma."""
    rng = np.random.default_rng([SEED, 100 + case])
    euler = [float(v) for v in rng.uniform(-180, 180, 3)]
    angles = tuple(float(v) for v in rng.uniform(0, 180, 3))
    cfg = bench({"channel_rotation_deg": euler, "jitter_clip_sigmas": 4.0}, **QUIET)
    table = OpticalTable.from_config(cfg, SEED)
    table.set(waveplate_angles_deg=angles)
    n_pulses = 20_000_000
    t, ch = simulate(table, n_pulses)
    m = mean_photons_formula(cfg, routes_formula(jones_chain(angles) @ jones_fiber(*euler),
                                                 cfg.sim.misalignment))
    bad = []
    for name, (m_obs, e_obs, q, sig) in zip("ZX", basis_qber(cfg, t, ch, n_pulses, m),
                                            strict=True):
        z = (e_obs / m_obs - q) / sig
        if abs(z) > NSIG:
            bad.append(f"{name}: QBER {e_obs / m_obs:.5f} vs {q:.5f} ({z:+.1f} sigma)")
    assert not bad, "; ".join(bad)


def _compensating_angles(euler) -> np.ndarray:
    """Waveplate angles with W U proportional to the identity (solved here with Jones
    matrices)."""
    u = jones_fiber(*euler)

    def f(t):
        return 1.0 - abs(np.trace(jones_chain(t) @ u)) ** 2 / 4.0

    rng = np.random.default_rng(1)
    best = None
    for s in rng.uniform(0, 180, (40, 3)):
        r = optimize.minimize(f, s, method="Nelder-Mead",
                              options={"xatol": 1e-10, "fatol": 1e-16, "maxiter": 4000})
        if best is None or r.fun < best.fun:
            best = r
        if best.fun < 1e-14:
            break
    assert best.fun < 1e-12
    return best.x


def test_compensation_restores_the_floor():
    """Waveplates that undo U bring the routes back to 1 - e, e, 1/2 and the QBER of
    both bases back to the misalignment floor; without them it is far above."""
    euler = [63.0, 121.0, -37.0]
    cfg = bench({"channel_rotation_deg": euler, "jitter_clip_sigmas": 4.0},
                polarization={}, **QUIET)
    angles = _compensating_angles(euler)
    b = build_mock_bench(cfg, SEED)
    ctl, table = b["polarization"], b["tagger"].table
    assert isinstance(ctl, MockPolarizationController)
    before = table.route_probabilities()
    with ctl:
        ctl.set_angles_deg([float(a) for a in angles])
    floor = OpticalTable.from_config(bench(**QUIET), SEED).route_probabilities()
    np.testing.assert_allclose(table.route_probabilities(), floor, atol=1e-9)
    assert np.abs(before - floor).max() > 0.1

    table.set(laser_on=True)
    for d in table.detectors:
        table.set_detector(d.channel, biased=True)
    n_pulses = 20_000_000
    t, ch = simulate(table, n_pulses)
    m = mean_photons_formula(cfg, floor)
    for name, (m_obs, e_obs, q, sig) in zip("ZX", basis_qber(cfg, t, ch, n_pulses, m),
                                            strict=True):
        assert q == pytest.approx(cfg.sim.misalignment, rel=0.02)  # single clicks
        assert abs(e_obs / m_obs - q) < NSIG * sig, (name, e_obs / m_obs, q, sig)


# ------------------------------------------------------------------ c. configuration
def test_random_fiber_from_the_seed():
    r1 = OpticalTable.from_config(bench({"polarization_seed": 7}), SEED).fiber_rotation
    r2 = OpticalTable.from_config(bench({"polarization_seed": 7}), 99).fiber_rotation
    r3 = OpticalTable.from_config(bench({"polarization_seed": 8}), SEED).fiber_rotation
    assert np.array_equal(r1, r2) and not np.allclose(r1, r3)
    np.testing.assert_allclose(r1 @ r1.T, np.eye(3), atol=1e-14)
    assert np.linalg.det(r1) == pytest.approx(1.0)
    # the draws cover the sphere: H goes anywhere, mean of its image near 0
    hs = np.array([random_rotation(s)[:, 0] for s in range(400)])
    assert np.abs(hs.mean(axis=0)).max() < 0.15
    # Euler angles: the rotation of the Jones matrix
    u = jones_fiber(30.0, 50.0, 70.0)
    r = euler_rotation(30.0, 50.0, 70.0)
    for (a, x), s in STATES.items():
        for (bb, b), v in STATES.items():
            sa = (1 if x == 0 else -1) * np.eye(3)[a]
            sb = (1 if b == 0 else -1) * np.eye(3)[bb]
            assert abs(np.vdot(v, u @ s)) ** 2 == pytest.approx((1 + sb @ r @ sa) / 2,
                                                                abs=1e-14)


@pytest.mark.parametrize("sim, match", [
    ({"channel_rotation_deg": [1.0, 2.0], "polarization_seed": None},
     "channel_rotation_deg.*three Euler angles"),
    ({"channel_rotation_deg": [1.0, 2.0, 3.0], "polarization_seed": 3}, "not both"),
    ({"waveplate_offsets_deg": [0.0, 0.0]}, "waveplate_offsets_deg: has 2 entries"),
    ({"waveplate_retardances_deg": []}, "at least one waveplate"),
])
def test_bad_polarization_keys(sim, match):
    sim = {k: v for k, v in sim.items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        OpticalTable.from_config(bench(sim), SEED)


def test_polarization_keys_are_range_checked():
    with pytest.raises(ConfigError, match="sim.channel_rotation_deg"):
        bench({"channel_rotation_deg": [1000.0, 0.0, 0.0]})
    with pytest.raises(ConfigError, match="sim.polarization_seed"):
        bench({"polarization_seed": -1})


# ------------------------------------------------------------ d. the mock controller
def test_mock_controller_registered():
    assert MOCK_DRIVERS["polarization"] is MockPolarizationController
    assert DRIVERS["mock"]["polarization"] is MockPolarizationController
    assert issubclass(MockPolarizationController, ROLES["polarization"])


def test_mock_controller_moves_the_waveplates():
    cfg = bench({"polarization_seed": 3}, polarization={
        "settings": {"angles_deg": [10.0, 20.0, 30.0]},
        "limits": {"min_angle_deg": -5.0, "max_angle_deg": 350.0}})
    b = build_mock_bench(cfg, SEED)
    ctl, table = b["polarization"], b["tagger"].table
    assert ctl.axes == 3 and table.waveplate_angles_deg == (0.0, 0.0, 0.0)
    with ctl:
        assert ctl.angles_deg() == [10.0, 20.0, 30.0]  # settings applied on connect
        assert table.waveplate_angles_deg == (10.0, 20.0, 30.0)
        v = table.version
        ctl.set_angle_deg(1, 20.0)  # no change, no new version: the run stays the same
        assert table.version == v
        ctl.set_angle_deg(1, 45.5)
        assert table.version == v + 1 and ctl.angle_deg(1) == 45.5
        with pytest.raises(LimitError, match="above the limit max_angle_deg"):
            ctl.set_angle_deg(0, 355.0)
        with pytest.raises(LimitError, match="no axis 3"):
            ctl.set_angle_deg(3, 1.0)
        assert ctl.status()["angles_deg"] == [10.0, 45.5, 30.0]
        ctl.home()
        assert ctl.angles_deg() == [0.0, 0.0, 0.0]
        ctl.set_angles_deg([1.0, 2.0, 3.0])
    # leaving (safe state: motion stopped) keeps the position
    assert table.waveplate_angles_deg == (1.0, 2.0, 3.0)


def test_mock_controller_axes_follow_the_table():
    cfg = bench({"waveplate_retardances_deg": [90.0, 90.0], "waveplate_offsets_deg": [0, 5]},
                polarization={})
    assert build_mock_bench(cfg, SEED)["polarization"].axes == 2
    bad = bench(polarization={"settings": {"angles_deg": [1.0, 2.0]}})
    with pytest.raises(ConfigError, match="instruments.polarization.settings.angles_deg"):
        build_mock_bench(bad, SEED)


def test_move_takes_effect_from_the_next_read():
    """Tags of a read before a move are those of a bench that never moved."""
    cfg = bench({"polarization_seed": 5}, polarization={})

    def run(move: bool):
        b = build_mock_bench(cfg, SEED)
        with ExitStack() as stack:
            for inst in b.values():
                stack.enter_context(inst)
            b["laser"].output_on()
            b["detectors"].bias_on()
            b["tagger"].start()
            first = b["tagger"].read_block(1e-3)
            if move:
                b["polarization"].set_angles_deg([30.0, 60.0, 90.0])
            second = b["tagger"].read_block(1e-3)
        return first, second, b["tagger"].table

    (f0, s0, _), (f1, s1, t1) = run(False), run(True)
    assert all(np.array_equal(a, b) for a, b in zip(f0, f1, strict=True))
    assert not np.array_equal(s0[0], s1[0])
    assert t1.waveplate_angles_deg == (30.0, 60.0, 90.0)


def test_table_rotation_of_a_configured_bench():
    cfg = bench({"channel_rotation_deg": [10.0, 20.0, 30.0]})
    t = OpticalTable.from_config(cfg, SEED)
    np.testing.assert_allclose(t.fiber_rotation, euler_rotation(10.0, 20.0, 30.0))
    t.set(waveplate_angles_deg=(5.0, 6.0, 7.0))
    assert t.polarization_rotation is not None
    assert cfg.sim.channel_rotation_deg == (10.0, 20.0, 30.0)
