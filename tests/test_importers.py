"""Importers: the real PicoQuant and Photon-HDF5 files of ../shared/data, and bad files.

The real files are read in place (never copied into the project, never
modified); every bad file is a truncated or corrupted copy made in tmp_path.
"""

from __future__ import annotations

import builtins
import json
import logging
import shutil
import struct
from fractions import Fraction
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import ptufile
import pytest

from qkdctl.errors import DataError
from qkdctl.importers import (
    PTU_T2_SYNC_CHANNEL,
    PhotonHdf5Source,
    PtuSource,
    open_tag_file,
)
from qkdctl.tags import raw_statistics, time_range

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PQ = DATA / "picoquant"
PHDF5_MIN = DATA / "photon-hdf5" / "photon_hdf5_min.h5"

pytestmark = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"the shared real-data folder {DATA} is absent")

#: the MANIFEST's facts
FACTS = {
    "picoharp_v30_t2.ptu": dict(
        mode="T2", record_type=0x00010203, res_ps=4, records=929_254, photons=920_177,
        by_ch={0: 531_477, 1: 388_700},
        first=[32486569, 34975036, 35075042, 39251037, 40145286], first_ch=[0, 0, 1, 0, 0],
        last=1_912_597_668_189),
    "hydraharp_v20_t2.ptu": dict(
        mode="T2", record_type=0x01010204, res_ps=1, records=435_319, photons=305_565,
        by_ch={0: 305_565},
        first=[24433765, 42010976, 42303858, 65241860, 71933885], first_ch=[0, 0, 0, 0, 0],
        last=4_999_964_931_763),
    "hydraharp_v20_t3.ptu": dict(
        mode="T3", record_type=0x01010304, res_ps=64, records=106_349, photons=77_883,
        by_ch={0: 45_012, 1: 32_871},
        first=[1569, 5763, 5868, 5969, 7134], first_ch=[1, 0, 0, 1, 1],
        last=49_999_358),
}
T3_SYNC_RATE = 4_999_960


def real(name: str) -> Path:
    p = PQ / name if name.endswith(".ptu") else DATA / name
    if not p.is_file():
        pytest.skip(f"real data file {p} is absent")
    return p


def concat(blocks) -> tuple[np.ndarray, np.ndarray]:
    ts, ch = [], []
    for t, c in blocks:
        assert t.dtype == np.int64 and c.dtype == np.uint8 and t.shape == c.shape
        ts.append(t)
        ch.append(c)
    if not ts:
        return np.empty(0, np.int64), np.empty(0, np.uint8)
    return np.concatenate(ts), np.concatenate(ch)


def one_line_error(excinfo, path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    assert "Traceback" not in msg
    return msg


def t3_ps(nsync, dtime) -> list[int]:
    """Reference T3 times with Python integers: round(n * 1e12 / rate) + dtime * 64."""
    return [int(Fraction(int(n) * 10**12, T3_SYNC_RATE) + Fraction(1, 2)) // 1 + int(d) * 64
            for n, d in zip(nsync, dtime, strict=True)]


_ALL: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def all_tags(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in _ALL:
        with PtuSource(real(name)) as src:
            _ALL[name] = concat(src.blocks(1 << 22))
    return _ALL[name]


# -- building PTU files from real headers ------------------------------------------------

def header_of(name: str) -> tuple[bytes, int]:
    data = real(name).read_bytes()
    with ptufile.PtuFile(real(name)) as p:
        return data, int(p.record_offset)


def tag_value_offset(data: bytes, tagid: str) -> int:
    """Byte offset of the 8-byte value of a header tag."""
    i = data.index(tagid.encode() + b"\0")
    assert i % 8 == 0
    return i + 40


def make_ptu(path: Path, name: str, records: np.ndarray, announced: int | None = None,
             patch: dict[str, int] | None = None) -> Path:
    """A PTU file with the header of a real file and the given raw records."""
    data, off = header_of(name)
    head = bytearray(data[:off])
    n = len(records) if announced is None else announced
    i = tag_value_offset(head, "TTResult_NumberOfRecords")
    head[i:i + 8] = struct.pack("<q", n)
    for tag, value in (patch or {}).items():
        i = tag_value_offset(head, tag)
        head[i:i + 8] = struct.pack("<q", value)
    path.write_bytes(bytes(head) + np.asarray(records, "<u4").tobytes())
    return path


def raw_records(name: str) -> np.ndarray:
    data, off = header_of(name)
    return np.frombuffer(data, "<u4", offset=off)


# HydraHarp V2 record layouts (PicoQuant): special bit 31, channel 25..30, time/nsync
def ht2_photon(ch, t):
    return (ch << 25) | t


def ht2_sync(t):
    return (1 << 31) | t


def ht_overflow(count):
    return (1 << 31) | (0x3F << 25) | count


def ht3_photon(ch, dtime, nsync):
    return (ch << 25) | (dtime << 10) | nsync


# -- the real PTU files ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FACTS))
def test_ptu_manifest_facts(name):
    f = FACTS[name]
    with PtuSource(real(name)) as src:
        d = src.describe(scan=True)
        assert d["format"] == "ptu" and d["mode"] == f["mode"]
        assert d["record_type_code"] == f"0x{f['record_type']:08x}"
        assert d["resolution_ps"] == f["res_ps"]
        assert d["n_records"] == d["n_records_announced"] == f["records"]
        assert d["truncated"] is False
        assert d["n_tags"] == d["n_photons"] == f["photons"]
        assert d["photons_by_channel"] == f["by_ch"]
        assert d["channels"] == sorted(f["by_ch"])
        assert d["n_markers"] == 0
        assert d["n_overflows"] == f["records"] - f["photons"]
        assert d["creation_time"] is not None
        json.dumps(d)  # plain types only
        # the file's own numbers: ticks (T2) or sync numbers (T3)
        ph = list(src.photons())
        gt = np.concatenate([p.global_time for p in ph])
        ch = np.concatenate([p.channels for p in ph])
    assert gt.shape[0] == f["photons"]
    assert gt[:5].tolist() == f["first"] and ch[:5].tolist() == f["first_ch"]
    assert int(gt[-1]) == f["last"]
    ts, tch = all_tags(name)
    assert ts.shape[0] == f["photons"]
    assert {int(c): int(k) for c, k in zip(*np.unique(tch, return_counts=True),
                                            strict=True)} == f["by_ch"]
    if f["mode"] == "T2":
        assert ts[:5].tolist() == [t * f["res_ps"] for t in f["first"]]
        assert int(ts[-1]) == f["last"] * f["res_ps"]
        assert np.array_equal(ts, gt * f["res_ps"]) and np.array_equal(tch, ch)


def test_ptu_t3_times_from_sync_numbers():
    name = "hydraharp_v20_t3.ptu"
    with PtuSource(real(name)) as src:
        d = src.describe()
        assert d["sync_rate_hz"] == T3_SYNC_RATE and d["dtime_resolution_ps"] == 64
        assert d["sync_period_ps"] == pytest.approx(1e12 / T3_SYNC_RATE)
        ph = list(src.photons())
    nsync = np.concatenate([p.global_time for p in ph])
    dtime = np.concatenate([p.dtime for p in ph])
    ts, ch = all_tags(name)
    # the file happens to be in time order, so the tags are the photons in file order
    assert ts[:5].tolist() == t3_ps(nsync[:5], dtime[:5])
    assert int(ts[-1]) == t3_ps(nsync[-1:], dtime[-1:])[0]
    sample = np.random.default_rng(0).choice(ts.shape[0], 500, replace=False)
    assert ts[sample].tolist() == t3_ps(nsync[sample], dtime[sample])
    # each tag lies inside its own sync period
    assert np.all(dtime.astype(np.int64) * 64 < 1e12 / T3_SYNC_RATE)
    assert (ts[:5] * T3_SYNC_RATE // 10**12).tolist() == FACTS[name]["first"]


def test_picoharp_stop_reason_and_acquisition_time():
    with PtuSource(real("picoharp_v30_t2.ptu")) as src:
        d = src.describe()
    assert d["instrument"] == "PicoHarp 300"
    assert d["acquisition_time_s"] == 60.0           # what was planned ...
    assert d["stop_reason"] == "MANUAL" and d["stop_reason_code"] == 1
    assert d["stopped_after_s"] == pytest.approx(7.652)  # ... and when it was stopped
    ts, _ = all_tags("picoharp_v30_t2.ptu")
    assert ts[-1] * 1e-12 == pytest.approx(7.6504, abs=5e-5)


def test_describe_reads_only_the_header(monkeypatch):
    with PtuSource(real("picoharp_v30_t2.ptu")) as src:
        monkeypatch.setattr(src, "_decoded", lambda *a, **k: pytest.fail("records read"))
        d = src.describe()
    assert d["n_tags"] is None and d["channels"] is None and d["n_markers"] is None
    assert d["n_records"] == 929_254


@pytest.mark.parametrize("name", sorted(FACTS))
def test_ptu_chunked_decoding_equals_ptufile_whole_file(name):
    """The overflow carry between chunks: any chunk size gives ptufile's one-call result."""
    with ptufile.PtuFile(real(name)) as p:
        dec = p.decode_records()
    ph = dec[dec["channel"] >= 0]
    for chunk in (997, 1 << 16, 1 << 20):
        with PtuSource(real(name), chunk_records=chunk) as src:
            got = list(src.photons())
        assert np.array_equal(np.concatenate([g.global_time for g in got]),
                              ph["time"].astype(np.int64)), chunk
        assert np.array_equal(np.concatenate([g.channels for g in got]),
                              ph["channel"].astype(np.uint8)), chunk


@pytest.mark.parametrize("name", sorted(FACTS))
def test_ptu_chunk_of_one_record(tmp_path, name):
    rec = raw_records(name)[:3000]
    path = make_ptu(tmp_path / "head.ptu", name, rec)
    with ptufile.PtuFile(path) as p:
        dec = p.decode_records()
    ph = dec[dec["channel"] >= 0]
    assert (dec["channel"] < 0).sum() > 20  # the sample holds overflows
    with PtuSource(path, chunk_records=1) as src:
        got = list(src.photons())
        one = concat(src.blocks(7))
    with PtuSource(path) as src:
        whole = concat(src.blocks())
    assert np.array_equal(np.concatenate([g.global_time for g in got]),
                          ph["time"].astype(np.int64))
    assert np.array_equal(one[0], whole[0]) and np.array_equal(one[1], whole[1])


@pytest.mark.parametrize("name", sorted(FACTS))
def test_ptu_small_blocks_equal_one_big_block(name):
    ts, ch = all_tags(name)
    with PtuSource(real(name), chunk_records=4093) as src:
        blocks = list(src.blocks(block_tags=1000))
    sizes = [b[0].shape[0] for b in blocks]
    assert all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000
    t2, c2 = concat(blocks)
    assert np.array_equal(t2, ts) and np.array_equal(c2, ch)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_ptu_time_range_equals_slicing(name):
    ts, ch = all_tags(name)
    a, b = int(ts[len(ts) // 3]), int(ts[2 * len(ts) // 3])
    with PtuSource(real(name)) as src:
        for start, stop in ((a, b), (a + 1, b + 1), (a, None), (None, b), (None, None),
                            (int(ts[0]) - 10, int(ts[-1]) + 10), (b, a), (a, a)):
            got = concat(src.blocks(1000, start, stop))
            sl = time_range(ts, start, stop)
            assert np.array_equal(got[0], ts[sl]), (start, stop)
            assert np.array_equal(got[1], ch[sl]), (start, stop)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_ptu_raw_statistics(name):
    f = FACTS[name]
    ts, _ = all_tags(name)
    with open_tag_file(real(name)) as src:
        st = raw_statistics(src, block_tags=50_000)
    assert st["tags"] == f["photons"] and st["tags_by_channel"] == f["by_ch"]
    assert st["first_timestamp_ps"] == int(ts[0]) and st["last_timestamp_ps"] == int(ts[-1])
    assert st["duration_s"] == pytest.approx((int(ts[-1]) - int(ts[0])) * 1e-12)


def test_ptu_streaming_memory_is_bounded():
    import tracemalloc

    ts, _ = all_tags("picoharp_v30_t2.ptu")
    whole = ts.nbytes * 2  # timestamps + records, at least, for a whole-file decode
    with PtuSource(real("picoharp_v30_t2.ptu"), chunk_records=1 << 14) as src:
        tracemalloc.start()
        try:
            n = sum(t.shape[0] for t, _ in src.blocks(1 << 14))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert n == ts.shape[0]
    assert peak < 6e6 < whole, peak


def test_t3_header_tag_out_of_order_is_tolerated_quietly(caplog):
    caplog.set_level(logging.DEBUG)
    with PtuSource(real("hydraharp_v20_t3.ptu")) as src:
        assert src.describe()["mode"] == "T3"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("UsrHeadName" in r.getMessage() for r in caplog.records
               if r.name == "qkdctl.importers")


def test_format_is_detected_by_content_not_extension(tmp_path):
    a = tmp_path / "tags.h5"
    shutil.copy(real("hydraharp_v20_t3.ptu"), a)
    with open_tag_file(a) as src:
        assert isinstance(src, PtuSource)
    b = tmp_path / "tags.ptu"
    shutil.copy(real("photon-hdf5/photon_hdf5_min.h5"), b)
    with open_tag_file(b, timestamps_unit=5e-9) as src:
        assert isinstance(src, PhotonHdf5Source)


# -- synthetic PTU records: sync events, ordering ----------------------------------------

def test_hydraharp_t2_sync_events_get_their_own_channel(tmp_path):
    rec = [ht2_photon(0, 100), ht2_sync(150), ht2_photon(1, 200), ht_overflow(1),
           ht2_sync(5), ht2_photon(0, 10), ht_overflow(2), ht2_photon(2, 7)]
    path = make_ptu(tmp_path / "sync.ptu", "hydraharp_v20_t2.ptu", rec)
    with ptufile.PtuFile(path) as p:  # why: ptufile calls a sync a photon on channel 0
        assert p.decode_records()["channel"][1] == 0
    w = 1 << 25
    for chunk in (1, 3, 100):
        with PtuSource(path, chunk_records=chunk) as src:
            ts, ch = concat(src.blocks())
            d = src.describe(scan=True)
        assert ts.tolist() == [100, 150, 200, w + 5, w + 10, 3 * w + 7]
        assert ch.tolist() == [0, PTU_T2_SYNC_CHANNEL, 1, PTU_T2_SYNC_CHANNEL, 0, 2]
    assert d["sync_channel"] == PTU_T2_SYNC_CHANNEL
    assert d["n_sync_events"] == 2 and d["n_photons"] == 4 and d["n_tags"] == 6
    assert d["photons_by_channel"] == {0: 2, 1: 1, 2: 1}
    assert d["channels"] == [0, 1, 2, PTU_T2_SYNC_CHANNEL]


def test_t3_photons_are_sorted_within_a_sync_period(tmp_path):
    rec = [ht3_photon(1, 500, 10), ht3_photon(0, 100, 10), ht3_photon(0, 5, 11),
           ht3_photon(1, 4000, 12),   # dtime beyond one period: later than sync 13's first
           ht3_photon(0, 0, 13), ht_overflow(1), ht3_photon(1, 7, 3)]
    path = make_ptu(tmp_path / "t3.ptu", "hydraharp_v20_t3.ptu", rec)
    want = sorted(zip(t3_ps([10, 10, 11, 12, 13, 1027], [500, 100, 5, 4000, 0, 7]),
                      [1, 0, 0, 1, 0, 1], strict=True))
    for chunk in (1, 2, 3, 1000):
        with PtuSource(path, chunk_records=chunk) as src:
            ts, ch = concat(src.blocks(2))
            sync = np.concatenate([p.global_time for p in src.photons()])
        assert list(zip(ts.tolist(), ch.tolist(), strict=True)) == want, chunk
        assert sync.tolist() == [10, 10, 11, 12, 13, 1027]


def test_t3_decreasing_sync_numbers_are_refused(tmp_path):
    rec = [ht3_photon(0, 0, 5), ht3_photon(0, 0, 20), ht3_photon(1, 0, 15)]
    path = make_ptu(tmp_path / "bad.ptu", "hydraharp_v20_t3.ptu", rec)
    with PtuSource(path, chunk_records=1) as src, pytest.raises(DataError) as e:
        concat(src.blocks())
    msg = one_line_error(e, path)
    assert "sync numbers decrease at photon 2" in msg and "sync 20 then 15" in msg


def test_t2_decreasing_times_are_refused(tmp_path):
    rec = [ht2_photon(0, 100), ht2_photon(0, 300), ht2_photon(1, 200)]
    path = make_ptu(tmp_path / "bad.ptu", "hydraharp_v20_t2.ptu", rec)
    with PtuSource(path) as src, pytest.raises(DataError) as e:
        concat(src.blocks())
    assert "timestamps decrease at tag 2 (300 ps then 200 ps)" in one_line_error(e, path)


# -- bad PTU files -----------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 1000, 1000 * 4 + 2])
def test_truncated_ptu_reads_the_complete_records_and_warns(tmp_path, caplog, keep):
    name = "hydraharp_v20_t3.ptu"
    data, off = header_of(name)
    path = tmp_path / "cut.ptu"
    path.write_bytes(data[:off + keep])
    n = keep // 4
    caplog.set_level(logging.WARNING)
    with PtuSource(path) as src:
        d = src.describe()
        got = concat(src.blocks(100))
    assert d["truncated"] is True and d["n_records"] == n
    assert d["n_records_announced"] == FACTS[name]["records"]
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and str(path) in warn[0]
    assert f"announces {FACTS[name]['records']} records" in warn[0]
    assert f"holds {n} complete records" in warn[0]
    if keep % 4:
        assert "partial record of 2 bytes" in warn[0]
    with PtuSource(real(name), chunk_records=max(n, 1)) as full:
        first = next(full.photons())
    k = first.global_time.shape[0] if n else 0
    ts, ch = all_tags(name)
    assert np.array_equal(got[0], ts[:k]) and np.array_equal(got[1], ch[:k])


@pytest.mark.parametrize("cut", [8, 16, 100, 1000, -49, -48, -1])
def test_ptu_with_a_cut_header_is_refused(tmp_path, cut):
    data, off = header_of("hydraharp_v20_t3.ptu")
    path = tmp_path / "cut.ptu"
    path.write_bytes(data[:cut if cut > 0 else off + cut])
    with pytest.raises(DataError) as e:
        open_tag_file(path)
    assert "PTU header truncated or corrupted" in one_line_error(e, path)


def patched(tmp_path, name, tag, value=None, at=40, raw=None) -> Path:
    data = bytearray(real(name).read_bytes())
    i = tag_value_offset(data, tag) - 40 + at
    data[i:i + 8] = struct.pack("<q", value) if raw is None else raw
    path = tmp_path / f"patched_{tag}_{at}.ptu"
    path.write_bytes(bytes(data))
    return path


def test_ptu_bad_magic(tmp_path):
    data = bytearray(real("hydraharp_v20_t2.ptu").read_bytes())
    data[0:2] = b"XX"
    path = tmp_path / "magic.ptu"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        PtuSource(path)
    assert "not a PicoQuant PTU file" in one_line_error(e, path)
    with pytest.raises(DataError) as e:
        open_tag_file(path)
    assert "not a known time-tag file" in one_line_error(e, path)


def test_ptu_garbage_tag_type_is_refused(tmp_path):
    # a type code ptufile does not know: it stops reading the header there, silently
    path = patched(tmp_path, "hydraharp_v20_t3.ptu", "TTResultFormat_TTTRRecType",
                   at=36, raw=struct.pack("<I", 0x12345678))
    with pytest.raises(DataError) as e:
        open_tag_file(path)
    msg = one_line_error(e, path)
    assert "corrupted PTU header" in msg and "0x12345678" in msg


@pytest.mark.parametrize("length", [10**12, -5, 1 << 62])
def test_ptu_garbage_string_length_is_refused(tmp_path, length):
    path = patched(tmp_path, "picoharp_v30_t2.ptu", "File_Comment", length)
    with pytest.raises(DataError) as e:
        open_tag_file(path)
    assert "PTU header" in one_line_error(e, path)


def test_ptu_garbage_tag_name_is_refused(tmp_path):
    path = patched(tmp_path, "picoharp_v30_t2.ptu", "TTResultFormat_TTTRRecType", at=0,
                   raw=b"garbage!")
    with pytest.raises(DataError) as e:
        open_tag_file(path)
    assert "lacks TTResultFormat_TTTRRecType" in one_line_error(e, path)


def test_ptu_unsupported_record_type_is_refused(tmp_path):
    path = patched(tmp_path, "hydraharp_v20_t3.ptu", "TTResultFormat_TTTRRecType", 0x00010308)
    with pytest.raises(DataError) as e:
        open_tag_file(path)
    msg = one_line_error(e, path)
    assert "record type 0x00010308 is not supported by ptufile" in msg


def test_ptu_mode_and_record_type_must_agree(tmp_path):
    path = patched(tmp_path, "hydraharp_v20_t3.ptu", "TTResultFormat_TTTRRecType", 0x01010204)
    with pytest.raises(DataError) as e:
        open_tag_file(path)
    assert "says T3 mode but record type HydraHarp2T2 is T2" in one_line_error(e, path)


def test_ptu_random_header_corruption_never_escapes_as_a_traceback(tmp_path):
    data, off = header_of("hydraharp_v20_t3.ptu")
    rng = np.random.default_rng(1)
    outcomes = {"ok": 0, "refused": 0}
    for k in range(150):
        b = bytearray(data)
        at, n = int(rng.integers(0, off)), int(rng.integers(1, 16))
        b[at:at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        path = tmp_path / f"fuzz{k}.ptu"
        path.write_bytes(bytes(b))
        try:
            with open_tag_file(path) as src:
                src.describe(scan=True)
                concat(src.blocks())
            outcomes["ok"] += 1
        except DataError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 20 and outcomes["ok"] > 20, outcomes


def test_ptu_random_record_corruption_is_found_or_harmless(tmp_path):
    data, off = header_of("hydraharp_v20_t2.ptu")
    rng = np.random.default_rng(2)
    for k in range(30):
        b = bytearray(data)
        at = int(rng.integers(off, len(b) - 16))
        b[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        path = tmp_path / f"fuzz{k}.ptu"
        path.write_bytes(bytes(b))
        try:
            with open_tag_file(path) as src:
                concat(src.blocks())
        except DataError as e:
            assert "\n" not in str(e) and str(path) in str(e)


def test_timestamps_unit_is_refused_for_ptu():
    with pytest.raises(DataError) as e:
        open_tag_file(real("hydraharp_v20_t2.ptu"), timestamps_unit=1e-12)
    assert "states its own resolution" in one_line_error(e, real("hydraharp_v20_t2.ptu"))


# -- Photon-HDF5 -------------------------------------------------------------------------

def test_nonconforming_photon_hdf5_without_unit_is_refused():
    path = real("photon-hdf5/photon_hdf5_min.h5")
    for opener in (lambda: open_tag_file(path), lambda: PhotonHdf5Source(path)):
        with pytest.raises(DataError) as e:
            opener()
        msg = one_line_error(e, path)
        assert "timestamps_unit is missing" in msg
        assert "--timestamps-unit" in msg and "5e-9" in msg


def test_nonconforming_photon_hdf5_with_unit_loads(caplog):
    path = real("photon-hdf5/photon_hdf5_min.h5")
    with h5py.File(path, "r") as f:
        raw = f["photon_data0/timestamps"][()]
        det = f["photon_data0/detectors"][()]
    caplog.set_level(logging.WARNING)
    with open_tag_file(path, timestamps_unit=5e-9) as src:
        assert isinstance(src, PhotonHdf5Source)
        d = src.describe(scan=True)
        ts, ch = concat(src.blocks())
        small = concat(src.blocks(block_tags=7))
        st = raw_statistics(src, block_tags=100)
    assert any("/photon_data0" in r.getMessage() for r in caplog.records)
    assert d["n_tags"] == 1280 and d["group"] == "/photon_data0"
    assert d["resolution_ps"] == 5000 and d["timestamps_unit_from"] == "user"
    assert d["tags_by_channel"] == {0: 727, 1: 553}
    assert d["detector_labels"] is None  # garbage bytes, not shown
    json.dumps(d)
    assert ts.shape[0] == 1280 and np.all(ts % 5000 == 0)
    assert np.array_equal(ts, raw.astype(np.int64) * 5000) and np.array_equal(ch, det)
    assert np.array_equal(small[0], ts) and np.array_equal(small[1], ch)
    assert st["tags"] == 1280 and st["tags_by_channel"] == {0: 727, 1: 553}
    a, b = int(ts[300]), int(ts[900])
    with PhotonHdf5Source(path, 5e-9, chunk_tags=64) as src:
        got = concat(src.blocks(50, a, b))
    assert np.array_equal(got[0], ts[300:900]) and np.array_equal(got[1], ch[300:900])


@pytest.mark.parametrize("unit", [5000, 0, -5e-9, float("nan"), "5 ns"])
def test_implausible_units_are_refused(unit):
    path = real("photon-hdf5/photon_hdf5_min.h5")
    with pytest.raises(DataError) as e:
        open_tag_file(path, timestamps_unit=unit)
    one_line_error(e, path)


def write_photon_hdf5(path: Path, ts, det, unit: float | None = 12.5e-9, *,
                      group: str = "photon_data", compression: dict | None = None,
                      chunks: int = 1000, extra=None) -> Path:
    """A Photon-HDF5 0.5 file as the specification lays it out."""
    with h5py.File(path, "w") as f:
        f["description"] = "test data"
        f["acquisition_duration"] = 1.5
        g = f.create_group(group)
        g.create_dataset("timestamps", data=np.asarray(ts), chunks=(chunks,), maxshape=(None,),
                         **(compression or {}))
        if det is not None:
            g.create_dataset("detectors", data=np.asarray(det), chunks=(chunks,),
                             maxshape=(None,), **(compression or {}))
        if unit is not None:
            g["timestamps_specs/timestamps_unit"] = unit
        g["measurement_specs/measurement_type"] = "generic"
        f["identity/format_name"] = "Photon-HDF5"
        f["identity/format_version"] = "0.5"
        f["identity/software"] = "qkdctl tests"
        f["setup/num_pixels"] = 2
        f["setup/num_spots"] = 1
        f["setup/detectors/id"] = np.array([0, 3], np.int32)
        f["setup/detectors/label"] = [b"APD H", b"APD V"]
        if extra:
            extra(f)
    return path


@pytest.fixture
def spec_tags():
    rng = np.random.default_rng(5)
    raw = np.cumsum(rng.integers(0, 10_000, 25_000)).astype(np.int64)
    det = rng.choice(np.array([0, 3], np.uint8), raw.shape[0])
    return raw, det


@pytest.mark.parametrize("compression", [None, "bitshuffle"])
def test_photon_hdf5_written_per_spec(tmp_path, spec_tags, compression):
    raw, det = spec_tags
    comp = dict(hdf5plugin.Bitshuffle(cname="lz4")) if compression else None
    path = write_photon_hdf5(tmp_path / "spec.hdf5", raw, det, compression=comp)
    with open_tag_file(path) as src:
        d = src.describe()
        ts, ch = concat(src.blocks(1000))
        a, b = int(ts[1000]), int(ts[20000])
        part = concat(src.blocks(333, a, b))
    assert d["group"] == "/photon_data" and d["timestamps_unit_from"] == "file"
    assert d["resolution_ps"] == 12500 and d["timestamps_rounded"] is False
    assert d["n_tags"] == raw.shape[0] and d["channels"] == [0, 3]
    assert d["detector_labels"] == ["APD H", "APD V"] and d["acquisition_duration_s"] == 1.5
    assert d["format_version"] == "0.5" and d["measurement_type"] == "generic"
    assert np.array_equal(ts, raw * 12500) and np.array_equal(ch, det)
    assert np.array_equal(part[0], ts[1000:20000]) and np.array_equal(part[1], ch[1000:20000])
    # the file's unit agrees with the given one: fine; another one: refused
    with open_tag_file(path, timestamps_unit=12.5e-9) as src:
        assert src.describe()["timestamps_unit_s"] == 12.5e-9
    with pytest.raises(DataError) as e:
        open_tag_file(path, timestamps_unit=5e-9)
    assert "the file's timestamps_unit is 1.25e-08 s" in one_line_error(e, path)


def test_photon_hdf5_unit_not_whole_ps_is_rounded(tmp_path, caplog):
    raw = np.array([0, 1, 2, 3, 5, 10**9, 10**14], np.int64)
    path = write_photon_hdf5(tmp_path / "60mhz.h5", raw, np.zeros(7, np.uint8), unit=1 / 60e6)
    caplog.set_level(logging.WARNING)
    with open_tag_file(path) as src:
        d = src.describe()
        ts, _ = concat(src.blocks())
    assert d["timestamps_rounded"] is True
    assert d["resolution_ps"] == pytest.approx(1e12 / 60e6)
    assert any("rounded" in r.getMessage() for r in caplog.records)
    want = [int(Fraction(int(x) * 50000, 3) + Fraction(1, 2)) for x in raw]
    assert ts.tolist() == want


def test_photon_hdf5_decreasing_timestamps_are_refused(tmp_path):
    path = write_photon_hdf5(tmp_path / "dec.h5", [0, 10, 20, 30, 25, 40], [0] * 6,
                             unit=1e-12, chunks=2)
    with PhotonHdf5Source(path, chunk_tags=2) as src, pytest.raises(DataError) as e:
        concat(src.blocks(1))
    assert "timestamps decrease at tag 4 (30 ps then 25 ps)" in one_line_error(e, path)


def test_photon_hdf5_single_detector_file_without_detectors(tmp_path):
    def one_pixel(f):
        del f["setup/num_pixels"], f["setup/detectors"]
        f["setup/num_pixels"] = 1

    path = write_photon_hdf5(tmp_path / "one.h5", [1, 2, 3], None, unit=1e-9, extra=one_pixel)
    with open_tag_file(path) as src:
        ts, ch = concat(src.blocks())
    assert ts.tolist() == [1000, 2000, 3000] and ch.tolist() == [0, 0, 0]
    path = write_photon_hdf5(tmp_path / "two.h5", [1, 2, 3], None, unit=1e-9)
    with pytest.raises(DataError) as e:
        open_tag_file(path)
    assert "detectors is missing" in one_line_error(e, path)


def test_photon_hdf5_with_a_user_block_is_detected(tmp_path):
    path = tmp_path / "ub.h5"
    with h5py.File(path, "w", userblock_size=512) as f:
        f["photon_data/timestamps"] = np.array([5, 6], np.int64)
        f["photon_data/detectors"] = np.array([1, 2], np.uint8)
        f["photon_data/timestamps_specs/timestamps_unit"] = 1e-12
    assert path.read_bytes()[:8] != b"\x89HDF\r\n\x1a\n"
    with open_tag_file(path) as src:
        assert concat(src.blocks())[0].tolist() == [5, 6]


@pytest.mark.parametrize("case,expect", [
    ("no_photon_data", "no /photon_data group"),
    ("multispot", "multi-spot"),
    ("float_timestamps", "1-D integer array"),
    ("length_mismatch", "3 timestamps but 2 detectors"),
    ("bad_detector", "detector 300 at tag 1"),
    ("beyond_int64", "beyond int64"),
    ("overflow_ps", "exceed the int64 ps range"),
])
def test_bad_photon_hdf5_files(tmp_path, case, expect):
    path = tmp_path / f"{case}.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("photon_data1" if case == "multispot" else
                           "other" if case == "no_photon_data" else "photon_data")
        if case == "multispot":
            f.create_group("photon_data0")
        ts = {"float_timestamps": np.array([1.0, 2.0, 3.0]),
              "beyond_int64": np.array([1, 2, 2**63 + 5], np.uint64),
              "overflow_ps": np.array([1, 2, 2**62], np.int64)}.get(case, np.array([1, 2, 3]))
        g["timestamps"] = ts
        g["detectors"] = {"length_mismatch": np.array([0, 1], np.uint8),
                          "bad_detector": np.array([0, 300, 1], np.int32)}.get(
            case, np.array([0, 1, 0], np.uint8))
        g["timestamps_specs/timestamps_unit"] = 1e-9
    with pytest.raises(DataError) as e:
        with open_tag_file(path) as src:
            concat(src.blocks())
    assert expect in one_line_error(e, path)


@pytest.mark.parametrize("size", [8, 1000, 50_000, -1000])
def test_truncated_hdf5_is_refused(tmp_path, size):
    data = real("photon-hdf5/photon_hdf5_min.h5").read_bytes()
    path = tmp_path / "cut.h5"
    path.write_bytes(data[:size] if size > 0 else data[:size])
    with pytest.raises(DataError) as e:
        with open_tag_file(path, timestamps_unit=5e-9) as src:
            concat(src.blocks())
    one_line_error(e, path)


def test_corrupted_hdf5_never_escapes_as_a_traceback(tmp_path):
    data = real("photon-hdf5/photon_hdf5_min.h5").read_bytes()
    rng = np.random.default_rng(3)
    refused = 0
    for k in range(120):
        b = bytearray(data)
        at, n = int(rng.integers(0, 8000)), int(rng.integers(1, 64))
        b[at:at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        path = tmp_path / f"fuzz{k}.h5"   # a new name each time: HDF5 caches open files
        path.write_bytes(bytes(b))
        try:
            with open_tag_file(path, timestamps_unit=5e-9) as src:
                src.describe(scan=True)
                concat(src.blocks())
        except DataError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            refused += 1
    assert refused > 10


# -- open_tag_file -----------------------------------------------------------------------

def test_qkdctl_recording_goes_to_the_recording_opener(tmp_path):
    path = tmp_path / "rec.h5"
    with h5py.File(path, "w") as f:
        f.create_group("user/qkd")
        f["photon_data/timestamps"] = np.array([1], np.int64)
    seen = []

    def opener(p):
        seen.append(p)
        return "recording"

    assert open_tag_file(path, recording_opener=opener) == "recording"
    assert seen == [str(path)]
    with pytest.raises(DataError) as e:
        open_tag_file(path)
    assert "qkdctl recording" in one_line_error(e, path)
    with pytest.raises(DataError):
        open_tag_file(path, timestamps_unit=5e-9, recording_opener=opener)


def test_open_tag_file_bad_paths(tmp_path, monkeypatch):
    missing = tmp_path / "nope.ptu"
    with pytest.raises(DataError) as e:
        open_tag_file(missing)
    assert "no such file" in one_line_error(e, missing)
    with pytest.raises(DataError) as e:
        open_tag_file(tmp_path)
    assert "is a directory" in one_line_error(e, tmp_path)
    empty = tmp_path / "empty.ptu"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as e:
        open_tag_file(empty)
    assert "empty file" in one_line_error(e, empty)
    other = tmp_path / "notes.txt"
    other.write_text("timestamps, channels\n1, 2\n")
    with pytest.raises(DataError) as e:
        open_tag_file(other)
    assert one_line_error(e, other) == (f"{other}: not a known time-tag file (expected a "
                                        "qkdctl recording, Photon-HDF5 or PicoQuant PTU)")
    legacy = tmp_path / "old.pt3"
    legacy.write_bytes(b"PicoHarp 300\0\0\0\0" + bytes(100))
    with pytest.raises(DataError) as e:
        open_tag_file(legacy)
    assert "legacy PicoQuant" in one_line_error(e, legacy)
    phu = tmp_path / "histo.phu"
    phu.write_bytes(b"PQHISTO\0" + bytes(100))
    with pytest.raises(DataError) as e:
        open_tag_file(phu)
    assert "PicoQuant PHU file" in one_line_error(e, phu)
    # unreadable (chmod cannot stop root, so refuse the open itself)
    locked = tmp_path / "locked.ptu"
    shutil.copy(real("hydraharp_v20_t2.ptu"), locked)
    real_open = builtins.open

    def deny(file, *a, **k):
        if str(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(DataError) as e:
        open_tag_file(locked)
    assert "Permission denied" in one_line_error(e, locked)


def test_bad_block_sizes_are_refused():
    with PtuSource(real("hydraharp_v20_t3.ptu")) as src:
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError):
                next(iter(src.blocks(bad)))
    with pytest.raises(ValueError):
        PtuSource(real("hydraharp_v20_t3.ptu"), chunk_records=0)
