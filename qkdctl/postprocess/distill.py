"""From sifted key to secret key, block by block, between Alice and Bob.

Each block of sifted key goes through, in order (every step a message
exchange over the authenticated classical channel):

1. **Parameter estimation.** Bob discloses his test-basis (X) bits of the
   block; Alice counts the errors per intensity class. Alice picks a random
   sample of the key-basis (Z) bits and discloses her bits there; Bob counts
   the errors. The sample is removed from the key. A QBER estimate above
   ``qber_abort`` in either basis gives no key from the block; when it is above
   by more than :data:`ALARM_SIGMAS` binomial standard deviations of its
   sample (so that a few unlucky bits of a small block do not count), it is a
   **tamper alarm** and the session stops.
2. **Error correction.** Cascade (:mod:`.cascade`), Bob correcting towards
   Alice, with block sizes from the sampled QBER. Every parity Alice discloses
   counts as leaked. Bob then announces the positions he corrected (public in
   any case: Cascade's bisections show Eve where the errors are).
3. **Verification.** Alice draws a universal hash function (:mod:`.verify`)
   with collision probability at most ``eps_cor`` and sends it with the hash
   of her key, and the block's counts per intensity class: bits and errors in
   both bases (only Alice knows which class each pulse was: the sifting reply
   does not carry the classes, which would cost a bit and a half per
   detection on the classical channel). Bob compares the hashes; on a mismatch
   the block is discarded.
4. **Finite-key length.** Both compute, from the same public counts, the
   secret key length of the bench's protocol (:mod:`.finite_key`): the
   two-decoy bound of Lim et al. 2014 or the one-decoy bound of Rusca et al.
   2018. A block whose single-photon bound collapses or whose phase-error
   bound exceeds the tolerance yields no key; when the point estimates from the
   observed gains say the same (so that it is not a matter of too few counts),
   that is a tamper alarm too (a photon-number-splitting attack leaves the
   QBER low but starves the decoy states).
5. **Privacy amplification.** Alice draws a seed from her random source and
   sends it; both hash their corrected keys to the secret length with the
   modified Toeplitz hash (:func:`.privacy.amplify`, ``n - 1`` seed bits).
   Each side stores the result in its key store.

What leaks, and is subtracted from the key: Cascade's parities
(``ec_leaked_bits``), the verification tag beyond the ``log2(2/eps_cor)`` the
bound already subtracts, and, if asked for, the 256-bit digest of the sifted
key shown in the summary. The sample and the test bits are disclosed but not
part of the key.

The roles keep to their own data: :class:`AliceDistiller` sees Alice's bits,
:class:`BobDistiller` Bob's; they share only the messages. :func:`distill_block`
runs the exchange for one block with both roles in one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .. import codec, wire
from ..errors import QkdctlError
from . import cascade, finite_key, privacy, verify
from .cascade_wire import CompactCascadeChannel

__all__ = [
    "AliceDistiller",
    "BlockDone",
    "BlockResult",
    "BobDistiller",
    "DistillParams",
    "KeyBlock",
    "SeededRandom",
    "TamperAlarm",
    "distill_block",
    "key_digest",
    "point_estimates",
]

log = logging.getLogger(__name__)


class SeededRandom:
    """Reproducible random bytes for the simulated bench: SHAKE-256 in counter mode,
    keyed by the run's seed and a label (one stream per role).

    On the simulated bench Alice's choices themselves come from the seed, so
    drawing the distillation's random choices from it as well gives nothing
    away, and makes a run and its replay identical to the last bit of secret
    key. A real bench uses the operating system's random source instead.
    """

    def __init__(self, seed: int, label: str):
        self._key = hashlib.sha256(f"qkdctl distillation {seed} {label}".encode()).digest()
        self._n = 0

    def __call__(self, n: int) -> bytes:
        out = hashlib.shake_256(self._key + self._n.to_bytes(8, "little")).digest(n)
        self._n += 1
        return out

    def __repr__(self) -> str:
        return "SeededRandom(...)"


class TamperAlarm(QkdctlError):
    """The statistics of a block show an eavesdropper (or a badly broken channel)."""

    exit_code = 3


class ProtocolError(QkdctlError):
    """The other side sent a message that does not fit the distillation protocol."""

    exit_code = 3


# ----------------------------------------------------------------------------- messages
@wire.message("distill.BlockOpen")
@dataclass(frozen=True)
class BlockOpen:
    """Bob -> Alice: a block is ready; Bob's test-basis bits of it."""

    block: int
    n_key: int
    n_test: int
    test_bits: bytes             # Bob's test-basis bits, one bit each (packed)


@wire.message("distill.Estimate")
@dataclass(frozen=True)
class Estimate:
    """Alice -> Bob: test-basis errors per intensity; her key bits at a random sample."""

    block: int
    test_errors: np.ndarray      # int64, per intensity class
    sample_seed: bytes           # the sample's positions are drawn from it (32 bytes)
    sample_bits: bytes           # Alice's bits at the sample's positions (packed)


@wire.message("distill.Decision")
@dataclass(frozen=True)
class Decision:
    """Bob -> Alice: go on to error correction, or stop (and why)."""

    block: int
    proceed: bool
    reason: str
    qber_estimate: float


@wire.message("distill.Corrected")
@dataclass(frozen=True)
class Corrected:
    """Bob -> Alice: the positions in the reconciled key that Bob corrected."""

    block: int
    flipped: bytes               # ascending positions, Rice-coded gaps (codec)


@wire.message("distill.VerifyTag")
@dataclass(frozen=True)
class VerifyTag:
    """Alice -> Bob: the verification hash function and Alice's tag, and the block's
    public counts per intensity class for the finite-key bound."""

    block: int
    hash_key: bytes
    tag: bytes
    key_counts: np.ndarray       # int64: reconciled key bits per intensity class
    key_errors: np.ndarray       # int64: errors Bob corrected, per intensity class
    test_counts: np.ndarray      # int64: test-basis bits per intensity class


@wire.message("distill.VerifyResult")
@dataclass(frozen=True)
class VerifyResult:
    """Bob -> Alice: whether the tags match."""

    block: int
    match: bool


@wire.message("distill.BlockDone")
@dataclass(frozen=True)
class BlockDone:
    """Bob -> Alice, when two hosts distil: a block's outcome (the figures of
    :class:`BlockResult` as JSON, no key material); ``skipped`` when Bob did not
    distil the block at all (after a tamper alarm)."""

    block: int
    skipped: bool
    result_json: str


@wire.message("distill.Amplify")
@dataclass(frozen=True)
class Amplify:
    """Alice -> Bob: the secret length and the Toeplitz seed."""

    block: int
    out_bits: int
    seed: bytes                  # n - 1 bits (privacy.amplify), packed, least significant first




# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DistillParams:
    """What both sides agree on before the session."""

    protocol: str
    intensities: tuple[float, ...]
    probabilities: tuple[float, ...]
    qber_sample_fraction: float = 0.005
    qber_abort: float = 0.11
    phase_error_tolerance: float = 0.11
    eps_sec: float = 1e-9
    eps_cor: float = 1e-15
    extra_leak_bits: int = 0     # disclosed elsewhere (e.g. a digest of the sifted key)

    @classmethod
    def from_config(cls, cfg, extra_leak_bits: int = 0) -> DistillParams:
        p = cfg.postprocess
        return cls(protocol=cfg.protocol,
                   intensities=tuple(cfg.source.mean_photon_numbers),
                   probabilities=tuple(cfg.source.intensity_probabilities),
                   qber_sample_fraction=p.qber_sample_fraction, qber_abort=p.qber_abort,
                   phase_error_tolerance=p.phase_error_tolerance, eps_sec=p.eps_sec,
                   eps_cor=p.eps_cor, extra_leak_bits=extra_leak_bits)


@dataclass
class KeyBlock:
    """One side's share of a block: its key-basis bits and test-basis bits, with the
    (public) intensity class of each."""

    block: int
    key: np.ndarray
    intensity: np.ndarray
    test_bits: np.ndarray
    test_intensity: np.ndarray
    #: the last block of a session, cut when the acquisition ended
    last: bool = False

    def __repr__(self) -> str:  # never show key material
        return (f"KeyBlock(block={self.block}, key_bits={self.key.shape[0]}, "
                f"test_bits={self.test_bits.shape[0]})")


@dataclass
class BlockResult:
    """What one block gave: the figures of the summary (no key material)."""

    block: int
    sifted_bits: int
    test_bits: int
    sample_bits: int = 0
    key_bits: int = 0
    qber_sample: float | None = None
    qber_test: float | None = None
    ec_leaked_bits: int = 0
    ec_errors: int = 0
    ec_rounds: int = 0
    ec_efficiency: float | None = None
    verified: bool | None = None
    verification_tag_bits: int = 0
    finite_key: dict[str, Any] | None = None
    secret_bits: int = 0
    aborted: bool = False
    abort_reason: str | None = None
    alarm: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: check value of the secret key from public data (:func:`key_digest`), if any
    key_digest: str | None = None
    #: per intensity class: reconciled key bits, their errors, test bits, their errors
    intensity_counts: dict[str, list[int]] | None = None
    #: the secret key (Alice's copy, Bob's copy), kept off the summary
    keys: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("keys", None)
        return d


# ----------------------------------------------------------------------------- estimates
def _tau(n: int, mu: np.ndarray, p: np.ndarray) -> float:
    return float(np.sum(p * np.exp(-mu) * mu ** n) / math.factorial(n))


#: standard deviations by which a point estimate must pass a threshold to raise an alarm
ALARM_SIGMAS = 5.0


def point_estimates(protocol: str, intensities, probabilities, n_key, m_key, n_test,
                    m_test) -> dict[str, float]:
    """Single-photon counts and phase error from the observed counts, with no
    finite-key margin (the decoy bounds' point estimates), and their standard
    deviations from the Poisson spread of the counts.

    The estimates are linear in the counts ``N_k = e^mu_k / p_k n_k``, so their
    variance is ``sum_k c_k^2 (e^mu_k / p_k)^2 n_k``. An honest channel gives
    ``s1 > 0`` and a phase error near the test-basis QBER; a photon-number-
    splitting attack drives ``s1`` far below zero. Used to tell an attack from a
    block that is merely too short for the finite-key bound.
    """
    mu = np.asarray(intensities, float)
    p = np.asarray(probabilities, float)
    scale = np.exp(mu) / p
    t1 = _tau(1, mu, p)

    def s1_coefficients(n, m):
        """(coefficients on n_k, coefficients on m_k) of s1, both scaled."""
        cn = np.zeros(len(mu))
        cm = np.zeros(len(mu))
        if protocol == "bb84-decoy":
            m1, m2, m3 = mu
            k = t1 * m1 / (m1 * (m2 - m3) - m2 ** 2 + m3 ** 2)
            a = (m2 ** 2 - m3 ** 2) / m1 ** 2
            cn[0] = -a * k
            cn[1] = k * (1 - a * m3 / (m2 - m3))
            cn[2] = k * (-1 + a * m2 / (m2 - m3))
        else:
            m1, m2 = mu
            k = t1 * m1 / (m2 * (m1 - m2))
            cn[0] = -k * m2 ** 2 / m1 ** 2
            cn[1] = k
            cm[1] = -k * (m1 ** 2 - m2 ** 2) / m1 ** 2 * 2.0   # s0 upper bound / tau0
        return cn * scale, cm * scale

    def v1_coefficients():
        cm = np.zeros(len(mu))
        if protocol == "bb84-decoy":
            cm[1], cm[2] = t1 / (mu[1] - mu[2]), -t1 / (mu[1] - mu[2])
        else:
            cm[0], cm[1] = t1 / (mu[0] - mu[1]), -t1 / (mu[0] - mu[1])
        return cm * scale

    def linear(cn, cm, n, m):
        n = np.asarray(n, float)
        m = np.asarray(m, float)
        value = float(cn @ n + cm @ m)
        sigma = math.sqrt(float(cn ** 2 @ n + cm ** 2 @ m))
        return value, sigma

    s1_key, s1_key_sigma = linear(*s1_coefficients(n_key, m_key), n_key, m_key)
    s1_test, s1_test_sigma = linear(*s1_coefficients(n_test, m_test), n_test, m_test)
    v1, v1_sigma = linear(np.zeros(len(mu)), v1_coefficients(), n_test, m_test)
    phase = v1 / s1_test if s1_test > 0 else math.inf
    # a lower confidence bound of the phase error: few errors, many single photons
    lo_num = v1 - ALARM_SIGMAS * v1_sigma
    lo_den = s1_test + ALARM_SIGMAS * s1_test_sigma
    phase_low = lo_num / lo_den if lo_den > 0 and lo_num > 0 else 0.0
    return {"s1_key": s1_key, "s1_key_sigma": s1_key_sigma, "s1_test": s1_test,
            "s1_test_sigma": s1_test_sigma, "phase_error": float(phase),
            "phase_error_low": float(phase_low)}


def _qber(errors: int, n: int) -> float | None:
    return errors / n if n else None


# ----------------------------------------------------------------------------- roles
class _Role:
    name = "?"

    def __init__(self, params: DistillParams, channel, rng_bytes=secrets.token_bytes):
        self.params = params
        # Cascade's requests and replies travel compactly coded (cascade_wire)
        self.channel = CompactCascadeChannel(channel)
        self.rng_bytes = rng_bytes

    def _recv(self, cls, block):
        msg = self.channel.recv()
        if not isinstance(msg, cls) or getattr(msg, "block", block) != block:
            raise ProtocolError(f"{self.name}: expected {cls.__name__} for block {block}, "
                                f"got {type(msg).__name__}")
        return msg


class AliceDistiller(_Role):
    """Alice's side: answers estimation, Cascade and verification; draws the sample,
    the hash function and the Toeplitz seed from her random source."""

    name = "alice"

    def steps(self, blk: KeyBlock):
        """Alice's exchange for one block, as a generator.

        It yields wherever Alice waits for Bob's next message; in one process the
        driver resumes it once Bob has sent (:func:`distill_block`). When it ends,
        :attr:`key` holds her secret key of the block, or None.
        """
        self.key = None
        self.key_digest = None
        ch, p = self.channel, self.params
        nint = len(p.intensities)
        yield
        op = self._recv(BlockOpen, blk.block)
        if op.n_key != blk.key.shape[0] or op.n_test != blk.test_bits.shape[0]:
            raise ProtocolError(f"alice: block {blk.block}: Bob's block has {op.n_key} key "
                                f"and {op.n_test} test bits, Alice's "
                                f"{blk.key.shape[0]} and {blk.test_bits.shape[0]}")
        try:
            bob_test = codec.unpack_bases(op.test_bits, op.n_test)
        except wire.WireError as e:
            raise ProtocolError(f"alice: block {blk.block}: Bob's test bits: {e}") from None
        wrong = bob_test != blk.test_bits
        test_errors = np.bincount(blk.test_intensity[wrong], minlength=nint).astype(np.int64)
        n = blk.key.shape[0]
        sample_seed = self.rng_bytes(32)
        sample = _random_sample(n, _sample_size(p, n), sample_seed)
        ch.send(Estimate(blk.block, test_errors, sample_seed,
                         codec.pack_bases(blk.key[sample])))
        yield
        if not self._recv(Decision, blk.block).proceed:
            return
        keep = np.ones(n, bool)
        keep[sample] = False
        key = blk.key[keep]
        intensity = blk.intensity[keep]
        ec = cascade.CascadeAlice(key)
        while True:
            yield
            msg = ch.recv()
            if isinstance(msg, Corrected):
                break
            try:
                reply = ec.handle(msg)
            except (ValueError, TypeError) as e:
                raise ProtocolError(f"alice: block {blk.block}: Bob's Cascade message: "
                                    f"{e}") from None
            if reply is not None:
                ch.send(reply)
        try:
            flipped = codec.decode_pulses(msg.flipped, -1) if msg.block == blk.block else None
        except wire.WireError:
            flipped = None
        if flipped is None or (flipped.size and flipped[-1] >= key.shape[0]):
            raise ProtocolError(f"alice: block {blk.block}: malformed corrected positions")
        counts = _counts(intensity, nint)
        errors = _counts(intensity[flipped], nint)
        test_counts = _counts(blk.test_intensity, nint)
        hkey = verify.draw_hash_key(key.shape[0], p.eps_cor, self.rng_bytes)
        vtag = verify.tag(key, hkey)
        ch.send(VerifyTag(blk.block, hkey, vtag, counts, errors, test_counts))
        yield
        if not self._recv(VerifyResult, blk.block).match:
            return
        fk = _finite_key(p, counts, test_counts, errors, test_errors, ec.leaked_bits,
                         key.shape[0])
        if fk.secret_bits <= 0:
            return
        seed_bits = privacy.amplify_seed_length(key.shape[0], fk.secret_bits)
        raw = self.rng_bytes((seed_bits + 7) // 8)
        ch.send(Amplify(blk.block, fk.secret_bits, raw))
        self.key = privacy.amplify(key, fk.secret_bits, _seed_bits(raw, seed_bits))
        self.key_digest = key_digest(blk.block, hkey, vtag, fk.secret_bits, raw)


class BobDistiller(_Role):
    """Bob's side: opens blocks, decides on the estimates, drives Cascade, checks the
    verification tag, applies the seed."""

    name = "bob"

    def run(self, b: KeyBlock, peer=lambda: None) -> tuple[BlockResult, np.ndarray | None]:
        """Bob's exchange for one block; returns its result and Bob's secret key (or None).

        ``peer`` is called after each message Bob sends, so that an Alice in the
        same thread can answer; between two processes it does nothing.
        """
        p, ch = self.params, self.channel
        nint = len(p.intensities)

        def send(msg):
            ch.send(msg)
            peer()

        res = BlockResult(block=b.block, sifted_bits=int(b.key.shape[0]),
                          test_bits=int(b.test_bits.shape[0]))
        t0 = time.perf_counter()

        # 1. estimation ----------------------------------------------------------------
        send(BlockOpen(b.block, int(b.key.shape[0]), int(b.test_bits.shape[0]),
                       codec.pack_bases(b.test_bits)))
        est = self._recv(Estimate, b.block)
        n = b.key.shape[0]
        if len(est.sample_seed) != 32 or est.test_errors.shape != (nint,):
            raise ProtocolError(f"bob: block {b.block}: malformed estimate from Alice")
        sample = _random_sample(n, _sample_size(p, n), est.sample_seed)
        try:
            sample_bits = codec.unpack_bases(est.sample_bits, sample.shape[0])
        except wire.WireError as e:
            raise ProtocolError(f"bob: block {b.block}: Alice's sample bits: {e}") from None
        sample_err = int(np.count_nonzero(b.key[sample] != sample_bits))
        res.sample_bits = int(sample.shape[0])
        res.qber_sample = _qber(sample_err, res.sample_bits)
        res.qber_test = _qber(int(est.test_errors.sum()), res.test_bits)
        res.seconds["estimate"] = time.perf_counter() - t0
        alarm = stop = None
        for name, q, nq in (("key (Z)", res.qber_sample, res.sample_bits),
                            ("test (X)", res.qber_test, res.test_bits)):
            if q is None or q <= p.qber_abort:
                continue
            # an alarm only when the excess is beyond the sample's binomial spread
            # (ALARM_SIGMAS at the threshold): a handful of bits proves nothing
            spread = ALARM_SIGMAS * math.sqrt(nq * p.qber_abort * (1 - p.qber_abort))
            if q * nq > nq * p.qber_abort + spread:
                alarm = (f"QBER {100 * q:.2f} % in the {name} basis ({nq} bits) exceeds "
                         f"{100 * p.qber_abort:.2f} %: the quantum channel is disturbed "
                         f"(an intercept-resend attack raises it to 25 %; delays or "
                         "polarization that are not calibrated, to about 50 %)")
                break
            stop = stop or (f"QBER estimate {100 * q:.2f} % in the {name} basis exceeds "
                            f"{100 * p.qber_abort:.2f} %, within the spread of its {nq} bits: "
                            "no key from this block")
        # Cascade's block sizes from a (slightly pessimistic) estimate of the key QBER
        q_est = min(max((sample_err + 1) / (res.sample_bits + 2), 1e-4), 0.25)
        reason = alarm or stop
        send(Decision(b.block, reason is None, reason or "", float(q_est)))
        if reason is not None:
            res.aborted, res.abort_reason, res.alarm = True, reason, alarm
            return res, None

        # 2. error correction ----------------------------------------------------------
        t1 = time.perf_counter()
        keep = np.ones(n, bool)
        keep[sample] = False
        key = b.key[keep]
        res.key_bits = int(key.shape[0])
        ec = cascade.CascadeBob(key, q_est, int.from_bytes(self.rng_bytes(8), "little"),
                                _schedule(key.shape[0], q_est, b.last))
        send(ec.start())
        reply = ch.recv()
        while (req := ec.next_request(reply)) is not None:
            send(req)
            reply = ch.recv()
        out = ec.result()
        corrected, flipped = out.corrected, out.flipped
        send(Corrected(b.block, codec.encode_pulses(flipped, -1)))
        res.ec_leaked_bits = int(out.leaked_bits)
        res.ec_errors = int(flipped.shape[0])
        res.ec_rounds = int(out.rounds)
        h = float(finite_key.binary_entropy(res.ec_errors / res.key_bits))
        res.ec_efficiency = res.ec_leaked_bits / (res.key_bits * h) if h > 0 else None
        res.seconds["error_correction"] = time.perf_counter() - t1

        # 3. verification --------------------------------------------------------------
        t2 = time.perf_counter()
        vt = self._recv(VerifyTag, b.block)
        for name in ("key_counts", "key_errors", "test_counts"):
            a = getattr(vt, name)
            if a.shape != (nint,) or a.min() < 0:
                raise ProtocolError(f"bob: block {b.block}: malformed {name} from Alice")
        if (vt.key_counts.sum() != res.key_bits or vt.test_counts.sum() != res.test_bits
                or vt.key_errors.sum() != res.ec_errors):
            raise ProtocolError(f"bob: block {b.block}: Alice's counts do not add up to the "
                                "block's")
        res.intensity_counts = {"key": vt.key_counts.tolist(), "key_errors": vt.key_errors.tolist(),
                                "test": vt.test_counts.tolist(),
                                "test_errors": est.test_errors.tolist()}
        match = bool(verify.tag(corrected, vt.hash_key) == vt.tag)
        send(VerifyResult(b.block, match))
        res.verified = match
        res.verification_tag_bits = 8 * len(vt.tag)
        res.seconds["verification"] = time.perf_counter() - t2
        if not match:
            res.abort_reason = ("verification failed: the corrected keys differ; the block "
                                "is discarded")
            log.warning("block %d: %s", b.block, res.abort_reason)
            return res, None

        # 4. finite-key length ---------------------------------------------------------
        fk = _finite_key(p, vt.key_counts, vt.test_counts, vt.key_errors, est.test_errors,
                         res.ec_leaked_bits, res.key_bits)
        res.finite_key = fk.to_dict()
        res.finite_key["leak_verification_bits"] = _verification_leak(
            p, res.verification_tag_bits)
        if fk.secret_bits <= 0:
            res.abort_reason = fk.abort_reason or "the finite-key bound leaves no secret bits"
            if fk.aborted:
                res.alarm = _decoy_alarm(p, vt.key_counts, vt.test_counts, vt.key_errors,
                                         est.test_errors, res)
                if res.alarm is not None:
                    res.aborted, res.abort_reason = True, res.alarm
            return res, None

        # 5. privacy amplification -----------------------------------------------------
        t3 = time.perf_counter()
        amp = self._recv(Amplify, b.block)
        seed_bits = privacy.amplify_seed_length(res.key_bits, fk.secret_bits)
        if amp.out_bits != fk.secret_bits or len(amp.seed) != (seed_bits + 7) // 8:
            raise ProtocolError(f"bob: block {b.block}: Alice's seed is for {amp.out_bits} "
                                f"bits, the bound gives {fk.secret_bits}")
        b_key = privacy.amplify(corrected, amp.out_bits, _seed_bits(amp.seed, seed_bits))
        res.seconds["privacy_amplification"] = time.perf_counter() - t3
        res.secret_bits = int(fk.secret_bits)
        res.key_digest = key_digest(b.block, vt.hash_key, vt.tag, amp.out_bits, amp.seed)
        return res, b_key


def _decoy_alarm(p: DistillParams, counts, test_counts, errors, test_errors,
                 res: BlockResult) -> str | None:
    """An alarm when the point estimates, beyond their statistical spread
    (:data:`ALARM_SIGMAS`), confirm what the finite-key bound found."""
    pe = point_estimates(p.protocol, p.intensities, p.probabilities, counts, errors,
                         test_counts, test_errors)
    res.finite_key["point_estimates"] = pe
    for basis in ("key", "test"):
        s1, sigma = pe[f"s1_{basis}"], pe[f"s1_{basis}_sigma"]
        if s1 + ALARM_SIGMAS * sigma < 0:
            q = res.ec_errors / res.key_bits if res.key_bits else 0.0
            return (f"decoy analysis: the single-photon yield collapses (point estimate "
                    f"s1 = {s1:.4g} +- {sigma:.2g} in the {basis} basis) while the QBER "
                    f"stays at {100 * q:.2f} %: the decoy pulses are not detected as the "
                    "channel loss predicts (a photon-number-splitting attack)")
    if pe["phase_error_low"] >= p.phase_error_tolerance:
        return (f"decoy analysis: the single-photon phase error is at least "
                f"{100 * pe['phase_error_low']:.2f} % ({ALARM_SIGMAS:g} sigma), above the "
                f"tolerance {100 * p.phase_error_tolerance:.2f} %")
    return None


def distill_block(alice: AliceDistiller, bob: BobDistiller, a: KeyBlock,
                  b: KeyBlock) -> BlockResult:
    """Run the exchange for one block with both roles in this process.

    The two sides take turns on the channel exactly as two processes would;
    each uses only its own block and the messages. The result carries both
    secret keys (:attr:`BlockResult.keys`) when the block gave any.
    """
    gen = alice.steps(a)
    next(gen)

    def peer():
        next(gen, None)

    res, b_key = bob.run(b, peer)
    for _ in gen:  # let Alice finish
        pass
    if b_key is not None:
        if alice.key is None or not np.array_equal(alice.key, b_key):
            raise ProtocolError(f"block {b.block}: Alice and Bob disagree on the secret key")
        res.keys = (alice.key, b_key)
    return res


def key_digest(block: int, hash_key: bytes, tag: bytes, out_bits: int, seed: bytes) -> str:
    """A check value of a block's secret key from public data only.

    The verification hash function and tag, the secret length and the Toeplitz
    seed were all sent over the classical channel: two keys with equal digests
    come from corrected keys that passed verification under the same hash and
    were hashed with the same seed, so they are equal (up to ``eps_cor``).
    Comparing digests (key-store reconciliation) discloses nothing new.
    """
    h = hashlib.sha256(b"qkdctl key digest v1")
    for part in (block.to_bytes(8, "little"), hash_key, tag, out_bits.to_bytes(8, "little"),
                 seed):
        h.update(len(part).to_bytes(4, "little") + part)
    return h.hexdigest()[:32]


#: Cascade's bursts for the last block of a session (levels, parities per round as a
#: fraction of the expected errors): nothing overlaps its round trips, so they are all
#: paid at the end of the session; deeper bursts take 70-80 rounds instead of 100-140
#: for a 2^22-bit block at 1 % QBER, at f = 1.10 instead of 1.05 on that block only
LAST_BLOCK_BURST = (6, 1 / 16)


def _schedule(n: int, qber: float, last: bool) -> cascade.CascadeSchedule:
    schedule = cascade.choose_schedule(n, qber)
    if not last:
        return schedule
    levels, width = LAST_BLOCK_BURST
    return dataclasses.replace(schedule, burst_levels=levels,
                               burst_width=max(schedule.burst_width, int(n * qber * width)))


def _seed_bits(raw: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(raw, np.uint8), count=n, bitorder="little")


def _counts(intensity: np.ndarray, nint: int) -> np.ndarray:
    # count_nonzero of a comparison is several times faster than bincount on uint8
    return np.array([np.count_nonzero(intensity == k) for k in range(nint)], np.int64)


def _verification_leak(p: DistillParams, tag_bits: int) -> int:
    return max(0, math.ceil(tag_bits - math.log2(2.0 / p.eps_cor)))


def _finite_key(p: DistillParams, counts, test_counts, errors, test_errors,
                leaked_bits: int, n_key: int):
    stats = finite_key.DecoyStatistics(
        intensities=tuple(p.intensities), probabilities=tuple(p.probabilities),
        n_key=tuple(int(x) for x in counts), m_key=tuple(int(x) for x in errors),
        n_test=tuple(int(x) for x in test_counts), m_test=tuple(int(x) for x in test_errors))
    # the tag beyond what the bound's log2(2/eps_cor) term covers, and any digest shown
    tag_bits = 64 * verify.instances_for(n_key, p.eps_cor)
    leak = int(leaked_bits) + _verification_leak(p, tag_bits) + int(p.extra_leak_bits)
    return finite_key.key_length(p.protocol, stats, leak_ec_bits=leak, eps_sec=p.eps_sec,
                                 eps_cor=p.eps_cor,
                                 phase_error_tolerance=p.phase_error_tolerance)


def _sample_size(p: DistillParams, n: int) -> int:
    """Key-basis bits disclosed to estimate the QBER of a block of ``n`` bits."""
    return min(n - 1, max(1, round(p.qber_sample_fraction * n)))


def _random_sample(n: int, k: int, seed: bytes) -> np.ndarray:
    """k distinct positions out of n, uniformly, ascending, drawn from a 32-byte seed
    (Alice sends the seed, not the positions: both sides draw the same sample)."""
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
