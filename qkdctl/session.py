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

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import BenchConfig
from .drivers import DRIVERS, Instrument, build_mock_bench, driver_class
from .errors import ConfigError, QkdctlError
from .postprocess.stream import KeyDistillation
from .protocol import AliceRole, BobRole, SiftCoding, load_psk, open_channels
from .recording import Recorder
from .rng import role_seed
from .sequence import MODE_PATTERN, AliceSequence
from .sifting import SiftParams
from .summary import RunTally, build_summary

__all__ = ["ARM_ORDER", "SiftingPipeline", "build_bench", "build_real_instruments", "new_seed",
           "run_session"]

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
    return build_real_instruments(cfg, cfg.instruments)


def build_real_instruments(cfg: BenchConfig, instruments) -> dict[str, Instrument]:
    """Real drivers for the named ``[instruments.*]`` tables (no connection is opened)."""
    bench = {}
    for name, inst in instruments.items():
        if inst.driver not in DRIVERS:
            raise ConfigError(f"{cfg.path}: instruments.{name}.driver: unknown driver "
                              f"{inst.driver!r}; available: {', '.join(sorted(DRIVERS))}")
        cls = driver_class(inst.driver, name)
        bench[name] = cls(name=name, resource=inst.resource, backend=_backend(cfg, inst),
                          timeout_s=inst.timeout_s, settings=inst.settings,
                          limits=inst.limits, config_key=f"{cfg.path}: instruments.{name}")
    return bench


def _backend(cfg: BenchConfig, inst) -> str:
    """The VISA library spec, a pyvisa-sim YAML path taken relative to the bench file."""
    b = inst.backend
    if "@" in b and not b.startswith("@") and cfg.path not in ("", "<string>"):
        path, at, lib = b.rpartition("@")
        p = Path(path).expanduser()
        if not p.is_absolute():
            p = Path(cfg.path).parent / p
        return f"{p}{at}{lib}"
    return b


class StopRequest:
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


class SiftingPipeline:
    """Alice and Bob sifting a stream of tag blocks over the classical channel.

    The same pipeline serves a live run and a replay, so that a replay
    reproduces the live run exactly.
    """

    WINDOW = 2
    #: bits a digest of the sifted key discloses (subtracted by privacy amplification)
    DIGEST_BITS = 256

    def __init__(self, cfg: BenchConfig, seed: int, sequence: AliceSequence, *,
                 distill: bool | None = None, keystores=None, sifted_digest: bool = False,
                 psk: bytes | None = None, allow_fresh_psk: bool = True):
        """``distill``: also distil secret key (default: ``postprocess.enabled``);
        ``keystores``: (Alice's, Bob's) key stores for the secret keys, or None to
        keep none; ``sifted_digest``: hash the sifted key for the summary. On a
        simulated bench (every driver a mock) distillation draws its random
        choices from ``seed``, so that the run is reproducible to the last bit."""
        self.cfg = cfg
        self.seed = seed
        self.sequence = sequence
        # Bob's random choices come from his role seed, as in a two-host session
        params = SiftParams.from_config(cfg, role_seed(seed, "bob"))
        distill = cfg.postprocess.enabled if distill is None else distill
        if psk is None:
            psk = load_psk(cfg, allow_fresh=allow_fresh_psk)
        chans = open_channels(cfg, ("sifting", "distillation") if distill else ("sifting",),
                              psk=psk, keystores=keystores)
        alice_end, bob_end = chans["sifting"]
        coding = SiftCoding.from_config(cfg)
        self.alice = AliceRole(sequence, alice_end, coding)
        self.bob = BobRole(params, bob_end, window=self.WINDOW, coding=coding)
        self.tally = RunTally(params.n_intensities,
                              key_hash=hashlib.sha256() if sifted_digest else None)
        self.distill = KeyDistillation(
            cfg, *chans["distillation"], keystores=keystores,
            extra_leak_bits=self.DIGEST_BITS if sifted_digest else 0,
            rng_seed=seed if all(i.driver == "mock" for i in cfg.instruments.values())
            else None) if distill else None
        self.sifted_bits = 0
        # Alice's side of each block runs in a worker thread while Bob sifts the next
        # (the kernels release the GIL); one worker keeps the blocks in order
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._inflight: deque[concurrent.futures.Future] = deque()

    def _alice_and_tally(self) -> None:
        codes = self.alice.reply()
        det, keep, _ = self.bob.accept()
        self.sifted_bits += self.tally.add(det, codes, keep)
        if self.distill is not None:
            self.distill.add(det, codes, keep)

    @property
    def alarm(self) -> str | None:
        """The tamper alarm raised by distillation, if any."""
        return self.distill.alarm if self.distill is not None else None

    def _wait(self, keep: int) -> None:
        while len(self._inflight) > keep:
            self._inflight.popleft().result()

    def feed(self, ts: np.ndarray | None, ch: np.ndarray | None, final: bool = False) -> None:
        """Sift one block (``final``: release what is held, at the end of the run)."""
        self._wait(self.WINDOW - 1)
        try:
            self.bob.announce(ts, ch, final=final)
        except BaseException:
            self._wait(0)
            raise
        self._inflight.append(self._worker.submit(self._alice_and_tally))

    def finish(self) -> None:
        """Release what is held, wait until every block is sifted, distil the rest."""
        self.feed(None, None, final=True)
        self.drain()
        if self.distill is not None:
            self.distill.finish()

    def drain(self) -> None:
        """Wait until every announced block is sifted."""
        self._wait(0)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        if self.distill is not None:
            self.distill.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def snapshot(self, bench_s: float, duration_s: float) -> dict[str, Any]:
        """The small progress dict (bench time, detections, sifted bits, QBERs so far)."""
        st = self.tally.stats
        return {"bench_s": bench_s, "duration_s": duration_s,
                "detected_pulses": self.bob.sifter.counters["detected_pulses"],
                "sifted_bits": self.sifted_bits,
                "qber_z": _ratio(st.errors[:, 0].sum(), st.sifted[:, 0].sum()),
                "qber_x": _ratio(st.errors[:, 1].sum(), st.sifted[:, 1].sum())}

    def summary(self, *, pulses_sent: int, duration_s: float, wall_s: float,
                interrupted: bool, source: str) -> dict[str, Any]:
        self.drain()
        s = build_summary(self.cfg, self.bob.sifter, self.tally, seed=self.seed,
                          sequence=self.sequence, pulses_sent=pulses_sent,
                          duration_s=duration_s, wall_s=wall_s, interrupted=interrupted,
                          sifted_bits=self.sifted_bits, source=source)
        s["calibration_record"] = self.cfg.calibration_path
        if self.distill is not None:
            self.distill.wait()
            s["distillation"] = d = self.distill.summary(duration_s)
            for k in ("secret_bits", "secret_key_rate_bps", "ec_efficiency", "ec_leaked_bits",
                      "phase_error_bound", "tamper_alarm", "aborted", "abort_reason"):
                s[k] = d[k]
        return s


def _instrument_record(bench: dict[str, Instrument]) -> dict[str, Any]:
    """Identity, settings and live status of each instrument, for the recording."""
    out = {}
    for name, inst in bench.items():
        entry: dict[str, Any] = {"driver": type(inst).__name__,
                                 "settings": dict(getattr(inst, "settings", {}) or {}),
                                 "limits": dict(getattr(inst, "limits", {}) or {})}
        try:
            entry["identity"] = dataclasses.asdict(inst.identity())
            entry["status"] = inst.status()
        except QkdctlError as e:
            entry["error"] = str(e)
        out[name] = entry
    return out


def run_session(cfg: BenchConfig, duration_s: float = 2.0, seed: int | None = None, *,
                block_s: float = 0.01,
                progress: Callable[[dict[str, Any]], None] | None = None,
                bench: dict[str, Instrument] | None = None,
                stop: Callable[[], bool] | None = None,
                record: str | None = None, flush_interval_s: float = 1.0,
                compression: str = "bitshuffle-lz4", overwrite: bool = False,
                keystore: str | os.PathLike | bool | None = None,
                sifted_digest: bool = False) -> dict[str, Any]:
    """Run a BB84 session on the bench for ``duration_s`` seconds of bench time.

    Returns the summary dict of :func:`qkdctl.summary.build_summary`.
    ``progress`` is called after every block with a small dict (bench time,
    detections, QBERs so far); ``stop`` is polled after every block and ends
    the run early when it returns true. ``bench`` replaces the instruments
    built from the configuration (tests use it). ``record`` names a recording
    to write (:mod:`qkdctl.recording`): every tag, flushed every
    ``flush_interval_s`` of wall time, and the run's configuration, seed,
    Alice's sequence, instruments and summary.

    Secret keys go to the key store ``keystore`` (a directory holding Alice's
    and Bob's stores, ``alice/`` and ``bob/``; None: the per-user default of
    :func:`qkdctl.keystore.default_keystore_dir`; False: keys are not kept).
    ``sifted_digest`` adds the SHA-256 of the sifted key to the summary (and
    subtracts its 256 bits in privacy amplification). A tamper alarm stops the
    run after the block that raised it; the summary says so
    (``tamper_alarm``, ``abort_reason``).
    """
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ConfigError(f"duration {duration_s!r} s: give a positive number of seconds")
    if not (block_s > 0 and math.isfinite(block_s)):
        raise ConfigError(f"block_s {block_s!r} s: give a positive number of seconds")
    if seed is None:
        seed = new_seed()
    bench = build_bench(cfg, seed) if bench is None else bench
    simulated = all(i.driver == "mock" for i in cfg.instruments.values())
    sequence = AliceSequence.from_config(cfg.source, seed, secret=not simulated)
    interrupted = False
    t_wall = time.perf_counter()
    elapsed = 0.0
    rec: Recorder | None = None

    def totals(tagger) -> tuple[int, float]:
        el = getattr(tagger, "elapsed_s", elapsed)
        pulses = getattr(tagger, "pulses_simulated", None)
        return (round(el * cfg.source.rep_rate_hz) if pulses is None else pulses), el

    stores = open_keystores(keystore) if cfg.postprocess.enabled else None
    with StopRequest() as ctrl_c, contextlib.ExitStack() as outer, \
            SiftingPipeline(cfg, seed, sequence, keystores=stores, sifted_digest=sifted_digest,
                            allow_fresh_psk=simulated) as pipe:
        with contextlib.ExitStack() as stack:
            extra = [r for r in bench if r not in ARM_ORDER]  # e.g. a polarization controller
            for role in (*extra, *ARM_ORDER):
                stack.enter_context(bench[role])
            det_inst, laser, mod, tagger = (bench[r] for r in ARM_ORDER)
            if record is not None:
                # closed after the instruments are safe (outer stack), on every path
                rec = outer.enter_context(Recorder(
                    record, cfg, seed, sequence, instruments=_instrument_record(bench),
                    flush_interval_s=flush_interval_s, compression=compression,
                    overwrite=overwrite))
            load_sequence(cfg, mod, sequence)
            det_inst.bias_on()
            laser.output_on()
            mod.start()
            tagger.start()
            log.info("session on %s: %.3g s of bench time, seed %d", cfg.name, duration_s,
                     seed)
            n_blocks = max(1, round(duration_s / block_s))
            for i in range(n_blocks):
                step = duration_s * (i + 1) / n_blocks - elapsed
                ts, ch = tagger.read_block(step)
                elapsed += step
                if rec is not None:
                    pulses, el = totals(tagger)
                    rec.append(ts, ch, pulses_sent=pulses, duration_s=el)
                pipe.feed(ts, ch)
                if progress is not None:
                    progress(pipe.snapshot(elapsed, duration_s))
                if pipe.alarm is not None:
                    log.error("session stopped by a tamper alarm: %s", pipe.alarm)
                    break
                if i + 1 < n_blocks and (ctrl_c.requested or (stop is not None and stop())):
                    interrupted = True
                    break
            ts, ch = tagger.finish()
            pulses, elapsed = totals(tagger)
            if rec is not None:
                rec.append(ts, ch, pulses_sent=pulses, duration_s=elapsed)
            pipe.feed(ts, ch)
            pipe.finish()
        wall = time.perf_counter() - t_wall
        summary = pipe.summary(pulses_sent=pulses, duration_s=elapsed, wall_s=wall,
                               interrupted=interrupted,
                               source="simulated bench" if simulated else "bench")
        if stores is not None:
            summary["keystore"] = str(stores[0].path.parent)
        if rec is not None:
            summary["recording"] = rec.path
            rec.close(summary)
    log.info("session done: %d sifted bits in %.3g s of bench time", pipe.sifted_bits,
             elapsed)
    return summary


def load_sequence(cfg: BenchConfig, mod, sequence: AliceSequence) -> None:
    """Give the encoder Alice's choices: a pattern generator gets her pattern and the
    pulse rate; a simulated encoder her sequence."""
    if hasattr(mod, "load_pattern"):
        if sequence.mode != MODE_PATTERN:
            raise ConfigError(f"{cfg.path}: source.sequence: the modulator "
                              f"({cfg.instruments['modulator'].driver}) plays a "
                              "repeating pattern: set sequence = \"pattern\"")
        mod.load_pattern(sequence.pattern)
        if hasattr(mod, "set_pulse_rate_hz"):
            mod.set_pulse_rate_hz(cfg.source.rep_rate_hz)
    if hasattr(mod, "load_sequence"):
        mod.load_sequence(sequence)


def keystore_dir(keystore: str | os.PathLike | bool | None) -> Path | None:
    """The key store directory ``keystore`` names, created 0700 (None: the default;
    False: none)."""
    if keystore is False:
        return None

    from .keystore import default_keystore_dir

    top = Path(default_keystore_dir() if keystore in (None, True) else keystore)
    try:
        top.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"key store {top}: cannot create: {e.strerror}") from None
    return top


def open_keystores(keystore: str | os.PathLike | bool | None):
    """(Alice's, Bob's) key stores under ``keystore`` (None: the default; False: none)."""
    from .keystore import KeyStore

    top = keystore_dir(keystore)
    return None if top is None else (KeyStore(top / "alice"), KeyStore(top / "bob"))


def _ratio(a, b) -> float | None:
    return float(a) / float(b) if b else None
