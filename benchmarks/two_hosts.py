"""Two-host session on loopback: secret-key rate against round-trip time, and traffic.

Runs ``qkdctl sim-table``, ``qkdctl alice`` and ``qkdctl bob`` as three
processes on the built-in simulated bench, with a delaying TCP proxy
(tests/netproxy.py) between Alice and Bob, for a session of ``--duration``
seconds of bench time (default 10) at each added round-trip time (0, 10 ms,
50 ms), the best of ``--repeat`` (default 2) sessions each. The secret-key
rate is the secret bits over the wall time from Bob's start to the end of the
session (both hosts done, every key committed): what a link delivers, latency
tail included. The traffic is every byte either host put on the link (frames,
acknowledgements, handshakes) per detection.

The simulated bench runs slower than real time here (three processes on two
cores), which hides some of the latency. So the benchmark also measures the
*tail*: how long the session goes on after Bob's tagger stops (the last
blocks' round trips), and projects the ratio for a bench acquiring in real
time, ``(T + tail_0) / (T + tail_rtt)`` for a session of ``T`` seconds.

Prints, on its last lines: ``tail_s_no_delay=``, ``tail_s_rtt_10ms=``,
``tail_s_rtt_50ms=``, ``rtt_10ms_ratio_realtime_bench=``, ``secret_bps_no_delay=``,
``secret_bps_rtt_10ms=``, ``rtt_10ms_ratio=``, ``secret_bps_rtt_50ms=``,
``classical_bits_per_detection=``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netproxy import NetProxy  # noqa: E402
from twohosts import Hosts, bench_file, psk_file  # noqa: E402

from qkdctl.rng import role_seed  # noqa: E402


def session(duration: float, rtt_s: float, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="qkdctl-bench-") as tmp:
        tmp = Path(tmp)
        bench = bench_file(tmp, link="\n[link]\nconnect_timeout_s = 120.0\n")
        hosts = Hosts(tmp, bench, seed=seed)
        try:
            psk = psk_file(tmp)
            hosts.table()
            a = hosts.alice(psk=psk)
            with NetProxy(("127.0.0.1", hosts.alice_port), delay=rtt_s / 2) as proxy:
                t0 = time.perf_counter()
                b = hosts.bob(psk=psk, seed=role_seed(seed, "bob"), duration=duration,
                              alice_port=proxy.port)
                rb = b.finish(timeout=3600)
                ra = a.finish(timeout=3600)
                wall = time.perf_counter() - t0
            if rb or ra:
                raise SystemExit(f"session failed (bob {rb}, alice {ra}):\n{b.stderr}\n"
                                 f"{a.stderr}")
            sb, sa = b.json(), a.json()
        finally:
            hosts.close()
    traffic = sb["link"]["bytes_sent"] + sa["link"]["bytes_sent"]
    return {"rtt_ms": rtt_s * 1e3, "wall_s": wall, "secret_bits": sb["secret_bits"],
            "secret_bps": sb["secret_bits"] / wall, "detections": sb["detected_pulses"],
            "bits_per_detection": 8 * traffic / sb["detected_pulses"],
            "bob_bytes": sb["link"]["bytes_sent"], "alice_bytes": sa["link"]["bytes_sent"],
            "blocks": sb["distillation"]["blocks_distilled"], "tail_s": sb["tail_wall_s"],
            "reply_wait_s": sb["reply_wait_s"],
            "rounds": [blk["ec_rounds"] for blk in sb["distillation"]["blocks"]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="bench seconds per session")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2, help="sessions per round-trip time")
    args = ap.parse_args(argv)
    runs = {}
    for rtt in (0.0, 0.010, 0.050):
        # the best of --repeat sessions: the machine is shared and the three processes
        # compete for its cores, which slows the simulated bench by tens of per cent
        tries = [session(args.duration, rtt, args.seed) for _ in range(args.repeat)]
        r = runs[rtt] = max(tries, key=lambda t: t["secret_bps"])
        print(f"rtt {r['rtt_ms']:4.0f} ms: {r['secret_bits']:,} secret bits in {r['wall_s']:.1f} s "
              f"wall ({r['secret_bps'] / 1e6:.3f} Mbit/s), {r['blocks']} blocks, Cascade rounds "
              f"per block {min(r['rounds'], default=0)}-{max(r['rounds'], default=0)}, "
              f"{r['detections']:,} detections, Bob sent {r['bob_bytes']:,} B, Alice "
              f"{r['alice_bytes']:,} B ({r['bits_per_detection']:.2f} bits/detection), "
              f"{r['tail_s']:.2f} s after the tagger stopped", flush=True)
    base = runs[0.0]
    for rtt, name in ((0.0, "no_delay"), (0.010, "rtt_10ms"), (0.050, "rtt_50ms")):
        print(f"tail_s_{name}={runs[rtt]['tail_s']:.3f}")
    t = args.duration
    print(f"rtt_10ms_ratio_realtime_bench="
          f"{(t + base['tail_s']) / (t + runs[0.010]['tail_s']):.3f}")
    print(f"secret_bps_no_delay={base['secret_bps']:.0f}")
    print(f"secret_bps_rtt_10ms={runs[0.010]['secret_bps']:.0f}")
    print(f"rtt_10ms_ratio={runs[0.010]['secret_bps'] / base['secret_bps']:.3f}")
    print(f"secret_bps_rtt_50ms={runs[0.050]['secret_bps']:.0f}")
    print(f"classical_bits_per_detection={base['bits_per_detection']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
