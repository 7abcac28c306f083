"""The Keysight 33500B/33600A modulator driver through PyVISA and a pyvisa-sim device.

The simulated 33522B (``tests/visa_sim/keysight_33500.yaml``) answers the
driver's exact command strings and queues an error for anything it rejects.
Each test gets its own copy of the file, hence a fresh instrument.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from qkdctl.drivers.base import PolarizationModulator
from qkdctl.drivers.keysight_awg import KeysightAWG, dac_codes
from qkdctl.errors import ConfigError, InstrumentError, LimitError

YAML = Path(__file__).parent / "visa_sim" / "keysight_33500.yaml"
RESOURCE = "USB0::0x0957::0x2807::MY59000001::INSTR"
LIMITS = {"min_voltage_v": 0.0, "max_voltage_v": 2.0, "max_amplitude_vpp": 2.0}
SETTINGS = {"state_voltages": [0.0, 1.2, 0.6, 1.8], "pulse_rate_hz": 1e6,
            "pattern": [0, 1, 2, 3, 1, 0, 3, 2], "output_load": "INF", "filter": "OFF"}


@pytest.fixture
def backend(tmp_path):
    path = tmp_path / "keysight_33500.yaml"
    shutil.copy(YAML, path)
    return f"{path}@sim"


def make(backend, settings=None, limits=None, resource=RESOURCE):
    return KeysightAWG("modulator", resource=resource, backend=backend, timeout_s=1.0,
                       settings=SETTINGS if settings is None else settings,
                       limits=LIMITS if limits is None else limits,
                       config_key="bench.toml: instruments.modulator")


def record(link, monkeypatch) -> list[str]:
    """Every command and query the driver sends through ``link``, in order."""
    sent: list[str] = []
    for meth in ("write", "query"):
        orig = getattr(link, meth)

        def wrapper(command, _orig=orig):
            sent.append(command)
            return _orig(command)

        monkeypatch.setattr(link, meth, wrapper)
    orig_bytes = link.write_bytes

    def write_bytes(data, *, command="write"):
        sent.append(data.decode("ascii").removesuffix("\n"))
        return orig_bytes(data, command=command)

    monkeypatch.setattr(link, "write_bytes", write_bytes)
    return sent


def commands(sent):
    return [c for c in sent if c != "SYST:ERR?"]


def test_dac_codes():
    codes, amp, off = dac_codes([0.0, 1.2, 0.6, 1.8])
    assert codes == [-32767, 10922, -10922, 32767]
    assert amp == pytest.approx(1.8) and off == pytest.approx(0.9)
    assert issubclass(KeysightAWG, PolarizationModulator)


def test_config_is_checked_when_built(backend):
    with pytest.raises(ConfigError, match=r"instruments.modulator.limits.max_voltage_v: missing"):
        make(backend, limits={"min_voltage_v": 0.0})
    with pytest.raises(ConfigError, match=r"settings.state_voltages: 2.5 V is above the limit "
                                          r"max_voltage_v = 2 V"):
        make(backend, settings={**SETTINGS, "state_voltages": [0, 1, 2, 2.5]})
    with pytest.raises(ConfigError, match="max_amplitude_vpp = 1 Vpp"):
        make(backend, limits={**LIMITS, "max_amplitude_vpp": 1.0})
    with pytest.raises(ConfigError, match="4 voltages"):
        make(backend, settings={**SETTINGS, "state_voltages": [0, 1]})
    with pytest.raises(ConfigError, match="two different levels"):
        make(backend, settings={**SETTINGS, "state_voltages": [1, 1, 1, 1]})
    with pytest.raises(ConfigError, match="state codes run from 0 to 15"):
        make(backend, settings={**SETTINGS, "pattern": [0, 16]})
    with pytest.raises(ConfigError, match="arbitrary waveform name"):
        make(backend, settings={**SETTINGS, "arb_name": "9bad name"})
    with pytest.raises(ConfigError, match="channel 1 or 2"):
        make(backend, settings={**SETTINGS, "channel": 3})
    with pytest.raises(ConfigError, match=r"settings.rotation_rad: unknown setting"):
        make(backend, settings={**SETTINGS, "rotation_rad": 0.1})


def test_start_uploads_once_then_toggles_the_output(backend, monkeypatch):
    awg = make(backend)
    sent = record(awg.link, monkeypatch)
    with awg:
        assert sent == ["*CLS", "*IDN?"]
        assert not awg.running
        sent.clear()
        awg.start()
        assert commands(sent) == [
            "OUTP1 OFF",
            "OUTP1:LOAD INF",
            "SOUR1:DATA:VOL:CLE",
            "SOUR1:DATA:ARB:DAC QKDPAT,-32767,10922,-10922,32767,10922,-32767,32767,-10922",
            "SOUR1:FUNC:ARB QKDPAT",
            "SOUR1:FUNC ARB",
            "SOUR1:FUNC:ARB:SRAT 1000000",
            "SOUR1:FUNC:ARB:FILT OFF",
            "SOUR1:VOLT 1.8",
            "SOUR1:VOLT:OFFS 0.9",
            "OUTP1 ON",
        ]
        # the error queue is read before and after every command
        assert sent.count("SYST:ERR?") == 2 * len(commands(sent))
        assert awg.running
        st = awg.status()
        assert st["function"] == "ARB" and st["arb"] == "QKDPAT"
        assert st["sample_rate_hz"] == 1e6
        assert st["amplitude_vpp"] == pytest.approx(1.8)
        assert st["offset_v"] == pytest.approx(0.9)
        assert st["uploaded"] and st["pattern_length"] == 8
        ident = awg.identity()
        assert (ident.make, ident.model) == ("Keysight Technologies", "33522B")
        sent.clear()
        awg.stop()
        awg.start()
        assert commands(sent) == ["OUTP1 OFF", "OUTP1 ON"]   # no second upload
        awg.load_pattern(np.array([3, 2, 1, 0], np.uint8))
        sent.clear()
        awg.start()
        assert "SOUR1:DATA:ARB:DAC QKDPAT,32767,-10922,10922,-32767,32767,-10922,10922," \
               "-32767" in sent
    assert not awg.connected


def test_pattern_shape(backend):
    awg = make(backend, settings={"state_voltages": [0.0, 1.0, 0.5, 1.5], "pulse_rate_hz": 5e7,
                                  "samples_per_state": 2,
                                  "pattern": [0b0100, 0b1011, 2]})  # intensity bits ignored
    samples, amp, off, srat = awg.waveform()
    # 3 states x 2 samples = 6 < 8 points: the whole pattern is repeated
    z0, x1, x0 = -32767, 32767, round((0.5 - 0.75) / 0.75 * 32767)
    assert samples.tolist() == [z0, z0, x1, x1, x0, x0] * 2
    assert (amp, off, srat) == (1.5, 0.75, 1e8)


def test_device_error_and_limits_before_sending(backend, monkeypatch):
    awg = make(backend, settings={**SETTINGS, "pulse_rate_hz": 1e9})
    sent = record(awg.link, monkeypatch)
    with awg:
        with pytest.raises(InstrumentError,
                           match=r"modulator: SOUR1:FUNC:ARB:SRAT 1000000000: device error: "
                                 r"-222,\"Data out of range\" \(USB0::0x0957"):
            awg.start()
        assert not awg.running
        sent.clear()
        with pytest.raises(LimitError, match="above the limit max_voltage_v"):
            awg.set_state_voltages([0.0, 1.0, 2.0, 3.0])
        with pytest.raises(LimitError, match="positive rate"):
            awg.set_pulse_rate_hz(-1)
        with pytest.raises(LimitError, match="state codes"):
            awg.load_pattern([0, 99])
        assert sent == []
    limited = make(backend, limits={**LIMITS, "max_sample_rate_hz": 5e5})
    sent = record(limited.link, monkeypatch)
    with limited:
        sent.clear()
        with pytest.raises(LimitError, match="max_sample_rate_hz = 500000 Sa/s"):
            limited.start()
        assert "OUTP1 ON" not in sent and not any(c.startswith("SOUR1") for c in sent)


def test_start_needs_a_pattern(backend, monkeypatch):
    awg = make(backend, settings={"state_voltages": [0.0, 1.2, 0.6, 1.8]})
    sent = record(awg.link, monkeypatch)
    with awg:
        sent.clear()
        with pytest.raises(InstrumentError, match="pattern, pulse_rate_hz not set"):
            awg.start()
        assert sent == []
        awg.load_pattern([0, 1, 2, 3, 3, 2, 1, 0])
        awg.set_pulse_rate_hz(2e6)
        awg.start()
        assert awg.running


def test_safe_state_on_exit(backend):
    awg = make(backend)
    with pytest.raises(RuntimeError), awg:
        awg.start()
        assert awg.running
        raise RuntimeError("the run failed")
    check = make(backend, settings={})
    with check:
        assert not check.running   # the output was turned off on the way out


def test_no_compensation(backend):
    with make(backend) as awg:
        with pytest.raises(InstrumentError, match="no polarization compensation"):
            awg.set_rotation_rad(0.1)
        with pytest.raises(InstrumentError, match="use a polarization controller"):
            _ = awg.rotation_rad


def test_refuses_another_instrument(backend):
    other = make(backend, resource="USB0::0x2A8D::0x0101::MY12345678::INSTR")
    with pytest.raises(InstrumentError, match=r"model '34465A' is not a Keysight 33500B/33600A"):
        other.connect()
    assert not other.connected and not other.link.is_open
