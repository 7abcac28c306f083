"""``qkdctl calibrate detectors``: dark counts, relative efficiencies, dead time, afterpulsing.

One armed session, two reads of the time tagger: ``dark_s`` seconds with the
laser output off, then ``light_s`` seconds with it on (the pulse numbering
runs on across both, so Alice's code of every detected pulse is known).
Everything is estimated per detector from its registered clicks, which follow
this model:

- dark counts: a Poisson process of rate ``R`` in continuous time;
- dead time ``d``, non-paralysable: a click is registered only ``d`` or more
  after the previous registered click, and a click lost in the dead time does
  not extend it;
- afterpulsing: after a registered click, with probability ``p``, an
  afterpulse at ``d + Exp(tau)``; it is lost if another click registers first;
- photon clicks: with the laser on, a pulse slot that finds the detector live
  clicks with a probability ``1 - exp(-m)`` set by Alice's state.

Time since the last registered click, minus ``d``, is ``u``. The clicks that
are not photons (dark counts and afterpulses, the *continuous* clicks) have
the hazard ``h(u) = R + p exp(-u/tau) / (tau (1 - p + p exp(-u/tau)))``
whatever else happens on the detector, because every registered click resets
the dead time and the pending afterpulse alike.

Estimators
----------
*Continuous clicks (dark rate, afterpulse probability and time constant).*
Maximum likelihood on the inter-arrival times of both reads together
(``p`` and ``tau`` shared, one background rate per read). In the dark read the
intervals are i.i.d. with hazard ``h``. In the light read only the clicks
outside the photon gates (further than six standard deviations of the
timing jitter from every pulse slot) are counted as continuous clicks, with
the time spent outside the gates as their exposure; a click inside a gate
ends the interval as a censored observation. This is the partial likelihood
of the out-of-gate counting process, whose intensity is ``h(u)`` on
out-of-gate time: it needs no model of the photon clicks. The out-of-gate
exposure of an interval is the fraction ``w`` of the period outside the gates
times the integral of ``h``, plus a correction for where in the period the
interval starts and ends (integration by parts; it neglects terms of order
``(P / tau)^2``, ``P`` the pulse period). The intervals are binned finely
(0.05 ns up to 10 ns, then 2 % wide bins) and the bins carry their event
counts, exposures and centroids, so the fit is a Poisson likelihood over about
a thousand bins with analytic gradients; the errors are the square roots of
the diagonal of the inverse observed information. The dark count rate is the
dark read's ``R`` (dead time and afterpulses taken out of the observed rate);
the light read's ``R`` is reported as the background rate under light (dark
counts plus stray light).

Afterpulsing is *detected* when the likelihood ratio ``2 ln(L1 / L0)`` against
``p = 0`` is at least :data:`AP_DETECTION_LR`. Otherwise the time constant is
not reported and ``afterpulse_probability_upper`` is a one-sided bound (the
profile likelihood in ``p``, background rates refitted, 2 below its maximum in
``ln L``: about 97.7 %), the largest over the time constants of
:data:`TAU_GRID_NS`; ``afterpulse_probability`` is the maximum at that time
constant and its error half the distance to the bound.

*Dead time.* No interval is shorter than ``d``, so the likelihood in ``d``
rises up to the shortest interval ``x1`` (plus one tagger bin if the bins are
coarser than 1 ps) and is zero above it; below ``x1`` it
falls as ``exp(-integral from d to x1 of Lambda)``, ``Lambda`` being the total
rate at which intervals would end there: every interval's continuous hazard
``h(0)`` plus the photon arrivals, which lie on the pulse grid seen from each
click's phase, blurred by the jitter. The reported dead time is the mean of
this likelihood over ``d`` (flat prior) and its error the standard deviation:
a few picoseconds when afterpulses or dark counts fill the region, up to about
a quarter of a period when the onset falls between two pulse slots and only
photons are seen.

*Relative efficiencies.* For each detector and each of Alice's states ``c``
of the strongest intensity class, the click probability of a live pulse slot
is ``P_c = (n_c - B pi_c) / (pi_c L)``: ``n_c`` in-gate clicks on pulses of
state ``c``, ``pi_c`` the probability of that state, ``L`` the live pulse
slots (all slots minus those inside the dead time after each registered click,
weighted by the jitter at the edge of the dead time) and ``B`` the expected
in-gate continuous clicks from the fit above. Alice's state and the
detector's liveness are independent, so ``pi_c L`` live slots carry state
``c``. The mean photon number reaching the detector is ``m_c = -log(1 - P_c)``.
For either basis the two states of that basis are orthogonal, so the sum of
their ``m`` is the light reaching the detector's basis times its efficiency,
independent of the polarization alignment; the two bases' sums are averaged
(inverse-variance). ``relative_efficiency`` divides out the passive basis
splitter (``receiver.z_basis_probability``, taken as exact) and is relative to
the first detector of ``[[receiver.detectors]]``;
``relative_efficiency_in_basis`` needs no splitter ratio and is relative to the
first detector of the same basis. The detections are assigned to pulses with
the sync tags and the calibrated detector delays (``calibrate delays`` first);
if the clicks do not follow Alice's intensity classes the procedure stops
with a :class:`~qkdctl.errors.DataError`.

Acquisition lengths: dark counts of SNSPD-class detectors are tens of hertz,
so the dark rate needs ``dark_s`` of tens of seconds for a few percent
(the default 10 s gives about 6 % at 30 Hz); the dead time and the
afterpulsing come mainly from the light read, where every detector clicks
about a million times a second, so ``light_s`` of 0.1 to 0.2 s suffices.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, special

from qkdctl.config import BenchConfig
from qkdctl.errors import ConfigError, DataError
from qkdctl.sequence import MODE_PATTERN, AliceSequence

from .acquire import Tags, armed

__all__ = [
    "AP_DETECTION_LR",
    "DEFAULT_DARK_S",
    "DEFAULT_LIGHT_S",
    "ChannelCalibration",
    "DetectorCalibration",
    "analyse_detectors",
    "calibrate_detectors",
]

log = logging.getLogger(__name__)

#: default dark read (laser off), seconds of bench time
DEFAULT_DARK_S = 10.0
#: default light read (laser on), seconds of bench time
DEFAULT_LIGHT_S = 0.2
#: half-width of the photon gate, in standard deviations of the measured jitter
GATE_SIGMAS = 6.0
#: the photon gates may cover at most this fraction of the period for the light read to
#: count out-of-gate clicks
MAX_GATE_FRACTION = 0.7
#: likelihood ratio 2 ln(L1 / L0) above which afterpulsing counts as detected
AP_DETECTION_LR = 25.0
#: time constants (ns) tried for the upper bound when no afterpulsing is detected
TAU_GRID_NS = (10.0, 30.0, 100.0, 300.0, 1000.0)
#: afterpulse time constants (ns) the fit starts from
FIT_STARTS_NS = (5.0, 50.0, 500.0)
#: fit range of the afterpulse time constant (ns)
TAU_BOUNDS_NS = (0.5, 1.0e5)
#: fewest light clicks a detector must give
MIN_LIGHT_CLICKS = 1000

_PS_PER_NS = 1e3


# --------------------------------------------------------------------------- results
@dataclass
class ChannelCalibration:
    """What was found for one detector (times in ns, rates in Hz, ``*_err`` one sigma).

    ``dark_count_rate_hz`` is the rate of the dark-count process (dead time and
    afterpulses taken out), ``dark_click_rate_hz`` what the tagger registered
    with the laser off. ``background_rate_light_hz`` is the continuous
    background with the laser on (dark counts and stray light).
    ``relative_efficiency`` is relative to the reference detector with the basis
    splitter divided out, ``relative_efficiency_in_basis`` relative to the first
    detector of the same basis; ``mean_photons_signal`` is the mean photon number
    of the strongest intensity class detected per pulse, summed over the two
    states of a basis (the light reaching the detector's basis times its
    efficiency). ``live_fraction`` is the fraction of pulse slots of the light
    read that found the detector live. ``afterpulse_probability_upper`` is set
    only when no afterpulsing was detected, the time constant only when it was.
    ``jitter_ps`` is the measured spread of the photon arrivals and
    ``gate_half_width_ps`` the half-width of the photon gates around them
    (``gate_centre_ps`` from the calibrated delay).
    """

    channel: int
    name: str
    basis: str
    bit: int
    dark_clicks: int
    dark_click_rate_hz: float
    dark_count_rate_hz: float
    dark_count_rate_err_hz: float
    light_clicks: int
    light_click_rate_hz: float
    live_fraction: float
    background_rate_light_hz: float
    background_rate_light_err_hz: float
    relative_efficiency: float
    relative_efficiency_err: float
    relative_efficiency_in_basis: float
    relative_efficiency_in_basis_err: float
    mean_photons_signal: float
    mean_photons_signal_err: float
    dead_time_ns: float
    dead_time_err_ns: float
    shortest_interval_ns: float
    afterpulse_detected: bool
    afterpulse_probability: float
    afterpulse_probability_err: float
    afterpulse_probability_upper: float | None
    afterpulse_time_constant_ns: float | None
    afterpulse_time_constant_err_ns: float | None
    afterpulse_likelihood_ratio: float
    jitter_ps: float
    gate_half_width_ps: float
    gate_centre_ps: float

    def record(self) -> dict[str, Any]:
        """The channel's entry in the ``[detectors]`` table."""
        keys = ("name", "dark_count_rate_hz", "dark_count_rate_err_hz", "dark_click_rate_hz",
                "relative_efficiency", "relative_efficiency_err",
                "relative_efficiency_in_basis", "relative_efficiency_in_basis_err",
                "dead_time_ns", "dead_time_err_ns", "afterpulse_detected",
                "afterpulse_probability", "afterpulse_probability_err",
                "afterpulse_probability_upper", "afterpulse_time_constant_ns",
                "afterpulse_time_constant_err_ns", "background_rate_light_hz",
                "background_rate_light_err_hz", "jitter_ps")
        return {k: v for k in keys if (v := _finite(getattr(self, k))) is not None}


@dataclass
class DetectorCalibration:
    """Result of :func:`calibrate_detectors`: one :class:`ChannelCalibration` per detector
    (by channel), the reference detector of the relative efficiencies, the basis
    splitter ratio divided out, the acquisition lengths and the figures written."""

    channels: dict[int, ChannelCalibration]
    reference_channel: int
    z_basis_probability: float
    dark_s: float
    light_s: float
    seed: int
    figures: list[str] = field(default_factory=list)

    def section(self) -> dict[str, Any]:
        """The ``[detectors]`` table of the calibration record."""
        return {
            "dark_s": self.dark_s,
            "light_s": self.light_s,
            "efficiency_reference_channel": self.reference_channel,
            "basis_splitter_z_probability": self.z_basis_probability,
            "channels": {str(c): r.record() for c, r in self.channels.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, for ``--json``."""
        return {
            "dark_s": self.dark_s,
            "light_s": self.light_s,
            "seed": self.seed,
            "efficiency_reference_channel": self.reference_channel,
            "basis_splitter_z_probability": self.z_basis_probability,
            "channels": {str(c): {k: _finite(v) for k, v in asdict(r).items()}
                         for c, r in self.channels.items()},
            "figures": list(self.figures),
        }


def _finite(v: Any) -> Any:
    """``v``, or None for a float that is not finite (nothing was measured)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


# --------------------------------------------------------------------------- procedure
def calibrate_detectors(cfg: BenchConfig, *, seed: int = 0, dark_s: float = DEFAULT_DARK_S,
                        light_s: float = DEFAULT_LIGHT_S, bench: dict[str, Any] | None = None,
                        plot_dir: str | os.PathLike | None = None) -> DetectorCalibration:
    """Characterize Bob's detectors: a dark read, then a light read, then
    :func:`analyse_detectors` (see the module documentation).

    ``dark_s``, ``light_s``: the two acquisitions, in seconds of bench time.
    ``bench``: instruments to use instead of building them from ``cfg`` (fresh
    ones: the pulse numbering starts at ``analysis.first_sync_pulse``).
    ``plot_dir``: write one PNG per detector there (``detector_ch<channel>.png``).
    """
    if not (dark_s > 0 and light_s > 0):
        raise ConfigError(f"calibrate detectors: dark_s = {dark_s!r} and light_s = "
                          f"{light_s!r}: both acquisitions need a positive duration")
    with armed(cfg, seed=seed, laser=False, bench=bench) as b:
        log.info("detectors: %g s with the laser off", dark_s)
        dark = b.read(dark_s)
        b["laser"].output_on()
        log.info("detectors: %g s with the laser on", light_s)
        light = b.read(light_s)
        b["laser"].output_off()
    return analyse_detectors(cfg, dark, light, seed=seed, plot_dir=plot_dir)


def analyse_detectors(cfg: BenchConfig, dark: Tags, light: Tags, *, seed: int = 0,
                      plot_dir: str | os.PathLike | None = None) -> DetectorCalibration:
    """The estimates from a dark read followed, in the same session, by a light read.

    ``seed`` selects Alice's sequence (:meth:`AliceSequence.from_config`).
    """
    chans = [cfg.receiver.sync_channel, *(d.channel for d in cfg.receiver.detectors)]
    dk, lt = _split(dark, chans), _split(light, chans)
    grid = _SyncGrid.build(cfg, dk[chans[0]], lt[chans[0]])
    seq = AliceSequence.from_config(cfg.source, seed)
    pi = _state_probabilities(seq, len(cfg.source.mean_photon_numbers))
    res_ps = _resolution_ps(light)
    work = [_analyse_channel(cfg, det, grid, dk[det.channel], lt[det.channel], seq, pi, res_ps)
            for det in cfg.receiver.detectors]

    z_split = cfg.receiver.z_basis_probability
    ref = work[0]
    first_of_basis = {}
    for w in work:
        first_of_basis.setdefault(w.det.basis, w)
    channels: dict[int, ChannelCalibration] = {}
    for w in work:
        split = z_split if w.det.basis == "Z" else 1.0 - z_split
        split_ref = z_split if ref.det.basis == "Z" else 1.0 - z_split
        if split <= 0 or split_ref <= 0:
            rel, rel_err = math.nan, math.nan
        else:
            rel, rel_err = _ratio(w.light_sum / split, w.light_sum_var / split**2,
                                  ref.light_sum / split_ref, ref.light_sum_var / split_ref**2,
                                  same=w is ref)
        fb = first_of_basis[w.det.basis]
        rel_b, rel_b_err = _ratio(w.light_sum, w.light_sum_var, fb.light_sum,
                                  fb.light_sum_var, same=w is fb)
        channels[w.det.channel] = w.result(rel, rel_err, rel_b, rel_b_err)

    out = DetectorCalibration(channels=channels, reference_channel=ref.det.channel,
                              z_basis_probability=z_split, dark_s=float(dark.duration_s),
                              light_s=float(light.duration_s), seed=int(seed))
    if plot_dir is not None:
        out.figures = _plot(work, channels, plot_dir)
    return out


# --------------------------------------------------------------------------- pulse grid
@dataclass
class _SyncGrid:
    """The pulse slots of the light read, from the sync tags of both reads."""

    sync_t: np.ndarray        # int64 sync tag times of the light read
    sync_pulse: np.ndarray    # int64 Alice's pulse number of each
    period_ps: float          # pulse period on the tagger's clock
    dark_window: tuple[int, int]
    light_window: tuple[int, int]
    light_slots: int

    @classmethod
    def build(cls, cfg: BenchConfig, sd: np.ndarray, sl: np.ndarray) -> _SyncGrid:
        """From the sync tags of the dark read (``sd``) and of the light read (``sl``)."""
        sc = cfg.receiver.sync_channel
        sp = cfg.source.sync_period_pulses
        if sd.size < 3 or sl.size < 3:
            raise DataError(f"calibrate detectors: {sd.size} and {sl.size} sync tags on "
                            f"channel {sc} in the dark and light reads; at least 3 each are "
                            "needed (is the sync cable on receiver.sync_channel?)")
        nominal = sp * cfg.period_ps
        steps = np.rint(np.diff(sl) / nominal).astype(np.int64)
        if (steps < 1).any():
            raise DataError(f"calibrate detectors: sync tags on channel {sc} closer than "
                            f"the sync period ({nominal:g} ps)")
        k = np.concatenate([[0], np.cumsum(steps)])
        kf = k - k.mean()
        y = (sl - sl[0]).astype(np.float64)
        period = float(np.dot(kf, y - y.mean()) / np.dot(kf, kf)) / sp
        # sync intervals from the session's first sync tag to the light read's first
        k0 = round((int(sl[0]) - int(sd[0])) / (sp * period))
        pulse = int(cfg.analysis.first_sync_pulse) + (k0 + k) * sp
        # each read's window runs from its second sync tag to its last: every tag in it is
        # final and from that read's laser state
        return cls(sl.astype(np.int64), pulse.astype(np.int64), period,
                   (int(sd[1]), int(sd[-1])), (int(sl[1]), int(sl[-1])),
                   int(pulse[-1] - pulse[1]))

    def slots(self, t: np.ndarray, delay_ps: float) -> tuple[np.ndarray, np.ndarray]:
        """Pulse number and phase (ps, in [-P/2, P/2)) of light-read detections at ``t``."""
        i = np.clip(np.searchsorted(self.sync_t, t, side="right") - 1, 0, None)
        dt = (t - self.sync_t[i]).astype(np.float64) - delay_ps
        n_rel = np.floor(dt / self.period_ps + 0.5)
        phase = dt - n_rel * self.period_ps
        return self.sync_pulse[i] + n_rel.astype(np.int64), phase


def _split(tags: Tags, channels: list[int]) -> dict[int, np.ndarray]:
    """The time tags of each channel."""
    return {c: tags.timestamps[tags.channels == c].astype(np.int64) for c in channels}


def _state_probabilities(seq: AliceSequence, n_int: int) -> np.ndarray:
    """Probability of each of Alice's codes."""
    ncode = 4 * n_int
    if seq.mode == MODE_PATTERN:
        return np.bincount(seq.pattern, minlength=ncode)[:ncode] / seq.pattern.shape[0]
    pz = seq.effective_z_probability
    pk = seq.effective_intensity_probabilities
    code = np.arange(ncode)
    basis, k = (code >> 1) & 1, code >> 2
    return np.where(basis == 0, pz, 1 - pz) * 0.5 * pk[k]


def _resolution_ps(light: Tags) -> float:
    """The tagger's bin: the greatest common divisor of the first tags' differences."""
    ts = light.timestamps[:20000]
    if ts.size < 2:
        return 1.0
    return float(max(int(np.gcd.reduce(np.abs(ts - ts[0]))), 1))


# --------------------------------------------------------------------------- one channel
@dataclass
class _Binned:
    """Inter-arrival intervals of one read in fine bins (times in ns).

    ``n`` continuous clicks ending an interval in the bin (at mean ``ue``), ``E``
    the exposure (time at risk) in the bin with centroid ``ce``, ``Gs`` the sum
    of the end-of-interval phase terms of intervals ending in the bin (at mean
    ``ug``), ``G0`` the sum of the start terms, ``extra`` time at risk of the
    background alone and ``n_extra`` the clicks that ended it, ``w`` the
    out-of-gate fraction.
    """

    edges: np.ndarray
    n: np.ndarray
    ue: np.ndarray
    E: np.ndarray
    ce: np.ndarray
    Gs: np.ndarray
    ug: np.ndarray
    G0: float
    extra: float
    w: float
    n_intervals: int
    n_extra: int = 0

    @property
    def n_events(self) -> int:
        return int(self.n.sum()) + self.n_extra

    @classmethod
    def build(cls, u: np.ndarray, event: np.ndarray, g_end: np.ndarray | None, g0: float,
              w: float, extra: float = 0.0, n_extra: int = 0,
              order: np.ndarray | None = None) -> _Binned:
        """From the intervals ``u`` (ns after the dead time), which of them end in a
        continuous click, their end terms; ``order`` sorts ``u`` if given."""
        order = np.argsort(u, kind="stable") if order is None else order
        s = np.asarray(u, np.float64)[order]
        top = max(float(s[-1]) if s.size else 1.0, 10.0) * 1.0001 + 0.1
        lin = np.arange(0.0, 10.0, 0.05)
        geo = 10.0 * 1.02 ** np.arange(0, int(math.log(top / 10.0) / math.log(1.02)) + 2)
        edges = np.concatenate([lin, geo])
        mid = 0.5 * (edges[:-1] + edges[1:])
        # sorted intervals: bin k holds s[j[k]:j[k + 1]]
        j = np.searchsorted(s, edges, side="left")

        def per_bin(x):
            c = np.concatenate([[0.0], np.cumsum(x)])
            return np.diff(c[j])

        ev = np.asarray(event, bool)[order]
        n = per_bin(ev.astype(np.float64))
        ue = np.where(n > 0, per_bin(np.where(ev, s, 0.0)) / np.maximum(n, 1), mid)
        cnt = np.diff(j).astype(np.float64)
        ug = np.where(cnt > 0, per_bin(s) / np.maximum(cnt, 1), mid)
        gs = np.zeros(mid.size) if g_end is None else per_bin(np.asarray(g_end)[order])
        # exposure: integral over the bin of Y(v) = #{u_i > v}, and of v Y(v)
        c1 = np.concatenate([[0.0], np.cumsum(s)])
        c2 = np.concatenate([[0.0], np.cumsum(s * s)])
        rest = s.size - j
        s1 = c1[j] + edges * rest
        s2 = 0.5 * (c2[j] + edges**2 * rest)
        E = np.diff(s1)
        ce = np.where(E > 0, np.diff(s2) / np.where(E > 0, E, 1.0), mid)
        return cls(edges, n, ue, E, ce, gs, ug, float(g0), float(extra), float(w), int(s.size),
                   int(n_extra))


def _hazard(u: np.ndarray | float, R: float, p: float, tau: float):
    """h(u) and its derivatives in p and tau (d/dR is 1)."""
    e = np.exp(-np.asarray(u, np.float64) / tau)
    s = 1.0 - p + p * e
    a = p * e / (tau * s)
    h = R + a
    dp = e / (tau * s * s)
    dtau = a * ((np.asarray(u) / tau**2) * (1.0 - p) / s - 1.0 / tau)
    return h, dp, dtau


def _nll(b: _Binned, R: float, p: float, tau: float) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of one read and its gradient in (R, p, tau)."""
    m = b.n > 0
    he, hp_e, ht_e = _hazard(b.ue[m], R, p, tau)
    hx, hp_x, ht_x = _hazard(b.ce, R, p, tau)
    hg, hp_g, ht_g = _hazard(b.ug, R, p, tau)
    h0, hp_0, ht_0 = _hazard(0.0, R, p, tau)
    n = b.n[m]
    if np.any(he <= 0) or (b.n_extra and R <= 0):
        return math.inf, np.zeros(3)
    f = (-np.sum(n * np.log(he)) + b.w * np.sum(b.E * hx) + np.sum(b.Gs * hg)
         - b.G0 * h0 + R * b.extra)
    gR = -np.sum(n / he) + b.w * b.E.sum() + b.Gs.sum() - b.G0 + b.extra
    if b.n_extra:
        f -= b.n_extra * math.log(R)
        gR -= b.n_extra / R
    gp = (-np.sum(n * hp_e / he) + b.w * np.sum(b.E * hp_x) + np.sum(b.Gs * hp_g)
          - b.G0 * hp_0)
    gt = (-np.sum(n * ht_e / he) + b.w * np.sum(b.E * ht_x) + np.sum(b.Gs * ht_g)
          - b.G0 * ht_0)
    return float(f), np.array([gR, float(gp), float(gt)])


def _best_rate(b: _Binned, p: float, tau: float) -> float:
    """The background rate that maximizes one read's likelihood at (p, tau).

    The score ``X - sum n / (R + a)`` is increasing and concave in ``R``, so
    Newton's method started below the root climbs to it monotonically.
    """
    X = _exposure_null(b)
    m = b.n > 0
    if b.n_events == 0 or X <= 0:
        return 0.0
    if p <= 0:
        return b.n_events / X
    n = b.n[m]
    a = _hazard(b.ue[m], 0.0, p, tau)[0]
    if b.n_extra:  # the clicks that end the background-only time have hazard R alone
        n, a = np.append(n, b.n_extra), np.append(a, 0.0)
    # afterpulse hazards far below the background scale count as zero: those clicks
    # need R > 0, which starts Newton's method safely above the poles at R = -a
    zero = a <= 1e-12 * b.n_events / X
    R = float(n[zero].sum()) / X
    if R == 0.0 and X - float(np.sum(n[~zero] / a[~zero])) >= 0:
        return 0.0
    for _ in range(200):
        q = n / (R + a)
        g = X - float(q.sum())
        dg = float(np.sum(q / (R + a)))
        step = -g / dg
        R += step
        if step <= 1e-13 * R:
            break
    return R


def _exposure_null(b: _Binned) -> float:
    """Time at risk of the background alone (p = 0)."""
    return b.w * b.E.sum() + b.Gs.sum() - b.G0 + b.extra


@dataclass
class _Fit:
    R: np.ndarray          # per read, 1/ns
    R_err: np.ndarray
    p: float
    p_err: float
    tau: float | None
    tau_err: float | None
    nll: float
    ok: bool


class _Model:
    """Joint likelihood of the reads: one background rate each, shared p and tau."""

    def __init__(self, reads: list[_Binned]):
        self.reads = reads
        self.free_R = [r.n_events > 0 for r in reads]

    def nll(self, R: np.ndarray, p: float, tau: float) -> tuple[float, np.ndarray]:
        f = 0.0
        g = np.zeros(len(self.reads) + 2)
        for i, r in enumerate(self.reads):
            fi, gi = _nll(r, float(R[i]), p, tau)
            f += fi
            g[i] = gi[0]
            g[-2] += gi[1]
            g[-1] += gi[2]
        return f, g

    def profile(self, p: float, tau: float) -> tuple[float, np.ndarray]:
        """Negative log-likelihood at (p, tau) minimized over the background rates."""
        f = 0.0
        Rs = np.zeros(len(self.reads))
        for i, r in enumerate(self.reads):
            Rs[i] = _best_rate(r, p, tau)
            f += _nll(r, Rs[i], p, tau)[0]
        return f, Rs

    def upper_limit(self, tau: float) -> tuple[float, float, float]:
        """(p at the maximum, upper bound, profile nll at the maximum) with tau held.

        The bound is where the profile likelihood has fallen by 2 in ln L (one-sided,
        about 97.7 %).
        """
        def prof(p):
            return self.profile(p, tau)[0]

        r = optimize.minimize_scalar(prof, bounds=(0.0, 0.5), method="bounded",
                                     options={"xatol": 1e-8})
        p0 = float(r.x)
        f0 = min(float(r.fun), prof(0.0))
        if prof(0.0) <= f0:
            p0 = 0.0
        hi = max(2 * p0, 1e-6)
        while prof(hi) - f0 < 2.0 and hi < 0.999:
            hi = min(4 * hi, 0.999)
        if prof(hi) - f0 < 2.0:
            return p0, hi, f0
        up = optimize.brentq(lambda x: prof(x) - f0 - 2.0, p0, hi, xtol=1e-10, rtol=1e-8)
        return p0, float(up), f0

    def null(self) -> _Fit:
        R = np.array([r.n_events / max(_exposure_null(r), 1e-300) for r in self.reads])
        err = np.array([math.sqrt(max(r.n_events, 1)) / max(_exposure_null(r), 1e-300)
                        for r in self.reads])
        f, _ = self.nll(R, 0.0, 1.0)
        return _Fit(R, err, 0.0, 0.0, None, None, f, True)

    def _theta(self, x: np.ndarray) -> tuple[np.ndarray, float, float]:
        """(rates, p, tau) from the free parameters (rates of reads without events are 0)."""
        R = np.zeros(len(self.reads))
        R[self.free_R] = x[:-2]
        return R, float(x[-2]), float(x[-1])

    def fit(self, previous: _Fit | None = None) -> _Fit:
        """Maximum likelihood in (free rates, p, tau).

        Started from the background-only rates with p = 0.03 at each time constant
        of :data:`FIT_STARTS_NS`, and from ``previous`` if given; the best end wins.
        The optimizer works on log rates, logit p and log tau; the errors come from
        the observed information in the natural parameters.
        """
        nr = len(self.reads)
        free = np.array(self.free_R)
        nf = int(free.sum())
        null = self.null()

        def natural(y):
            return np.concatenate([np.exp(y[:nf]), [special.expit(y[nf]), math.exp(y[nf + 1])]])

        def fun(y):
            x = natural(y)
            f, g = self.nll(*self._theta(x))
            gx = np.concatenate([g[:nr][free], g[-2:]])
            return f, gx * np.concatenate([x[:nf], [x[nf] * (1 - x[nf]), x[nf + 1]]])

        bounds = ([(math.log(1e-15), 0.0)] * nf + [(-35.0, 8.0)]
                  + [(math.log(TAU_BOUNDS_NS[0]), math.log(TAU_BOUNDS_NS[1]))])
        def start(R, p, tau):
            return np.array([*(math.log(max(r, 1e-14)) for r in R[free]),
                             special.logit(min(max(p, 1e-12), 0.99)), math.log(tau)])

        starts = [start(null.R, 0.03, tau0) for tau0 in FIT_STARTS_NS]
        if previous is not None and previous.tau is not None:
            starts.insert(0, start(previous.R, previous.p, previous.tau))
        best = None
        for y0 in starts:
            r = _minimize(fun, y0, np.array(bounds))
            if best is None or r[1] < best[1]:
                best = r
        x = natural(best[0])
        cov, ok = self._covariance(x)
        err = np.sqrt(np.abs(np.diag(cov))) if ok else np.full(x.size, math.nan)
        R, p, tau = self._theta(x)
        R_err = np.array([1.0 / max(_exposure_null(r), 1e-300) for r in self.reads])
        R_err[free] = err[:nf]
        return _Fit(R, R_err, p, float(err[nf]), tau, float(err[nf + 1]), float(best[1]), ok)

    def _covariance(self, x: np.ndarray) -> tuple[np.ndarray, bool]:
        """Inverse of the observed information (central differences of the gradient)."""
        nr = len(self.reads)
        free = np.array(self.free_R)

        def grad(th):
            _, g = self.nll(*self._theta(th))
            return np.concatenate([g[:nr][free], g[-2:]])

        k = x.size
        H = np.zeros((k, k))
        for i in range(k):
            step = 1e-4 * abs(x[i]) if i != k - 2 else max(1e-4 * x[i], 1e-7)
            step = step or 1e-18
            tp, tm = x.copy(), x.copy()
            tp[i] += step
            tm[i] = max(tm[i] - step, 0.0)
            H[:, i] = (grad(tp) - grad(tm)) / (tp[i] - tm[i])
        H = 0.5 * (H + H.T)
        try:
            cov = np.linalg.inv(H)
        except np.linalg.LinAlgError:
            return np.full((k, k), math.nan), False
        ok = bool(np.all(np.isfinite(cov)) and np.all(np.diag(cov) > 0))
        return cov, ok


def _minimize(fun, y0: np.ndarray, bounds: np.ndarray, max_iter: int = 200
              ) -> tuple[np.ndarray, float]:
    """Damped Newton (Levenberg-Marquardt) in a box; ``fun(y)`` gives (f, gradient).

    The Hessian is taken by forward differences of the gradient. A step that does
    not lower ``f`` raises the damping and is retried.
    """
    lo, hi = bounds[:, 0], bounds[:, 1]
    y = np.clip(np.asarray(y0, np.float64), lo, hi)
    f, g = fun(y)
    lam = 1e-3
    k = y.size
    for _ in range(max_iter):
        H = np.empty((k, k))
        for i in range(k):
            h = 1e-6 * max(1.0, abs(y[i]))
            yp = y.copy()
            yp[i] += h
            H[:, i] = (fun(yp)[1] - g) / h
        H = 0.5 * (H + H.T)
        # coordinates pinned at a bound with the gradient pushing outwards stay there
        pinned = ((y <= lo) & (g > 0)) | ((y >= hi) & (g < 0))
        improved = False
        while lam < 1e12:
            A = H + lam * np.diag(np.maximum(np.abs(np.diag(H)), 1e-12))
            A[pinned, :] = 0.0
            A[:, pinned] = 0.0
            A[pinned, pinned] = 1.0
            rhs = np.where(pinned, 0.0, -g)
            try:
                step = np.linalg.solve(A, rhs)
            except np.linalg.LinAlgError:
                lam *= 10
                continue
            yn = np.clip(y + step, lo, hi)
            fn, gn = fun(yn)
            if np.isfinite(fn) and fn <= f:
                improved = True
                break
            lam *= 10
        if not improved:
            break
        done = f - fn < 1e-9
        y, f, g = yn, fn, gn
        lam = max(lam / 10, 1e-9)
        if done:
            break
    return y, float(f)


def _gate_term(phase: np.ndarray, hw: float, period: float) -> np.ndarray:
    """G(phase): antiderivative of (out-of-gate indicator - w) over the period, zero mean."""
    w = 1.0 - 2.0 * hw / period
    g = 2.0 * hw / period
    ph = np.asarray(phase, np.float64)
    inside = -w * ph
    above = -w * hw + g * (ph - hw)
    below = w * hw + g * (ph + hw)
    return np.where(np.abs(ph) < hw, inside, np.where(ph >= hw, above, below))


def _wrap(phase: np.ndarray, period: float) -> np.ndarray:
    return phase - period * np.floor(phase / period + 0.5)


@dataclass
class _ChannelWork:
    """Intermediate results of one detector (kept for the figures)."""

    det: Any
    dark_t: np.ndarray
    light_t: np.ndarray
    light_phase: np.ndarray
    in_gate: np.ndarray
    jitter_ps: float
    hw_ps: float
    centre_ps: float
    light_out_of_gate: bool
    dark_dur_ps: float
    light_dur_ps: float
    period_ps: float
    dead_ps: float = 0.0
    dead_err_ps: float = 0.0
    x1_ps: float = 0.0
    bins: list[_Binned] = field(default_factory=list)
    fit: _Fit | None = None
    detected: bool = False
    lr: float = 0.0
    p_upper: float | None = None
    live_fraction: float = 1.0
    q_bar: float = 0.0
    light_sum: float = 0.0
    light_sum_var: float = 0.0
    m_signal: float = 0.0
    m_signal_err: float = 0.0
    pulse: np.ndarray | None = None

    def result(self, rel, rel_err, rel_b, rel_b_err) -> ChannelCalibration:
        f = self.fit
        to_hz = 1e9
        nd, nl = self.dark_t.size, self.light_t.size
        return ChannelCalibration(
            channel=self.det.channel, name=self.det.name, basis=self.det.basis,
            bit=self.det.bit, dark_clicks=int(nd),
            dark_click_rate_hz=float(nd / (self.dark_dur_ps * 1e-12)),
            dark_count_rate_hz=float(f.R[0] * to_hz),
            dark_count_rate_err_hz=float(f.R_err[0] * to_hz),
            light_clicks=int(nl), light_click_rate_hz=float(nl / (self.light_dur_ps * 1e-12)),
            live_fraction=float(self.live_fraction),
            background_rate_light_hz=float(f.R[1] * to_hz),
            background_rate_light_err_hz=float(f.R_err[1] * to_hz),
            relative_efficiency=float(rel), relative_efficiency_err=float(rel_err),
            relative_efficiency_in_basis=float(rel_b),
            relative_efficiency_in_basis_err=float(rel_b_err),
            mean_photons_signal=float(self.m_signal),
            mean_photons_signal_err=float(self.m_signal_err),
            dead_time_ns=float(self.dead_ps / _PS_PER_NS),
            dead_time_err_ns=float(self.dead_err_ps / _PS_PER_NS),
            shortest_interval_ns=float(self.x1_ps / _PS_PER_NS),
            afterpulse_detected=bool(self.detected),
            afterpulse_probability=float(f.p), afterpulse_probability_err=float(f.p_err),
            afterpulse_probability_upper=self.p_upper,
            afterpulse_time_constant_ns=f.tau if self.detected else None,
            afterpulse_time_constant_err_ns=f.tau_err if self.detected else None,
            afterpulse_likelihood_ratio=float(self.lr),
            jitter_ps=float(self.jitter_ps), gate_half_width_ps=float(self.hw_ps),
            gate_centre_ps=float(self.centre_ps))


def _analyse_channel(cfg: BenchConfig, det, grid: _SyncGrid, td: np.ndarray, tl: np.ndarray,
                     seq: AliceSequence, pi: np.ndarray, res_ps: float) -> _ChannelWork:
    P = grid.period_ps
    d0, d1 = grid.dark_window
    l0, l1 = grid.light_window
    td = td[(td >= d0) & (td < d1)]
    tl = tl[(tl >= l0) & (tl < l1)]
    where = f"calibrate detectors: channel {det.channel} ({det.name or det.basis + str(det.bit)})"
    if tl.size < MIN_LIGHT_CLICKS:
        raise DataError(f"{where}: {tl.size} clicks with the laser on (at least "
                        f"{MIN_LIGHT_CLICKS} are needed): is the detector biased and lit?")

    # the photon peak: centre, jitter, gate
    _, ph = grid.slots(tl, det.delay_ps)
    ang = np.angle(np.mean(np.exp(2j * np.pi * ph / P)))
    centre = float(ang * P / (2 * np.pi))
    delay = det.delay_ps + centre
    pulse, ph = grid.slots(tl, delay)
    core = np.abs(ph) < P / 4
    med = float(np.median(ph[core]))
    sigma = 1.4826 * float(np.median(np.abs(ph[core] - med)))
    sigma = max(sigma, res_ps / math.sqrt(12.0), 0.5)
    hw = GATE_SIGMAS * sigma + res_ps
    light_oog = 2 * hw / P <= MAX_GATE_FRACTION
    if not light_oog:
        log.warning("%s: jitter %.0f ps too large against the %.0f ps period: afterpulses "
                    "from the dark read only", where, sigma, P)
        hw = min(hw, 0.49 * P)
    in_gate = np.abs(ph) < hw
    work = _ChannelWork(det=det, dark_t=td, light_t=tl, light_phase=ph, in_gate=in_gate,
                        jitter_ps=sigma, hw_ps=hw, centre_ps=centre, light_out_of_gate=light_oog,
                        dark_dur_ps=float(d1 - d0), light_dur_ps=float(l1 - l0),
                        period_ps=P)

    work.pulse = pulse
    # intervals of each read, the last one censored by the end of the read; in the dark
    # read every click is continuous and the time before the first click is background
    # alone; in the light read out-of-gate clicks are continuous and in-gate ones censor
    xd = np.append(np.diff(td), d1 - td[-1]).astype(np.float64) if td.size else np.zeros(0)
    evd = np.arange(xd.size) < xd.size - 1
    extra_d = float(td[0] - d0) if td.size else float(d1 - d0)
    xl = np.append(np.diff(tl), l1 - tl[-1]).astype(np.float64)
    evl = np.append(~in_gate[1:], False) if light_oog else np.zeros(xl.size, bool)
    _, ph_end = grid.slots(np.array([l1], np.int64), delay)
    g_end = (_gate_term(np.append(ph[1:], ph_end), hw, P) / _PS_PER_NS if light_oog
             else None)
    wl = 1.0 - 2 * hw / P if light_oog else 0.0
    order_d, order_l = np.argsort(xd, kind="stable"), np.argsort(xl, kind="stable")
    x1 = min(xd[:-1].min() if xd.size > 1 else math.inf, xl[:-1].min())
    work.x1_ps = float(x1)

    def binned(dead_ps: float) -> list[_Binned]:
        ud = np.maximum(xd - dead_ps, 0.0) / _PS_PER_NS
        bd = _Binned.build(ud, evd, None, 0.0, 1.0, extra_d / _PS_PER_NS, min(td.size, 1),
                           order_d)
        g0 = (float(np.sum(_gate_term(_wrap(ph + dead_ps, P), hw, P))) / _PS_PER_NS
              if light_oog else 0.0)
        ul = np.maximum(xl - dead_ps, 0.0) / _PS_PER_NS
        return [bd, _Binned.build(ul, evl, g_end, g0, wl, order=order_l)]

    def fit_all(dead_ps: float, final: bool) -> None:
        work.bins = binned(dead_ps)
        model = _Model(work.bins)
        null = model.null()
        full = model.fit(previous=work.fit)
        lr = max(2.0 * (null.nll - full.nll), 0.0)
        work.lr = float(lr)
        work.detected = bool(lr >= AP_DETECTION_LR and full.ok and full.p_err > 0)
        if work.detected:
            work.fit, work.p_upper = full, None
            return
        p_hat, upper = 0.0, math.nan
        if final:
            p_hat, upper, _ = max((model.upper_limit(tau) for tau in TAU_GRID_NS),
                                  key=lambda x: x[1])
        work.fit = _Fit(null.R, null.R_err, p_hat, 0.5 * (upper - p_hat), None, None,
                        null.nll, True)
        work.p_upper = float(upper)

    fit_all(x1, final=False)
    _efficiency(work, grid, seq, pi, cfg, x1)
    work.dead_ps, work.dead_err_ps = _dead_time(work, grid, res_ps)
    fit_all(work.dead_ps, final=True)
    _efficiency(work, grid, seq, pi, cfg, work.dead_ps)
    log.info("%s: dark %.4g Hz, dead time %.3f ns, afterpulse p %.4g", where,
             work.fit.R[0] * 1e9, work.dead_ps / 1e3, work.fit.p)
    return work


def _efficiency(work: _ChannelWork, grid: _SyncGrid, seq: AliceSequence, pi: np.ndarray,
                cfg: BenchConfig, dead_ps: float) -> None:
    """Live slots, per-state click probabilities and the basis sums of mean photon numbers."""
    P = grid.period_ps
    tl, ph, in_gate = work.light_t, work.light_phase, work.in_gate
    sig = work.jitter_ps
    l0, l1 = grid.light_window
    # dead slots after each registered click: the slots after the click's own one whose
    # photon would arrive before the dead time ends (jitter-weighted at the edge)
    k0 = np.where(in_gate | (ph > 0), 1.0, 0.0)
    z = (dead_ps + ph) / P - k0
    K = np.floor(z)
    f = z - K
    r = P / sig
    dead = np.maximum(K, 0) + special.ndtr(f * r) * (K >= 0) + special.ndtr((f - 1) * r) * (
        K >= -1)
    first = tl - ph + k0 * P
    remaining = np.floor((l1 - first) / P) + 1
    dead = np.minimum(dead, np.maximum(remaining, 0))
    live = grid.light_slots - float(dead.sum())
    work.live_fraction = live / grid.light_slots

    # expected in-gate continuous clicks (the out-of-gate rate carried into the gates)
    bl = work.bins[1]
    fit = work.fit
    tau = fit.tau if fit.tau is not None else 1.0
    p = fit.p if work.detected else 0.0
    R = fit.R[1]
    hx, _, _ = _hazard(bl.ce, R, p, tau)
    hg, _, _ = _hazard(bl.ug, R, p, tau)
    h0, _, _ = _hazard(0.0, R, p, tau)
    if work.light_out_of_gate:
        B = (1 - bl.w) * float(np.sum(bl.E * hx)) - float(np.sum(bl.Gs * hg)) + bl.G0 * h0
    else:
        B = float(np.sum(bl.E * hx)) * 2 * work.hw_ps / P
    B = max(B, 0.0)

    pulse = work.pulse[in_gate]
    codes = seq.codes(pulse) if pulse.size else np.zeros(0, np.uint8)
    ncode = pi.size
    n = np.bincount(codes, minlength=ncode)[:ncode].astype(np.float64)
    expo = pi * live
    with np.errstate(divide="ignore", invalid="ignore"):
        Pc = np.where(expo > 0, (n - B * pi) / expo, 0.0)
        Pc = np.clip(Pc, 0.0, 1 - 1e-12)
        var_P = np.where(expo > 0, np.maximum(n, 1.0) / expo**2, 0.0)
        m = -np.log1p(-Pc)
        var_m = var_P / (1 - Pc) ** 2
    work.q_bar = float(np.sum(pi * Pc))

    where = f"calibrate detectors: channel {work.det.channel}"
    n_int = ncode // 4
    if n_int >= 2:
        mu = cfg.source.mean_photon_numbers
        m0, m1 = m[0:4].sum(), m[4:8].sum()
        nominal = mu[0] / mu[1] if mu[1] > 0 else math.inf
        need = 1.0 + 0.5 * (min(nominal, 10.0) - 1.0)
        if not m0 > need * m1:
            raise DataError(f"{where}: the clicks do not follow Alice's intensity classes "
                            f"(strongest / next = {m0 / max(m1, 1e-300):.3g}, expected about "
                            f"{nominal:.3g}): run qkdctl calibrate delays first")
    sums, vars_ = [], []
    for a in (0, 1):
        c0, c1 = 2 * a, 2 * a + 1
        if expo[c0] > 0 and expo[c1] > 0:
            sums.append(m[c0] + m[c1])
            vars_.append(var_m[c0] + var_m[c1])
    wts = np.array([1 / v for v in vars_])
    work.light_sum = float(np.sum(wts * np.array(sums)) / wts.sum())
    work.light_sum_var = float(1.0 / wts.sum())
    work.m_signal = work.light_sum
    work.m_signal_err = math.sqrt(work.light_sum_var)


def _dead_time(work: _ChannelWork, grid: _SyncGrid, res_ps: float) -> tuple[float, float]:
    """Mean and standard deviation of the likelihood in the dead time (see the module docs)."""
    P = grid.period_ps
    x1 = work.x1_ps
    fit = work.fit
    p = fit.p if work.detected else 0.0
    tau_ps = (fit.tau if fit.tau is not None else 1.0) * _PS_PER_NS
    # continuous clicks: h(0) of every interval, per ps
    lam_c = 0.0
    for i, b in enumerate(work.bins):
        lam_c += b.n_intervals * (fit.R[i] / _PS_PER_NS + p / tau_ps)
    # photon arrivals seen from each click: the phase histogram against the jittered grid
    M = max(int(round(P)), 64)
    step = P / M
    starts = work.light_phase
    hist = np.bincount(np.floor(np.mod(starts, P) / step).astype(np.int64) % M, minlength=M)
    grid_ph = np.arange(M) * step
    g = np.zeros(M)
    for r in range(-3, 4):
        g += np.exp(-0.5 * ((grid_ph + r * P) / work.jitter_ps) ** 2)
    g /= work.jitter_ps * math.sqrt(2 * math.pi)
    h_rev = np.roll(hist[::-1], 1)
    dens = np.real(np.fft.ifft(np.fft.fft(h_rev) * np.fft.fft(g)))
    dens = np.maximum(dens, 0.0) * work.q_bar
    # tags are floored to the tagger's bins: an interval can read up to one bin short
    top = x1 + (res_ps if res_ps > 1 else 0.0)
    span = min(top, 40 * P)
    n = int(span / step) + 1
    u = top - np.arange(n) * step
    idx = np.floor(np.mod(u, P) / step).astype(np.int64) % M
    lam = lam_c + dens[idx]
    cum = np.concatenate([[0.0], np.cumsum(lam[:-1] * step)])
    logw = -cum
    wts = np.exp(logw - logw.max())
    wts /= wts.sum()
    mean = float(np.sum(wts * u))
    sd = float(math.sqrt(max(np.sum(wts * (u - mean) ** 2), 0.0) + res_ps**2 / 12.0))
    return mean, sd


def _ratio(a: float, va: float, b: float, vb: float, *, same: bool) -> tuple[float, float]:
    if same:
        return 1.0, 0.0
    if b <= 0:
        return math.nan, math.nan
    r = a / b
    if a <= 0:
        return r, math.sqrt(va) / b
    return r, abs(r) * math.sqrt(va / a**2 + vb / b**2)


# --------------------------------------------------------------------------- figures
def _plot(work: list[_ChannelWork], channels: dict[int, ChannelCalibration],
          plot_dir: str | os.PathLike) -> list[str]:
    """One PNG per detector: the dark and the light inter-arrival histograms with the fit.

    The histograms count the intervals that end in a continuous click (all of
    them in the dark read, the out-of-gate ones in the light read), in bins of
    whole pulse periods up to nine, then of a twentieth of a decade; the fit is
    the expected count of the same bins, and the dashed line what the
    background rate alone would give.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(plot_dir, exist_ok=True)
    paths = []
    for w in work:
        res = channels[w.det.channel]
        fig = Figure(figsize=(11, 4.2))
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.83, wspace=0.22)
        fit = w.fit
        p = fit.p if w.detected else 0.0
        tau = fit.tau if fit.tau is not None else 1.0
        dead_ns = w.dead_ps / _PS_PER_NS
        period_ns = w.period_ps / _PS_PER_NS
        titles = ("laser off: all clicks", "laser on: out-of-gate clicks")
        for i, b in enumerate(w.bins):
            ax = fig.add_subplot(1, 2, i + 1)
            ax.set_title(titles[i], fontsize=10)
            if b.n_events == 0 or (i == 1 and not w.light_out_of_gate):
                ax.text(0.5, 0.5, "no continuous clicks", ha="center", transform=ax.transAxes)
                continue
            R = fit.R[i]
            expect = b.w * b.E * _hazard(b.ce, R, p, tau)[0] + b.Gs * _hazard(b.ug, R, p, tau)[0]
            bg = (b.w * b.E + b.Gs) * R
            # plot bins: whole pulse periods (the gates average out over a period, and the
            # start-of-interval term belongs to the first one), then 20 per decade
            e = b.edges
            geo = 9 * period_ns * 10 ** np.arange(
                0.0, math.log10(max(e[-1] / (9 * period_ns), 1.0)) + 0.05, 0.05)
            pe = np.concatenate([np.arange(9) * period_ns, geo])
            cut = np.unique(np.searchsorted(e, pe))
            cut = cut[cut < e.size - 1]
            obs = np.add.reduceat(b.n, cut)
            exp_ = np.add.reduceat(expect, cut)
            bgs = np.add.reduceat(bg, cut)
            exp_[0] -= b.G0 * _hazard(0.0, R, p, tau)[0]
            bgs[0] -= b.G0 * R
            lo, hi = e[cut], e[np.append(cut[1:], e.size - 1)]
            width = hi - lo
            x = dead_ns + np.sqrt(np.maximum(lo, 1e-3) * hi)
            seen = obs > 0
            err_lo = np.minimum(np.sqrt(obs), 0.999 * obs)
            ax.errorbar(x[seen], (obs / width)[seen],
                        yerr=np.array([err_lo, np.sqrt(obs)])[:, seen] / width[seen],
                        fmt="o", ms=3, lw=0.8, color="k", label="measured")
            keep = exp_ > 0
            ax.plot(x[keep], (exp_ / width)[keep], "-", color="C3", label="fit")
            keep = bgs > 0
            ax.plot(x[keep], (bgs / width)[keep], "--", color="C0", label="background alone")
            ax.axvline(dead_ns, color="0.5", lw=0.8, ls=":", label="dead time")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("time since the previous click (ns)")
            ax.set_ylabel("intervals per ns")
            ax.legend(fontsize=7, loc="lower left")
        if res.afterpulse_detected:
            ap = (f"afterpulses p = {res.afterpulse_probability:.4f} ± "
                  f"{res.afterpulse_probability_err:.4f}, tau = "
                  f"{res.afterpulse_time_constant_ns:.1f} ± "
                  f"{res.afterpulse_time_constant_err_ns:.1f} ns")
        else:
            ap = f"no afterpulsing detected (p < {res.afterpulse_probability_upper:.2g})"
        fig.suptitle(f"channel {res.channel} {res.name}: dark counts "
                     f"{res.dark_count_rate_hz:.4g} ± {res.dark_count_rate_err_hz:.2g} Hz, "
                     f"dead time {res.dead_time_ns:.3f} ± {res.dead_time_err_ns:.3f} ns\n"
                     f"{ap}, relative efficiency {res.relative_efficiency:.4f} ± "
                     f"{res.relative_efficiency_err:.4f}", fontsize=9)
        path = os.path.join(os.fspath(plot_dir), f"detector_ch{res.channel}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths
