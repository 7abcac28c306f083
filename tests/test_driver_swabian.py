"""Swabian Time Tagger driver through a fake vendor ``TimeTagger`` module.

The fake module is put in ``sys.modules`` for each test; it records the calls
(with the units the vendor API takes: V, ps) and feeds stream buffers shaped
like ``TimeTagStreamBuffer``: sorted int64 ps timestamps, int channels, uint8
event types (0 TimeTag, 2 OverflowBegin, 3 OverflowEnd, 4 MissedEvents).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from qkdctl.drivers import STATIC
from qkdctl.drivers.swabian import DEFAULT_BUFFER_EVENTS, SwabianTimeTagger
from qkdctl.errors import ConfigError, InstrumentError, LimitError


class FakeBuffer:
    def __init__(self, ts, ch, types_=None, missed=None, has_overflows=None):
        self._ts = np.asarray(ts, np.int64)
        self._ch = np.asarray(ch, np.int32)
        n = self._ts.shape[0]
        self._types = np.zeros(n, np.uint8) if types_ is None else np.asarray(types_, np.uint8)
        self._missed = np.zeros(n, np.uint16) if missed is None else np.asarray(missed, np.uint16)
        self.size = n
        self.hasOverflows = bool(np.any(self._types != 0)) if has_overflows is None \
            else has_overflows
        self.tStart = 0
        self.tGetData = int(self._ts[-1]) if n else 0

    def getTimestamps(self):
        return self._ts

    def getChannels(self):
        return self._ch

    def getEventTypes(self):
        return self._types

    def getMissedEvents(self):
        return self._missed


EMPTY = FakeBuffer([], [])


@pytest.fixture
def tt(mocker, monkeypatch):
    """A fake ``TimeTagger`` module; ``tt.buffers`` is what ``getData()`` returns in turn."""
    mod = types.ModuleType("TimeTagger")
    mod.buffers = []
    tagger = mocker.MagicMock(name="tagger")
    tagger.getModel.return_value = "Time Tagger Ultra"
    tagger.getSerial.return_value = "2138000XYZ"
    tagger.getFirmwareVersion.return_value = "FW 3"
    tagger.getChannelList.return_value = [-4, -3, -2, -1, 1, 2, 3, 4]
    tagger.setDeadtime.side_effect = lambda ch, ps: (ps // 2000) * 2000
    tagger.getTriggerLevel.return_value = 0.5
    tagger.getInputDelay.return_value = 0
    tagger.getDeadtime.return_value = 6000
    tagger.getOverflows.return_value = 0
    tagger.getSensorData.return_value = "FPGA 45 C"
    mod.tagger = tagger
    mod.createTimeTagger = mocker.MagicMock(return_value=tagger)
    mod.createTimeTaggerNetwork = mocker.MagicMock(return_value=tagger)
    mod.freeTimeTagger = mocker.MagicMock(return_value=True)
    stream = mocker.MagicMock(name="stream")
    stream.getData.side_effect = lambda: mod.buffers.pop(0) if mod.buffers else EMPTY
    mod.stream = stream
    mod.TimeTagStream = mocker.MagicMock(return_value=stream)
    monkeypatch.setitem(sys.modules, "TimeTagger", mod)
    return mod


def make(**settings):
    s = {"inputs": {"1": 0, "2": 1, "-3": 2}}
    s.update(settings)
    t = SwabianTimeTagger("tagger", resource="2138000XYZ", settings=s,
                          config_key="bench.toml: instruments.tagger")
    t.poll_s = 0.001
    return t


def test_settings_reach_the_vendor_calls_in_its_units(tt):
    t = make(trigger_level_v={"1": 0.08, "2": -0.15, "-3": 0.5}, input_delay_ps={"2": 1500},
             dead_time_ps=6000)
    with t:
        tt.createTimeTagger.assert_called_once_with("2138000XYZ")
        tagger = tt.tagger
        assert [c.args for c in tagger.setTriggerLevel.call_args_list] == \
            [(1, 0.08), (2, -0.15), (-3, 0.5)]
        assert [c.args for c in tagger.setInputDelay.call_args_list] == [(2, 1500)]
        assert all(isinstance(c.args[1], int) for c in tagger.setInputDelay.call_args_list)
        assert [c.args for c in tagger.setDeadtime.call_args_list] == \
            [(-3, 6000), (1, 6000), (2, 6000)]
        t.start()
        tt.TimeTagStream.assert_called_once_with(tagger, DEFAULT_BUFFER_EVENTS, [-3, 1, 2])
        tt.stream.start.assert_called_once_with()
        ident = t.identity()
        assert (ident.make, ident.model, ident.serial) == \
            ("Swabian Instruments", "Time Tagger Ultra", "2138000XYZ")


def test_blocks_are_mapped_sorted_and_follow_each_other(tt):
    rng = np.random.default_rng(7)
    ts = np.cumsum(rng.integers(1, 5000, 3000)).astype(np.int64)
    ch = rng.choice([1, 2, -3], 3000)
    tt.buffers = [FakeBuffer(ts[:1000], ch[:1000]), FakeBuffer(ts[1000:1700], ch[1000:1700]),
                  EMPTY, FakeBuffer(ts[1700:2500], ch[1700:2500])]
    with make() as t:
        t.start()
        a_ts, a_ch = t.read_block(0.02)
        tt.buffers.append(FakeBuffer(ts[2500:], ch[2500:]))
        t.stop()
        b_ts, b_ch = t.finish()
    got_ts = np.concatenate([a_ts, b_ts])
    got_ch = np.concatenate([a_ch, b_ch])
    assert got_ts.dtype == np.int64 and got_ch.dtype == np.uint8
    np.testing.assert_array_equal(got_ts, ts)
    np.testing.assert_array_equal(got_ch, np.select([ch == 1, ch == 2, ch == -3], [0, 1, 2]))
    assert a_ts.shape[0] >= 1000 and b_ts.shape[0] >= 500


def test_a_block_with_an_overflow_is_refused_and_ends_the_run(tt):
    good = FakeBuffer([100, 200, 300], [1, 2, 1])
    # the tagger fell behind: OverflowBegin, MissedEvents per channel, OverflowEnd
    bad = FakeBuffer([400, 5_000_000, 5_000_000, 9_000_000, 9_100_000],
                     [1, 1, 2, 1, 2], types_=[0, 2, 4, 3, 0], missed=[0, 0, 1234, 0, 0])
    tt.buffers = [good]
    with make() as t:
        t.start()
        ts, ch = t.read_block(0)
        np.testing.assert_array_equal(ts, [100, 200, 300])
        tt.buffers = [bad]
        with pytest.raises(InstrumentError) as e:
            t.read_block(0)
        msg = str(e.value)
        assert "\n" not in msg
        assert "overflow (MissedEvents, OverflowBegin, OverflowEnd)" in msg
        assert "between 5000000 ps and 9000000 ps" in msg
        assert "missed events: channel 2: 1234" in msg and "the run is stopped" in msg
        tt.stream.stop.assert_called()
        with pytest.raises(InstrumentError, match="run was aborted: the tagger reported"):
            t.read_block(0)
        with pytest.raises(InstrumentError, match="call finish"):
            t.start()
        assert t.status()["runs_aborted"] == 1
        assert t.finish()[0].shape == (0,)  # nothing of the broken block is handed out
        t.start()  # a new run: a new stream
        assert tt.TimeTagStream.call_count == 2


def test_has_overflows_alone_is_enough(tt):
    tt.buffers = [FakeBuffer([1, 2], [1, 1], has_overflows=True)]
    with make() as t:
        t.start()
        with pytest.raises(InstrumentError, match="overflow"):
            t.read_block(0)


def test_a_full_stream_buffer_is_data_loss(tt):
    tt.buffers = [FakeBuffer(np.arange(1000), np.ones(1000))]
    with make(buffer_events=1000) as t:
        t.start()
        with pytest.raises(InstrumentError, match="stream buffer filled up"):
            t.read_block(0)


def test_tags_out_of_order_or_on_unmapped_channels_are_refused(tt):
    tt.buffers = [FakeBuffer([10, 5], [1, 1])]
    with make() as t:
        t.start()
        with pytest.raises(InstrumentError, match="out of time order"):
            t.read_block(0)
    tt.buffers = [FakeBuffer([10, 20], [1, 4])]
    with make() as t:
        t.start()
        with pytest.raises(InstrumentError, match="Swabian channel 4, which is not in"):
            t.read_block(0)


def test_safe_state_stops_the_stream_and_close_frees_the_tagger(tt):
    with pytest.raises(RuntimeError, match="boom"), make() as t:
        t.start()
        raise RuntimeError("boom")
    tt.stream.stop.assert_called_once_with()
    tt.freeTimeTagger.assert_called_once_with(tt.tagger)
    assert not t.connected


def test_missing_vendor_module_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "TimeTagger", None)
    t = make()
    with pytest.raises(InstrumentError) as e:
        t.connect()
    assert str(e.value) == ("tagger: connect: the Swabian Time Tagger driver needs the "
                            "vendor's TimeTagger module (Time Tagger software from "
                            "swabianinstruments.com)")
    assert not t.connected


def test_vendor_errors_are_instrument_errors(tt):
    tt.createTimeTagger.side_effect = RuntimeError("No Time Tagger with serial 2138000XYZ "
                                                   "found.\nmore lines")
    with pytest.raises(InstrumentError) as e:
        make().connect()
    assert str(e.value) == ("tagger: createTimeTagger('2138000XYZ'): No Time Tagger with "
                            "serial 2138000XYZ found.")


def test_network_resource_and_unknown_channels(tt):
    t = SwabianTimeTagger("tagger", resource="tcp://10.0.0.5:41101",
                          settings={"inputs": {"1": 0, "9": 1}})
    with pytest.raises(InstrumentError, match=r"channel\(s\) 9, which this Time Tagger Ultra"):
        t.connect()
    tt.createTimeTaggerNetwork.assert_called_once_with("10.0.0.5:41101")
    tt.freeTimeTagger.assert_called_once_with(tt.tagger)


def test_trigger_level_limits_are_checked_before_anything_is_sent(tt):
    with pytest.raises(ConfigError, match="settings.trigger_level_v: 1.5 V is above the limit"):
        SwabianTimeTagger("tagger", settings={"inputs": {"1": 0}, "trigger_level_v": 1.5},
                          limits={"max_trigger_level_v": 1.0})
    t = SwabianTimeTagger("tagger", settings={"inputs": {"1": 0}},
                          limits={"min_trigger_level_v": -1.0, "max_trigger_level_v": 1.0})
    with t:
        with pytest.raises(LimitError, match="-2 V is below the limit min_trigger_level_v"):
            t.set_trigger_level_v(-2.0)
        tt.tagger.setTriggerLevel.assert_not_called()
        t.set_trigger_level_v(0.25, input=1)
        tt.tagger.setTriggerLevel.assert_called_once_with(1, 0.25)


@pytest.mark.parametrize("settings, text", [
    ({}, "settings.inputs: missing"),
    ({"inputs": {"a": 0}}, "settings.inputs.a: a Swabian channel is an integer"),
    ({"inputs": {"1": 0, "2": 0}}, "bench channel 0 is already"),
    ({"inputs": {"1": 0}, "input_delay_ps": {"2": 10}}, "settings.input_delay_ps.2: channel 2"),
    ({"inputs": {"1": 0}, "buffer_events": 10}, "settings.buffer_events"),
])
def test_bad_settings_are_config_errors(settings, text):
    with pytest.raises(ConfigError, match=text):
        SwabianTimeTagger("tagger", settings=settings)


def test_read_only_connection_changes_nothing(tt):
    """Built with its driver settings only (as the read-only instruments commands do)."""
    t = SwabianTimeTagger("tagger", settings={"inputs": {"1": 0, "-3": 1}})
    assert {k for k, v in t.SETTINGS.items() if v == STATIC} == {"inputs", "buffer_events"}
    tt.tagger.getTriggerLevel.side_effect = lambda ch: 0.5 if ch > 0 else \
        (_ for _ in ()).throw(ValueError("invalid channel"))
    t.connect()
    st = t.status()
    assert t.running is False
    t.close()
    for setter in ("setTriggerLevel", "setInputDelay", "setDeadtime"):
        getattr(tt.tagger, setter).assert_not_called()
    tt.TimeTagStream.assert_not_called()
    assert st["inputs"][1]["trigger_level_v"] == 0.5
    assert st["inputs"][-3]["trigger_level_v"] is None
    assert st["model"] == "Time Tagger Ultra" and st["sensor_data"] == "FPGA 45 C"
