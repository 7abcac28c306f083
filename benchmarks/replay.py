"""Recording and replay throughput, and replay's peak memory.

Makes a recording of the simulated bench (default 2 s of bench time, about
2.3e7 tags) and prints on its last lines:
  record_Mtags_per_s=     tags per second through the recorder (writer process,
                          compression, disk), from tags already in memory
  h5_read_Mtags_per_s=    h5py reading the recording's two datasets alone
  replay_Mtags_per_s=     `qkdctl replay` end to end: read, sift, statistics
  replay_vs_read_ratio=   replay / raw read, same run
  peak_rss_MB=            peak resident memory of a replay in a fresh process
All rates are the best of --repeat runs in this process.

Usage: python benchmarks/replay.py [--bench-seconds S] [--repeat N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import h5py
import hdf5plugin  # noqa: F401  (filters for the datasets)
import numpy as np

from qkdctl.config import load_bench
from qkdctl.recording import Recorder
from qkdctl.replay import replay
from qkdctl.sequence import AliceSequence
from qkdctl.session import run_session


def best_of(n, fn):
    best = float("inf")
    out = None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# VmHWM, not ru_maxrss: the latter keeps the high-water mark of the parent at fork
PEAK = """
import sys
from qkdctl.replay import replay
s = replay(sys.argv[1])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(int(hwm.split()[1]) / 1024.0)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the recordings (default: tmp)")
    args = ap.parse_args()
    cfg = load_bench()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "bench.h5")
        live = run_session(cfg, duration_s=args.bench_seconds, seed=1, record=path)
        with h5py.File(path, "r") as f:
            n = f["photon_data/timestamps"].shape[0]
            ts = f["photon_data/timestamps"][...]
            ch = f["photon_data/detectors"][...]
        print(f"recording: {n} tags, {os.path.getsize(path) / 1e6:.1f} MB")

        def record():
            out = os.path.join(d, "again.h5")
            seq = AliceSequence.from_config(cfg.source, 1)
            with Recorder(out, cfg, 1, seq, overwrite=True) as rec:
                b = 1 << 20
                for i in range(0, n, b):
                    rec.append(ts[i:i + b], ch[i:i + b])
            return out

        def h5_read():
            b = 1 << 20
            with h5py.File(path, "r") as f:
                t, c = f["photon_data/timestamps"], f["photon_data/detectors"]
                for i in range(0, n, b):
                    t[i:i + b]
                    c[i:i + b]

        record_s, _ = best_of(args.repeat, record)
        read_s, _ = best_of(args.repeat, h5_read)
        rep_s, rep = best_of(args.repeat, lambda: replay(path))
        assert rep["sifted_key_sha256"] == live["sifted_key_sha256"], "replay differs"
        peak = float(subprocess.run([sys.executable, "-c", PEAK, path], check=True,
                                    capture_output=True, text=True).stdout.split()[-1])
    print(f"record_Mtags_per_s={n / record_s / 1e6:.1f}")
    print(f"h5_read_Mtags_per_s={n / read_s / 1e6:.1f}")
    print(f"replay_Mtags_per_s={n / rep_s / 1e6:.1f}")
    print(f"replay_vs_read_ratio={read_s / rep_s:.3f}")
    print(f"peak_rss_MB={peak:.0f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
