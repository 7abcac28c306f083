"""The Thorlabs ITC4000 and CLD101x drivers against pyvisa-sim instruments.

The simulated instruments are in ``tests/visa_sim/thorlabs_ld.yaml``; each test
writes its own copy (with the changes it needs) to its ``tmp_path``, so that
every test starts from a freshly powered-up instrument.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

pytest.importorskip("pyvisa_sim")
yaml = pytest.importorskip("yaml")

from qkdctl.drivers import thorlabs_ld, transport  # noqa: E402
from qkdctl.drivers.base import Identity  # noqa: E402
from qkdctl.drivers.thorlabs_ld import CLD1015, ITC4000  # noqa: E402
from qkdctl.errors import ConfigError, InstrumentError, LimitError  # noqa: E402

YAML = Path(__file__).parent / "visa_sim" / "thorlabs_ld.yaml"
ITC = "USB0::0x1313::0x804A::M00412345::INSTR"
CLD = "USB0::0x1313::0x804F::M00441199::INSTR"

#: settings that keep the sequences fast: no pause between ramp steps, no hold time
FAST = {"ramp_step_ma": 10.0, "ramp_step_s": 0.0, "settle_hold_s": 0.0,
        "settle_timeout_s": 0.3, "temperature_window_c": 0.1}


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(ITC4000, "SETTLE_POLL_S", 0.01)
    monkeypatch.setattr(CLD1015, "SETTLE_POLL_S", 0.01)
    monkeypatch.setattr(thorlabs_ld.ThorlabsLaserDiodeController, "RECONNECT_DELAY_S", 0.0)


@pytest.fixture
def sim(tmp_path):
    """``sim(device, replies={query: reply}, drop=(queries), defaults={prop: value},
    specs={prop: {...}})`` -> a pyvisa-sim backend string for a modified copy."""
    made: list[str] = []

    def make(device="itc4001", *, replies=None, drop=(), defaults=None, specs=None):
        data = yaml.safe_load(YAML.read_text())
        dev = data["devices"][device]
        for d in dev["dialogues"]:
            if replies and d["q"] in replies:
                d["r"] = replies[d["q"]]
        dev["dialogues"] = [d for d in dev["dialogues"] if d["q"] not in drop]
        for prop, value in (defaults or {}).items():
            dev["properties"][prop]["default"] = value
        for prop, spec in (specs or {}).items():
            dev["properties"][prop]["specs"].update(spec)
        path = tmp_path / f"{device}-{len(made)}.yaml"
        path.write_text(yaml.safe_dump(data))
        backend = f"{path}@sim"
        made.append(backend)
        return backend

    yield make
    for backend in made:  # close the simulated instruments' resource managers
        rm = transport._RESOURCE_MANAGERS.pop(backend, None)
        if rm is not None:
            rm.close()


def laser(backend, cls=ITC4000, resource=ITC, *, settings=None, limits=None, timeout_s=1.0):
    """A driver built the way build_bench builds it."""
    s = dict(FAST)
    s.update({"current_ma": 45.0} if settings is None else settings)
    return cls(name="laser", resource=resource, backend=backend, timeout_s=timeout_s,
               settings=s, limits={"max_current_ma": 60.0} if limits is None else limits,
               config_key="bench.toml: instruments.laser")


def recorder(inst, monkeypatch) -> list[str]:
    """Every command written to and every query sent through the link, in order."""
    sent: list[str] = []
    link = inst.link
    write, query = link.write, link.query

    def rec_write(command):
        sent.append(command)
        return write(command)

    def rec_query(command):
        sent.append(command)
        return query(command)

    monkeypatch.setattr(link, "write", rec_write)
    monkeypatch.setattr(link, "query", rec_query)
    return sent


def writes(sent: list[str]) -> list[str]:
    return [c for c in sent if not c.endswith("?")]


def probe(backend, cls=ITC4000, resource=ITC) -> dict:
    """The instrument's state, read by a second connection (nothing applied)."""
    with laser(backend, cls, resource, settings={}) as p:
        p.safe_state = lambda: None  # read only: leave the state as it is
        return {"output_on": p.is_on, "tec_on": p.ask_bool(f"{p.TEC_OUTPUT}?"),
                "current_ma": p.current_ma}


# ------------------------------------------------------------------ identity, connect


def test_identity_and_read_only_connect(sim, monkeypatch):
    las = laser(sim(), settings={})
    sent = recorder(las, monkeypatch)
    with las:
        assert las.identity() == Identity(make="THORLABS", model="ITC4001",
                                          serial="M00412345", firmware="1.8.0/1.5.0/2.3.0")
        # connecting reads; the only command is *CLS
        assert writes(sent) == ["*CLS"]
        assert {"*IDN?", "UNIT:TEMP?", "SOUR:FUNC:MODE?", "SOUR:CURR:LIM?"} <= set(sent)
        assert las.hardware_current_limit_ma == pytest.approx(60.0)


def test_settings_applied_at_connect_in_amps(sim, monkeypatch):
    las = laser(sim(), settings={"current_ma": 45.0, "temperature_c": 24.5})
    sent = recorder(las, monkeypatch)
    with las:
        assert writes(sent) == ["*CLS", "SOUR:CURR 0.045000", "SOUR2:TEMP 24.500"]
        assert las.current_ma == pytest.approx(45.0)
        assert las.temperature_c == pytest.approx(24.5)
        assert not las.is_on


@pytest.mark.parametrize("idn", ["KEYSIGHT,B2901A,MY123,1.0", "THORLABS,LDC4005,M1,1.0"])
def test_other_instrument_refused(sim, idn):
    las = laser(sim(replies={"*IDN?": idn}))
    with pytest.raises(InstrumentError, match=r"laser: connect: the instrument is .* "
                                              r"this driver drives Thorlabs ITC4000"):
        las.connect()
    assert not las.connected and not las.link.is_open


def test_driver_of_the_other_family_refused(sim):
    backend = sim()
    with pytest.raises(InstrumentError, match="Thorlabs CLD101x"):
        laser(backend, CLD1015, ITC).connect()


def test_configured_limit_above_the_hardware_limit_refused(sim, monkeypatch):
    las = laser(sim(), settings={}, limits={"max_current_ma": 80.0})
    sent = recorder(las, monkeypatch)
    with pytest.raises(ConfigError, match=r"bench.toml: instruments.laser.limits.max_current_ma: "
                                          r"80 mA is above the instrument's own LD current "
                                          r"limit 60 mA \(SOUR:CURR:LIM\?"):
        las.connect()
    assert writes(sent) == ["*CLS"]  # the hardware limit is never written
    assert not las.connected and not las.link.is_open


def test_constant_power_mode_refused(sim):
    with pytest.raises(InstrumentError, match=r"'POW' mode .*constant-current"):
        laser(sim(replies={"SOUR:FUNC:MODE?": "POW"})).connect()


def test_kelvin_instrument_converted(sim, monkeypatch):
    backend = sim(replies={"UNIT:TEMP?": "K", "MEAS:TEMP?": "2.98152E+02"},
                  defaults={"temperature_setpoint": 298.15},
                  specs={"temperature_setpoint": {"min": 278.15, "max": 318.15}})
    las = laser(backend, settings={})
    sent = recorder(las, monkeypatch)
    with las:
        assert las.temperature_c == pytest.approx(25.0)
        assert las.measured_temperature_c() == pytest.approx(25.002)
        las.set_temperature_c(20.0)
        assert "SOUR2:TEMP 293.150" in sent
        assert "UNIT:TEMP CEL" not in sent  # the instrument's unit is left alone


# ------------------------------------------------------------------- setpoints, limits


def test_setpoints_in_amps_on_the_wire(sim, monkeypatch):
    las = laser(sim(), settings={})
    with las:
        sent = recorder(las, monkeypatch)
        las.set_current_ma(12.5)
        las.set_temperature_c(20.25)
        assert writes(sent) == ["SOUR:CURR 0.012500", "SOUR2:TEMP 20.250"]
        assert las.current_ma == pytest.approx(12.5)
        assert las.temperature_c == pytest.approx(20.25)


@pytest.mark.parametrize("value", [60.001, 75.0, -1.0, math.nan, "45"])
def test_current_limit_checked_before_anything_is_sent(sim, mocker, value):
    with laser(sim(), settings={}) as las:
        spy = mocker.spy(las.link, "write")
        with pytest.raises(LimitError, match="laser: set_current_ma"):
            las.set_current_ma(value)
        spy.assert_not_called()


def test_temperature_limits_checked_before_anything_is_sent(sim, mocker):
    las = laser(sim(), settings={}, limits={"max_current_ma": 60.0, "min_temperature_c": 15.0,
                                            "max_temperature_c": 30.0})
    with las:
        spy = mocker.spy(las.link, "write")
        with pytest.raises(LimitError, match="above the limit max_temperature_c = 30 degC"):
            las.set_temperature_c(31.0)
        spy.assert_not_called()


def test_output_on_refused_when_the_instrument_setpoint_is_above_the_limit(sim, mocker):
    # another program left 58 mA; the bench allows 50 mA
    backend = sim(defaults={"current_setpoint": 0.058})
    with laser(backend, settings={}, limits={"max_current_ma": 50.0}) as las:
        spy = mocker.spy(las.link, "write")
        with pytest.raises(LimitError, match="output_on: setpoint: 58 mA is above the limit"):
            las.output_on()
        spy.assert_not_called()
        assert not las.is_on


def test_output_on_refused_when_the_temperature_setpoint_is_out_of_limits(sim, mocker):
    las = laser(sim(), settings={}, limits={"max_current_ma": 60.0, "max_temperature_c": 22.0})
    with las:
        spy = mocker.spy(las.link, "write")
        with pytest.raises(LimitError, match="output_on: temperature setpoint: 25 degC"):
            las.output_on()
        spy.assert_not_called()


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"settings.current_ma: 70 mA is above the limit"):
        laser("unused@sim", settings={"current_ma": 70.0})
    with pytest.raises(ConfigError, match=r"settings.ramp_step_ma: 0 is out of range; "
                                          r"must be >= 0.001"):
        laser("unused@sim", settings={"ramp_step_ma": 0})
    with pytest.raises(ConfigError, match=r"settings.settle_timeout_s: expected a finite number"):
        laser("unused@sim", settings={"settle_timeout_s": "long"})


# ------------------------------------------------------------------ switching on and off


def test_output_on_tec_first_then_checks_then_ramp(sim, monkeypatch):
    las = laser(sim())
    with las:
        sent = recorder(las, monkeypatch)
        las.output_on()
        assert las.is_on
        w = writes(sent)
        assert w == ["OUTP2 1", "SOUR:CURR 0.000000", "OUTP 1", "SOUR:CURR 0.009000",
                     "SOUR:CURR 0.018000", "SOUR:CURR 0.027000", "SOUR:CURR 0.036000",
                     "SOUR:CURR 0.045000"]
        tec_on, ld_on = sent.index("OUTP2 1"), sent.index("OUTP 1")
        assert tec_on < sent.index("MEAS:TEMP?") < ld_on  # waited for the temperature
        for q in ("OUTP:PROT:KEYL:TRIP?", "OUTP:PROT:INTL:TRIP?", "OUTP:PROT:OTEM:TRIP?"):
            last_check = max(i for i, c in enumerate(sent) if c == q)
            assert tec_on < last_check < ld_on  # checked again after the TEC settled
        status = las.status()
        assert status["output_on"] and status["tec_on"]
        assert status["current_ma"] == pytest.approx(45.0)
        assert status["current_measured_ma"] == pytest.approx(44.995)
        assert status["temperature_measured_c"] == pytest.approx(25.002)
        assert status["temperature_c"] == pytest.approx(25.0)
        assert status["hardware_current_limit_ma"] == pytest.approx(60.0)
        assert not (status["keylock_tripped"] or status["interlock_tripped"]
                    or status["over_temperature_tripped"])
        assert status["device_errors"] == []

        del sent[:]
        las.output_off()
        assert writes(sent) == ["SOUR:CURR 0.036000", "SOUR:CURR 0.027000",
                                "SOUR:CURR 0.018000", "SOUR:CURR 0.009000",
                                "SOUR:CURR 0.000000", "OUTP 0", "SOUR:CURR 0.045000"]
        assert not las.is_on
        assert las.current_ma == pytest.approx(45.0)  # setpoint kept for the next output_on
        assert las.status()["tec_on"]  # the TEC stays on
        las.output_on()  # ramps up again
        assert las.is_on and las.current_ma == pytest.approx(45.0)


def test_output_on_twice_does_nothing_more(sim, monkeypatch):
    with laser(sim()) as las:
        las.output_on()
        sent = recorder(las, monkeypatch)
        las.output_on()
        assert writes(sent) == []


def test_ramp_steps_and_pause(sim, monkeypatch):
    las = laser(sim(), settings={"current_ma": 6.0, "ramp_step_ma": 2.0, "ramp_step_s": 0.02})
    with las:
        sent = recorder(las, monkeypatch)
        t0 = time.monotonic()
        las.output_on()
        assert time.monotonic() - t0 >= 0.04  # 3 steps, 2 pauses
        ramp = [c for c in writes(sent) if c.startswith("SOUR:CURR")]
        assert ramp == ["SOUR:CURR 0.000000", "SOUR:CURR 0.002000", "SOUR:CURR 0.004000",
                        "SOUR:CURR 0.006000"]


def test_current_change_while_on_is_ramped(sim, monkeypatch):
    with laser(sim(), settings={"current_ma": 45.0, "ramp_step_ma": 2.0}) as las:
        las.output_on()
        sent = recorder(las, monkeypatch)
        las.set_current_ma(50.0)
        amps = [float(c.split()[1]) for c in writes(sent)]
        assert amps == [0.046666, 0.048333, 0.05]  # rounded down to 1 uA
        steps = [b - a for a, b in zip([0.045] + amps, amps, strict=False)]
        assert all(0 < s <= 0.002 + 1e-9 for s in steps)
        assert las.current_ma == pytest.approx(50.0)


def test_ramp_from_a_setpoint_above_the_limit_never_exceeds_it(sim, monkeypatch):
    # the LD was left on at 58 mA by another program; this bench allows 50 mA
    backend = sim(defaults={"ld_output": 1, "tec_output": 1, "current_setpoint": 0.058})
    with laser(backend, settings={"ramp_step_ma": 5.0}, limits={"max_current_ma": 50.0}) as las:
        assert las.is_on  # connecting left it as it was
        sent = recorder(las, monkeypatch)
        las.set_current_ma(40.0)
        las.safe_state()
        currents = [float(c.split()[1]) for c in writes(sent) if c.startswith("SOUR:CURR")]
        assert currents[:3] == [0.045, 0.04, 0.035]
        assert max(currents) <= 0.050
        assert not las.is_on


def test_interrupt_during_the_ramp_switches_the_output_off(sim, monkeypatch):
    las = laser(sim(), settings={"current_ma": 45.0, "ramp_step_s": 0.01})
    real_sleep = time.sleep
    calls = []

    def sleep(s):
        calls.append(s)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_sleep(s)

    with las:
        sent = recorder(las, monkeypatch)
        monkeypatch.setattr(thorlabs_ld.time, "sleep", sleep)
        with pytest.raises(KeyboardInterrupt):
            las.output_on()
        monkeypatch.setattr(thorlabs_ld.time, "sleep", real_sleep)
        w = writes(sent)
        assert w.index("OUTP 1") < w.index("OUTP 0")
        assert not las.is_on
        assert las.current_ma == pytest.approx(45.0)


def test_interrupt_during_the_ramp_down_still_switches_the_output_off(sim, monkeypatch):
    las = laser(sim(), settings={"current_ma": 45.0, "ramp_step_s": 0.01})
    with las:
        las.output_on()
        sent = recorder(las, monkeypatch)

        def sleep(s):
            raise KeyboardInterrupt

        monkeypatch.setattr(thorlabs_ld.time, "sleep", sleep)
        with pytest.raises(KeyboardInterrupt):
            las.output_off()
        assert writes(sent) == ["SOUR:CURR 0.036000", "OUTP 0"]
        assert not las.is_on


@pytest.mark.parametrize("query, message", [
    ("OUTP:PROT:KEYL:TRIP?", "the keylock is tripped"),
    ("OUTP:PROT:INTL:TRIP?", "the interlock is open"),
    ("OUTP:PROT:OTEM:TRIP?", "the over-temperature protection has tripped"),
])
def test_protection_tripped_refuses_output_on(sim, monkeypatch, query, message):
    with laser(sim(replies={query: "1"})) as las:
        sent = recorder(las, monkeypatch)
        with pytest.raises(InstrumentError, match=rf"laser: output_on: {message} "
                                                  rf"\({query.replace('?', '[?]')} -> 1\)"):
            las.output_on()
        assert "OUTP 1" not in sent and "OUTP2 1" not in sent  # refused before the TEC
        assert not las.is_on
        assert las.status()[{"KEYL": "keylock_tripped", "INTL": "interlock_tripped",
                             "OTEM": "over_temperature_tripped"}[query.split(":")[2]]]


def test_temperature_never_settles(sim, monkeypatch):
    with laser(sim(replies={"MEAS:TEMP?": "3.12000E+01"})) as las:
        sent = recorder(las, monkeypatch)
        t0 = time.monotonic()
        with pytest.raises(InstrumentError,
                           match=r"laser: output_on: the diode temperature did not settle within "
                                 r"0.3 s: 31.200 degC measured \(MEAS:TEMP\?\), setpoint 25.000 "
                                 r"\+/- 0.1 degC; the LD output stays off"):
            las.output_on()
        assert 0.3 <= time.monotonic() - t0 < 1.5
        assert writes(sent) == ["OUTP2 1", "OUTP2 0"]  # the TEC it switched on is off again
        assert not las.is_on
    state = probe(las.link.backend)
    assert not state["output_on"] and not state["tec_on"]


def test_temperature_settling_needs_the_hold_time(sim, monkeypatch):
    las = laser(sim(), settings={"settle_hold_s": 0.05, "settle_timeout_s": 1.0})
    with las:
        sent = recorder(las, monkeypatch)
        t0 = time.monotonic()
        las.output_on()
        assert time.monotonic() - t0 >= 0.05
        assert sent.count("MEAS:TEMP?") >= 2


def test_tec_already_on_stays_on_and_tec_off(sim):
    with laser(sim(defaults={"tec_output": 1})) as las:
        las.output_on()
        with pytest.raises(InstrumentError, match="tec_off: the LD output is on"):
            las.tec_off()
        las.output_off()
        assert las.status()["tec_on"]
        las.tec_off()
        assert not las.status()["tec_on"]


# --------------------------------------------------------------------------- faults


def test_device_error_names_the_command(sim):
    with laser(sim()) as las:
        with pytest.raises(InstrumentError,
                           match=r'laser: SOUR2:TEMP 60.000: device error: -222,"Data out of '
                                 r'range" \(USB0::0x1313::0x804A::M00412345::INSTR\)'):
            las.set_temperature_c(60.0)  # outside the instrument's TEC limits (5..45 degC)
        assert las.temperature_c == pytest.approx(25.0)
        assert las.status()["device_errors"] == []  # the queue was read empty


def test_timeout_is_a_clear_error(sim):
    las = laser(sim(drop=("MEAS:CURR?",)), timeout_s=0.2)
    with las:
        t0 = time.monotonic()
        with pytest.raises(InstrumentError,
                           match=r"laser: query 'MEAS:CURR\?': no reply within 0.2 s "
                                 r"\(USB0::0x1313::0x804A::M00412345::INSTR\)"):
            las.status()
        assert time.monotonic() - t0 < 1.0
        las.output_on()  # the instrument still works; the error it queued is not blamed
        assert las.is_on
    assert not probe(las.link.backend)["output_on"]


def test_garbled_reply_is_a_clear_error(sim):
    with laser(sim(replies={"MEAS:TEMP?": "TEMP?ERR"})) as las:
        with pytest.raises(InstrumentError, match=r"laser: query 'MEAS:TEMP\?': garbled reply "
                                                  r"'TEMP\?ERR' \(expected a number\)"):
            las.measured_temperature_c()
        with pytest.raises(InstrumentError, match="garbled reply"):
            las.output_on()
        assert not las.is_on
        assert not las.ask_bool("OUTP2?")  # the TEC it switched on is off again


def test_device_vanishes_and_comes_back(sim):
    backend = sim()
    with laser(backend) as las:
        las.output_on()
        las.link._inst.close()  # the USB device drops off the bus
        with pytest.raises(InstrumentError, match=r"laser: query 'OUTP\?': I/O error"):
            las.status()
        las.safe_state()  # reconnects once, switches off, checks
        assert not las.is_on
    state = probe(backend)
    assert not state["output_on"] and state["tec_on"]


def test_device_gone_for_good(sim, monkeypatch):
    las = laser(sim())
    with pytest.raises(InstrumentError,
                       match=r"laser: safe_state: could not switch the laser diode output off "
                             r"\[.*cannot open.*\]; switch it off at the instrument$"):
        with las:
            las.output_on()
            las.link._inst.close()
            monkeypatch.setattr(las.link, "_do_open", lambda: (_ for _ in ()).throw(
                las.link.fail("open", "cannot open: no such device")))
            las.status()
    assert not las.connected and not las.link.is_open


def test_with_block_exit_leaves_the_output_off(sim):
    backend = sim()
    with laser(backend) as las:
        las.output_on()
        assert probe(backend)["output_on"]
    state = probe(backend)
    assert not state["output_on"]
    assert state["current_ma"] == pytest.approx(45.0)

    with pytest.raises(RuntimeError, match="boom"):
        with laser(backend) as las:
            las.output_on()
            raise RuntimeError("boom")
    assert not probe(backend)["output_on"]


# ---------------------------------------------------------------------------- CLD1015


def test_cld1015_commands(sim, monkeypatch):
    backend = sim("cld1015")
    las = laser(backend, CLD1015, CLD, settings={"current_ma": 20.0, "temperature_c": 25.0})
    sent = recorder(las, monkeypatch)
    with las:
        assert las.identity().model == "CLD1015"
        assert las.hardware_current_limit_ma == pytest.approx(120.0)
        assert "SOUR:CURR:LIM:AMPL?" in sent
        del sent[:]
        las.output_on()
        assert writes(sent) == ["OUTP2:STAT 1", "SOUR:CURR 0.000000", "OUTP:STAT 1",
                                "SOUR:CURR 0.010000", "SOUR:CURR 0.020000"]
        assert "SENS2:TEMP:DATA?" in sent
        status = las.status()
        assert status["output_on"] and status["tec_on"]
        assert status["current_measured_ma"] == pytest.approx(44.998)
        assert status["temperature_measured_c"] == pytest.approx(25.001)
        with pytest.raises(InstrumentError, match="SOUR2:TEMP:SPO 45.000: device error"):
            las.set_temperature_c(45.0)
    assert not probe(backend, CLD1015, CLD)["output_on"]
    with pytest.raises(InstrumentError, match="Thorlabs ITC4000"):
        laser(backend, ITC4000, CLD).connect()
