"""Efficiency, rounds, frame error rate and throughput of Cascade reconciliation.

Keys are simulated: Alice's bits uniform, Bob's with independent errors of
probability QBER (a binary symmetric channel); Cascade is given the true QBER.
Efficiency is f = leaked bits / (n h(QBER)) with the nominal QBER (1 is the
Shannon limit), averaged over the blocks, with its standard error. The frame
error rate is the fraction of blocks whose corrected key still differs from
Alice's (left to the verification hash). Throughput is input key bits per
second of the whole exchange (both roles in one process, one core, messages
passed in memory, after a warm-up run): every block is run ``--repeat`` times
(same keys and seed, so the same exchange) and the best time is kept, since
the machine is shared and noisy.

Prints a table per block size (``--sizes``, default: the default block size
only; ``--all-sizes`` adds 2**17 .. 2**20), then on its last lines:
  cascade_efficiency_qber_0.01=   mean f at QBER 1 %, default block size
  cascade_efficiency_qber_0.02=   mean f at QBER 2 %
  cascade_efficiency_qber_0.05=   mean f at QBER 5 %
  cascade_Mbit_per_s=             throughput at the default block size, all three QBERs
  frame_error_rate=               residual frame error rate over those blocks

Usage: python benchmarks/cascade.py [--quick] [--blocks N] [--bits N] [--variant V]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qkdctl.postprocess.cascade import (
    VARIANTS,
    CascadeAlice,
    CascadeBob,
    choose_schedule,
    efficiency,
)

DEFAULT_BITS = 1 << 20
QBERS = (0.01, 0.02, 0.05)


def _exchange(alice_key: np.ndarray, bob_key: np.ndarray, qber: float, seed: int,
              variant: str, passes: int | None):
    sched = choose_schedule(alice_key.size, qber, variant, passes)
    alice = CascadeAlice(alice_key)
    bob = CascadeBob(bob_key, qber, seed, sched)
    msg = bob.start()
    while msg is not None:
        msg = bob.next_request(alice.handle(msg))
    return bob.result(), alice.leaked_bits


def measure(n: int = DEFAULT_BITS, qbers: tuple[float, ...] = QBERS, blocks: int = 20,
            repeat: int = 3, variant: str = "optimized", passes: int | None = None,
            seed: int = 2024) -> dict:
    """Run ``blocks`` blocks of ``n`` bits at each QBER; figures per QBER and overall.

    Returns ``{"n", "variant", "per_qber": {qber: {...}}, "Mbit_per_s",
    "frame_error_rate"}``; per QBER: ``efficiency`` (mean f), ``efficiency_sem``,
    ``rounds`` (mean), ``leaked_bits`` (mean), ``frame_errors``, ``blocks``,
    ``Mbit_per_s`` and ``block_sizes`` (the schedule).
    """
    rng = np.random.default_rng(seed)
    warm = rng.integers(0, 2, min(n, 1 << 16), dtype=np.uint8)
    _exchange(warm, warm ^ (rng.random(warm.size) < qbers[0]).astype(np.uint8), qbers[0], 1,
              variant, passes)
    per: dict[float, dict] = {}
    total_bits = 0
    total_time = 0.0
    total_fail = 0
    total_blocks = 0
    for qi, q in enumerate(qbers):
        fs, rounds, leaks = [], [], []
        fails = 0
        t_sum = 0.0
        for i in range(blocks):
            a = rng.integers(0, 2, n, dtype=np.uint8)
            b = a ^ (rng.random(n) < q).astype(np.uint8)
            pseed = (seed << 20) + qi * blocks + i
            best = float("inf")
            for _ in range(max(1, repeat)):
                t0 = time.perf_counter()
                res, alice_leak = _exchange(a, b, q, pseed, variant, passes)
                best = min(best, time.perf_counter() - t0)
            assert res.leaked_bits == alice_leak
            t_sum += best
            fs.append(efficiency(res.leaked_bits, n, q))
            rounds.append(res.rounds)
            leaks.append(res.leaked_bits)
            fails += int(not np.array_equal(res.corrected, a))
        f = np.asarray(fs)
        per[q] = {
            "efficiency": float(f.mean()),
            "efficiency_sem": float(f.std(ddof=1) / np.sqrt(f.size)) if f.size > 1 else 0.0,
            "rounds": float(np.mean(rounds)),
            "leaked_bits": float(np.mean(leaks)),
            "frame_errors": fails,
            "blocks": blocks,
            "Mbit_per_s": n * blocks / t_sum / 1e6,
            "block_sizes": choose_schedule(n, q, variant, passes).block_sizes,
        }
        total_bits += n * blocks
        total_time += t_sum
        total_fail += fails
        total_blocks += blocks
    return {"n": n, "variant": variant, "per_qber": per,
            "Mbit_per_s": total_bits / total_time / 1e6,
            "frame_error_rate": total_fail / total_blocks}


def _print_table(m: dict) -> None:
    print(f"n = {m['n']} bits, variant {m['variant']}")
    print(f"  {'QBER':>6} {'f':>7} {'+-':>6} {'rounds':>7} {'FER':>9} {'Mbit/s':>7}  "
          "block sizes")
    for q, r in m["per_qber"].items():
        sizes = r["block_sizes"]
        shown = ", ".join(str(k) for k in sizes[:3])
        print(f"  {q:6.3f} {r['efficiency']:7.4f} {r['efficiency_sem']:6.4f} "
              f"{r['rounds']:7.1f} {r['frame_errors']:>4}/{r['blocks']:<4} "
              f"{r['Mbit_per_s']:7.2f}  {shown}, ... ({len(sizes)} passes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="2**17-bit blocks, 20 of them, one timing each")
    ap.add_argument("--bits", type=int, default=None, help="default block size in bits")
    ap.add_argument("--blocks", type=int, default=20, help="blocks per QBER (>= 20)")
    ap.add_argument("--repeat", type=int, default=3, help="timings per block, best kept")
    ap.add_argument("--variant", choices=VARIANTS, default="optimized")
    ap.add_argument("--passes", type=int, default=None)
    ap.add_argument("--all-sizes", action="store_true",
                    help="also tables for 2**17, 2**18 and 2**19 bits")
    args = ap.parse_args()
    n = args.bits or ((1 << 17) if args.quick else DEFAULT_BITS)
    repeat = 1 if args.quick else args.repeat
    if args.all_sizes:
        for k in (17, 18, 19):
            if (1 << k) != n:
                _print_table(measure(1 << k, blocks=args.blocks, repeat=1,
                                     variant=args.variant, passes=args.passes))
    m = measure(n, blocks=args.blocks, repeat=repeat, variant=args.variant,
                passes=args.passes)
    _print_table(m)
    for q in QBERS:
        print(f"cascade_efficiency_qber_{q}={m['per_qber'][q]['efficiency']:.4f}")
    print(f"cascade_Mbit_per_s={m['Mbit_per_s']:.2f}")
    print(f"frame_error_rate={m['frame_error_rate']:.4f}")


if __name__ == "__main__":
    main()
