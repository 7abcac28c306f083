"""The simulated eavesdropper against textbook formulas.

Expectations are computed here from the bench parameters, independently of
:mod:`qkdctl.sim.table`. Detections are assigned to pulses from the known truth
of the simulation (no dead time, no dark counts, jitter well inside the gate),
and Alice's state of each pulse is looked up with :class:`AliceSequence`.
Statistical checks use 5 sigma bounds.
"""

from __future__ import annotations

import copy
import math
import tomllib

import numpy as np
import pytest

from qkdctl.config import BenchConfig, default_bench_path, parse_bench
from qkdctl.errors import ConfigError
from qkdctl.sequence import AliceSequence
from qkdctl.sim.engine import TagGenerator
from qkdctl.sim.table import OpticalTable

RAW = tomllib.loads(default_bench_path().read_text(encoding="utf-8"))
SEED = 77
N_PULSES = 20_000_000
NSIG = 5.0


def bench(attack: str = "none", fraction: float = 1.0, **eve) -> BenchConfig:
    raw = copy.deepcopy(RAW)
    raw["sim"]["jitter_clip_sigmas"] = 4.0
    for d in raw["sim"]["detectors"]:
        d.update(dead_time_ns=0.0, dark_count_rate_hz=0.0, afterpulse_probability=0.0)
    raw["sim"]["eavesdropper"] = {"attack": attack, "fraction": fraction, **eve}
    return parse_bench(raw, "eve.toml")


def simulate(cfg: BenchConfig, n: int = N_PULSES, pieces=None):
    table = OpticalTable.from_config(cfg, SEED)
    gen = TagGenerator(table, SEED)
    parts = [gen.generate(p) for p in (pieces or [n])] + [gen.finish()]
    return gen, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def clicks(cfg: BenchConfig, t, ch):
    """(pulse, detector index) of every detector tag, from the truth."""
    p = cfg.period_ps * (1.0 + cfg.sim.clock_drift_ppm * 1e-6)
    delay = {d.channel: d.delay_ps for d in cfg.sim.detectors}
    out_n, out_j = [], []
    for j, d in enumerate(cfg.receiver.detectors):
        x = (t[ch == d.channel] - cfg.sim.clock_offset_ps - delay[d.channel]).astype(float)
        out_n.append(np.rint(x / p).astype(np.int64))
        out_j.append(np.full(out_n[-1].shape, j))
    return np.concatenate(out_n), np.concatenate(out_j)


def photon_detection(cfg: BenchConfig) -> np.ndarray:
    """w[state, j]: probability that a photon entering Bob's receiver in state
    (basis, bit) = divmod(state, 2) reversed (state = bit | basis << 1) is detected by j."""
    sim = cfg.sim
    t_bob = 10 ** (-sim.bob_insertion_loss_db / 10)
    pz = cfg.receiver.z_basis_probability
    e = sim.misalignment
    eff = {d.channel: d.efficiency for d in sim.detectors}
    w = np.zeros((4, 4))
    for s in range(4):
        bit, basis = s & 1, s >> 1
        for j, d in enumerate(cfg.receiver.detectors):
            db = 0 if d.basis == "Z" else 1
            route = (1 - e if d.bit == bit else e) if db == basis else 0.5
            w[s, j] = t_bob * (pz if db == 0 else 1 - pz) * route * eff[d.channel]
    return w


def channel_t(cfg: BenchConfig) -> float:
    return 10 ** (-cfg.sim.fiber_length_km * cfg.sim.fiber_attenuation_db_per_km / 10)


def observed_gains(cfg, t, ch, n):
    pulses, _ = clicks(cfg, t, ch)
    det = np.unique(pulses[(pulses >= 0) & (pulses < n)])
    seq = AliceSequence.from_config(cfg.source, SEED)
    k_det = np.bincount(seq.codes(det) >> 2, minlength=3)
    probs = np.array(seq.effective_intensity_probabilities)
    return k_det / (probs * n), k_det


def check(bad, name, obs, exp, n_det):
    sigma = exp / math.sqrt(max(n_det, 1))
    z = (obs - exp) / sigma
    if abs(z) > NSIG:
        bad.append(f"{name}: observed {obs:.6g}, expected {exp:.6g} ({z:+.1f} sigma)")


def honest_gain(cfg, k):
    """Mean over Alice's four states of 1 - prod_j exp(-mu_k T w_j)."""
    mu = cfg.source.mean_photon_numbers[k] * channel_t(cfg)
    w = photon_detection(cfg)
    return float(np.mean([1 - math.exp(-mu * w[s].sum()) for s in range(4)]))


def state_weights(cfg):
    pz = cfg.source.z_basis_probability
    return np.array([0.5 * pz, 0.5 * pz, 0.5 * (1 - pz), 0.5 * (1 - pz)])


# ----------------------------------------------------------------- intercept-resend
@pytest.fixture(scope="module")
def ir_run():
    cfg = bench("intercept-resend", 1.0)
    return (cfg, *simulate(cfg))


def test_intercept_resend_gains(ir_run):
    """Q_k = (1 - e^-mu_k) * E_Eve[1 - exp(-mu_k T W(Eve's state))]; Eve's basis is
    uniform, her bit Alice's in the right basis and uniform in the other."""
    cfg, _, t, ch = ir_run
    gains, k_det = observed_gains(cfg, t, ch, N_PULSES)
    w = photon_detection(cfg).sum(axis=1)
    ws = state_weights(cfg)
    bad = []
    for k, mu0 in enumerate(cfg.source.mean_photon_numbers):
        mu = mu0 * channel_t(cfg)

        def p(s, mu=mu):
            return 1 - math.exp(-mu * w[s])

        exp = 0.0
        for s in range(4):
            basis = s >> 1
            other = [(1 - basis) << 1, ((1 - basis) << 1) | 1]
            eve = 0.5 * p(s) + 0.25 * p(other[0]) + 0.25 * p(other[1])
            exp += ws[s] * eve
        exp *= -math.expm1(-mu0)
        check(bad, f"gain of class {k}", gains[k], exp, k_det[k])
    assert not bad, "\n".join(bad)


def test_intercept_resend_qber_quarter(ir_run):
    """Sifted single clicks: error 1/2 when Eve chose the other basis, else the
    misalignment e: QBER = (1/2 + e) / 2 in both bases."""
    cfg, _, t, ch = ir_run
    pulses, j = clicks(cfg, t, ch)
    order = np.argsort(pulses, kind="stable")
    pulses, j = pulses[order], j[order]
    single = np.ones(len(pulses), bool)
    dup = pulses[1:] == pulses[:-1]
    single[1:] &= ~dup
    single[:-1] &= ~dup
    pulses, j = pulses[single], j[single]
    seq = AliceSequence.from_config(cfg.source, SEED)
    codes = seq.codes(pulses)
    dets = cfg.receiver.detectors
    bob_basis = np.array([0 if d.basis == "Z" else 1 for d in dets])[j]
    bob_bit = np.array([d.bit for d in dets])[j]
    alice_basis, alice_bit = (codes >> 1) & 1, codes & 1
    e = cfg.sim.misalignment
    for b in (0, 1):
        s = alice_basis == bob_basis
        s &= bob_basis == b
        n = int(s.sum())
        q = float((bob_bit[s] != alice_bit[s]).mean())
        exp = 0.5 * (0.5 + e)
        assert abs(q - exp) < NSIG * math.sqrt(exp * (1 - exp) / n), (b, q, exp, n)


def test_partial_intercept_resend_qber():
    """A fraction f of pulses attacked: QBER = (1 - f) e + f (1/2 + e) / 2, to first
    order (the attacked pulses are detected less often: weight by their gains)."""
    f = 0.3
    cfg = bench("intercept-resend", f)
    _, t, ch = simulate(cfg, 10_000_000)
    pulses, j = clicks(cfg, t, ch)
    u, cnt = np.unique(pulses, return_counts=True)
    single = np.isin(pulses, u[cnt == 1])
    pulses, j = pulses[single], j[single]
    seq = AliceSequence.from_config(cfg.source, SEED)
    codes = seq.codes(pulses)
    dets = cfg.receiver.detectors
    bob_basis = np.array([0 if d.basis == "Z" else 1 for d in dets])[j]
    bob_bit = np.array([d.bit for d in dets])[j]
    s = (((codes >> 1) & 1) == bob_basis) & (bob_basis == 0) & ((codes >> 2) == 0)
    q = float((bob_bit[s] != (codes[s] & 1)).mean())
    e = cfg.sim.misalignment
    mu0 = cfg.source.mean_photon_numbers[0]
    # signal class: attacked pulses are detected with relative weight (1 - e^-mu)
    a = f * -math.expm1(-mu0)
    wa = a / (a + (1 - f))
    exp = (1 - wa) * e + wa * 0.5 * (0.5 + e)
    n = int(s.sum())
    assert abs(q - exp) < NSIG * math.sqrt(exp * (1 - exp) / n) + 2e-3, (q, exp, n)


# ----------------------------------------------------------------- photon-number splitting
@pytest.fixture(scope="module")
def pns_run():
    cfg = bench("pns", 1.0)
    return (cfg, *simulate(cfg))


def pns_gain(mu: float, w: float, t_e: float, b: float) -> float:
    """Sum_n P(n) E[1 - (1 - W)^m]: n - 1 photons forwarded for n >= 2, a single
    photon with probability 1 - b, each surviving Eve's channel with t_e."""
    q = 0.0
    for n in range(1, 80):
        pn = math.exp(-mu + n * math.log(mu) - math.lgamma(n + 1))
        if n == 1:
            q += pn * (1 - b) * t_e * w
        else:
            q += pn * (1 - (1 - t_e * w) ** (n - 1))
    return q


def test_pns_keeps_signal_gain_and_collapses_decoys(pns_run):
    cfg, gen, t, ch = pns_run
    t_e, b = gen.eve.pns_transmittance, gen.eve.pns_block_single
    assert 0 < t_e <= 1 and 0 <= b <= 1
    gains, k_det = observed_gains(cfg, t, ch, N_PULSES)
    w = photon_detection(cfg).sum(axis=1)
    ws = state_weights(cfg)
    bad = []
    for k, mu in enumerate(cfg.source.mean_photon_numbers):
        exp = sum(ws[s] * pns_gain(mu, w[s], t_e, b) for s in range(4))
        check(bad, f"gain of class {k}", gains[k], exp, k_det[k])
    # Eve's choice reproduces the honest signal gain (to 1 %), and starves the decoy
    assert abs(gains[0] / honest_gain(cfg, 0) - 1) < 0.01, (gains[0], honest_gain(cfg, 0))
    assert gains[1] < 0.4 * honest_gain(cfg, 1)
    assert not bad, "\n".join(bad)


def test_pns_given_transmittance():
    cfg = bench("pns", 1.0, pns_channel_transmittance=0.5, pns_single_photon_block_fraction=0.25)
    table = OpticalTable.from_config(cfg, SEED)
    gen = TagGenerator(table, SEED)
    assert gen.eve.pns_transmittance == 0.5 and gen.eve.pns_block_single == 0.25
    # the table's click law agrees with the closed form
    w = photon_detection(cfg).sum(axis=1)
    for code in range(12):
        mu = cfg.source.mean_photon_numbers[code >> 2]
        assert gen.eve.p_any[24 + code] == pytest.approx(pns_gain(mu, w[code & 3], 0.5, 0.25),
                                                         rel=1e-9)


# ----------------------------------------------------------------- determinism, config
def test_eavesdropper_chunking_does_not_change_tags():
    for attack in ("intercept-resend", "pns"):
        cfg = bench(attack, 0.5)
        _, t1, c1 = simulate(cfg, 3_000_000)
        _, t2, c2 = simulate(cfg, 3_000_000, pieces=[1, 65_535, 1_000_003, 1_934_461])
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(c1, c2)


def test_no_attack_is_the_honest_channel():
    _, t0, c0 = simulate(bench("none"), 2_000_000)
    _, t1, c1 = simulate(bench("intercept-resend", 0.0), 2_000_000)
    np.testing.assert_array_equal(t0, t1)
    np.testing.assert_array_equal(c0, c1)


def test_bad_eavesdropper_config():
    raw = copy.deepcopy(RAW)
    raw["sim"]["eavesdropper"] = {"attack": "beam-splitting"}
    with pytest.raises(ConfigError, match="sim.eavesdropper.attack"):
        parse_bench(raw, "eve.toml")
    raw["sim"]["eavesdropper"] = {"attack": "pns", "fraction": 1.5}
    with pytest.raises(ConfigError, match="sim.eavesdropper.fraction"):
        parse_bench(raw, "eve.toml")
