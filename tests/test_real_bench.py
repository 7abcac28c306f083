"""`qkdctl run` on a bench of real drivers, each through its real stack.

The laser (Thorlabs ITC4001) and the pattern generator (Keysight 33522B) are
pyvisa-sim devices behind PyVISA's ``@sim`` backend; the detectors are the
passive (configuration-only) driver; the time tagger is the Swabian driver on
a fake vendor ``TimeTagger`` module whose stream plays time tags simulated for
the same bench and seed. The bench file is the one a lab would write: only
drivers and resources differ from the simulated bench.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tomllib
import types
from pathlib import Path

import numpy as np
import pytest

from qkdctl import cli
from qkdctl.config import default_bench_path, parse_bench
from qkdctl.drivers import thorlabs_ld
from qkdctl.drivers.swabian import SwabianTimeTagger
from qkdctl.sequence import AliceSequence
from qkdctl.session import run_session
from qkdctl.sim.engine import TagGenerator
from qkdctl.sim.table import OpticalTable

pytest.importorskip("pyvisa_sim")

VISA = Path(__file__).parent / "visa_sim"
RAW = tomllib.loads(default_bench_path().read_text(encoding="utf-8"))
SEED = 17
RATE = 5.0e7        # a rate the 33522B can play, one sample per pulse
DURATION = 0.2


def source(raw):
    raw["source"].update(rep_rate_hz=RATE, sequence="pattern", pattern_length=8192)
    raw["postprocess"] = {"block_bits": 16384, "min_block_bits": 4096}
    return raw


def simulated_tags():
    """The tags the simulated twin of this bench gives for SEED (channels as the
    Swabian inputs: bench channel + 1)."""
    cfg = parse_bench(source(copy.deepcopy(RAW)), "twin.toml")
    gen = TagGenerator(OpticalTable.from_config(cfg, SEED), SEED)
    parts = [gen.generate(round(DURATION * RATE)), gen.finish()]
    ts = np.concatenate([p[0] for p in parts])
    ch = np.concatenate([p[1] for p in parts]).astype(np.int32) + 1
    return ts, ch


class _Buffer:
    def __init__(self, ts, ch):
        self._ts, self._ch = ts, ch
        self.size = ts.shape[0]
        self.hasOverflows = False
        self.tStart = 0
        self.tGetData = int(ts[-1]) if self.size else 0

    def getTimestamps(self):
        return self._ts

    def getChannels(self):
        return self._ch

    def getEventTypes(self):
        return np.zeros(self.size, np.uint8)

    def getMissedEvents(self):
        return np.zeros(self.size, np.uint16)


@pytest.fixture
def lab(tmp_path, mocker, monkeypatch):
    """A lab bench file and the fake Swabian module streaming the simulated tags."""
    ts, ch = simulated_tags()
    chunks = [(ts[i:i + 20_000], ch[i:i + 20_000]) for i in range(0, ts.shape[0], 20_000)]
    mod = types.ModuleType("TimeTagger")
    tagger = mocker.MagicMock(name="tagger")
    tagger.getModel.return_value = "Time Tagger Ultra"
    tagger.getSerial.return_value = "2138000XYZ"
    tagger.getFirmwareVersion.return_value = "FW 3"
    tagger.getChannelList.return_value = [1, 2, 3, 4, 5, 6, 7, 8]
    tagger.setDeadtime.side_effect = lambda c, ps: ps
    tagger.getTriggerLevel.return_value = 0.1
    tagger.getInputDelay.return_value = 0
    tagger.getDeadtime.return_value = 2000
    tagger.getOverflows.return_value = 0
    stream = mocker.MagicMock(name="stream")
    empty = _Buffer(np.zeros(0, np.int64), np.zeros(0, np.int32))
    # several chunks per poll, so that every tag is delivered well within the run
    stream.getData.side_effect = lambda: _next(chunks, empty)
    mod.createTimeTagger = mocker.MagicMock(return_value=tagger)
    mod.createTimeTaggerNetwork = mocker.MagicMock(return_value=tagger)
    mod.freeTimeTagger = mocker.MagicMock(return_value=True)
    mod.TimeTagStream = mocker.MagicMock(return_value=stream)
    monkeypatch.setitem(sys.modules, "TimeTagger", mod)
    monkeypatch.setattr(SwabianTimeTagger, "poll_s", 0.002)
    monkeypatch.setattr(thorlabs_ld.ITC4000, "SETTLE_POLL_S", 0.01)

    for name in ("thorlabs_ld.yaml", "keysight_33500.yaml"):
        shutil.copy(VISA / name, tmp_path / name)
    psk = tmp_path / "lab.psk"
    psk.write_bytes(os.urandom(32))
    psk.chmod(0o600)
    raw = source(copy.deepcopy(RAW))
    del raw["sim"]
    raw["postprocess"]["psk_file"] = str(psk)
    raw["instruments"] = {
        "laser": {"driver": "thorlabs-itc4000",
                  "resource": "USB0::0x1313::0x804A::M00412345::INSTR",
                  "backend": "thorlabs_ld.yaml@sim",
                  "settings": {"current_ma": 35.0, "temperature_c": 25.0, "ramp_step_ma": 10.0,
                               "ramp_step_s": 0.0, "settle_hold_s": 0.0,
                               "settle_timeout_s": 0.5, "temperature_window_c": 0.1},
                  "limits": {"max_current_ma": 60.0}},
        "modulator": {"driver": "keysight-33500",
                      "resource": "USB0::0x0957::0x2807::MY59000001::INSTR",
                      "backend": "keysight_33500.yaml@sim",
                      "settings": {"state_voltages": [0.0, 1.2, 0.6, 1.8],
                                   "output_load": "INF", "filter": "OFF"},
                      "limits": {"min_voltage_v": 0.0, "max_voltage_v": 2.0,
                                 "max_amplitude_vpp": 2.0}},
        "detectors": {"driver": "passive",
                      "settings": {"channels": [1, 2, 3, 4], "efficiency": 0.6,
                                   "dead_time_ns": 50.0, "dark_count_rate_hz": 30.0}},
        "tagger": {"driver": "swabian", "resource": "2138000XYZ",
                   "settings": {"inputs": {"1": 0, "2": 1, "3": 2, "4": 3, "5": 4}}},
    }
    yield raw, tmp_path, mod, stream
    from qkdctl.drivers import transport

    transport.close_resource_managers()


def _next(chunks, empty):
    if not chunks:
        return empty
    take = chunks[:8]
    del chunks[:8]
    return _Buffer(np.concatenate([c[0] for c in take]), np.concatenate([c[1] for c in take]))


def test_run_on_a_real_driver_bench(lab, monkeypatch):
    raw, tmp, mod, stream = lab
    cfg = parse_bench(raw, str(tmp / "lab.toml"))
    # the fake tagger streams tags simulated with the seed's sequence, so Alice must play
    # that one here; a real bench keys her sequence from the operating system
    seen = []
    plain = AliceSequence.from_config

    def seeded(source, seed, *, secret=False):
        seen.append(secret)
        return plain(source, seed)
    monkeypatch.setattr(AliceSequence, "from_config", staticmethod(seeded))
    s = run_session(cfg, duration_s=DURATION, seed=SEED, block_s=0.02, keystore=False)
    assert seen == [True]
    assert s["source"] == "bench"
    # the simulated twin's 1 % misalignment comes through the real pipeline
    assert 0.005 < s["qber"]["Z"] < 0.02 and s["sifted_bits"] > 10_000
    assert abs(s["clock_drift_ppm"] - RAW["sim"]["clock_drift_ppm"]) < 1.0
    assert "distillation" in s and not s["tamper_alarm"]
    # the tagger was started and left stopped and freed
    stream.start.assert_called()
    stream.stop.assert_called()
    mod.freeTimeTagger.assert_called()


def test_identify_and_status_on_the_lab_bench(lab):
    """Read-only: identities and live values, and nothing switched on."""
    from qkdctl.instruments import identify, read_status

    raw, tmp, mod, stream = lab
    cfg = parse_bench(raw, str(tmp / "lab.toml"))
    out = identify(cfg)["instruments"]
    assert all(e["ok"] for e in out.values()), out
    assert out["laser"]["identity"]["make"].lower().startswith("thorlabs")
    assert out["laser"]["state"] == {"is_on": False}
    assert out["modulator"]["identity"]["model"].startswith("335")
    assert out["tagger"]["identity"]["serial"] == "2138000XYZ"
    st = read_status(cfg)["instruments"]
    assert st["laser"]["ok"] and "temperature_c" in str(st["laser"]["status"])
    stream.start.assert_not_called()


def test_a_real_bench_needs_a_pre_shared_key(lab):
    from qkdctl.errors import ConfigError

    raw, tmp, _, _ = lab
    raw["postprocess"]["psk_file"] = ""
    cfg = parse_bench(raw, str(tmp / "lab.toml"))
    with pytest.raises(ConfigError, match="postprocess.psk_file: missing"):
        run_session(cfg, duration_s=0.02, seed=SEED, keystore=False)


def test_lab_example_builds():
    """configs/lab-example.toml loads and every instrument's driver accepts its table."""
    from qkdctl.config import load_bench
    from qkdctl.session import build_bench

    cfg = load_bench(Path(default_bench_path()).parent / "lab-example.toml")
    bench = build_bench(cfg, 1)
    assert {k: type(v).__name__ for k, v in bench.items()} == {
        "laser": "ITC4000", "modulator": "KeysightAWG", "polarization": "ELL14",
        "detectors": "SingleQuantumSnspd", "tagger": "SwabianTimeTagger"}
    assert cli.main(["instruments", "list", "--config", cfg.path]) == 0
