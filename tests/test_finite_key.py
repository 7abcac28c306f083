"""Finite-key length from observed decoy counts (qkdctl.postprocess.finite_key).

The bounds are checked against quantities computed here independently of the
library: expected counts of the channel model of Lim et al. 2014 (Sec. IV),
decomposed by photon number, give the true vacuum and single-photon counts and
the true single-photon error rate, which the decoy bounds must bracket; with
the vacuum intensity at 0 and huge blocks the two-decoy bounds must converge
to the asymptotic vacuum + weak decoy bounds of Ma et al. 2005; the GLLP rate
of Ma et al. must reach about 140 km with their GYS parameters. Attack
signatures (collapsed decoy gains, 25 % QBER) must abort with the right reason.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qkdctl.errors import QkdctlError
from qkdctl.postprocess.finite_key import (
    DecoyStatistics,
    FiniteKeyError,
    asymptotic_gllp,
    binary_entropy,
    gllp_bounds,
    key_length,
    lim2014_key_length,
    plob_bound,
    rusca2018_key_length,
)

# Lim et al. 2014, Sec. IV
ETA_BOB, P_DC, P_AP, E_MIS, F_EC = 0.10, 6e-7, 4e-2, 5e-3, 1.16


def h(x: float) -> float:
    return 0.0 if x in (0.0, 1.0) else -x * math.log2(x) - (1 - x) * math.log2(1 - x)


def model_counts(mus, ps, q, n_pulses, distance_km, *, eta_bob=ETA_BOB, p_dc=P_DC,
                 p_ap=P_AP, e_mis=E_MIS):
    """Expected counts of Lim et al.'s model (active basis choice q for Z on both sides).

    Returns (stats, truth) where truth holds the photon-number decomposition.
    """
    mus, ps = np.asarray(mus, float), np.asarray(ps, float)
    eta = eta_bob * 10 ** (-0.2 * distance_km / 10)
    d = 1 - (1 - 2 * p_dc) * np.exp(-eta * mus)
    r = d * (1 + p_ap)
    e = p_dc + e_mis * (1 - np.exp(-eta * mus)) + p_ap * d / 2
    key, test = q * q, (1 - q) ** 2
    stats = DecoyStatistics(tuple(mus), tuple(ps), tuple(n_pulses * ps * key * r),
                            tuple(n_pulses * ps * key * e), tuple(n_pulses * ps * test * r),
                            tuple(n_pulses * ps * test * e))

    def tau(n):
        return float(np.sum(ps * np.exp(-mus) * mus**n) / math.factorial(n))

    def y(n):  # detection and error probability of an n-photon pulse
        dn = 1 - (1 - 2 * p_dc) * (1 - eta) ** n
        return dn * (1 + p_ap), p_dc + e_mis * (1 - (1 - eta) ** n) + p_ap * dn / 2

    y0, _ = y(0)
    y1, ey1 = y(1)
    truth = {"s0_key": n_pulses * key * tau(0) * y0, "s1_key": n_pulses * key * tau(1) * y1,
             "s1_test": n_pulses * test * tau(1) * y1,
             "v1_test": n_pulses * test * tau(1) * ey1, "e1": ey1 / y1}
    return stats, truth


def leak(stats: DecoyStatistics) -> float:
    return F_EC * h(stats.m_key_total / stats.n_key_total) * stats.n_key_total


def rounded(stats: DecoyStatistics, **changes) -> DecoyStatistics:
    d = {k: tuple(int(round(x)) for x in getattr(stats, k))
         for k in ("n_key", "m_key", "n_test", "m_test")}
    d.update(changes)
    return DecoyStatistics(stats.intensities, stats.probabilities, **d)


LIM_MUS, LIM_PS, LIM_Q = (0.45, 0.2, 2e-4), (0.6, 0.25, 0.15), 0.85
RUSCA_MUS, RUSCA_PS, RUSCA_Q = (0.45, 0.15), (0.7, 0.3), 0.85


# --------------------------------------------------------------------------- helpers
def test_binary_entropy():
    assert binary_entropy(0.0) == 0.0 and binary_entropy(1.0) == 0.0
    assert binary_entropy(0.5) == pytest.approx(1.0)
    assert binary_entropy(0.11) == pytest.approx(0.4999, abs=1e-3)
    x = np.array([[0.0, 0.01, 0.3], [0.7, 0.99, 1.0]])
    out = binary_entropy(x)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, [[0, h(0.01), h(0.3)], [h(0.7), h(0.99), 0]])
    np.testing.assert_allclose(out[0], out[1][::-1])  # h(x) = h(1 - x)
    assert math.isnan(binary_entropy(1.5))


def test_plob_bound_values():
    assert plob_bound(0.5) == pytest.approx(1.0)
    assert plob_bound(0.0) == 0.0
    assert plob_bound(1.0) == math.inf
    # 100 km of 0.2 dB/km fiber: eta = 0.01, -log2(0.99)
    assert plob_bound(0.01) == pytest.approx(0.0144996, rel=1e-5)
    eta = np.array([1e-3, 1e-6])
    np.testing.assert_allclose(plob_bound(eta), eta / math.log(2), rtol=1e-3)  # ~1.44 eta
    with pytest.raises(FiniteKeyError):
        plob_bound(1.2)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, text", [
    ({"probabilities": (0.6, 0.4)}, "has 2 entries but intensities has 3"),
    ({"intensities": (0.1, 0.5, 0.0)}, "strictly decreasing"),
    ({"probabilities": (0.5, 0.4, 0.2)}, "sums to"),
    ({"m_key": (10, 2000, 0)}, "exceed"),
    ({"n_test": (10, -1, 0)}, ">= 0"),
    ({"n_key": (1.0, float("nan"), 2.0)}, "finite"),
])
def test_statistics_validation(kwargs, text):
    base = {"intensities": (0.5, 0.1, 0.0), "probabilities": (0.6, 0.3, 0.1),
            "n_key": (1000, 100, 5), "m_key": (10, 2, 2), "n_test": (100, 10, 1),
            "m_test": (1, 1, 0)}
    base.update(kwargs)
    with pytest.raises(FiniteKeyError, match=text) as ei:
        DecoyStatistics(**base)
    assert isinstance(ei.value, QkdctlError) and isinstance(ei.value, ValueError)


def test_intensity_conditions_and_dispatch():
    stats, _ = model_counts(LIM_MUS, LIM_PS, LIM_Q, 1e10, 50)
    bad = DecoyStatistics((0.3, 0.2, 0.15), LIM_PS, stats.n_key, stats.m_key, stats.n_test,
                          stats.m_test)
    with pytest.raises(FiniteKeyError, match="mu1 > mu2 \\+ mu3"):
        lim2014_key_length(bad, 0.0)
    two, _ = model_counts(RUSCA_MUS, RUSCA_PS, RUSCA_Q, 1e10, 50)
    with pytest.raises(FiniteKeyError, match="exactly three"):
        lim2014_key_length(two, 0.0)
    with pytest.raises(FiniteKeyError, match="exactly two"):
        rusca2018_key_length(stats, 0.0)
    with pytest.raises(FiniteKeyError, match="not allowed"):
        key_length("bb84", stats, 0.0)
    with pytest.raises(FiniteKeyError, match="uses 2 intensity classes"):
        key_length("bb84-one-decoy", stats, 0.0)
    with pytest.raises(FiniteKeyError, match="eps_sec"):
        lim2014_key_length(stats, 0.0, eps_sec=0.0)
    with pytest.raises(FiniteKeyError, match="leak_ec_bits"):
        lim2014_key_length(stats, -1.0)
    assert key_length("bb84-decoy", stats, leak(stats)) == lim2014_key_length(stats, leak(stats))
    assert (key_length("bb84-one-decoy", two, leak(two))
            == rusca2018_key_length(two, leak(two)))


# --------------------------------------------------------------------------- bounds are bounds
@pytest.mark.parametrize("fn, mus, ps, q", [
    (lim2014_key_length, LIM_MUS, LIM_PS, LIM_Q),
    (rusca2018_key_length, RUSCA_MUS, RUSCA_PS, RUSCA_Q),
])
@pytest.mark.parametrize("distance_km", [0.0, 60.0, 120.0])
@pytest.mark.parametrize("n_pulses", [1e9, 1e12])
def test_bounds_bracket_the_true_photon_number_counts(fn, mus, ps, q, distance_km, n_pulses):
    stats, truth = model_counts(mus, ps, q, n_pulses, distance_km)
    res = fn(stats, leak(stats))
    assert 0.0 <= res.s0_lower <= truth["s0_key"]
    assert res.s1_lower <= truth["s1_key"]
    assert res.s1_test_lower <= truth["s1_test"]
    assert res.v1_test_upper >= truth["v1_test"]
    if not res.aborted:
        assert res.s1_lower > 0.5 * truth["s1_key"]  # and they are not absurdly loose
        assert res.phase_error_bound >= truth["e1"]
        assert res.secret_bits <= truth["s0_key"] + truth["s1_key"] * (1 - h(truth["e1"]))


def test_key_length_formula_is_assembled_as_published():
    stats, _ = model_counts(LIM_MUS, LIM_PS, LIM_Q, 1e11, 50)
    lk = leak(stats)
    r = lim2014_key_length(stats, lk, eps_sec=1e-10, eps_cor=1e-15)
    assert not r.aborted and r.abort_reason is None
    expect = (r.s0_lower + r.s1_lower - r.s1_lower * h(r.phase_error_bound) - lk
              - 6 * math.log2(21 / 1e-10) - math.log2(2 / 1e-15))
    assert r.length_bound == pytest.approx(expect, rel=1e-12)
    assert r.secret_bits == math.floor(expect) and isinstance(r.secret_bits, int)
    # every disclosed bit costs one secret bit
    assert lim2014_key_length(stats, lk + 1000, eps_sec=1e-10).secret_bits == pytest.approx(
        r.secret_bits - 1000, abs=1)
    # a stricter secrecy parameter costs key
    assert lim2014_key_length(stats, lk, eps_sec=1e-20).secret_bits < r.secret_bits

    two, _ = model_counts(RUSCA_MUS, RUSCA_PS, RUSCA_Q, 1e11, 50)
    r2 = rusca2018_key_length(two, leak(two), eps_sec=1e-9)
    expect2 = (r2.s0_lower + r2.s1_lower * (1 - h(r2.phase_error_bound)) - leak(two)
               - 6 * math.log2(19 / 1e-9) - math.log2(2 / 1e-15))
    assert r2.length_bound == pytest.approx(expect2, rel=1e-12)


def test_two_decoy_bounds_converge_to_the_asymptotic_vacuum_weak_decoy_bounds():
    """mu3 = 0 and huge blocks: Lim's Eqs. (3)-(5) become Ma et al.'s Y1_L and e1_U."""
    mus, ps, q, n = (0.5, 0.1, 0.0), (0.6, 0.3, 0.1), 0.7, 1e24
    stats, truth = model_counts(mus, ps, q, n, 80.0)
    r = lim2014_key_length(stats, leak(stats))
    key, test = q * q, (1 - q) ** 2
    gain = [nk / (n * p * key) for nk, p in zip(stats.n_key, ps, strict=True)]
    err = [mk / nk for mk, nk in zip(stats.m_test, stats.n_test, strict=True)]
    y1_l, e1_u = gllp_bounds(mus[0], mus[1], gain[0], gain[1], err[1], gain[2])
    tau1 = sum(p * k * math.exp(-k) for k, p in zip(mus, ps, strict=True))
    assert r.s1_lower / (n * key * tau1) == pytest.approx(y1_l, rel=1e-6)
    assert r.s1_test_lower / (n * test * tau1) == pytest.approx(y1_l, rel=1e-6)
    assert r.phase_error_bound == pytest.approx(e1_u, rel=1e-4)
    assert y1_l <= truth["s1_key"] / (n * key * tau1) and e1_u >= truth["e1"]


def test_finite_key_rate_approaches_the_asymptotic_rate():
    mus, ps, q = (0.5, 0.1, 2e-4), (0.6, 0.3, 0.1), 0.8
    rates = []
    for n in (1e9, 1e11, 1e13, 1e15, 1e20):
        stats, _ = model_counts(mus, ps, q, n, 50.0)
        rates.append(lim2014_key_length(stats, leak(stats)).secret_bits / n)
    assert all(a < b for a, b in zip(rates, rates[1:], strict=False))
    # the asymptotic rate: Eq. (1) without finite-size terms, with Ma et al.'s bounds
    stats, _ = model_counts(mus, ps, q, 1.0, 50.0)
    gain = [nk / (p * q * q) for nk, p in zip(stats.n_key, ps, strict=True)]
    err = [mk / nk for mk, nk in zip(stats.m_test, stats.n_test, strict=True)]
    tau0 = sum(p * math.exp(-k) for k, p in zip(mus, ps, strict=True))
    tau1 = sum(p * k * math.exp(-k) for k, p in zip(mus, ps, strict=True))
    y0 = (mus[1] * gain[2] * math.exp(mus[2]) - mus[2] * gain[1] * math.exp(mus[1])) / (
        mus[1] - mus[2])
    # three intensities: Lim's Eq. (3) with exact counts (it is Ma's bound for mu3 -> 0)
    y1 = mus[0] * (gain[1] * math.exp(mus[1]) - gain[2] * math.exp(mus[2])
                   - (mus[1] ** 2 - mus[2] ** 2) / mus[0] ** 2 * (gain[0] * math.exp(mus[0]) - y0)
                   ) / (mus[0] * (mus[1] - mus[2]) - mus[1] ** 2 + mus[2] ** 2)
    v1 = (err[1] * gain[1] * math.exp(mus[1]) - err[2] * gain[2] * math.exp(mus[2])) / (
        mus[1] - mus[2])
    asym = q * q * (tau0 * y0 + tau1 * y1 * (1 - h(v1 / y1))
                    - F_EC * stats.n_key_total / (q * q) * h(stats.qber_key))
    assert rates[-1] == pytest.approx(asym, rel=1e-4)
    assert rates[1] > 0.8 * asym


# --------------------------------------------------------------------------- aborts
@pytest.mark.parametrize("fn, mus, ps, q", [
    (lim2014_key_length, LIM_MUS, LIM_PS, LIM_Q),
    (rusca2018_key_length, RUSCA_MUS, RUSCA_PS, RUSCA_Q),
])
def test_honest_block_gives_key(fn, mus, ps, q):
    stats, _ = model_counts(mus, ps, q, 1e10, 50.0)
    r = fn(rounded(stats), leak(stats))
    assert not r.aborted and r.abort_reason is None and r.secret_bits > 0
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["secret_bits"] == r.secret_bits and d["aborted"] is False


@pytest.mark.parametrize("fn, mus, ps, q", [
    (lim2014_key_length, LIM_MUS, LIM_PS, LIM_Q),
    (rusca2018_key_length, RUSCA_MUS, RUSCA_PS, RUSCA_Q),
])
def test_photon_number_splitting_signature_aborts(fn, mus, ps, q):
    """Eve blocks single photons and forwards multi-photon pulses: the signal gain
    stays, the decoy (and vacuum) gains collapse far below what it implies."""
    stats, _ = model_counts(mus, ps, q, 1e10, 50.0)
    s = rounded(stats)

    def collapse(v):
        return (v[0],) + tuple(int(x * 0.15) + 1 for x in v[1:])

    attacked = DecoyStatistics(s.intensities, s.probabilities, collapse(s.n_key),
                               collapse(s.m_key), collapse(s.n_test), collapse(s.m_test))
    r = fn(attacked, leak(attacked))
    assert r.aborted and r.secret_bits == 0
    assert "s1 <= 0" in r.abort_reason and "photon-number-splitting" in r.abort_reason
    assert r.s1_lower <= 0
    json.dumps(r.to_dict(), allow_nan=False)


@pytest.mark.parametrize("fn, mus, ps, q", [
    (lim2014_key_length, LIM_MUS, LIM_PS, LIM_Q),
    (rusca2018_key_length, RUSCA_MUS, RUSCA_PS, RUSCA_Q),
])
def test_high_qber_aborts_on_the_phase_error(fn, mus, ps, q):
    stats, _ = model_counts(mus, ps, q, 1e10, 30.0)
    s = rounded(stats)
    noisy = DecoyStatistics(s.intensities, s.probabilities, s.n_key,
                            tuple(n // 4 for n in s.n_key), s.n_test,
                            tuple(n // 4 for n in s.n_test))
    r = fn(noisy, leak(noisy))
    assert r.aborted and r.secret_bits == 0
    assert r.abort_reason.startswith("phase-error bound ")
    assert "exceeds the tolerance 0.11" in r.abort_reason
    assert r.phase_error_bound >= 0.25
    # the tolerance is a parameter
    assert fn(s, leak(s), phase_error_tolerance=0.01).aborted
    with pytest.raises(FiniteKeyError, match="phase_error_tolerance"):
        fn(s, leak(s), phase_error_tolerance=0.7)


def test_a_class_without_detections_aborts():
    stats, _ = model_counts(LIM_MUS, LIM_PS, LIM_Q, 1e10, 50.0)
    s = rounded(stats)
    empty = DecoyStatistics(s.intensities, s.probabilities, s.n_key, s.m_key,
                            s.n_test[:2] + (0,), s.m_test[:2] + (0,))
    r = lim2014_key_length(empty, leak(empty))
    assert r.aborted and r.secret_bits == 0
    assert "no detections in the test (X) basis for intensity class 2" in r.abort_reason


# --------------------------------------------------------------------------- asymptotic
def test_gllp_gys_maximal_distance_about_140_km():
    """Ma, Qi, Zhao, Lo 2005, GYS parameters, vacuum + weak decoy (nu = 0.1): about
    140 km, just short of the infinite-decoy limit computed from the true Y1, e1."""
    eta_bob, y0, e_det, alpha, f = 0.045, 1.7e-6, 0.033, 0.21, 1.22
    mus = np.linspace(0.11, 1.0, 90)

    def gains(eta, mu):
        q = y0 + 1 - math.exp(-eta * mu)
        return q, (0.5 * y0 + e_det * (1 - math.exp(-eta * mu))) / q

    def rate(d, nu):
        eta = eta_bob * 10 ** (-alpha * d / 10)
        qn, en = gains(eta, nu)
        return max(asymptotic_gllp(mu, nu, *gains(eta, mu), qn, en, y0, f_ec=f) for mu in mus)

    def ideal(d):
        eta = eta_bob * 10 ** (-alpha * d / 10)
        y1 = y0 + eta - y0 * eta
        e1 = (0.5 * y0 + e_det * eta) / y1
        return max(0.5 * (-gains(eta, mu)[0] * f * h(gains(eta, mu)[1])
                          + y1 * mu * math.exp(-mu) * (1 - h(e1))) for mu in mus)

    def reach(fn):
        lo, hi = 100.0, 200.0
        while hi - lo > 0.1:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fn(mid) > 0 else (lo, mid)
        return lo

    d_decoy, d_ideal = reach(lambda d: rate(d, 0.1)), reach(ideal)
    assert 137.0 < d_decoy < 142.0
    assert d_decoy < d_ideal < 143.0
    assert rate(50.0, 0.1) < ideal(50.0)
    with pytest.raises(FiniteKeyError):
        gllp_bounds(0.1, 0.5, 1e-3, 1e-3, 0.01, 1e-6)
