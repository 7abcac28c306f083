"""Post-processing benchmark: Cascade efficiency and speed, verification, privacy amplification.

Error correction: for each QBER in 1 %, 2 %, 5 %, ``--blocks`` (>= 20) blocks of
``--bits`` (default 2**20 >= 1e5) bits; Alice's bits uniform, Bob's with
independent errors at that QBER; Cascade is given the QBER estimate of a
disclosed sample, as in a session (``sample_fraction`` of the block, 0.5 %).
Efficiency f = leaked / (n h(QBER)) with the errors actually drawn, mean over
the blocks. Throughput: input bits per second of the whole exchange (both
roles in one process, one core, best of ``--repeat`` runs of each block).

Verification: every corrected block is hashed on both sides (eps_cor = 1e-15);
``frame_error_rate`` is the fraction of blocks that pass verification with
keys that still differ (the residual the issue bounds at 0); the blocks the
hash caught (and that are discarded) are reported on their own line.

Privacy amplification: Toeplitz hashing of n = 2**22 bits to n/2, one core.

Last lines:
  cascade_efficiency_qber_0.01=  cascade_efficiency_qber_0.02=
  cascade_efficiency_qber_0.05=  cascade_Mbit_per_s=  pa_Mbit_per_s=  frame_error_rate=

Usage: python benchmarks/postprocess.py [--quick] [--bits N] [--blocks N] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from qkdctl.postprocess import privacy, verify  # noqa: E402
from qkdctl.postprocess.cascade import CascadeAlice, CascadeBob  # noqa: E402
from qkdctl.postprocess.finite_key import binary_entropy  # noqa: E402

QBERS = (0.01, 0.02, 0.05)


def _exchange(a: np.ndarray, b: np.ndarray, q_est: float, seed: int):
    alice = CascadeAlice(a)
    bob = CascadeBob(b, q_est, seed)
    msg = bob.start()
    while msg is not None:
        msg = bob.next_request(alice.handle(msg))
    res = bob.result()
    assert res.leaked_bits == alice.leaked_bits
    return res


def measure_cascade(n: int, blocks: int, repeat: int, sample_fraction: float = 0.005,
                    seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    warm = rng.integers(0, 2, 1 << 16, dtype=np.uint8)
    _exchange(warm, warm ^ (rng.random(warm.size) < 0.02).astype(np.uint8), 0.02, 1)
    per = {}
    bits = secs = 0.0
    passed_bad = caught = frames = 0
    for qi, q in enumerate(QBERS):
        fs = []
        t_sum = 0.0
        for i in range(blocks):
            a = rng.integers(0, 2, n, dtype=np.uint8)
            b = a ^ (rng.random(n) < q).astype(np.uint8)
            k = max(1, round(sample_fraction * n))
            idx = rng.choice(n, k, replace=False)
            q_est = min(max((np.count_nonzero(a[idx] != b[idx]) + 1) / (k + 2), 1e-4), 0.25)
            best = float("inf")
            for _ in range(max(1, repeat)):
                t0 = time.perf_counter()
                res = _exchange(a, b, q_est, (seed << 24) + qi * 1000 + i)
                best = min(best, time.perf_counter() - t0)
            t_sum += best
            errors = int(np.count_nonzero(a != b))
            fs.append(res.leaked_bits / (n * float(binary_entropy(errors / n))))
            hkey = verify.draw_hash_key(n, 1e-15, rng.bytes)
            same_tag = verify.tag(a, hkey) == verify.tag(res.corrected, hkey)
            differ = not np.array_equal(a, res.corrected)
            passed_bad += int(same_tag and differ)
            caught += int(differ and not same_tag)
            frames += 1
        f = np.asarray(fs)
        per[q] = {"efficiency": float(f.mean()),
                  "efficiency_sem": float(f.std(ddof=1) / np.sqrt(f.size)),
                  "Mbit_per_s": n * blocks / t_sum / 1e6}
        bits += n * blocks
        secs += t_sum
    return {"n": n, "blocks": blocks, "per_qber": per, "Mbit_per_s": bits / secs / 1e6,
            "frame_error_rate": passed_bad / frames, "caught_by_verification": caught,
            "frames": frames}


def measure_pa(n: int = 1 << 22, repeat: int = 5, seed: int = 1) -> float:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    m = n // 2
    s = rng.integers(0, 2, privacy.seed_length(n, m), dtype=np.uint8)
    privacy.toeplitz_hash(x, m, s)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        privacy.toeplitz_hash(x, m, s)
        best = min(best, time.perf_counter() - t0)
    return n / best / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2**17-bit blocks, one timing each")
    ap.add_argument("--bits", type=int, default=None, help="Cascade block size (default 2**20)")
    ap.add_argument("--blocks", type=int, default=20, help="blocks per QBER (>= 20)")
    ap.add_argument("--repeat", type=int, default=3, help="timings per block, best kept")
    args = ap.parse_args()
    if args.blocks < 20:
        sys.exit("--blocks: at least 20")
    n = args.bits or ((1 << 17) if args.quick else (1 << 20))
    c = measure_cascade(n, args.blocks, 1 if args.quick else args.repeat)
    pa = measure_pa(repeat=2 if args.quick else 5)
    print(f"Cascade, {c['blocks']} blocks of {n} bits per QBER, QBER estimated from a 0.5 % "
          f"sample; PA backend {privacy.backend()}")
    for q, r in c["per_qber"].items():
        print(f"  QBER {q:.2f}: f = {r['efficiency']:.4f} +- {r['efficiency_sem']:.4f}, "
              f"{r['Mbit_per_s']:.2f} Mbit/s")
    print(f"  blocks with residual errors caught by verification: "
          f"{c['caught_by_verification']} of {c['frames']}")
    for q in QBERS:
        print(f"cascade_efficiency_qber_{q}={c['per_qber'][q]['efficiency']:.4f}")
    print(f"cascade_Mbit_per_s={c['Mbit_per_s']:.2f}")
    print(f"pa_Mbit_per_s={pa:.2f}")
    print(f"frame_error_rate={c['frame_error_rate']:.4f}")


if __name__ == "__main__":
    main()
