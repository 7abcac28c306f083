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

Rounds are the round trips of the exchange (the start included): over a
network each costs one RTT, so the table gives them per block (mean and max)
beside the efficiency, and the waiting they mean at 10 ms RTT.

Every measurement is made for the schedule under test (``--variant``, default
``latency``) and for a schedule to compare with (``--compare``, default
``optimized``: the Martinez-Mateo block sizes with the classic round rules,
i.e. the behaviour before the round rules; ``none`` to skip), on the same keys
and seeds. Prints a table per block size and variant (``--all-sizes`` adds
2**17 .. 2**19 before the default size), a before/after table, then on its last
lines, for ``--variant`` at the default block size:
  cascade_efficiency_qber_0.01=   mean f at QBER 1 %
  cascade_efficiency_qber_0.02=   mean f at QBER 2 %
  cascade_efficiency_qber_0.05=   mean f at QBER 5 %
  cascade_rounds_qber_0.01=       mean rounds per block at QBER 1 % (also 0.02, 0.05)
  cascade_rounds_max_qber_0.01=   most rounds of a block at QBER 1 % (also 0.02, 0.05)
  cascade_Mbit_per_s=             throughput, all three QBERs
  frame_error_rate=               residual frame error rate over those blocks

Usage: python benchmarks/cascade.py [--quick] [--blocks N] [--bits N] [--variant V]
                                    [--compare V|none] [--overlap N] [--burst-levels N]
                                    [--burst-width N]
"""

from __future__ import annotations

import argparse
import dataclasses
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


def schedule(n: int, qber: float, variant: str, passes: int | None = None,
             rules: dict | None = None):
    """The schedule of ``variant``, with round rules overridden by ``rules``."""
    sched = choose_schedule(n, qber, variant, passes)
    return dataclasses.replace(sched, **rules) if rules else sched


def _exchange(alice_key: np.ndarray, bob_key: np.ndarray, qber: float, seed: int,
              variant: str, passes: int | None, rules: dict | None = None):
    sched = schedule(alice_key.size, qber, variant, passes, rules)
    alice = CascadeAlice(alice_key)
    bob = CascadeBob(bob_key, qber, seed, sched)
    msg = bob.start()
    while msg is not None:
        msg = bob.next_request(alice.handle(msg))
    return bob.result(), alice.leaked_bits


def measure(n: int = DEFAULT_BITS, qbers: tuple[float, ...] = QBERS, blocks: int = 20,
            repeat: int = 3, variant: str = "latency", passes: int | None = None,
            seed: int = 2024, rules: dict | None = None) -> dict:
    """Run ``blocks`` blocks of ``n`` bits at each QBER; figures per QBER and overall.

    Returns ``{"n", "variant", "per_qber": {qber: {...}}, "Mbit_per_s",
    "frame_error_rate"}``; per QBER: ``efficiency`` (mean f), ``efficiency_sem``,
    ``rounds`` (mean), ``rounds_max``, ``leaked_bits`` (mean), ``frame_errors``,
    ``blocks``, ``Mbit_per_s`` and ``schedule`` (of the first block). The keys and
    seeds depend only on ``n``, ``qbers``, ``blocks`` and ``seed``, so two variants
    are compared on the same blocks.
    """
    rng = np.random.default_rng(seed)
    warm = rng.integers(0, 2, min(n, 1 << 16), dtype=np.uint8)
    warm_bob = warm ^ (rng.random(warm.size) < qbers[0]).astype(np.uint8)
    for r in (rules, {"overlap": 2, "burst_levels": 4, "burst_width": 1 << 20}):
        _exchange(warm, warm_bob, qbers[0], 1, variant, passes, r)   # compiles every kernel
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
                res, alice_leak = _exchange(a, b, q, pseed, variant, passes, rules)
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
            "rounds_max": int(np.max(rounds)),
            "leaked_bits": float(np.mean(leaks)),
            "frame_errors": fails,
            "blocks": blocks,
            "Mbit_per_s": n * blocks / t_sum / 1e6,
            "schedule": schedule(n, q, variant, passes, rules),
        }
        total_bits += n * blocks
        total_time += t_sum
        total_fail += fails
        total_blocks += blocks
    return {"n": n, "variant": variant, "per_qber": per,
            "Mbit_per_s": total_bits / total_time / 1e6,
            "frame_error_rate": total_fail / total_blocks}


def _print_table(m: dict) -> None:
    first = next(iter(m["per_qber"].values()))["schedule"]
    print(f"n = {m['n']} bits, variant {m['variant']} (overlap {first.overlap}, "
          f"bursts of up to {first.burst_levels} levels)")
    print(f"  {'QBER':>6} {'f':>7} {'+-':>6} {'rounds':>7} {'max':>5} {'@10ms':>6} {'FER':>9} "
          f"{'Mbit/s':>7}  block sizes")
    for q, r in m["per_qber"].items():
        sizes = r["schedule"].block_sizes
        shown = ", ".join(str(k) for k in sizes[:3])
        print(f"  {q:6.3f} {r['efficiency']:7.4f} {r['efficiency_sem']:6.4f} "
              f"{r['rounds']:7.1f} {r['rounds_max']:5d} {r['rounds'] * 0.01:5.2f}s "
              f"{r['frame_errors']:>4}/{r['blocks']:<4} "
              f"{r['Mbit_per_s']:7.2f}  {shown}, ... ({len(sizes)} passes)")


def _print_compare(before: dict, after: dict) -> None:
    print(f"n = {after['n']} bits, {before['variant']} -> {after['variant']}")
    print(f"  {'QBER':>6} {'rounds (mean)':>15} {'rounds (max)':>13} {'f':>17} "
          f"{'FER':>11} {'Mbit/s':>14}")
    for q, a in after["per_qber"].items():
        b = before["per_qber"][q]
        print(f"  {q:6.3f} {b['rounds']:6.1f} -> {a['rounds']:5.1f} "
              f"{b['rounds_max']:5d} -> {a['rounds_max']:4d} "
              f"{b['efficiency']:.4f} -> {a['efficiency']:.4f} "
              f"{b['frame_errors']:4d} -> {a['frame_errors']:<4d} "
              f"{b['Mbit_per_s']:5.2f} -> {a['Mbit_per_s']:5.2f}")
    print(f"  all    FER {before['frame_error_rate']:.4f} -> {after['frame_error_rate']:.4f}, "
          f"{before['Mbit_per_s']:.2f} -> {after['Mbit_per_s']:.2f} Mbit/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="2**17-bit blocks, 20 of them, one timing each")
    ap.add_argument("--bits", type=int, default=None, help="default block size in bits")
    ap.add_argument("--blocks", type=int, default=20, help="blocks per QBER (>= 20)")
    ap.add_argument("--repeat", type=int, default=3, help="timings per block, best kept")
    ap.add_argument("--variant", choices=VARIANTS, default="latency")
    ap.add_argument("--compare", choices=(*VARIANTS, "none"), default="optimized",
                    help="variant to compare with, with its own round rules")
    ap.add_argument("--passes", type=int, default=None)
    ap.add_argument("--overlap", type=int, default=None,
                    help="override the --variant schedule's overlap")
    ap.add_argument("--burst-levels", type=int, default=None,
                    help="override the --variant schedule's burst_levels")
    ap.add_argument("--burst-width", type=int, default=None,
                    help="override the --variant schedule's burst_width")
    ap.add_argument("--all-sizes", action="store_true",
                    help="also tables for 2**17, 2**18 and 2**19 bits")
    args = ap.parse_args()
    n = args.bits or ((1 << 17) if args.quick else DEFAULT_BITS)
    repeat = 1 if args.quick else args.repeat
    rules = {k: v for k, v in (("overlap", args.overlap), ("burst_levels", args.burst_levels),
                               ("burst_width", args.burst_width)) if v is not None}
    runs = [(args.variant, rules)]
    if args.compare != "none":
        runs.insert(0, (args.compare, None))
    sizes = [1 << k for k in (17, 18, 19) if (1 << k) != n] if args.all_sizes else []
    for size in [*sizes, n]:
        ms = [measure(size, blocks=args.blocks, repeat=repeat if size == n else 1,
                      variant=v, passes=args.passes, rules=r) for v, r in runs]
        for m in ms:
            _print_table(m)
        if len(ms) == 2:
            _print_compare(*ms)
    m = ms[-1]
    for q in QBERS:
        print(f"cascade_efficiency_qber_{q}={m['per_qber'][q]['efficiency']:.4f}")
    for q in QBERS:
        print(f"cascade_rounds_qber_{q}={m['per_qber'][q]['rounds']:.1f}")
    for q in QBERS:
        print(f"cascade_rounds_max_qber_{q}={m['per_qber'][q]['rounds_max']}")
    print(f"cascade_Mbit_per_s={m['Mbit_per_s']:.2f}")
    print(f"frame_error_rate={m['frame_error_rate']:.4f}")


if __name__ == "__main__":
    main()
