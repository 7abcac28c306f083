"""Secret-key length of a decoy-state BB84 block from its observed counts.

The live pipeline calls this after error correction: it knows, per intensity
class, how many sifted detections and bit errors each basis has, and how many
bits error correction disclosed. From those numbers alone this module bounds
the vacuum and single-photon contributions with the decoy-state method,
bounds the single-photon phase-error rate, and returns the length of secret
key that privacy amplification may extract, or aborts with a reason.

Protocols and their analyses:

- ``"bb84-decoy"``, three intensities ``mu1 > mu2 + mu3``, ``mu2 > mu3 >= 0``:
  :func:`lim2014_key_length`, C. C. W. Lim, M. Curty, N. Walenta, F. Xu and
  H. Zbinden, "Concise security bounds for practical decoy-state quantum key
  distribution", Phys. Rev. A 89, 022307 (2014), arXiv:1311.7129, Eqs. (1)-(5),
  secure against general attacks with ``eps_sec`` split in 21 equal parts.
- ``"bb84-one-decoy"``, two intensities ``mu1 > mu2`` and no vacuum state:
  :func:`rusca2018_key_length`, D. Rusca, A. Boaron, F. Grünenfelder, A. Martin
  and H. Zbinden, "Finite-key analysis for the 1-decoy state QKD protocol",
  Appl. Phys. Lett. 112, 171104 (2018), arXiv:1801.03443, Appendix A, with
  ``eps_sec`` split in 19 equal parts.

Also here: the asymptotic key rate of decoy-state BB84 with a vacuum and a weak
decoy (:func:`asymptotic_gllp`, X. Ma, B. Qi, Y. Zhao and H.-K. Lo, Phys. Rev.
A 72, 012326 (2005)) and the repeaterless PLOB bound (:func:`plob_bound`,
S. Pirandola, R. Laurenza, C. Ottaviani and L. Banchi, Nat. Commun. 8, 15043
(2017)).

Basis names. In qkdctl the key is drawn from the Z basis and the X basis is
the test basis that estimates the phase error, for both protocols. Lim et al.
draw the key from X and test in Z, so their ``s_X,0``, ``s_X,1`` are this
module's key-basis ``s0_lower``, ``s1_lower`` and their ``s_Z,1``, ``v_Z,1`` are
``s1_test_lower``, ``v1_test_upper``. Rusca et al. use Z for the key as here.

Finite-statistics details, common to both analyses (``eps = eps_sec / 21`` or
``eps_sec / 19``):

- Hoeffding deviation ``delta(n, eps) = sqrt(n / 2 * ln(1 / eps))`` with ``n`` the
  total detections (or errors) of the basis, the same for every class;
- ``n±_k = (e^k / p_k) (n_k ± delta)`` and likewise ``m±_k``;
- ``tau_n = sum_k p_k e^-k k^n / n!``, the probability that Alice sends n photons;
- the phase error ``phi <= v1/s1_test + gamma(eps_sec, v1/s1_test, s1_test, s1_key)``
  with ``gamma(a, b, c, d) = sqrt((c+d)(1-b)b / (c d ln 2) *
  log2((c+d) / (c d (1-b) b) * 21^2 / a^2))`` (random sampling without
  replacement, Lim et al. Eq. (5)). Rusca et al. reuse Lim et al.'s ``gamma``;
  it is used with the factor ``21^2`` for both protocols (``19^2`` would change
  the phase-error bound by well under one per cent).

Safeguards for degenerate inputs (each leaves a valid bound):

- the vacuum lower bound is replaced by ``max(0, s0_lower)`` (a count is never
  negative), also where it enters the single-photon bound;
- where fewer than one single-photon test error is bounded (``v1 < 1``, so
  ``b`` could be zero and ``gamma`` degenerate), ``b = 1 / s1_test`` is used:
  ``b + gamma`` increases with ``b`` below 1/2, so this only loosens the bound;
- ``gamma`` is taken as 0 where the argument of its logarithm is <= 1 (only
  for astronomically large counts or ``eps_sec`` near 1, where the printed
  formula is undefined).

A block aborts (``secret_bits = 0``, ``aborted = True`` and a reason) when an
intensity class has no detections in a basis, when a single-photon bound is not
positive (the decoy statistics are inconsistent with the source: a
photon-number-splitting attack or a miscalibrated source), or when the
phase-error bound reaches the tolerance. The default tolerance 0.11 is where the
asymptotic BB84 key fraction ``1 - 2 h(e)`` vanishes for equal bit and phase
error rates (Shor and Preskill); ``1 - h(phi)`` itself only vanishes at 1/2.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import QkdctlError

__all__ = [
    "DEFAULT_EPS_COR",
    "DEFAULT_EPS_SEC",
    "DEFAULT_PHASE_ERROR_TOLERANCE",
    "PROTOCOLS",
    "DecoyStatistics",
    "FiniteKeyError",
    "FiniteKeyResult",
    "asymptotic_gllp",
    "binary_entropy",
    "gllp_bounds",
    "key_length",
    "lim2014_key_length",
    "plob_bound",
    "rusca2018_key_length",
]

log = logging.getLogger(__name__)

#: secrecy parameter used when none is given (Rusca et al. 2018 use 1e-9)
DEFAULT_EPS_SEC = 1e-9
#: correctness parameter used when none is given (both papers use 1e-15)
DEFAULT_EPS_COR = 1e-15
#: a block aborts when its single-photon phase-error bound reaches this
DEFAULT_PHASE_ERROR_TOLERANCE = 0.11

#: protocol name -> number of intensity classes it uses
PROTOCOLS = {"bb84-decoy": 3, "bb84-one-decoy": 2}

LIM2014_EPS_SPLIT = 21
RUSCA2018_EPS_SPLIT = 19


class FiniteKeyError(QkdctlError, ValueError):
    """Decoy statistics or finite-key parameters that cannot be analysed as given."""


# --------------------------------------------------------------------------- helpers
def binary_entropy(x: Any) -> Any:
    """The binary entropy ``h(x) = -x log2 x - (1 - x) log2(1 - x)``, ``h(0) = h(1) = 0``.

    Accepts a number (returns a float) or an array (returns an array of the
    same shape). Values outside [0, 1] give NaN.
    """
    a = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = (a > 0.0) & (a < 1.0)
        safe = np.where(inner, a, 0.5)
        h = -safe * np.log2(safe) - (1.0 - safe) * np.log2(1.0 - safe)
        out = np.where(inner, h, np.where((a == 0.0) | (a == 1.0), 0.0, np.nan))
    if out.ndim == 0:
        return float(out)
    return out


def _h(x: float) -> float:
    """Scalar binary entropy for the inner loops (x clipped to [0, 1])."""
    if x <= 0.0 or x >= 1.0:
        return 0.0
    return -x * math.log2(x) - (1.0 - x) * math.log2(1.0 - x)


def _tau(n: int, mus: Sequence[float], ps: Sequence[float]) -> float:
    """Probability that Alice sends an n-photon state: ``sum_k p_k e^-k k^n / n!``."""
    return sum(p * math.exp(-k) * k**n for k, p in zip(mus, ps, strict=True)) / math.factorial(n)


def _gamma(a: float, b: float, c: float, d: float) -> float:
    """Lim et al. 2014 Eq. (5): the random-sampling correction to the phase-error rate."""
    inv = 1.0 / c + 1.0 / d  # (c + d) / (c d), without overflow
    y = inv / ((1.0 - b) * b) * LIM2014_EPS_SPLIT**2 / a**2
    if not y > 1.0:
        return 0.0
    return math.sqrt(inv * (1.0 - b) * b / math.log(2.0) * math.log2(y))


def plob_bound(eta: Any) -> Any:
    """The repeaterless (PLOB) bound ``-log2(1 - eta)`` in secret bits per channel use.

    ``eta`` is the transmittance of the pure-loss channel (a number or an array
    in [0, 1]); the bound is infinite at ``eta = 1``. Pirandola, Laurenza,
    Ottaviani and Banchi, Nat. Commun. 8, 15043 (2017).
    """
    a = np.asarray(eta, dtype=float)
    if np.any((a < 0.0) | (a > 1.0)) or np.any(np.isnan(a)):
        raise FiniteKeyError(f"transmittance {eta!r} is outside [0, 1]")
    with np.errstate(divide="ignore"):
        out = -np.log2(1.0 - a)
    if out.ndim == 0:
        return float(out)
    return out


# --------------------------------------------------------------------------- data
def _as_tuple(name: str, v: Any) -> tuple[float, ...]:
    try:
        t = tuple(v)
    except TypeError:
        raise FiniteKeyError(f"{name}: expected a sequence, got {v!r}") from None
    for i, x in enumerate(t):
        if isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating):
            raise FiniteKeyError(f"{name}[{i}]: expected a number, got {x!r}")
        if not math.isfinite(float(x)):
            raise FiniteKeyError(f"{name}[{i}]: {x!r} is not a finite number")
    return t


@dataclass(frozen=True)
class DecoyStatistics:
    """The observed statistics of one block, per intensity class (strongest first).

    Key basis = Z, test basis = X in qkdctl (Lim et al. 2014 call the key
    basis X; see the module docstring for the mapping).

    - ``intensities``: mean photon numbers ``mu_k``, strictly decreasing;
    - ``probabilities``: Alice's probabilities ``p_k`` of each class (sum 1);
    - ``n_key``, ``m_key``: sifted detections and bit errors in the key basis
      per class (after error correction the errors are known exactly);
    - ``n_test``, ``m_test``: the same in the test basis.

    The live pipeline passes integer counts; model studies may pass expected
    (fractional) counts.
    """

    intensities: tuple[float, ...]
    probabilities: tuple[float, ...]
    n_key: tuple[float, ...]
    m_key: tuple[float, ...]
    n_test: tuple[float, ...]
    m_test: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("intensities", "probabilities", "n_key", "m_key", "n_test", "m_test"):
            object.__setattr__(self, name, _as_tuple(name, getattr(self, name)))
        k = len(self.intensities)
        if k < 2:
            raise FiniteKeyError(f"intensities: {list(self.intensities)}: the decoy-state "
                                 "method needs at least two intensity classes")
        for name in ("probabilities", "n_key", "m_key", "n_test", "m_test"):
            if len(getattr(self, name)) != k:
                raise FiniteKeyError(f"{name}: has {len(getattr(self, name))} entries but "
                                     f"intensities has {k}")
        mus = self.intensities
        if any(m < 0 for m in mus) or any(a <= b for a, b in zip(mus, mus[1:], strict=False)):
            raise FiniteKeyError(f"intensities: {list(mus)}: mean photon numbers must be >= 0 "
                                 "and strictly decreasing (strongest first)")
        ps = self.probabilities
        if any(not 0.0 < p <= 1.0 for p in ps):
            raise FiniteKeyError(f"probabilities: {list(ps)}: each must be in (0, 1]")
        if abs(sum(ps) - 1.0) > 1e-9:
            raise FiniteKeyError(f"probabilities: {list(ps)} sums to {sum(ps):.12g}, not 1")
        for basis in ("key", "test"):
            n, m = getattr(self, "n_" + basis), getattr(self, "m_" + basis)
            for i in range(k):
                if n[i] < 0 or m[i] < 0:
                    raise FiniteKeyError(f"n_{basis}/m_{basis}[{i}]: counts must be >= 0")
                if m[i] > n[i]:
                    raise FiniteKeyError(f"m_{basis}[{i}] = {m[i]:g} errors exceed "
                                         f"n_{basis}[{i}] = {n[i]:g} detections")

    @property
    def n_key_total(self) -> float:
        return float(sum(self.n_key))

    @property
    def m_key_total(self) -> float:
        return float(sum(self.m_key))

    @property
    def n_test_total(self) -> float:
        return float(sum(self.n_test))

    @property
    def m_test_total(self) -> float:
        return float(sum(self.m_test))

    @property
    def qber_key(self) -> float:
        """Observed error rate of the key basis (NaN without detections)."""
        n = self.n_key_total
        return self.m_key_total / n if n else float("nan")

    @property
    def qber_test(self) -> float:
        """Observed error rate of the test basis (NaN without detections)."""
        n = self.n_test_total
        return self.m_test_total / n if n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {k: [float(x) if isinstance(x, float | np.floating) else int(x) for x in v]
                for k, v in asdict(self).items()}


def _json_number(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class FiniteKeyResult:
    """The outcome of the finite-key analysis of one block.

    ``s0_lower``, ``s1_lower``: lower bounds on the key-basis detections from
    vacuum and single-photon pulses; ``s1_test_lower``, ``v1_test_upper``: the
    single-photon detections and bit errors of the test basis; ``phase_error_bound``:
    upper bound on the phase-error rate of the key's single-photon part;
    ``length_bound``: the key-length formula before flooring and clipping at 0
    (NaN when a bound is undefined); ``secret_bits``: the key length to extract.
    """

    secret_bits: int
    protocol: str
    s0_lower: float
    s1_lower: float
    s1_test_lower: float
    v1_test_upper: float
    phase_error_bound: float
    leak_ec_bits: float
    eps_sec: float
    eps_cor: float
    aborted: bool
    abort_reason: str | None
    length_bound: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (NaN and infinities become None)."""
        d: dict[str, Any] = {}
        for k, v in asdict(self).items():
            d[k] = _json_number(v) if isinstance(v, float) else v
        return d


# --------------------------------------------------------------------------- checks
def _check_common(leak_ec_bits: float, eps_sec: float, eps_cor: float,
                  phase_error_tolerance: float) -> None:
    for name, v in (("eps_sec", eps_sec), ("eps_cor", eps_cor)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 < v < 1.0:
            raise FiniteKeyError(f"{name}: {v!r} is out of range; allowed > 0 and < 1")
    if (isinstance(leak_ec_bits, bool) or not isinstance(leak_ec_bits, int | float)
            or not math.isfinite(leak_ec_bits) or leak_ec_bits < 0):
        raise FiniteKeyError(f"leak_ec_bits: {leak_ec_bits!r} must be a finite number >= 0")
    if not 0.0 < phase_error_tolerance <= 0.5:
        raise FiniteKeyError(f"phase_error_tolerance: {phase_error_tolerance!r} is out of "
                             "range; allowed > 0 and <= 0.5")


def _check_lim_intensities(mus: Sequence[float]) -> None:
    if len(mus) != 3:
        raise FiniteKeyError(f"intensities: {list(mus)}: the two-decoy analysis of Lim et al. "
                             "2014 needs exactly three intensity classes")
    mu1, mu2, mu3 = mus
    if not (mu1 > mu2 + mu3 and mu2 > mu3 >= 0.0):
        raise FiniteKeyError(f"intensities: {list(mus)}: the two-decoy analysis of Lim et al. "
                             "2014 needs mu1 > mu2 + mu3 and mu2 > mu3 >= 0")


def _check_rusca_intensities(mus: Sequence[float]) -> None:
    if len(mus) != 2:
        raise FiniteKeyError(f"intensities: {list(mus)}: the one-decoy analysis of Rusca et al. "
                             "2018 needs exactly two intensity classes")
    if not mus[0] > mus[1] > 0.0:
        raise FiniteKeyError(f"intensities: {list(mus)}: the one-decoy analysis of Rusca et "
                             "al. 2018 needs mu1 > mu2 > 0")


def _zero_class(stats: DecoyStatistics) -> str | None:
    for basis, n in (("key (Z)", stats.n_key), ("test (X)", stats.n_test)):
        for k, c in enumerate(n):
            if c <= 0:
                return (f"no detections in the {basis} basis for intensity class {k} "
                        f"(mu = {stats.intensities[k]:g}): the decoy bounds need every class")
    return None


S1_REASON = ("single-photon yield bound is not positive ({what} <= 0): decoy statistics "
             "inconsistent with a single-photon source — a photon-number-splitting attack "
             "or a miscalibrated source (or too few counts in the block)")


# --------------------------------------------------------------------------- core bounds
def _phase_error(eps_sec: float, v1: float, s1_test: float, s1_key: float) -> float:
    b = v1 / s1_test
    if v1 < 1.0:
        b = max(b, 1.0 / s1_test)
    if b >= 0.5:
        return b
    return b + _gamma(eps_sec, b, s1_test, s1_key)


def _lim_basis(mus: Sequence[float], ps: Sequence[float], tau0: float, tau1: float,
               n: Sequence[float], eps_sec: float) -> tuple[float, float]:
    """Eqs. (2)-(3) of Lim et al. 2014: (s0 lower bound clipped at 0, s1 lower bound)."""
    mu1, mu2, mu3 = mus
    d = math.sqrt(sum(n) / 2.0 * math.log(LIM2014_EPS_SPLIT / eps_sec))
    nm = [math.exp(k) / p * (c - d) for k, p, c in zip(mus, ps, n, strict=True)]
    npl = [math.exp(k) / p * (c + d) for k, p, c in zip(mus, ps, n, strict=True)]
    s0 = max(0.0, tau0 * (mu2 * nm[2] - mu3 * npl[1]) / (mu2 - mu3))
    s1 = (tau1 * mu1 * (nm[1] - npl[2] - (mu2**2 - mu3**2) / mu1**2 * (npl[0] - s0 / tau0))
          / (mu1 * (mu2 - mu3) - mu2**2 + mu3**2))
    return s0, s1


def _lim_core(mus: Sequence[float], ps: Sequence[float], n_key: Sequence[float],
              n_test: Sequence[float], m_test: Sequence[float], leak: float, eps_sec: float,
              eps_cor: float) -> tuple[float, float, float, float, float, float]:
    """(s0, s1, s1_test, v1_test, phi, length bound) of Lim et al. 2014; phi, l NaN if s1 <= 0."""
    mu1, mu2, mu3 = mus
    tau0, tau1 = _tau(0, mus, ps), _tau(1, mus, ps)
    s0, s1 = _lim_basis(mus, ps, tau0, tau1, n_key, eps_sec)
    _, s1t = _lim_basis(mus, ps, tau0, tau1, n_test, eps_sec)
    dm = math.sqrt(sum(m_test) / 2.0 * math.log(LIM2014_EPS_SPLIT / eps_sec))
    m2p = math.exp(mu2) / ps[1] * (m_test[1] + dm)
    m3m = math.exp(mu3) / ps[2] * (m_test[2] - dm)
    v1 = tau1 * (m2p - m3m) / (mu2 - mu3)
    if s1 <= 0.0 or s1t <= 0.0:
        return s0, s1, s1t, v1, math.nan, math.nan
    phi = _phase_error(eps_sec, v1, s1t, s1)
    length = (s0 + s1 - s1 * _h(min(phi, 0.5)) - leak
              - 6.0 * math.log2(LIM2014_EPS_SPLIT / eps_sec) - math.log2(2.0 / eps_cor))
    return s0, s1, s1t, v1, phi, length


def _rusca_basis(mus: Sequence[float], ps: Sequence[float], tau0: float, tau1: float,
                 n: Sequence[float], m: Sequence[float], eps_sec: float
                 ) -> tuple[float, float, float]:
    """Rusca et al. 2018, Appendix A: (s0 lower, s0 upper, s1 lower) of one basis."""
    mu1, mu2 = mus
    ln = math.log(RUSCA2018_EPS_SPLIT / eps_sec)
    dn = math.sqrt(sum(n) / 2.0 * ln)
    dm = math.sqrt(sum(m) / 2.0 * ln)
    n1p = math.exp(mu1) / ps[0] * (n[0] + dn)
    n2m = math.exp(mu2) / ps[1] * (n[1] - dn)
    s0_up = 2.0 * (tau0 * math.exp(mu2) / ps[1] * (m[1] + dm) + dn)
    s0_lo = max(0.0, tau0 / (mu1 - mu2) * (mu1 * n2m - mu2 * n1p))
    s1 = (tau1 * mu1 / (mu2 * (mu1 - mu2))
          * (n2m - mu2**2 / mu1**2 * n1p - (mu1**2 - mu2**2) / mu1**2 * s0_up / tau0))
    return s0_lo, s0_up, s1


def _rusca_core(mus: Sequence[float], ps: Sequence[float], n_key: Sequence[float],
                m_key: Sequence[float], n_test: Sequence[float], m_test: Sequence[float],
                leak: float, eps_sec: float, eps_cor: float
                ) -> tuple[float, float, float, float, float, float]:
    """(s0, s1, s1_test, v1_test, phi, length bound) of Rusca et al. 2018."""
    mu1, mu2 = mus
    tau0, tau1 = _tau(0, mus, ps), _tau(1, mus, ps)
    s0, _, s1 = _rusca_basis(mus, ps, tau0, tau1, n_key, m_key, eps_sec)
    _, _, s1t = _rusca_basis(mus, ps, tau0, tau1, n_test, m_test, eps_sec)
    dm = math.sqrt(sum(m_test) / 2.0 * math.log(RUSCA2018_EPS_SPLIT / eps_sec))
    m1p = math.exp(mu1) / ps[0] * (m_test[0] + dm)
    m2m = math.exp(mu2) / ps[1] * (m_test[1] - dm)
    v1 = tau1 / (mu1 - mu2) * (m1p - m2m)
    if s1 <= 0.0 or s1t <= 0.0:
        return s0, s1, s1t, v1, math.nan, math.nan
    phi = _phase_error(eps_sec, v1, s1t, s1)
    length = (s0 + s1 * (1.0 - _h(min(phi, 0.5))) - leak
              - 6.0 * math.log2(RUSCA2018_EPS_SPLIT / eps_sec) - math.log2(2.0 / eps_cor))
    return s0, s1, s1t, v1, phi, length


def _result(protocol: str, core: tuple[float, ...], stats: DecoyStatistics, leak: float,
            eps_sec: float, eps_cor: float, tol: float) -> FiniteKeyResult:
    s0, s1, s1t, v1, phi, length = core
    reason = _zero_class(stats)
    if reason is None and (s1 <= 0.0 or s1t <= 0.0):
        what = "s1" if s1 <= 0.0 else "s1 of the test basis"
        reason = S1_REASON.format(what=what)
    if reason is None and phi >= tol:
        reason = f"phase-error bound {phi:.3g} exceeds the tolerance {tol:g}"
    aborted = reason is not None
    bits = 0 if aborted or not length > 0 else int(math.floor(length))
    if aborted:
        log.info("%s finite-key analysis aborted: %s", protocol, reason)
    return FiniteKeyResult(
        secret_bits=bits, protocol=protocol, s0_lower=s0, s1_lower=s1, s1_test_lower=s1t,
        v1_test_upper=v1, phase_error_bound=phi, leak_ec_bits=float(leak),
        eps_sec=float(eps_sec), eps_cor=float(eps_cor), aborted=aborted,
        abort_reason=reason, length_bound=length)


# --------------------------------------------------------------------------- public
def lim2014_key_length(stats: DecoyStatistics, leak_ec_bits: float, *,
                       eps_sec: float = DEFAULT_EPS_SEC, eps_cor: float = DEFAULT_EPS_COR,
                       phase_error_tolerance: float = DEFAULT_PHASE_ERROR_TOLERANCE
                       ) -> FiniteKeyResult:
    """Secret-key length of a three-intensity block (Lim et al., PRA 89, 022307 (2014)).

    ``l = floor(s0 + s1 - s1 h(phi) - leak_ec_bits - 6 log2(21/eps_sec) - log2(2/eps_cor))``
    with the vacuum and single-photon bounds of Eqs. (2)-(3) from the key-basis
    counts, Eq. (4) for the test basis' single-photon errors and Eq. (5) for
    the phase error. ``leak_ec_bits`` is what error correction actually
    disclosed (the error-verification hash is accounted by ``log2(2/eps_cor)``).
    The paper's evaluation sets ``eps_sec`` proportional to the key length;
    here it is the secrecy of this block, given by the caller.
    """
    _check_common(leak_ec_bits, eps_sec, eps_cor, phase_error_tolerance)
    _check_lim_intensities(stats.intensities)
    core = _lim_core(stats.intensities, stats.probabilities, stats.n_key, stats.n_test,
                     stats.m_test, float(leak_ec_bits), eps_sec, eps_cor)
    return _result("bb84-decoy", core, stats, leak_ec_bits, eps_sec, eps_cor,
                   phase_error_tolerance)


def rusca2018_key_length(stats: DecoyStatistics, leak_ec_bits: float, *,
                         eps_sec: float = DEFAULT_EPS_SEC, eps_cor: float = DEFAULT_EPS_COR,
                         phase_error_tolerance: float = DEFAULT_PHASE_ERROR_TOLERANCE
                         ) -> FiniteKeyResult:
    """Secret-key length of a two-intensity block (Rusca et al., APL 112, 171104 (2018)).

    ``l = floor(s0_l + s1_l (1 - h(phi)) - leak_ec_bits - 6 log2(19/eps_sec) - log2(2/eps_cor))``
    (their Appendix A). Without a vacuum class the single-photon bound::

        s1 >= tau1 mu1 / (mu2 (mu1 - mu2)) [n-_2 - mu2^2/mu1^2 n+_1
                                            - (mu1^2 - mu2^2)/mu1^2 s0_u / tau0]

    needs an upper bound on the vacuum detections, taken from the errors of
    the decoy class (vacuum detections err with probability 1/2)::

        s0_u = 2 (tau0 e^mu2 / p_mu2 (m_mu2 + delta(m, eps)) + delta(n, eps))

    The vacuum lower bound ``s0 >= tau0 / (mu1 - mu2) (mu1 n-_2 - mu2 n+_1)`` and
    the test-basis single-photon errors ``v1 <= tau1 / (mu1 - mu2) (m+_1 - m-_2)``
    follow Lim et al.; ``n±_k`` carry the factor ``e^k / p_k`` as there.
    """
    _check_common(leak_ec_bits, eps_sec, eps_cor, phase_error_tolerance)
    _check_rusca_intensities(stats.intensities)
    core = _rusca_core(stats.intensities, stats.probabilities, stats.n_key, stats.m_key,
                       stats.n_test, stats.m_test, float(leak_ec_bits), eps_sec, eps_cor)
    return _result("bb84-one-decoy", core, stats, leak_ec_bits, eps_sec, eps_cor,
                   phase_error_tolerance)


def key_length(protocol: str, stats: DecoyStatistics, leak_ec_bits: float, *,
               eps_sec: float = DEFAULT_EPS_SEC, eps_cor: float = DEFAULT_EPS_COR,
               phase_error_tolerance: float = DEFAULT_PHASE_ERROR_TOLERANCE
               ) -> FiniteKeyResult:
    """The finite-key analysis of ``protocol``: ``"bb84-decoy"`` (three intensities,
    :func:`lim2014_key_length`) or ``"bb84-one-decoy"`` (two, :func:`rusca2018_key_length`)."""
    if protocol not in PROTOCOLS:
        raise FiniteKeyError(f"protocol: {protocol!r} is not allowed; expected one of "
                             + ", ".join(repr(p) for p in PROTOCOLS))
    if len(stats.intensities) != PROTOCOLS[protocol]:
        raise FiniteKeyError(f"protocol {protocol!r} uses {PROTOCOLS[protocol]} intensity "
                             f"classes but the statistics have {len(stats.intensities)}")
    fn = lim2014_key_length if protocol == "bb84-decoy" else rusca2018_key_length
    return fn(stats, leak_ec_bits, eps_sec=eps_sec, eps_cor=eps_cor,
              phase_error_tolerance=phase_error_tolerance)


# --------------------------------------------------------------------------- asymptotic
def gllp_bounds(mu: float, nu: float, q_mu: float, q_nu: float, e_nu: float, y0: float,
                e0: float = 0.5) -> tuple[float, float]:
    """Vacuum + weak decoy bounds of Ma, Qi, Zhao and Lo, PRA 72, 012326 (2005).

    Returns ``(Y1_L, e1_U)``::

        Y1_L = mu / (mu nu - nu^2) (Q_nu e^nu - Q_mu e^mu nu^2/mu^2 - (mu^2 - nu^2)/mu^2 Y0)
        e1_U = (E_nu Q_nu e^nu - e0 Y0) / (Y1_L nu)

    from the gains ``Q`` and error rates ``E`` of the signal ``mu`` and the weak
    decoy ``nu < mu`` and the vacuum yield ``Y0``. ``e1_U`` is NaN if ``Y1_L <= 0``.
    """
    if not mu > nu > 0.0:
        raise FiniteKeyError(f"intensities mu = {mu!r}, nu = {nu!r}: the vacuum + weak decoy "
                             "bounds need mu > nu > 0")
    y1 = mu / (mu * nu - nu**2) * (q_nu * math.exp(nu) - q_mu * math.exp(mu) * nu**2 / mu**2
                                   - (mu**2 - nu**2) / mu**2 * y0)
    if y1 <= 0.0:
        return y1, math.nan
    e1 = (e_nu * q_nu * math.exp(nu) - e0 * y0) / (y1 * nu)
    return y1, e1


def _gllp_raw(mu: float, nu: float, q_mu: float, e_mu: float, q_nu: float, e_nu: float,
              y0: float, f_ec: float, sifting: float, e0: float) -> float:
    y1, e1 = gllp_bounds(mu, nu, q_mu, q_nu, e_nu, y0, e0)
    if y1 <= 0.0:
        return -q_mu * f_ec * _h(e_mu) * sifting + sifting * y1 * mu * math.exp(-mu)
    q1 = y1 * mu * math.exp(-mu)
    return sifting * (-q_mu * f_ec * _h(e_mu) + q1 * (1.0 - _h(min(max(e1, 0.0), 0.5))))


def asymptotic_gllp(mu: float, nu: float, q_mu: float, e_mu: float, q_nu: float, e_nu: float,
                    y0: float, *, f_ec: float = 1.22, sifting: float = 0.5,
                    e0: float = 0.5) -> float:
    """Asymptotic secret-key rate per signal pulse, vacuum + weak decoy (Ma et al. 2005).

    ``R = q (-Q_mu f h(E_mu) + Q1_L (1 - h(e1_U)))`` with ``Q1_L = Y1_L mu e^-mu``
    (GLLP with the decoy bounds of :func:`gllp_bounds`), clipped at 0.
    ``sifting`` is ``q`` (1/2 for symmetric BB84), ``f_ec`` the error-correction
    efficiency. The decoy pulses' share of the pulses is neglected, as in the paper.
    """
    return max(0.0, _gllp_raw(mu, nu, q_mu, e_mu, q_nu, e_nu, y0, f_ec, sifting, e0))
