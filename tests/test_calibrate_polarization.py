"""``calibrate polarization`` on the simulated bench with a hidden fiber rotation.

The bench is configs/sim.toml with ``[sim] polarization_seed`` (a random fiber
transformation the procedure does not know) and a mock polarization controller
(QWP, HWP, QWP). Acceptance: after the calibration the QBER of both bases is
within 0.2 percentage points of the bench's floor, in at most 200 measurements.

The floor is measured on the same bench with no fiber transformation and ideal
waveplates at their neutral position (the identity), and the calibrated QBER on
a fresh bench built from the calibration record (the angles applied as the
controller's settings). Both runs use the same seed: Alice's sequence and the
simulator's random streams are the same, so the two QBERs differ by the
residual misalignment and hardly by counting noise. The QBER is the one a run
reports: sifted with the sifting core, errors over sifted bits of every
intensity class.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from qkdctl.calibration.acquire import armed
from qkdctl.calibration.polarization import (
    ChainModel,
    PolarizationCalibration,
    PolarizationCalibrationError,
    calibrate_polarization,
    fit_chain_model,
)
from qkdctl.calibration.record import CalibrationRecord
from qkdctl.config import BenchConfig, default_bench_path, parse_bench
from qkdctl.errors import ConfigError
from qkdctl.sequence import AliceSequence
from qkdctl.sifting import Sifter, SiftParams

SIM_PATH = default_bench_path()
RAW = tomllib.loads(SIM_PATH.read_text(encoding="utf-8"))
TOLERANCE = 0.002  # 0.2 percentage points
MAX_MEASUREMENTS = 200
CHECK_S = 0.1  # bench time of the floor and check runs


def bench(polarization_seed: int | None, *, sim: dict | None = None,
          polarization: dict | None = None, controller: bool = True) -> BenchConfig:
    raw = copy.deepcopy(RAW)
    if polarization_seed is not None:
        raw["sim"]["polarization_seed"] = polarization_seed
    raw["sim"].update(sim or {})
    if controller:
        raw["instruments"]["polarization"] = {"driver": "mock", **(polarization or {})}
    return parse_bench(raw, str(SIM_PATH))


def run_qber(cfg: BenchConfig, seed: int, duration_s: float = CHECK_S) -> np.ndarray:
    """QBER (Z, X) of an acquisition, as a run reports it."""
    with armed(cfg, seed=seed) as b:
        sifter = Sifter(SiftParams.from_config(cfg, seed),
                        AliceSequence.from_config(cfg.source, seed))
        tags = b.read(duration_s)
        sifter.process(tags.timestamps, tags.channels)
        sifter.finish()
    n = sifter.stats.sifted.sum(axis=0)
    return sifter.stats.errors.sum(axis=0) / n


def floor_qber(cfg: BenchConfig, seed: int) -> np.ndarray:
    """The same bench with no fiber transformation and ideal waveplates (QWP, HWP, QWP,
    fast axes on H at 0) at 0: W U is the identity, only the misalignment floor is left."""
    sim = dataclasses.replace(cfg.sim, polarization_seed=None, channel_rotation_deg=None,
                              waveplate_retardances_deg=(90.0, 180.0, 90.0),
                              waveplate_offsets_deg=(0.0, 0.0, 0.0))
    pol = dataclasses.replace(cfg.instruments["polarization"], settings={})
    return run_qber(dataclasses.replace(
        cfg, sim=sim, instruments={**cfg.instruments, "polarization": pol}), seed)


def calibrated_qber(cfg: BenchConfig, res: PolarizationCalibration, seed: int) -> np.ndarray:
    record = CalibrationRecord(bench=cfg.name)
    record.update("polarization", res.section())
    return run_qber(record.apply(cfg), seed)


def check_acceptance(cfg: BenchConfig, res: PolarizationCalibration, seed: int) -> None:
    assert res.measurements <= MAX_MEASUREMENTS
    assert len(res.trace) == res.measurements
    floor = floor_qber(cfg, seed)
    got = calibrated_qber(cfg, res, seed)
    start = np.array(res.initial_qber)
    msg = (f"initial QBER {start}, calibrated {got}, floor {floor}, reported {res.qber} "
           f"+- {res.qber_std}, {res.measurements} measurements")
    assert np.all(got - floor < TOLERANCE), msg
    # the reported QBER (its own verification) agrees with the floor too
    assert np.all(np.array(res.qber) - floor < TOLERANCE + 3 * np.array(res.qber_std)), msg


@pytest.mark.parametrize("pol_seed", [1, 2, 3])
def test_calibration_reaches_the_floor(pol_seed):
    cfg = bench(pol_seed)
    res = calibrate_polarization(cfg, seed=pol_seed)
    # the hidden rotation spoils the QBER before the calibration
    assert max(res.initial_qber) > 0.03
    check_acceptance(cfg, res, seed=100 + pol_seed)
    assert not res.polished and res.model.chi2_ndf < 2.0
    assert res.model.floor == pytest.approx(np.array(res.qber), abs=0.003)


def test_imperfect_waveplates_on_limited_mounts(tmp_path):
    """Waveplates off their nominal retardance, fast axes off the mount's zero, travel
    limited to 0..170 degrees: the fitted retarder model finds them."""
    sim = {"waveplate_retardances_deg": [84.0, 172.0, 97.0],
           "waveplate_offsets_deg": [3.0, -4.0, 2.0]}
    cfg = bench(4, sim=sim, polarization={"limits": {"min_angle_deg": 0.0,
                                                     "max_angle_deg": 170.0}})
    res = calibrate_polarization(cfg, seed=4, plot_dir=tmp_path / "plots")
    check_acceptance(cfg, res, seed=104)
    assert all(0.0 <= a <= 170.0 for m in res.trace for a in m.angles_deg)
    ret = np.array(res.model.retardances_deg)
    assert np.allclose(ret, [84.0, 172.0, 97.0], atol=3.0) \
        or np.allclose(ret, [276.0, 188.0, 263.0], atol=3.0)  # or its mirror image

    # figures, the record's table, the JSON
    assert len(res.plots) == 3
    for p in res.plots:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sec = res.section()
    assert sec["angles_deg"] == res.angles_deg and set(sec["qber"]) == {"Z", "X"}
    assert sec["measurements"] == res.measurements
    record = CalibrationRecord(bench=cfg.name, path=str(tmp_path / "cal.toml"))
    record.update("polarization", sec)
    record.save()
    again = CalibrationRecord.load(tmp_path / "cal.toml")
    assert again.sections["polarization"]["angles_deg"] == res.angles_deg
    assert again.apply(cfg).instruments["polarization"].settings["angles_deg"] == \
        res.angles_deg
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert len(d["trace"]) == res.measurements and d["model"]["ndf"] > 0
    assert {m["stage"] for m in d["trace"]} >= {"start", "global", "local", "final"}


def test_model_free_polish_when_the_model_does_not_hold():
    """With the nominal chain imposed on imperfect waveplates the model misses the
    optimum; the verification sees it and the quadratic polish recovers the floor."""
    sim = {"waveplate_retardances_deg": [84.0, 172.0, 97.0],
           "waveplate_offsets_deg": [3.0, -4.0, 2.0]}
    cfg = bench(11, sim=sim)
    res = calibrate_polarization(cfg, seed=11, fit_retarders=False)
    assert res.polished and res.model.chi2_ndf > 10
    assert any(m.stage == "polish" for m in res.trace)
    check_acceptance(cfg, res, seed=111)


def test_fixed_measurement_length_and_budget():
    cfg = bench(5)
    res = calibrate_polarization(cfg, seed=5, measurement_s=4e-3, global_points=16,
                                 local_points=6, final_measurements=4, max_measurements=27)
    assert res.measurements <= 27 and res.measurement_s == 4e-3
    assert all(m.duration_s == 4e-3 for m in res.trace)
    assert max(res.qber) < 0.02


def test_fit_recovers_a_known_model():
    """fit_chain_model on (nearly noiseless) counts of a known retarder chain."""
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, 180, (30, 3))
    u, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    truth = ChainModel(offsets_deg=np.array([0.0, 2.0, -1.0]),
                       retardances_deg=np.array([88.0, 181.0, 93.0]),
                       coef=np.array([[0.5, *(0.49 * u[:, 0])], [0.5, *(0.49 * u[:, 1])]]),
                       chi2=0.0, ndf=0)
    q = truth.qber(angles)
    n = np.full((30, 2), 10**9)
    fit = fit_chain_model(angles, n, np.rint(q * n).astype(np.int64), (90.0, 180.0, 90.0))
    np.testing.assert_allclose(fit.qber(angles), q, atol=1e-6)
    np.testing.assert_allclose(fit.floor, [0.01, 0.01], atol=1e-6)
    fixed = fit_chain_model(angles, n, np.rint(q * n).astype(np.int64), (90.0, 180.0, 90.0),
                            free=False)
    assert fixed.chi2_ndf > 1e3 * max(fit.chi2_ndf, 1e-3)


def test_errors():
    with pytest.raises(ConfigError, match=r"needs a polarization controller"):
        calibrate_polarization(bench(1, controller=False))
    with pytest.raises(ConfigError, match="max_measurements = 20"):
        calibrate_polarization(bench(1), max_measurements=20)
    with pytest.raises(ConfigError, match="measurement_s"):
        calibrate_polarization(bench(1), measurement_s=-1.0)
    dark = bench(1)
    laser = dataclasses.replace(dark.instruments["laser"], settings={"current_ma": 10.0})
    dark = dataclasses.replace(dark, instruments={**dark.instruments, "laser": laser})
    with pytest.raises(PolarizationCalibrationError, match="no sifted X-basis bit"):
        calibrate_polarization(dark)
