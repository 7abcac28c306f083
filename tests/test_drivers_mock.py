"""The instrument interfaces and the mock drivers on the simulated optical table."""

from __future__ import annotations

import dataclasses
import math
from contextlib import ExitStack

import numpy as np
import pytest

from qkdctl.config import load_bench
from qkdctl.drivers import (
    DRIVERS,
    ROLES,
    Identity,
    Laser,
    MockDetectors,
    MockLaser,
    MockPolarizationModulator,
    MockTimeTagger,
    PolarizationModulator,
    SinglePhotonDetector,
    TimeTagger,
    available_drivers,
    build_mock_bench,
    driver_class,
)
from qkdctl.errors import ConfigError, InstrumentError, LimitError

SEED = 20240601


@pytest.fixture(scope="module")
def cfg():
    return load_bench()


@pytest.fixture
def bench(cfg):
    return build_mock_bench(cfg, SEED)


@pytest.fixture
def live(bench):
    """The bench connected and acquiring: laser on, detectors biased, tagger started."""
    with ExitStack() as stack:
        for inst in bench.values():
            stack.enter_context(inst)
        bench["laser"].output_on()
        bench["detectors"].bias_on()
        bench["modulator"].start()
        bench["tagger"].start()
        yield bench


def with_instrument(cfg, name, **changes):
    inst = dataclasses.replace(cfg.instruments[name], **changes)
    return dataclasses.replace(cfg, instruments={**cfg.instruments, name: inst})


def with_sim_detectors(cfg, **changes):
    dets = tuple(dataclasses.replace(d, **changes) for d in cfg.sim.detectors)
    return dataclasses.replace(cfg, sim=dataclasses.replace(cfg.sim, detectors=dets))


def raw_click_rates_hz(table):
    """Per-detector click rate before dead time: photons (textbook formula) + dark counts."""
    p_click = table.click_probabilities()[0]
    seq = table.sequence
    pz = seq.effective_z_probability
    pk = seq.effective_intensity_probabilities
    w = np.array([0.5 * (pz if (code >> 1) & 1 == 0 else 1 - pz) * pk[code >> 2]
                  for code in range(p_click.shape[0])])
    assert math.isclose(w.sum(), 1.0)
    dark = np.array([d.dark_count_rate_hz if d.biased else 0.0 for d in table.detectors])
    return table.rep_rate_hz * (w @ p_click) + dark


def measured_rate_hz(rate_hz, dead_time_ns):
    """Non-paralysable dead time: R = r / (1 + r tau)."""
    return rate_hz / (1.0 + rate_hz * dead_time_ns * 1e-9)


def counts(ch, channels):
    return np.array([np.count_nonzero(ch == c) for c in channels])


def assert_within_sigmas(observed, expected, n_sigma=5.0):
    """Counts agree with their expectation within n_sigma Poisson standard deviations.

    (Dead time makes counts sub-Poissonian, so sqrt(N) is a conservative sigma.)
    """
    observed = np.atleast_1d(observed).astype(float)
    expected = np.atleast_1d(expected).astype(float)
    tol = n_sigma * np.sqrt(expected)
    assert np.all(np.abs(observed - expected) <= tol), (observed, expected, tol)


# ------------------------------------------------------------------------ building a bench


def test_build_mock_bench_shares_one_table_and_powers_up_safe(bench, cfg):
    assert set(bench) == set(cfg.instruments) == {"laser", "modulator", "detectors", "tagger"}
    assert isinstance(bench["laser"], MockLaser) and isinstance(bench["laser"], Laser)
    assert isinstance(bench["modulator"], PolarizationModulator)
    assert isinstance(bench["detectors"], SinglePhotonDetector)
    assert isinstance(bench["tagger"], TimeTagger)
    table = bench["laser"].table
    assert all(inst.table is table for inst in bench.values())
    assert all(not inst.connected for inst in bench.values())
    assert table.laser_on is False
    assert not any(d.biased for d in table.detectors)
    assert bench["laser"].limits == {"max_current_ma": 60.0}
    assert bench["detectors"].channels == (1, 2, 3, 4)
    assert bench["tagger"].channels == (0, 1, 2, 3, 4)
    assert bench["tagger"].resolution_ps == 1


def test_settings_are_applied_on_connect(cfg):
    cfg2 = with_instrument(cfg, "laser", settings={"current_ma": 40.0, "temperature_c": 21.5})
    cfg2 = with_instrument(cfg2, "detectors", settings={"dead_time_ns": {"2": 80.0}})
    bench = build_mock_bench(cfg2, SEED)
    table = bench["laser"].table
    assert table.laser_current_ma == 45.0  # nothing sent before connecting
    with bench["laser"] as laser, bench["detectors"] as det:
        assert table.laser_current_ma == 40.0
        assert laser.current_ma == 40.0 and laser.temperature_c == 21.5
        assert table.laser_on is False  # settings are setpoints, never "output on"
        assert det.dead_time_ns(2) == 80.0 and det.dead_time_ns(1) == 50.0


@pytest.mark.parametrize("name, changes, key", [
    ("laser", {"settings": {"current_ma": 45.0, "wavelength_nm": 1550.0}},
     "instruments.laser.settings.wavelength_nm"),
    ("laser", {"settings": {"current_ma": 75.0}}, "instruments.laser.settings.current_ma"),
    ("laser", {"settings": {"current_ma": "high"}}, "instruments.laser.settings.current_ma"),
    ("laser", {"limits": {}}, "instruments.laser.limits.max_current_ma"),
    ("laser", {"limits": {"max_current_ma": 60.0, "max_power_mw": 1.0}},
     "instruments.laser.limits.max_power_mw"),
    ("detectors", {"settings": {"efficiency": 1.5}}, "instruments.detectors.settings.efficiency"),
    ("detectors", {"settings": {"dead_time_ns": {"9": 50.0}}},
     "instruments.detectors.settings.dead_time_ns.9"),
    ("tagger", {"driver": "swabian"}, "instruments.tagger.driver"),
])
def test_bad_instrument_config_is_a_config_error_naming_the_key(cfg, name, changes, key):
    with pytest.raises(ConfigError) as e:
        build_mock_bench(with_instrument(cfg, name, **changes), SEED)
    assert cfg.path in str(e.value) and key in str(e.value)


def test_unknown_role_is_a_config_error(cfg):
    bad = dataclasses.replace(cfg, instruments={**cfg.instruments,
                                                "shutter": cfg.instruments["modulator"]})
    with pytest.raises(ConfigError, match="instruments.shutter"):
        build_mock_bench(bad, SEED)


def test_registry():
    drivers = available_drivers()
    # the four roles of a session and the optional polarization controller
    assert drivers["mock"] == ("laser", "modulator", "detectors", "tagger", "polarization")
    assert tuple(ROLES) == drivers["mock"]
    assert driver_class("mock", "laser") is MockLaser
    assert driver_class("mock", "tagger") is MockTimeTagger
    assert DRIVERS["mock"]["detectors"] is MockDetectors
    assert DRIVERS["mock"]["modulator"] is MockPolarizationModulator
    for role, cls in DRIVERS["mock"].items():
        assert issubclass(cls, ROLES[role])
    with pytest.raises(ConfigError, match="nosuch"):
        driver_class("nosuch", "laser")
    with pytest.raises(ConfigError, match="shutter"):
        driver_class("mock", "shutter")


def test_identity_and_status(live):
    ident = live["laser"].identity()
    assert isinstance(ident, Identity)
    assert (ident.make, ident.model, ident.serial) == ("qkdctl", "MockLaser", "SIM-laser")
    assert live["laser"].status()["output_on"] is True
    assert live["laser"].status()["current_ma"] == 45.0
    assert live["detectors"].status()["channels"][3]["dead_time_ns"] == 50.0
    assert live["modulator"].status()["running"] is True
    live["tagger"].read_block(duration_s=1e-4)
    st = live["tagger"].status()
    assert st["running"] and st["pulses_simulated"] == 100_000 and st["tags_read"] > 0


# ------------------------------------------------------------------ context manager, safety


def assert_safe(bench):
    table = bench["laser"].table
    assert table.laser_on is False
    assert not any(d.biased for d in table.detectors)
    assert bench["tagger"]._running is False
    assert bench["modulator"]._running is False
    assert all(not inst.connected for inst in bench.values())


def test_context_manager_goes_safe_on_normal_exit(bench):
    table = bench["laser"].table
    with ExitStack() as stack:
        for inst in bench.values():
            stack.enter_context(inst)
        bench["laser"].output_on()
        bench["detectors"].bias_on()
        bench["modulator"].start()
        bench["tagger"].start()
        assert table.laser_on and all(d.biased for d in table.detectors)
        assert bench["tagger"].running and bench["modulator"].running
    assert_safe(bench)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_context_manager_goes_safe_when_the_block_raises(bench, exc):
    with pytest.raises(type(exc)):
        with bench["laser"] as laser, bench["detectors"] as det, \
                bench["modulator"] as mod, bench["tagger"] as tagger:
            laser.output_on()
            det.bias_on()
            mod.start()
            tagger.start()
            tagger.read_block(duration_s=1e-5)
            raise exc
    assert_safe(bench)


def test_failed_safe_state_is_raised_and_the_instrument_still_closed(bench, mocker):
    laser = bench["laser"]
    with pytest.raises(InstrumentError, match="no answer"):
        with laser:
            laser.output_on()
            mocker.patch.object(laser, "_set_output",
                                side_effect=InstrumentError("laser: output off: no answer"))
    assert not laser.connected


def test_failed_setting_on_connect_leaves_the_instrument_safe_and_closed(bench, mocker):
    laser = bench["laser"]
    laser.table.set(laser_on=True)  # left on by someone else
    mocker.patch.object(laser, "_set_temperature_c",
                        side_effect=InstrumentError("laser: TEMP: no answer"))
    with pytest.raises(InstrumentError, match="TEMP"):
        with laser:
            pytest.fail("the with body must not run")
    assert laser.table.laser_on is False
    assert not laser.connected


def test_commands_need_a_connection(bench):
    table = bench["laser"].table
    version = table.version
    with pytest.raises(InstrumentError, match="laser: set_current_ma: not connected"):
        bench["laser"].set_current_ma(30.0)
    with pytest.raises(InstrumentError, match="detectors: bias_on: not connected"):
        bench["detectors"].bias_on()
    with pytest.raises(InstrumentError, match="tagger: start: not connected"):
        bench["tagger"].start()
    assert table.version == version and table.laser_current_ma == 45.0


def test_redundant_commands_do_not_touch_the_table(live):
    table = live["laser"].table
    version = table.version
    live["laser"].output_on()
    live["laser"].set_current_ma(45.0)
    live["detectors"].bias_on()
    live["detectors"].set_dead_time_ns(50.0)
    live["modulator"].set_rotation_rad(0.0)
    assert table.version == version


# ------------------------------------------------------------------------------- the laser


@pytest.mark.parametrize("value", [60.5, 1e3, -1.0, float("nan"), float("inf")])
def test_over_limit_current_raises_before_anything_is_sent(live, mocker, value):
    laser = live["laser"]
    table = laser.table
    before = (table.version, table.laser_current_ma, table.laser_on)
    hook = mocker.spy(laser, "_set_current_ma")
    table_set = mocker.spy(table, "set")
    with pytest.raises(LimitError) as e:
        laser.set_current_ma(value)
    assert str(e.value).startswith("laser: set_current_ma")
    if math.isfinite(value):
        assert f"{value:g} mA" in str(e.value)
    hook.assert_not_called()
    table_set.assert_not_called()
    assert (table.version, table.laser_current_ma, table.laser_on) == before


def test_limit_is_checked_even_when_not_connected(bench):
    with pytest.raises(LimitError, match="max_current_ma = 60 mA"):
        bench["laser"].set_current_ma(61.0)


def test_output_on_refuses_a_setpoint_above_the_limit(bench):
    laser = bench["laser"]
    with laser:
        laser.table.set(laser_current_ma=70.0)  # left there by another program
        with pytest.raises(LimitError, match="laser: output_on"):
            laser.output_on()
        assert laser.table.laser_on is False


def test_laser_current_sets_the_mean_photon_number(live):
    laser, tagger, table = live["laser"], live["tagger"], live["laser"].table
    det_channels = live["detectors"].channels
    dead_ns = np.array([live["detectors"].dead_time_ns(c) for c in det_channels])
    duration_s = 2e-3
    m_cal = table.mean_photons_at_detectors()
    results = {}
    for current_ma in (45.0, 30.0):
        laser.set_current_ma(current_ma)
        expected = measured_rate_hz(raw_click_rates_hz(table), dead_ns) * duration_s
        _, ch = tagger.read_block(duration_s=duration_s)
        results[current_ma] = counts(ch, det_channels)
        assert_within_sigmas(results[current_ma], expected)
    # power scale (I - I_th) / (I_cal - I_th) = (30 - 20) / (45 - 20)
    np.testing.assert_allclose(table.mean_photons_at_detectors(), 0.4 * m_cal, rtol=1e-12)
    assert results[30.0].sum() < 0.5 * results[45.0].sum()
    assert np.all(results[30.0] < results[45.0])


def test_output_off_leaves_only_dark_counts(live):
    laser, det, tagger, table = live["laser"], live["detectors"], live["tagger"], \
        live["laser"].table
    laser.output_off()
    p_any = table.click_probabilities()[1]
    assert p_any.max() == 0.0  # not one photon per pulse reaches Bob
    rates = np.array([det.dark_count_rate_hz(c) for c in det.channels])
    np.testing.assert_array_equal(rates, 30.0)  # as configured in sim.toml
    n = np.zeros(len(det.channels), np.int64)
    seconds = 10
    for _ in range(seconds):
        _, ch = tagger.read_block(duration_s=1.0)
        n += counts(ch, det.channels)
    assert tagger.elapsed_s == pytest.approx(seconds)
    expected = rates * seconds  # ~1200 counts in all; dead time negligible at 30 Hz
    assert_within_sigmas(n.sum(), expected.sum())
    assert np.all(n > 0)


def test_bias_off_silences_the_detectors(live):
    live["detectors"].bias_off()
    assert live["detectors"].dark_count_rate_hz(1) == 0.0
    _, ch = live["tagger"].read_block(duration_s=1e-3)
    assert np.all(ch == live["laser"].table.sync_channel)
    assert ch.size == 1000  # the sync tags alone, one per 1000 pulses


# ----------------------------------------------------------------------------- detectors


def test_dead_time_change_changes_the_count_rate(live):
    det, tagger, table = live["detectors"], live["tagger"], live["laser"].table
    duration_s = 2e-3
    channels = det.channels
    raw = raw_click_rates_hz(table)
    observed = {}
    for dead_time_ns in (50.0, 500.0, 20.0):
        det.set_dead_time_ns(dead_time_ns, channel=1)
        assert table.detectors[0].dead_time_ns == dead_time_ns
        dead = np.array([dead_time_ns, 50.0, 50.0, 50.0])
        _, ch = tagger.read_block(duration_s=duration_s)
        observed[dead_time_ns] = counts(ch, channels)
        assert_within_sigmas(observed[dead_time_ns], measured_rate_hz(raw, dead) * duration_s)
    c1 = {k: v[0] for k, v in observed.items()}
    assert c1[500.0] < 0.6 * c1[50.0] < 0.6 * c1[20.0]


def test_detector_commands_are_checked(live):
    det, table = live["detectors"], live["laser"].table
    version = table.version
    with pytest.raises(InstrumentError, match="detectors: set_dead_time_ns: no channel 7"):
        det.set_dead_time_ns(100.0, channel=7)
    with pytest.raises(LimitError, match="detectors: set_efficiency"):
        det.set_efficiency(1.2, channel=1)
    with pytest.raises(LimitError, match="detectors: set_dead_time_ns"):
        det.set_dead_time_ns(-5.0)
    assert table.version == version
    det.set_efficiency(0.3, channel=4)
    assert table.detectors[3].efficiency == 0.3 and det.efficiency(4) == 0.3
    assert det.efficiency(1) == 0.6
    det.bias_off(channel=2)
    assert [det.is_biased(c) for c in det.channels] == [True, False, True, True]


# ---------------------------------------------------------------------------- modulator


def test_modulator_rotation_sets_the_misalignment(live):
    mod, table = live["modulator"], live["laser"].table
    e0 = table.effective_misalignment
    mod.set_rotation_rad(0.1)
    assert table.polarization_rotation_rad == 0.1 == mod.rotation_rad
    e1 = table.misalignment
    e2 = math.sin(0.1) ** 2
    assert table.effective_misalignment == pytest.approx(e1 * (1 - e2) + e2 * (1 - e1))
    assert table.effective_misalignment > e0
    with pytest.raises(LimitError, match="modulator: set_rotation_rad"):
        mod.set_rotation_rad(float("nan"))
    mod.stop()
    assert not mod.running


# ------------------------------------------------------------------------------ the tagger


def test_read_block_returns_sorted_int64_and_uint8(live):
    tagger = live["tagger"]
    ts, ch = tagger.read_block(duration_s=1e-3)
    assert ts.dtype == np.int64 and ch.dtype == np.uint8
    assert ts.ndim == 1 and ts.shape == ch.shape and ts.size > 1000
    assert np.all(np.diff(ts) >= 0)
    assert set(np.unique(ch)) <= set(tagger.channels)
    assert np.count_nonzero(ch == 0) == 1000  # one sync per 1000 pulses at 1 GHz
    assert tagger.elapsed_s == pytest.approx(1e-3) and tagger.pulses_simulated == 1_000_000
    ts2, _ = tagger.read_block(duration_s=1e-3)
    assert ts2[0] >= ts[-1]  # blocks follow each other
    assert tagger.read_block(duration_s=0.0)[0].size == 0


def run(bench, reads):
    """Acquire with the given reads, then finish; return the whole tag stream."""
    parts = []
    with bench["laser"] as laser, bench["detectors"] as det, bench["tagger"] as tagger:
        laser.output_on()
        det.bias_on()
        tagger.start()
        for kind, value in reads:
            if kind == "s":
                parts.append(tagger.read_block(duration_s=value))
            else:
                parts.append(tagger.read_pulses(value))
        parts.append(tagger.finish())
        elapsed = tagger.elapsed_s
    ts = np.concatenate([p[0] for p in parts])
    ch = np.concatenate([p[1] for p in parts])
    return ts, ch, elapsed


def test_tags_do_not_depend_on_the_block_size(cfg):
    ref_ts, ref_ch, elapsed = run(build_mock_bench(cfg, SEED), [("s", 3e-3)])
    assert elapsed == pytest.approx(3e-3)
    assert np.all(np.diff(ref_ts) >= 0) and ref_ts.size > 25_000
    for reads in ([("s", 1e-3)] * 3,
                  [("s", 1e-3 / 3)] * 9,  # the pulse count follows the total time
                  [("n", 1_000_000)] * 3,
                  [("n", 123_457), ("s", 1.5e-3), ("n", 1), ("s", 1.376542e-3)]):
        ts, ch, elapsed = run(build_mock_bench(cfg, SEED), reads)
        assert elapsed == pytest.approx(3e-3)
        np.testing.assert_array_equal(ts, ref_ts)
        np.testing.assert_array_equal(ch, ref_ch)


def test_a_different_seed_gives_different_tags(cfg):
    a = run(build_mock_bench(cfg, SEED), [("s", 1e-4)])[0]
    b = run(build_mock_bench(cfg, SEED + 1), [("s", 1e-4)])[0]
    assert a.size != b.size or np.any(a != b)


def test_tagger_reads_only_while_acquiring(bench):
    tagger = bench["tagger"]
    with tagger:
        with pytest.raises(InstrumentError, match="tagger: read_block: not acquiring"):
            tagger.read_block(duration_s=1e-3)
        with pytest.raises(InstrumentError, match="tagger: read_pulses: not acquiring"):
            tagger.read_pulses(1000)
        tagger.start()
        tagger.read_block(duration_s=1e-4)
        tagger.stop()
        with pytest.raises(InstrumentError, match="not acquiring"):
            tagger.read_block(duration_s=1e-3)
        assert tagger.pulses_simulated == 100_000
        tagger.start()
        with pytest.raises(LimitError, match="duration_s=-1"):
            tagger.read_block(duration_s=-1.0)
        tail_ts, tail_ch = tagger.finish()
        assert tail_ts.dtype == np.int64 and tail_ch.dtype == np.uint8
        assert not tagger.running and tagger.finished
        with pytest.raises(InstrumentError, match="run is finished"):
            tagger.start()
        with pytest.raises(InstrumentError, match="run is finished"):
            tagger.read_block(duration_s=1e-3)
        assert tagger.finish()[0].size == 0
    with pytest.raises(InstrumentError, match="not connected"):
        tagger.read_block(duration_s=1e-3)
