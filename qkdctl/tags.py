"""Time-tag blocks and the sources they stream from.

A time tag is ``(timestamp, channel)``: ``int64`` picoseconds on the time
tagger's clock and a ``uint8`` channel. Tags travel in blocks of two numpy
arrays sorted by time, never as Python objects per tag.

A :class:`TagSource` is anything that streams such blocks from a file (a
qkdctl recording, a PicoQuant PTU file, a Photon-HDF5 file): it has a cheap
:meth:`~TagSource.describe` (from the header, without reading the tags) and
:meth:`~TagSource.blocks`, which yields blocks of at most ``block_tags`` tags
in order, optionally limited to a time range, in bounded memory. Every block
is checked: timestamps must not decrease, within a block or across blocks; a
violation raises :class:`~qkdctl.errors.DataError` naming the file and the
index of the offending tag.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import h5py
import numba as nb
import numpy as np

from .errors import DataError

__all__ = ["BlockChecker", "TagSource", "open_h5", "raw_statistics", "time_range"]


@nb.njit(cache=True)
def _first_decrease(ts, prev):
    """Index of the first timestamp smaller than its predecessor (prev before ts[0]), or -1."""
    last = prev
    for i in range(ts.shape[0]):
        if ts[i] < last:
            return i
        last = ts[i]
    return -1


class BlockChecker:
    """Checks that a stream of blocks is sorted by time; counts the tags seen."""

    def __init__(self, where: str):
        self.where = where
        self.last = np.iinfo(np.int64).min
        self.seen = 0

    def __call__(self, ts: np.ndarray, ch: np.ndarray) -> None:
        if ts.shape != ch.shape:
            raise DataError(f"{self.where}: timestamps and channels differ in length near "
                            f"tag {self.seen}")
        if ts.shape[0]:
            i = _first_decrease(ts, np.int64(self.last))
            if i >= 0:
                before = self.last if i == 0 else int(ts[i - 1])
                raise DataError(f"{self.where}: timestamps decrease at tag {self.seen + i} "
                                f"({before} ps then {int(ts[i])} ps); a time-tag stream must be "
                                "sorted by time")
            self.last = int(ts[-1])
        self.seen += ts.shape[0]


def time_range(ts: np.ndarray, start_ps: int | None, stop_ps: int | None) -> slice:
    """The slice of a sorted block with ``start_ps <= t < stop_ps``."""
    a = 0 if start_ps is None else int(np.searchsorted(ts, start_ps, "left"))
    b = ts.shape[0] if stop_ps is None else int(np.searchsorted(ts, stop_ps, "left"))
    return slice(a, max(a, b))


class TagSource(ABC):
    """A file of time tags, streamed in blocks."""

    #: short name of the format ("qkdctl", "ptu", "photon-hdf5")
    format: str = ""

    def __init__(self, path: str):
        self.path = str(path)

    @abstractmethod
    def describe(self, scan: bool = False) -> dict[str, Any]:
        """What the header says, without reading the tags (``scan``: one pass over them).

        At least: ``path``, ``format``, ``n_tags`` (or None if unknown without
        reading), ``resolution_ps``, ``channels``; and whatever the format
        records (instrument, mode, acquisition time, ...).
        """

    @abstractmethod
    def blocks(self, block_tags: int = 1 << 20, start_ps: int | None = None,
               stop_ps: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(timestamps, channels)`` blocks in time order, checked, bounded in size.

        ``start_ps``/``stop_ps`` keep only tags with ``start_ps <= t < stop_ps``.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the file."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def raw_statistics(source: TagSource, block_tags: int = 1 << 20,
                   start_ps: int | None = None, stop_ps: int | None = None) -> dict[str, Any]:
    """Tags per channel, first and last timestamp, duration and rates, streaming."""
    counts = np.zeros(256, np.int64)
    first = last = None
    n = 0
    for ts, ch in source.blocks(block_tags, start_ps, stop_ps):
        if ts.shape[0] == 0:
            continue
        if first is None:
            first = int(ts[0])
        last = int(ts[-1])
        counts += np.bincount(ch, minlength=256)
        n += ts.shape[0]
    duration = (last - first) * 1e-12 if first is not None else 0.0
    by_ch = {int(c): int(counts[c]) for c in np.flatnonzero(counts)}
    return {
        "tags": n,
        "tags_by_channel": by_ch,
        "first_timestamp_ps": first,
        "last_timestamp_ps": last,
        "duration_s": duration,
        "count_rate_hz_by_channel": {c: (k / duration if duration > 0 else None)
                                     for c, k in by_ch.items()},
    }


def open_h5(path: str) -> h5py.File:
    """Open an HDF5 file read-only; one still marked open by its writer as an SWMR reader.

    A plain open comes first: it refuses a damaged file at once, where an SWMR
    reader retries every failed metadata checksum (it takes the damage for a
    write in progress). A file still marked open by its writer (a recording
    whose run crashed, or one still being written) can only be opened as an
    SWMR reader, which SWMR's ordered writes make safe. Raises OSError.
    """
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if "already open for write" not in str(e) and "h5clear" not in str(e):
            raise
    return h5py.File(path, "r", swmr=True)
