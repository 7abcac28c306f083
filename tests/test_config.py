"""Bench configuration: the shipped bench loads; every bad input gets a one-line
ConfigError "<file>: <key>: <what is wrong and what is allowed>".

Bad files are made by editing the text of configs/sim.toml (one exact, unique
substitution each), written to a temporary file and read with load_bench, so
that the file name in the message is checked too.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest

from qkdctl.config import BenchConfig, default_bench_path, load_bench, parse_bench
from qkdctl.errors import ConfigError, QkdctlError

REPO = Path(__file__).resolve().parents[1]
SIM_TEXT = (REPO / "configs" / "sim.toml").read_text(encoding="utf-8")


def variant(tmp_path: Path, *subs: tuple[str, str]) -> Path:
    """configs/sim.toml with each (old, new) applied; each old must occur exactly once."""
    text = SIM_TEXT
    for old, new in subs:
        assert text.count(old) == 1, f"test bug: {old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    p = tmp_path / "bench.toml"
    p.write_text(text, encoding="utf-8")
    return p


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as ei:
        load_bench(path)
    return str(ei.value)


def assert_one_line(msg: str) -> None:
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"


# --------------------------------------------------------------------------- the shipped bench
def test_shipped_sim_bench_loads():
    cfg = load_bench()
    assert isinstance(cfg, BenchConfig)
    assert Path(cfg.path) == default_bench_path()
    assert default_bench_path().read_text(encoding="utf-8") == SIM_TEXT
    assert load_bench(REPO / "configs" / "sim.toml").source == cfg.source
    assert cfg.name == "sim-1GHz-50km" and cfg.protocol == "bb84-decoy"
    assert cfg.source.rep_rate_hz == 1e9 and cfg.period_ps == 1000.0
    assert cfg.source.mean_photon_numbers == (0.5, 0.1, 2e-4)
    assert cfg.source.intensity_probabilities == (0.5, 0.3, 0.2)
    assert cfg.source.sync_period_pulses == 1000
    assert [(d.channel, d.basis, d.bit) for d in cfg.receiver.detectors] == [
        (1, "Z", 0), (2, "Z", 1), (3, "X", 0), (4, "X", 1)]
    assert cfg.analysis.gate_width_ps == 300.0
    assert cfg.sim is not None and len(cfg.sim.detectors) == 4
    assert cfg.sim.channel_transmittance == pytest.approx(0.1)
    assert cfg.sim.bob_transmittance == pytest.approx(10 ** -0.22)
    assert cfg.instruments["laser"].settings == {"current_ma": 45.0, "temperature_c": 25.0}


def test_parse_bench_of_the_parsed_file_is_the_same_bench():
    raw = tomllib.loads(SIM_TEXT)
    path = str(default_bench_path())
    assert parse_bench(copy.deepcopy(raw), path) == load_bench()


def test_config_error_is_a_qkdctl_error():
    assert issubclass(ConfigError, QkdctlError)


# --------------------------------------------------------------------------- bad inputs
MPN = "mean_photon_numbers = [0.5, 0.1, 2.0e-4]"
PROBS = "intensity_probabilities = [0.5, 0.3, 0.2]"
NAMES = 'intensity_names = ["signal", "decoy", "vacuum"]'
SIM_DET0 = "channel = 1\nefficiency = 0.6"      # unique: [[sim.detectors]] #0
SIM_DET2 = "channel = 3\nefficiency = 0.6"      # unique: [[sim.detectors]] #2
RX_DET1 = 'name = "Z1"\nchannel = 2'            # unique: [[receiver.detectors]] #1
RX_DET0_BIT = 'basis = "Z"\nbit = 0\ndelay_ps = 2_500'

BAD = [
    # (id, substitutions, exact key, text the message must contain)
    ("negative intensity", [(MPN, "mean_photon_numbers = [0.5, 0.1, -2.0e-4]")],
     "source.mean_photon_numbers[2]", ">= 0"),
    ("efficiency above 1", [(SIM_DET0, "channel = 1\nefficiency = 1.2")],
     "sim.detectors[0].efficiency", "<= 1"),
    ("misalignment above 1/2", [("misalignment = 0.01", "misalignment = 0.6")],
     "sim.misalignment", "<= 0.5"),
    ("negative dead time", [("channel = 4\nefficiency = 0.6\ndark_count_rate_hz = 30.0\n"
                             "dead_time_ns = 50.0",
                             "channel = 4\nefficiency = 0.6\ndark_count_rate_hz = 30.0\n"
                             "dead_time_ns = -1.0")],
     "sim.detectors[3].dead_time_ns", ">= 0"),
    ("zero gate", [("gate_width_ps = 300.0", "gate_width_ps = 0.0")],
     "analysis.gate_width_ps", "> 0"),
    ("nan", [("misalignment = 0.01", "misalignment = nan")], "sim.misalignment", "finite"),
    ("inf", [("rep_rate_hz = 1.0e9", "rep_rate_hz = inf")], "source.rep_rate_hz", "finite"),
    ("bad choice", [('sequence = "stream"', 'sequence = "random"')],
     "source.sequence", "'stream', 'pattern'"),
    ("bad basis", [(RX_DET0_BIT, RX_DET0_BIT.replace('"Z"', '"Y"'))],
     "receiver.detectors[0].basis", "'Z', 'X'"),
    ("missing key", [("rep_rate_hz = 1.0e9\n", "")], "source.rep_rate_hz", "missing"),
    # unknown keys
    ("unknown top-level table", [("[bench]", "[simulation]\nfiber_length_km = 5.0\n\n[bench]")],
     "simulation", "allowed"),
    ("unknown key in [bench]", [('protocol = "bb84-decoy"',
                                 'protocol = "bb84-decoy"\nversion = "2"')],
     "bench.version", "allowed"),
    ("unknown nested key", [("misalignment = 0.01",
                             "misalignment = 0.01\nfibre_length_km = 50.0")],
     "sim.fibre_length_km", "fiber_length_km"),
    ("unknown key in instrument", [('[instruments.modulator]\ndriver = "mock"',
                                    '[instruments.modulator]\ndriver = "mock"\nport = "COM3"')],
     "instruments.modulator.port", "resource"),
    ("unknown key in receiver.detectors", [(RX_DET1, 'name = "Z1"\ncolour = "red"\nchannel = 2')],
     "receiver.detectors[1].colour", "allowed"),
    ("unknown key in sim.detectors", [(SIM_DET2, SIM_DET2 + "\nafterpulse_prob = 0.1")],
     "sim.detectors[2].afterpulse_prob", "afterpulse_probability"),
    # wrong types
    ("string for a number", [("rep_rate_hz = 1.0e9", 'rep_rate_hz = "1.0e9"')],
     "source.rep_rate_hz", "expected a number"),
    ("string in a list of numbers", [(MPN, 'mean_photon_numbers = [0.5, "0.1", 2.0e-4]')],
     "source.mean_photon_numbers[1]", "expected a number"),
    ("float for an int", [("sync_period_pulses = 1000 ", "sync_period_pulses = 1000.0 ")],
     "source.sync_period_pulses", "expected an integer"),
    ("float for an int in receiver.detectors", [(RX_DET1, 'name = "Z1"\nchannel = 2.0')],
     "receiver.detectors[1].channel", "expected an integer"),
    ("bool for a number", [("fiber_length_km = 50.0", "fiber_length_km = true")],
     "sim.fiber_length_km", "expected a number"),
    ("bool for an int", [("tagger_resolution_ps = 1", "tagger_resolution_ps = true")],
     "sim.tagger_resolution_ps", "expected an integer"),
    ("bool for a bit", [(RX_DET0_BIT, 'basis = "Z"\nbit = true\ndelay_ps = 2_500')],
     "receiver.detectors[0].bit", "expected an integer"),
    ("bool in a list of numbers", [(PROBS, "intensity_probabilities = [0.7, 0.2, true]")],
     "source.intensity_probabilities[2]", "expected a number"),
    ("table for a number", [("misalignment = 0.01", "misalignment = { value = 0.01 }")],
     "sim.misalignment", "expected a number"),
    ("number for a string", [('sequence = "stream"', "sequence = 1")],
     "source.sequence", "expected a string"),
    # cross checks
    ("probabilities not summing to 1", [(PROBS, "intensity_probabilities = [0.7, 0.2, 0.2]")],
     "source.intensity_probabilities", "sum to 1"),
    ("probability list too short", [(PROBS, "intensity_probabilities = [0.8, 0.2]")],
     "source.intensity_probabilities", "source.mean_photon_numbers has 3"),
    ("name list too short", [(NAMES, 'intensity_names = ["signal", "decoy"]')],
     "source.intensity_names", "source.mean_photon_numbers has 3"),
    ("duplicate detector channel", [(RX_DET1, 'name = "Z1"\nchannel = 1')],
     "receiver.detectors[1].channel", "receiver.detectors[0]"),
    ("detector on the sync channel", [("sync_channel = 0", "sync_channel = 3")],
     "receiver.detectors[2].channel", "sync channel"),
    ("gate wider than the period", [("gate_width_ps = 300.0", "gate_width_ps = 1500.0")],
     "analysis.gate_width_ps", "pulse period"),
    ("gate equal to the period", [("gate_width_ps = 300.0", "gate_width_ps = 1000.0")],
     "analysis.gate_width_ps", "pulse period"),
    ("period shorter than the gate", [("rep_rate_hz = 1.0e9", "rep_rate_hz = 5.0e9")],
     "analysis.gate_width_ps", "source.rep_rate_hz"),
    ("sim detector on no receiver channel", [(SIM_DET2, "channel = 7\nefficiency = 0.6")],
     "sim.detectors[2].channel", "[1, 2, 3, 4]"),
    ("intensities not strongest first", [(MPN, "mean_photon_numbers = [0.1, 0.5, 2.0e-4]")],
     "source.mean_photon_numbers", "strongest first"),
]


@pytest.mark.parametrize("subs, key, hint", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_file_and_key(tmp_path, subs, key, hint):
    path = variant(tmp_path, *subs)
    msg = config_error(path)
    assert_one_line(msg)
    assert msg.startswith(f"{path}: {key}: "), f"expected '{path}: {key}: ...', got {msg!r}"
    assert len(msg) > len(f"{path}: {key}: ") + 5, msg
    assert hint in msg, f"{hint!r} not in {msg!r}"


def test_parse_bench_message_names_given_path():
    raw = tomllib.loads(SIM_TEXT)
    raw["sim"]["detectors"][1]["efficiency"] = 1.5
    with pytest.raises(ConfigError) as ei:
        parse_bench(raw, "lab/bench-a.toml")
    msg = str(ei.value)
    assert_one_line(msg)
    assert msg.startswith("lab/bench-a.toml: sim.detectors[1].efficiency: "), msg


@pytest.mark.parametrize("edit, key, hint", [
    (lambda raw: raw["receiver"].__setitem__("detectors", {"name": "Z0"}),
     "receiver.detectors", "expected an array"),
    (lambda raw: raw["receiver"]["detectors"].__setitem__(0, 5),
     "receiver.detectors[0]", "expected a table"),
    (lambda raw: raw.__setitem__("source", 5), "source", "expected a table"),
    (lambda raw: raw["instruments"].__setitem__("laser", "mock"),
     "instruments.laser", "expected a table"),
], ids=["table for an array", "number for a table in an array", "number for a table",
        "string for an instrument table"])
def test_wrong_structure(edit, key, hint):
    raw = tomllib.loads(SIM_TEXT)
    edit(raw)
    with pytest.raises(ConfigError) as ei:
        parse_bench(raw, "bench.toml")
    msg = str(ei.value)
    assert_one_line(msg)
    assert msg.startswith(f"bench.toml: {key}: "), msg
    assert hint in msg, f"{hint!r} not in {msg!r}"


def test_missing_file(tmp_path):
    path = tmp_path / "no-such-bench.toml"
    msg = config_error(path)
    assert_one_line(msg)
    assert msg.startswith(f"{path}: "), msg


def test_directory_instead_of_file(tmp_path):
    msg = config_error(tmp_path)
    assert_one_line(msg)
    assert msg.startswith(f"{tmp_path}: "), msg


@pytest.mark.parametrize("old, new", [
    ("rep_rate_hz = 1.0e9", "rep_rate_hz = = 1.0e9"),
    ('name = "sim-1GHz-50km"', 'name = "sim-1GHz-50km'),
    ("[source]", "[source"),
])
def test_invalid_toml_syntax(tmp_path, old, new):
    line = next(i for i, text in enumerate(SIM_TEXT.splitlines(), 1) if text.startswith(old))
    path = variant(tmp_path, (old, new))
    msg = config_error(path)
    assert_one_line(msg)
    assert msg.startswith(f"{path}: "), msg
    assert f"line {line}" in msg, f"no line number in {msg!r}"


def test_binary_file(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe\x00\x00")
    msg = config_error(path)
    assert_one_line(msg)
    assert msg.startswith(f"{path}: "), msg


def test_unknown_key_with_newline_is_one_line(tmp_path):
    path = variant(tmp_path, ("misalignment = 0.01", 'misalignment = 0.01\n"fiber\\nlength" = 5'))
    msg = config_error(path)
    assert_one_line(msg)
    assert msg.startswith(f"{path}: sim."), msg
