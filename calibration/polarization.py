"""``qkdctl calibrate polarization``: the compensation waveplates that undo the fiber.

The fiber turns the polarization of Alice's states by an unknown unitary
``U``; Bob's polarization controller (waveplates on motorized mounts, or the
paddles of a fiber controller) applies ``W(theta)`` before his analyser.
:func:`calibrate_polarization` sets the axes so that ``W U`` is the identity
again, by minimising the sum of the Z- and X-basis QBER. Both bases are
needed: the Z basis alone fixes only where H goes on the Poincare sphere, the
X basis fixes the rotation about that axis.

Each measurement is a short acquisition at one setting of the axes (the
motors move between reads, so a measurement sees one setting only): the
tags are sifted with Alice's sequence by the sifting core
(:class:`~qkdctl.sifting.Sifter`, one for the whole run, so that pulses keep
their numbers), and the errors and sifted bits of each basis, summed over the
intensity classes, give the QBER a run would report. A measurement is noisy
(binomial), the X basis more so (fewer sifted bits), so the procedure does
not chase the noise with a generic optimiser. It fits a physical model
instead:

1. **Model.** Each axis is a linear retarder (retardance ``delta_i``, fast
   axis at ``theta_i + o_i`` from H), which turns the Poincare sphere by
   ``delta_i`` about ``(cos 2(theta_i + o_i), sin 2(theta_i + o_i), 0)``. With
   ``R(theta) = W(theta) U`` the QBER of basis B (row 0 of the rotation is
   S1 = H/V, the Z basis; row 1 is S2 = D/A, the X basis) is

       QBER_B(theta) = a_B - b_B . W(theta)[B, :]

   which, for given retarder parameters, is linear in the four unknowns of
   each basis: ``a_B`` (the QBER averaged over all settings) and ``b_B`` (half
   the visibility times the column of ``U`` that Bob's basis sees; its floor
   is ``a_B - |b_B|``). The retardances and offsets are fitted too
   (variable projection: for each trial of the ``2 n`` retarder parameters
   the linear unknowns are solved by weighted least squares, and
   :func:`scipy.optimize.least_squares` adjusts the retarder parameters from
   their nominal values, quarter-half-quarter wave and zero offsets, with a
   weak prior on the offsets where they trade against the fiber), so that
   imperfect waveplates, mounts whose zero is not on H, or fiber paddles of
   some other retardance are modelled as they are; both senses of rotation
   of every mount that is not a half-wave plate are tried. Weights are
   binomial.

2. **Global design.** ``global_points`` settings spread over the axes'
   range (a Latin hypercube; a waveplate repeats every 180 degrees) give the
   model's parameters with a lever arm of the whole QBER range: the
   direction of ``b_B`` is what sets the optimum, and measurements far from
   the optimum, where the QBER changes fastest with that direction, pin it
   down as well as measurements near it.

3. **Optimum.** The fitted QBER sum is minimised over the angles (a dense
   quasi-random sweep of the model, then L-BFGS-B from its best points and
   from the best measured settings; the model costs no measurement), then
   ``local_points`` settings around that optimum are measured, the model is
   refitted with every measurement and minimised again.

4. **Verification.** ``final_measurements`` acquisitions at the optimum give
   the reported QBER per basis with binomial standard errors. If it is worse
   than the model predicts (by more than 3 sigma plus 0.05 percentage
   points; the model then misses something, e.g. polarization-dependent
   loss), or if the model fits the measurements badly, a model-free polish
   follows while the budget lasts: a trust region of quadratic fits to the
   QBER sum around the best setting, then a new verification; the better
   verified setting is kept.

Every acquisition counts as a measurement against ``max_measurements``; the
first is at the controller's starting setting. By default it is a short probe
from whose count rate the length of the others is chosen, so that each holds
about :data:`TARGET_X_BITS` sifted X-basis bits.

The result's :meth:`PolarizationCalibration.section` is the ``[polarization]``
table of the calibration record (:mod:`qkdctl.calibration.record`: its
``angles_deg`` are applied to the controller's settings); ``to_dict`` adds the
trace of every measurement for ``--json``. With ``plot_dir`` the procedure
writes PNG figures: the trace of the measurements, the model through the
optimum along each axis, and measured against fitted QBER.

Not covered: drifts of the fiber during the calibration (the fit assumes one
``U``; repeat the calibration to track a drift), Alice-side state errors
(the modulator's rotation cannot be compensated at Bob's), and unequal
detector efficiencies, which make the QBER a ratio of linear functions (the
polish takes over where such departures from the model make it miss).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize
from scipy.stats import qmc

from qkdctl.config import BenchConfig
from qkdctl.errors import ConfigError, DataError
from qkdctl.sequence import AliceSequence
from qkdctl.sifting import Sifter, SiftParams

from .acquire import ArmedBench, armed

__all__ = [
    "TARGET_X_BITS",
    "ChainModel",
    "PolarizationCalibration",
    "PolarizationCalibrationError",
    "QberMeasurement",
    "calibrate_polarization",
    "fit_chain_model",
]

log = logging.getLogger(__name__)

#: sifted X-basis bits aimed at per measurement when its length is chosen automatically
TARGET_X_BITS = 2000
#: bounds of the automatic measurement length (s)
MIN_MEASUREMENT_S, MAX_MEASUREMENT_S = 1e-3, 1.0
#: length of the first measurement, which sets the automatic measurement length (s)
PROBE_S = 2e-3
#: sifted but not counted after every move (tags of the previous setting still in flight)
SETTLE_S = 1e-4
#: nominal retardances of a three-axis controller: quarter, half, quarter wave
QHQ_DEG = (90.0, 180.0, 90.0)
#: a waveplate (any retarder) repeats every 180 degrees of its mount
PERIOD_DEG = 180.0
#: the verification may exceed the model's prediction by 3 sigma plus this before a polish
POLISH_MARGIN = 5e-4
#: half-width of the box of the first polish round, and its bounds (degrees)
POLISH_BOX_DEG, POLISH_MIN_BOX_DEG, POLISH_MAX_BOX_DEG = 4.0, 3.0, 12.0
#: a model fit worse than this (chi2 per degree of freedom) is not trusted: polish
CHI2_NDF_MAX = 3.0
#: half-width of the local design around the model's optimum (degrees)
LOCAL_RADIUS_DEG = 6.0
#: bounds of the fitted retarder parameters around their nominal values (degrees)
OFFSET_BOUND_DEG, RETARDANCE_BOUND_DEG = 45.0, 60.0
#: width of the weak prior that holds the offsets near zero (degrees). Some offsets trade
#: against the fiber's rotation (with a half-wave plate second, offsets (o, o/2, 0) and a
#: turn of the fiber about S3 predict the same QBER), so the fitted offsets of the first
#: two axes are only defined up to that trade; the prior keeps them from wandering
OFFSET_PRIOR_DEG = 30.0

BASES = ("Z", "X")


class PolarizationCalibrationError(DataError):
    """The measurements cannot calibrate the polarization (no light, no sifted bits)."""


# ------------------------------------------------------------------------ measurements
@dataclass(frozen=True)
class QberMeasurement:
    """One acquisition at one setting of the axes: sifted bits and errors per basis."""

    index: int
    stage: str
    angles_deg: tuple[float, ...]
    duration_s: float
    sifted: tuple[int, int]
    errors: tuple[int, int]

    @property
    def qber(self) -> tuple[float, float]:
        return tuple(e / n if n else math.nan  # type: ignore[return-value]
                     for e, n in zip(self.errors, self.sifted, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "stage": self.stage,
                "angles_deg": [round(a, 4) for a in self.angles_deg],
                "duration_s": self.duration_s,
                "sifted": dict(zip(BASES, self.sifted, strict=True)),
                "errors": dict(zip(BASES, self.errors, strict=True)),
                "qber": {b: _nan_none(q) for b, q in zip(BASES, self.qber, strict=True)}}


class _Meter:
    """Moves the axes and measures the QBER of each basis on an armed bench."""

    def __init__(self, bench: ArmedBench, cfg: BenchConfig, seed: int, budget: int):
        self.bench = bench
        self.ctl = bench["polarization"]
        self.sifter = Sifter(SiftParams.from_config(cfg, seed),
                             AliceSequence.from_config(cfg.source, seed))
        self.budget = budget
        self.trace: list[QberMeasurement] = []
        self._commanded = [round(float(a), 4) for a in self.ctl.angles_deg()]
        self.acquisition_s = 0.0

    @property
    def left(self) -> int:
        return self.budget - len(self.trace)

    def _sift(self, duration_s: float) -> None:
        tags = self.bench.read(duration_s)
        self.sifter.process(tags.timestamps, tags.channels)
        self.acquisition_s += duration_s

    def move(self, angles) -> None:
        for i, a in enumerate(angles):
            a = round(float(a), 4)
            if self._commanded[i] != a:
                self.ctl.set_angle_deg(i, a)
                self._commanded[i] = a

    def measure(self, angles, duration_s: float, stage: str) -> QberMeasurement:
        if self.left <= 0:
            raise RuntimeError("measurement budget exhausted")  # guarded by the callers
        moved = any(self._commanded[i] != round(float(a), 4) for i, a in enumerate(angles))
        self.move(angles)
        if moved or not self.trace:
            self._sift(SETTLE_S)
        st = self.sifter.stats
        n0, e0 = st.sifted.sum(axis=0).copy(), st.errors.sum(axis=0).copy()
        self._sift(duration_s)
        n, e = st.sifted.sum(axis=0) - n0, st.errors.sum(axis=0) - e0
        m = QberMeasurement(index=len(self.trace), stage=stage,
                            angles_deg=tuple(float(c) for c in self._commanded),
                            duration_s=float(duration_s),
                            sifted=(int(n[0]), int(n[1])), errors=(int(e[0]), int(e[1])))
        self.trace.append(m)
        log.debug("polarization %s #%d at %s: QBER Z %.4f (%d), X %.4f (%d)", stage, m.index,
                  ", ".join(f"{a:.2f}" for a in m.angles_deg), m.qber[0], m.sifted[0],
                  m.qber[1], m.sifted[1])
        return m


# ------------------------------------------------------------------------------ model
def _chain(angles_deg: np.ndarray, offsets_deg: np.ndarray,
           retardances_deg: np.ndarray) -> np.ndarray:
    """Rows 0 and 1 of the Poincare-sphere rotation of the retarder chain, for each
    setting: ``angles_deg`` (M, n) -> (M, 2, 3); the light passes axis 0 first."""
    a = np.radians(2.0 * (np.atleast_2d(angles_deg) + offsets_deg))
    d = np.radians(retardances_deg)
    m = a.shape[0]
    r = np.broadcast_to(np.eye(3), (m, 3, 3)).copy()
    for i in range(a.shape[1]):
        nx, ny = np.cos(a[:, i]), np.sin(a[:, i])
        c, s = math.cos(d[i]), math.sin(d[i])
        p = np.empty((m, 3, 3))
        p[:, 0, 0] = c + (1 - c) * nx * nx
        p[:, 0, 1] = (1 - c) * nx * ny
        p[:, 0, 2] = s * ny
        p[:, 1, 0] = (1 - c) * nx * ny
        p[:, 1, 1] = c + (1 - c) * ny * ny
        p[:, 1, 2] = -s * nx
        p[:, 2, 0] = -s * ny
        p[:, 2, 1] = s * nx
        p[:, 2, 2] = c
        r = p @ r
    return r[:, :2, :]


@dataclass
class ChainModel:
    """The fitted QBER model ``QBER_B(theta) = a_B - b_B . W(theta)[B, :]``.

    ``coef[B] = (a_B, b_B1, b_B2, b_B3)``; ``offsets_deg`` and
    ``retardances_deg`` describe the retarder of each axis. ``chi2`` / ``ndf``:
    the weighted residuals of the fit (about 1 per degree of freedom when the
    model holds and the errors are binomial).
    """

    offsets_deg: np.ndarray
    retardances_deg: np.ndarray
    coef: np.ndarray
    chi2: float
    ndf: int

    def qber(self, angles_deg) -> np.ndarray:
        """Predicted (Z, X) QBER at one setting, or (M, 2) at M settings."""
        a = np.asarray(angles_deg, np.float64)
        rows = _chain(a, self.offsets_deg, self.retardances_deg)
        q = self.coef[:, 0] - np.einsum("mbj,bj->mb", rows, self.coef[:, 1:])
        return q[0] if a.ndim == 1 else q

    @property
    def floor(self) -> np.ndarray:
        """The lowest QBER of each basis the model allows, ``a_B - |b_B|``."""
        return self.coef[:, 0] - np.linalg.norm(self.coef[:, 1:], axis=1)

    @property
    def chi2_ndf(self) -> float:
        return self.chi2 / self.ndf if self.ndf > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"offsets_deg": [round(float(x), 4) for x in self.offsets_deg],
                "retardances_deg": [round(float(x), 4) for x in self.retardances_deg],
                "floor": {b: float(q) for b, q in zip(BASES, self.floor, strict=True)},
                "coefficients": {b: [float(x) for x in c]
                                 for b, c in zip(BASES, self.coef, strict=True)},
                "chi2": float(self.chi2), "ndf": int(self.ndf)}


def _weights(sifted: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Observed QBER and 1/sigma (binomial, with the rule of succession; 0 if no bits)."""
    n = sifted.astype(np.float64)
    q = np.where(n > 0, errors / np.maximum(n, 1.0), 0.0)
    p = (errors + 0.5) / (n + 1.0)
    w = np.where(n > 0, np.sqrt(n / (p * (1.0 - p))), 0.0)
    return q, w


def fit_chain_model(angles_deg, sifted, errors, retardances_deg, *,
                    free: bool = True) -> ChainModel:
    """Fit :class:`ChainModel` to measurements: ``angles_deg`` (M, n), ``sifted`` and
    ``errors`` (M, 2) per basis. ``free``: fit the retarder parameters too (else
    they stay nominal: zero offsets, ``retardances_deg``)."""
    ang = np.asarray(angles_deg, np.float64)
    q, w = _weights(np.asarray(sifted), np.asarray(errors))
    nom = np.asarray(retardances_deg, np.float64)
    n_ax = ang.shape[1]

    def solve(phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = _chain(ang, phi[:n_ax], phi[n_ax:])
        coef = np.zeros((2, 4))
        res = []
        for b in range(2):
            a = np.hstack([np.ones((ang.shape[0], 1)), -rows[:, b, :]])
            coef[b] = np.linalg.lstsq(a * w[:, b, None], q[:, b] * w[:, b], rcond=None)[0]
            res.append((a @ coef[b] - q[:, b]) * w[:, b])
        return coef, np.concatenate(res)

    phi = np.concatenate([np.zeros(n_ax), nom])
    n_data = int((w > 0).sum())
    n_par = 8 + (2 * n_ax if free else 0)
    if free and n_data >= n_par + 4:
        # a mount turning the other way is a retarder of the opposite retardance: try
        # both senses of every axis that is not a half-wave plate, keep the best fit.
        # Turning every sense at once is the mirror image S3 -> -S3, which the Z and X
        # bases cannot see: the first such axis keeps its sense.
        flip = [i for i in range(n_ax) if nom[i] % 180.0 != 0.0]
        best_cost = math.inf
        for signs in itertools.product((1.0, -1.0), repeat=len(flip)):
            if signs and signs[0] < 0:
                continue
            start = nom.copy()
            for i, sg in zip(flip, signs, strict=True):
                start[i] = nom[i] if sg > 0 else 360.0 - nom[i]
            lo = np.concatenate([np.full(n_ax, -OFFSET_BOUND_DEG),
                                 start - RETARDANCE_BOUND_DEG])
            hi = np.concatenate([np.full(n_ax, OFFSET_BOUND_DEG), start + RETARDANCE_BOUND_DEG])
            try:
                fit = optimize.least_squares(lambda p: np.concatenate(
                                                 [solve(p)[1], p[:n_ax] / OFFSET_PRIOR_DEG]),
                                             np.concatenate([np.zeros(n_ax), start]),
                                             bounds=(lo, hi), x_scale=5.0)
            except (ValueError, np.linalg.LinAlgError) as e:  # pragma: no cover - defensive
                log.warning("polarization: retarder fit failed (%s)", e)
                continue
            if np.all(np.isfinite(fit.x)) and fit.cost < best_cost:
                phi, best_cost = fit.x, float(fit.cost)
    else:
        n_par = 8
    if np.sum(np.sin(np.radians(phi[n_ax:]))) < 0:
        # the mirror image (every retardance negated, S3 -> -S3) predicts the same:
        # report the one whose retardances are mostly below half a turn
        phi = np.concatenate([phi[:n_ax], np.mod(-phi[n_ax:], 360.0)])
    coef, res = solve(phi)
    return ChainModel(offsets_deg=phi[:n_ax].copy(), retardances_deg=phi[n_ax:].copy(),
                      coef=coef, chi2=float(res @ res), ndf=max(n_data - n_par, 0))


# --------------------------------------------------------------------------- optimum
@dataclass(frozen=True)
class _Ranges:
    """Where each axis may go: ``[lo, lo + span]``; ``periodic`` when the span covers a
    full period of a waveplate (then any angle is brought back into the range)."""

    lo: np.ndarray
    span: np.ndarray

    @property
    def periodic(self) -> np.ndarray:
        return self.span >= PERIOD_DEG

    def bounds(self) -> list[tuple[float | None, float | None]]:
        return [(None, None) if p else (float(lo), float(lo + s))
                for lo, s, p in zip(self.lo, self.span, self.periodic, strict=True)]

    def fold(self, angles) -> np.ndarray:
        """Angles (one setting, or one per row) brought into the ranges: wrapped by whole
        periods where the axis is periodic, clipped to the range elsewhere."""
        a = np.asarray(angles, np.float64)
        a = np.where(self.periodic, self.lo + np.mod(a - self.lo, PERIOD_DEG), a)
        return np.clip(a, self.lo, self.lo + np.minimum(self.span, np.nextafter(PERIOD_DEG, 0)))

    def scale(self, u: np.ndarray) -> np.ndarray:
        """Points of the unit cube to angles (a period, or the range, per axis)."""
        return self.lo + u * np.minimum(self.span, PERIOD_DEG)


def _ranges(ctl, n_ax: int) -> _Ranges:
    lo, hi = ctl.limits.get("min_angle_deg"), ctl.limits.get("max_angle_deg")
    if lo is None and hi is None:
        lo, hi = 0.0, PERIOD_DEG
    elif lo is None:
        lo = hi - PERIOD_DEG
    elif hi is None:
        hi = lo + PERIOD_DEG
    if not hi > lo:
        raise ConfigError(f"{ctl.name}: limits min_angle_deg = {lo:g}, max_angle_deg = {hi:g} "
                          "leave the axes no room to move")
    return _Ranges(np.full(n_ax, float(lo)), np.full(n_ax, float(min(hi - lo, PERIOD_DEG))))


def _minimise(fun, starts, ranges: _Ranges) -> np.ndarray:
    """The best local minimum of ``fun`` from the ``starts`` (within the ranges)."""
    best_x, best_f = None, math.inf
    bounds = ranges.bounds()
    for s in starts:
        r = optimize.minimize(fun, np.asarray(s, np.float64), method="L-BFGS-B",
                              bounds=bounds)
        if r.fun < best_f:
            best_x, best_f = r.x, float(r.fun)
    return ranges.fold(best_x)


def _model_optimum(model: ChainModel, ranges: _Ranges, measured: list[QberMeasurement],
                   rng: np.random.Generator) -> np.ndarray:
    """Minimum of the model's QBER sum: the best of a dense quasi-random sweep of the
    ranges and of the best measured settings, each refined by L-BFGS-B."""
    n_ax = len(ranges.lo)
    sweep = ranges.scale(qmc.Sobol(d=n_ax, seed=rng).random(4096))
    f = model.qber(sweep).sum(axis=1)
    best = sorted(measured, key=lambda m: sum(m.qber))[:2]
    starts = [sweep[i] for i in np.argsort(f)[:4]] + [np.array(m.angles_deg) for m in best]
    return _minimise(lambda t: float(model.qber(t).sum()), starts, ranges)


# ------------------------------------------------------------------------------ polish
def _quadratic_features(x: np.ndarray) -> np.ndarray:
    n = x.shape[1]
    cols = [np.ones(x.shape[0])] + [x[:, i] for i in range(n)]
    cols += [x[:, i] * x[:, j] for i in range(n) for j in range(i, n)]
    return np.stack(cols, axis=1)


def _polish(meter: _Meter, centre: np.ndarray, ranges: _Ranges, duration_s: float,
            reserve: int, rng: np.random.Generator) -> np.ndarray:
    """Model-free refinement: a trust region on quadratic fits of the QBER sum.

    Each round measures a design in a box of half-width ``r`` around the centre
    (the centre, both ends of every axis and a Latin hypercube), fits a full
    quadratic to the QBER sum by weighted least squares and moves to its
    minimum in the box. A step to the edge of the box widens it, a step inside
    narrows it; a round whose fitted QBER at its centre is worse than the
    previous round's at its own by more than two standard errors goes back. It
    ends when a step inside the box has twice in a row not been a significant
    improvement (below two standard errors of the fit; such a step is taken,
    in a narrower box) or when only ``reserve`` measurements are left, and
    returns the setting of lowest fitted QBER sum it has seen. Its measurements
    are twice as long as the others: near the optimum the QBER changes little.
    """
    n_ax = centre.shape[0]
    n_coef = 1 + n_ax + n_ax * (n_ax + 1) // 2
    n_pts = 2 * n_coef
    box = POLISH_BOX_DEG
    prev: tuple[np.ndarray, float, float] | None = None  # centre, fitted sum there, its error
    best: tuple[np.ndarray, float] | None = None  # the centre of lowest fitted sum so far
    pending: tuple[np.ndarray, float] | None = None  # a step not yet measured, its forecast
    quiet = 0  # rounds in a row whose step was not a significant improvement
    while meter.left - reserve >= n_pts:
        u = np.vstack([np.zeros((1, n_ax)), np.eye(n_ax), -np.eye(n_ax),
                       qmc.LatinHypercube(d=n_ax, seed=rng).random(n_pts - 1 - 2 * n_ax) * 2
                       - 1])
        meas = [meter.measure(p, 2 * duration_s, "polish")
                for p in ranges.fold(centre + box * u)]
        x = (np.array([m.angles_deg for m in meas]) - centre + 90.0) % PERIOD_DEG - 90.0
        q, w = _weights(np.array([m.sifted for m in meas]), np.array([m.errors for m in meas]))
        var = 1.0 / np.maximum(w[:, 0], 1e-12) ** 2 + 1.0 / np.maximum(w[:, 1], 1e-12) ** 2
        f = _quadratic_features(x / box) / np.sqrt(var)[:, None]
        c = np.linalg.lstsq(f, q.sum(axis=1) / np.sqrt(var), rcond=None)[0]
        cov = np.linalg.pinv(f.T @ f)

        def quad(z: np.ndarray, c: np.ndarray = c, box: float = box) -> float:
            return float((_quadratic_features(z[None, :] / box) @ c)[0])

        phi0 = _quadratic_features(np.zeros((1, n_ax)))[0]
        here, here_err = float(phi0 @ c), float(math.sqrt(phi0 @ cov @ phi0))
        pending = None
        if prev is not None and here > prev[1] + 2 * math.hypot(here_err, prev[2]):
            log.info("polarization polish: %.4f at the new setting, %.4f before; back",
                     here, prev[1])
            centre, box, prev = prev[0], max(box * 0.5, POLISH_MIN_BOX_DEG), None
            continue
        step = None
        for s0 in (np.zeros(n_ax), x[np.argmin(q.sum(axis=1))]):
            r = optimize.minimize(quad, s0, method="L-BFGS-B", bounds=[(-box, box)] * n_ax)
            if step is None or r.fun < quad(step):
                step = r.x
        g = phi0 - _quadratic_features(step[None, :] / box)[0]
        gain, gain_err = float(g @ c), float(math.sqrt(max(g @ cov @ g, 0.0)))
        log.info("polarization polish: box +-%.2f deg, QBER sum %.4f, step %s (gain %.4f "
                 "+- %.4f)", box, here, ", ".join(f"{d:+.2f}" for d in step), gain, gain_err)
        if best is None or here < best[1]:
            best = (centre, here)
        edge = float(np.max(np.abs(step))) >= 0.9 * box
        quiet = quiet + 1 if gain < 2 * gain_err and not edge else 0
        if quiet >= 2 or gain <= 0:
            break
        prev = (centre, here, here_err)
        centre = ranges.fold(centre + step)
        pending = (centre, here - gain)
        box = min(box * 1.5, POLISH_MAX_BOX_DEG) if edge else max(box * 0.7,
                                                                   POLISH_MIN_BOX_DEG)
    if best is None or (pending is not None and pending[1] < best[1]):
        return centre
    return best[0]


# ------------------------------------------------------------------------------ result
@dataclass
class PolarizationCalibration:
    """The result of :func:`calibrate_polarization`."""

    bench: str
    seed: int
    angles_deg: list[float]
    qber: tuple[float, float]
    qber_std: tuple[float, float]
    sifted: tuple[int, int]
    predicted_qber: tuple[float, float]
    initial_angles_deg: list[float]
    initial_qber: tuple[float, float]
    measurements: int
    max_measurements: int
    measurement_s: float
    acquisition_s: float
    model: ChainModel
    polished: bool
    trace: list[QberMeasurement]
    runtime_s: float = 0.0
    plots: list[str] = field(default_factory=list)

    def section(self) -> dict[str, Any]:
        """The ``[polarization]`` table of the calibration record."""
        return {
            "angles_deg": [round(a, 4) for a in self.angles_deg],
            "qber": _by_basis(self.qber),
            "qber_uncertainty": _by_basis(self.qber_std),
            "sifted": dict(zip(BASES, (int(n) for n in self.sifted), strict=True)),
            "predicted_qber": _by_basis(self.predicted_qber),
            "initial_angles_deg": [round(a, 4) for a in self.initial_angles_deg],
            "initial_qber": _by_basis(self.initial_qber),
            "objective": "sum",
            "measurements": int(self.measurements),
            "measurement_s": _sig(self.measurement_s),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (``qkdctl calibrate polarization --json``)."""
        out = self.section()
        for k in ("qber", "qber_uncertainty", "predicted_qber", "initial_qber"):
            out[k] = {b: _nan_none(v) for b, v in out[k].items()}
        out.update({
            "bench": self.bench, "seed": self.seed,
            "max_measurements": int(self.max_measurements),
            "acquisition_s": round(self.acquisition_s, 6),
            "runtime_s": round(self.runtime_s, 3), "polished": self.polished,
            "model": self.model.to_dict(), "plots": list(self.plots),
            "trace": [m.to_dict() for m in self.trace]})
        return out


def _sig(x: float, digits: int = 4) -> float:
    if not math.isfinite(x) or x == 0.0:
        return float(x)
    return float(f"{x:.{digits}g}")


def _by_basis(values) -> dict[str, float]:
    return {b: _sig(float(v)) for b, v in zip(BASES, values, strict=True)}


def _nan_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _pooled(meas: list[QberMeasurement]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QBER, binomial standard error and sifted bits of measurements pooled together."""
    n = np.sum([m.sifted for m in meas], axis=0).astype(np.float64)
    e = np.sum([m.errors for m in meas], axis=0).astype(np.float64)
    q = np.where(n > 0, e / np.maximum(n, 1.0), np.nan)
    return q, np.sqrt(q * (1.0 - q) / np.maximum(n, 1.0)), n


# --------------------------------------------------------------------------- procedure
def calibrate_polarization(cfg: BenchConfig, *, seed: int = 0,
                           bench: dict[str, Any] | None = None, max_measurements: int = 200,
                           measurement_s: float | None = None,
                           plot_dir: str | os.PathLike | None = None,
                           global_points: int = 24, local_points: int = 12,
                           final_measurements: int = 10,
                           retardances_deg: tuple[float, ...] | None = None,
                           fit_retarders: bool = True) -> PolarizationCalibration:
    """Set Bob's polarization compensation (``qkdctl calibrate polarization``).

    Needs a polarization controller (``[instruments.polarization]``). Each
    measurement is an acquisition of ``measurement_s`` seconds of bench time
    (default: chosen from the first, a probe at the starting setting, for about
    :data:`TARGET_X_BITS` sifted X-basis bits); at most ``max_measurements`` are
    taken. ``global_points``,
    ``local_points`` and ``final_measurements`` size the stages of the module
    documentation; ``retardances_deg`` are the nominal retardances of the axes
    (default quarter, half, quarter wave for three axes); ``fit_retarders=False``
    keeps them, and zero offsets, instead of fitting them. On the simulated bench
    ``seed`` keys the acquisition, Alice's sequence and the design; ``bench``
    replaces the instruments built from the configuration. With ``plot_dir`` PNG
    figures are written there. The controller is left at the calibrated angles.
    """
    t_start = time.perf_counter()
    for name, v, lo in (("global_points", global_points, 4), ("local_points", local_points, 0),
                        ("final_measurements", final_measurements, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"calibrate polarization: {name} = {v!r}: give an integer "
                              f">= {lo}")
    if measurement_s is not None and not (
            isinstance(measurement_s, int | float) and not isinstance(measurement_s, bool)
            and math.isfinite(measurement_s) and measurement_s > 0):
        raise ConfigError(f"calibrate polarization: measurement_s = {measurement_s!r}: give "
                          "a positive number of seconds")
    needed = 1 + global_points + local_points + final_measurements
    if isinstance(max_measurements, bool) or not isinstance(max_measurements, int) \
            or max_measurements < needed:
        raise ConfigError(f"calibrate polarization: max_measurements = {max_measurements!r}: "
                          f"the stages need at least {needed} (one at the starting setting, "
                          "global_points, local_points and final_measurements)")
    roles = bench if bench is not None else cfg.instruments
    if "polarization" not in roles:
        raise ConfigError(f"{cfg.path}: instruments: calibrate polarization needs a "
                          "polarization controller ([instruments.polarization])")
    rng = np.random.default_rng([int(seed), 0x504F4C])

    with armed(cfg, seed=seed, bench=bench) as b:
        ctl = b["polarization"]
        n_ax = ctl.axes
        if retardances_deg is None:
            if n_ax != 3:
                raise ConfigError(f"calibrate polarization: {ctl.name} has {n_ax} axes; give "
                                  "the nominal retardances_deg of each")
            retardances_deg = QHQ_DEG
        if len(retardances_deg) != n_ax:
            raise ConfigError(f"calibrate polarization: retardances_deg has "
                              f"{len(retardances_deg)} entries for {n_ax} axes")
        ranges = _ranges(ctl, n_ax)
        meter = _Meter(b, cfg, seed, max_measurements)
        # the starting setting; it sets the measurement length unless given
        first = meter.measure(ranges.fold(ctl.angles_deg()),
                              PROBE_S if measurement_s is None else measurement_s, "start")
        if first.sifted[1] == 0:
            raise PolarizationCalibrationError(
                f"calibrate polarization: no sifted X-basis bit in {first.duration_s * 1e3:g} "
                "ms; is the light reaching the detectors and are the delays calibrated?")
        if measurement_s is None:
            rate_x = first.sifted[1] / first.duration_s
            measurement_s = float(np.clip(TARGET_X_BITS / rate_x, MIN_MEASUREMENT_S,
                                          MAX_MEASUREMENT_S))
            log.info("polarization: %.0f sifted X bits/s; measurements of %.3g ms", rate_x,
                     measurement_s * 1e3)
        dur = float(measurement_s)

        # global design, fit, optimum
        design = ranges.scale(qmc.LatinHypercube(d=n_ax, seed=rng).random(global_points))
        for p in design:
            meter.measure(p, dur, "global")
        model = _fit(meter.trace, retardances_deg, fit_retarders)
        best = _model_optimum(model, ranges, meter.trace, rng)
        log.info("polarization: global model chi2/ndf %.2f, optimum %s", model.chi2_ndf,
                 ", ".join(f"{a:.3f}" for a in best))

        # local design around it, refit
        if local_points:
            u = np.vstack([np.eye(n_ax), -np.eye(n_ax),
                           qmc.LatinHypercube(d=n_ax, seed=rng).random(
                               max(local_points - 2 * n_ax, 0)) * 2 - 1])[:local_points]
            for p in ranges.fold(best + LOCAL_RADIUS_DEG * u):
                meter.measure(p, dur, "local")
            model = _fit(meter.trace, retardances_deg, fit_retarders)
            best = _model_optimum(model, ranges, meter.trace, rng)
            log.info("polarization: model chi2/ndf %.2f, optimum %s", model.chi2_ndf,
                     ", ".join(f"{a:.3f}" for a in best))

        # verification, and the polish if the model falls short
        final = [meter.measure(best, dur, "final") for _ in range(final_measurements)]
        q, s, n = _pooled(final)
        predicted = model.qber(best)
        excess = float(np.sum(q) - np.sum(predicted))
        sigma = float(math.hypot(*s))
        polished = False
        n_polish = 2 * (1 + n_ax + n_ax * (n_ax + 1) // 2)
        if (excess > 3 * sigma + POLISH_MARGIN or model.chi2_ndf > CHI2_NDF_MAX) \
                and meter.left >= final_measurements + n_polish:
            log.info("polarization: QBER sum %.4f, the model predicts %.4f (chi2/ndf %.2f); "
                     "polishing", np.sum(q), np.sum(predicted), model.chi2_ndf)
            cand = _polish(meter, best, ranges, dur, final_measurements, rng)
            final2 = [meter.measure(cand, dur, "final") for _ in range(final_measurements)]
            q2, s2, n2 = _pooled(final2)
            if np.sum(q2) < np.sum(q):
                best, q, s, n, polished = cand, q2, s2, n2, True
                predicted = model.qber(best)
        meter.move(best)

    result = PolarizationCalibration(
        bench=cfg.name, seed=int(seed), angles_deg=[round(float(a), 4) for a in best],
        qber=(float(q[0]), float(q[1])), qber_std=(float(s[0]), float(s[1])),
        sifted=(int(n[0]), int(n[1])),
        predicted_qber=(float(predicted[0]), float(predicted[1])),
        initial_angles_deg=list(first.angles_deg), initial_qber=first.qber,
        measurements=len(meter.trace), max_measurements=max_measurements,
        measurement_s=dur, acquisition_s=meter.acquisition_s, model=model,
        polished=polished, trace=meter.trace)
    log.info("polarization on %s: angles %s, QBER Z %.4f +- %.4f, X %.4f +- %.4f "
             "(%d measurements)", cfg.name, ", ".join(f"{a:.3f}" for a in result.angles_deg),
             q[0], s[0], q[1], s[1], result.measurements)
    if plot_dir is not None:
        result.plots = _plot(result, os.fspath(plot_dir))
    result.runtime_s = time.perf_counter() - t_start
    return result


def _fit(trace: list[QberMeasurement], retardances_deg, free: bool) -> ChainModel:
    use = [m for m in trace if m.stage != "final"]
    model = fit_chain_model([m.angles_deg for m in use], [m.sifted for m in use],
                            [m.errors for m in use], retardances_deg, free=free)
    if not np.all(np.isfinite(model.coef)):
        raise PolarizationCalibrationError("calibrate polarization: the QBER model could not "
                                           "be fitted (no sifted bits?)")
    return model


# ------------------------------------------------------------------------------ figures
def _plot(res: PolarizationCalibration, plot_dir: str) -> list[str]:
    """PNG figures of the calibration; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    paths = []
    tr = res.trace
    idx = np.array([m.index for m in tr])
    qb = np.array([m.qber for m in tr]) * 100
    stages = [m.stage for m in tr]
    colours = {"start": "0.5", "global": "C0", "local": "C1", "polish": "C2", "final": "C3"}

    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for ax, b in zip(axes, range(2), strict=True):
        for st, col in colours.items():
            sel = np.array([s == st for s in stages])
            if sel.any():
                ax.plot(idx[sel], qb[sel, b], "o", ms=3, color=col, label=st)
        ax.axhline(res.qber[b] * 100, color="k", ls="--", lw=0.7,
                   label=f"final {res.qber[b] * 100:.3f} +- {res.qber_std[b] * 100:.3f} %")
        ax.set_yscale("log")
        ax.set_ylabel(f"QBER {BASES[b]} (%)")
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    axes[-1].set_xlabel("measurement")
    axes[0].set_title(f"{res.bench}: {res.measurements} measurements of "
                      f"{res.measurement_s * 1e3:.3g} ms", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, plot_dir, "polarization_trace.png"))

    n_ax = len(res.angles_deg)
    fig, axes = plt.subplots(n_ax, 1, figsize=(7, 2.2 * n_ax), squeeze=False)
    best = np.array(res.angles_deg)
    for i, ax in enumerate(axes[:, 0]):
        t = best[i] + np.linspace(-90.0, 90.0, 721)
        pts = np.repeat(best[None, :], t.shape[0], axis=0)
        pts[:, i] = t
        pred = res.model.qber(pts) * 100
        ax.plot(t, pred[:, 0], "C0-", lw=1, label="model Z")
        ax.plot(t, pred[:, 1], "C1-", lw=1, label="model X")
        # measurements within a degree of the optimum on the other axes
        for m in tr:
            d = (np.array(m.angles_deg) - best + 90.0) % PERIOD_DEG - 90.0
            if m.stage != "final" and np.all(np.abs(np.delete(d, i)) < 1.0):
                ax.plot(best[i] + d[i], m.qber[0] * 100, "C0o", ms=3)
                ax.plot(best[i] + d[i], m.qber[1] * 100, "C1s", ms=3)
        ax.axvline(best[i], color="k", ls=":", lw=0.7)
        ax.set_yscale("log")
        ax.set_ylabel("QBER (%)")
        ax.set_title(f"axis {i}: retardance {res.model.retardances_deg[i]:.1f} deg, offset "
                     f"{res.model.offsets_deg[i]:+.2f} deg; others at the optimum", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("axis angle (deg)")
    fig.tight_layout()
    paths.append(_save(fig, plot_dir, "polarization_axes.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    use = [m for m in tr if m.stage != "final"]
    pred = res.model.qber(np.array([m.angles_deg for m in use])) * 100
    meas = np.array([m.qber for m in use]) * 100
    ax.plot(pred[:, 0], meas[:, 0], "C0o", ms=3, label="Z")
    ax.plot(pred[:, 1], meas[:, 1], "C1s", ms=3, label="X")
    hi = float(np.nanmax([pred.max(), np.nanmax(meas)])) * 1.05 + 0.1
    ax.plot([0, hi], [0, hi], "k-", lw=0.5)
    ax.set_xlabel("model QBER (%)")
    ax.set_ylabel("measured QBER (%)")
    ax.set_title(f"fit chi2/ndf = {res.model.chi2_ndf:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, plot_dir, "polarization_fit.png"))
    return paths


def _save(fig, plot_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(plot_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
