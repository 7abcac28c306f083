"""Replay recorded time tags through the live pipeline; convert and describe tag files.

:func:`replay` runs a qkdctl recording through the same sifting pipeline as a
live run (:class:`qkdctl.session.SiftingPipeline`), with the recorded bench,
seed and Alice's sequence, so that it reproduces the live run's sifted key
(``sifted_key_sha256``), QBER and counts exactly. A ``config`` override
re-analyses the data with other analysis settings (gate, delays); ``start_s``
/ ``stop_s`` replay a time range, in seconds from the first tag.

A foreign file (PicoQuant PTU, Photon-HDF5) carries no Alice sequence: its
replay reports raw-tag statistics (tags per channel, first and last
timestamp, duration, count rates).

Replay streams blocks: memory stays bounded whatever the file's size. The
next block is read in a background thread while the current one is sifted
(HDF5 decompression and the numba kernels both run without the GIL).
"""

from __future__ import annotations

import concurrent.futures
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .config import BenchConfig
from .errors import DataError
from .recording import COMPRESSIONS, Recorder, Recording
from .session import SiftingPipeline, open_keystores
from .tags import TagSource, raw_statistics

__all__ = ["convert", "describe_file", "open_any", "replay"]

log = logging.getLogger(__name__)


def open_any(path: str, timestamps_unit: float | None = None) -> TagSource:
    """Open a qkdctl recording, a Photon-HDF5 file or a PicoQuant PTU file."""
    from .importers import open_tag_file

    return open_tag_file(path, timestamps_unit=timestamps_unit, recording_opener=Recording)


def _prefetch(it: Iterator[Any]) -> Iterator[Any]:
    """Iterate, reading the next item in a background thread while this one is used."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(next, it, None)
        while True:
            item = fut.result()
            if item is None:
                return
            fut = pool.submit(next, it, None)
            yield item


def _range_ps(src: TagSource, start_s: float | None, stop_s: float | None
              ) -> tuple[int | None, int | None]:
    if start_s is None and stop_s is None:
        return None, None
    for name, v in (("--start", start_s), ("--stop", stop_s)):
        if v is not None and not (v >= 0 and np.isfinite(v)):
            raise DataError(f"{src.path}: {name} {v!r} s: give a time >= 0 in seconds from "
                            "the first tag")
    if start_s is not None and stop_s is not None and stop_s <= start_s:
        raise DataError(f"{src.path}: --stop {stop_s} s is not after --start {start_s} s")
    first = next((int(ts[0]) for ts, _ in src.blocks(1 << 16) if ts.shape[0]), None)
    if first is None:
        return None, None
    return (None if start_s is None else first + round(start_s * 1e12),
            None if stop_s is None else first + round(stop_s * 1e12))


def replay(path: str, *, config: BenchConfig | None = None, start_s: float | None = None,
           stop_s: float | None = None, timestamps_unit: float | None = None,
           block_tags: int = 1 << 20,
           progress: Callable[[dict[str, Any]], None] | None = None,
           keystore: str | bool | None = False, sifted_digest: bool = False) -> dict[str, Any]:
    """Replay a tag file; returns a run summary (recordings) or raw statistics (others).

    A recording goes through sifting and secret-key distillation as in the live
    run. The random choices of distillation (samples, Cascade's permutations,
    hash functions, seeds) are drawn afresh, so the secret key differs from the
    live run's; its length differs by the few bits Cascade's leakage varies.
    ``keystore`` keeps the replay's secret keys there (default: none kept: a
    recording holds everything needed to rebuild them).
    """
    t_wall = time.perf_counter()
    with open_any(path, timestamps_unit) as src:
        start_ps, stop_ps = _range_ps(src, start_s, stop_s)
        if not isinstance(src, Recording) or src.sequence is None:
            if config is not None:
                log.warning("%s: no Alice sequence, so nothing to re-analyse with %s; "
                            "raw-tag statistics only", path, config.path)
            stats = raw_statistics(src, block_tags, start_ps, stop_ps)
            return {"source": f"replay of {path}", "format": src.format,
                    "has_alice_sequence": False, **stats,
                    "header": src.describe(), "wall_s": time.perf_counter() - t_wall}
        cfg = src.bench(config)
        stores = open_keystores(keystore) if cfg.postprocess.enabled else None
        # both roles are in this process: a fresh authentication key for the replay
        with SiftingPipeline(cfg, src.seed, src.sequence, keystores=stores,
                             sifted_digest=sifted_digest,
                             psk=secrets.token_bytes(32)) as pipe:
            return _replay_recording(path, src, cfg, pipe, start_ps, stop_ps, block_tags,
                                     progress, t_wall, start_s, stop_s)


def _replay_recording(path, src, cfg, pipe, start_ps, stop_ps, block_tags, progress, t_wall,
                      start_s, stop_s) -> dict[str, Any]:
    """Sift a recording's blocks (read ahead in a thread) and summarise them."""
    n = src.n_tags
    done = 0
    for ts, ch in _prefetch(src.blocks(block_tags, start_ps, stop_ps)):
        pipe.feed(ts, ch)
        done += ts.shape[0]
        if progress is not None:
            progress({**pipe.snapshot(done, n), "tags": done})
    pipe.finish()
    full = start_ps is None and stop_ps is None
    if full:
        pulses, duration = src.pulses_sent, src.duration_s
        live = src.summary or {}
        interrupted = bool(live.get("interrupted", not src.complete))
    else:
        # a time range: the pulses between its first and last sync tags, and one
        # sync period for the part after the last sync
        span = pipe.bob.sifter.synced_pulses
        pulses = span + cfg.source.sync_period_pulses if span is not None else 0
        duration = pulses / cfg.source.rep_rate_hz
        interrupted = False
    summary = pipe.summary(pulses_sent=pulses, duration_s=duration,
                           wall_s=time.perf_counter() - t_wall, interrupted=interrupted,
                           source=f"replay of {path}")
    summary["recording"] = path
    summary["recording_complete"] = src.complete
    summary["calibration_record"] = (src.calibration or {}).get("record_path")
    if not full:
        summary["time_range_s"] = [start_s, stop_s]
    return summary


def describe_file(path: str, timestamps_unit: float | None = None,
                  scan: bool = False) -> dict[str, Any]:
    """What a tag file's header says, without reading its tags (``scan``: count them)."""
    with open_any(path, timestamps_unit) as src:
        return src.describe(scan=scan)


def convert(src_path: str, out_path: str, *, timestamps_unit: float | None = None,
            compression: str = "bitshuffle-lz4", overwrite: bool = False,
            block_tags: int = 1 << 20) -> dict[str, Any]:
    """Write a foreign tag file (PTU, Photon-HDF5) as a qkdctl recording."""
    if compression not in COMPRESSIONS:
        raise DataError(f"compression {compression!r}: choose one of " + ", ".join(COMPRESSIONS))
    with open_any(src_path, timestamps_unit) as src:
        header = src.describe(scan=True)
        n = 0
        rec = Recorder.foreign(out_path, header, compression=compression, overwrite=overwrite)
        with rec:
            for ts, ch in src.blocks(block_tags):
                rec.append(ts, ch)
                n += ts.shape[0]
        return {"input": src_path, "output": out_path, "format": src.format, "tags": n,
                "compression": compression}
