"""The simulated bench against textbook formulas.

Every expectation here is computed from the bench parameters in this file,
independently of :mod:`qkdctl.sim.table` (``click_probabilities`` is not used as
a reference) and of any qkdctl sifting code. Detections are assigned to pulses
from the known truth of the simulation::

    n = round((t - clock_offset_ps - delay_ps) / P_tag),  P_tag = P (1 + drift_ppm 1e-6)

and Alice's state of pulse n is looked up with :class:`AliceSequence`.

Statistical checks use 5 sigma bounds; the sigma of each is given in its
assert message. The runs use fixed seeds, so a pass or a failure is
reproducible.
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from qkdctl.config import BenchConfig, default_bench_path, parse_bench
from qkdctl.sequence import AliceSequence
from qkdctl.sim.engine import TagGenerator
from qkdctl.sim.table import OpticalTable

NSIG = 5.0
SIM_PATH = default_bench_path()
RAW = tomllib.loads(SIM_PATH.read_text(encoding="utf-8"))
SEED = 20240611


# --------------------------------------------------------------------------- helpers
def bench(edit: Callable[[dict[str, Any]], None] | None = None, **det: Any) -> BenchConfig:
    """configs/sim.toml with ``edit`` applied to the parsed TOML and ``det`` set on
    every ``[[sim.detectors]]`` entry."""
    raw = copy.deepcopy(RAW)
    for d in raw["sim"]["detectors"]:
        d.update(det)
    if edit is not None:
        edit(raw)
    return parse_bench(raw, str(SIM_PATH))


def simulate(cfg: BenchConfig, n_pulses: int, seed: int = SEED, laser_on: bool = True,
             pieces: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All tags of a run of ``n_pulses`` pulses (generate + finish)."""
    table = OpticalTable.from_config(cfg, seed)
    if not laser_on:
        table.set(laser_on=False)
    gen = TagGenerator(table, seed)
    ts, cs = [], []
    for n in pieces if pieces is not None else [n_pulses]:
        t, c = gen.generate(n)
        ts.append(t)
        cs.append(c)
    t, c = gen.finish()
    ts.append(t)
    cs.append(c)
    return np.concatenate(ts), np.concatenate(cs)


def tag_period(cfg: BenchConfig) -> float:
    return cfg.period_ps * (1.0 + cfg.sim.clock_drift_ppm * 1e-6)


def channels(cfg: BenchConfig) -> list[int]:
    return [d.channel for d in cfg.receiver.detectors]


def sim_det(cfg: BenchConfig, channel: int):
    return next(d for d in cfg.sim.detectors if d.channel == channel)


def assign(cfg: BenchConfig, t: np.ndarray, ch: np.ndarray,
           channel: int) -> tuple[np.ndarray, np.ndarray]:
    """Pulse number and timing residual (ps) of every tag of ``channel``, from the truth."""
    x = (t[ch == channel] - cfg.sim.clock_offset_ps - sim_det(cfg, channel).delay_ps)
    x = x.astype(np.float64)
    p = tag_period(cfg)
    n = np.rint(x / p).astype(np.int64)
    return n, x - n * p


def gated_pulses(cfg: BenchConfig, t, ch, channel, lo: int, hi: int) -> np.ndarray:
    """Sorted unique pulses in [lo, hi) with a click of ``channel`` in the gate
    [-w/2, +w/2) around the expected arrival (half-open: exactly w ps of tagger bins)."""
    n, r = assign(cfg, t, ch, channel)
    half = cfg.analysis.gate_width_ps / 2
    keep = (r >= -half) & (r < half) & (n >= lo) & (n < hi)
    return np.unique(n[keep])


def code_counts(seq: AliceSequence, lo: int, hi: int, nstates: int) -> np.ndarray:
    """How many pulses in [lo, hi) carry each of Alice's codes."""
    counts = np.zeros(nstates, np.int64)
    step = 1 << 22
    for a in range(lo, hi, step):
        counts += np.bincount(seq.codes(np.arange(a, min(hi, a + step))), minlength=nstates)
    return counts


def mean_photons(cfg: BenchConfig) -> np.ndarray:
    """m[code, j]: mean photon number at receiver detector j for Alice's code.

    Textbook chain: mu_k * 10^(-(alpha L + loss_Bob)/10) * (p_Z or 1 - p_Z) *
    (1 - e, e, or 1/2) * eta_j.
    """
    s, sim = cfg.source, cfg.sim
    trans = 10 ** (-(sim.fiber_length_km * sim.fiber_attenuation_db_per_km
                     + sim.bob_insertion_loss_db) / 10)
    pz = cfg.receiver.z_basis_probability
    e = sim.misalignment
    nint = len(s.mean_photon_numbers)
    m = np.zeros((4 * nint, 4))
    for code in range(4 * nint):
        bit, basis, k = code & 1, (code >> 1) & 1, code >> 2
        for j, d in enumerate(cfg.receiver.detectors):
            dbasis = 0 if d.basis == "Z" else 1
            split = pz if dbasis == 0 else 1 - pz
            if dbasis == basis:
                route = 1 - e if d.bit == bit else e
            else:
                route = 0.5
            m[code, j] = (s.mean_photon_numbers[k] * trans * split * route
                          * sim_det(cfg, d.channel).efficiency)
    return m


def state_probabilities(cfg: BenchConfig) -> np.ndarray:
    """Probability of each of Alice's codes, from the [source] table."""
    s = cfg.source
    out = []
    for code in range(4 * len(s.mean_photon_numbers)):
        basis, k = (code >> 1) & 1, code >> 2
        pb = s.z_basis_probability if basis == 0 else 1 - s.z_basis_probability
        out.append(0.5 * pb * s.intensity_probabilities[k])
    return np.array(out)


def dark_in_gate(cfg: BenchConfig) -> np.ndarray:
    """Probability of at least one dark count of each receiver detector in a gate."""
    w_s = cfg.analysis.gate_width_ps * 1e-12
    return np.array([-math.expm1(-sim_det(cfg, c).dark_count_rate_hz * w_s)
                     for c in channels(cfg)])


def check(bad: list[str], name: str, obs: float, exp: float, sigma: float) -> None:
    z = (obs - exp) / sigma if sigma > 0 else (0.0 if obs == exp else math.inf)
    if abs(z) > NSIG:
        bad.append(f"{name}: observed {obs:.6g}, expected {exp:.6g}, sigma {sigma:.3g}, "
                   f"{z:+.1f} sigma (bound {NSIG:g} sigma)")


# ----------------------------------------------------------------- a. detection probability
N_DET = 100_000_000


@pytest.fixture(scope="module")
def detection_run():
    # no dead time and no afterpulses; dark counts large enough to show in the gate;
    # jitter cut at 4 sigma (120 ps) so every photon click lands in the +-150 ps gate
    def edit(raw):
        raw["sim"]["jitter_clip_sigmas"] = 4.0

    cfg = bench(edit, dead_time_ns=0.0, afterpulse_probability=0.0, dark_count_rate_hz=2e5)
    t, ch = simulate(cfg, N_DET)
    return cfg, t, ch


def test_detection_probability_per_intensity(detection_run):
    """P(any click in the gate | mu_k) = 1 - (1 - p_dark) exp(-eta mu_k),

    eta = channel * Bob * detector transmittance (equal efficiencies), p_dark =
    1 - prod_j exp(-r_j w) (Poisson; r_j w to first order), binomial sigma.
    """
    cfg, t, ch = detection_run
    seq = AliceSequence.from_config(cfg.source, SEED)
    nint = len(cfg.source.mean_photon_numbers)
    lo, hi = 1, N_DET - 1  # pulses whose whole gate lies inside the simulated time
    clicked = np.unique(np.concatenate(
        [gated_pulses(cfg, t, ch, c, lo, hi) for c in channels(cfg)]))
    obs = np.bincount(seq.codes(clicked) >> 2, minlength=nint)
    n_k = code_counts(seq, lo, hi, 4 * nint).reshape(nint, 4).sum(axis=1)

    sim = cfg.sim
    eta = (10 ** (-sim.fiber_length_km * sim.fiber_attenuation_db_per_km / 10)
           * 10 ** (-sim.bob_insertion_loss_db / 10) * sim.detectors[0].efficiency)
    p_dark = 1 - np.prod(1 - dark_in_gate(cfg))
    bad: list[str] = []
    for k, mu in enumerate(cfg.source.mean_photon_numbers):
        p = 1 - (1 - p_dark) * math.exp(-eta * mu)
        check(bad, f"P(click | {cfg.source.intensity_names[k]}, mu={mu:g})", obs[k],
              n_k[k] * p, math.sqrt(n_k[k] * p * (1 - p)))
    assert not bad, "binomial 5-sigma bound violated:\n" + "\n".join(bad)
    # the test can see the dark term: with p_dark = 0 the vacuum class would be off
    p0 = 1 - math.exp(-eta * cfg.source.mean_photon_numbers[-1])
    assert obs[-1] - n_k[-1] * p0 > NSIG * math.sqrt(n_k[-1] * p0 + 1), "dark term not visible"


def test_detection_probability_per_detector_and_state(detection_run):
    """P(detector j clicks | state) = 1 - exp(-r_j w) exp(-m_j(state)), each detector."""
    cfg, t, ch = detection_run
    seq = AliceSequence.from_config(cfg.source, SEED)
    nstates = 4 * len(cfg.source.mean_photon_numbers)
    lo, hi = 1, N_DET - 1
    n_s = code_counts(seq, lo, hi, nstates)
    m = mean_photons(cfg)
    dark = dark_in_gate(cfg)
    bad: list[str] = []
    for j, c in enumerate(channels(cfg)):
        obs = np.bincount(seq.codes(gated_pulses(cfg, t, ch, c, lo, hi)), minlength=nstates)
        for s in range(nstates):
            p = 1 - (1 - dark[j]) * math.exp(-m[s, j])
            check(bad, f"channel {c}, code {s}", obs[s], n_s[s] * p,
                  math.sqrt(n_s[s] * p * (1 - p)))
    assert not bad, "binomial 5-sigma bound violated:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- b. dead time
@pytest.mark.parametrize("dead_ns, slots", [(50.5, 50), (20.5, 20)])
def test_dead_time_count_rate(dead_ns, slots):
    """Non-paralysable dead time over i.i.d. pulses: rate per pulse = p / (1 + m p).

    A click blocks the next m pulse slots (tau = 50.5 ns at 1 GHz: m = 50; the
    0.5 ns margin is larger than the largest jitter difference, 2 * 8 * 30 ps).
    Counts form a renewal process with cycle m + Geometric(p): mean m + 1/p,
    variance (1 - p)/p^2, so Var N = n (1-p)/p^2 / (m + 1/p)^3 over n pulses.
    """
    def busy(raw):  # most of the light on detector 0, so that dead time matters
        raw["source"]["intensity_probabilities"] = [0.7, 0.2, 0.1]
        raw["receiver"]["z_basis_probability"] = 0.9

    cfg = bench(busy, dead_time_ns=dead_ns, afterpulse_probability=0.0, dark_count_rate_hz=0.0)
    n_pulses = 400_000_000
    t, ch = simulate(cfg, n_pulses)
    j = 0
    c = channels(cfg)[j]
    obs = int(np.count_nonzero(ch == c))
    p = float(np.sum(state_probabilities(cfg) * -np.expm1(-mean_photons(cfg)[:, j])))
    rate = p / (1 + slots * p)
    exp = n_pulses * rate
    sigma = math.sqrt(n_pulses * (1 - p) / p**2 / (slots + 1 / p) ** 3)
    assert 1 - rate / p > 0.10, f"dead-time correction only {1 - rate / p:.3f}; make it > 10 %"
    assert abs(obs - exp) <= NSIG * sigma, (
        f"channel {c}: {obs} counts, expected n p/(1+m p) = {exp:.1f} (p = {p:.5g}, m = {slots})"
        f", sigma {sigma:.1f}: {(obs - exp) / sigma:+.1f} sigma, bound {NSIG:g} sigma")
    assert abs(obs - n_pulses * p) > NSIG * sigma, "uncorrected rate not excluded"


# --------------------------------------------------------------------------- c. QBER
def test_qber_from_misalignment_and_dark_counts():
    """Error fraction of basis-matched single clicks, per intensity class.

    Each detector j receives an independent Poisson number of photons of mean
    m_j and dark counts of rate r_j, so it clicks in the gate with probability
    p_j = 1 - exp(-r_j w - m_j), independently of the others. A single click of
    detector j has probability p_j prod_{i != j} (1 - p_i). For a signal state
    this is close to the textbook QBER e_mis (1 - exp(-eta mu)) + p_dark/2 over
    the detection probability; the exact enumeration is used here.
    """
    def edit(raw):
        raw["sim"]["misalignment"] = 0.03
        raw["sim"]["jitter_clip_sigmas"] = 4.0

    cfg = bench(edit, dead_time_ns=0.0, afterpulse_probability=0.0, dark_count_rate_hz=5e5)
    n_pulses = 100_000_000
    t, ch = simulate(cfg, n_pulses)
    seq = AliceSequence.from_config(cfg.source, SEED)
    nint = len(cfg.source.mean_photon_numbers)
    nstates = 4 * nint
    lo, hi = 1, n_pulses - 1
    chans = channels(cfg)
    det_basis = np.array([0 if d.basis == "Z" else 1 for d in cfg.receiver.detectors])
    det_bit = np.array([d.bit for d in cfg.receiver.detectors])

    # observed: pulses with exactly one click (of all four detectors)
    per = [gated_pulses(cfg, t, ch, c, lo, hi) for c in chans]
    n_all = np.concatenate(per)
    j_all = np.concatenate([np.full(len(p), j) for j, p in enumerate(per)])
    pulses, first, mult = np.unique(n_all, return_index=True, return_counts=True)
    single = mult == 1
    n1, j1 = pulses[single], j_all[first[single]]
    code = seq.codes(n1)
    basis, bit, k = (code >> 1) & 1, code & 1, code >> 2
    matched = det_basis[j1] == basis
    error = matched & (det_bit[j1] != bit)

    def expected(dark):
        p = 1 - (1 - dark[None, :]) * np.exp(-mean_photons(cfg))   # [state, detector]
        only = np.empty_like(p)
        for j in range(4):
            only[:, j] = p[:, j] * np.prod(np.delete(1 - p, j, axis=1), axis=1)
        s = np.arange(nstates)
        s_basis, s_bit = (s >> 1) & 1, s & 1
        match = det_basis[None, :] == s_basis[:, None]
        wrong = match & (det_bit[None, :] != s_bit[:, None])
        return (only * match).sum(axis=1), (only * wrong).sum(axis=1)

    n_s = code_counts(seq, lo, hi, nstates)
    p_match, p_err = expected(dark_in_gate(cfg))
    _, p_err0 = expected(np.zeros(4))
    bad: list[str] = []
    for kk in range(nint):
        sel = slice(4 * kk, 4 * kk + 4)
        e_match = float(np.sum(n_s[sel] * p_match[sel]))
        q = float(np.sum(n_s[sel] * p_err[sel])) / e_match
        q0 = float(np.sum(n_s[sel] * p_err0[sel])) / e_match
        m_obs = int(np.count_nonzero(matched & (k == kk)))
        e_obs = int(np.count_nonzero(error & (k == kk)))
        name = cfg.source.intensity_names[kk]
        check(bad, f"{name}: basis-matched single clicks", m_obs, e_match, math.sqrt(e_match))
        sig = math.sqrt(m_obs * q * (1 - q))
        check(bad, f"{name}: errors among them (QBER {e_obs / m_obs:.5f} vs {q:.5f})",
              e_obs, m_obs * q, sig)
        if kk < nint - 1:  # the dark-count term is resolved for signal and decoy
            assert (q - q0) * m_obs > NSIG * sig, f"{name}: dark term not visible"
    assert not bad, "5-sigma bound violated:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- d. basis ratio
@pytest.mark.parametrize("bob_pz", [0.9, 0.5])
def test_basis_ratio(bob_pz):
    """Fraction of detections in the Z detectors = p_Z of the passive splitter.

    With equal efficiencies it is p_Z up to O(eta mu) from 1 - exp(-m) not being
    linear; the exact ratio sum_s N_s sum_{j in Z} p_j(s) / sum_s N_s sum_j p_j(s)
    is the reference, and it is checked to be within 1 % of p_Z.
    """
    def edit(raw):
        raw["receiver"]["z_basis_probability"] = bob_pz

    cfg = bench(edit, dead_time_ns=0.0, afterpulse_probability=0.0, dark_count_rate_hz=0.0)
    n_pulses = 20_000_000
    t, ch = simulate(cfg, n_pulses)
    seq = AliceSequence.from_config(cfg.source, SEED)
    n_s = code_counts(seq, 0, n_pulses, 4 * len(cfg.source.mean_photon_numbers))
    p = -np.expm1(-mean_photons(cfg))
    is_z = np.array([d.basis == "Z" for d in cfg.receiver.detectors])
    f_exp = float(np.sum(n_s[:, None] * p[:, is_z]) / np.sum(n_s[:, None] * p))
    assert abs(f_exp - bob_pz) < 0.01 * bob_pz
    z_ch = [c for c, z in zip(channels(cfg), is_z, strict=True) if z]
    n_z = int(np.count_nonzero(np.isin(ch, z_ch)))
    n_tot = int(np.count_nonzero(np.isin(ch, channels(cfg))))
    sigma = math.sqrt(f_exp * (1 - f_exp) / n_tot)
    f = n_z / n_tot
    assert abs(f - f_exp) <= NSIG * sigma, (
        f"Z fraction {f:.6f} of {n_tot} detections, expected {f_exp:.6f} (p_Z = {bob_pz}), "
        f"binomial sigma {sigma:.2g}: {(f - f_exp) / sigma:+.1f} sigma, bound {NSIG:g} sigma")


# ----------------------------------------------------------------- e. dark counts, afterpulses
@pytest.mark.parametrize("dead_ns", [0.0, 50.0])
def test_dark_count_rate_laser_off(dead_ns):
    """Laser off: each detector counts r / (1 + r tau) (Poisson behind a non-paralysable
    dead time tau), over the run time n P_tag. Poisson sigma (conservative: a dead time
    makes the counts sub-Poissonian)."""
    rate = 1e6
    cfg = bench(dead_time_ns=dead_ns, afterpulse_probability=0.0, dark_count_rate_hz=rate)
    n_pulses = 1_000_000_000
    t, ch = simulate(cfg, n_pulses, laser_on=False)
    duration_s = n_pulses * tag_period(cfg) * 1e-12
    exp = rate * duration_s / (1 + rate * dead_ns * 1e-9)
    bad: list[str] = []
    for c in channels(cfg):
        check(bad, f"channel {c} dark counts", int(np.count_nonzero(ch == c)), exp,
              math.sqrt(exp))
    assert not bad, f"Poisson 5-sigma bound violated (tau = {dead_ns} ns):\n" + "\n".join(bad)
    n_sync = np.count_nonzero(ch == cfg.receiver.sync_channel)
    assert n_sync == n_pulses // cfg.source.sync_period_pulses


def test_afterpulsing():
    """Afterpulse probability from the excess in the inter-arrival histogram.

    Laser off, dark counts of rate r, dead time tau, afterpulse probability p and
    time constant T (lambda = 1/T). Between two registered clicks of one detector
    x = dt - tau >= 0 has, independently for each interval, the density

        f(x) = (1 - p) r exp(-r x) + p (r + lambda) exp(-(r + lambda) x)

    (with probability p an afterpulse is pending at tau + Exp(T) and races the next
    dark count). Estimator: above X0 = 10 T only the first term is left
    (the second is down by exp(-10)); fit its rate r_hat from the mean of x - X0
    over the tail, extrapolate its total B = N_tail exp(r_hat X0) to all x, and

        p_hat = 1 - B / N      (N intervals; the excess over the dark-count law is p N)

    which counts every click that scheduled an afterpulse, including the few
    (fraction r / (r + lambda)) pre-empted by a dark count. The mean x of the
    excess estimates 1 / (r + lambda).
    """
    r, p_ap, t_ns, tau_ns = 5e3, 0.05, 200.0, 50.0

    def edit(raw):  # laser off: the pulse rate only sets the simulator's work, not the physics
        raw["source"]["rep_rate_hz"] = 1e8

    cfg = bench(edit, dead_time_ns=tau_ns, afterpulse_probability=p_ap,
                afterpulse_time_constant_ns=t_ns, dark_count_rate_hz=r)
    t, ch = simulate(cfg, 20_000_000_000, laser_on=False)   # 200 s of dark counts
    tau, T = tau_ns * 1e3, t_ns * 1e3          # ps
    x0 = 10 * T
    t_exp = 1 / (r * 1e-12 + 1 / T)
    bad: list[str] = []
    xs = []
    for c in channels(cfg):
        dt = np.diff(t[ch == c])
        assert dt.min() >= tau, f"channel {c}: two clicks {dt.min()} ps apart, dead time {tau}"
        xs.append((dt - tau).astype(np.float64))
    for name, x in [*zip(channels(cfg), xs, strict=True), ("all", np.concatenate(xs))]:
        est = _afterpulse_estimates(x, x0, T)
        check(bad, f"channel {name}: afterpulse fraction p_hat (N = {len(x)})", est["p"], p_ap,
              est["sigma_p"])
        check(bad, f"channel {name}: mean delay of the excess (ps)", est["t"], t_exp,
              est["sigma_t"])
        # the histogram shows the excess: first bin [0, T) against the dark-count law
        assert est["first_bin"] - est["background"] > NSIG * math.sqrt(est["background"]), (
            f"channel {name}: no afterpulse excess in the first bin")
    assert not bad, "5-sigma bound violated:\n" + "\n".join(bad)


def _afterpulse_estimates(x: np.ndarray, x0: float, T: float) -> dict[str, float]:
    """p_hat, mean delay of the excess and their delta-method sigmas (see test_afterpulsing)."""
    n = len(x)
    tail = x[x > x0] - x0
    n_tail = len(tail)
    r_hat = 1 / tail.mean()
    b = n_tail * math.exp(r_hat * x0)           # dark-count law's total, extrapolated
    q = n_tail / n
    var_p = math.exp(2 * r_hat * x0) * (q * (1 - q) / n + q**2 * x0**2 * r_hat**2 / n_tail)
    # mean delay of the excess: ratio estimator over x < X0 minus the dark-count law's share
    short = x[x < x0]
    c1 = -math.expm1(-r_hat * x0)                                   # bg fraction < X0
    c2 = (1 - math.exp(-r_hat * x0) * (1 + r_hat * x0)) / r_hat     # bg sum of x < X0
    num, den = short.sum() - b * c2, len(short) - b * c1
    t_hat = num / den
    var_s = np.sum(short**2) - short.sum() ** 2 / n
    var_n = len(short) - len(short) ** 2 / n
    cov = short.sum() - short.sum() * len(short) / n
    var_b = math.exp(2 * r_hat * x0) * n_tail + (b * x0) ** 2 * r_hat**2 / n_tail
    var_t = ((var_s - 2 * t_hat * cov + t_hat**2 * var_n) / den**2
             + ((t_hat * c1 - c2) / den) ** 2 * var_b)
    return {"p": 1 - b / n, "sigma_p": math.sqrt(var_p), "t": t_hat,
            "sigma_t": math.sqrt(var_t), "first_bin": float(np.count_nonzero(x < T)),
            "background": b * -math.expm1(-r_hat * T)}


# --------------------------------------------------------------------------- f. clock, timing
@pytest.mark.parametrize("drift_ppm", [50.0, -50.0])
def test_clock_drift_and_tagger_resolution(drift_ppm):
    """Sync period from a least-squares line through the sync tags = P (1 + drift),
    within 5 times the fit's standard error; all tags on the 4 ps grid; detector
    tags at offset + n P_tag + delay with mean -res/2 (truncation to the bin) and
    RMS sqrt(jitter^2 + res^2/12)."""
    res = 4

    def edit(raw):
        raw["sim"]["clock_drift_ppm"] = drift_ppm
        raw["sim"]["tagger_resolution_ps"] = res

    cfg = bench(edit, dark_count_rate_hz=0.0)
    n_pulses = 100_000_000
    t, ch = simulate(cfg, n_pulses)
    assert t.dtype == np.int64
    assert np.all(t % res == 0), "timestamps not on the tagger's 4 ps grid"
    assert np.all(np.diff(t) >= 0), "tags not sorted by time"

    s = cfg.source.sync_period_pulses
    ts = t[ch == cfg.receiver.sync_channel]
    assert len(ts) == n_pulses // s
    i = np.arange(len(ts), dtype=np.float64)
    y = (ts - ts[0]).astype(np.float64)
    xi = i - i.mean()
    sxx = np.sum(xi**2)
    slope = np.sum(xi * (y - y.mean())) / sxx
    resid = y - y.mean() - slope * xi
    s_res = math.sqrt(np.sum(resid**2) / (len(ts) - 2))
    sig_slope = s_res / math.sqrt(sxx)
    period = slope / s
    p_exp = cfg.period_ps * (1 + drift_ppm * 1e-6)
    assert abs(period - p_exp) <= NSIG * sig_slope / s, (
        f"sync period {period:.9f} ps, expected P (1 + drift) = {p_exp:.9f} ps, "
        f"fit sigma {sig_slope / s:.2g} ps: bound {NSIG:g} sigma")
    # the sync of pulse k S sits at offset + k S P_tag, truncated to the bin
    intercept = ts[0] + y.mean() - slope * i.mean()
    sig_int = s_res * math.sqrt(1 / len(ts) + i.mean() ** 2 / sxx)
    exp_int = cfg.sim.clock_offset_ps - res / 2
    assert abs(intercept - exp_int) <= NSIG * sig_int, (
        f"sync intercept {intercept:.3f}, expected {exp_int}, sigma {sig_int:.2g}: "
        f"bound {NSIG:g} sigma")
    sync_rms = math.sqrt(cfg.sim.sync_jitter_ps**2 + res**2 / 12)
    assert abs(s_res - sync_rms) <= NSIG * sync_rms / math.sqrt(2 * len(ts)), (
        f"sync residual RMS {s_res:.3f} ps, expected {sync_rms:.3f} ps")

    bad: list[str] = []
    for c in channels(cfg):
        _, r = assign(cfg, t, ch, c)
        jit = sim_det(cfg, c).jitter_ps
        sd = math.sqrt(jit**2 + res**2 / 12)
        assert np.all(np.abs(r) <= cfg.sim.jitter_clip_sigmas * jit + res), f"channel {c}"
        check(bad, f"channel {c} mean timing residual (ps)", r.mean(), -res / 2,
              sd / math.sqrt(len(r)))
        check(bad, f"channel {c} timing RMS (ps)", r.std(ddof=1), sd,
              sd / math.sqrt(2 * (len(r) - 1)))
    assert not bad, "5-sigma bound violated:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- g. reproducibility
def _repro_bench() -> BenchConfig:
    # everything that carries state across chunks: dead time, afterpulses, dark counts
    return bench(afterpulse_probability=0.05, afterpulse_time_constant_ns=200.0,
                 dark_count_rate_hz=2e5, dead_time_ns=50.0)


N_REPRO = 20_000_000


@pytest.fixture(scope="module")
def repro_reference():
    return simulate(_repro_bench(), N_REPRO)


def test_same_seed_same_tags(repro_reference):
    t, c = simulate(_repro_bench(), N_REPRO)
    np.testing.assert_array_equal(t, repro_reference[0])
    np.testing.assert_array_equal(c, repro_reference[1])
    assert t.dtype == np.int64 and c.dtype == np.uint8


def test_different_seed_different_tags(repro_reference):
    t, c = simulate(_repro_bench(), N_REPRO, seed=SEED + 1)
    n = min(len(t), len(repro_reference[0]))
    assert not np.array_equal(t[:n], repro_reference[0][:n])
    # both are proper samples: same detection count within a few percent
    assert abs(len(t) - len(repro_reference[0])) < 0.05 * len(t)


@pytest.mark.parametrize("pieces", [
    [1, 65535, 65536, 65537, 3, 100_003, 999_999],
    [131_071, 7, 500_000, 12_345, 1_000_001],
    [65536] * 20,
])
def test_chunking_does_not_change_tags(repro_reference, pieces):
    pieces = pieces + [N_REPRO - sum(pieces)]
    assert pieces[-1] > 0
    t, c = simulate(_repro_bench(), N_REPRO, pieces=pieces)
    assert len(t) == len(repro_reference[0])
    np.testing.assert_array_equal(t, repro_reference[0])
    np.testing.assert_array_equal(c, repro_reference[1])


def test_generate_zero_pulses(repro_reference):
    pieces = [1000, 0, N_REPRO - 1000]
    t, c = simulate(_repro_bench(), N_REPRO, pieces=pieces)
    np.testing.assert_array_equal(t, repro_reference[0])
    np.testing.assert_array_equal(c, repro_reference[1])
