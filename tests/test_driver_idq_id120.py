"""ID Quantique ID120 driver through PyVISA and pyvisa-sim (tests/visa_sim/idq_id120.yaml)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qkdctl.drivers.idq_id120 import IdqId120
from qkdctl.errors import ConfigError, InstrumentError, LimitError

YAML = Path(__file__).parent / "visa_sim" / "idq_id120.yaml"
UNIT_A = "USB0::0x1DDC::0x0330::002008::INSTR"  # breakdown 125.34 V, settled at -40 degC
UNIT_B = "USB0::0x1DDC::0x0330::002009::INSTR"  # breakdown 127.88 V, no integration time
WARM = "USB0::0x1DDC::0x0330::002010::INSTR"  # stays at -20 degC
MUTE = "USB0::0x1DDC::0x0330::002011::INSTR"  # answers *IDN? and the breakdown only
GARBLED = "USB0::0x1DDC::0x0330::002012::INSTR"  # garbled counter reply
OTHER = "USB0::0x1313::0x804A::M00412345::INSTR"  # not an ID120

CURVE = [[0.0, 0.0], [5.0, 0.45], [10.0, 0.7], [15.0, 0.8]]
LIMITS = {"max_excess_bias_v": 15.0, "max_bias_v": 145.0}


@pytest.fixture
def backend(tmp_path):
    """A private copy of the simulated devices (fresh state for every test)."""
    path = tmp_path / "idq_id120.yaml"
    shutil.copy(YAML, path)
    return f"{path}@sim"


def make(backend, settings=None, limits=None, resource="", **kw):
    s = {"resources": {"1": UNIT_A, "2": UNIT_B}, "efficiency_curve": CURVE,
         "settle_timeout_s": 0.2, "settle_poll_s": 0.01}
    if resource:
        s.pop("resources")
    s.update(settings or {})
    return IdqId120(name="detectors", resource=resource, backend=backend, timeout_s=0.2,
                    settings=s, limits=dict(LIMITS, **(limits or {})),
                    config_key="bench.toml: instruments.detectors", **kw)


def device_state(backend, resource=UNIT_A):
    """(running, bias in V) as the unit reports them, read through a second driver."""
    probe = IdqId120(name="probe", resource=resource, backend=backend, timeout_s=0.2,
                     settings={"channel": 1}, limits=LIMITS)
    probe.connect()
    try:
        return probe.unit(1).ask_flag("REG:RUN?"), probe.bias_voltage_v(1)
    finally:
        probe.close()  # no safe state: only reading


def spies(mocker, det, channel=1):
    link = det.unit(channel).link
    return mocker.spy(link, "write"), mocker.spy(link, "query")


# ------------------------------------------------------------------------------ identity
def test_identity_of_one_unit_and_of_several(backend):
    with make(backend, resource=UNIT_A, settings={"channel": 3}) as det:
        assert det.channels == (3,)
        ident = det.identity()
        assert (ident.make, ident.model, ident.serial, ident.firmware) == \
            ("IDQuantique", "ID120", "002008", "5.2.1")
        assert det.breakdown_v(3) == pytest.approx(125.34)
    with make(backend) as det:
        assert det.channels == (1, 2)
        assert det.identity().serial == "002008, 002009"
        assert {ch: i.serial for ch, i in det.unit_identities().items()} == \
            {1: "002008", 2: "002009"}


def test_another_instrument_is_refused_and_its_link_closed(backend):
    det = make(backend, resource=OTHER, settings={"channel": 1})
    with pytest.raises(InstrumentError, match=r"ITC4001 is not an ID Quantique ID120"):
        det.connect()
    assert not det.connected
    assert not det.unit(1).link.is_open


# ------------------------------------------------------------------------------ setpoints
def test_connect_applies_setpoints_without_biasing(backend, mocker):
    det = make(backend, settings={"efficiency": 0.7, "dead_time_ns": 400_000.0,
                                  "threshold_mv": {"1": 120.5, "2": 80.0},
                                  "temperature_c": -35.0})
    writes = mocker.spy(det.unit(1).link, "write")
    with det:
        sent = [c.args[0] for c in writes.call_args_list]
        assert "DEADTIME:TIME 400" in sent
        assert "THRESHOLD:VOLTAGE 120500" in sent
        assert "REG:TEMP_SET_POINT -35000" in sent
        assert not any(c.startswith(("BIAS:VOLTAGE", "REG:RUN")) for c in sent)
        assert not det.is_biased(1)
        assert det.efficiency(1) == pytest.approx(0.7)  # the setpoint, not yet applied
        assert det.excess_bias_v(1) == pytest.approx(10.0)
        assert det.dead_time_ns(1) == 400_000.0
        assert det.threshold_mv(2) == 80.0
        assert det.temperature_setpoint_c(1) == -35.0
        assert det.temperature_c(1) == -40.0
        assert device_state(backend) == (False, 0.0)


def test_bias_on_runs_settles_and_applies_the_calibrated_bias(backend, mocker):
    with make(backend, settings={"efficiency": {"1": 0.7, "2": 0.45}}) as det:
        writes = mocker.spy(det.unit(1).link, "write")
        det.bias_on()
        sent = [c.args[0] for c in writes.call_args_list]
        assert sent == ["REG:RUN TRUE", "BIAS:VOLTAGE 135340000"]  # 125.34 V + 10 V
        assert det.is_biased(1) and det.is_biased(2)
        assert det.bias_voltage_v(2) == pytest.approx(127.88 + 5.0)
        assert det.efficiency(1) == pytest.approx(0.7)
        det.set_efficiency(0.8, channel=1)  # running: applied at once
        assert det.bias_voltage_v(1) == pytest.approx(140.34)
        det.set_excess_bias_v(7.5, channel=2)
        assert det.efficiency(2) == pytest.approx(0.575)
        status = det.status()["channels"]
        assert status[1]["running"] and status[1]["state"] == "READY"
        assert status[1]["efficiency"] == pytest.approx(0.8)
        assert status[2]["bias_v"] == pytest.approx(135.38)
        assert status[1]["count_rate_hz"] == 1523.0
        assert det.count_rate_hz(2) == 1611.0
        det.bias_off(2)
        assert not det.is_biased(2) and det.is_biased(1)
    assert device_state(backend, UNIT_A) == (False, 0.0)
    assert device_state(backend, UNIT_B) == (False, 0.0)


def test_dark_count_rate_is_the_configured_one_while_biased(backend):
    with make(backend, settings={"efficiency": 0.7, "dark_count_rate_hz": {"1": 25.0}}) as det:
        assert det.dark_count_rate_hz(1) == 0.0
        det.bias_on(1)
        assert det.dark_count_rate_hz(1) == 25.0
        with pytest.raises(InstrumentError, match="no dark_count_rate_hz configured"):
            det.dark_count_rate_hz(2)


def test_integration_time_command(backend, mocker):
    with make(backend) as det:
        writes = mocker.spy(det.unit(1).link, "write")
        det.set_integration_time_ms(400, channel=1)
        assert writes.call_args_list[0].args == ("COUNTERS:INTEGRATION_TIME 400",)
        assert det.unit(1).ask_int("COUNTERS:INTEGRATION_TIME?") == 400


# ------------------------------------------------------------------------------ limits
@pytest.mark.parametrize("call, match", [
    (lambda d: d.set_excess_bias_v(16.0), "above the limit max_excess_bias_v = 15 V"),
    (lambda d: d.set_excess_bias_v(-1.0), "not an excess bias"),
    (lambda d: d.set_efficiency(0.85), "outside the calibrated range 0 to 0.8"),
    (lambda d: d.set_temperature_c(-5.0), "outside the ID120's range -50 to -10 degC"),
    (lambda d: d.set_temperature_c(-45.0), "below the limit min_temperature_c = -42 degC"),
    (lambda d: d.set_dead_time_ns(2e9), "outside the ID120's range 40000 to 1e\\+09 ns"),
    (lambda d: d.set_dead_time_ns(40_000.0), "below the limit min_dead_time_ns = 80000 ns"),
    (lambda d: d.set_threshold_mv(1100.0), "outside the ID120's range 0 to 1047 mV"),
    (lambda d: d.set_integration_time_ms(50), "outside the ID120's range 200 to 100000 ms"),
    (lambda d: d.bias_on(), "no bias setpoint"),
])
def test_values_beyond_limits_are_refused_before_sending(backend, mocker, call, match):
    with make(backend, limits={"min_temperature_c": -42.0,
                               "min_dead_time_ns": 80_000.0}) as det:
        write, query = spies(mocker, det)
        with pytest.raises(LimitError, match=match):
            call(det)
        write.assert_not_called()
        query.assert_not_called()


def test_absolute_bias_limit_uses_the_breakdown_voltage(backend, mocker):
    with make(backend, limits={"max_bias_v": 135.0}) as det:
        write, query = spies(mocker, det)
        with pytest.raises(LimitError, match=r"bias 140.34 V \(breakdown 125.34 V \+ 15 V\) "
                                             r"is above the limit max_bias_v = 135 V"):
            det.set_efficiency(0.8, channel=1)
        write.assert_not_called()
        query.assert_not_called()
        det.set_excess_bias_v(9.0, channel=1)  # 134.34 V: fine


@pytest.mark.parametrize("settings, limits, match", [
    ({}, {"max_excess_bias_v": None}, "max_excess_bias_v: missing"),
    ({"efficiency": {"5": 0.5}}, {}, r"settings.efficiency.5: no ID120 on channel 5"),
    ({"efficiency_curve": [[0.0, 0.0], [5.0, 0.4], [4.0, 0.6]]}, {}, "increase strictly"),
    ({"resources": {"x": UNIT_A}}, {}, "not a time-tagger input"),
    ({"error_queue": "yes"}, {}, "expected true or false"),
    ({"wavelength_nm": 780}, {}, "unknown setting"),
])
def test_configuration_errors(backend, settings, limits, match):
    lim = {k: v for k, v in dict(LIMITS, **limits).items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        IdqId120(name="detectors", backend=backend,
                 settings={"resources": {"1": UNIT_A}, "efficiency_curve": CURVE, **settings},
                 limits=lim, config_key="bench.toml: instruments.detectors")


def test_one_unit_needs_its_channel(backend):
    with pytest.raises(ConfigError, match="settings.channel: missing"):
        IdqId120(name="detectors", resource=UNIT_A, backend=backend, limits=LIMITS)
    with pytest.raises(ConfigError, match="either resource"):
        IdqId120(name="detectors", resource=UNIT_A, backend=backend, limits=LIMITS,
                 settings={"resources": {"1": UNIT_A}})


# ------------------------------------------------------------------------ device faults
def test_device_error_is_raised_with_the_command(backend):
    with make(backend) as det:
        with pytest.raises(InstrumentError) as e:
            det.set_integration_time_ms(400)  # unit B's firmware lacks the command
        assert str(e.value) == ('detectors channel 2: COUNTERS:INTEGRATION_TIME 400: device '
                                f'error: -100,"Command error" ({UNIT_B})')
        det.unit(1).check_errors()  # queues are empty again


def test_without_error_queue_no_syst_err_is_sent(backend, mocker):
    with make(backend, settings={"error_queue": False}) as det:
        write, _ = spies(mocker, det)
        det.set_threshold_mv(100.0, channel=1)
        assert [c.args[0] for c in write.call_args_list] == ["THRESHOLD:VOLTAGE 100000"]


def test_no_reply_is_a_timeout_naming_instrument_command_and_resource(backend):
    det = make(backend, resource=MUTE, settings={"channel": 1})
    det.connect()
    try:
        with pytest.raises(InstrumentError) as e:
            det.count_rate_hz(1)
        msg = str(e.value)
        assert msg.startswith("detectors channel 1: query 'COUNTERS:DETECTION_FREQ?'")
        assert "no reply within 0.2 s" in msg and MUTE in msg
    finally:
        det.close()


def test_garbled_reply(backend):
    det = make(backend, resource=GARBLED, settings={"channel": 4})
    with det:
        with pytest.raises(InstrumentError, match=r"detectors channel 4: query "
                                                  r"'COUNTERS:DETECTION_FREQ\?': garbled "
                                                  r"reply '15#3'"):
            det.count_rate_hz(4)


def test_unsettled_temperature_stops_the_unit(backend):
    with make(backend, resource=WARM, settings={"channel": 1, "efficiency": 0.7}) as det:
        with pytest.raises(InstrumentError, match=r"did not settle within 0.2 s: -20 degC, "
                                                  r"set point -40 degC"):
            det.bias_on()
        assert not det.is_biased(1)
    assert device_state(backend, WARM) == (False, 0.0)


# ------------------------------------------------------------------------- safe state
def test_safe_state_on_an_exception(backend):
    with pytest.raises(RuntimeError, match="boom"), make(backend,
                                                         settings={"efficiency": 0.7}) as det:
        det.bias_on()
        assert device_state(backend, UNIT_B)[0]
        raise RuntimeError("boom")
    assert not det.connected
    assert device_state(backend, UNIT_A) == (False, 0.0)
    assert device_state(backend, UNIT_B) == (False, 0.0)


def test_safe_state_reaches_every_unit_when_one_fails(backend, mocker):
    det = make(backend, settings={"efficiency": 0.7})
    det.connect()
    det.bias_on()
    mocker.patch.object(det.unit(1).link, "write",
                        side_effect=InstrumentError("detectors channel 1: write: link lost"))
    with pytest.raises(InstrumentError, match="safe_state: detectors channel 1"):
        det.safe_state()
    det.close()
    assert device_state(backend, UNIT_B) == (False, 0.0)
