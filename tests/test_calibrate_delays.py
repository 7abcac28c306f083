"""Acceptance tests of ``qkdctl calibrate delays`` on the simulated bench.

Each test builds the simulated bench from a copy of ``configs/sim.toml`` with a
hidden truth: every detector's true delay (``sim.detectors[].delay_ps``) is
moved by up to +-1 us (+-1000 pulse periods at 1 GHz, more than one sync
period), the tagger's clock gets a random offset and a drift of up to +-20
ppm, while ``receiver.detectors[].delay_ps`` keeps the old values (or zero):
that is what the calibration has to correct. The calibration sees the bench
only through its instruments.

The truth, in the sifting core's convention. The simulated tagger puts the
detection of pulse n at ``offset + n P_tag + delay_sim + jitter`` and the sync
tag of pulse n at ``offset + n P_tag + sync jitter``. The sifter computes
``dt = t - delay_cfg - t_sync`` from the last sync, slot ``round(dt / P)`` and
phase ``dt - slot P``: the detections sit at phase 0 *and* on the right pulse
exactly when ``delay_cfg = delay_sim``; any whole number of periods off puts
them at phase 0 on the wrong pulse (QBER 1/2). :func:`test_truth_convention`
checks this on the nominal bench, where the two match.
"""

from __future__ import annotations

import copy
import json
import math
import tomllib
from dataclasses import dataclass

import numpy as np
import pytest

from qkdctl.calibration.delays import (
    DelayCalibrationError,
    _segment_correlation,
    calibrate_delays,
    fit_sync,
)
from qkdctl.calibration.record import CalibrationRecord
from qkdctl.config import BenchConfig, default_bench_path, parse_bench
from qkdctl.errors import ConfigError
from qkdctl.session import run_session

SESSION_S = 0.2


# ------------------------------------------------------------------------------ helpers
def sim_document() -> dict:
    """A fresh copy of the built-in simulated bench's TOML document."""
    with open(default_bench_path(), "rb") as f:
        return copy.deepcopy(tomllib.load(f))


@dataclass
class Truth:
    """The hidden values the calibration must find."""

    delays_ps: dict[int, int]
    drift_ppm: float
    jitter_ps: float  # RMS arrival spread as the sifter sees it


def true_delays_ps(doc: dict) -> dict[int, int]:
    """``receiver.detectors[].delay_ps`` that puts each channel's detections at phase 0 of
    the right pulse in the sifter: the simulated delay itself (see the module docstring)."""
    return {d["channel"]: int(d["delay_ps"]) for d in doc["sim"]["detectors"]}


def sifter_jitter_ps(doc: dict, channel: int) -> float:
    """Detector jitter, sync-tag jitter and both tags' 1-ps bins, in quadrature."""
    sim = doc["sim"]
    det = next(d for d in sim["detectors"] if d["channel"] == channel)
    res = sim.get("tagger_resolution_ps", 1)
    return math.sqrt(det["jitter_ps"] ** 2 + sim["sync_jitter_ps"] ** 2 + 2 * res ** 2 / 12)


def hidden_bench(seed: int, *, rep_rate_hz: float = 1e9, drift_ppm: float | None = None,
                 receiver: str = "nominal", distill: bool = False
                 ) -> tuple[BenchConfig, BenchConfig, Truth]:
    """(bench with the hidden truth, the same bench with the receiver delays set to the
    truth, the truth). ``receiver``: "nominal" keeps the file's receiver delays, "zero"
    sets them to 0."""
    rng = np.random.default_rng(seed)
    doc = sim_document()
    doc["source"]["rep_rate_hz"] = rep_rate_hz
    doc["postprocess"] = {"enabled": distill}
    for det, rx in zip(doc["sim"]["detectors"], doc["receiver"]["detectors"], strict=True):
        det["delay_ps"] = int(round(det["delay_ps"] + rng.uniform(-1e6, 1e6)))
        if receiver == "zero":
            rx["delay_ps"] = 0
    doc["sim"]["clock_offset_ps"] = int(rng.integers(-10**12, 10**12))
    doc["sim"]["clock_drift_ppm"] = (float(rng.uniform(-20.0, 20.0)) if drift_ppm is None
                                     else float(drift_ppm))
    truth = Truth(true_delays_ps(doc), doc["sim"]["clock_drift_ppm"],
                  sifter_jitter_ps(doc, 1))
    matched = copy.deepcopy(doc)
    for rx in matched["receiver"]["detectors"]:
        rx["delay_ps"] = truth.delays_ps[rx["channel"]]
    return parse_bench(doc), parse_bench(matched), truth


def apply(cfg: BenchConfig, result) -> BenchConfig:
    record = CalibrationRecord(bench=cfg.name)
    record.update("delays", result.section())
    return record.apply(cfg)


def usable_bits(summary: dict) -> float:
    """Sifted key bits beyond chance: ``n (1 - 2 QBER)`` (0 without sifted bits)."""
    n = summary["sifted_bits"]
    q = summary["qber"]["Z"]
    return 0.0 if not n or q is None else n * max(0.0, 1.0 - 2.0 * q)


def check_result(res, cfg: BenchConfig, truth: Truth) -> None:
    """The calibration's numbers against the hidden truth."""
    for ch, want in truth.delays_ps.items():
        c = res.channels[ch]
        tol = max(5.0, c.jitter_ps / 4)
        assert abs(c.delay_ps - want) < tol, (ch, c.delay_ps, want)
        # the statistical uncertainty is honest: the error is within a few of it
        assert abs(c.delay_ps - want) < 5 * c.uncertainty_ps + 0.2, (ch, c.delay_ps, want,
                                                                     c.uncertainty_ps)
        assert 0 < c.uncertainty_ps < 1.0
        assert abs(c.jitter_ps - truth.jitter_ps) < 0.03 * truth.jitter_ps, (ch, c.jitter_ps)
        assert c.qber < 0.03
        assert c.coarse.significance > 10
    s = res.sync
    err = s.clock_drift_ppm - truth.drift_ppm
    assert abs(err) < 0.1
    assert abs(err) < 4 * s.clock_drift_uncertainty_ppm, (err, s.clock_drift_uncertainty_ppm)
    assert s.period_ps == pytest.approx(cfg.source.period_ps * (1 + truth.drift_ppm * 1e-6),
                                        rel=1e-9)
    sigma = max(c.jitter_ps for c in res.channels.values())
    w = res.gate_width_ps
    assert 4 * sigma <= w <= 12 * sigma
    rate = res.key_rate_bps(w)
    assert rate > 0
    assert rate == pytest.approx(res.key_rate_bps_at_gate)
    for other in (0.6 * w, 1.3 * w, 4 * sigma):
        assert rate >= res.key_rate_bps(other), other
    lo, hi = res.gate_width_range_ps
    assert lo <= w <= hi
    assert res.qber_at_gate[0] < 0.02


def check_sessions(cfg: BenchConfig, res, seed: int, *, min_bits: int) -> None:
    """Calibrated: low QBER and many sifted bits; uncalibrated: no usable key."""
    cal = run_session(apply(cfg, res), duration_s=SESSION_S, seed=seed, keystore=False)
    assert cal["qber"]["Z"] < 0.02
    assert cal["sifted_bits"] >= min_bits
    raw = run_session(cfg, duration_s=SESSION_S, seed=seed, keystore=False)
    # off by a random phase the detections mostly miss the gate; when they hit it they
    # land on the wrong pulse (QBER 1/2): either way almost no bit agrees beyond chance
    assert usable_bits(raw) < 0.01 * usable_bits(cal), (raw["sifted_bits"], raw["qber"])


# ------------------------------------------------------------------------------ tests
def test_truth_convention():
    """On the nominal bench (receiver delays = simulated delays) the sifter works; one
    pulse period off it sifts the wrong pulses; and the calibration finds the nominal
    delays back."""
    doc = sim_document()
    doc["postprocess"] = {"enabled": False}
    cfg = parse_bench(doc)
    good = run_session(cfg, duration_s=0.1, seed=11, keystore=False)
    assert good["qber"]["Z"] < 0.02 and good["sifted_bits"] > 3e5
    shifted = copy.deepcopy(doc)
    period = 1e12 / doc["source"]["rep_rate_hz"]
    for rx in shifted["receiver"]["detectors"]:
        rx["delay_ps"] += int(period)
    bad = run_session(parse_bench(shifted), duration_s=0.1, seed=11, keystore=False)
    assert bad["sifted_bits"] > 3e5 and abs(bad["qber"]["Z"] - 0.5) < 0.02
    res = calibrate_delays(cfg, seed=12, acquisition_s=0.05)
    for ch, want in true_delays_ps(doc).items():
        assert abs(res.channels[ch].delay_ps - want) < 1.0
        assert res.channels[ch].coarse.offset_pulses == 0


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_hidden_offsets_1ghz(seed):
    cfg, _, truth = hidden_bench(seed, receiver="zero" if seed % 2 else "nominal")
    res = calibrate_delays(cfg, seed=100 + seed)
    assert res.runtime_s > 0  # its speed is a benchmark's business, not a test's
    check_result(res, cfg, truth)
    check_sessions(cfg, res, 200 + seed, min_bits=800_000)


def test_hidden_offsets_100mhz():
    cfg, _, truth = hidden_bench(7, rep_rate_hz=1e8)
    assert cfg.source.period_ps == 10_000
    res = calibrate_delays(cfg, seed=107, acquisition_s=0.2)
    check_result(res, cfg, truth)
    check_sessions(cfg, res, 207, min_bits=80_000)


@pytest.mark.parametrize("drift", [20.0, -20.0])
def test_drift_extremes(drift):
    cfg, _, truth = hidden_bench(8 if drift > 0 else 9, drift_ppm=drift)
    res = calibrate_delays(cfg, seed=108)
    check_result(res, cfg, truth)
    assert res.sync.clock_drift_ppm == pytest.approx(drift, abs=1e-4)
    check_sessions(cfg, res, 208, min_bits=800_000)


def test_pattern_sequence_modulo_pattern_length():
    """With a repeating pattern the offset is defined modulo the pattern; any equivalent
    delay works."""
    cfg, _, truth = hidden_bench(10)
    doc = copy.deepcopy(cfg.raw)
    doc["source"]["sequence"] = "pattern"
    doc["source"]["pattern_length"] = 1024
    cfg = parse_bench(doc)
    res = calibrate_delays(cfg, seed=110, acquisition_s=0.05)
    span = 1024 * res.sync.period_ps
    for ch, want in truth.delays_ps.items():
        k = round((res.channels[ch].delay_ps - want) / span)
        assert abs(res.channels[ch].delay_ps - want - k * span) < 5.0
        assert abs(res.channels[ch].delay_ps - float(cfg.receiver.detectors[ch - 1].delay_ps)
                   ) <= span / 2 + 100
    cal = run_session(apply(cfg, res), duration_s=0.1, seed=210, keystore=False)
    assert cal["qber"]["Z"] < 0.02 and cal["sifted_bits"] > 3e5


def test_plots_record_and_json(tmp_path):
    cfg, _, truth = hidden_bench(12)
    res = calibrate_delays(cfg, seed=112, acquisition_s=0.05, plot_dir=tmp_path / "plots")
    assert len(res.plots) == 4
    for p in res.plots:
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "plots" / p.rsplit("/", 1)[-1]).stat().st_size > 1000
    sec = res.section()
    assert set(sec) >= {"period_ps", "clock_drift_ppm", "gate_width_ps", "channels"}
    assert set(sec["channels"]) == {"1", "2", "3", "4"}
    for c in sec["channels"].values():
        assert {"delay_ps", "uncertainty_ps", "jitter_ps"} <= set(c)
    record = CalibrationRecord(bench=cfg.name, path=str(tmp_path / "cal.toml"))
    record.update("delays", sec)
    record.save()
    back = CalibrationRecord.load(tmp_path / "cal.toml")
    cfg2 = back.apply(cfg)
    for d in cfg2.receiver.detectors:
        assert abs(d.delay_ps - truth.delays_ps[d.channel]) <= 1
    assert cfg2.analysis.gate_width_ps == pytest.approx(sec["gate_width_ps"])
    out = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert out["channels"]["1"]["coarse"]["significance"] > 10
    assert len(out["gate_scan"]["width_ps"]) == len(out["gate_scan"]["key_rate_bps"])


def test_no_light_raises():
    doc = sim_document()
    doc["sim"]["bob_insertion_loss_db"] = 60.0
    with pytest.raises(DelayCalibrationError, match="channel 1"):
        calibrate_delays(parse_bench(doc), seed=1, acquisition_s=0.01, dark_s=0.0)


@pytest.mark.parametrize("kw", [{"acquisition_s": 0.0}, {"dark_s": -1.0},
                                {"search_ps": float("nan")}])
def test_bad_arguments(kw):
    with pytest.raises(ConfigError):
        calibrate_delays(parse_bench(sim_document()), **kw)


def test_fit_sync_gaps_and_strays():
    """Missing syncs are counted, a tag off the grid is dropped, the period is exact."""
    rng = np.random.default_rng(0)
    period, per = 1000.0 * (1 + 13e-6), 1000
    n = np.arange(5000) * per
    t = np.round(7_000_000 + n * period + rng.normal(0, 5.0, n.shape)).astype(np.int64)
    keep = np.ones(n.shape, bool)
    keep[[100, 101, 2000]] = False
    t = np.sort(np.concatenate([t[keep], [t[300] + 400_000]]))
    s = fit_sync(t, 1000.0, per, first_sync_pulse=0)
    assert s.rejected == 1 and s.missing == 3 and s.n_syncs == keep.sum()
    assert s.pulses[-1] == n[-1]
    assert abs(s.clock_drift_ppm - 13.0) < 4 * s.clock_drift_uncertainty_ppm
    assert s.residual_rms_ps == pytest.approx(5.0, rel=0.05)
    with pytest.raises(DelayCalibrationError):
        fit_sync(t[:2], 1000.0, per)


def test_segment_correlation_matches_direct():
    rng = np.random.default_rng(1)
    n, nlags = 200_000, 301
    h = np.zeros(n)
    h[rng.integers(0, n, 500)] = 1.0
    gg = rng.normal(size=n + nlags - 1)
    c = _segment_correlation(h, gg, nlags)
    nz = np.flatnonzero(h)
    direct = gg[nz[:, None] + np.arange(nlags)[None, :]].sum(axis=0)
    assert np.allclose(c, direct, atol=1e-2)
