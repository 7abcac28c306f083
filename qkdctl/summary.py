"""The summary of a session: what a physicist checks after a run.

:class:`RunTally` accumulates, block by block, what both roles learned
(detections, Alice's codes of the detected pulses, the sifted key's hash);
:func:`build_summary` turns it and the sifting core's counters into one
JSON-ready dict, and :func:`format_summary` into text.

Statistics and their uncertainties:

- QBER per basis ``e = errors / sifted`` with the binomial standard error
  ``sqrt(e (1 - e) / n)``. In the simulated bench both sifted keys are in one
  process, so the QBER is counted exactly on the whole sifted key.
- Gain of intensity class k: ``Q_k = detections_k / N_k``. With a pattern
  sequence ``N_k`` is counted exactly; with a per-pulse stream it is the
  expected ``p_k N`` (its relative spread ``sqrt((1 - p_k) / (p_k N))`` is
  below 1e-4 for a second at 1 GHz, far below the Poisson error of the
  detections), and ``pulses_sent_exact`` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import BenchConfig
from .sequence import MODE_PATTERN, AliceSequence
from .sifting import Detections, Sifter, SiftStats, key_bits_kernel, stats_kernel

__all__ = ["RunTally", "build_summary", "format_raw_statistics", "format_summary"]

BASIS_NAMES = ("Z", "X")


@dataclass
class RunTally:
    """Running per-intensity statistics and, optionally, the sifted key's hash."""

    n_intensities: int
    stats: SiftStats = None
    #: hash of Bob's sifted key, when a digest was asked for (it discloses 256 bits,
    #: which privacy amplification then subtracts)
    key_hash: Any = None

    def __post_init__(self):
        if self.stats is None:
            self.stats = SiftStats(self.n_intensities)

    def add(self, det: Detections, alice_codes: np.ndarray, keep: np.ndarray) -> int:
        """Add one sifted block; returns the number of sifted key bits (Z) in it."""
        s = self.stats
        stats_kernel(det.basis, det.bit, alice_codes, s.detected, s.sifted, s.errors)
        key = np.empty(det.bit.shape[0] + 1, np.uint8)
        n = key_bits_kernel(det.basis, det.bit, keep.view(np.uint8), 0, key)
        if self.key_hash is not None:
            # one byte per bit, so that the hash does not depend on block boundaries
            self.key_hash.update(key[:n].tobytes())
        return n


def _qber(errors: int, n: int) -> tuple[float | None, float | None]:
    if n == 0:
        return None, None
    e = errors / n
    return e, math.sqrt(e * (1.0 - e) / n)


def pulses_by_intensity(seq: AliceSequence | None, n_pulses: int,
                        probs) -> tuple[list[float], bool]:
    """Pulses sent per intensity class: exact for a pattern, expected for a stream (and
    for Bob, who does not know Alice's sequence: ``seq`` None)."""
    if seq is None:
        return [float(p) * n_pulses for p in probs], False
    if seq.mode == MODE_PATTERN:
        pat = seq.pattern >> 2
        L = pat.shape[0]
        full, rest = divmod(n_pulses, L)
        k = len(probs)
        counts = full * np.bincount(pat, minlength=k) + np.bincount(pat[:rest], minlength=k)
        return [int(c) for c in counts[:k]], True
    return [float(p) * n_pulses for p in seq.effective_intensity_probabilities], False


def build_summary(cfg: BenchConfig, sifter: Sifter, tally: RunTally, *, seed: int | None,
                  sequence: AliceSequence | None, pulses_sent: int, duration_s: float,
                  wall_s: float, interrupted: bool, source: str = "simulated bench",
                  sifted_bits: int) -> dict[str, Any]:
    """The summary dict (what ``--json`` prints) of a run or a replay."""
    st = tally.stats
    c = sifter.counters
    names = {d.channel: (d.name or f"ch{d.channel}") for d in cfg.receiver.detectors}
    tags = sifter.tags_by_channel
    in_gate = sifter.in_gate_by_channel
    dur = duration_s if duration_s > 0 else float("nan")

    qber, qber_std, errors, sifted_by_basis = {}, {}, {}, {}
    for b, bn in enumerate(BASIS_NAMES):
        n = int(st.sifted[:, b].sum())
        e = int(st.errors[:, b].sum())
        qber[bn], qber_std[bn] = _qber(e, n)
        errors[bn] = e
        sifted_by_basis[bn] = n

    n_k, exact = pulses_by_intensity(sequence, pulses_sent, cfg.source.intensity_probabilities)
    by_int = {}
    for k, name in enumerate(cfg.source.intensity_names):
        det_k = int(st.detected[k].sum())
        q = {bn: _qber(int(st.errors[k, b]), int(st.sifted[k, b]))[0]
             for b, bn in enumerate(BASIS_NAMES)}
        by_int[name] = {
            "mean_photon_number": cfg.source.mean_photon_numbers[k],
            "probability": cfg.source.intensity_probabilities[k],
            "pulses_sent": n_k[k],
            "pulses_sent_exact": exact,
            "detections": det_k,
            "gain": det_k / n_k[k] if n_k[k] else None,
            "sifted": {bn: int(st.sifted[k, b]) for b, bn in enumerate(BASIS_NAMES)},
            "errors": {bn: int(st.errors[k, b]) for b, bn in enumerate(BASIS_NAMES)},
            "qber": q,
        }
    period = sifter.mean_period_ps
    return {
        "bench": cfg.name,
        "config": cfg.path,
        "source": source,
        "seed": seed,
        "interrupted": interrupted,
        "duration_s": duration_s,
        "wall_s": wall_s,
        "pulses_sent": int(pulses_sent),
        "sync_tags": c["syncs"],
        "sync_problems": {"rejected": c["syncs_rejected"], "gaps": c["sync_gaps"],
                          "missed": c["syncs_missed"]},
        "period_ps": period,
        "clock_drift_ppm": (period / cfg.period_ps - 1.0) * 1e6 if period else None,
        "period_ps_tracked": sifter.period_ps if c["syncs"] > 1 else None,
        "detections_by_channel": {names[ch]: tags.get(ch, 0) for ch in names},
        "detections_in_gate_by_channel": {names[ch]: in_gate.get(ch, 0) for ch in names},
        "count_rate_hz_by_channel": {names[ch]: tags.get(ch, 0) / dur for ch in names},
        "out_of_gate": c["out_of_gate"],
        "before_first_sync": c["before_first_sync"],
        "detected_pulses": c["detected_pulses"],
        "multi_clicks": {"same_basis": c["multi_same_basis"],
                         "cross_basis": c["multi_cross_basis"],
                         "discarded": c["multi_discarded"]},
        "sifted_bits": sifted_bits,
        "sifted_bits_by_basis": sifted_by_basis,
        "errors": errors,
        "qber": qber,
        "qber_std": qber_std,
        "counts_by_intensity": by_int,
        "detection_rate_hz": c["detected_pulses"] / dur,
        "sifted_key_rate_bps": sifted_bits / dur,
    } | ({"sifted_key_sha256": tally.key_hash.hexdigest()} if tally.key_hash is not None
         else {})


def _pct(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.3f} %" + (f" ± {100 * std:.3f}" if std is not None else "")


def _si(x: float, unit: str) -> str:
    if x is None or not math.isfinite(x):
        return f"n/a {unit}"
    for f, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= f:
            return f"{x / f:.3f} {p}{unit}"
    return f"{x:.3f} {unit}"


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable summary of :func:`build_summary`'s dict."""
    lines = []
    head = f"{s['bench']} ({s['source']}"
    head += f", seed {s['seed']})" if s.get("seed") is not None else ")"
    if s["interrupted"]:
        head += "  -- interrupted, summary of what ran"
    lines.append(head)
    lines.append(f"  bench time        {s['duration_s']:.6g} s   (wall {s['wall_s']:.2f} s)")
    lines.append(f"  pulses sent       {s['pulses_sent']:,}")
    drift = s["clock_drift_ppm"]
    per = s["period_ps"]
    lines.append(f"  sync tags         {s['sync_tags']:,}   period {per:.6f} ps, drift "
                 f"{drift:+.3f} ppm" if per else f"  sync tags         {s['sync_tags']:,}")
    sp = s["sync_problems"]
    if any(sp.values()):
        lines.append(f"  sync problems     {sp['rejected']} rejected, {sp['gaps']} gaps "
                     f"({sp['missed']} missing)")
    lines.append("  detections by channel (tags / in gate / rate)")
    for name, n in s["detections_by_channel"].items():
        lines.append(f"    {name:<6} {n:>14,} {s['detections_in_gate_by_channel'][name]:>14,}"
                     f"   {_si(s['count_rate_hz_by_channel'][name], 'Hz')}")
    mc = s["multi_clicks"]
    rate = _si(s["detection_rate_hz"], "Hz")
    lines.append(f"  detected pulses   {s['detected_pulses']:,}   ({rate})"
                 f"; out of gate {s['out_of_gate']:,}")
    lines.append(f"  multi-clicks      same basis {mc['same_basis']:,}, cross basis "
                 f"{mc['cross_basis']:,}, discarded {mc['discarded']:,}")
    sb = s["sifted_bits_by_basis"]
    lines.append(f"  sifted key (Z)    {s['sifted_bits']:,} bits   "
                 f"({_si(s['sifted_key_rate_bps'], 'bit/s')}); test basis X {sb['X']:,}")
    over = s.get("qber_bits", sb)   # a host of a two-host link: the bits distilled
    for b in ("Z", "X"):
        lines.append(f"  QBER {b}            {_pct(s['qber'][b], s['qber_std'][b])}   "
                     f"({s['errors'][b]:,} errors in {over[b]:,})")
    lines.append("  by intensity      mu        detections      gain        "
                 "sifted Z   QBER Z      sifted X   QBER X")
    for name, d in s["counts_by_intensity"].items():
        gain = f"{d['gain']:.4e}" if d["gain"] is not None else "n/a"
        det = f"{d['detections']:,}" if d["detections"] is not None else "n/a"
        lines.append(f"    {name:<8} {d['mean_photon_number']:<9.4g} {det:>12}  "
                     f"{gain:>10}  {d['sifted']['Z']:>11,}  {_pct(d['qber']['Z']):>9}  "
                     f"{d['sifted']['X']:>11,}  {_pct(d['qber']['X']):>9}")
    if "distillation" in s:
        lines.extend(_format_distillation(s))
    if s.get("sifted_key_sha256"):
        lines.append(f"  sifted key SHA-256 {s['sifted_key_sha256']}")
    return "\n".join(lines)


def _format_distillation(s: dict[str, Any]) -> list[str]:
    d = s["distillation"]
    lines = []
    if d["tamper_alarm"]:
        lines.append(f"  TAMPER ALARM      {d['abort_reason']}")
    f = f"{d['ec_efficiency']:.3f}" if d["ec_efficiency"] is not None else "n/a"
    lines.append(f"  secret key        {d['secret_bits']:,} bits   "
                 f"({_si(d['secret_key_rate_bps'], 'bit/s')}), {d['blocks_with_key']} of "
                 f"{d['blocks_distilled']} blocks ({d['protocol']}, eps_sec {d['eps_sec']:g}, "
                 f"eps_cor {d['eps_cor']:g})")
    lines.append(f"  error correction  {d['ec_leaked_bits']:,} bits disclosed, efficiency "
                 f"f = {f}; verification failed in {d['blocks_failed_verification']} blocks")
    if d["undistilled_bits"]:
        lines.append(f"  not distilled     {d['undistilled_bits']:,} sifted bits")
    lines.append("  blocks            sifted      QBER est.   QBER       f       "
                 "s1 (lower)   phase err.   secret")
    for b in d["blocks"]:
        fk = b.get("finite_key") or {}
        qe = b["qber_sample"]
        q = b["ec_errors"] / b["key_bits"] if b["key_bits"] else None
        eff = f"{b['ec_efficiency']:.3f}" if b["ec_efficiency"] is not None else "n/a"
        s1 = fk.get("s1_lower")
        ph = fk.get("phase_error_bound")
        lines.append(f"    {b['block']:<5} {b['sifted_bits']:>12,}  {_pct(qe):>10}  "
                     f"{_pct(q) if b['key_bits'] else 'n/a':>9}  {eff:>6}  "
                     f"{(f'{s1:.4g}' if s1 is not None else 'n/a'):>11}  "
                     f"{_pct(ph):>10}  {b['secret_bits']:>10,}"
                     + (f"   ({b['abort_reason']})" if not b["secret_bits"] and
                        b["abort_reason"] else ""))
    if d["key_ids"]:
        lines.append(f"  key store         {s.get('keystore')}: {len(d['key_ids'])} new keys, "
                     f"{d['key_ids'][0]} ...")
    return lines


def format_raw_statistics(s: dict[str, Any]) -> str:
    """Human-readable raw-tag statistics of a file without Alice's sequence."""
    lines = [f"{s['source']} ({s['format']}; no Alice sequence: raw-tag statistics)"]
    first, last = s["first_timestamp_ps"], s["last_timestamp_ps"]
    lines.append(f"  tags              {s['tags']:,}")
    if first is not None:
        lines.append(f"  first / last      {first:,} ps / {last:,} ps")
    lines.append(f"  duration          {s['duration_s']:.6g} s")
    lines.append("  tags by channel (count / rate)")
    for c, n in s["tags_by_channel"].items():
        lines.append(f"    {c:<6} {n:>14,}   {_si(s['count_rate_hz_by_channel'][c], 'Hz')}")
    return "\n".join(lines)
