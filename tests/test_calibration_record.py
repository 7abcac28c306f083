"""The calibration record: file, application to the bench, use by runs and recordings."""

from __future__ import annotations

import json
import os

import pytest

from qkdctl import cli
from qkdctl.calibration.record import CalibrationRecord, default_record_path
from qkdctl.config import load_bench
from qkdctl.errors import ConfigError
from qkdctl.recording import Recording
from qkdctl.replay import replay
from qkdctl.session import run_session


def record(tmp_path, **delays):
    r = CalibrationRecord("sim-1GHz-50km")
    r.update("delays", {"period_ps": 1000.002, "gate_width_ps": 280.0,
                        "channels": {str(c): {"delay_ps": d, "uncertainty_ps": 0.4}
                                     for c, d in delays.items()}})
    r.save(tmp_path / "sim.calibration.toml")
    return r


def test_round_trip_and_apply(tmp_path):
    r = record(tmp_path, **{"1": 2510, "3": 3170.4})
    text = (tmp_path / "sim.calibration.toml").read_text()
    assert text.startswith("# qkdctl calibration record")
    back = CalibrationRecord.load(tmp_path / "sim.calibration.toml")
    assert back.sections == r.sections and back.bench == "sim-1GHz-50km" and back.created
    cfg = back.apply(load_bench())
    delays = {d.channel: d.delay_ps for d in cfg.receiver.detectors}
    assert delays == {1: 2510, 2: 2620, 3: 3170, 4: 2940}
    assert cfg.analysis.gate_width_ps == 280.0
    # the parsed document follows, so a recording rebuilds the calibrated bench
    assert cfg.raw["receiver"]["detectors"][0]["delay_ps"] == 2510
    assert cfg.calibration_path == str(tmp_path / "sim.calibration.toml")
    assert "[delays.channels.1]" in cfg.calibration_text


def test_bad_records(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[calibration]\nbench = "other"\n')
    with pytest.raises(ConfigError, match="for bench 'other', not 'sim-1GHz-50km'"):
        CalibrationRecord.load(p).apply(load_bench())
    p.write_text('[calibration]\nbench = "x"\n[gates]\nw = 1\n')
    with pytest.raises(ConfigError, match="gates: unknown table"):
        CalibrationRecord.load(p)
    p.write_text("[delays]\n")
    with pytest.raises(ConfigError, match="calibration: missing"):
        CalibrationRecord.load(p)
    p.write_text("not = [toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        CalibrationRecord.load(p)
    with pytest.raises(ConfigError, match="no such calibration record"):
        CalibrationRecord.load(tmp_path / "missing.toml")


def test_default_path_beside_the_bench_file(tmp_path):
    p = tmp_path / "lab.toml"
    p.write_text(load_bench().text)
    assert default_record_path(load_bench(p)) == tmp_path / "lab.calibration.toml"
    # the built-in bench lives in the package: its record goes to the user's data folder
    assert str(default_record_path(load_bench())).startswith(os.environ["XDG_DATA_HOME"])


def test_run_uses_and_recording_keeps_the_record(tmp_path, capsys):
    # the built-in bench's true delays, shifted by 40 ps on channel 1: a visible change
    record(tmp_path, **{"1": 2540})
    rec = tmp_path / "run.h5"
    assert cli.main(["run", "--duration", "0.02", "--seed", "3", "--json", "-q",
                     "--no-keystore", "--calibration", str(tmp_path / "sim.calibration.toml"),
                     "--record", str(rec)]) == 0
    live = json.loads(capsys.readouterr().out)
    assert live["calibration_record"] == str(tmp_path / "sim.calibration.toml")
    with Recording(rec) as r:
        assert r.calibration["delays_ps"]["1"] == 2540
        assert "[delays.channels.1]" in r.calibration["record"]
    rep = replay(str(rec))
    assert rep["calibration_record"] == live["calibration_record"]
    assert rep["detected_pulses"] == live["detected_pulses"]
    # the same run without the record differs (channel 1's gate moved by 40 ps)
    plain = run_session(load_bench(), duration_s=0.02, seed=3, keystore=False)
    assert plain["detections_in_gate_by_channel"]["Z0"] != \
        live["detections_in_gate_by_channel"]["Z0"]
