"""``qkdctl calibrate delays``: clock, detector delays and the analysis gate.

:func:`calibrate_delays` takes a short acquisition on the bench (laser on,
then optionally a dark stretch with the laser off) and finds what the
sifting core (:mod:`qkdctl.sifting`) needs to refer every detection to the
right pulse of Alice:

1. **Clock** (:func:`fit_sync`). The sync tags are numbered as the sifter
   numbers them (the first one is ``analysis.first_sync_pulse``, then
   ``sync_period_pulses`` per sync interval, gaps counted, tags off the grid
   dropped) and their times are fitted by least squares against the pulse
   number: the slope is the pulse period on the tagger's clock, hence the
   clock drift against the nominal rate, with the standard errors of the
   fit (the scatter of the residuals is the sync jitter).

2. **Coarse delay** (:func:`coarse_search`). As the sifter does, a detection
   at time ``t`` on channel ``c`` is referred to the last sync tag before it:
   ``x = t - t_sync``; with the delay ``D`` its pulse is
   ``p_sync + round((x - D) / P)`` and its phase ``x - D - slot P``. The phase
   histogram fixes ``D`` modulo the period; the integer number of periods
   (the sync alone fixes time only modulo the sync period, and the search
   spans ``+-search_ps``, by default +-1.5 us, i.e. more than one sync period
   at 1 GHz) comes from the cross-correlation of the detections with Alice's
   known sequence, as qcrypto's ``pfind`` finds the time offset between the
   two sides by an FFT cross-correlation of their event streams. Here the
   detections of a window of pulses are histogrammed by their provisional
   pulse number and correlated, for every candidate offset at once, with the
   detector's expected response to Alice's state of each pulse,
   ``g(code) = mu_k o(code) - mean`` (``mu_k`` the pulse's mean photon
   number, ``o`` = 1 when Alice's state is the one the detector measures, 0
   for the orthogonal state, 1/2 for the other basis). The correlation is
   done with FFTs over segments of the window, whose spectra are summed
   (overlap-save), so its cost grows with the window, not with its square;
   when the detections are too sparse for a dense window (weak light), the
   same sums are taken detection by detection.
   The intensity alone already makes a strong peak (a detection is far more
   often a signal pulse than a decoy or vacuum pulse), the basis and bit
   sharpen it. The peak's significance is reported in standard deviations
   of the correlation off the peak; a search without a clear peak raises
   :class:`DelayCalibrationError`. With a repeating pattern the offset is
   only defined modulo the pattern length; the search then spans one
   pattern length around the configured delay.

3. **Fine delay and jitter** (:func:`fit_arrival`). With the coarse delay,
   the phase histogram of all the channel's detections over one period is
   fitted by binned Poisson maximum likelihood with a Gaussian (wrapped
   around the period, so that a neighbouring pulse's tail is modelled too),
   integrated over each bin, on a flat background. The delay is the coarse
   delay plus the fitted centre; its uncertainty and that of the RMS jitter
   come from the inverse Fisher information of the fit, scaled up by
   ``sqrt(chi2 / ndf)`` when the model fits worse than the counts allow. The
   jitter is what the sifter sees: detector and tagger jitter, the sync
   tag's jitter and the tagger's bins together. The delay is where the
   detections actually sit, which is what the sifter needs (dead time, for
   one, pulls the mean arrival a few hundredths of a ps late: a pulse just
   after the detector recovers is seen only by its later photons). Counts
   beyond 4 sigma are compared with the fit (``tail_ratio``): heavier tails
   than a Gaussian show there. Each aligned detection is then looked up in
   Alice's sequence: the fraction of detections in the detector's basis
   whose bit is wrong (``qber``) checks the alignment and the channel
   mapping end to end; about 1/2 means a lock on a wrong pulse offset and
   raises :class:`DelayCalibrationError`, near 1 a swapped bit (a warning).

4. **Gate width** (:class:`GateModel`). The sifter keeps a detection when its
   phase is in ``[-w/2, w/2)``. A wider gate keeps more of the jitter
   distribution but lets in more background (dark counts, afterpulses,
   stray light: the fitted flat level, or its pool with the dark stretch
   when that is higher, so a dark run never hides light-induced
   background) and,
   when the period is short, the tails of the neighbouring pulses. From the
   measured per-detector click probability for each of Alice's codes, the
   Gaussian fit, the background and the squashing of multi-clicks as the
   sifter does it, the model predicts the sifted counts and errors per
   intensity and basis for any ``w``, scales them to a block of
   ``postprocess.block_bits`` key bits and feeds the finite-key bound of the
   bench's protocol (:func:`qkdctl.postprocess.finite_key.key_length`, error
   correction at ``f_EC`` = 1.16). The chosen gate maximises that secret-key
   rate. When that bound yields no key at any width (too few counts for a
   block of that size), the gate maximises the asymptotic BB84 rate with the
   phase error taken as the test-basis error rate instead
   (``key_rate_model``). The optimum is shallow: its location is set by
   where the Gaussian tail (a few 1e-7 of the counts at 5 sigma) balances
   the background, so it rests on the Gaussian model there, and widths
   within 0.01 % of the best rate are reported as ``gate_width_range_ps``.

The result's :meth:`DelayCalibration.section` is the ``[delays]`` table of
the calibration record (:mod:`qkdctl.calibration.record`); ``to_dict`` adds
the details for ``--json``. With ``plot_dir`` the procedure writes PNG
figures: the arrival histograms with their fits, the coarse correlations,
the gate scan and the sync residuals.

Not covered: a time-varying drift (the fit is linear over the acquisition;
the sifter tracks the period itself), per-channel gates (the sifter has one
width), non-Gaussian jitter models, and the dead-time coupling between the
detectors in the rate model.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft as sfft
from scipy import optimize
from scipy.special import ndtr

from qkdctl.config import BenchConfig
from qkdctl.errors import ConfigError, DataError
from qkdctl.postprocess.finite_key import DecoyStatistics, FiniteKeyError, _h, key_length
from qkdctl.sequence import MODE_PATTERN, AliceSequence
from qkdctl.sifting import SiftParams

from .acquire import Tags, armed

__all__ = [
    "ChannelDelay",
    "CoarseSearch",
    "DelayCalibration",
    "DelayCalibrationError",
    "GateModel",
    "SyncFit",
    "calibrate_delays",
    "coarse_search",
    "fit_arrival",
    "fit_sync",
]

log = logging.getLogger(__name__)

#: error-correction efficiency assumed by the key-rate estimate (Lim et al. 2014)
EC_EFFICIENCY = 1.16
#: a coarse correlation peak must stand this many standard deviations above the rest
MIN_SIGNIFICANCE = 6.5
#: detections per channel used by the coarse search (more are taken if the peak is weak)
COARSE_DETECTIONS = 4000
#: longest window of pulses correlated by FFT; sparser detections are summed one by one
MAX_WINDOW_PULSES = 1 << 24
#: the dark stretch ignores its first 10 us (light still in flight when the laser stops)
DARK_GUARD_PS = 10_000_000
#: widths within this fraction of the best rate form ``gate_width_range_ps``
FLAT_FRACTION = 1e-4
#: images of the Gaussian one period away and further included in the fits
WRAPS = (-2, -1, 0, 1, 2)


class DelayCalibrationError(DataError):
    """The acquisition does not determine the delays (no light, no sync, no peak)."""


# ------------------------------------------------------------------------------ clock
@dataclass
class SyncFit:
    """Linear fit of the sync tag times against their pulse numbers.

    ``period_ps`` is the pulse period on the tagger's clock; ``t0_ps`` the
    fitted tagger time of the first sync's pulse. Uncertainties are the
    standard errors of the least-squares fit.
    """

    period_ps: float
    period_uncertainty_ps: float
    nominal_period_ps: float
    clock_drift_ppm: float
    clock_drift_uncertainty_ppm: float
    t0_ps: float
    t0_uncertainty_ps: float
    residual_rms_ps: float
    n_syncs: int
    rejected: int
    missing: int
    times: np.ndarray = field(repr=False)
    pulses: np.ndarray = field(repr=False)
    residuals_ps: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "period_ps", "period_uncertainty_ps", "nominal_period_ps", "clock_drift_ppm",
            "clock_drift_uncertainty_ppm", "t0_ps", "t0_uncertainty_ps", "residual_rms_ps",
            "n_syncs", "rejected", "missing")}


def _accept_syncs(t: np.ndarray, period: float, sync_period: int
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Indices of the accepted sync tags and their sync-interval steps, as the sifter does."""
    span = period * sync_period
    d = np.diff(t).astype(np.float64)
    k = np.rint(d / span)
    resid = d - k * span
    if np.all((k >= 1) & (np.abs(resid) < 0.5 * period)):
        return np.arange(t.shape[0]), k.astype(np.int64), 0
    keep = [0]
    steps = []
    last = t[0]
    for i in range(1, t.shape[0]):
        iv = float(t[i] - last)
        kk = math.floor(iv / span + 0.5)
        r = iv - kk * span
        if kk < 1 or not -0.5 * period <= r < 0.5 * period:
            continue
        keep.append(i)
        steps.append(kk)
        last = t[i]
    return np.array(keep), np.array(steps, np.int64), t.shape[0] - len(keep)


def fit_sync(sync_times: np.ndarray, nominal_period_ps: float, sync_period_pulses: int,
             first_sync_pulse: int = 0) -> SyncFit:
    """Pulse period, clock drift and sync phase from the sync tag times (int64 ps)."""
    t = np.asarray(sync_times, np.int64)
    if t.shape[0] < 3:
        raise DelayCalibrationError(f"{t.shape[0]} sync tags in the acquisition; the clock "
                                    "fit needs at least 3 (is the sync cable connected?)")
    span_nom = nominal_period_ps * sync_period_pulses
    d = np.diff(t).astype(np.float64)
    k0 = np.rint(d / span_nom)
    one = np.abs(d / span_nom - 1.0) < 0.25
    period = float(np.median(d[one]) / sync_period_pulses) if one.any() else nominal_period_ps
    if not np.any(k0 >= 1):
        raise DelayCalibrationError("sync tags closer together than one sync period "
                                    f"({span_nom:g} ps): check source.sync_period_pulses")
    idx, steps, rejected = _accept_syncs(t, period, sync_period_pulses)
    times = t[idx]
    pulses = first_sync_pulse + sync_period_pulses * np.concatenate(
        [[0], np.cumsum(steps)]).astype(np.int64)
    x = (pulses - pulses[0]).astype(np.float64)
    y = (times - times[0]).astype(np.float64)
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    icpt = ym - slope * xm
    res = y - (icpt + slope * x)
    n = x.shape[0]
    s2 = float((res ** 2).sum() / max(n - 2, 1))
    # quantisation of the tags (1/12 of a bin squared) bounds the scatter from below
    s2 = max(s2, 1.0 / 12.0)
    se_slope = math.sqrt(s2 / sxx)
    se_icpt = math.sqrt(s2 * (1.0 / n + xm * xm / sxx))
    return SyncFit(
        period_ps=slope, period_uncertainty_ps=se_slope, nominal_period_ps=nominal_period_ps,
        clock_drift_ppm=(slope / nominal_period_ps - 1.0) * 1e6,
        clock_drift_uncertainty_ppm=se_slope / nominal_period_ps * 1e6,
        t0_ps=float(times[0]) + icpt, t0_uncertainty_ps=se_icpt,
        residual_rms_ps=float(np.sqrt((res ** 2).mean())), n_syncs=int(n),
        rejected=int(rejected), missing=int(steps.sum() - steps.shape[0]),
        times=times, pulses=pulses, residuals_ps=res)


def _refer(ts: np.ndarray, sync: SyncFit) -> tuple[np.ndarray, np.ndarray]:
    """Each detection's time since the last sync tag (ps) and that sync's pulse number."""
    i = np.searchsorted(sync.times, ts, side="right") - 1
    ok = i >= 0
    i = i[ok]
    return (ts[ok] - sync.times[i]).astype(np.float64), sync.pulses[i]


# ------------------------------------------------------------------------------ coarse
@dataclass
class CoarseSearch:
    """The coarse search of one channel: phase peak and correlation over pulse offsets.

    ``delay_ps`` is the coarse delay (integer ps), ``offsets_ps`` the candidate
    delays and ``score`` the correlation in standard deviations of its
    off-peak values.
    """

    channel: int
    delay_ps: int
    phase_ps: float
    offset_pulses: int
    significance: float
    runner_up: float
    detections: int
    window_pulses: int
    offsets_ps: np.ndarray = field(repr=False)
    score: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"delay_ps": self.delay_ps, "phase_ps": self.phase_ps,
                "offset_pulses": self.offset_pulses, "significance": self.significance,
                "runner_up": self.runner_up, "detections": self.detections,
                "window_pulses": self.window_pulses}


def _response_table(cfg: BenchConfig, basis: int, bit: int, probs: np.ndarray) -> np.ndarray:
    """``g(code)``: the detector's expected relative response to each code, mean removed."""
    mus = np.asarray(cfg.source.mean_photon_numbers, np.float64)
    g = np.zeros(16, np.float64)
    for code in range(16):
        k = code >> 2
        if k >= mus.shape[0]:
            continue
        a, x = (code >> 1) & 1, code & 1
        overlap = (1.0 if x == bit else 0.0) if a == basis else 0.5
        g[code] = mus[k] * overlap
    g -= (g * probs).sum()
    return g


def _intensity_table(cfg: BenchConfig, probs: np.ndarray) -> np.ndarray:
    """``g(code)``: the response to Alice's intensity class alone, mean removed."""
    mus = np.asarray(cfg.source.mean_photon_numbers, np.float64)
    g = np.zeros(16, np.float64)
    for code in range(16):
        if (code >> 2) < mus.shape[0]:
            g[code] = mus[code >> 2]
    g -= (g * probs).sum()
    return g


def _phase_peak(x: np.ndarray, period: float) -> tuple[float, float]:
    """Centre (in [-P/2, P/2)) and a robust width of the peak of ``x`` modulo the period."""
    nb = 256
    ph = np.mod(x, period)
    hist = np.bincount(np.minimum((ph * (nb / period)).astype(np.int64), nb - 1),
                       minlength=nb).astype(np.float64)
    smooth = hist + 0.5 * (np.roll(hist, 1) + np.roll(hist, -1))
    c = (int(np.argmax(smooth)) + 0.5) * period / nb
    for half in (period / 16, period / 32):
        w = np.mod(ph - c + period / 2, period) - period / 2
        sel = np.abs(w) < half
        if sel.sum() >= 3:
            c += float(np.median(w[sel]))
    w = np.mod(ph - c + period / 2, period) - period / 2
    core = w[np.abs(w) < period / 4]
    mad = float(np.median(np.abs(core - np.median(core)))) if core.size else period / 8
    c = float(np.mod(c + period / 2, period) - period / 2)
    return c, max(1.4826 * mad, 1.0)


def _segment_correlation(h: np.ndarray, gg: np.ndarray, nlags: int) -> np.ndarray:
    """``c[l] = sum_i h[i] gg[i + l]`` for ``0 <= l < nlags``, by FFTs over segments.

    ``gg`` is ``len(h) + nlags - 1`` long. The window is cut into segments of
    K pulses; each segment's cross-spectrum with its stretch of ``gg`` (K +
    nlags - 1 long) is summed and transformed back once (overlap-save).
    """
    n = h.shape[0]
    k = 1 << max(16, math.ceil(math.log2(max(8 * nlags, 1))))
    k = min(k, 1 << math.ceil(math.log2(max(n, 1))))
    nseg = -(-n // k)
    seg_len = k + nlags - 1
    fft_len = sfft.next_fast_len(seg_len, real=True)
    hp = np.zeros(nseg * k, np.float32)
    hp[:n] = h
    gp = np.zeros(nseg * k + nlags - 1, np.float32)
    gp[:gg.shape[0]] = gg
    gseg = np.lib.stride_tricks.sliding_window_view(gp, seg_len)[::k][:nseg]
    spec = np.zeros(fft_len // 2 + 1, np.complex128)
    step = max(1, (1 << 22) // fft_len)  # keep the batches to a few MB
    for s in range(0, nseg, step):
        fh = sfft.rfft(hp[s * k:(s + step) * k].reshape(-1, k), fft_len, axis=1)
        fg = sfft.rfft(gseg[s:s + step], fft_len, axis=1)
        spec += (np.conj(fh) * fg).sum(axis=0)
    return sfft.irfft(spec, fft_len)[:nlags]


def _sparse_correlation(q: np.ndarray, g_table: np.ndarray, sequence: AliceSequence,
                        m_max: int) -> np.ndarray:
    """``score[m + m_max] = sum_i g(code(q_i - m))``, summed detection by detection."""
    offsets = np.arange(-m_max, m_max + 1, dtype=np.int64)
    score = np.zeros(offsets.shape[0])
    chunk = max(1, (1 << 20) // offsets.shape[0])
    for s in range(0, q.shape[0], chunk):
        pulses = q[s:s + chunk, None] - offsets[None, :]
        score += g_table[sequence.codes(pulses.ravel())].reshape(pulses.shape).sum(axis=0)
    return score


def coarse_search(x: np.ndarray, p_sync: np.ndarray, *, channel: int, prior_ps: float,
                  period_ps: float, search_ps: float, g_table: np.ndarray,
                  sequence: AliceSequence, first_pulse: int,
                  detections: int = COARSE_DETECTIONS) -> CoarseSearch:
    """The delay of one channel to within the jitter, over ``prior_ps +- search_ps``.

    ``x``: the detections' times since their last sync tag (ps, in time order),
    ``p_sync``: that sync's pulse number. See the module documentation.
    """
    P = period_ps
    if x.shape[0] < 50:
        raise DelayCalibrationError(f"channel {channel}: {x.shape[0]} detections; the delay "
                                    "search needs at least 50 (is the laser on, the detector "
                                    "biased, the channel right?)")
    phase, _ = _phase_peak(x - prior_ps, P)
    m_max = int(math.ceil(search_ps / P))
    if sequence.mode == MODE_PATTERN:
        m_max = min(m_max, (sequence.pattern.shape[0] - 1) // 2)
    nlags = 2 * m_max + 1
    q = p_sync + np.rint((x - prior_ps - phase) / P).astype(np.int64)
    q0 = first_pulse + m_max + 1
    q = q[q >= q0]
    if q.shape[0] < 50:
        raise DelayCalibrationError(f"channel {channel}: too few detections after the first "
                                    "sync for the delay search; take a longer acquisition")
    q = np.sort(q)
    best = None
    for want in (detections, 16 * detections):
        n_use = min(want, q.shape[0])
        sel = q[:n_use]
        w = int(sel[-1] - q0) + 1
        if w <= MAX_WINDOW_PULSES:
            h = np.bincount(sel - q0, minlength=w).astype(np.float32)
            codes = sequence.codes(np.arange(q0 - m_max, q0 + w + m_max, dtype=np.int64))
            c = _segment_correlation(h, g_table[codes].astype(np.float32), nlags)
            # c[l] belongs to the offset m = m_max - l (pulse = provisional pulse - m)
            score = c[::-1].astype(np.float64)
        else:  # too sparse for a dense window: the same sums, detection by detection
            score = _sparse_correlation(sel, g_table, sequence, m_max)
        i = int(np.argmax(score))
        rest = np.delete(score, i)
        sd = float(rest.std()) if rest.size > 1 else 0.0
        if sd <= 0.0:
            sd = max(float(np.abs(score).max()), 1e-30)
        z = (score - float(rest.mean())) / sd
        best = (i, z, n_use, w)
        if z[i] >= MIN_SIGNIFICANCE or n_use == q.shape[0]:
            break
    i, z, n_det, w = best
    m = i - m_max
    runner = float(np.delete(z, i).max()) if z.size > 1 else 0.0
    if z[i] < MIN_SIGNIFICANCE:
        raise DelayCalibrationError(
            f"channel {channel}: no clear correlation with Alice's sequence within "
            f"+-{search_ps / 1e6:g} us of the configured delay (peak {z[i]:.1f} sigma, needs "
            f"{MIN_SIGNIFICANCE:g}); check the channel mapping, the seed of Alice's sequence, "
            "or take a longer acquisition")
    delay = int(round(prior_ps + phase + m * P))
    offsets = prior_ps + phase + (np.arange(nlags) - m_max) * P
    return CoarseSearch(channel=channel, delay_ps=delay, phase_ps=float(phase),
                        offset_pulses=int(m), significance=float(z[i]), runner_up=runner,
                        detections=int(n_det), window_pulses=int(w), offsets_ps=offsets,
                        score=z)


# ------------------------------------------------------------------------------ fine
@dataclass
class ArrivalFit:
    """Binned Poisson fit of one channel's phase histogram (Gaussian + flat background)."""

    mean_ps: float
    mean_uncertainty_ps: float
    sigma_ps: float
    sigma_uncertainty_ps: float
    signal: float
    background_per_ps: float
    chi2: float
    ndf: int
    tail_ratio: float
    edges: np.ndarray = field(repr=False)
    counts: np.ndarray = field(repr=False)
    model: np.ndarray = field(repr=False)


def _bin_model(theta: np.ndarray, edges: np.ndarray, period: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Expected counts per bin and their derivatives in (mean, sigma, signal, background)."""
    mu, sigma, ns, beta = theta
    width = np.diff(edges)
    lam = beta * width
    d = np.zeros((4, width.shape[0]))
    d[3] = width
    for k in WRAPS:
        zh = (edges[1:] - mu - k * period) / sigma
        zl = (edges[:-1] - mu - k * period) / sigma
        f = ndtr(zh) - ndtr(zl)
        ph, pl = np.exp(-0.5 * zh * zh), np.exp(-0.5 * zl * zl)
        c = ns / (sigma * math.sqrt(2 * math.pi))
        lam = lam + ns * f
        d[0] -= c * (ph - pl)
        d[1] -= c * (zh * ph - zl * pl)
        d[2] += f
    return lam, d


def fit_arrival(phase: np.ndarray, period_ps: float, *, mean0: float = 0.0,
                sigma0: float = 30.0, resolution_ps: float = 1.0) -> ArrivalFit:
    """Fit the phase histogram over one period (see the module documentation)."""
    P = period_ps
    bin_ps = max(float(resolution_ps), min(sigma0 / 4.0, P / 64))
    nb = max(16, int(math.ceil(P / bin_ps)))
    edges = np.linspace(-P / 2, P / 2, nb + 1)
    counts = np.histogram(phase, edges)[0].astype(np.float64)
    n = counts.sum()
    core = np.abs(phase - mean0) < 6 * sigma0
    off = max(P - 12 * sigma0, 0.0)
    beta0 = (n - core.sum()) / off if off > 0 else 0.0
    x0 = np.array([mean0, sigma0, max(core.sum() - beta0 * 12 * sigma0, 1.0), max(beta0, 0.0)])
    scale = np.array([sigma0, sigma0, max(n, 1.0), max(n / P, 1e-3)])

    def nll(u):
        lam, d = _bin_model(u * scale, edges, P)
        lam = np.maximum(lam, 1e-300)
        val = float((lam - counts * np.log(lam)).sum())
        grad = (d * (1.0 - counts / lam)).sum(axis=1) * scale
        return val, grad

    bounds = [(-P / 2 / sigma0, P / 2 / sigma0), (0.05 / sigma0 * bin_ps, P / sigma0),
              (0.0, None), (0.0, None)]
    r = optimize.minimize(nll, x0 / scale, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": 500, "ftol": 1e-15, "gtol": 1e-10})
    theta = r.x * scale
    lam, d = _bin_model(theta, edges, P)
    lam_c = np.maximum(lam, 1e-12)
    free = [0, 1, 2] + ([3] if theta[3] > 1e-9 * max(n / P, 1.0) else [])
    fisher = (d[free][:, None, :] * d[free][None, :, :] / lam_c).sum(axis=2)
    cov = np.linalg.pinv(fisher)
    big = lam >= 5.0
    chi2 = float((((counts - lam) ** 2) / lam_c)[big].sum())
    ndf = max(int(big.sum()) - len(free), 1)
    inflate = math.sqrt(max(1.0, chi2 / ndf))
    mu, sigma = float(theta[0]), float(theta[1])
    centres = 0.5 * (edges[1:] + edges[:-1])
    tail = (np.abs(centres - mu) > 4 * sigma) & (np.abs(centres - mu) < 8 * sigma)
    exp_tail = float(lam[tail].sum())
    tail_ratio = float(counts[tail].sum() / exp_tail) if exp_tail > 0 else float("nan")
    return ArrivalFit(
        mean_ps=mu, mean_uncertainty_ps=float(math.sqrt(max(cov[0, 0], 0.0))) * inflate,
        sigma_ps=sigma, sigma_uncertainty_ps=float(math.sqrt(max(cov[1, 1], 0.0))) * inflate,
        signal=float(theta[2]), background_per_ps=float(theta[3]), chi2=chi2, ndf=ndf,
        tail_ratio=tail_ratio, edges=edges, counts=counts, model=lam)


# ------------------------------------------------------------------------------ gate
@dataclass
class GateModel:
    """Predicted sifted statistics and secret-key rate as a function of the gate width.

    Per detector j (in the order of ``receiver.detectors``): ``click[j, code]``,
    its probability of a photon click at a pulse of Alice's ``code`` (all
    arrival times), ``sigma_ps[j]`` and ``offset_ps[j]`` (its arrival law's
    width and centre in the sifter's phase, after the delay is applied),
    ``background_hz[j]``. ``code_probability`` is the probability of each code.
    """

    click: np.ndarray
    sigma_ps: np.ndarray
    offset_ps: np.ndarray
    background_hz: np.ndarray
    code_probability: np.ndarray
    outcome: np.ndarray
    period_ps: float
    rep_rate_hz: float
    intensities: tuple[float, ...]
    intensity_probabilities: tuple[float, ...]
    protocol: str
    block_bits: int
    eps_sec: float
    eps_cor: float
    phase_error_tolerance: float
    discard_cross_basis: bool
    #: "finite-key" (the bound of the bench's protocol) or "asymptotic" (the fallback)
    objective: str = "finite-key"

    def click_probabilities(self, width_ps: float) -> np.ndarray:
        """``p[code, j]``: detector j clicks inside the gate at a pulse of that code."""
        s = self.sigma_ps[:, None]
        e = self.offset_ps[:, None]
        ks = np.array(WRAPS, np.float64)[None, :] * self.period_ps
        hi = ndtr((width_ps / 2 - e - ks) / s)
        lo = ndtr((-width_ps / 2 - e - ks) / s)
        frac = hi - lo
        own = frac[:, list(WRAPS).index(0)]
        neighbours = frac.sum(axis=1) - own
        mean_click = (self.click * self.code_probability[None, :]).sum(axis=1)
        bg = self.background_hz * width_ps * 1e-12
        stray = 1.0 - (1.0 - mean_click * neighbours) * (1.0 - bg)
        p = 1.0 - (1.0 - self.click * own[:, None]) * (1.0 - stray[:, None])
        return np.clip(p.T, 0.0, 1.0)

    def per_pulse(self, width_ps: float) -> tuple[np.ndarray, np.ndarray]:
        """Sifted detections and errors per pulse, ``[class, basis]`` (0 = Z, 1 = X)."""
        p = self.click_probabilities(width_ps)
        ncode, nd = p.shape
        nk = len(self.intensities)
        masks = np.arange(1 << nd)
        on = (masks[:, None] >> np.arange(nd)[None, :]) & 1
        prob = np.prod(np.where(on[None, :, :] == 1, p[:, None, :], 1.0 - p[:, None, :]),
                       axis=2)
        o = self.outcome
        typ, basis, bit = o & 3, (o >> 2) & 1, (o >> 3) & 1
        sift = np.zeros((nk, 2))
        err = np.zeros((nk, 2))
        for code in range(ncode):
            k, a, x = code >> 2, (code >> 1) & 1, code & 1
            w = self.code_probability[code]
            if k >= nk or w == 0.0:
                continue
            pm = prob[code].copy()
            pm[0] = 0.0
            single = (typ == 0) & (basis == a)
            same = (typ == 1) & (basis == a)
            cross = typ == 2
            s = pm[single].sum() + pm[same].sum()
            m = pm[single & (bit != x)].sum() + 0.5 * pm[same].sum()
            if not self.discard_cross_basis:
                s += 0.5 * pm[cross].sum()
                m += 0.25 * pm[cross].sum()
            sift[k, a] += w * s
            err[k, a] += w * m
        return sift, err

    def qber(self, width_ps: float) -> tuple[float, float]:
        """Predicted QBER (Z, X) at this gate width."""
        s, e = self.per_pulse(width_ps)
        return (float(e[:, 0].sum() / s[:, 0].sum()) if s[:, 0].sum() > 0 else float("nan"),
                float(e[:, 1].sum() / s[:, 1].sum()) if s[:, 1].sum() > 0 else float("nan"))

    def rate_bps(self, width_ps: float) -> float:
        """Estimated secret-key rate (bit/s) at this gate width, by :attr:`objective`."""
        if self.objective == "asymptotic":
            return self.asymptotic_rate_bps(width_ps)
        return self.finite_key_rate_bps(width_ps)

    def asymptotic_rate_bps(self, width_ps: float) -> float:
        """``R = Q_Z (1 - f_EC h(E_Z) - h(E_X))`` per pulse, times the pulse rate.

        BB84 in the infinite-key limit with the phase error taken as the
        test-basis error rate of all classes (no decoy bounds): the fallback
        objective when the finite-key bound gives no key at this block size.
        """
        if not 0.0 < width_ps < self.period_ps:
            return 0.0
        s, e = self.per_pulse(width_ps)
        key, test = s[:, 0].sum(), s[:, 1].sum()
        if not (key > 0 and test > 0):
            return 0.0
        frac = 1.0 - EC_EFFICIENCY * _h(e[:, 0].sum() / key) - _h(e[:, 1].sum() / test)
        return max(0.0, float(key * frac)) * self.rep_rate_hz

    def finite_key_rate_bps(self, width_ps: float) -> float:
        """Secret-key rate (bit/s) at this gate width, finite-key, blocks of ``block_bits``."""
        if not 0.0 < width_ps < self.period_ps:
            return 0.0
        s, e = self.per_pulse(width_ps)
        key = s[:, 0].sum()
        if not key > 0:
            return 0.0
        n = self.block_bits / key
        try:
            stats = DecoyStatistics(self.intensities, self.intensity_probabilities,
                                    tuple(n * s[:, 0]), tuple(n * e[:, 0]),
                                    tuple(n * s[:, 1]), tuple(n * e[:, 1]))
            leak = EC_EFFICIENCY * _h(e[:, 0].sum() / key) * self.block_bits
            r = key_length(self.protocol, stats, leak, eps_sec=self.eps_sec,
                           eps_cor=self.eps_cor,
                           phase_error_tolerance=self.phase_error_tolerance)
        except FiniteKeyError:
            return 0.0
        if r.aborted or not math.isfinite(r.length_bound):
            return 0.0
        return max(0.0, float(r.length_bound)) / n * self.rep_rate_hz

    def best_width(self) -> tuple[float, np.ndarray, np.ndarray]:
        """The width of the highest rate (ps), with the scanned widths and rates."""
        smax = float(self.sigma_ps.max())
        lo = max(2.0 * smax, 1.0)
        hi = min(0.999 * self.period_ps, 40.0 * smax)
        if hi <= lo:
            lo, hi = 0.05 * self.period_ps, 0.999 * self.period_ps
        widths = np.linspace(lo, hi, 241)
        rates = np.array([self.rate_bps(w) for w in widths])
        if not rates.max() > 0.0 and self.objective == "finite-key":
            log.warning("the finite-key bound gives no key at any gate width with blocks of "
                        "%d bits; the gate is chosen by the asymptotic rate", self.block_bits)
            self.objective = "asymptotic"
            rates = np.array([self.rate_bps(w) for w in widths])
        i = int(np.argmax(rates))
        if rates[i] <= 0.0:
            return float(widths[i]), widths, rates
        a, b = widths[max(i - 1, 0)], widths[min(i + 1, widths.shape[0] - 1)]
        r = optimize.minimize_scalar(lambda w: -self.rate_bps(w), bounds=(a, b),
                                     method="bounded", options={"xatol": 0.05})
        best = float(r.x) if -r.fun >= rates[i] else float(widths[i])
        return best, widths, rates


# ------------------------------------------------------------------------------ result
@dataclass
class ChannelDelay:
    """What the calibration found for one detector channel."""

    channel: int
    name: str
    delay_ps: float
    uncertainty_ps: float
    jitter_ps: float
    jitter_uncertainty_ps: float
    previous_delay_ps: int
    detections: int
    background_rate_hz: float
    light_background_rate_hz: float
    dark_count_rate_hz: float | None
    qber: float
    tail_ratio: float
    fit_chi2_ndf: float
    coarse: CoarseSearch = field(repr=False)
    fit: ArrivalFit = field(repr=False)

    def section(self) -> dict[str, Any]:
        d = {"delay_ps": round(self.delay_ps, 2),
             "uncertainty_ps": _sig(self.uncertainty_ps),
             "jitter_ps": round(self.jitter_ps, 3),
             "jitter_uncertainty_ps": _sig(self.jitter_uncertainty_ps),
             "previous_delay_ps": int(self.previous_delay_ps),
             "detections": int(self.detections),
             "background_rate_hz": _sig(self.background_rate_hz),
             "qber": _sig(self.qber),
             "coarse_significance": round(self.coarse.significance, 1)}
        if self.dark_count_rate_hz is not None:
            d["dark_count_rate_hz"] = _sig(self.dark_count_rate_hz)
        return d


@dataclass
class DelayCalibration:
    """The result of :func:`calibrate_delays`."""

    bench: str
    seed: int
    acquisition_s: float
    dark_s: float
    sync: SyncFit
    channels: dict[int, ChannelDelay]
    gate_width_ps: float
    gate_width_range_ps: tuple[float, float]
    key_rate_bps_at_gate: float
    qber_at_gate: tuple[float, float]
    model: GateModel = field(repr=False)
    scan_widths_ps: np.ndarray = field(repr=False)
    scan_rates_bps: np.ndarray = field(repr=False)
    plots: list[str] = field(default_factory=list)
    runtime_s: float = 0.0

    def key_rate_bps(self, gate_width_ps: float) -> float:
        """The estimated secret-key rate (bit/s) with this gate width."""
        return self.model.rate_bps(float(gate_width_ps))

    def section(self) -> dict[str, Any]:
        """The ``[delays]`` table of the calibration record."""
        return {
            "period_ps": round(self.sync.period_ps, 9),
            "period_uncertainty_ps": _sig(self.sync.period_uncertainty_ps),
            "clock_drift_ppm": round(self.sync.clock_drift_ppm, 8),
            "clock_drift_uncertainty_ppm": _sig(self.sync.clock_drift_uncertainty_ppm),
            "sync_jitter_ps": round(self.sync.residual_rms_ps, 3),
            "gate_width_ps": round(self.gate_width_ps, 1),
            "gate_width_range_ps": [round(x, 1) for x in self.gate_width_range_ps],
            "key_rate_bps": round(self.key_rate_bps_at_gate, 1),
            "key_rate_model": self.model.objective,
            "qber_z": _sig(self.qber_at_gate[0]),
            "qber_x": _sig(self.qber_at_gate[1]),
            "channels": {str(c): ch.section() for c, ch in sorted(self.channels.items())},
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (``qkdctl calibrate delays --json``)."""
        out = self.section()
        out.update({
            "bench": self.bench, "seed": self.seed, "acquisition_s": self.acquisition_s,
            "dark_s": self.dark_s, "runtime_s": round(self.runtime_s, 3),
            "sync": self.sync.to_dict(), "plots": list(self.plots),
            "gate_scan": {"width_ps": [round(float(w), 2) for w in self.scan_widths_ps],
                          "key_rate_bps": [float(r) for r in self.scan_rates_bps]}})
        for c, ch in self.channels.items():
            d = out["channels"][str(c)]
            d.update({"name": ch.name, "light_background_rate_hz": ch.light_background_rate_hz,
                      "tail_ratio": ch.tail_ratio, "fit_chi2_ndf": ch.fit_chi2_ndf,
                      "coarse": ch.coarse.to_dict()})
        return _json_ready(out)


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (NaN as is)."""
    if not math.isfinite(x) or x == 0.0:
        return float(x)
    return float(f"{x:.{digits}g}")


def _json_ready(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_ready(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ------------------------------------------------------------------------------ procedure
def _code_probabilities(seq: AliceSequence, n_classes: int) -> np.ndarray:
    p = np.zeros(16)
    if seq.mode == MODE_PATTERN:
        cnt = np.bincount(seq.pattern, minlength=16)[:16]
        return cnt / cnt.sum()
    pz = seq.effective_z_probability
    pk = seq.effective_intensity_probabilities
    for code in range(16):
        k, a = code >> 2, (code >> 1) & 1
        if k < n_classes:
            p[code] = pk[k] * (pz if a == 0 else 1.0 - pz) * 0.5
    return p


def _dark_counts(tags: Tags, cfg: BenchConfig) -> tuple[dict[int, int], float]:
    """Counts per detector channel in the dark stretch (after its guard) and its length (s)."""
    sync = tags.of(cfg.receiver.sync_channel)
    if sync.shape[0] >= 2:
        t_lo, t_hi = int(sync[0]) + DARK_GUARD_PS, int(sync[-1])
    elif tags.timestamps.shape[0]:
        t_lo, t_hi = int(tags.timestamps[0]) + DARK_GUARD_PS, int(tags.timestamps[-1])
    else:
        return {d.channel: 0 for d in cfg.receiver.detectors}, 0.0
    if t_hi <= t_lo:
        return {d.channel: 0 for d in cfg.receiver.detectors}, 0.0
    sel = (tags.timestamps >= t_lo) & (tags.timestamps < t_hi)
    ch = tags.channels[sel]
    return ({d.channel: int((ch == d.channel).sum()) for d in cfg.receiver.detectors},
            (t_hi - t_lo) * 1e-12)


def calibrate_delays(cfg: BenchConfig, *, seed: int = 0, acquisition_s: float = 0.1,
                     dark_s: float = 0.5, search_ps: float = 1.5e6,
                     bench: dict[str, Any] | None = None,
                     plot_dir: str | os.PathLike | None = None) -> DelayCalibration:
    """Calibrate the clock, the detector delays and the gate width (``qkdctl calibrate delays``).

    ``acquisition_s`` of bench time with the laser on, then ``dark_s`` with the
    laser off (0: none) for the background. The delays are searched within
    ``+-search_ps`` of the configured ``receiver.detectors[].delay_ps``. On the
    simulated bench ``seed`` keys the acquisition and Alice's sequence;
    ``bench`` replaces the instruments built from the configuration. With
    ``plot_dir`` PNG figures are written there. See the module documentation.
    """
    t_start = time.perf_counter()
    for name, v, lo in (("acquisition_s", acquisition_s, 0.0), ("search_ps", search_ps, 0.0)):
        if not (isinstance(v, int | float) and math.isfinite(v) and v > lo):
            raise ConfigError(f"calibrate delays: {name} = {v!r}: give a positive number")
    if not (isinstance(dark_s, int | float) and math.isfinite(dark_s) and dark_s >= 0):
        raise ConfigError(f"calibrate delays: dark_s = {dark_s!r}: give a number >= 0")
    src, rx = cfg.source, cfg.receiver
    P_nom = src.period_ps
    dark: Tags | None = None
    with armed(cfg, seed=seed, bench=bench) as b:
        resolution = float(b["tagger"].resolution_ps)
        light = b.read(acquisition_s)
        if dark_s > 0:
            b["laser"].output_off()
            dark = b.read(dark_s)
    log.info("calibrate delays on %s: %d tags in %.3g s (+ %.3g s dark)", cfg.name,
             light.timestamps.shape[0], acquisition_s, dark_s)

    sync = fit_sync(light.of(rx.sync_channel), P_nom, src.sync_period_pulses,
                    cfg.analysis.first_sync_pulse)
    P = sync.period_ps
    log.info("clock: period %.6f ps, drift %+.4f +- %.1e ppm, sync jitter %.2f ps",
             P, sync.clock_drift_ppm, sync.clock_drift_uncertainty_ppm, sync.residual_rms_ps)
    seq = AliceSequence.from_config(src, seed)
    n_classes = len(src.mean_photon_numbers)
    code_p = _code_probabilities(seq, n_classes)
    dark_counts, dark_len = _dark_counts(dark, cfg) if dark is not None else ({}, 0.0)
    t_first = int(sync.times[0])
    light_len_s = max((int(light.timestamps[-1]) - t_first) * 1e-12, 1e-12)
    span_pulses = int(sync.pulses[-1] - sync.pulses[0])

    channels: dict[int, ChannelDelay] = {}
    n_det = len(rx.detectors)
    click = np.zeros((n_det, 16))
    sig = np.zeros(n_det)
    offs = np.zeros(n_det)
    bg_used = np.zeros(n_det)
    for j, det in enumerate(rx.detectors):
        basis = 0 if det.basis == "Z" else 1
        x, p_sync = _refer(light.of(det.channel), sync)
        # two statistics: the response to Alice's polarization states (the sharpest when
        # the polarization is aligned) and to her intensities alone (independent of any
        # polarization rotation in the channel); the more significant peak wins
        coarse, by_state, failure = None, True, None
        for state_aware in (True, False):
            table = (_response_table(cfg, basis, det.bit, code_p) if state_aware
                     else _intensity_table(cfg, code_p))
            try:
                c = coarse_search(x, p_sync, channel=det.channel, prior_ps=float(det.delay_ps),
                                  period_ps=P, search_ps=search_ps, g_table=table,
                                  sequence=seq, first_pulse=int(sync.pulses[0]))
            except DelayCalibrationError as e:
                failure = e
                continue
            if coarse is None or c.significance > coarse.significance:
                coarse, by_state = c, state_aware
        if coarse is None:
            raise failure
        dt = x - coarse.delay_ps
        slot = np.rint(dt / P)
        phase = dt - slot * P
        _, sigma0 = _phase_peak(phase, P)
        fit = fit_arrival(phase, P, mean0=0.0, sigma0=min(sigma0, P / 8),
                          resolution_ps=resolution)
        delay = coarse.delay_ps + fit.mean_ps
        # Alice's codes of the aligned detections (core of the arrival law)
        core = np.abs(phase - fit.mean_ps) < 3 * fit.sigma_ps
        pulses = p_sync[core] + slot[core].astype(np.int64)
        pulses = pulses[(pulses >= sync.pulses[0]) & (pulses < sync.pulses[-1])]
        codes = seq.codes(pulses)
        n_code = np.bincount(codes, minlength=16)[:16].astype(np.float64)
        mine = ((codes >> 1) & 1) == basis
        n_basis = int(mine.sum())
        qber = float(((codes[mine] & 1) != det.bit).sum() / n_basis) if n_basis else math.nan
        # background: the fitted flat level, pooled with the dark stretch
        bg_light_counts = fit.background_per_ps * P
        r_light = bg_light_counts / light_len_s
        r_dark = dark_counts[det.channel] / dark_len if dark_len > 0 else None
        n_dark = dark_counts.get(det.channel, 0) if dark_len > 0 else 0
        r_pool = (bg_light_counts + n_dark + 0.5) / (light_len_s + dark_len)
        r_bg = max(r_light, r_pool)
        a_core = math.erf(3 / math.sqrt(2))
        in_core_bg = r_bg * 6 * fit.sigma_ps * 1e-12 * span_pulses * code_p
        with np.errstate(invalid="ignore", divide="ignore"):
            click[j] = np.where(code_p > 0, np.maximum(n_code - in_core_bg, 0.0)
                                / (a_core * span_pulses * code_p), 0.0)
        sig[j] = fit.sigma_ps
        offs[j] = delay - round(delay)
        bg_used[j] = r_bg
        channels[det.channel] = ChannelDelay(
            channel=det.channel, name=det.name, delay_ps=float(delay),
            uncertainty_ps=fit.mean_uncertainty_ps, jitter_ps=fit.sigma_ps,
            jitter_uncertainty_ps=fit.sigma_uncertainty_ps, previous_delay_ps=det.delay_ps,
            detections=int(round(fit.signal)), background_rate_hz=float(r_bg),
            light_background_rate_hz=float(r_light), dark_count_rate_hz=r_dark, qber=qber,
            tail_ratio=fit.tail_ratio, fit_chi2_ndf=fit.chi2 / fit.ndf, coarse=coarse, fit=fit)
        log.info("channel %d (%s): delay %.2f +- %.2f ps (was %d; coarse offset %+d pulses, "
                 "%.0f sigma), jitter %.2f ps, background %.3g Hz, error fraction %.4f",
                 det.channel, det.name, delay, fit.mean_uncertainty_ps, det.delay_ps,
                 coarse.offset_pulses, coarse.significance, fit.sigma_ps, r_bg, qber)
        if by_state and n_basis >= 400 and abs(qber - 0.5) < 0.1:
            # (locked on the intensities alone, the polarization may well be unaligned:
            # then the error fraction says nothing about the lock)
            raise DelayCalibrationError(
                f"channel {det.channel} ({det.name}): the aligned detections do not follow "
                f"Alice's bits (error fraction {qber:.2f}): the coarse search locked on a "
                "wrong pulse offset; take a longer acquisition")
        if by_state and qber > 0.25:
            log.warning("channel %d (%s): %.0f %% of its detections in its basis carry the "
                        "other bit: is the detector mapping (basis, bit) right?",
                        det.channel, det.name, 100 * qber)

    params = SiftParams.from_config(cfg, seed)
    pp = cfg.postprocess
    model = GateModel(
        click=click, sigma_ps=sig, offset_ps=offs, background_hz=bg_used,
        code_probability=code_p, outcome=params.outcome_table,
        period_ps=P, rep_rate_hz=src.rep_rate_hz,
        intensities=tuple(src.mean_photon_numbers),
        intensity_probabilities=tuple(src.intensity_probabilities), protocol=cfg.protocol,
        block_bits=pp.block_bits, eps_sec=pp.eps_sec, eps_cor=pp.eps_cor,
        phase_error_tolerance=pp.phase_error_tolerance,
        discard_cross_basis=cfg.analysis.multi_click == "discard")
    width, widths, rates = model.best_width()
    best_rate = model.rate_bps(width)
    flat = widths[rates >= (1.0 - FLAT_FRACTION) * best_rate] if best_rate > 0 else widths[:0]
    w_range = (float(flat.min()), float(flat.max())) if flat.size else (width, width)
    qz, qx = model.qber(width)
    log.info("gate %.1f ps (%.1f sigma; within 0.01 %% of the best rate: %.0f-%.0f ps): "
             "%.4g bit/s estimated, QBER Z %.4f, X %.4f", width, width / sig.max(),
             w_range[0], w_range[1], best_rate, qz, qx)
    result = DelayCalibration(
        bench=cfg.name, seed=seed, acquisition_s=float(acquisition_s), dark_s=float(dark_s),
        sync=sync, channels=channels, gate_width_ps=width, gate_width_range_ps=w_range,
        key_rate_bps_at_gate=best_rate, qber_at_gate=(qz, qx), model=model,
        scan_widths_ps=widths, scan_rates_bps=rates)
    if plot_dir is not None:
        result.plots = _plot(result, os.fspath(plot_dir))
    result.runtime_s = time.perf_counter() - t_start
    return result


# ------------------------------------------------------------------------------ figures
def _plot(res: DelayCalibration, plot_dir: str) -> list[str]:
    """PNG figures of the calibration; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    chans = sorted(res.channels.items())
    n = len(chans)
    paths = []

    fig, axes = plt.subplots(n, 1, figsize=(7, 2.4 * n), squeeze=False)
    for ax, (c, ch) in zip(axes[:, 0], chans, strict=True):
        f = ch.fit
        centres = 0.5 * (f.edges[1:] + f.edges[:-1])
        win = np.abs(centres - f.mean_ps) < max(12 * f.sigma_ps, res.gate_width_ps)
        ax.step(centres[win], f.counts[win], where="mid", lw=0.8, label="detections")
        ax.plot(centres[win], f.model[win], "r-", lw=1.0,
                label=f"fit: {ch.delay_ps:.2f} +- {ch.uncertainty_ps:.2f} ps, "
                      f"sigma {ch.jitter_ps:.2f} ps")
        for e in (-res.gate_width_ps / 2, res.gate_width_ps / 2):
            ax.axvline(f.mean_ps + e, color="k", ls="--", lw=0.7)
        ax.set_yscale("log")
        ax.set_ylim(0.5, 3 * max(float(f.counts[win].max()), 1.0))
        ax.set_title(f"channel {c} ({ch.name})", fontsize=9)
        ax.set_ylabel("counts / bin")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("phase relative to the coarse delay (ps); dashed: gate")
    fig.tight_layout()
    paths.append(_save(fig, plot_dir, "delays_arrival.png"))

    fig, axes = plt.subplots(n, 1, figsize=(7, 2.0 * n), squeeze=False)
    for ax, (c, ch) in zip(axes[:, 0], chans, strict=True):
        cs = ch.coarse
        ax.plot(cs.offsets_ps * 1e-3, cs.score, lw=0.6)
        ax.axvline(cs.delay_ps * 1e-3, color="r", ls=":", lw=0.8)
        ax.set_title(f"channel {c} ({ch.name}): peak {cs.significance:.0f} sigma at "
                     f"{cs.delay_ps / 1e3:.3f} ns ({cs.offset_pulses:+d} pulses)", fontsize=9)
        ax.set_ylabel("sigma")
    axes[-1, 0].set_xlabel("candidate delay (ns)")
    fig.tight_layout()
    paths.append(_save(fig, plot_dir, "delays_coarse.png"))

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    ok = res.scan_rates_bps > 0
    w, r = res.scan_widths_ps[ok], res.scan_rates_bps[ok]
    ax.plot(w, r * 1e-6, lw=1.0)
    ax.set_ylabel("estimated secret-key rate (Mbit/s)")
    ax.set_title(f"{res.model.objective} rate model", fontsize=9)
    if r.size:
        ax2.semilogy(w, np.maximum(1.0 - r / r.max(), 1e-12), lw=1.0)
    ax2.set_ylabel("1 - rate / best")
    ax2.set_xlabel("gate width (ps)")
    for a in (ax, ax2):
        a.axvline(res.gate_width_ps, color="r", ls="--", lw=0.8,
                  label=f"chosen {res.gate_width_ps:.1f} ps")
        a.axvspan(*res.gate_width_range_ps, color="r", alpha=0.1,
                  label="within 0.01 % of best")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, plot_dir, "delays_gate.png"))

    fig, ax = plt.subplots(figsize=(7, 3.0))
    s = res.sync
    t_ms = (s.pulses - s.pulses[0]) * s.period_ps * 1e-9
    ax.plot(t_ms, s.residuals_ps, ".", ms=1, label="sync tags")
    nbin = min(200, max(1, t_ms.shape[0] // 50))
    if nbin > 1:
        parts = np.array_split(np.arange(t_ms.shape[0]), nbin)
        ax.plot([t_ms[i].mean() for i in parts], [s.residuals_ps[i].mean() for i in parts],
                "r-", lw=1.0, label=f"mean over 1/{nbin} of the run")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("time since the first sync (ms)")
    ax.set_ylabel("sync residual (ps)")
    ax.set_title(f"period {s.period_ps:.6f} ps, drift {s.clock_drift_ppm:+.4f} ppm, "
                 f"rms {s.residual_rms_ps:.2f} ps", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, plot_dir, "delays_sync.png"))
    return paths


def _save(fig, plot_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(plot_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
