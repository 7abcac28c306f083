"""Throughput of privacy amplification (Toeplitz hashing) and of the verification hash.

For n input bits and m = n/2 (also n/4 and 3n/4) output bits, times every
carry-less backend available here and the float64 FFT backend on the same
input, one core, best of several repetitions after a warm-up, so the ratios
are meaningful on a shared, noisy machine. Input rates are input bits per
second. Prints on its last lines:

  fft_Mbit_per_s=          the float64 FFT backend at m = n/2
  speedup_vs_fft=          default backend over the FFT backend at m = n/2
  verify_Mbit_per_s=       GF(2^64) polynomial tag of the n-bit key (eps_cor = 1e-15)
  pa_Mbit_per_s=           the default backend at m = n/2

Usage: python benchmarks/privacy.py [--log2n 22] [--repeat 5] [--no-fft]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from qkdctl.postprocess import privacy, verify  # noqa: E402


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(n: int = 1 << 22, fractions: tuple[float, ...] = (0.5, 0.25, 0.75),
            repeat: int = 5, fft: bool = True, seed: int = 1) -> dict:
    """Time the Toeplitz backends and the verification tag; rates in Mbit/s of input.

    Returns ``{"n", "backend", "backends", "pa": {fraction: {backend: Mbit/s}},
    "pa_seconds": {...}, "fft_Mbit_per_s", "speedup_vs_fft", "verify_Mbit_per_s",
    "verify_tag_bits", "pa_Mbit_per_s"}``; ``pa_Mbit_per_s`` is the default
    backend at the first fraction. Every result is checked to agree between
    backends.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    fast = [b for b in privacy.available_backends() if b != "fft"]
    out: dict = {"n": n, "backend": privacy.backend(), "backends": fast + ["fft"],
                 "pa": {}, "pa_seconds": {}}
    for frac in fractions:
        m = int(n * frac)
        s = rng.integers(0, 2, privacy.seed_length(n, m), dtype=np.uint8)
        rates: dict[str, float] = {}
        secs: dict[str, float] = {}
        ref = None
        names = fast + (["fft"] if fft and frac == fractions[0] else [])
        for name in names:
            y = privacy.toeplitz_hash(x, m, s, method=name)          # warm-up (and compile)
            if ref is None:
                ref = y
            elif not np.array_equal(y, ref):
                raise AssertionError(f"backend {name} disagrees at n={n}, m={m}")
            r = min(repeat, 3) if name == "fft" else repeat
            t = best_of(r, lambda name=name, s=s, m=m: privacy.toeplitz_hash(x, m, s,
                                                                             method=name))
            secs[name] = t
            rates[name] = n / t / 1e6
        out["pa"][frac] = rates
        out["pa_seconds"][frac] = secs
    first = out["pa"][fractions[0]]
    default = out["backend"]
    out["pa_Mbit_per_s"] = first.get(default, float("nan"))
    if "fft" in first:
        out["fft_Mbit_per_s"] = first["fft"]
        out["speedup_vs_fft"] = out["pa_Mbit_per_s"] / first["fft"]
    key = verify.draw_hash_key(n, 1e-15, rng.bytes)
    verify.tag(x, key)
    out["verify_tag_bits"] = 8 * len(key)
    out["verify_Mbit_per_s"] = n / best_of(repeat, lambda: verify.tag(x, key)) / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2n", type=int, default=22)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-fft", action="store_true", help="skip the (slow) FFT baseline")
    args = ap.parse_args()
    r = measure(1 << args.log2n, repeat=args.repeat, fft=not args.no_fft)
    n = r["n"]
    print(f"n = 2^{args.log2n} = {n} input bits; backends here: {', '.join(r['backends'])}; "
          f"default: {r['backend']}")
    for frac, rates in r["pa"].items():
        m = int(n * frac)
        cells = "  ".join(f"{name} {rate:7.1f} Mbit/s ({r['pa_seconds'][frac][name] * 1e3:.1f} ms)"
                          for name, rate in rates.items())
        print(f"m = {frac:g} n = {m}: {cells}")
    print(f"verification tag: {r['verify_tag_bits']} bits for eps_cor = 1e-15")
    if "fft_Mbit_per_s" in r:
        print(f"fft_Mbit_per_s={r['fft_Mbit_per_s']:.2f}")
        print(f"speedup_vs_fft={r['speedup_vs_fft']:.1f}")
    print(f"verify_Mbit_per_s={r['verify_Mbit_per_s']:.0f}")
    print(f"pa_Mbit_per_s={r['pa_Mbit_per_s']:.1f}")


if __name__ == "__main__":
    main()
