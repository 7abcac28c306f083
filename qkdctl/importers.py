"""Importers of foreign time-tag files: PicoQuant PTU and Photon-HDF5.

:func:`open_tag_file` tells the formats apart by their first bytes (never by the
file name's extension) and returns a :class:`~qkdctl.tags.TagSource`:

- a PicoQuant PTU file (magic ``b"PQTTTR\\0\\0"``) -> :class:`PtuSource`;
- an HDF5 file (signature ``b"\\x89HDF\\r\\n\\x1a\\n"`` at byte 0, 512, 1024, ...)
  with the group ``/user/qkd`` -> a qkdctl recording, opened by the
  ``recording_opener`` the caller passes (:class:`qkdctl.recording.Recording`);
- any other HDF5 file -> :class:`PhotonHdf5Source`.

Both sources stream: they read and convert a bounded number of records or tags
at a time (``chunk_records``, default 2^16, / ``chunk_tags``, default 2^18), so
memory does not grow with the file (PTU: about 70 bytes per chunk record, 5 MB
at the default, which decodes fastest: ~100 Mtags/s on the PicoHarp file).
Every block they yield is checked by :class:`~qkdctl.tags.BlockChecker` (time
never decreases). Every problem with the input -- a missing, truncated or
corrupted file, an unsupported record type, a missing unit, decreasing
timestamps -- raises :class:`~qkdctl.errors.DataError` with one line that names
the file; no traceback from ptufile, h5py or numpy reaches the user.

Design notes
------------

**PTU records are decoded by ptufile**, never by hand: the raw 32-bit records
of one chunk are read from the file and given to ``PtuFile.decode_records``.
Two things ptufile does not provide had to be added, each with a few lines
that rely on PicoQuant's published record layouts, and each checked by the
tests against decoding the whole file in one call:

- *Chunked decoding.* ptufile (2026.2.6) has no record range:
  ``read_records`` reads or memory-maps the whole file, and
  ``decode_records`` starts its overflow (wrap-around) counter at zero on
  every call. To carry the counter from one chunk to the next, a record of
  all-zero bits is appended to each chunk: in every supported record type it
  is an ordinary event with time field 0, so its decoded time *is* the
  chunk's final overflow count. The carry is added to the next chunk.
  :class:`PtuRecordDecoder` does this (and the sync events below) for any
  source of raw records: the PTU reader's chunks, and the FIFO reads of the
  PicoQuant time-tagger drivers.
- *HydraHarp / TimeHarp 260 / MultiHarp / PicoHarp 330 T2 sync events.* These
  record types mark a sync event as "special bit set, channel field 0";
  ptufile decodes it as a photon on channel 0, the same number as a photon on
  the first input, so the two would be silently merged. The importer tells
  them apart by that bit pattern and gives sync events the channel
  :data:`PTU_T2_SYNC_CHANNEL` (64, one past the 64 input channels 0..63).

**Channel numbers** are ptufile's (and PicoQuant's record field's): inputs
counted from 0 (PicoQuant's demo programs print them from 1). In PicoHarp 300
T2 files the sync input is channel 0 and the detector input channel 1, as the
hardware records them.

**Times.** T2: ``t_ps = global time in ticks * resolution_ps`` in int64, with
the resolution (``MeasDesc_GlobalResolution``: 4 ps PicoHarp 300, 1 ps
HydraHarp) required to be a whole number of ps -- exact. T3: ``t_ps =
round(nsync * 1e12 / SyncRate) + dtime * bin_ps``, the first term computed
exactly in integers (no float, no int64 overflow) and rounded to the nearest
ps; ``bin_ps`` (``MeasDesc_Resolution``) must be a whole number of ps. How
exact that is: the dtime part is exact to the bin, but the sync period is only
as good as the header's ``TTResult_SyncRate``, an integer-Hz reading of the
instrument's rate meter at the start of the run. In ``hydraharp_v20_t3.ptu``
it says 4,999,960 Hz for a laser driven at 80 MHz / 16 = 5 MHz, 8 ppm off, so
absolute times there may be off by ~8 ppm of the elapsed time (80 us after
10 s) although every tag keeps its exact sync number. Who needs the exact sync
numbers reads them with :meth:`PtuSource.photons`. T3 records come in the
order of their sync numbers; the order of the dtimes of photons on different
channels within one sync period is not part of the format, so T3 tags are
sorted by time inside a sliding window (a tag is emitted only once the stream
has passed the start of a later sync period, which bounds the window to about
one period); sync numbers that decrease are an error.

**A truncated PTU file** (the header intact, the records cut: a crashed
acquisition, a full disk, an interrupted copy) is read, not refused: the tags
in it are real and may be all there is of a run. The complete records are read,
a partial last record is dropped, and a warning is logged once at open with the
number of records read and announced; :meth:`PtuSource.describe` reports
``truncated: True`` and both counts. A file whose *header* is cut or corrupted
is refused. Header irregularities that do not change its meaning (a tag index
out of order, as in ``hydraharp_v20_t3.ptu``; a repeated tag) are tolerated and
logged at INFO level instead of ptufile's ERROR.

**Photon-HDF5**: ``/photon_data/timestamps`` times ``timestamps_unit`` (seconds)
-> ps. A unit that is a whole number of ps converts exactly; another unit (e.g.
1/60 MHz) is converted with integer arithmetic and rounded to the nearest ps
(error <= 0.5 ps, far below any detector's jitter), with a warning and
``timestamps_rounded: True`` in :meth:`PhotonHdf5Source.describe`. A file
without a unit is refused unless the caller gives one; a unit given for a file
that has a different one is refused too -- nothing is ever loaded with a
guessed unit. ``nanotimes`` (TCSPC delays), if present, are not added to the
timestamps (the timestamps are the macrotimes the file states).
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import struct
import sys
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any, NamedTuple

import h5py
import hdf5plugin  # noqa: F401  (registers Blosc, Bitshuffle, ... filters with h5py)
import numpy as np
import ptufile

from .errors import DataError
from .tags import BlockChecker, TagSource, open_h5, time_range

__all__ = [
    "HDF5_MAGIC",
    "PTU_MAGIC",
    "PTU_T2_SYNC_CHANNEL",
    "PhotonHdf5Source",
    "PtuPhotons",
    "PtuRecordDecoder",
    "PtuSource",
    "open_tag_file",
]

log = logging.getLogger(__name__)

#: first 8 bytes of a PicoQuant PTU file (``ptufile.PqFileType.PTU``)
PTU_MAGIC = b"PQTTTR\0\0"
#: the HDF5 superblock signature; at byte 0, or 512, 1024, 2048, ... after a user block
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: the group that makes an HDF5 file a qkdctl recording
QKD_GROUP = "/user/qkd"
#: channel given to sync events of HydraHarp-family T2 files (inputs are 0..63)
PTU_T2_SYNC_CHANNEL = 64

#: records decoded at a time: fastest on this machine (~100 Mtags/s), ~5 MB peak
DEFAULT_CHUNK_RECORDS = 1 << 16
#: Photon-HDF5 tags read at a time
DEFAULT_CHUNK_TAGS = 1 << 18

_INT64_MAX = np.iinfo(np.int64).max

# T2 record types that mark sync events as special records with channel field 0
_PTU_T2_WITH_SYNC = {0x00010204, 0x01010204, 0x00010205, 0x00010206, 0x00010207}
# ptufile messages about header quirks that leave the header's meaning intact
_PTU_BENIGN = ("tag index out of order", "tag with index not in tags", "duplicate tag")


class PtuPhotons(NamedTuple):
    """Photons of one chunk of PTU records, in file order, as the records give them.

    ``global_time``: T2, time in ticks of the global resolution; T3, the sync
    number (both int64, counted from the start of the file, overflows included).
    ``dtime``: T3 delay after the sync in bins (int16), None for T2.
    ``channels``: uint8 input channel (HydraHarp-family T2 sync events:
    :data:`PTU_T2_SYNC_CHANNEL`). ``first_record``: index of the chunk's first
    record in the file.
    """

    global_time: np.ndarray
    dtime: np.ndarray | None
    channels: np.ndarray
    first_record: int


class _RecordHeader:
    """The two header facts ``ptufile.PtuFile.decode_records`` reads: record type and mode.

    It stands in for a ``PtuFile`` when records come from elsewhere than a file
    (ptufile 2026.2.6 reads nothing else there). :class:`PtuRecordDecoder` checks
    the decoding of an all-zero record with it, and the PicoQuant driver tests
    compare its decoding of a real file's records with :class:`PtuSource`'s.
    """

    def __init__(self, record_type: int):
        mode = (record_type >> 8) & 0xFF
        self.tags = {"TTResultFormat_TTTRRecType": record_type, "Measurement_Mode": mode}
        self.is_t3 = mode == 3


class PtuRecordDecoder:
    """Decodes successive chunks of raw 32-bit PicoQuant TTTR records of one record type.

    This is the decoder of :class:`PtuSource`, usable on records that do not come
    from a file (the FIFO of a HydraHarp or MultiHarp, read by
    :mod:`qkdctl.drivers.picoquant`). The records are decoded by ptufile; the
    decoder adds what ptufile lacks (see the module docstring): the overflow count
    carried from one chunk to the next (:attr:`carry`), and HydraHarp-family T2
    sync events told apart from photons on input 0 (channel
    :data:`PTU_T2_SYNC_CHANNEL`).

    ``decode`` is the ptufile call that decodes one array of records (a
    ``PtuFile``'s ``decode_records``); by default one is made for
    ``record_type`` alone. Chunks must be given in order; a chunk may end
    anywhere, even between an overflow record and the events it applies to.
    Decoding errors of ptufile (``ValueError``, ``NotImplementedError``) pass
    through for the caller to report.
    """

    def __init__(self, record_type: int,
                 decode: Callable[[np.ndarray], np.ndarray] | None = None):
        self.record_type = int(record_type)
        mode = (self.record_type >> 8) & 0xFF
        if mode not in (2, 3):
            raise ValueError(f"record type 0x{self.record_type:08x} is not a T2 or T3 type")
        self.t3 = mode == 3
        self.sync_events = self.record_type in _PTU_T2_WITH_SYNC
        if decode is None:
            try:
                ptufile.PtuRecordType(self.record_type)
            except ValueError:
                raise ValueError(f"record type 0x{self.record_type:08x} is not supported "
                                 "by ptufile") from None
            header = _RecordHeader(self.record_type)

            def decode(records: np.ndarray) -> np.ndarray:
                return ptufile.PtuFile.decode_records(header, records)

            probe = decode(np.zeros(1, np.uint32))
            if int(probe["time"][0]) != 0:
                raise ValueError(f"record type 0x{self.record_type:08x}: unexpected "
                                 "decoding by this ptufile version")
        self._decode = decode
        #: overflow count (in time units) carried into the next chunk
        self.carry = 0

    def decode(self, records: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Decode the next chunk of records (uint32, little-endian as the hardware gives).

        Returns ``(time, channel, marker, dtime)`` per record: ``time`` int64 (T2:
        ticks, T3: sync number; absolute, earlier chunks' overflows included);
        ``channel`` < 0 for overflows and markers; ``dtime`` None for T2.
        """
        buf = np.zeros(records.shape[0] + 1, np.uint32)
        buf[:-1] = records
        return self.decode_padded(buf)

    def decode_padded(self, buf: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Like :meth:`decode` for ``buf`` = the chunk's records followed by one zero word.

        The zero word is the carry probe: an all-zero record is an ordinary event at
        time 0 in every supported type, so its decoded time is the chunk's final
        overflow count. Reading records into such a buffer saves a copy.
        """
        m = buf.shape[0] - 1
        dec = self._decode(buf)
        time = dec["time"].astype(np.int64)
        if self.carry:
            time += self.carry
        self.carry = int(time[m])
        ch = dec["channel"][:m].copy()
        if self.sync_events:
            ch[(buf[:m] >> np.uint32(25)) == np.uint32(0x40)] = PTU_T2_SYNC_CHANNEL
        return time[:m], ch, dec["marker"][:m], dec["dtime"][:m] if self.t3 else None


# -- helpers -----------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    text = str(e).strip().split("\n")[0].strip()
    return text or type(e).__name__


def _tag_of(ptufile_message: str) -> str:
    """The tag (name and index) a ptufile header message is about."""
    m = re.search(r"tagid='(.*?)', index=(-?\d+)", ptufile_message)
    if not m:
        return "?"
    name, index = m.group(1), int(m.group(2))
    name = "".join(c if c.isprintable() else "?" for c in name)
    return repr(name) if index < 0 else f"{name!r}[{index}]"


def _check_size(name: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{name} must be a positive integer, not {n!r}")
    return int(n)


def _whole_ps(seconds: float) -> int | None:
    """``seconds`` as a whole number of ps, or None if it is not one (to 1e-6 relative)."""
    ps = seconds * 1e12
    if not math.isfinite(ps) or ps < 0.5:
        return None
    r = round(ps)
    return int(r) if abs(ps - r) <= 1e-6 * ps else None


def _ratio_ps(seconds: float) -> Fraction:
    """A time in seconds as an exact fraction of ps (denominator at most 10^6)."""
    return Fraction(repr(float(seconds))) * 10**12


def _scale_round(n: np.ndarray, ratio: Fraction) -> np.ndarray:
    """round(n * ratio) for int64 ``n >= 0``, exactly, without int64 overflow in between.

    With ratio = p/q = A + B/q and n = k*q + r: n*p/q = n*A + k*B + r*B/q, where
    r*B < q^2 fits int64 for q < 3e9.
    """
    p, q = ratio.numerator, ratio.denominator
    a, b = divmod(p, q)
    k, r = np.divmod(n, np.int64(q))
    return n * np.int64(a) + k * np.int64(b) + (r * np.int64(b) + np.int64(q // 2)) // np.int64(q)


def _rebatch(chunks: Iterator[tuple[np.ndarray, np.ndarray]], block_tags: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regroup a stream of arrays into blocks of exactly ``block_tags`` (the last: fewer)."""
    pend_t: list[np.ndarray] = []
    pend_c: list[np.ndarray] = []
    n = 0
    for ts, ch in chunks:
        i, m = 0, ts.shape[0]
        while i < m:
            if n == 0 and m - i >= block_tags:
                yield ts[i:i + block_tags], ch[i:i + block_tags]
                i += block_tags
                continue
            take = min(block_tags - n, m - i)
            pend_t.append(ts[i:i + take])
            pend_c.append(ch[i:i + take])
            n += take
            i += take
            if n == block_tags:
                yield np.concatenate(pend_t), np.concatenate(pend_c)
                pend_t, pend_c, n = [], [], 0
    if n:
        yield np.concatenate(pend_t), np.concatenate(pend_c)


def _select(chunks: Iterator[tuple[np.ndarray, np.ndarray]], checker: BlockChecker,
            start_ps: int | None, stop_ps: int | None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Check every chunk's order, keep ``start_ps <= t < stop_ps``, stop once past the end."""
    for ts, ch in chunks:
        checker(ts, ch)
        if ts.shape[0] == 0:
            continue
        sl = time_range(ts, start_ps, stop_ps)
        if sl.stop > sl.start:
            yield ts[sl], ch[sl]
        if stop_ps is not None and ts[-1] >= stop_ps:
            return


def _stream(chunks: Iterator[tuple[np.ndarray, np.ndarray]], where: str, block_tags: int,
            start_ps: int | None, stop_ps: int | None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    block_tags = _check_size("block_tags", block_tags)
    yield from _rebatch(_select(chunks, BlockChecker(where), start_ps, stop_ps), block_tags)


def _sniff(path: str) -> tuple[str, bytes]:
    """('ptu' | 'hdf5' | 'other', first bytes); DataError for a missing/unreadable path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or _one_line(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: is a directory, not a time-tag file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            if head[:8] == PTU_MAGIC:
                return "ptu", head
            if head[:8] == HDF5_MAGIC:
                return "hdf5", head
            off = 512  # after a user block the superblock sits at 512, 1024, 2048, ...
            while off + 8 <= st.st_size and off <= (1 << 30):
                fh.seek(off)
                if fh.read(8) == HDF5_MAGIC:
                    return "hdf5", head
                off *= 2
            return "other", head
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or _one_line(e)})") from None


# -- PicoQuant PTU -----------------------------------------------------------------------

class _PtuLogCapture(logging.Filter):
    """Swallows ptufile's log records while a header is parsed; keeps them for us."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


class PtuSource(TagSource):
    """A PicoQuant PTU file (T2 or T3), read with ``ptufile``, streamed in chunks.

    ``chunk_records`` records (4 bytes each) are read and decoded at a time;
    peak memory is about 70 bytes per chunk record, whatever the file's size.
    See the module docstring for how times are computed and how exact they are.
    """

    format = "ptu"

    def __init__(self, path: str | os.PathLike[str], *, chunk_records: int = DEFAULT_CHUNK_RECORDS):
        super().__init__(str(path))
        self.chunk_records = _check_size("chunk_records", chunk_records)
        self._scan: dict[str, Any] | None = None
        kind, head = _sniff(self.path)
        if kind != "ptu":
            raise DataError(f"{self.path}: not a PicoQuant PTU file (starts with {head[:8]!r}, "
                            f"expected {PTU_MAGIC!r})")
        self._ptu = self._open_header()
        try:
            self._setup()
        except DataError:
            self._ptu.close()
            raise
        except (KeyError, ValueError, TypeError, OverflowError, ZeroDivisionError) as e:
            self._ptu.close()
            raise DataError(f"{self.path}: corrupted PTU header ({_one_line(e)})") from None

    # -- opening ------------------------------------------------------------------------
    def _open_header(self) -> ptufile.PtuFile:
        lg = logging.getLogger("ptufile")
        cap = _PtuLogCapture()
        level = lg.level
        lg.addFilter(cap)
        lg.setLevel(logging.DEBUG)
        try:
            ptu = ptufile.PtuFile(self.path)
        except ptufile.PqFileError as e:
            msg = _one_line(e)
            if msg.startswith("tag corrupted"):
                tag = _tag_of(msg)
                raise DataError(f"{self.path}: PTU header truncated or corrupted (unreadable "
                                f"after tag {tag})") from None
            raise DataError(f"{self.path}: not a readable PTU file ({msg})") from None
        except OSError as e:
            raise DataError(f"{self.path}: cannot read ({e.strerror or _one_line(e)})") from None
        except Exception as e:  # ptufile's header parser fails on garbage in many ways
            if isinstance(e.__context__, struct.error) or isinstance(e, struct.error):
                raise DataError(f"{self.path}: PTU header truncated or corrupted (it ends "
                                "before its Header_End tag)") from None
            raise DataError(f"{self.path}: corrupted PTU header ({type(e).__name__}: "
                            f"{_one_line(e)[:80]})") from None
        finally:
            lg.removeFilter(cap)
            lg.setLevel(level)
        for rec in cap.records:
            msg = rec.getMessage()
            what = msg.split(" @ ")[0]
            if what in _PTU_BENIGN:
                log.info("%s: PTU header irregularity tolerated: %s (tag %s)", self.path,
                         what, _tag_of(msg))
            elif rec.levelno >= logging.ERROR:
                ptu.close()
                m = re.search(r"typecode=(\d+)", msg)
                if what == "invalid tag type" and m:
                    what = f"unknown type code 0x{int(m.group(1)):08x}"
                raise DataError(f"{self.path}: corrupted PTU header ({what} at tag "
                                f"{_tag_of(msg)})")
            else:
                log.info("%s: ptufile: %s", self.path, msg)
        # the header must end with its Header_End tag: ptufile stops early, without an
        # error, at a tag of unknown type, and would then take header bytes for records
        try:
            fh = ptu.filehandle
            fh.seek(ptu.record_offset - 48)
            end = fh.read(32).rstrip(b"\0")
        except (OSError, ValueError):
            end = b""
        if end != b"Header_End":
            ptu.close()
            raise DataError(f"{self.path}: corrupted PTU header (no Header_End tag where the "
                            "header stops)")
        return ptu

    def _setup(self) -> None:
        p = self._ptu
        tags = p.tags
        for key in ("TTResultFormat_TTTRRecType", "Measurement_Mode",
                    "MeasDesc_GlobalResolution"):
            if key not in tags:
                raise DataError(f"{self.path}: PTU header lacks {key}")
        rectype = int(tags["TTResultFormat_TTTRRecType"])
        self.record_type_code = rectype
        try:
            self.record_type = ptufile.PtuRecordType(rectype).name
        except ValueError:
            raise DataError(f"{self.path}: PTU record type 0x{rectype:08x} is not supported "
                            "by ptufile (supported: "
                            + ", ".join(t.name for t in ptufile.PtuRecordType) + ")") from None
        bits = int(tags.get("TTResultFormat_BitsPerRecord", 32))
        if bits not in (0, 32):
            raise DataError(f"{self.path}: PTU records of {bits} bits; only 32-bit records "
                            "are defined")
        mode = int(tags["Measurement_Mode"])
        rec_mode = (rectype >> 8) & 0xFF
        if mode not in (2, 3):
            raise DataError(f"{self.path}: PTU measurement mode {mode} is not T2 or T3 "
                            "(time-tag records)")
        if rec_mode != mode:
            raise DataError(f"{self.path}: PTU header says T{mode} mode but record type "
                            f"{self.record_type} is T{rec_mode}")
        self.mode = f"T{mode}"
        # ptufile must decode this type, and an all-zero record must be a plain event at
        # time 0 (the chunk carry relies on it)
        try:
            probe = p.decode_records(np.zeros(1, np.uint32))
        except (ValueError, NotImplementedError) as e:
            raise DataError(f"{self.path}: PTU record type {self.record_type} cannot be "
                            f"decoded by ptufile ({_one_line(e)})") from None
        if int(probe["time"][0]) != 0:
            raise DataError(f"{self.path}: PTU record type {self.record_type}: unexpected "
                            "decoding by this ptufile version")
        self._sync_events = rectype in _PTU_T2_WITH_SYNC

        gres = float(tags["MeasDesc_GlobalResolution"])
        if not (1e-15 <= gres <= 1.0):
            raise DataError(f"{self.path}: PTU global resolution {gres!r} s "
                            "(MeasDesc_GlobalResolution) is not a plausible time")
        self.global_resolution_s = gres
        if mode == 2:
            res = _whole_ps(gres)
            if res is None:
                raise DataError(f"{self.path}: T2 resolution {gres * 1e12:g} ps is not a whole "
                                "number of ps; cannot convert times exactly")
            self.resolution_ps = res
            self.sync_rate_hz = int(tags.get("TTResult_SyncRate", 0)) or None
            self._period = None
        else:
            bin_s = float(tags.get("MeasDesc_Resolution", 0.0))
            res = _whole_ps(bin_s) if bin_s <= 1e-3 else None
            if res is None:
                raise DataError(f"{self.path}: T3 bin width {bin_s * 1e12:g} ps "
                                "(MeasDesc_Resolution) is not a whole number of ps")
            self.resolution_ps = res
            rate = int(tags.get("TTResult_SyncRate", 0))
            if rate > 0 and abs(gres * rate - 1.0) <= 1e-9:
                self._period = Fraction(10**12, rate)
            else:
                self._period = _ratio_ps(gres).limit_denominator(10**6)
                if rate > 0:
                    log.warning("%s: TTResult_SyncRate %d Hz disagrees with "
                                "MeasDesc_GlobalResolution %r s; using the latter",
                                self.path, rate, gres)
            if self._period.denominator >= 3_000_000_000 or self._period < 1:
                raise DataError(f"{self.path}: T3 sync period {float(self._period)} ps "
                                "is not usable")
            self.sync_rate_hz = rate or None

        # how many records: the header's count, bounded by what the file holds
        size = os.fstat(p.filehandle.fileno()).st_size
        self.record_offset = int(p.record_offset)
        avail, partial = divmod(max(0, size - self.record_offset), 4)
        announced = int(tags.get("TTResult_NumberOfRecords", 0))
        self.n_records_announced = announced if announced > 0 else None
        self.n_records_in_file = avail
        self.truncated = False
        if announced <= 0:
            self.n_records = avail
            log.warning("%s: header gives %d records (TTResult_NumberOfRecords); reading the "
                        "%d records the file holds", self.path, announced, avail)
        elif avail < announced:
            self.n_records = avail
            self.truncated = True
            log.warning("%s: truncated PTU file: the header announces %d records, the file "
                        "holds %d complete records (%d missing%s); reading those %d",
                        self.path, announced, avail, announced - avail,
                        f", a partial record of {partial} bytes dropped" if partial else "",
                        avail)
        else:
            self.n_records = announced
            if avail > announced or partial:
                log.warning("%s: %d bytes after the %d records the header announces; ignored",
                            self.path, size - self.record_offset - 4 * announced, announced)

    # -- reading ------------------------------------------------------------------------
    def _decoded(self, chunk_records: int | None = None
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        """(first record, time int64, channel int8, marker uint8, dtime) per chunk, all records.

        ``time`` is absolute (overflows of earlier chunks carried); ``channel`` < 0 for
        overflows and markers; HydraHarp-family T2 sync events get PTU_T2_SYNC_CHANNEL.
        """
        chunk = self.chunk_records if chunk_records is None else _check_size(
            "chunk_records", chunk_records)
        n_total = self.n_records
        decoder = PtuRecordDecoder(self.record_type_code, self._ptu.decode_records)
        try:
            fh = open(self.path, "rb")  # one handle per stream: streams may run in threads
        except OSError as e:
            raise DataError(f"{self.path}: cannot read ({e.strerror or _one_line(e)})") from None
        with fh:
            for start in range(0, n_total, chunk):
                m = min(chunk, n_total - start)
                buf = np.zeros(m + 1, np.uint32)  # the last one stays 0: the carry probe
                try:
                    fh.seek(self.record_offset + 4 * start)
                    got = fh.readinto(memoryview(buf[:m]).cast("B"))
                except OSError as e:
                    raise DataError(f"{self.path}: read error at record {start} "
                                    f"({e.strerror or _one_line(e)})") from None
                if got != 4 * m:
                    raise DataError(f"{self.path}: file shrank while being read: record "
                                    f"{start + got // 4} of {n_total} is missing")
                if sys.byteorder == "big":  # pragma: no cover - records are little-endian
                    buf.byteswap(inplace=True)
                try:
                    time, ch, marker, dtime = decoder.decode_padded(buf)
                except (ValueError, NotImplementedError) as e:
                    raise DataError(f"{self.path}: cannot decode records {start}..{start + m} "
                                    f"({_one_line(e)})") from None
                yield start, time, ch, marker, dtime

    def photons(self, chunk_records: int | None = None) -> Iterator[PtuPhotons]:
        """The photon records (and T2 sync events), in file order, one chunk at a time.

        Unlike :meth:`blocks` this gives the file's own numbers: ticks (T2) or
        sync numbers and dtime bins (T3). Chunks may be empty.
        """
        for start, time, ch, _marker, dtime in self._decoded(chunk_records):
            sel = np.flatnonzero(ch >= 0)
            yield PtuPhotons(time[sel], None if dtime is None else dtime[sel],
                             ch[sel].astype(np.uint8), start)

    def _sync_ps(self, nsync: np.ndarray) -> np.ndarray:
        return _scale_round(nsync, self._period)

    def _chunks_ps(self, chunk_records: int | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(timestamps ps, channels) per chunk, time-ordered (T3: sorted within syncs)."""
        if self.mode == "T2":
            res = np.int64(self.resolution_ps)
            for ph in self.photons(chunk_records):
                ts = ph.global_time
                if ts.shape[0] and int(ts.max()) > _INT64_MAX // int(res):
                    raise DataError(f"{self.path}: time beyond the int64 ps range near record "
                                    f"{ph.first_record}")
                yield ts * res, ph.channels
            return
        res = np.int64(self.resolution_ps)
        held_t = np.empty(0, np.int64)
        held_c = np.empty(0, np.uint8)
        last_sync = -1
        n_seen = 0
        for ph in self.photons(chunk_records):
            ns = ph.global_time
            if ns.shape[0] == 0:
                continue
            bad = np.flatnonzero(np.diff(ns, prepend=np.int64(last_sync)) < 0)
            if bad.shape[0]:
                i = int(bad[0])
                before = last_sync if i == 0 else int(ns[i - 1])
                raise DataError(f"{self.path}: sync numbers decrease at photon {n_seen + i} "
                                f"(sync {before} then {int(ns[i])}); the records are "
                                "corrupted")
            n_seen += ns.shape[0]
            last_sync = int(ns[-1])
            t = self._sync_ps(ns) + ph.dtime.astype(np.int64) * res
            ts = np.concatenate((held_t, t))
            ch = np.concatenate((held_c, ph.channels))
            if ts.shape[0] > 1 and not bool(np.all(ts[1:] >= ts[:-1])):
                order = np.argsort(ts, kind="stable")
                ts, ch = ts[order], ch[order]
            # every later photon has a sync number >= last_sync, hence a time >= its start
            cut = int(np.searchsorted(ts, int(self._sync_ps(np.array([last_sync]))[0]), "left"))
            held_t, held_c = ts[cut:], ch[cut:]
            yield ts[:cut], ch[:cut]
        yield held_t, held_c

    def blocks(self, block_tags: int = 1 << 20, start_ps: int | None = None,
               stop_ps: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return _stream(self._chunks_ps(), self.path, block_tags, start_ps, stop_ps)

    # -- header -------------------------------------------------------------------------
    def scan(self) -> dict[str, Any]:
        """Count photons per channel, markers, overflows and T2 syncs: one streaming pass."""
        if self._scan is None:
            counts = np.zeros(256, np.int64)
            markers = overflows = 0
            for _s, _t, ch, marker, _d in self._decoded():
                photon = ch >= 0
                counts += np.bincount(ch[photon].astype(np.uint8), minlength=256)
                is_marker = marker > 0
                markers += int(np.count_nonzero(is_marker))
                overflows += int(np.count_nonzero(~photon & ~is_marker))
            by_ch = {int(c): int(counts[c]) for c in np.flatnonzero(counts)}
            n_sync = by_ch.pop(PTU_T2_SYNC_CHANNEL, 0) if self._sync_events else 0
            self._scan = {
                "n_tags": int(counts.sum()),
                "n_photons": int(counts.sum()) - n_sync,
                "n_sync_events": n_sync if self._sync_events else None,
                "n_markers": markers,
                "n_overflows": overflows,
                "photons_by_channel": by_ch,
                "channels": sorted(by_ch) + ([PTU_T2_SYNC_CHANNEL] if n_sync else []),
            }
        return dict(self._scan)

    def describe(self, scan: bool = False) -> dict[str, Any]:
        """The header's facts; with ``scan=True`` also counts from one pass over the records.

        Without a scan ``n_tags``, ``channels`` and the marker count are None (a PTU
        header does not state them); the scan's results are kept for later calls.
        """
        t = self._ptu.tags
        created = self._ptu.datetime
        stop = t.get("TTResult_StopReason")
        stop_name = None
        if stop is not None:  # (ptufile's PtuStopReason() rewrites its UNKNOWN member)
            stop_name = next((r.name for r in ptufile.PtuStopReason if r.value == int(stop)),
                             "UNKNOWN")
        d: dict[str, Any] = {
            "path": self.path,
            "format": self.format,
            "file_version": self._ptu.version,
            "instrument": t.get("HW_Type"),
            "instrument_serial": t.get("HW_SerialNo"),
            "record_type": self.record_type,
            "record_type_code": f"0x{self.record_type_code:08x}",
            "mode": self.mode,
            "resolution_ps": self.resolution_ps,
            "global_resolution_s": self.global_resolution_s,
            "sync_rate_hz": self.sync_rate_hz,
            "n_records": self.n_records,
            "n_records_announced": self.n_records_announced,
            "truncated": self.truncated,
            "acquisition_time_s": (float(t["MeasDesc_AcquisitionTime"]) / 1e3
                                   if "MeasDesc_AcquisitionTime" in t else None),
            "stop_reason": stop_name,
            "stop_reason_code": None if stop is None else int(stop),
            "stopped_after_s": (float(t["TTResult_StopAfter"]) / 1e3
                                if "TTResult_StopAfter" in t else None),
            "creation_time": None if created is None else created.isoformat(),
            "creator_software": " ".join(str(t[k]) for k in ("CreatorSW_Name",
                                                              "CreatorSW_Version") if k in t)
                                or None,
            "comment": t.get("File_Comment"),
            "sync_channel": PTU_T2_SYNC_CHANNEL if self._sync_events else None,
            "n_tags": None,
            "channels": None,
            "n_markers": None,
        }
        if self.mode == "T3":
            d["sync_period_ps"] = float(self._period)
            d["sync_divider"] = t.get("HWSync_Divider")
            d["dtime_resolution_ps"] = self.resolution_ps
        if scan or self._scan is not None:
            d.update(self.scan())
        return d

    def close(self) -> None:
        self._ptu.close()


# -- Photon-HDF5 -------------------------------------------------------------------------

def _h5_open(path: str) -> h5py.File:
    """Open read-only (:func:`qkdctl.tags.open_h5`), errors as one-line DataErrors."""
    try:
        return open_h5(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, RuntimeError, ValueError) as e:
        raise DataError(f"{path}: not a readable HDF5 file ({_one_line(e)})") from None


_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def _h5_get(f: h5py.File, name: str) -> Any:
    """``f.get(name)``, or None where the file's metadata for it is damaged."""
    try:
        return f.get(name)
    except _H5_ERRORS:
        return None


def _h5_str(v: Any) -> str | None:
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, bytes | np.bytes_):
        try:
            s = bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            s = bytes(v).decode("latin-1")
        return s
    if isinstance(v, str):
        return v
    return None


def _valid_unit(value: Any, where: str) -> float:
    try:
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(-1)[0]  # a unit stored as a 1-element array
        u = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: timestamps unit {value!r} is not a number of seconds"
                        ) from None
    if not (math.isfinite(u) and 1e-15 <= u <= 1.0):
        raise DataError(f"{where}: timestamps unit {value!r} s is not a plausible clock period "
                        "(give seconds, between 1e-15 and 1, e.g. 5e-9)")
    return u


class PhotonHdf5Source(TagSource):
    """A Photon-HDF5 file's ``/photon_data`` (timestamps, detectors), streamed in chunks.

    ``timestamps_unit`` (s) is needed when the file lacks
    ``timestamps_specs/timestamps_unit``; if the file has one, a different value
    is refused. A file with a single ``/photon_data0`` group instead of
    ``/photon_data`` is read with a warning; a multi-spot file is refused.
    """

    format = "photon-hdf5"

    def __init__(self, path: str | os.PathLike[str], timestamps_unit: float | None = None, *,
                 chunk_tags: int = DEFAULT_CHUNK_TAGS):
        super().__init__(str(path))
        self.chunk_tags = _check_size("chunk_tags", chunk_tags)
        self._f = _h5_open(self.path)
        self._scan: dict[str, Any] | None = None
        try:
            self._setup(timestamps_unit)
        except DataError:
            self._f.close()
            raise
        except _H5_ERRORS as e:
            self._f.close()
            raise DataError(f"{self.path}: damaged HDF5 file ({_one_line(e)})") from None

    def _setup(self, user_unit: float | None) -> None:
        f = self._f
        if "photon_data" in f:
            name = "photon_data"
        else:
            spots = sorted(k for k in f.keys() if re.fullmatch(r"photon_data\d+", k))
            if not spots:
                raise DataError(f"{self.path}: no /photon_data group: not a Photon-HDF5 file")
            if len(spots) > 1:
                raise DataError(f"{self.path}: a multi-spot Photon-HDF5 file "
                                f"({', '.join('/' + s for s in spots)}); only single-spot "
                                "files are supported")
            name = spots[0]
            log.warning("%s: non-conforming Photon-HDF5: reading /%s (the specification "
                        "names it /photon_data)", self.path, name)
        self.group = "/" + name
        g = f[name]
        if not isinstance(g, h5py.Group) or not isinstance(g.get("timestamps"), h5py.Dataset):
            raise DataError(f"{self.path}: {self.group}/timestamps is missing")
        ts = g["timestamps"]
        if ts.ndim != 1 or ts.dtype.kind not in "iu":
            raise DataError(f"{self.path}: {self.group}/timestamps is {ts.dtype} of shape "
                            f"{ts.shape}; Photon-HDF5 timestamps are a 1-D integer array")
        self._ts = ts
        self.n_tags = int(ts.shape[0])
        det = g.get("detectors")
        self._det: h5py.Dataset | None = None
        self._single_detector: int | None = None
        if det is None:
            ids = self._setup_ids()
            if ids is not None and len(ids) == 1 and 0 <= ids[0] <= 255:
                self._single_detector = int(ids[0])
            elif "setup/num_pixels" in f and int(f["setup/num_pixels"][()]) == 1:
                self._single_detector = 0
            else:
                raise DataError(f"{self.path}: {self.group}/detectors is missing (allowed "
                                "only for a single-detector setup)")
        else:
            if not isinstance(det, h5py.Dataset) or det.ndim != 1 or det.dtype.kind not in "iu":
                raise DataError(f"{self.path}: {self.group}/detectors is not a 1-D integer "
                                "array")
            if det.shape[0] != ts.shape[0]:
                raise DataError(f"{self.path}: {self.group} has {ts.shape[0]} timestamps but "
                                f"{det.shape[0]} detectors")
            self._det = det
        # the unit
        unit_path = f"{self.group}/timestamps_specs/timestamps_unit"
        file_unit = None
        if unit_path in f:
            file_unit = _valid_unit(f[unit_path][()], f"{self.path}: {unit_path}")
        if user_unit is not None:
            user_unit = _valid_unit(user_unit, self.path)
        if file_unit is None and user_unit is None:
            raise DataError(f"{self.path}: {unit_path} is missing, so the time of a tag is "
                            "unknown; give the clock period in seconds with --timestamps-unit "
                            "(e.g. --timestamps-unit 5e-9)")
        if file_unit is not None and user_unit is not None and \
                abs(file_unit - user_unit) > 1e-9 * file_unit:
            raise DataError(f"{self.path}: the file's timestamps_unit is {file_unit!r} s but "
                            f"{user_unit!r} s was given; leave --timestamps-unit out to use the "
                            "file's")
        self.timestamps_unit_s = file_unit if file_unit is not None else user_unit
        self.unit_from = "file" if file_unit is not None else "user"
        whole = _whole_ps(self.timestamps_unit_s)
        self._unit_ps = whole
        self._ratio = None if whole is not None else \
            _ratio_ps(self.timestamps_unit_s).limit_denominator(10**6)
        if whole is None:
            log.warning("%s: timestamps unit %r s is not a whole number of ps; times are "
                        "rounded to the nearest ps", self.path, self.timestamps_unit_s)
        self.has_nanotimes = "nanotimes" in g

    def _setup_ids(self) -> list[int] | None:
        ds = _h5_get(self._f, "setup/detectors/id")
        if isinstance(ds, h5py.Dataset) and ds.dtype.kind in "iu" and ds.ndim == 1:
            try:
                return [int(x) for x in ds[()]]
            except _H5_ERRORS:
                return None
        return None

    def _labels(self) -> list[str] | None:
        ds = _h5_get(self._f, "setup/detectors/label")
        if not isinstance(ds, h5py.Dataset):
            return None
        try:
            out = []
            for v in np.atleast_1d(ds[()]):
                s = bytes(v).decode("utf-8") if isinstance(v, bytes | np.bytes_) else str(v)
                if not s.isprintable():
                    return None  # garbage (as in some LabVIEW-written files)
                out.append(s)
            return out
        except (UnicodeDecodeError, *_H5_ERRORS):
            return None

    def _read(self, what: str, i: int, j: int) -> np.ndarray:
        ds = self._ts if what == "timestamps" else self._det
        try:
            return ds[i:j]
        except _H5_ERRORS as e:
            raise DataError(f"{self.path}: cannot read {self.group}/{what} at tags {i}..{j} "
                            f"({_one_line(e)})") from None

    def _chunks(self, chunk_tags: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        chunk = self.chunk_tags if chunk_tags is None else _check_size("chunk_tags", chunk_tags)
        n = self.n_tags
        for i in range(0, n, chunk):
            j = min(n, i + chunk)
            raw = self._read("timestamps", i, j)
            if raw.dtype == np.uint64 and raw.shape[0] and int(raw.max()) > _INT64_MAX:
                raise DataError(f"{self.path}: {self.group}/timestamps holds values beyond "
                                f"int64 near tag {i}")
            t = raw.astype(np.int64, copy=False)
            if self._unit_ps is not None:
                u = self._unit_ps
                if t.shape[0] and (int(t.max()) > _INT64_MAX // u
                                   or int(t.min()) < -(_INT64_MAX // u)):
                    raise DataError(f"{self.path}: timestamps near tag {i} exceed the int64 ps "
                                    "range")
                ts = t * np.int64(u)
            else:
                if t.shape[0] and int(t.min()) < 0:
                    raise DataError(f"{self.path}: negative timestamps near tag {i} with a "
                                    "unit that is not a whole number of ps")
                ts = _scale_round(t, self._ratio)
            yield ts, self._detectors(i, j)

    def _detectors(self, i: int, j: int) -> np.ndarray:
        """Channels of tags i..j as uint8, checked."""
        if self._det is None:
            return np.full(j - i, self._single_detector, np.uint8)
        d = self._read("detectors", i, j)
        if d.shape[0] and (int(d.min()) < 0 or int(d.max()) > 255):
            bad = int(np.flatnonzero((d < 0) | (d > 255))[0])
            raise DataError(f"{self.path}: detector {int(d[bad])} at tag {i + bad} is "
                            "not a channel number 0..255")
        return d.astype(np.uint8)

    def blocks(self, block_tags: int = 1 << 20, start_ps: int | None = None,
               stop_ps: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return _stream(self._chunks(), self.path, block_tags, start_ps, stop_ps)

    def scan(self) -> dict[str, Any]:
        """Tags per channel, from one pass over the detectors array."""
        if self._scan is None:
            counts = np.zeros(256, np.int64)
            if self._det is None:
                counts[self._single_detector] = self.n_tags
            else:
                for i in range(0, self.n_tags, self.chunk_tags):
                    d = self._detectors(i, min(self.n_tags, i + self.chunk_tags))
                    counts += np.bincount(d, minlength=256)
            by_ch = {int(c): int(counts[c]) for c in np.flatnonzero(counts)}
            self._scan = {"tags_by_channel": by_ch, "channels": sorted(by_ch)}
        return dict(self._scan)

    def describe(self, scan: bool = False) -> dict[str, Any]:
        """The file's metadata; ``channels`` are the declared detector ids unless scanned."""
        f = self._f

        def get(name: str) -> Any:
            ds = _h5_get(f, name)
            if not isinstance(ds, h5py.Dataset) or ds.shape != ():
                return None
            try:
                v = ds[()]
            except _H5_ERRORS:
                return None
            s = _h5_str(v)
            if s is not None:
                return s
            return v.item() if isinstance(v, np.generic) else v

        mtype = get(f"{self.group}/measurement_specs/measurement_type")
        d: dict[str, Any] = {
            "path": self.path,
            "format": self.format,
            "format_version": get("identity/format_version"),
            "group": self.group,
            "n_tags": self.n_tags,
            "resolution_ps": self._unit_ps if self._unit_ps is not None
            else float(self._ratio),
            "timestamps_unit_s": self.timestamps_unit_s,
            "timestamps_unit_from": self.unit_from,
            "timestamps_rounded": self._unit_ps is None,
            "measurement_type": mtype,
            "acquisition_duration_s": get("acquisition_duration"),
            "description": get("description"),
            "creation_time": get("identity/creation_time"),
            "software": " ".join(s for s in (get("identity/software"),
                                             get("identity/software_version")) if s) or None,
            "num_spots": get("setup/num_spots"),
            "detector_labels": self._labels(),
            "has_nanotimes": self.has_nanotimes,
            "channels": self._setup_ids(),
        }
        if scan or self._scan is not None:
            d.update(self.scan())
        return d

    def close(self) -> None:
        try:
            self._f.close()
        except _H5_ERRORS:  # pragma: no cover - closing a damaged file
            pass


# -- detection ---------------------------------------------------------------------------

def open_tag_file(path: str | os.PathLike[str], timestamps_unit: float | None = None,
                  recording_opener: Callable[[str], TagSource] | None = None) -> TagSource:
    """Open a time-tag file by its content: qkdctl recording, Photon-HDF5 or PicoQuant PTU.

    ``timestamps_unit`` (s) is for Photon-HDF5 files that lack one; given for a
    PTU file (which states its resolution) it is refused. ``recording_opener``
    opens qkdctl recordings (:class:`qkdctl.recording.Recording`).
    """
    path = os.fspath(path)
    kind, head = _sniff(path)
    if kind == "ptu":
        if timestamps_unit is not None:
            raise DataError(f"{path}: a PicoQuant PTU file states its own resolution; "
                            "--timestamps-unit is only for Photon-HDF5 files without a unit")
        return PtuSource(path)
    if kind == "hdf5":
        f = _h5_open(path)
        try:
            is_rec = QKD_GROUP in f
        except _H5_ERRORS as e:
            raise DataError(f"{path}: damaged HDF5 file ({_one_line(e)})") from None
        finally:
            f.close()
        if is_rec:
            if recording_opener is None:
                raise DataError(f"{path}: a qkdctl recording; opening it needs the recording "
                                "module (recording_opener=qkdctl.recording.Recording)")
            if timestamps_unit is not None and abs(float(timestamps_unit) - 1e-12) > 1e-21:
                raise DataError(f"{path}: a qkdctl recording has timestamps in ps; "
                                "--timestamps-unit does not apply")
            return recording_opener(path)
        return PhotonHdf5Source(path, timestamps_unit)
    if not head:
        raise DataError(f"{path}: empty file, not a time-tag file")
    for legacy in (b"PicoHarp", b"HydraHarp", b"TimeHarp"):
        if head.startswith(legacy):
            raise DataError(f"{path}: a legacy PicoQuant file (.pt2/.pt3/.ht2/.ht3); only the "
                            "unified PTU format is supported (re-save it as .ptu)")
    other = {t.value: t.name for t in ptufile.PqFileType}.get(head[:8])
    if other is not None:
        raise DataError(f"{path}: a PicoQuant {other} file, which holds no time-tag records "
                        "(those are in PTU files)")
    raise DataError(f"{path}: not a known time-tag file (expected a qkdctl recording, "
                    "Photon-HDF5 or PicoQuant PTU)")
