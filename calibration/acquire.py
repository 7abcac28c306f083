"""Short acquisitions for the calibration procedures.

:func:`acquire` arms the bench the way a session does (detectors biased,
laser on, encoder and tagger started, each instrument entered as a context
manager so that every way out leaves it safe), reads the time tags of
``duration_s`` of bench time and returns them with what was done.
``laser=False`` takes the tags with the laser output off (dark counts);
``instruments`` lets a procedure act on the bench while it is armed (the
polarization scan moves the waveplates between acquisitions).

The procedures see the bench only through its instruments and their tags,
exactly as on a real bench; on the simulated bench they know nothing of the
simulated table.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkdctl.config import BenchConfig

__all__ = ["ArmedBench", "Tags", "acquire", "armed"]

log = logging.getLogger(__name__)

ARM_ORDER = ("detectors", "laser", "modulator", "tagger")


@dataclass
class Tags:
    """Time tags of one acquisition (int64 ps, uint8 channels, time-sorted)."""

    timestamps: np.ndarray
    channels: np.ndarray
    duration_s: float

    def of(self, channel: int) -> np.ndarray:
        return self.timestamps[self.channels == channel]


class ArmedBench:
    """The bench's instruments while armed; :meth:`read` takes tags."""

    def __init__(self, instruments: dict[str, Any], laser_on: bool, block_s: float):
        self.instruments = instruments
        self.laser_on = laser_on
        self.block_s = block_s

    def __getitem__(self, role: str):
        return self.instruments[role]

    def read(self, duration_s: float, progress: Callable[[float], None] | None = None) -> Tags:
        """The tags of the next ``duration_s`` seconds of bench time."""
        tagger = self.instruments["tagger"]
        parts_t, parts_c = [], []
        done = 0.0
        n = max(1, round(duration_s / self.block_s))
        for i in range(n):
            step = duration_s * (i + 1) / n - done
            ts, ch = tagger.read_block(step)
            parts_t.append(ts)
            parts_c.append(ch)
            done += step
            if progress is not None:
                progress(done / duration_s)
        ts = np.concatenate(parts_t) if parts_t else np.zeros(0, np.int64)
        ch = np.concatenate(parts_c) if parts_c else np.zeros(0, np.uint8)
        order = np.argsort(ts, kind="stable")
        return Tags(ts[order], ch[order], duration_s)


@contextlib.contextmanager
def armed(cfg: BenchConfig, *, seed: int = 0, laser: bool = True,
          bench: dict[str, Any] | None = None, block_s: float = 0.01) -> Iterator[ArmedBench]:
    """The bench armed for acquisitions; safe again on every way out."""
    from qkdctl.session import build_bench

    instruments = build_bench(cfg, seed) if bench is None else bench
    with contextlib.ExitStack() as stack:
        extra = [r for r in instruments if r not in ARM_ORDER]
        for role in (*extra, *ARM_ORDER):
            stack.enter_context(instruments[role])
        instruments["detectors"].bias_on()
        if laser:
            instruments["laser"].output_on()
        else:
            instruments["laser"].output_off()
        instruments["modulator"].start()
        instruments["tagger"].start()
        yield ArmedBench(instruments, laser, block_s)
        instruments["tagger"].stop()


def acquire(cfg: BenchConfig, duration_s: float, *, seed: int = 0, laser: bool = True,
            bench: dict[str, Any] | None = None) -> Tags:
    """One acquisition of ``duration_s`` seconds of bench time."""
    with armed(cfg, seed=seed, laser=laser, bench=bench) as b:
        return b.read(duration_s)
