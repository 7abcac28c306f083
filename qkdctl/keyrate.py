"""Analytic key rate of decoy-state BB84 versus fiber length.

A :class:`KeyRateModel` describes a link (fiber loss), Bob's receiver
(efficiency, dark counts, afterpulses, misalignment, dead time), Alice's
source (intensities, their probabilities, basis probabilities) and the
post-processing (error-correction efficiency, security parameters, block size).
From it this module computes the expected counts of a block at a given
distance (:func:`expected_statistics`), feeds them to the finite-key analysis
of :mod:`qkdctl.postprocess.finite_key`, optimises the protocol's free
parameters per distance and tabulates the secret-key rate against the PLOB
bound (:func:`keyrate_table`). ``qkdctl keyrate`` is its command line.

Models (``KeyRateModel.model``):

- ``"lim2014"``: three intensities, the finite-key bound of Lim et al., PRA 89,
  022307 (2014); free parameters ``p_z`` (their ``q_x``: the key-basis
  probability, on both sides), ``p_mu1``, ``p_mu2``, ``mu1``, ``mu2``; ``mu3`` fixed.
- ``"rusca2018"``: two intensities, the one-decoy bound of Rusca et al., APL 112,
  171104 (2018); free parameters ``mu1``, ``mu2``, ``p_mu1``, ``p_z``.
- ``"asymptotic"``: signal, weak decoy and vacuum in the infinite-key limit,
  GLLP with the decoy bounds of Ma, Qi, Zhao and Lo, PRA 72, 012326 (2005); free
  parameter ``mu`` (the weak decoy ``nu`` stays as configured: the bound only
  tightens as ``nu`` decreases). The rate is per signal pulse with the sifting
  factor ``q`` (1/2 for symmetric BB84), as in the paper.

Expected counts. Per pulse of intensity ``k`` that Alice prepares in basis
``b`` and Bob measures in ``b``, with ``eta_sys = 10^(-alpha L / 10) eta_Bob``
(Lim et al. Sec. IV)::

    D_k = 1 - (1 - 2 p_dc) exp(-eta_sys k)                 (detection, two detectors)
    R_k = D_k (1 + p_ap)                                   (with afterpulses)
    e_k = p_dc + e_mis (1 - exp(-eta_sys k)) + p_ap D_k / 2 (bit error)

Lim et al. print ``eta_ch`` instead of ``eta_sys`` in ``e_k``; that gives a QBER
of several per cent at every distance and does not reproduce their Fig. 1, so
``eta_sys`` is used. With ``p_ap = 0`` this is the model of Rusca et al.
(Appendix B: detection ``1 - exp(-mu eta) + P_DC``, error
``e_det (1 - exp(-mu eta)) + P_DC / 2`` with ``P_DC = 2 p_dc``) and of Ma et al.
(``Q = Y0 + 1 - exp(-eta mu)``, ``E Q = Y0 / 2 + e_det (1 - exp(-eta mu))`` with
``Y0 = 2 p_dc``), up to terms of order ``p_dc eta mu``. Sifting: with an
*active* basis choice Bob measures in ``b`` with probability ``p_b``; with a
*passive* splitter (the qkdctl bench) the basis' detectors receive the fraction
``p_b`` of the light (``eta_sys k p_b`` in place of ``eta_sys k``) and their dark
counts in full. Dead time ``t`` (non-paralysable) multiplies the counts by
``1 / (1 + f t P)`` with ``f`` the pulse rate and ``P`` the click probability per
pulse of the whole receiver (``dead_time_scope = "receiver"``, as in Rusca et
al., Appendix B) or of one detector (``"detector"``, each basis' clicks shared by its two
detectors). Error correction discloses ``f_EC h(E) n_key`` bits.

Bench models. A model made from a bench file (:func:`model_from_bench`) has the
counts of the bench's own receiver instead (:class:`PassiveReceiver`, computed
by :func:`_passive_per_pulse`): the ones its simulated optical table
(:mod:`qkdctl.sim`) produces and its sifting core (:mod:`qkdctl.sifting`)
counts. A basis splitter sends the share ``p_b`` of the light to the two
detectors of basis ``b``; for each of Alice's states (intensity, basis, bit)
detector ``j`` receives an independent Poisson number of photons of mean
``m_j`` (coherent light through linear optics) and, without dead time, clicks
inside the analysis gate with probability
``1 - (1 - p_dc,j)(1 - g_j (1 - exp(-m_j)))`` (``p_dc,j``: a dark count inside
the gate; ``g_j``: the gate's acceptance of the timing jitter). All 2^4 click
patterns are squashed as the sifting does (clicks of one basis that disagree
give a random bit; clicks in both bases a random basis and a random bit, or
nothing with ``multi_click = "discard"``) and sifted against Alice's basis.
Non-paralysable dead time and afterpulses are a Markov renewal process per
detector: a registered event (a photon click on the pulse grid, or a dark
count or afterpulse at a uniform phase) blinds the detector for its dead time,
after which the first photon click, dark count or pending afterpulse registers.
Its steady state gives, per detector, the probabilities that a photon click
and a dark count at a pulse register inside the gate and that an afterpulse
does, which replace the click probability above. Approximations: the
detectors' dead times are taken as independent of one another (they are
coupled only through pulses on which several detectors click); inside a
cycle the first pulse after a dark count or afterpulse is taken at its mean
time, and an afterpulse's phase as that of an exponential delay at the
cycle's total event rate (exact when the afterpulse delay is long against the
pulse period); the timing jitter is taken as short against the period (a
click never reaches another pulse's gate). The table is taken as calibrated
(laser at its calibrated current, no polarization-controller rotation) and
Alice's choices as independent per pulse (``sequence = "stream"``).
``tests/test_keyrate_sim.py`` checks the sifted counts and errors per intensity
and basis against runs of the simulated bench.

Block size. ``block_size`` is the number of sifted key-basis detections per
block (Lim's ``n_X``, Rusca's ``n_Z``); the pulses needed for it are
``N = n_key / P_key``. Alternatively ``pulses`` fixes ``N``. The rate is ``l / N``
secret bits per pulse.

Secrecy. ``eps_sec`` may be fixed, or proportional to the key length,
``eps_sec = kappa l`` (Lim et al.: ``kappa = 1e-15``), solved by iterating
``l -> l(kappa l)`` from ``l = n_key`` to a fixed point (within one bit).

Optimisation (``scipy.optimize``): a quasi-random (Sobol) scan of the free
parameters, then Nelder-Mead from the best scan points and from the optimum
at the previous distance, in variables that keep every constraint
(``mu1 > mu2 + mu3``, ``mu2 > mu3``, probabilities in (0, 1)). Distances are
swept in increasing order; a point whose rate is below the next one's is
re-optimised from its neighbour, so the curve is monotone.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .config import BenchConfig, _build, _Ctx, _spec, parse_bench
from .errors import ConfigError, QkdctlError
from .postprocess.finite_key import (
    DEFAULT_EPS_COR,
    DEFAULT_EPS_SEC,
    DEFAULT_PHASE_ERROR_TOLERANCE,
    DecoyStatistics,
    FiniteKeyResult,
    _gllp_raw,
    _h,
    _lim_core,
    _rusca_core,
    lim2014_key_length,
    plob_bound,
    rusca2018_key_length,
)

__all__ = [
    "FREE_PARAMETERS",
    "MODELS",
    "BenchDetector",
    "KeyRateModel",
    "KeyRatePoint",
    "PassiveReceiver",
    "cmd_keyrate",
    "default_keyrate_path",
    "evaluate",
    "expected_statistics",
    "format_table",
    "keyrate_table",
    "leak_ec_bits",
    "load_keyrate_model",
    "max_distance_km",
    "model_from_bench",
    "optimise_point",
    "parse_keyrate",
    "register",
]

log = logging.getLogger(__name__)

MODELS = ("lim2014", "rusca2018", "asymptotic")
#: the parameters optimised per distance, by model
FREE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "lim2014": ("p_z", "p_mu1", "p_mu2", "mu1", "mu2"),
    "rusca2018": ("p_z", "p_mu1", "mu1", "mu2"),
    "asymptotic": ("mu",),
}
#: the parameters reported in a table row, by model
ROW_PARAMETERS: dict[str, tuple[str, ...]] = {
    "lim2014": ("mu1", "mu2", "mu3", "p_mu1", "p_mu2", "p_mu3", "p_z"),
    "rusca2018": ("mu1", "mu2", "p_mu1", "p_mu2", "p_z"),
    "asymptotic": ("mu", "nu"),
}
#: block size of a model derived from a bench file (sifted key-basis bits)
BENCH_BLOCK_SIZE = 1e8
#: largest mean photon number the optimiser considers
MU_MAX = 1.5
DEFAULT_DISTANCES = (0.0, 200.0, 10.0)


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class KeyRateModel:
    """Everything that fixes the key rate of a link, as read from a keyrate or bench file.

    ``dark_count_probability`` is per detector and per pulse (gate);
    ``mean_photon_numbers``, ``intensity_probabilities`` and the basis
    probabilities are the values used when ``optimise`` is false and the first
    guess when it is true. ``bob_z_basis_probability`` ``None`` means the same as
    Alice's. Exactly one of ``block_sizes`` / ``pulses`` is set for the finite-key
    models, neither for ``"asymptotic"``; ``eps_sec_per_key_bit`` (Lim's
    ``kappa``) replaces ``eps_sec`` when set. With ``receiver`` set (a model of
    a bench file) the counts are those of that passive four-detector receiver
    (:class:`PassiveReceiver`), which then supersedes ``eta_bob``,
    ``dark_count_probability``, ``afterpulse_probability``, ``dead_time_ns`` and
    ``basis_choice`` (kept as the receiver's means, for display).
    """

    model: str
    eta_bob: float
    dark_count_probability: float
    misalignment: float
    mean_photon_numbers: tuple[float, ...]
    intensity_probabilities: tuple[float, ...]
    z_basis_probability: float = 0.5
    bob_z_basis_probability: float | None = None
    afterpulse_probability: float = 0.0
    fiber_attenuation_db_per_km: float = 0.2
    basis_choice: str = "active"
    dead_time_ns: float = 0.0
    dead_time_scope: str = "receiver"
    rep_rate_hz: float | None = None
    error_correction_efficiency: float = 1.16
    eps_sec: float = DEFAULT_EPS_SEC
    eps_sec_per_key_bit: float | None = None
    eps_cor: float = DEFAULT_EPS_COR
    phase_error_tolerance: float = DEFAULT_PHASE_ERROR_TOLERANCE
    sifting_factor: float = 0.5
    block_sizes: tuple[float, ...] = ()
    pulses: float | None = None
    optimise: bool = True
    distances_km: tuple[float, ...] = ()
    name: str = "keyrate"
    path: str = "<string>"
    receiver: PassiveReceiver | None = None

    @property
    def bob_z(self) -> float:
        b = self.bob_z_basis_probability
        return self.z_basis_probability if b is None else b

    def fixed_parameters(self) -> dict[str, float]:
        """The configured values of the protocol parameters, by name."""
        mus, ps = self.mean_photon_numbers, self.intensity_probabilities
        if self.model == "asymptotic":
            return {"mu": mus[0], "nu": mus[1]}
        d = {f"mu{i + 1}": m for i, m in enumerate(mus)}
        d.update({f"p_mu{i + 1}": p for i, p in enumerate(ps)})
        d["p_z"] = self.z_basis_probability
        if self.bob_z_basis_probability is not None:
            d["p_z_bob"] = self.bob_z_basis_probability
        return d

    def channel_transmittance(self, distance_km: float) -> float:
        return 10.0 ** (-self.fiber_attenuation_db_per_km * distance_km / 10.0)


@dataclass(frozen=True)
class KeyRatePoint:
    """The key rate at one distance for one set of protocol parameters."""

    distance_km: float
    parameters: dict[str, float]
    secret_bits_per_pulse: float
    block_size: float | None = None
    pulses: float | None = None
    statistics: DecoyStatistics | None = None
    result: FiniteKeyResult | None = None
    qber_key: float = math.nan


# --------------------------------------------------------------------------- counts
def _split(model: KeyRateModel, p: Mapping[str, float]
           ) -> tuple[tuple[float, ...], tuple[float, ...], float, float]:
    """(intensities, probabilities, Alice's and Bob's key-basis probability) from names."""
    if model.model == "asymptotic":
        mus = (p["mu"], p["nu"], model.mean_photon_numbers[2])
        return mus, model.intensity_probabilities, model.z_basis_probability, model.bob_z
    n = len(model.mean_photon_numbers)
    mus = tuple(p[f"mu{i + 1}"] for i in range(n))
    ps = [p[f"p_mu{i + 1}"] for i in range(n - 1)]
    ps.append(p.get(f"p_mu{n}", 1.0 - sum(ps)))
    pz = p["p_z"]
    return mus, tuple(ps), pz, p.get("p_z_bob", pz)


def _per_pulse(model: KeyRateModel, mus: Sequence[float], ps: Sequence[float], pa: float,
               pb: float, eta_ch: float
               ) -> tuple[list[float], list[float], list[float], list[float]]:
    """Joint per-pulse probabilities of (class k, matched basis, click) and of an error.

    Returns ``(key_det, key_err, test_det, test_err)``, lists over classes.
    """
    if model.receiver is not None:
        return _passive_per_pulse(model.receiver, model.misalignment, mus, ps, pa, pb, eta_ch)
    eta = eta_ch * model.eta_bob
    pdc, pap, emis = (model.dark_count_probability, model.afterpulse_probability,
                      model.misalignment)
    passive = model.basis_choice == "passive"
    out: list[list[float]] = []
    load = []
    for pa_b, pb_b in ((pa, pb), (1.0 - pa, 1.0 - pb)):
        share = 1.0 if passive else pb_b
        x_scale = eta * (pb_b if passive else 1.0)
        det, err, clicks = [], [], 0.0
        for k, p in zip(mus, ps, strict=True):
            e_x = math.exp(-x_scale * k)
            d = 1.0 - (1.0 - 2.0 * pdc) * e_x
            r = d * (1.0 + pap)
            e = pdc + emis * (1.0 - e_x) + pap * d / 2.0
            det.append(p * pa_b * share * r)
            err.append(p * pa_b * share * e)
            clicks += p * share * r
        out.extend((det, err))
        load.append(clicks)
    if model.dead_time_ns > 0.0:
        ft = (model.rep_rate_hz or 0.0) * model.dead_time_ns * 1e-9
        if model.dead_time_scope == "receiver":
            c = 1.0 / (1.0 + ft * (load[0] + load[1]))
            cs = (c, c)
        else:
            cs = (1.0 / (1.0 + ft * load[0] / 2.0), 1.0 / (1.0 + ft * load[1] / 2.0))
        for i, c in enumerate((cs[0], cs[0], cs[1], cs[1])):
            out[i] = [v * c for v in out[i]]
    return out[0], out[1], out[2], out[3]


# --------------------------------------------------------------------------- passive receiver
@dataclass(frozen=True)
class BenchDetector:
    """One detector of a :class:`PassiveReceiver`, with the simulated bench's physics.

    ``basis`` (0 = Z, 1 = X) and ``bit`` are the outcome it reports; the dark
    counts are Poisson in continuous time; ``dead_time_ps`` is non-paralysable
    (on the tagger's clock) and starts at every registered event, in the gate or
    not; an afterpulse follows a registered event with probability
    ``afterpulse_probability``, an exponential time of mean
    ``afterpulse_time_constant_ns`` after the dead time, unless another event
    registers first. ``jitter_ps`` is the RMS timing jitter; ``gate_offset_ps``
    the true arrival time minus the centre of the analysis gate.
    """

    basis: int
    bit: int
    efficiency: float
    dark_count_rate_hz: float = 0.0
    dead_time_ps: float = 0.0
    afterpulse_probability: float = 0.0
    afterpulse_time_constant_ns: float = 100.0
    jitter_ps: float = 0.0
    gate_offset_ps: float = 0.0


@dataclass(frozen=True)
class PassiveReceiver:
    """Bob's passive receiver: insertion loss, a basis splitter, one detector per outcome.

    ``transmittance`` is Bob's optical loss before the splitter (the splitter's
    ratio is Bob's Z-basis probability); ``period_ps`` is the pulse period on the
    tagger's clock; ``gate_width_ps`` the analysis gate, centred on each pulse's
    expected arrival; ``sync_jitter_ps`` and ``tagger_resolution_ps`` blur the
    gate edges; ``multi_click`` is the sifting's squashing rule (``"random"`` or
    ``"discard"``, see :mod:`qkdctl.sifting`).
    """

    detectors: tuple[BenchDetector, ...]
    transmittance: float
    gate_width_ps: float
    period_ps: float
    sync_jitter_ps: float = 0.0
    tagger_resolution_ps: float = 1.0
    multi_click: str = "random"


def _norm_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


@lru_cache(maxsize=256)
def _outcome_weights(bases: tuple[int, ...], bits: tuple[int, ...],
                     multi_click: str) -> np.ndarray:
    """``w[mask, b, y]``: probability that the set ``mask`` of clicking detectors gives
    Bob's result (basis b, bit y), after squashing as in :func:`qkdctl.sifting.assign_kernel`.

    No click, and clicks in both bases with ``multi_click = "discard"``, give no
    result (a zero row). Clicks of one basis that agree give their bit; that
    disagree, a random bit; clicks in both bases, a random basis and a random bit.
    """
    nd = len(bases)
    w = np.zeros((1 << nd, 2, 2))
    for mask in range(1, 1 << nd):
        on = [j for j in range(nd) if mask >> j & 1]
        bs = {bases[j] for j in on}
        ys = {bits[j] for j in on}
        if len(bs) == 2:
            if multi_click != "discard":
                w[mask] = 0.25
        elif len(ys) == 2:
            w[mask, bs.pop(), :] = 0.5
        else:
            w[mask, bs.pop(), ys.pop()] = 1.0
    return w


def _edge_blur_ps(rx: PassiveReceiver) -> float:
    """RMS blur of the gate edges besides a detector's jitter: sync jitter, tagger bins."""
    return math.sqrt(rx.sync_jitter_ps**2 + rx.tagger_resolution_ps**2 / 6.0)


def _gate_acceptance(d: BenchDetector, rx: PassiveReceiver) -> float:
    """Probability that a photon click falls inside its pulse's gate."""
    half = rx.gate_width_ps / 2.0
    s = math.hypot(d.jitter_ps, _edge_blur_ps(rx))
    off = d.gate_offset_ps
    if s <= 0.0:
        return 1.0 if -half <= off < half else 0.0
    return _norm_cdf((half - off) / s) - _norm_cdf((-half - off) / s)


#: quadrature over a standard normal jitter draw (nodes, weights)
_JITTER_NODES = np.linspace(-10.0, 10.0, 801)
_JITTER_WEIGHTS = np.exp(-0.5 * _JITTER_NODES**2)
_JITTER_WEIGHTS /= _JITTER_WEIGHTS.sum()


@lru_cache(maxsize=256)
def _photon_slots(dead_ps: float, period_ps: float, jitter_ps: float, offset_ps: float,
                  half_gate_ps: float, edge_ps: float
                  ) -> tuple[tuple[tuple[float, float, float, float], ...], float]:
    """The pulses after a registered photon click at the edge of its dead time.

    Pulse m after the click arrives ``m P + sigma (x_m - x_0)`` later (``x`` the
    two clicks' jitter draws) and the tagger counts whole picoseconds, which
    adds a uniform ``V`` in [0, 1) ps: a click at m registers when
    ``m P + sigma (x_m - x_0) + V >= dead time``. Early clicks are both more
    often blocked and, with a gate off centre, more or less often inside the
    gate, so the two are taken jointly. A dark count inside pulse m's gate comes
    at ``m P - offset + w`` (w uniform over the gate). Returns, for every pulse
    where any of these is uncertain, (m, P(a click registers), P(it registers
    inside the gate), P(a dark count inside the gate registers)), and the
    first pulse from which all are sure.
    """
    s, half = jitter_ps, half_gate_ps
    if s > 0.0:
        x, w = _JITTER_NODES, _JITTER_WEIGHTS
    else:
        x, w = np.zeros(1), np.ones(1)
    from scipy.special import ndtr

    t = offset_ps + s * x  # a click's time relative to its gate's centre
    if edge_ps > 0.0:
        in_gate = ndtr((half - t) / edge_ps) - ndtr((-half - t) / edge_ps)
    else:
        in_gate = ((t >= -half) & (t < half)).astype(float)

    def psi(z: np.ndarray) -> np.ndarray:  # an antiderivative of the normal CDF
        return z * ndtr(z) + np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)

    spread = 12.0 * s + half + abs(offset_ps) + 2.0
    m_lo = max(1, math.floor((dead_ps - spread) / period_ps))
    m_hi = max(m_lo, math.ceil((dead_ps + spread) / period_ps))
    out = []
    for m in range(m_lo, m_hi + 1):
        c = s * x + m * period_ps - dead_ps  # open when sigma x_0 <= c + V
        if s > 0.0:
            opened = s * (psi((c + 1.0) / s) - psi(c / s))  # averaged over V
        else:
            opened = np.clip(c + 1.0, 0.0, 1.0)
        dark = np.clip((half - (dead_ps - m * period_ps + offset_ps + s * x)) / (2.0 * half),
                       0.0, 1.0)
        u, ug, ud = float(w @ opened), float(w @ (opened * in_gate)), float(w @ dark)
        if u > 0.0 or ud > 0.0:
            out.append((float(m), u, ug, ud))
    return tuple(out), float(m_hi + 1)


def _cycle(slots: Sequence[tuple[float, float, float, float]], t_tail: float, gate: float,
           tau: float, q: float, kappa: float) -> tuple[float, float, float, float]:
    """One dead-time cycle of a detector, from a registered event (time 0, in pulses).

    The detector is blind until ``tau``; then it registers the first of: a
    photon click (probability ``q`` at each pulse) and a continuous-time event
    of rate ``kappa`` (dark counts, a pending afterpulse). ``slots`` are the
    first pulses as (time, P(open), P(open, in the gate), P(open to a dark count
    in the gate)); after them comes one fully open pulse every unit from
    ``t_tail``, a click inside the gate with probability ``gate``. Returns the
    expected numbers of pulses reached open to a click inside the gate and to a
    dark count inside the gate, the expected time from ``tau`` to the
    registration, and the probability that a photon click ends the cycle.
    """
    surv, t_prev = 1.0, tau
    open_gate = open_dark = live = photon = 0.0

    def span(dt: float) -> float:  # integral of exp(-kappa t) over [0, dt]
        return -math.expm1(-kappa * dt) / kappa if kappa > 0.0 else dt

    for t, u, ug, ud in slots:
        if t > t_prev:
            live += surv * span(t - t_prev)
            surv *= math.exp(-kappa * (t - t_prev))
            t_prev = t
        open_gate += surv * ug
        open_dark += surv * ud
        photon += surv * q * u
        surv *= 1.0 - q * u
    if t_tail > t_prev:
        live += surv * span(t_tail - t_prev)
        surv *= math.exp(-kappa * (t_tail - t_prev))
    tail = surv / (1.0 - (1.0 - q) * math.exp(-kappa))
    open_gate += tail * gate
    open_dark += tail
    photon += tail * q
    live += tail * (1.0 - q) * span(1.0)
    return open_gate, open_dark, live, photon


def _wrapped_gate_mass(rate: float, shift: float, half: float) -> float:
    """P((shift + E) mod 1 lies within ``half`` of an integer), E exponential of ``rate``."""
    if rate <= 0.0:
        return 2.0 * half

    def cdf(x: float) -> float:  # of E mod 1, on [0, 1]
        return math.expm1(-rate * x) / math.expm1(-rate)

    lo = (-half - shift) % 1.0
    hi = lo + 2.0 * half
    if hi <= 1.0:
        return cdf(hi) - cdf(lo)
    return 1.0 - cdf(lo) + cdf(hi - 1.0)


def _dead_time(d: BenchDetector, q: float, rx: PassiveReceiver) -> tuple[float, float, float]:
    """(photon, dark, afterpulse): one detector in the steady state of its dead time.

    ``q`` is the probability of a photon click per pulse (over Alice's states).
    ``photon`` is the probability that a photon click at a given pulse
    registers inside the gate (gate acceptance included), ``dark`` that a dark
    count inside the gate registers, ``afterpulse`` the probability per pulse of
    a registered afterpulse inside that pulse's gate. The events form a Markov
    renewal process: a cycle starts at a registered event, either a photon
    click (on the pulse grid, blurred by the jitter: see :func:`_photon_slots`)
    or a dark count or afterpulse (at a uniformly distributed phase), and ends
    at the next registered event (:func:`_cycle`).
    """
    gate = _gate_acceptance(d, rx)
    period = rx.period_ps
    tau = d.dead_time_ps / period
    rho = d.dark_count_rate_hz * period * 1e-12
    p_ap = d.afterpulse_probability
    mu = period / (d.afterpulse_time_constant_ns * 1e3) if p_ap > 0.0 else 0.0
    if q <= 0.0 and rho <= 0.0:
        return gate, 1.0, 0.0
    i0 = math.floor(tau)
    u0 = 1.0 - (tau - i0)
    uniform = (((tau + i0 + 1.0) / 2.0, u0, u0 * gate, u0),), i0 + 1.5
    half = rx.gate_width_ps / (2.0 * period)
    nu = mu + rho - math.log1p(-min(q, 1.0 - 1e-15))
    shift = tau + d.gate_offset_ps / period
    photon_slots = _photon_slots(float(d.dead_time_ps), period, d.jitter_ps, d.gate_offset_ps,
                                 rx.gate_width_ps / 2.0, _edge_blur_ps(rx))
    starts = {"photon": (photon_slots, _wrapped_gate_mass(nu, shift, half)),
              "uniform": (uniform, 2.0 * half)}
    res = {}
    for name, ((slots, t_tail), acc) in starts.items():
        sums = np.zeros(5)  # open in the gate, open to dark counts, time, to a photon, afterpulse
        for w, kappa in ((1.0 - p_ap, rho), (p_ap, rho + mu)):
            if w <= 0.0:
                continue
            og, od, live, ph = _cycle(slots, t_tail, gate, tau, q, kappa)
            sums += w * np.array([og, od, tau + live, ph, (kappa - rho) * live * acc])
        res[name] = sums
    ph_ph, ph_un = res["photon"][3], res["uniform"][3]
    denom = ph_un + (1.0 - ph_ph)
    pi_ph = ph_un / denom if denom > 0.0 else 1.0
    mean = pi_ph * res["photon"] + (1.0 - pi_ph) * res["uniform"]
    return float(mean[0] / mean[2]), float(mean[1] / mean[2]), float(mean[4] / mean[2])


def _passive_per_pulse(rx: PassiveReceiver, e_mis: float, mus: Sequence[float],
                       ps: Sequence[float], pa: float, pb: float, eta_ch: float
                       ) -> tuple[list[float], list[float], list[float], list[float]]:
    """:func:`_per_pulse` for a passive receiver: every click pattern, squashed and sifted.

    Per Alice's state (class k, basis a, bit x) detector j receives a Poisson
    number of photons of mean ``m_j = k eta_ch t_Bob s_j r_j eta_j`` (splitter
    share ``s_j``; route ``r_j`` = ``1 - e_mis`` / ``e_mis`` to the right / wrong
    detector of Alice's basis, 1/2 in the other basis), independently of the
    others. Without dead time it clicks inside the gate with probability
    ``1 - (1 - p_dc,j)(1 - g_j (1 - exp(-m_j)))`` (a dark count inside the gate
    ``p_dc,j``, gate acceptance of the jitter ``g_j``); with dead time and
    afterpulses with ``P_j p_j + D_j p_dc,j (1 - g_j p_j) + A_j (1 - f_j p_j) /
    (1 - f_j q_j)``, ``p_j = 1 - exp(-m_j)``, where ``P_j`` / ``D_j`` are the
    probabilities that a photon click / a dark count at a pulse registers inside
    the gate and ``A_j`` that of a registered afterpulse there
    (:func:`_dead_time`; ``P_j = g_j``, ``D_j = 1``, ``A_j = 0`` without them).
    An afterpulse due in the share ``f_j`` of the gate after the photons'
    arrival is pre-empted by a photon click of that pulse, so its share of the
    clicks depends on the state (``q_j`` is ``p_j`` averaged over the states, as
    in ``A_j``). The detectors are taken as independent given the state; the 2^n
    click patterns are squashed into Bob's (basis, bit) (:func:`_outcome_weights`)
    and sifted against Alice's basis.
    """
    dets = rx.detectors
    nd = len(dets)
    basis = np.array([d.basis for d in dets])
    bit = np.array([d.bit for d in dets])
    eff = np.array([d.efficiency for d in dets])
    a = np.arange(2)[:, None, None]
    x = np.arange(2)[None, :, None]
    split = np.where(basis == 0, pb, 1.0 - pb)
    route = np.where(basis == a, np.where(bit == x, 1.0 - e_mis, e_mis), 0.5)
    per_photon = eta_ch * rx.transmittance * split * route * eff  # (a, x, j)
    mu = np.asarray(mus, float)
    p_click = -np.expm1(-mu[:, None, None, None] * per_photon)  # (k, a, x, j)
    w_state = (np.asarray(ps, float)[:, None, None] * np.array([pa, 1.0 - pa])[:, None]
               * 0.5 * np.ones((1, 1, 2)))  # (k, a, x)
    load = np.einsum("kax,kaxj->j", w_state, p_click)
    dark = np.array([-math.expm1(-d.dark_count_rate_hz * rx.gate_width_ps * 1e-12)
                     for d in dets])
    accept = np.array([_gate_acceptance(d, rx) for d in dets])
    live_ph, live_dc, ap = np.array([_dead_time(d, float(q), rx)
                                     for d, q in zip(dets, load, strict=True)]).T
    # an afterpulse due inside the gate after the photons' arrival is pre-empted by
    # a photon click (the click is counted once, as the photon's): of the afterpulses
    # registered, on average over the states, a share depends on the state
    late = np.array([min(max(0.5 - d.gate_offset_ps / rx.gate_width_ps, 0.0), 1.0)
                     for d in dets])
    ap_state = ap * (1.0 - late * p_click) / (1.0 - late * load)
    click = live_ph * p_click + live_dc * dark * (1.0 - accept * p_click) + ap_state
    click = np.clip(click, 0.0, 1.0)
    masks = (np.arange(1 << nd)[:, None] >> np.arange(nd)) & 1  # (M, j)
    pattern = np.prod(np.where(masks == 1, click[..., None, :], 1.0 - click[..., None, :]),
                      axis=-1)  # (k, a, x, M)
    w = _outcome_weights(tuple(int(b) for b in basis), tuple(int(y) for y in bit),
                         rx.multi_click)
    bob = np.einsum("kaxm,mby->kaxby", pattern, w)
    out: list[list[float]] = []
    for b in (0, 1):
        sifted = np.einsum("kx,kxy->k", w_state[:, b], bob[:, b, :, b, :])
        wrong = (w_state[:, b, 0] * bob[:, b, 0, b, 1] + w_state[:, b, 1] * bob[:, b, 1, b, 0])
        out.extend((sifted.tolist(), wrong.tolist()))
    return out[0], out[1], out[2], out[3]


def _merge(model: KeyRateModel, parameters: Mapping[str, float] | None) -> dict[str, float]:
    """The configured parameters overridden by ``parameters``.

    Given intensity probabilities replace all configured ones (the last class
    takes the rest); a given ``p_z`` applies to both sides unless ``p_z_bob`` is given.
    """
    p = dict(model.fixed_parameters())
    if not parameters:
        return p
    if any(k.startswith("p_mu") for k in parameters):
        for k in [k for k in p if k.startswith("p_mu")]:
            del p[k]
    if "p_z" in parameters:
        p.pop("p_z_bob", None)
    p.update(parameters)
    return p


def _check_parameters(model: KeyRateModel, p: Mapping[str, float]) -> None:
    for k, v in p.items():
        if not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{model.path}: {k}: {v!r} is not a finite number")
    mus, ps, pa, pb = _split(model, p)
    if any(not 0.0 < x < 1.0 for x in ps) or abs(sum(ps) - 1.0) > 1e-9:
        raise ConfigError(f"{model.path}: intensity probabilities {list(ps)}: each must be in "
                          "(0, 1) and they must sum to 1")
    if not (0.0 < pa < 1.0 and 0.0 < pb < 1.0):
        raise ConfigError(f"{model.path}: basis probabilities {pa:g}, {pb:g}: each must be in "
                          "(0, 1); the test basis is needed for the phase error")
    if model.model == "lim2014" and not (mus[0] > mus[1] + mus[2] and mus[1] > mus[2] >= 0):
        raise ConfigError(f"{model.path}: mean photon numbers {list(mus)}: Lim et al. 2014 "
                          "need mu1 > mu2 + mu3 and mu2 > mu3 >= 0")
    if model.model == "rusca2018" and not mus[0] > mus[1] > 0:
        raise ConfigError(f"{model.path}: mean photon numbers {list(mus)}: Rusca et al. 2018 "
                          "need mu1 > mu2 > 0")
    if model.model == "asymptotic" and not mus[0] > mus[1] > 0:
        raise ConfigError(f"{model.path}: mean photon numbers {list(mus)}: the vacuum + weak "
                          "decoy bounds need mu > nu > 0")


def expected_statistics(model: KeyRateModel, distance_km: float, n_pulses: float,
                        parameters: Mapping[str, float] | None = None, *,
                        rounded: bool = False) -> DecoyStatistics:
    """Expected counts of ``n_pulses`` pulses sent over ``distance_km`` of fiber.

    ``parameters`` (names as in :data:`ROW_PARAMETERS`) default to the model's
    configured values. The counts are expected values (floats), or rounded to
    integers with ``rounded=True``. See the module docstring for the model.
    """
    p = _merge(model, parameters)
    _check_parameters(model, p)
    if not (math.isfinite(distance_km) and distance_km >= 0):
        raise ConfigError(f"{model.path}: distance {distance_km!r} km: must be >= 0")
    if not (math.isfinite(n_pulses) and n_pulses > 0):
        raise ConfigError(f"{model.path}: pulses {n_pulses!r}: must be > 0")
    mus, ps, pa, pb = _split(model, p)
    kd, ke, td, te = _per_pulse(model, mus, ps, pa, pb, model.channel_transmittance(distance_km))

    def scale(v: list[float]) -> tuple[float, ...]:
        if rounded:
            return tuple(float(round(n_pulses * x)) for x in v)
        return tuple(n_pulses * x for x in v)

    return DecoyStatistics(intensities=mus, probabilities=ps, n_key=scale(kd),
                           m_key=scale(ke), n_test=scale(td), m_test=scale(te))


def leak_ec_bits(model: KeyRateModel, stats: DecoyStatistics) -> float:
    """Bits disclosed by error correction: ``f_EC h(E_key) n_key``."""
    n = stats.n_key_total
    if n <= 0:
        return 0.0
    return model.error_correction_efficiency * _h(stats.m_key_total / n) * n


# --------------------------------------------------------------------------- one point
_INVALID_PHASE = -1e6
_INVALID_S1 = -2e6


def _finite_core(model: KeyRateModel, mus: Sequence[float], ps: Sequence[float],
                 kd: Sequence[float], ke: Sequence[float], td: Sequence[float],
                 te: Sequence[float], leak: float, eps_sec: float
                 ) -> tuple[float, float, float, float, float, float]:
    if model.model == "lim2014":
        return _lim_core(mus, ps, kd, td, te, leak, eps_sec, model.eps_cor)
    return _rusca_core(mus, ps, kd, ke, td, te, leak, eps_sec, model.eps_cor)


def _eps_fixed_point(model: KeyRateModel, mus: Sequence[float], ps: Sequence[float],
                     kd: Sequence[float], ke: Sequence[float], td: Sequence[float],
                     te: Sequence[float], leak: float, iterations: int
                     ) -> tuple[tuple[float, ...], float]:
    """The bounds with ``eps_sec`` fixed or ``= kappa l`` (iterated), and that ``eps_sec``."""
    kappa = model.eps_sec_per_key_bit
    if kappa is None:
        eps = model.eps_sec
        return _finite_core(model, mus, ps, kd, ke, td, te, leak, eps), eps
    n_key = sum(kd)
    length = n_key
    core: tuple[float, ...] = ()
    eps = kappa
    for _ in range(iterations):
        eps = min(0.5, kappa * max(length, 1.0))
        core = _finite_core(model, mus, ps, kd, ke, td, te, leak, eps)
        new = core[5]
        if not math.isfinite(new):
            break
        converged = abs(new - length) < 1.0
        length = new
        if converged:
            break
    return core, eps


def _counts(model: KeyRateModel, p: Mapping[str, float], distance_km: float,
            block_size: float | None, pulses: float | None
            ) -> tuple[tuple[float, ...], tuple[float, ...], float, list[list[float]]]:
    mus, ps, pa, pb = _split(model, p)
    per = _per_pulse(model, mus, ps, pa, pb, model.channel_transmittance(distance_km))
    n = pulses if pulses is not None else block_size / sum(per[0])  # type: ignore[operator]
    return mus, ps, n, [[n * x for x in v] for v in per]


def _objective(model: KeyRateModel, p: Mapping[str, float], distance_km: float,
               block_size: float | None, pulses: float | None, scale: float,
               eps_sec: float) -> float:
    """A value to maximise whose order is the order of the achievable key rate.

    ``eps_sec`` is held fixed (with ``eps_sec = kappa l`` the caller updates it
    between optimiser runs: the key length depends on it only logarithmically).
    """
    if model.model == "asymptotic":
        mus, ps, pa, pb = _split(model, p)
        q, e = _asymptotic_gains(model, mus, model.channel_transmittance(distance_km))
        return _gllp_raw(mus[0], mus[1], q[0], e[0], q[1], e[1], q[2],
                         model.error_correction_efficiency, model.sifting_factor, 0.5) / scale
    mus, ps, n, (kd, ke, td, te) = _counts(model, p, distance_km, block_size, pulses)
    nk = sum(kd)
    leak = model.error_correction_efficiency * _h(sum(ke) / nk) * nk
    core = _finite_core(model, mus, ps, kd, ke, td, te, leak, eps_sec)
    s1, s1t, phi, length = core[1], core[2], core[4], core[5]
    if not math.isfinite(length):
        return _INVALID_S1 + math.tanh(min(s1, s1t) / nk)
    if phi >= model.phase_error_tolerance:
        return _INVALID_PHASE - phi
    return length / n / scale


def _asymptotic_gains(model: KeyRateModel, mus: Sequence[float], eta_ch: float
                      ) -> tuple[list[float], list[float]]:
    """Gains ``Q_k`` and error rates ``E_k`` of the whole receiver (no basis factor)."""
    eta = eta_ch * model.eta_bob
    pdc, pap, emis = (model.dark_count_probability, model.afterpulse_probability,
                      model.misalignment)
    q, e = [], []
    for k in mus:
        e_x = math.exp(-eta * k)
        d = 1.0 - (1.0 - 2.0 * pdc) * e_x
        q.append(d * (1.0 + pap))
        e.append((pdc + emis * (1.0 - e_x) + pap * d / 2.0) / q[-1])
    return q, e


def _block(model: KeyRateModel, block_size: float | None, pulses: float | None
           ) -> tuple[float | None, float | None]:
    if model.model == "asymptotic":
        if block_size is not None or pulses is not None:
            raise QkdctlError(f"{model.path}: the asymptotic model has no block size or "
                              "pulse count")
        return None, None
    if block_size is not None and pulses is not None:
        raise QkdctlError("give a block size or a number of pulses, not both")
    if block_size is None and pulses is None:
        if model.pulses is not None:
            return None, model.pulses
        if not model.block_sizes:
            raise ConfigError(f"{model.path}: postprocessing.block_sizes: missing (sifted "
                              "key-basis bits per block)")
        return model.block_sizes[0], None
    v = block_size if block_size is not None else pulses
    if not (isinstance(v, int | float) and math.isfinite(v) and v >= 1):
        what = "block size" if block_size is not None else "pulses"
        raise QkdctlError(f"{what} {v!r}: must be a number >= 1")
    return block_size, pulses


def evaluate(model: KeyRateModel, distance_km: float,
             parameters: Mapping[str, float] | None = None, *,
             block_size: float | None = None, pulses: float | None = None) -> KeyRatePoint:
    """The key rate at ``distance_km`` for the given (or configured) parameters.

    For the finite-key models the expected counts of one block are analysed
    with the bound of the model (abort rules included: an aborted block gives
    rate 0); ``block_size`` / ``pulses`` default to the model's first block size.
    """
    p = _merge(model, parameters)
    _check_parameters(model, p)
    block_size, pulses = _block(model, block_size, pulses)
    eta_ch = model.channel_transmittance(distance_km)
    row_p = _row_parameters(model, p)
    if model.model == "asymptotic":
        mus, _, _, _ = _split(model, p)
        q, e = _asymptotic_gains(model, mus, eta_ch)
        rate = max(0.0, _gllp_raw(mus[0], mus[1], q[0], e[0], q[1], e[1], q[2],
                                  model.error_correction_efficiency, model.sifting_factor,
                                  0.5))
        return KeyRatePoint(distance_km, row_p, rate, qber_key=e[0])
    mus, ps, n, (kd, ke, td, te) = _counts(model, p, distance_km, block_size, pulses)
    stats = DecoyStatistics(mus, ps, tuple(kd), tuple(ke), tuple(td), tuple(te))
    leak = leak_ec_bits(model, stats)
    _, eps = _eps_fixed_point(model, mus, ps, kd, ke, td, te, leak, iterations=8)
    fn = lim2014_key_length if model.model == "lim2014" else rusca2018_key_length
    res = fn(stats, leak, eps_sec=eps, eps_cor=model.eps_cor,
             phase_error_tolerance=model.phase_error_tolerance)
    block = block_size if block_size is not None else stats.n_key_total
    return KeyRatePoint(distance_km, row_p, res.secret_bits / n, block_size=block,
                        pulses=n, statistics=stats, result=res, qber_key=stats.qber_key)


def _row_parameters(model: KeyRateModel, p: Mapping[str, float]) -> dict[str, float]:
    mus, ps, pa, pb = _split(model, p)
    if model.model == "asymptotic":
        return {"mu": mus[0], "nu": mus[1]}
    d = {f"mu{i + 1}": float(m) for i, m in enumerate(mus)}
    d.update({f"p_mu{i + 1}": float(x) for i, x in enumerate(ps)})
    d["p_z"] = float(pa)
    if pb != pa:
        d["p_z_bob"] = float(pb)
    return d


# --------------------------------------------------------------------------- optimiser
_Z_MAX = 30.0  # optimiser variables are clipped here: probabilities stay above ~1e-13


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-_Z_MAX, min(_Z_MAX, z))))


def _logit(x: float) -> float:
    x = min(max(x, 1e-12), 1.0 - 1e-12)
    return math.log(x / (1.0 - x))


def _from_z(model: KeyRateModel, z: Sequence[float]) -> dict[str, float]:
    """Unconstrained optimiser variables -> named parameters satisfying the constraints."""
    if model.model == "asymptotic":
        nu = model.mean_photon_numbers[1]
        return {"mu": nu + (MU_MAX - nu) * _sig(z[0])}
    if model.model == "lim2014":
        mu3 = model.mean_photon_numbers[2]
        e1 = math.exp(max(-_Z_MAX, min(z[1], _Z_MAX)))
        e2 = math.exp(max(-_Z_MAX, min(z[2], _Z_MAX)))
        s = 1.0 + e1 + e2
        mu1 = 2.0 * mu3 + (MU_MAX - 2.0 * mu3) * _sig(z[3])
        return {"p_z": _sig(z[0]), "p_mu1": e1 / s, "p_mu2": e2 / s, "mu1": mu1,
                "mu2": mu3 + (mu1 - 2.0 * mu3) * _sig(z[4])}
    mu1 = MU_MAX * _sig(z[2])
    return {"p_z": _sig(z[0]), "p_mu1": _sig(z[1]), "mu1": mu1,
            "mu2": mu1 * _sig(z[3])}


def _to_z(model: KeyRateModel, p: Mapping[str, float]) -> list[float]:
    if model.model == "asymptotic":
        nu = model.mean_photon_numbers[1]
        return [_logit((p["mu"] - nu) / (MU_MAX - nu))]
    q = _logit(p["p_z"])
    if model.model == "lim2014":
        mu3 = model.mean_photon_numbers[2]
        p3 = max(1.0 - p["p_mu1"] - p["p_mu2"], 1e-12)
        return [q, math.log(p["p_mu1"] / p3), math.log(p["p_mu2"] / p3),
                _logit((p["mu1"] - 2 * mu3) / (MU_MAX - 2 * mu3)),
                _logit((p["mu2"] - mu3) / (p["mu1"] - 2 * mu3))]
    return [q, _logit(p["p_mu1"]), _logit(p["mu1"] / MU_MAX), _logit(p["mu2"] / p["mu1"])]


def _with_free(model: KeyRateModel, free: Mapping[str, float]) -> dict[str, float]:
    return _merge(model, free)


_SCAN_CACHE: dict[tuple[str, float], list[list[float]]] = {}


def _scan_points(model: KeyRateModel) -> list[list[float]]:
    """A fixed quasi-random set of starting points (optimiser variables)."""
    key = (model.model, model.mean_photon_numbers[-1] if model.model != "rusca2018" else 0.0)
    if key in _SCAN_CACHE:
        return _SCAN_CACHE[key]
    from scipy.stats import qmc

    pts: list[list[float]] = []
    if model.model == "asymptotic":
        nu = model.mean_photon_numbers[1]
        for mu in np.linspace(nu + 0.02, MU_MAX * 0.95, 40):
            pts.append(_to_z(model, {"mu": float(mu)}))
    elif model.model == "lim2014":
        mu3 = model.mean_photon_numbers[2]
        for u in qmc.Sobol(5, seed=7).random(128):
            p1 = 0.98 * 10 ** (-3.0 + 3.0 * u[1])
            p2 = (1.0 - p1) * (0.02 + 0.96 * u[2])
            mu1 = max(0.03 + 1.1 * u[3], 3.0 * mu3)
            mu2 = mu3 + (0.02 + 0.96 * u[4]) * (mu1 - 2.0 * mu3)
            pts.append(_to_z(model, {"p_z": 0.3 + 0.699 * u[0], "p_mu1": p1, "p_mu2": p2,
                                     "mu1": mu1, "mu2": mu2}))
    else:
        for u in qmc.Sobol(4, seed=7).random(64):
            mu1 = 0.03 + 1.1 * u[2]
            pts.append(_to_z(model, {"p_z": 0.3 + 0.699 * u[0], "p_mu1": 0.02 + 0.96 * u[1],
                                     "mu1": mu1, "mu2": mu1 * (0.02 + 0.96 * u[3])}))
    _SCAN_CACHE[key] = pts
    return pts


def optimise_point(model: KeyRateModel, distance_km: float, *,
                   block_size: float | None = None, pulses: float | None = None,
                   start: Mapping[str, float] | None = None, starts: int | None = None
                   ) -> KeyRatePoint:
    """The key rate at ``distance_km`` maximised over the model's free parameters.

    Nelder-Mead runs from ``start`` (e.g. the optimum at a neighbouring
    distance) and from the ``starts`` best points of a quasi-random scan
    (default 1 with a ``start``, else 2, plus the configured values).
    """
    from scipy.optimize import minimize

    block_size, pulses = _block(model, block_size, pulses)
    scale = model.channel_transmittance(distance_km) * model.eta_bob

    eps = [model.eps_sec]

    def f(z: Sequence[float]) -> float:
        return -_objective(model, _with_free(model, _from_z(model, z)), distance_km,
                           block_size, pulses, scale, eps[0])

    def update_eps(z: Sequence[float]) -> None:
        if model.eps_sec_per_key_bit is not None:
            mus, ps, _, cnt = _counts(model, _with_free(model, _from_z(model, z)),
                                      distance_km, block_size, pulses)
            nk = sum(cnt[0])
            leak = model.error_correction_efficiency * _h(sum(cnt[1]) / nk) * nk
            eps[0] = _eps_fixed_point(model, mus, ps, *cnt, leak, iterations=8)[1]

    scan_z = _scan_points(model)
    if starts is None:
        starts = 1 if start is not None else 2
    if start is not None:
        inits = [_to_z(model, {k: start[k] for k in FREE_PARAMETERS[model.model]})]
    else:
        inits = [_to_z(model, {k: v for k, v in model.fixed_parameters().items()
                               if k in FREE_PARAMETERS[model.model]})]
    update_eps(inits[0])
    scan = sorted((f(z), i) for i, z in enumerate(scan_z))
    inits += [scan_z[i] for _, i in scan[:starts]]
    best = None
    for z0 in inits:
        r = minimize(f, np.asarray(z0, dtype=float), method="Nelder-Mead",
                     options={"xatol": 1e-6, "fatol": 1e-12, "maxfev": 2000, "adaptive": True})
        if best is None or r.fun < best.fun:
            best = r
    assert best is not None
    # a restart from the optimum (Nelder-Mead's simplex can collapse early), with
    # eps_sec = kappa l updated to the key length found
    update_eps(best.x)
    best_fun = f(best.x)
    r = minimize(f, best.x, method="Nelder-Mead",
                 options={"xatol": 1e-7, "fatol": 1e-13, "maxfev": 1000, "adaptive": True})
    if r.fun < best_fun:
        best = r
    free = _from_z(model, best.x)
    point = evaluate(model, distance_km, _with_free(model, free), block_size=block_size,
                     pulses=pulses)
    log.debug("optimised %s at %g km: %.4g bits/pulse, %s", model.model, distance_km,
              point.secret_bits_per_pulse, free)
    return point


def _free_of(point: KeyRatePoint) -> dict[str, float]:
    return dict(point.parameters)


def _sweep(model: KeyRateModel, distances: Sequence[float], block_size: float | None,
           pulses: float | None, optimise: bool) -> list[KeyRatePoint]:
    if not optimise:
        return [evaluate(model, d, block_size=block_size, pulses=pulses) for d in distances]
    order = sorted(range(len(distances)), key=lambda i: distances[i])
    points: dict[int, KeyRatePoint] = {}
    warm: dict[str, float] | None = None
    dead = False
    for i in order:
        d = distances[i]
        if dead:
            points[i] = evaluate(model, d, warm, block_size=block_size, pulses=pulses) \
                if warm else evaluate(model, d, block_size=block_size, pulses=pulses)
            continue
        pt = optimise_point(model, d, block_size=block_size, pulses=pulses, start=warm)
        if pt.secret_bits_per_pulse <= 0.0:
            pt2 = optimise_point(model, d, block_size=block_size, pulses=pulses, start=warm,
                                 starts=6)
            pt = pt2 if pt2.secret_bits_per_pulse > pt.secret_bits_per_pulse else pt
            dead = pt.secret_bits_per_pulse <= 0.0
        else:
            warm = _free_of(pt)
        points[i] = pt
    # the optimal rate decreases with distance: repair a point that is below the next one
    for a, b in zip(reversed(order[:-1]), reversed(order[1:]), strict=True):
        if points[a].secret_bits_per_pulse < points[b].secret_bits_per_pulse:
            pt = optimise_point(model, distances[a], block_size=block_size, pulses=pulses,
                                start=_free_of(points[b]))
            if pt.secret_bits_per_pulse > points[a].secret_bits_per_pulse:
                points[a] = pt
    return [points[i] for i in range(len(distances))]


def _row(model: KeyRateModel, pt: KeyRatePoint) -> dict[str, Any]:
    eta = model.channel_transmittance(pt.distance_km)
    row: dict[str, Any] = {"distance_km": float(pt.distance_km),
                           "secret_bits_per_pulse": float(pt.secret_bits_per_pulse)}
    if model.rep_rate_hz:
        row["secret_bits_per_s"] = float(pt.secret_bits_per_pulse * model.rep_rate_hz)
    plob = plob_bound(eta)
    row["plob_bits_per_pulse"] = float(plob) if math.isfinite(plob) else None
    row["block_size"] = pt.block_size
    row["pulses"] = pt.pulses
    row["qber_key"] = pt.qber_key if math.isfinite(pt.qber_key) else None
    res = pt.result
    phi = res.phase_error_bound if res is not None else math.nan
    row["phase_error_bound"] = phi if math.isfinite(phi) else None
    row["secret_bits"] = res.secret_bits if res is not None else None
    row["aborted"] = res.aborted if res is not None else False
    row["abort_reason"] = res.abort_reason if res is not None else None
    keep = pt.secret_bits_per_pulse > 0.0 or not model.optimise
    if not keep:  # no key at any parameters: the optimiser's last guess means nothing
        row.update(qber_key=None, phase_error_bound=None, aborted=None, abort_reason=None)
    for name in ROW_PARAMETERS[model.model]:
        row[name] = pt.parameters.get(name) if keep else None
    if "p_z_bob" in pt.parameters and keep:
        row["p_z_bob"] = pt.parameters["p_z_bob"]
    return row


def keyrate_table(model: KeyRateModel, distances_km: Iterable[float] | None = None, *,
                  block_size: float | None = None, pulses: float | None = None,
                  optimise: bool | None = None) -> list[dict[str, Any]]:
    """One row per (block size, distance): the key rate, PLOB bound and parameters by name.

    Row keys: ``distance_km``, ``secret_bits_per_pulse``, ``secret_bits_per_s``
    (when the model knows its pulse rate), ``plob_bits_per_pulse`` (None at 0 km,
    where it is infinite), ``block_size``, ``pulses``, ``qber_key``,
    ``phase_error_bound``, ``secret_bits``, ``aborted``, ``abort_reason`` and the
    protocol parameters (:data:`ROW_PARAMETERS`; None where no key is possible
    and the parameters were optimised). ``distances_km`` defaults to the
    model's; without ``block_size`` / ``pulses`` every configured block size is
    tabulated; ``optimise`` defaults to the model's setting.
    """
    dist = [float(d) for d in (distances_km if distances_km is not None
                               else model.distances_km)]
    if not dist:
        dist = list(_distance_range(*DEFAULT_DISTANCES))
    for d in dist:
        if not (math.isfinite(d) and 0.0 <= d <= 10000.0):
            raise QkdctlError(f"distance {d!r} km: must be between 0 and 10000")
    opt = model.optimise if optimise is None else bool(optimise)
    model = replace(model, optimise=opt)
    if model.model == "asymptotic":
        runs: list[tuple[float | None, float | None]] = [_block(model, block_size, pulses)]
    elif block_size is not None or pulses is not None:
        runs = [_block(model, block_size, pulses)]
    elif model.pulses is not None:
        runs = [(None, model.pulses)]
    else:
        runs = [(b, None) for b in model.block_sizes] or [_block(model, None, None)]
    rows: list[dict[str, Any]] = []
    for b, n in runs:
        rows.extend(_row(model, pt) for pt in _sweep(model, dist, b, n, opt))
    return rows


def max_distance_km(model: KeyRateModel, *, block_size: float | None = None,
                    pulses: float | None = None, resolution_km: float = 0.5,
                    step_km: float = 20.0, limit_km: float = 1000.0) -> float:
    """The largest distance with a positive optimised key rate (0 if there is none).

    Steps out by ``step_km`` until the rate vanishes, then bisects to
    ``resolution_km``, each point warm-started from the last positive one.
    """
    block_size, pulses = _block(model, block_size, pulses)
    pt = optimise_point(model, 0.0, block_size=block_size, pulses=pulses)
    if pt.secret_bits_per_pulse <= 0.0:
        return 0.0
    lo, warm = 0.0, _free_of(pt)
    hi = None
    d = step_km
    while d <= limit_km:
        pt = optimise_point(model, d, block_size=block_size, pulses=pulses, start=warm)
        if pt.secret_bits_per_pulse <= 0.0:
            hi = d
            break
        lo, warm = d, _free_of(pt)
        d += step_km
    if hi is None:
        return limit_km
    while hi - lo > resolution_km:
        mid = 0.5 * (lo + hi)
        pt = optimise_point(model, mid, block_size=block_size, pulses=pulses, start=warm)
        if pt.secret_bits_per_pulse > 0.0:
            lo, warm = mid, _free_of(pt)
        else:
            hi = mid
    return lo


def _distance_range(start: float, stop: float, step: float) -> list[float]:
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 9) for i in range(max(n, 0))]


# --------------------------------------------------------------------------- files
@dataclass(frozen=True)
class _KeyrateTable:
    model: str = _spec("the key-rate model", choices=MODELS)
    name: str = _spec("label", default="")
    optimise: bool = _spec("optimise the protocol parameters at each distance", default=True)


@dataclass(frozen=True)
class _ChannelTable:
    fiber_attenuation_db_per_km: float = _spec("fiber loss", lo=0.0, hi=10.0, default=0.2)


@dataclass(frozen=True)
class _ReceiverTable:
    efficiency: float = _spec("eta_Bob: Bob's detection efficiency including his optical "
                              "loss", lo=0.0, lo_open=True, hi=1.0)
    dark_count_probability: float = _spec("dark-count probability per detector and pulse",
                                          lo=0.0, hi=0.1)
    misalignment: float = _spec("e_mis: probability that a photon hits the wrong detector",
                                lo=0.0, hi=0.5)
    afterpulse_probability: float = _spec("afterpulse probability", lo=0.0, hi=0.5,
                                          default=0.0)
    basis_choice: str = _spec("Bob's basis choice", choices=("active", "passive"),
                              default="active")
    z_basis_probability: float | None = _spec(
        "probability that Bob measures Z (default: the source's)", lo=0.0, hi=1.0,
        lo_open=True, hi_open=True, default=None)
    dead_time_ns: float = _spec("non-paralysable dead time", lo=0.0, hi=1e6, default=0.0)
    dead_time_scope: str = _spec("what one dead time blocks", choices=("receiver", "detector"),
                                 default="receiver")


@dataclass(frozen=True)
class _SourceTable:
    mean_photon_numbers: tuple[float, ...] = _spec("mean photon numbers, strongest first",
                                                   lo=0.0, hi=MU_MAX)
    intensity_probabilities: tuple[float, ...] = _spec("probability of each intensity class",
                                                       lo=0.0, hi=1.0, lo_open=True,
                                                       hi_open=True)
    z_basis_probability: float = _spec("probability of the key basis Z (Lim's q_x)", lo=0.0,
                                       hi=1.0, lo_open=True, hi_open=True, default=0.5)
    rep_rate_hz: float | None = _spec("pulse rate (gives bits per second)", lo=1e3, hi=1e11,
                                      default=None)


@dataclass(frozen=True)
class _PostTable:
    error_correction_efficiency: float = _spec("f_EC", lo=1.0, hi=3.0, default=1.16)
    eps_sec: float | None = _spec("secrecy parameter", lo=0.0, hi=1.0, lo_open=True,
                                  hi_open=True, default=None)
    eps_sec_per_key_bit: float | None = _spec("kappa: eps_sec = kappa * key length", lo=0.0,
                                              hi=1e-3, lo_open=True, default=None)
    eps_cor: float = _spec("correctness parameter", lo=0.0, hi=1.0, lo_open=True, hi_open=True,
                           default=DEFAULT_EPS_COR)
    phase_error_tolerance: float = _spec("abort when the phase-error bound reaches this",
                                         lo=0.0, hi=0.5, lo_open=True,
                                         default=DEFAULT_PHASE_ERROR_TOLERANCE)
    block_sizes: tuple[float, ...] = _spec("sifted key-basis bits per block", lo=1.0, hi=1e18,
                                           default=())
    pulses: float | None = _spec("pulses per block (instead of block_sizes)", lo=1.0, hi=1e20,
                                 default=None)
    sifting_factor: float = _spec("asymptotic model: q, the sifted fraction (1/2 for "
                                  "symmetric BB84)", lo=0.0, hi=1.0, lo_open=True,
                                  default=0.5)


@dataclass(frozen=True)
class _DistancesTable:
    start_km: float = _spec("first distance", lo=0.0, hi=10000.0, default=DEFAULT_DISTANCES[0])
    stop_km: float = _spec("last distance", lo=0.0, hi=10000.0, default=DEFAULT_DISTANCES[1])
    step_km: float = _spec("distance step", lo=0.0, lo_open=True, hi=10000.0,
                           default=DEFAULT_DISTANCES[2])


_KEYRATE_TABLES = {"keyrate": _KeyrateTable, "channel": _ChannelTable,
                   "receiver": _ReceiverTable, "source": _SourceTable,
                   "postprocessing": _PostTable, "distances": _DistancesTable}


def parse_keyrate(data: dict[str, Any], path: str = "<string>") -> KeyRateModel:
    """Validate a parsed keyrate TOML document into a :class:`KeyRateModel`."""
    ctx = _Ctx(path)
    for k in data:
        if k not in _KEYRATE_TABLES:
            ctx.fail(k, "unknown table; allowed: " + ", ".join(_KEYRATE_TABLES))
    t: dict[str, Any] = {}
    for name, cls in _KEYRATE_TABLES.items():
        v = data.get(name, {})
        if not isinstance(v, dict):
            ctx.fail(name, f"expected a table, got {v!r}")
        if name in ("keyrate", "receiver", "source") and name not in data:
            ctx.fail(name, f"missing: a keyrate file needs a [{name}] table")
        t[name] = _build(ctx, cls, v, name + ".")
    kr, ch, rx, src, post, dist = (t[n] for n in _KEYRATE_TABLES)
    model = kr.model
    mus, ps = src.mean_photon_numbers, src.intensity_probabilities
    want = {"lim2014": 3, "rusca2018": 2, "asymptotic": 3}[model]
    if len(mus) != want:
        ctx.fail("source.mean_photon_numbers", f"{list(mus)}: the {model} model needs {want} "
                 "intensity classes" + (" (signal, weak decoy, vacuum 0)"
                                        if model == "asymptotic" else ""))
    if len(ps) != len(mus):
        ctx.fail("source.intensity_probabilities", f"has {len(ps)} entries but "
                 f"source.mean_photon_numbers has {len(mus)}")
    if abs(sum(ps) - 1.0) > 1e-9:
        ctx.fail("source.intensity_probabilities",
                 f"{list(ps)} sums to {sum(ps):.12g}; the probabilities must sum to 1")
    if model == "lim2014" and not (mus[0] > mus[1] + mus[2] and mus[1] > mus[2]):
        ctx.fail("source.mean_photon_numbers", f"{list(mus)}: Lim et al. 2014 need mu1 > "
                 "mu2 + mu3 and mu2 > mu3 >= 0")
    if model == "rusca2018" and not mus[0] > mus[1] > 0:
        ctx.fail("source.mean_photon_numbers", f"{list(mus)}: Rusca et al. 2018 need mu1 > "
                 "mu2 > 0")
    if model == "asymptotic" and not (mus[0] > mus[1] > 0 and mus[2] == 0):
        ctx.fail("source.mean_photon_numbers", f"{list(mus)}: the vacuum + weak decoy model "
                 "needs [mu, nu, 0] with mu > nu > 0")
    if post.eps_sec is not None and post.eps_sec_per_key_bit is not None:
        ctx.fail("postprocessing.eps_sec_per_key_bit", "give eps_sec or eps_sec_per_key_bit, "
                 "not both")
    if model == "asymptotic":
        for key in ("block_sizes", "pulses", "eps_sec", "eps_sec_per_key_bit"):
            if key in data.get("postprocessing", {}):
                ctx.fail(f"postprocessing.{key}", "not used by the asymptotic model (infinite "
                         "keys); remove it")
    else:
        if post.block_sizes and post.pulses is not None:
            ctx.fail("postprocessing.pulses", "give block_sizes or pulses, not both")
        if not post.block_sizes and post.pulses is None:
            ctx.fail("postprocessing.block_sizes", "missing: give block_sizes (sifted "
                     "key-basis bits per block) or pulses")
    if rx.dead_time_ns > 0 and src.rep_rate_hz is None:
        ctx.fail("receiver.dead_time_ns", "a dead time needs source.rep_rate_hz")
    if dist.stop_km < dist.start_km:
        ctx.fail("distances.stop_km", f"{dist.stop_km:g} is below distances.start_km = "
                 f"{dist.start_km:g}")
    return KeyRateModel(
        model=model, name=kr.name or Path(path).stem, optimise=kr.optimise,
        fiber_attenuation_db_per_km=ch.fiber_attenuation_db_per_km,
        eta_bob=rx.efficiency, dark_count_probability=rx.dark_count_probability,
        misalignment=rx.misalignment, afterpulse_probability=rx.afterpulse_probability,
        basis_choice=rx.basis_choice, dead_time_ns=rx.dead_time_ns,
        dead_time_scope=rx.dead_time_scope, bob_z_basis_probability=rx.z_basis_probability,
        mean_photon_numbers=mus, intensity_probabilities=ps,
        z_basis_probability=src.z_basis_probability, rep_rate_hz=src.rep_rate_hz,
        error_correction_efficiency=post.error_correction_efficiency,
        eps_sec=post.eps_sec if post.eps_sec is not None else DEFAULT_EPS_SEC,
        eps_sec_per_key_bit=post.eps_sec_per_key_bit, eps_cor=post.eps_cor,
        phase_error_tolerance=post.phase_error_tolerance, sifting_factor=post.sifting_factor,
        block_sizes=tuple(post.block_sizes), pulses=post.pulses,
        distances_km=tuple(_distance_range(dist.start_km, dist.stop_km, dist.step_km)),
        path=path)


def model_from_bench(cfg: BenchConfig, *, block_size: float = BENCH_BLOCK_SIZE) -> KeyRateModel:
    """The key-rate model of a bench file's simulated optical table.

    The counts are those of the bench's passive receiver, detector by detector
    (:class:`PassiveReceiver`: efficiency, dark counts, dead time, afterpulses,
    jitter and the analysis gate, the basis splitter, the squashing rule of
    ``analysis.multi_click``; see the module docstring), with the misalignment,
    fiber loss, intensities and basis probabilities of the file. The summary
    fields ``eta_bob`` (mean detector efficiency x Bob's insertion loss),
    ``dark_count_probability`` (mean dark-count rate x the gate),
    ``afterpulse_probability`` and ``dead_time_ns`` are the detectors' means.
    Three intensity classes give the ``lim2014`` model, two the
    ``rusca2018`` model (also for protocol ``"bb84-one-decoy"``). The bench's own
    parameters are evaluated (``optimise`` false); f_EC = 1.16, eps_sec = 1e-9,
    eps_cor = 1e-15 and blocks of ``block_size`` sifted key bits (default 1e8,
    about 12 s of the built-in bench at 50 km).
    """
    where = cfg.path
    if cfg.sim is None:
        raise ConfigError(f"{where}: sim: missing; a key-rate model of a bench needs its [sim] "
                          "table (fiber, insertion loss, misalignment, detectors)")
    s, sim = cfg.source, cfg.sim
    n = len(s.mean_photon_numbers)
    if cfg.protocol == "bb84-one-decoy" or n == 2:
        model = "rusca2018"
        if n != 2:
            raise ConfigError(f"{where}: source.mean_photon_numbers: protocol "
                              f"{cfg.protocol!r} needs two intensity classes, the file has {n}")
    elif n == 3:
        model = "lim2014"
    else:
        raise ConfigError(f"{where}: source.mean_photon_numbers: {n} intensity classes; the "
                          "key-rate models need three (bb84-decoy) or two (bb84-one-decoy)")
    dets = sim.detectors
    eff = sum(d.efficiency for d in dets) / len(dets)
    gate_s = cfg.analysis.gate_width_ps * 1e-12
    by_channel = {d.channel: d for d in dets}
    receiver = PassiveReceiver(
        detectors=tuple(BenchDetector(
            basis=0 if r.basis == "Z" else 1, bit=r.bit, efficiency=d.efficiency,
            dark_count_rate_hz=d.dark_count_rate_hz, dead_time_ps=round(d.dead_time_ns * 1e3),
            afterpulse_probability=d.afterpulse_probability,
            afterpulse_time_constant_ns=d.afterpulse_time_constant_ns, jitter_ps=d.jitter_ps,
            gate_offset_ps=d.delay_ps - r.delay_ps)
            for r in cfg.receiver.detectors for d in (by_channel[r.channel],)),
        transmittance=sim.bob_transmittance, gate_width_ps=cfg.analysis.gate_width_ps,
        period_ps=s.period_ps * (1.0 + sim.clock_drift_ppm * 1e-6),
        sync_jitter_ps=sim.sync_jitter_ps, tagger_resolution_ps=sim.tagger_resolution_ps,
        multi_click=cfg.analysis.multi_click)
    model_obj = KeyRateModel(
        model=model, name=cfg.name, optimise=False,
        fiber_attenuation_db_per_km=sim.fiber_attenuation_db_per_km,
        eta_bob=eff * sim.bob_transmittance,
        dark_count_probability=sum(d.dark_count_rate_hz for d in dets) / len(dets) * gate_s,
        afterpulse_probability=sum(d.afterpulse_probability for d in dets) / len(dets),
        misalignment=sim.misalignment, basis_choice="passive",
        dead_time_ns=sum(d.dead_time_ns for d in dets) / len(dets),
        dead_time_scope="detector", rep_rate_hz=s.rep_rate_hz,
        mean_photon_numbers=tuple(s.mean_photon_numbers),
        intensity_probabilities=tuple(s.intensity_probabilities),
        z_basis_probability=s.z_basis_probability,
        bob_z_basis_probability=cfg.receiver.z_basis_probability,
        block_sizes=(float(block_size),),
        distances_km=tuple(_distance_range(*DEFAULT_DISTANCES)), path=where,
        receiver=receiver)
    _check_parameters(model_obj, model_obj.fixed_parameters())
    return model_obj


def default_keyrate_path() -> Path:
    """The keyrate file shipped with the package (``configs/keyrate-lim2014.toml``)."""
    return Path(str(resources.files("qkdctl.configs").joinpath("keyrate-lim2014.toml")))


def load_keyrate_model(path: str | Path | None = None) -> KeyRateModel:
    """Read a keyrate file (a ``[keyrate]`` table) or a bench file (``[bench]``).

    ``None`` gives the built-in ``configs/keyrate-lim2014.toml``. A bench file is
    turned into a model with :func:`model_from_bench`.
    """
    p = Path(path) if path is not None else default_keyrate_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a keyrate or bench file (not UTF-8 text at byte "
                          f"{e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    if "keyrate" in data:
        return parse_keyrate(data, str(p))
    if any(k in data for k in ("bench", "instruments", "analysis", "sim")):
        return model_from_bench(parse_bench(data, str(p), text))
    raise ConfigError(f"{p}: neither a keyrate file (no [keyrate] table) nor a bench file "
                      "(no [bench] table)")


# --------------------------------------------------------------------------- command line
def _parse_distances(text: str) -> list[float]:
    """``START:STOP:STEP`` (km, STOP included), or a comma-separated list of distances."""
    try:
        if ":" in text:
            parts = [float(x) for x in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if step <= 0 or stop < start or start < 0:
                raise ValueError
            out = _distance_range(start, stop, step)
        else:
            out = [float(x) for x in text.split(",")]
        if not out or len(out) > 10000 or any(not (math.isfinite(d) and 0 <= d <= 10000)
                                              for d in out):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected START:STOP:STEP in km (e.g. 0:200:10, STOP included, "
            "STEP > 0) or a list such as 10,50,100 (each 0 to 10000)") from None
    return out


def _positive_count(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number >= 1 (e.g. 1e6)")
    return v


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``keyrate`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "keyrate", help="secret-key rate versus distance (finite-key decoy BB84, PLOB)",
        description="Tabulate the secret-key rate of decoy-state BB84 against fiber length, "
                    "with the protocol parameters optimised per distance, next to the PLOB "
                    "bound. The file is a keyrate file or a bench file (whose simulated "
                    "optical table is evaluated with its own parameters).")
    p.add_argument("--config", metavar="FILE",
                   help="keyrate or bench file (TOML); default: the built-in "
                        "keyrate-lim2014.toml (Lim et al. 2014, Sec. IV)")
    p.add_argument("--distances", type=_parse_distances, metavar="START:STOP:STEP",
                   help="distances in km, STOP included (default: the file's)")
    p.add_argument("--block-size", type=_positive_count, metavar="N",
                   help="sifted key-basis bits per block (default: the file's block sizes)")
    p.add_argument("--pulses", type=_positive_count, metavar="N",
                   help="pulses per block, instead of a block size")
    p.add_argument("--optimise", action=argparse.BooleanOptionalAction, default=None,
                   help="optimise the protocol parameters per distance (default: the file's "
                        "setting; bench files use their own parameters)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object ({"model": ..., "rows": [...]}) on stdout')
    p.add_argument("--plot", metavar="FILE.png",
                   help="also plot the key rate and the PLOB bound (needs matplotlib)")
    p.set_defaults(func=cmd_keyrate)
    return p


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(x, spec)


def format_table(model: KeyRateModel, rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a text table."""
    names = list(ROW_PARAMETERS[model.model])
    head = f"{'km':>7} "
    if model.model != "asymptotic":
        head += f"{'block':>9} "
    head += f"{'bits/pulse':>10} "
    if model.rep_rate_hz:
        head += f"{'bits/s':>10} "
    head += f"{'PLOB':>10} {'QBER':>7} "
    if model.model != "asymptotic":
        head += f"{'phase':>7} "
    head += " ".join(f"{n:>7}" for n in names)
    lines = [f"{model.name}: {model.model} model, "
             + ("parameters optimised per distance" if model.optimise
                else "configured parameters"), head]
    for r in rows:
        s = f"{r['distance_km']:7.1f} "
        if model.model != "asymptotic":
            s += f"{_fmt(r['block_size'], '9.2e')} "
        s += f"{_fmt(r['secret_bits_per_pulse'], '10.3e')} "
        if model.rep_rate_hz:
            s += f"{_fmt(r.get('secret_bits_per_s'), '10.3e')} "
        plob = r["plob_bits_per_pulse"]
        s += f"{'inf' if plob is None else format(plob, '10.3e'):>10} "
        qber = r["qber_key"]
        s += f"{'-' if qber is None else format(100 * qber, '6.2f') + '%':>7} "
        if model.model != "asymptotic":
            s += f"{_fmt(r['phase_error_bound'], '7.4f')} "
        s += " ".join(f"{_fmt(r[n], '7.4f')}" for n in names)
        lines.append(s)
    return "\n".join(lines)


def _plot(model: KeyRateModel, rows: Sequence[Mapping[str, Any]], path: str) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise QkdctlError("--plot needs matplotlib, which is not installed "
                          "(pip install matplotlib)") from None
    fig = Figure(figsize=(7.0, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("block_size") if model.model != "asymptotic" else None,
                          []).append(r)
    for i, (b, rs) in enumerate(groups.items()):
        pts = [(r["distance_km"], r["secret_bits_per_pulse"]) for r in rs
               if r["secret_bits_per_pulse"] > 0]
        label = model.model if b is None else f"{model.model}, block {_block_label(rs)}"
        if pts:
            ax.semilogy(*zip(*pts, strict=True), marker="o", ms=3, label=label, color=f"C{i}")
    dmax = max((r["distance_km"] for r in rows), default=1.0)
    d = np.linspace(0.0, max(dmax, 1.0), 200)[1:]
    ax.semilogy(d, plob_bound(10.0 ** (-model.fiber_attenuation_db_per_km * d / 10.0)), "k--",
                label="PLOB bound")
    ax.set_xlabel("fiber length (km)")
    ax.set_ylabel("secret bits per pulse")
    ax.set_title(model.name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise QkdctlError(f"{path}: cannot write the plot: {e.strerror or e}") from None


def _block_label(rs: Sequence[Mapping[str, Any]]) -> str:
    b = next((r["block_size"] for r in rs if r["block_size"]), None)
    return "?" if b is None else f"{b:.0e}"


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def cmd_keyrate(args: argparse.Namespace) -> int:
    """``qkdctl keyrate``: print the key-rate table (or JSON) and optionally plot it."""
    model = load_keyrate_model(getattr(args, "config", None))
    opt = getattr(args, "optimise", None)
    if opt is not None:
        model = replace(model, optimise=opt)
    rows = keyrate_table(model, getattr(args, "distances", None),
                         block_size=getattr(args, "block_size", None),
                         pulses=getattr(args, "pulses", None))
    if getattr(args, "plot", None):
        _plot(model, rows, args.plot)
    if getattr(args, "json", False):
        obj = {"model": model.model, "name": model.name, "config": model.path,
               "optimised": model.optimise, "rep_rate_hz": model.rep_rate_hz,
               "fiber_attenuation_db_per_km": model.fiber_attenuation_db_per_km, "rows": rows}
        sys.stdout.write(json.dumps(_json_safe(obj), indent=2) + "\n")
    else:
        sys.stdout.write(format_table(model, rows) + "\n")
        if getattr(args, "plot", None):
            sys.stdout.write(f"plot written to {args.plot}\n")
    return 0

