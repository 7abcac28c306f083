"""PicoQuant HydraHarp / MultiHarp drivers through a mocked vendor library.

The library object stands in for ``HHLib`` / ``MHLib`` at the ctypes boundary:
its functions return 0 and fill the caller's buffers. The FIFO is fed with REAL
T2 records, read raw from ``hydraharp_v20_t2.ptu`` in ../shared/data, and the
driver's tags are compared with the PTU reader's for the same records.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import pytest

from qkdctl.drivers.picoquant import ACQ_TIME_MAX_MS, FLAG_FIFOFULL, HydraHarp400, MultiHarp150
from qkdctl.errors import ConfigError, InstrumentError
from qkdctl.importers import PtuSource

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_T2 = DATA / "picoquant" / "hydraharp_v20_t2.ptu"


@pytest.fixture(scope="module")
def hh_records():
    """The raw records of the HydraHarp T2 file and the PTU reader's tags (ps, channel)."""
    if not HH_T2.is_file():
        pytest.skip(f"real data file {HH_T2} is absent (the shared data folder "
                    f"{DATA} holds the PicoQuant PTU files)")
    src = PtuSource(HH_T2)
    raw = np.fromfile(src.path, np.uint32, count=src.n_records, offset=src.record_offset)
    ts = np.concatenate([t for t, _ in src.blocks()])
    ticks = np.concatenate([p.global_time for p in src.photons()])
    ch = np.concatenate([p.channels for p in src.photons()])
    src.close()
    return raw, ts, ticks, ch


def overflow_positions(raw: np.ndarray) -> np.ndarray:
    """Indices of HydraHarp V2 T2 overflow records (special bit, channel 63)."""
    return np.flatnonzero((raw >> np.uint32(25)) == np.uint32(0x7F))


class FakeLib:
    """HHLib / MHLib at the ctypes boundary; every function is a MagicMock."""

    def __init__(self, mocker, prefix: str, chunks=(), *, serial: str = "1020304",
                 n_inputs: int = 4, base_res: float = 1.0, version: str = "3.0",
                 fifofull_after: int | None = None, fail: dict[str, int] | None = None):
        self.prefix = prefix
        self.chunks = [np.asarray(c, np.uint32) for c in chunks]
        self.serial = serial
        self.n_inputs = n_inputs
        self.base_res = base_res
        self.version = version
        self.fifofull_after = fifofull_after
        self.fail = fail or {}
        self.reads = 0
        names = ["GetLibraryVersion", "GetErrorString", "OpenDevice", "CloseDevice",
                 "Initialize", "GetHardwareInfo", "GetNumOfInputChannels",
                 "GetBaseResolution", "SetInputChannelEnable", "SetSyncDiv",
                 "SetSyncChannelOffset", "SetInputChannelOffset", "StartMeas", "StopMeas",
                 "GetFlags", "ReadFiFo", "CTCStatus", "GetSyncRate", "GetCountRate",
                 "GetWarnings"]
        names += ["Calibrate", "SetSyncCFD", "SetInputCFD"] if prefix == "HH" else \
            ["SetSyncEdgeTrg", "SetInputEdgeTrg"]
        for n in names:
            impl = getattr(self, "_" + n, None) or self._ok
            setattr(self, f"{prefix}_{n}", mocker.MagicMock(side_effect=self._wrap(n, impl)))

    def _wrap(self, name, impl):
        def call(*args):
            if name in self.fail:
                return self.fail[name]
            return impl(*args)
        return call

    def calls(self, name):
        return [c.args for c in getattr(self, f"{self.prefix}_{name}").call_args_list]

    @staticmethod
    def _ok(*args):
        return 0

    def _GetLibraryVersion(self, buf):
        buf.value = self.version.encode()
        return 0

    def _GetErrorString(self, buf, code):
        buf.value = f"{self.prefix}_ERROR_{-code}".encode()
        return 0

    def _OpenDevice(self, idx, sbuf):
        if idx != 0:
            return -1
        sbuf.value = self.serial.encode()
        return 0

    def _GetHardwareInfo(self, dev, model, partno, version):
        model.value = b"HydraHarp 400" if self.prefix == "HH" else b"MultiHarp 160"
        partno.value = b"930021"
        version.value = b"2.0"
        return 0

    def _GetNumOfInputChannels(self, dev, p):
        p._obj.value = self.n_inputs
        return 0

    def _GetBaseResolution(self, dev, pres, psteps):
        pres._obj.value = self.base_res
        psteps._obj.value = 26
        return 0

    def _GetFlags(self, dev, p):
        full = self.fifofull_after is not None and self.reads >= self.fifofull_after
        p._obj.value = FLAG_FIFOFULL if full else 0
        return 0

    def _ReadFiFo(self, dev, ptr, *rest):
        pn = rest[-1]
        if self.prefix == "HH":
            assert rest[0] == 131072  # count = TTREADMAX
        chunk = self.chunks.pop(0) if self.chunks else np.empty(0, np.uint32)
        if chunk.shape[0]:
            ctypes.memmove(ptr, chunk.ctypes.data, 4 * chunk.shape[0])
        pn._obj.value = int(chunk.shape[0])
        self.reads += 1
        return 0


def read_all(tagger, fake):
    parts = []
    while fake.chunks:
        parts.append(tagger.read_block(0))
    parts.append(tagger.finish())
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def plan_after_overflow(raw: np.ndarray, first: int) -> list[np.ndarray]:
    """Chunks of at most ``first`` records, the first ending right after an overflow record."""
    ov = overflow_positions(raw)
    cut = int(ov[ov < first][-1]) + 1
    assert (raw[cut - 1] >> np.uint32(25)) == 0x7F  # the read ends on an overflow record
    out = [raw[:cut]]
    out += [raw[i:i + first] for i in range(cut, raw.shape[0], first)]
    return out


HH_SETTINGS = {"inputs": {"0": 3}, "sync_divider": 1,
               "input_cfd_level_mv": 100, "input_cfd_zerox_mv": 10,
               "sync_cfd_level_mv": 50, "sync_cfd_zerox_mv": 10,
               "input_offset_ps": {"0": 2500}, "sync_offset_ps": 0}


@pytest.mark.parametrize("plan", ["after-overflow", "small-reads"])
def test_hydraharp_tags_equal_the_ptu_readers(mocker, hh_records, plan):
    raw, ts_ptu, _ticks, ch_ptu = hh_records
    assert set(np.unique(ch_ptu)) == {0}
    chunks = plan_after_overflow(raw, 100_000) if plan == "after-overflow" else \
        [raw[i:i + 7919] for i in range(0, raw.shape[0], 7919)]
    assert max(c.shape[0] for c in chunks) <= HydraHarp400.TTREADMAX
    fake = FakeLib(mocker, "HH", chunks)
    tagger = HydraHarp400("tagger", resource="1020304", library=fake, settings=HH_SETTINGS)
    with tagger:
        assert tagger.resolution_ps == 1 and tagger.channels == (3,)
        assert fake.calls("SetInputChannelEnable") == []  # connecting changes no routing
        tagger.start()
        ts, ch = read_all(tagger, fake)
        st = tagger.status()
    assert ts.dtype == np.int64 and ch.dtype == np.uint8
    np.testing.assert_array_equal(ts, ts_ptu)
    assert ts.shape[0] == 305_565 and bool(np.all(ch == 3))
    assert st["records_read"] == raw.shape[0] and st["tags_read"] == 305_565
    assert st["record_type"] == 0x01010204
    # the vendor calls, with the library's units (mV, ps, ms) and 0-based inputs
    assert fake.calls("Initialize") == [(0, 2, 0)]
    assert fake.calls("Calibrate") == [(0,)]
    assert fake.calls("SetInputChannelEnable") == [(0, 0, 1), (0, 1, 0), (0, 2, 0), (0, 3, 0)]
    assert fake.calls("SetSyncDiv") == [(0, 1)]
    assert fake.calls("SetInputCFD") == [(0, 0, 100, 10)]
    assert fake.calls("SetSyncCFD") == [(0, 50, 10)]
    assert fake.calls("SetInputChannelOffset") == [(0, 0, 2500)]
    assert fake.calls("SetSyncChannelOffset") == [(0, 0)]
    assert fake.calls("StartMeas") == [(0, ACQ_TIME_MAX_MS)]
    assert len(fake.calls("StopMeas")) >= 1
    assert fake.calls("CloseDevice")[-1] == (0,)


def test_multiharp_ticks_are_base_resolution_and_edge_triggers(mocker, hh_records):
    raw, _ts, ticks_ptu, _ch = hh_records
    # MultiHarp T2 records have the HydraHarp V2 layout; a 160 counts 5 ps ticks
    chunks = plan_after_overflow(raw, 300_000)
    fake = FakeLib(mocker, "MH", chunks, base_res=5.0, version="3.1")
    settings = {"inputs": {"0": 1, "sync": 0}, "input_trigger_level_mv": -50,
                "input_trigger_edge": "falling", "sync_trigger_level_mv": -70,
                "sync_trigger_edge": "rising", "ref_source": "external"}
    with MultiHarp150("tagger", library=fake, settings=settings) as tagger:
        assert tagger.resolution_ps == 5 and tagger.channels == (0, 1)
        tagger.start()
        ts, ch = read_all(tagger, fake)
        assert tagger.status()["record_type"] == 0x00010207
    np.testing.assert_array_equal(ts, ticks_ptu * 5)
    assert bool(np.all(ch == 1))
    assert fake.calls("Initialize") == [(0, 2, 1)]
    assert fake.calls("SetInputEdgeTrg") == [(0, 0, -50, 0)]
    assert fake.calls("SetSyncEdgeTrg") == [(0, -70, 1)]
    assert all(len(a) == 3 for a in fake.calls("ReadFiFo"))  # MH_ReadFiFo has no count
    assert not hasattr(fake, "MH_Calibrate")


def test_fifo_full_flag_refuses_the_block_and_ends_the_run(mocker, hh_records):
    raw = hh_records[0]
    fake = FakeLib(mocker, "HH", [raw[:50_000], raw[50_000:100_000]], fifofull_after=1)
    tagger = HydraHarp400("tagger", library=fake, settings={"inputs": {"0": 3}})
    with tagger:
        tagger.start()
        with pytest.raises(InstrumentError) as e:
            tagger.read_block(0.01)
        msg = str(e.value)
        assert "FIFO overrun" in msg and "records were lost" in msg and "\n" not in msg
        assert fake.calls("StopMeas")  # the measurement is stopped at once
        with pytest.raises(InstrumentError, match="run was aborted: FIFO overrun"):
            tagger.read_block(0)
        with pytest.raises(InstrumentError, match="cannot be resumed"):
            tagger.start()
        ts, ch = tagger.finish()  # nothing of the broken run is handed out
        assert ts.shape == (0,) and ch.shape == (0,)
        tagger.start()  # a new run
        assert tagger.running


def test_stopped_run_cannot_resume_and_finish_returns_drained_tags(mocker, hh_records):
    raw, ts_ptu, _t, _c = hh_records
    fake = FakeLib(mocker, "HH", [raw[:40_000], raw[40_000:80_000]])
    with HydraHarp400("tagger", library=fake, settings={"inputs": {"0": 3}}) as tagger:
        tagger.start()
        ts1, _ = tagger.read_block(0)
        tagger.stop()  # drains the FIFO before HH_StopMeas
        with pytest.raises(InstrumentError, match="cannot be resumed"):
            tagger.start()
        with pytest.raises(InstrumentError, match="the run is stopped; call finish"):
            tagger.read_block(0)
        ts2, _ = tagger.finish()
    np.testing.assert_array_equal(np.concatenate([ts1, ts2]), ts_ptu[:ts1.shape[0] + ts2.shape[0]])
    assert ts2.shape[0] > 0


def test_unmapped_inputs_are_dropped_and_counted(mocker, hh_records, caplog):
    raw = hh_records[0]
    fake = FakeLib(mocker, "HH", [raw[:30_000]])
    with HydraHarp400("tagger", library=fake, settings={"inputs": {"1": 4}}) as tagger:
        tagger.start()
        with caplog.at_level(logging.WARNING, logger="qkdctl.drivers.picoquant"):
            ts, _ = tagger.read_block(0)
        assert ts.shape == (0,)
        assert tagger.status()["tags_dropped_unmapped"] > 0
    assert "dropped" in caplog.text


def test_missing_library_is_one_clear_error(mocker):
    mocker.patch("ctypes.CDLL", side_effect=OSError("cannot open shared object file"))
    tagger = HydraHarp400("tagger", settings={"inputs": {"0": 1}})
    with pytest.raises(InstrumentError) as e:
        tagger.connect()
    msg = str(e.value)
    assert msg.startswith("tagger: connect: the HydraHarp 400 driver needs PicoQuant's HHLib")
    assert "picoquant.com" in msg and "\n" not in msg
    assert not tagger.connected


def test_library_error_code_is_reported_with_its_text_and_the_device_closed(mocker):
    fake = FakeLib(mocker, "HH", fail={"SetInputCFD": -5})
    tagger = HydraHarp400("tagger", library=fake, settings={
        "inputs": {"0": 1}, "input_cfd_level_mv": 100, "input_cfd_zerox_mv": 10})
    with pytest.raises(InstrumentError) as e:
        tagger.connect()
    assert str(e.value) == ("tagger: HH_SetInputCFD (input 0) failed: error -5 "
                            "(HH_ERROR_5)")
    assert fake.calls("CloseDevice") and not tagger.connected


def test_serial_number_selects_the_device(mocker):
    fake = FakeLib(mocker, "HH", serial="1020304")
    tagger = HydraHarp400("tagger", resource="9999999", library=fake,
                          settings={"inputs": {"0": 1}})
    with pytest.raises(InstrumentError, match="no HydraHarp 400 with serial number "
                                              "'9999999'.*found: 1020304"):
        tagger.connect()


@pytest.mark.parametrize("settings, key", [
    ({}, "settings.inputs: missing"),
    ({"inputs": {"0": 1}, "input_cfd_level_mv": 100}, "settings.input_cfd_zerox_mv: missing"),
    ({"inputs": {"0": 1}, "input_offset_ps": {"2": 100}}, "settings.input_offset_ps.2: input 2"),
    ({"inputs": {"0": 1, "1": 1}}, "bench channel 1 is already"),
    ({"inputs": {"x": 1}}, "settings.inputs.x: an input is 'sync' or a number"),
    ({"inputs": {"0": 1}, "sync_divider": 1.5}, "expected a whole number"),
    ({"inputs": {"0": 1}, "ref_source": "gps"}, "expected one of internal, external"),
])
def test_bad_settings_are_config_errors(settings, key):
    with pytest.raises(ConfigError, match=key):
        HydraHarp400("tagger", settings=settings, config_key="bench.toml: instruments.tagger")


def test_more_inputs_than_the_instrument_has(mocker):
    fake = FakeLib(mocker, "HH", n_inputs=2)
    with pytest.raises(InstrumentError, match="has input 5, but the instrument has inputs 0..1"):
        HydraHarp400("tagger", library=fake, settings={"inputs": {"5": 1}}).connect()
