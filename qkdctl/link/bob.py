"""Bob's host: detectors, polarization controller, tagger, sifting core, his key store.

:func:`run_bob` is what ``qkdctl bob`` does. Bob connects to Alice
(``link.alice_address``), checks that the two bench files agree, arms his
instruments, waits for Alice's laser to be on, then reads his tagger block by
block: he sifts each block and announces his detections and bases, and takes
Alice's reply (which pulses to keep) in a worker thread while he sifts the
next blocks (up to ``window`` blocks wait for a reply at once, so that a long
round trip does not stall the tagger). Distillation runs beside it on the
lanes of :class:`~qkdctl.postprocess.lanes.BobLanes`.

Bob never holds Alice's sequence: his process is given his own seed (on the
simulated bench, :func:`qkdctl.rng.role_seed` of the run's), and what he
learns of Alice's choices is what the protocol discloses.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import BenchConfig, parse_address
from ..errors import ConfigError
from ..postprocess.lanes import BobLanes
from ..protocol import BobRole, SiftCoding
from ..session import StopRequest, new_seed
from ..sifting import SiftParams, SiftStats
from ..summary import build_summary
from .common import (
    Done,
    Ready,
    build_side_bench,
    link_figures,
    link_options,
    meet,
    side_keystore,
    side_psk,
    stop_link,
)
from .mux import Link
from .report import add_public_counts, apply_distillation

__all__ = ["BobSifting", "run_bob"]

log = logging.getLogger(__name__)


class BobSifting:
    """Bob's sifting over the link: announce each block, take the reply in a worker."""

    def __init__(self, params: SiftParams, channel, lanes: BobLanes | None, *,
                 coding: SiftCoding, window: int = 16):
        self.window = window
        self.bob = BobRole(params, channel, window=window, coding=coding)
        self.lanes = lanes
        self.stats = SiftStats(params.n_intensities)
        self.sifted_bits = 0
        #: time the tagger loop waited for Alice's replies (the window was full)
        self.wait_s = 0.0
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="qkdctl-bob-sift")
        self._inflight: deque[concurrent.futures.Future] = deque()

    def _accept(self) -> None:
        det, keep, _ = self.bob.accept()
        # Bob does not learn the intensity classes: his counts per class come from the
        # distillation (the summary); here every detection counts under class 0
        unknown = np.zeros(det.basis.shape[0], np.uint8)
        self.sifted_bits += add_public_counts(self.stats, det.basis, unknown, keep)
        if self.lanes is not None:
            self.lanes.add(det, keep)

    def _wait(self, keep: int) -> None:
        t0 = time.perf_counter()
        while len(self._inflight) > keep:
            self._inflight.popleft().result()
        self.wait_s += time.perf_counter() - t0

    def feed(self, ts, ch, final: bool = False) -> None:
        self._wait(self.window - 1)
        self.bob.announce(ts, ch, final=final)
        self._inflight.append(self._worker.submit(self._accept))

    def drain(self) -> None:
        self._wait(0)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def run_bob(cfg: BenchConfig, duration_s: float = 2.0, seed: int | None = None, *,
            block_s: float = 0.01, progress: Callable[[dict[str, Any]], None] | None = None,
            stop: Callable[[], bool] | None = None, keystore=None, psk_file: str | None = None,
            bench=None, window: int = 16) -> dict[str, Any]:
    """Bob's side of a two-host session; returns his summary.

    ``seed``: Bob's own seed (his multi-click choices and, on the simulated
    bench, his side of distillation and the simulated tagger's identity);
    ``keystore``: the directory whose ``bob/`` store receives his keys (False:
    none); ``psk_file`` overrides the bench file's pre-shared key file.
    """
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ConfigError(f"duration {duration_s!r} s: give a positive number of seconds")
    seed = new_seed() if seed is None else seed
    psk = side_psk(cfg, "bob", psk_file)
    store = side_keystore(keystore, "bob") if cfg.postprocess.enabled else None
    host, port = parse_address(cfg.link.alice_address)
    t_wall = time.perf_counter()
    log.info("bob: connecting to Alice at %s:%d", host, port)
    link = Link.connect(host, port, psk, **link_options(cfg))
    try:
        with StopRequest() as ctrl_c:
            s = _session(cfg, link, psk, store, seed, duration_s, block_s, progress,
                         lambda: ctrl_c.requested or (stop is not None and stop()), bench,
                         window, t_wall)
    except BaseException as e:
        stop_link(link, "Bob", e)
        raise
    link.close()
    s["link"] = link_figures(link)
    return s


def _session(cfg, link, psk, store, seed, duration_s, block_s, progress, stop_requested,
             bench, window, t_wall) -> dict[str, Any]:
    eps, session, reconciled = meet(link, cfg, psk, store, "bob")
    control = eps["control"]
    if bench is None:
        bench = build_side_bench(cfg, "bob", seed)
    simulated = all(i.driver == "mock" for n, i in cfg.instruments.items() if n in bench)
    params = SiftParams.from_config(cfg, seed)
    lanes = BobLanes(cfg, eps["lanes"], keystore=store, key_prefix=session,
                     rng_seed=seed if simulated else None,
                     meta={"bench": cfg.name, "role": "bob", "session": session,
                             "link": True}) \
        if cfg.postprocess.enabled else None
    sifting = BobSifting(params, eps["sifting"], lanes, coding=SiftCoding.from_config(cfg),
                         window=window)
    interrupted = False
    elapsed = 0.0
    try:
        with contextlib.ExitStack() as stack:
            for role in ("polarization", "detectors", "tagger"):
                if role in bench:
                    stack.enter_context(bench[role])
            det, tagger = bench["detectors"], bench["tagger"]
            det.bias_on()
            ready = control.recv()
            if not isinstance(ready, Ready):
                raise ConfigError(f"{cfg.path}: Alice did not arm her instruments")
            tagger.start()
            log.info("bob: session on %s: %.3g s of bench time", cfg.name, duration_s)
            n_blocks = max(1, round(duration_s / block_s))
            for i in range(n_blocks):
                step = duration_s * (i + 1) / n_blocks - elapsed
                ts, ch = tagger.read_block(step)
                elapsed += step
                sifting.feed(ts, ch)
                if lanes is not None and lanes.error is not None:
                    raise lanes.error
                if progress is not None:
                    progress(_snapshot(sifting, lanes, elapsed, duration_s))
                if lanes is not None and lanes.alarm is not None:
                    log.error("session stopped by a tamper alarm: %s", lanes.alarm)
                    break
                if i + 1 < n_blocks and stop_requested():
                    interrupted = True
                    break
            ts, ch = tagger.finish()
            t_acquired = time.perf_counter()
            pulses = getattr(tagger, "pulses_simulated", None)
            elapsed = getattr(tagger, "elapsed_s", elapsed)
            sifting.feed(ts, ch)
            sifting.feed(None, None, final=True)
            sifting.drain()
        if lanes is not None:
            lanes.finish()
        control.send(Done("bob", float(elapsed), lanes.next_block if lanes else 0))
        done = control.recv()
        if not isinstance(done, Done):
            raise ConfigError(f"{cfg.path}: Alice did not close the session")
    finally:
        sifting.close()
        if lanes is not None:
            lanes.abort()
    if pulses is None:
        pulses = round(elapsed * cfg.source.rep_rate_hz)
    from ..summary import RunTally

    tally = RunTally(params.n_intensities, stats=sifting.stats)
    s = build_summary(cfg, sifting.bob.sifter, tally, seed=seed, sequence=None,
                      pulses_sent=pulses, duration_s=elapsed,
                      wall_s=time.perf_counter() - t_wall, interrupted=interrupted,
                      sifted_bits=sifting.sifted_bits,
                      source="simulated bench" if simulated else "bench")
    s["role"] = "bob"
    # how long the session went on after the tagger stopped: the last blocks' sifting
    # and distillation, whose round trips a long link pays at the end of a session
    s["tail_wall_s"] = time.perf_counter() - t_acquired
    s["reply_wait_s"] = sifting.wait_s
    for d in s["counts_by_intensity"].values():
        # Bob does not learn the classes of his detections: no detections or gain
        # per class on his side
        d["detections"] = d["gain"] = None
    s["keystore_reconciliation"] = reconciled
    s["calibration_record"] = cfg.calibration_path
    if lanes is not None:
        apply_distillation(s, lanes.summary(elapsed), store)
    return s


def _snapshot(sifting: BobSifting, lanes, bench_s: float, duration_s: float) -> dict[str, Any]:
    z = x = None
    rs = lanes.results_so_far() if lanes is not None else []
    if rs:
        kb = sum(r.key_bits for r in rs)
        tb = sum(r.test_bits for r in rs if r.qber_test is not None)
        z = sum(r.ec_errors for r in rs) / kb if kb else None
        x = (sum(r.qber_test * r.test_bits for r in rs if r.qber_test is not None) / tb
             if tb else None)
    return {"bench_s": bench_s, "duration_s": duration_s,
            "detected_pulses": sifting.bob.sifter.counters["detected_pulses"],
            "sifted_bits": sifting.sifted_bits, "qber_z": z, "qber_x": x,
            "secret_bits": sum(r.secret_bits for r in rs)}

