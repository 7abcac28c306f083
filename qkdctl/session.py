"""Bench orchestration: build the instruments, arm them, stream tags through sifting.

:func:`run_session` is what ``qkdctl run`` does. The instruments are entered
as context managers in the order detectors, laser, modulator, tagger, so that
on any way out (end of run, an error, Ctrl-C) they leave in the reverse
order: tagger stopped, modulator stopped, laser output off, detectors biased
down.

Ctrl-C during a run asks it to stop at the end of the current block; the
tags already acquired are sifted and summarised. A second Ctrl-C aborts at
once (the bench still goes to its safe state).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import BenchConfig
from .drivers import DRIVERS, Instrument, build_mock_bench, driver_class
from .errors import ConfigError
from .protocol import AliceRole, BobRole, LocalChannel
from .sequence import AliceSequence
from .sifting import SiftParams
from .summary import RunTally, build_summary

__all__ = ["ARM_ORDER", "build_bench", "new_seed", "run_session"]

log = logging.getLogger(__name__)

ARM_ORDER = ("detectors", "laser", "modulator", "tagger")
"""Order in which instruments are entered and armed; they are made safe in reverse."""


def new_seed() -> int:
    """A fresh random seed (reported in the summary, so that the run can be repeated)."""
    return int.from_bytes(os.urandom(4), "little")


def build_bench(cfg: BenchConfig, seed: int) -> dict[str, Instrument]:
    """The bench's instruments from its ``[instruments.*]`` tables."""
    missing = [r for r in ARM_ORDER if r not in cfg.instruments]
    if missing:
        raise ConfigError(f"{cfg.path}: instruments: missing [instruments.{missing[0]}] "
                          f"(a bench needs {', '.join(ARM_ORDER)})")
    mock = [n for n, inst in cfg.instruments.items() if inst.driver == "mock"]
    if len(mock) == len(cfg.instruments):
        return build_mock_bench(cfg, seed)
    if mock:
        real = next(n for n, inst in cfg.instruments.items() if inst.driver != "mock")
        raise ConfigError(f"{cfg.path}: instruments.{real}.driver: "
                          f"{cfg.instruments[real].driver!r} cannot be combined with the mock "
                          f"instruments ({', '.join(mock)}), which share one simulated table")
    bench = {}
    for name, inst in cfg.instruments.items():
        if inst.driver not in DRIVERS:
            raise ConfigError(f"{cfg.path}: instruments.{name}.driver: unknown driver "
                              f"{inst.driver!r}; available: {', '.join(sorted(DRIVERS))}")
        cls = driver_class(inst.driver, name)
        bench[name] = cls(name=name, resource=inst.resource, settings=inst.settings,
                          limits=inst.limits, config_key=f"{cfg.path}: instruments.{name}")
    return bench


class _StopRequest:
    """SIGINT handler for the duration of a run: first Ctrl-C stops, second aborts."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing the current block (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def run_session(cfg: BenchConfig, duration_s: float = 2.0, seed: int | None = None, *,
                block_s: float = 0.01,
                progress: Callable[[dict[str, Any]], None] | None = None,
                bench: dict[str, Instrument] | None = None,
                stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run a BB84 session on the bench for ``duration_s`` seconds of bench time.

    Returns the summary dict of :func:`qkdctl.summary.build_summary`.
    ``progress`` is called after every block with a small dict (bench time,
    detections, QBERs so far); ``stop`` is polled after every block and ends
    the run early when it returns true. ``bench`` replaces the instruments
    built from the configuration (tests use it).
    """
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ConfigError(f"duration {duration_s!r} s: give a positive number of seconds")
    if not (block_s > 0 and math.isfinite(block_s)):
        raise ConfigError(f"block_s {block_s!r} s: give a positive number of seconds")
    if seed is None:
        seed = new_seed()
    bench = build_bench(cfg, seed) if bench is None else bench
    sequence = AliceSequence.from_config(cfg.source, seed)
    params = SiftParams.from_config(cfg, seed)
    channel = LocalChannel()
    alice = AliceRole(sequence, channel.alice)
    bob = BobRole(params, channel.bob)
    tally = RunTally(params.n_intensities)
    sifted_bits = 0
    interrupted = False
    t_wall = time.perf_counter()
    elapsed = 0.0

    def exchange(ts, ch, final=False) -> int:
        bob.announce(ts, ch, final=final)
        codes = alice.reply()
        det, keep, _ = bob.accept()
        return tally.add(det, codes, keep)

    with _StopRequest() as ctrl_c, contextlib.ExitStack() as stack:
        for role in ARM_ORDER:
            stack.enter_context(bench[role])
        det_inst, laser, mod, tagger = (bench[r] for r in ARM_ORDER)
        det_inst.bias_on()
        laser.output_on()
        mod.start()
        tagger.start()
        log.info("session on %s: %.3g s of bench time, seed %d", cfg.name, duration_s, seed)
        n_blocks = max(1, round(duration_s / block_s))
        for i in range(n_blocks):
            step = duration_s * (i + 1) / n_blocks - elapsed
            ts, ch = tagger.read_block(step)
            elapsed += step
            sifted_bits += exchange(ts, ch)
            if progress is not None:
                st = tally.stats
                progress({"bench_s": elapsed, "duration_s": duration_s,
                          "detected_pulses": bob.sifter.counters["detected_pulses"],
                          "sifted_bits": sifted_bits,
                          "qber_z": _ratio(st.errors[:, 0].sum(), st.sifted[:, 0].sum()),
                          "qber_x": _ratio(st.errors[:, 1].sum(), st.sifted[:, 1].sum())})
            if i + 1 < n_blocks and (ctrl_c.requested or (stop is not None and stop())):
                interrupted = True
                break
        ts, ch = tagger.finish()
        sifted_bits += exchange(ts, ch)
        sifted_bits += exchange(None, None, final=True)
        elapsed = getattr(tagger, "elapsed_s", elapsed)
        pulses = getattr(tagger, "pulses_simulated", None)
        if pulses is None:
            pulses = round(elapsed * cfg.source.rep_rate_hz)
    wall = time.perf_counter() - t_wall
    log.info("session done: %d sifted bits in %.3g s of bench time", sifted_bits, elapsed)
    return build_summary(cfg, bob.sifter, tally, seed=seed, sequence=sequence,
                         pulses_sent=pulses, duration_s=elapsed, wall_s=wall,
                         interrupted=interrupted, sifted_bits=sifted_bits)


def _ratio(a, b) -> float | None:
    return float(a) / float(b) if b else None
