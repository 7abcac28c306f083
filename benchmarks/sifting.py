"""Throughput of the sifting core and of the simulator, on the built-in simulated bench.

Prints on its last lines:
  bob_side_only_Mtags_per_s=    the sifting core without Alice's lookup and statistics
  sift_Mtags_per_s=             numba sifting core, end to end (assignment, Alice's
                                lookup, sifting statistics), one core
  numpy_reference_Mtags_per_s=  the same sifting vectorized with numpy, same tags
  copy_bound_Mtags_per_s=       numpy copying the same timestamp and channel arrays
  sim_speed_vs_realtime=        bench seconds simulated per wall-clock second
  sim_Mtags_per_s=              tags generated per wall-clock second
Every figure is the best of several repetitions in this same run, so that the
ratios between them are meaningful on a shared, noisy machine.

Usage: python benchmarks/sifting.py [--bench-seconds S] [--repeat N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qkdctl.config import load_bench
from qkdctl.sequence import AliceSequence
from qkdctl.sifting import Sifter, SiftParams, SiftStats
from qkdctl.sifting_reference import assign_numpy
from qkdctl.sim.engine import TagGenerator
from qkdctl.sim.table import OpticalTable


def best_of(n, fn):
    best = float("inf")
    out = None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-seconds", type=float, default=1.0,
                    help="bench time to simulate (1 s gives about 1.15e7 tags)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--block-tags", type=int, default=1 << 20)
    args = ap.parse_args()

    cfg = load_bench()
    seed = 1
    n_pulses = int(round(args.bench_seconds * cfg.source.rep_rate_hz))

    def simulate():
        gen = TagGenerator(OpticalTable.from_config(cfg, seed), seed)
        parts = [gen.generate(min(10_000_000, n_pulses - i))
                 for i in range(0, n_pulses, 10_000_000)]
        parts.append(gen.finish())
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    TagGenerator(OpticalTable.from_config(cfg, seed), seed).generate(100_000)  # compile
    sim_s, (ts, ch) = best_of(args.repeat, simulate)
    ntags = ts.shape[0]
    print(f"tags: {ntags} from {n_pulses} pulses ({args.bench_seconds:g} s of bench time)")

    params = SiftParams.from_config(cfg, seed)
    seq = AliceSequence.from_config(cfg.source, seed)
    bs = args.block_tags

    def sift():
        s = Sifter(params, seq)
        nkey = 0
        for i in range(0, ntags, bs):
            nkey += s.process(ts[i:i + bs], ch[i:i + bs]).key_index().shape[0]
        nkey += s.finish().key_index().shape[0]
        return s.stats, nkey

    def numpy_ref():
        det = assign_numpy(ts, ch, params)
        codes = seq.codes(det.pulse)  # Alice's lookup is the same counter-based hash
        a_basis = (codes >> 1) & 1
        k = (codes >> 2).astype(np.int64)
        b = det.basis.astype(np.int64)
        st = SiftStats(params.n_intensities)
        st.detected += np.bincount(k * 2 + b, minlength=st.detected.size).reshape(-1, 2)
        m = det.basis == a_basis
        st.sifted += np.bincount(k[m] * 2 + b[m], minlength=st.sifted.size).reshape(-1, 2)
        err = (codes[m] & 1) != det.bit[m]
        st.errors += np.bincount((k[m] * 2 + b[m])[err],
                                 minlength=st.errors.size).reshape(-1, 2)
        np.flatnonzero(m & (det.basis == 0))  # the sifted key's rows, as the core returns
        return st

    def bob_only():
        s = Sifter(params)
        for i in range(0, ntags, bs):
            s.process(ts[i:i + bs], ch[i:i + bs])
        s.finish()

    sift()  # compile
    bob_only()
    sift_s, (stats, nkey) = best_of(args.repeat, sift)
    bob_s, _ = best_of(args.repeat, bob_only)
    ref_s, ref_stats = best_of(args.repeat, numpy_ref)
    assert np.array_equal(ref_stats.sifted, stats.sifted), "numpy reference disagrees"
    assert np.array_equal(ref_stats.errors, stats.errors), "numpy reference disagrees"

    def copy():
        return ts.copy(), ch.copy()

    copy_s, _ = best_of(max(5, args.repeat), copy)
    print(f"sifted key bits (Z): {nkey}")
    print(f"bob_side_only_Mtags_per_s={ntags / bob_s / 1e6:.1f}")
    print(f"sift_Mtags_per_s={ntags / sift_s / 1e6:.1f}")
    print(f"numpy_reference_Mtags_per_s={ntags / ref_s / 1e6:.1f}")
    print(f"copy_bound_Mtags_per_s={ntags / copy_s / 1e6:.1f}")
    print(f"sift_vs_numpy_ratio={ref_s / sift_s:.2f}")
    print(f"sift_vs_copy_bound_ratio={copy_s / sift_s:.3f}")
    print(f"sim_speed_vs_realtime={args.bench_seconds / sim_s:.2f}")
    print(f"sim_Mtags_per_s={ntags / sim_s / 1e6:.1f}")


if __name__ == "__main__":
    main()
