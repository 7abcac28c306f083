"""Acceptance tests of ``qkdctl calibrate detectors`` on the simulated bench.

Each test builds the simulated bench from a copy of ``configs/sim.toml`` with a
hidden truth in ``[[sim.detectors]]``: per-detector dark count rates,
efficiencies, dead times and afterpulsing that differ from the defaults and
from each other. The procedure sees the bench only through its instruments
and must find them again. Every estimate is checked twice: within
:data:`NSIG` of its own statistical error (so that the errors are honest) and
within an absolute tolerance (so that the check means something even if an
error came out large).

The truth, in the procedure's conventions: ``dark_count_rate_hz`` is the rate
of the Poisson dark process (before dead time and afterpulsing);
``relative_efficiency`` is the efficiency relative to the first detector of
``[[receiver.detectors]]`` (the basis splitter divided out);
``relative_efficiency_in_basis`` relative to the first detector of the same
basis; ``dead_time_ns``, ``afterpulse_probability`` and
``afterpulse_time_constant_ns`` are the simulated values.
"""

from __future__ import annotations

import copy
import json
import math
import tomllib

import numpy as np
import pytest

from qkdctl.calibration.detectors import (
    DetectorCalibration,
    _Binned,
    _Model,
    calibrate_detectors,
)
from qkdctl.calibration.record import CalibrationRecord
from qkdctl.config import BenchConfig, default_bench_path, parse_bench
from qkdctl.errors import ConfigError, DataError

NSIG = 5.0
#: the dead-time likelihood is one-sided (exponential below the shortest interval), so
#: its tail is longer than a normal one: P(> 7 sigma) is about 3e-4
NSIG_DEAD = 7.0
DARK_S = 1.0
LIGHT_S = 0.1
SEEDS = (101, 202, 303)
#: the last seed's bench also has a tagger with another clock and coarser bins
TAGGER = {"clock_drift_ppm": -17.3, "clock_offset_ps": 987_654_321, "tagger_resolution_ps": 4}

#: absolute tolerances: dark rate and afterpulse values relative, efficiency and dead time
#: absolute
TOL_DARK = 0.1
TOL_EFF = 0.025
TOL_DEAD_NS = 0.2
TOL_AP_P = 0.2
TOL_AP_TAU = 0.25


# ------------------------------------------------------------------------------ helpers
def sim_document() -> dict:
    """A fresh copy of the built-in simulated bench's TOML document."""
    with open(default_bench_path(), "rb") as f:
        return copy.deepcopy(tomllib.load(f))


def random_detectors(seed: int) -> list[dict[str, float]]:
    """Per-detector truth drawn in the ranges of the acceptance criteria."""
    rng = np.random.default_rng(seed)
    return [dict(dark_count_rate_hz=float(10 ** rng.uniform(math.log10(2e3), math.log10(5e4))),
                 efficiency=float(rng.uniform(0.4, 0.7)),
                 dead_time_ns=float(rng.uniform(20.0, 100.0)),
                 afterpulse_probability=float(rng.uniform(0.01, 0.1)),
                 afterpulse_time_constant_ns=float(rng.uniform(50.0, 200.0)))
            for _ in range(4)]


def bench(detectors: list[dict[str, float]] | None, **sim) -> BenchConfig:
    doc = sim_document()
    if detectors is not None:
        for d, v in zip(doc["sim"]["detectors"], detectors, strict=True):
            d.update(v)
    doc["sim"].update(sim)
    return parse_bench(doc, str(default_bench_path()))


def truth(cfg: BenchConfig) -> dict[int, dict[str, float]]:
    """Simulated values by channel, with the expected relative efficiencies."""
    sim = {d.channel: d for d in cfg.sim.detectors}
    dets = cfg.receiver.detectors
    ref = sim[dets[0].channel].efficiency
    first = {}
    for d in dets:
        first.setdefault(d.basis, sim[d.channel].efficiency)
    out = {}
    for d in dets:
        s = sim[d.channel]
        out[d.channel] = dict(dark=s.dark_count_rate_hz, eff=s.efficiency / ref,
                              eff_basis=s.efficiency / first[d.basis], dead=s.dead_time_ns,
                              p=s.afterpulse_probability, tau=s.afterpulse_time_constant_ns)
    return out


def check(name: str, est: float, err: float, true: float, tol: float,
          nsig: float = NSIG) -> None:
    """``est`` within ``nsig`` errors and within ``tol`` (absolute) of ``true``."""
    assert math.isfinite(est) and math.isfinite(err) and err >= 0, (name, est, err)
    dev = est - true
    assert abs(dev) <= nsig * err, \
        f"{name}: {est:.6g} +- {err:.3g}, true {true:.6g}: {dev / err:+.2f} sigma"
    assert abs(dev) <= tol, f"{name}: {est:.6g}, true {true:.6g}: off by {dev:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, tuple[BenchConfig, DetectorCalibration, str]]:
    """One calibration per seed on its own random bench; the first one writes figures."""
    out = {}
    for i, seed in enumerate(SEEDS):
        cfg = bench(random_detectors(seed), **(TAGGER if seed == SEEDS[-1] else {}))
        plot_dir = str(tmp_path_factory.mktemp(f"plots{seed}")) if i == 0 else None
        res = calibrate_detectors(cfg, seed=seed, dark_s=DARK_S, light_s=LIGHT_S,
                                  plot_dir=plot_dir)
        out[seed] = (cfg, res, plot_dir)
    return out


# ------------------------------------------------------------------------------ acceptance
@pytest.mark.parametrize("seed", SEEDS)
def test_dark_counts(runs, seed):
    cfg, res, _ = runs[seed]
    for ch, t in truth(cfg).items():
        r = res.channels[ch]
        check(f"ch{ch} dark rate", r.dark_count_rate_hz, r.dark_count_rate_err_hz, t["dark"],
              TOL_DARK * t["dark"])
        # the light read's background is the same dark process here (no stray light)
        check(f"ch{ch} background under light", r.background_rate_light_hz,
              r.background_rate_light_err_hz, t["dark"], 0.5 * t["dark"])
        # the observed click rate holds the afterpulses and loses the dead time
        assert r.dark_click_rate_hz > 0.9 * r.dark_count_rate_hz


@pytest.mark.parametrize("seed", SEEDS)
def test_relative_efficiencies(runs, seed):
    cfg, res, _ = runs[seed]
    assert res.reference_channel == cfg.receiver.detectors[0].channel
    for ch, t in truth(cfg).items():
        r = res.channels[ch]
        if ch == res.reference_channel:
            assert (r.relative_efficiency, r.relative_efficiency_err) == (1.0, 0.0)
            continue
        check(f"ch{ch} relative efficiency", r.relative_efficiency, r.relative_efficiency_err,
              t["eff"], TOL_EFF)
        if r.relative_efficiency_in_basis_err > 0:
            check(f"ch{ch} relative efficiency in basis", r.relative_efficiency_in_basis,
                  r.relative_efficiency_in_basis_err, t["eff_basis"], TOL_EFF)
        else:
            assert r.relative_efficiency_in_basis == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_dead_time(runs, seed):
    cfg, res, _ = runs[seed]
    for ch, t in truth(cfg).items():
        r = res.channels[ch]
        check(f"ch{ch} dead time", r.dead_time_ns, r.dead_time_err_ns, t["dead"], TOL_DEAD_NS,
              NSIG_DEAD)
        # no interval is shorter than the dead time (tags are floored to the tagger's bins)
        res_ns = cfg.sim.tagger_resolution_ps * 1e-3
        assert r.shortest_interval_ns >= t["dead"] - res_ns - 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_afterpulsing(runs, seed):
    cfg, res, _ = runs[seed]
    for ch, t in truth(cfg).items():
        r = res.channels[ch]
        assert r.afterpulse_detected, f"ch{ch}: afterpulsing p = {t['p']:.3f} not detected"
        check(f"ch{ch} afterpulse probability", r.afterpulse_probability,
              r.afterpulse_probability_err, t["p"], TOL_AP_P * t["p"])
        check(f"ch{ch} afterpulse time constant", r.afterpulse_time_constant_ns,
              r.afterpulse_time_constant_err_ns, t["tau"], TOL_AP_TAU * t["tau"])


def test_figures(runs):
    cfg, res, plot_dir = runs[SEEDS[0]]
    assert len(res.figures) == len(cfg.receiver.detectors)
    for path in res.figures:
        assert path.startswith(plot_dir)
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n"
    assert res.to_dict()["figures"] == res.figures
    assert runs[SEEDS[1]][1].figures == []


def test_record_and_json(runs, tmp_path):
    cfg, res, _ = runs[SEEDS[0]]
    section = res.section()
    assert set(section["channels"]) == {str(d.channel) for d in cfg.receiver.detectors}
    for entry in section["channels"].values():
        for key in ("dark_count_rate_hz", "dark_count_rate_err_hz", "relative_efficiency",
                    "relative_efficiency_err", "dead_time_ns", "dead_time_err_ns",
                    "afterpulse_probability", "afterpulse_probability_err",
                    "afterpulse_time_constant_ns"):
            assert isinstance(entry[key], float), key
    rec = CalibrationRecord(bench=cfg.name)
    rec.update("detectors", section)
    path = rec.save(tmp_path / "bench.calibration.toml")
    back = CalibrationRecord.load(path).sections["detectors"]
    assert back == section
    d = json.loads(json.dumps(res.to_dict()))
    assert d["efficiency_reference_channel"] == res.reference_channel
    assert d["channels"]["1"]["dark_count_rate_hz"] == res.channels[1].dark_count_rate_hz


# ------------------------------------------------------------------------------ other benches
def test_default_bench_has_no_afterpulsing():
    """SNSPD-class defaults: 30 Hz dark counts, 50 ns dead time, no afterpulsing."""
    cfg = bench(None)
    res = calibrate_detectors(cfg, seed=7, dark_s=DARK_S, light_s=LIGHT_S)
    for ch, r in res.channels.items():
        check(f"ch{ch} dark rate", r.dark_count_rate_hz, r.dark_count_rate_err_hz, 30.0, 15.0)
        check(f"ch{ch} dead time", r.dead_time_ns, r.dead_time_err_ns, 50.0, 0.5, NSIG_DEAD)
        assert not r.afterpulse_detected
        assert r.afterpulse_time_constant_ns is None
        assert 0.0 <= r.afterpulse_probability <= r.afterpulse_probability_upper < 2e-3
        assert r.relative_efficiency_err > 0 or ch == res.reference_channel
        if ch != res.reference_channel:
            check(f"ch{ch} relative efficiency", r.relative_efficiency,
                  r.relative_efficiency_err, 1.0, TOL_EFF)
        entry = res.section()["channels"][str(ch)]
        assert "afterpulse_time_constant_ns" not in entry
        assert entry["afterpulse_probability_upper"] == r.afterpulse_probability_upper


def test_wrong_delays_are_refused():
    """A detector delay off by whole pulses assigns clicks to the wrong pulses."""
    doc = sim_document()
    doc["receiver"]["detectors"][2]["delay_ps"] += 3000
    cfg = parse_bench(doc, str(default_bench_path()))
    with pytest.raises(DataError, match="calibrate delays"):
        calibrate_detectors(cfg, seed=3, dark_s=0.01, light_s=0.02)


def test_durations_must_be_positive():
    with pytest.raises(ConfigError):
        calibrate_detectors(bench(None), dark_s=0.0)


# ------------------------------------------------------------------------------ the estimator
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_interval_likelihood_on_exact_renewal_intervals(seed):
    """The dark-read likelihood on intervals drawn exactly from the model.

    After each click (dead time removed) the next is the first of a dark count
    (Exp(R)) and, with probability p, an afterpulse (Exp(tau)).
    """
    rng = np.random.default_rng(seed)
    R, p, tau = 2e-5, 0.04, 120.0            # per ns, 1, ns (R = 20 kHz)
    n = 40_000
    dark = rng.exponential(1 / R, n)
    ap = np.where(rng.random(n) < p, rng.exponential(tau, n), np.inf)
    u = np.minimum(dark, ap)
    b = _Binned.build(u, np.ones(n, bool), None, 0.0, 1.0)
    empty = _Binned.build(np.zeros(0), np.zeros(0, bool), None, 0.0, 0.0)
    fit = _Model([b, empty]).fit()
    assert fit.ok
    for name, est, err, true in (("R", fit.R[0], fit.R_err[0], R), ("p", fit.p, fit.p_err, p),
                                 ("tau", fit.tau, fit.tau_err, tau)):
        assert abs(est - true) <= NSIG * err, f"{name}: {est:.5g} +- {err:.2g}, true {true}"
        assert err < 0.1 * true, f"{name}: error {err:.2g} too large"
