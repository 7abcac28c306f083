"""The summary each host prints: what its side of the link can know.

Neither host sees both sifted keys, so the QBER of a two-host session is the
one the distillation measured: in the key basis, the errors Cascade
corrected over the bits it reconciled; in the test basis, the errors Alice
counted on the test bits Bob disclosed. Each is exact for the bits it
covers (the sample Alice disclosed for the estimate is not among them), with
the same binomial standard error as the one-process summary.

Bob knows his detections, the tagger's clock, what Alice's replies disclose
(which pulses to keep) and the per-class counts she sends for each distilled
block; Alice knows her pulses, and what Bob's
announcements disclose (which pulses he detected and in which basis). Both
know the distillation's figures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..sifting import SiftStats, stats_kernel
from ..summary import BASIS_NAMES, _pct, _si, format_summary, pulses_by_intensity

__all__ = ["add_public_counts", "alice_summary", "format_side_summary", "reconciled_qber"]


def add_public_counts(stats: SiftStats, bob_basis: np.ndarray, intensity: np.ndarray,
                      keep: np.ndarray) -> int:
    """Count detections and sifted bits per (intensity, basis) from public data only
    (errors stay 0: neither side knows them here). Returns the key-basis bits added."""
    bob_basis = np.ascontiguousarray(bob_basis, np.uint8)
    alice_basis = np.where(keep, bob_basis, 1 - bob_basis).astype(np.uint8)
    codes = ((np.asarray(intensity, np.uint8) << 2) | (alice_basis << 1)).astype(np.uint8)
    stats_kernel(bob_basis, np.zeros_like(bob_basis), codes, stats.detected, stats.sifted,
                 stats.errors)
    return int(np.count_nonzero(keep & (bob_basis == 0)))


def reconciled_qber(dist: dict[str, Any]) -> dict[str, Any]:
    """QBER per basis from the distilled blocks' figures (see the module doc)."""
    n = {"Z": 0, "X": 0}
    e = {"Z": 0, "X": 0}
    for b in dist["blocks"]:
        n["Z"] += b["key_bits"]
        e["Z"] += b["ec_errors"] if b["key_bits"] else 0
        if b["qber_test"] is not None:
            n["X"] += b["test_bits"]
            e["X"] += round(b["qber_test"] * b["test_bits"])
    qber, std = {}, {}
    for bn in BASIS_NAMES:
        if n[bn]:
            q = e[bn] / n[bn]
            qber[bn], std[bn] = q, math.sqrt(q * (1 - q) / n[bn])
        else:
            qber[bn] = std[bn] = None
    return {"qber": qber, "qber_std": std, "errors": e, "qber_bits": n,
            "qber_source": "distillation (Cascade's corrections, Alice's test-bit count)"}


def apply_distillation(s: dict[str, Any], dist: dict[str, Any], keystore) -> dict[str, Any]:
    """Put the distillation figures and the reconciled QBER into a side's summary."""
    s["distillation"] = dist
    for k in ("secret_bits", "secret_key_rate_bps", "ec_efficiency", "ec_leaked_bits",
              "phase_error_bound", "tamper_alarm", "aborted", "abort_reason"):
        s[k] = dist[k]
    s.update(reconciled_qber(dist))
    per_class = _class_counts(dist, len(s["counts_by_intensity"]))
    for k, d in enumerate(s["counts_by_intensity"].values()):
        n = {"Z": per_class["key"][k], "X": per_class["test"][k]}
        e = {"Z": per_class["key_errors"][k], "X": per_class["test_errors"][k]}
        d["errors"] = e
        d["qber"] = {b: e[b] / n[b] if n[b] else None for b in n}
        d["distilled"] = n
        if s.get("role") == "bob":
            # Bob knows the classes only through the distillation's counts
            d["sifted"] = n
    if keystore is not None:
        s["keystore"] = str(keystore.path)
    return s


def _class_counts(dist: dict[str, Any], nint: int) -> dict[str, list[int]]:
    """Bits and errors per intensity class, summed over the distilled blocks."""
    out = {k: [0] * nint for k in ("key", "key_errors", "test", "test_errors")}
    for b in dist["blocks"]:
        for k, v in (b.get("intensity_counts") or {}).items():
            out[k] = [x + int(y) for x, y in zip(out[k], v, strict=True)]
    return out


def alice_summary(cfg, stats: SiftStats, *, seed, sequence, pulses_sent: int,
                  duration_s: float, wall_s: float, interrupted: bool, sifted_bits: int,
                  source: str) -> dict[str, Any]:
    """Alice's side: her pulses, Bob's announcements as she saw them."""
    n_k, exact = pulses_by_intensity(sequence, pulses_sent, cfg.source.intensity_probabilities)
    by_int = {}
    for k, name in enumerate(cfg.source.intensity_names):
        det_k = int(stats.detected[k].sum())
        by_int[name] = {
            "mean_photon_number": cfg.source.mean_photon_numbers[k],
            "probability": cfg.source.intensity_probabilities[k],
            "pulses_sent": n_k[k], "pulses_sent_exact": exact, "detections": det_k,
            "gain": det_k / n_k[k] if n_k[k] else None,
            "sifted": {bn: int(stats.sifted[k, b]) for b, bn in enumerate(BASIS_NAMES)},
        }
    dur = duration_s if duration_s > 0 else float("nan")
    detected = int(stats.detected.sum())
    return {
        "bench": cfg.name, "config": cfg.path, "source": source, "role": "alice",
        "seed": seed, "interrupted": interrupted, "duration_s": duration_s, "wall_s": wall_s,
        "pulses_sent": int(pulses_sent), "detected_pulses": detected,
        "sifted_bits": sifted_bits,
        "sifted_bits_by_basis": {bn: int(stats.sifted[:, b].sum())
                                 for b, bn in enumerate(BASIS_NAMES)},
        "counts_by_intensity": by_int,
        "detection_rate_hz": detected / dur,
        "sifted_key_rate_bps": sifted_bits / dur,
    }


def format_side_summary(s: dict[str, Any]) -> str:
    """Text of a host's summary (Bob's has the sifting core's figures, Alice's not)."""
    if s.get("role") == "bob":
        text = format_summary(s).replace(" (", " (Bob's host, ", 1)
        text = text.replace("  QBER Z ", "  QBER Z*", 1)
        return text.replace("  QBER X ", "  QBER X*", 1) + (
            "\n  * QBER from the distillation: " + s["qber_source"]
            + "\n  Bob does not learn the intensity classes: his counts per class are the "
              "distilled bits, as Alice reports them")
    lines = [f"{s['bench']} (Alice's host, {s['source']}, seed {s['seed']})"
             + ("  -- interrupted, summary of what ran" if s["interrupted"] else "")]
    lines.append(f"  bench time        {s['duration_s']:.6g} s   (wall {s['wall_s']:.2f} s)")
    lines.append(f"  pulses sent       {s['pulses_sent']:,}")
    lines.append(f"  detected (Bob)    {s['detected_pulses']:,}   "
                 f"({_si(s['detection_rate_hz'], 'Hz')})")
    sb = s["sifted_bits_by_basis"]
    lines.append(f"  sifted key (Z)    {s['sifted_bits']:,} bits   "
                 f"({_si(s['sifted_key_rate_bps'], 'bit/s')}); test basis X {sb['X']:,}")
    for b in ("Z", "X"):
        lines.append(f"  QBER {b}*           {_pct(s['qber'][b], s['qber_std'][b])}   "
                     f"({s['errors'][b]:,} errors in {s['qber_bits'][b]:,})")
    lines.append("  by intensity      mu        pulses sent      detections   gain        "
                 "sifted Z     sifted X")
    for name, d in s["counts_by_intensity"].items():
        gain = f"{d['gain']:.4e}" if d["gain"] is not None else "n/a"
        lines.append(f"    {name:<8} {d['mean_photon_number']:<9.4g} {d['pulses_sent']:>15,.0f}  "
                     f"{d['detections']:>12,}  {gain:>10}  {d['sifted']['Z']:>11,}  "
                     f"{d['sifted']['X']:>11,}")
    from ..summary import _format_distillation

    if "distillation" in s:
        lines.extend(_format_distillation(s))
    lines.append("  * QBER from the distillation: " + s["qber_source"])
    return "\n".join(lines)
