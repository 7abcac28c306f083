"""Passive (configuration-only) detectors and the shared calibration-curve helper."""

from __future__ import annotations

import logging

import pytest

from qkdctl.drivers.passive import EfficiencyCurve, PassiveDetectors
from qkdctl.errors import ConfigError, InstrumentError, LimitError

SETTINGS = {"channels": [1, 2, 3, 4], "efficiency": 0.55,
            "dead_time_ns": {"1": 22.0, "2": 24.0, "3": 22.0, "4": 23.0},
            "dark_count_rate_hz": {"1": 150.0, "2": 180.0, "3": 140.0, "4": 160.0},
            "make": "Excelitas", "model": "SPCM-AQRH-14", "serial": "a1, a2, a3, a4"}


def make(settings=None, **kw):
    """Built the way the bench builds every driver."""
    return PassiveDetectors(name="detectors", resource=kw.pop("resource", ""), backend="",
                            timeout_s=2.0, settings=SETTINGS if settings is None else settings,
                            limits={}, config_key="bench.toml: instruments.detectors", **kw)


def test_configured_values_are_reported():
    with make() as det:
        assert det.channels == (1, 2, 3, 4)
        ident = det.identity()
        assert (ident.make, ident.model, ident.serial, ident.firmware) == \
            ("Excelitas", "SPCM-AQRH-14", "a1, a2, a3, a4", "")
        assert [det.efficiency(ch) for ch in det.channels] == [0.55] * 4
        assert det.dead_time_ns(2) == 24.0
        assert det.dark_count_rate_hz(2) == 0.0  # biased down
        det.bias_on()
        assert det.is_biased(3) and det.dark_count_rate_hz(2) == 180.0
        det.set_efficiency(0.6, channel=4)  # recorded
        assert det.efficiency(4) == 0.6
        status = det.status()
        assert status["configured_only"] is True
        assert status["channels"][1] == {"biased": True, "efficiency": 0.55,
                                         "dead_time_ns": 22.0, "dark_count_rate_hz": 150.0}
    assert not det.connected
    assert not any(det._biased.values())  # the safe state: bias off (bookkeeping)


def test_bias_is_bookkeeping_with_a_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="qkdctl.drivers.passive"), make() as det:
        det.bias_on(2)
        assert not det.is_biased(1) and det.is_biased(2)
    lines = [r.getMessage() for r in caplog.records]
    assert any("channel 2: bias on recorded" in m and "not under software control" in m
               for m in lines)
    assert any("channel 2: bias off recorded" in m for m in lines)


def test_connecting_never_fails_and_opens_nothing():
    det = make({"channels": [7]})
    for _ in range(2):
        det.connect()
        assert det.connected
        det.close()


def test_a_value_not_configured_is_an_error_and_none_in_the_status():
    with make({"channels": [1, 2], "efficiency": {"1": 0.5}}) as det:
        with pytest.raises(InstrumentError, match=r"efficiency: channel 2: not configured"):
            det.efficiency(2)
        with pytest.raises(InstrumentError, match=r"dead_time_ns: channel 1: not configured"):
            det.dead_time_ns(1)
        det.bias_on(1)
        with pytest.raises(InstrumentError, match="dark_count_rate_hz: channel 1"):
            det.dark_count_rate_hz(1)
        ch = det.status()["channels"]
        assert ch[2]["efficiency"] is None and ch[1]["dark_count_rate_hz"] is None
        assert det.identity().model == "passive detectors"


def test_values_are_checked():
    with make() as det:
        with pytest.raises(LimitError, match="from 0 to 1"):
            det.set_efficiency(1.2)
        with pytest.raises(LimitError, match="Hz >= 0"):
            det.set_dark_count_rate_hz(-1.0)
        with pytest.raises(InstrumentError, match="no channel 9"):
            det.set_dark_count_rate_hz(10.0, channel=9)
        with pytest.raises(InstrumentError, match="channels is fixed when the instrument is "
                                                  "built"):
            det.configure({"channels": [1, 2]})
        det.configure({"channels": [1, 2, 3, 4], "dark_count_rate_hz": 99.0})
        det.bias_on()
        assert det.dark_count_rate_hz(4) == 99.0


@pytest.mark.parametrize("settings, resource, match", [
    ({}, "", "settings.channels: missing"),
    ({"channels": []}, "", "non-empty list"),
    ({"channels": [1, 1]}, "", "listed twice"),
    ({"channels": [1, 300]}, "", "not a time-tagger input"),
    ({"channels": [1], "efficiency": {"2": 0.5}}, "", r"settings.efficiency.2: no detector"),
    ({"channels": [1], "dark_count_rate_hz": -3}, "", "below 0 Hz"),
    ({"channels": [1], "serial": 42}, "", "expected a string"),
    ({"channels": [1], "bias_v": 30}, "", "unknown setting"),
    ({"channels": [1]}, "USB0::0x1::0x2::X::INSTR", "no data link"),
])
def test_configuration_errors(settings, resource, match):
    with pytest.raises(ConfigError, match=r"bench.toml: instruments.detectors\..*" + match):
        make(settings, resource=resource)


def test_efficiency_curve_interpolates_and_never_extrapolates():
    c = EfficiencyCurve([[0.0, 0.0], [5.0, 0.45], [10.0, 0.7]], "V")
    assert c.x_for(0.575) == pytest.approx(7.5)
    assert c.efficiency_at(7.5) == pytest.approx(0.575)
    assert c.x_for(0.71) is None and c.efficiency_at(12.0) == 0.7
    for bad in ([[0.0, 0.0]], [[0.0, 0.0], [1.0, 1.5]], [[0.0, 0.2], [1.0, 0.1]], "x"):
        assert EfficiencyCurve.problem(bad, "V")
        with pytest.raises(ValueError):
            EfficiencyCurve(bad, "V")
