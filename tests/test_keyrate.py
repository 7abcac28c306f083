"""Key rate versus distance (qkdctl.keyrate) and the ``keyrate`` subcommand.

Checks: the shipped keyrate files and a bench file load into the expected
models; the expected counts equal an independent computation of the model;
optimised curves are smooth, monotone and below the PLOB bound, zero only past
the maximal distance; figures of the papers: Lim et al. 2014 (the n_X = 10^9 /
10^7 rate ratio of about 1.75 at 100 km, keys at 10^4 up to about 135 km),
Rusca et al. 2018 (one decoy beats two decoys for blocks below 10^8), Ma et al.
2005 (about 140 km for GYS); bad files give one-line ConfigErrors naming the
file and key; the subcommand prints a table, JSON rows and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from qkdctl.config import load_bench
from qkdctl.errors import ConfigError, QkdctlError
from qkdctl.keyrate import (
    KeyRateModel,
    cmd_keyrate,
    default_keyrate_path,
    evaluate,
    expected_statistics,
    keyrate_table,
    leak_ec_bits,
    load_keyrate_model,
    max_distance_km,
    optimise_point,
    register,
)

REPO = Path(__file__).resolve().parents[1]
LIM = REPO / "configs" / "keyrate-lim2014.toml"
RUSCA = REPO / "configs" / "keyrate-rusca2018.toml"
SIM = REPO / "configs" / "sim.toml"

GYS = """
[keyrate]
name = "ma2005-gys"
model = "asymptotic"
optimise = true
[channel]
fiber_attenuation_db_per_km = 0.21
[receiver]
efficiency = 0.045
dark_count_probability = 8.5e-7   # Y0 = 1.7e-6 = 2 p_dc
misalignment = 0.033
[source]
mean_photon_numbers = [0.48, 0.1, 0.0]
intensity_probabilities = [0.8, 0.1, 0.1]
[postprocessing]
error_correction_efficiency = 1.22
"""


def write(tmp_path: Path, text: str, name: str = "keyrate.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def variant(tmp_path: Path, base: Path, old: str, new: str) -> Path:
    text = base.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"test bug: {old!r} occurs {text.count(old)} times"
    return write(tmp_path, text.replace(old, new))


# --------------------------------------------------------------------------- files
def test_shipped_keyrate_files_load():
    assert default_keyrate_path().read_text() == LIM.read_text()
    lim = load_keyrate_model()
    assert lim.model == "lim2014" and lim.optimise
    assert (lim.eta_bob, lim.dark_count_probability, lim.afterpulse_probability,
            lim.misalignment) == (0.10, 6e-7, 4e-2, 5e-3)
    assert lim.mean_photon_numbers[2] == 2e-4
    assert (lim.error_correction_efficiency, lim.eps_cor, lim.eps_sec_per_key_bit) == (
        1.16, 1e-15, 1e-15)
    assert lim.block_sizes == tuple(10.0**s for s in range(4, 10))
    assert lim.distances_km[0] == 0 and lim.distances_km[-1] == 200
    rusca = load_keyrate_model(RUSCA)
    assert rusca.model == "rusca2018"
    assert (rusca.eta_bob, 2 * rusca.dark_count_probability, rusca.misalignment) == (
        0.5, 1e-8, 0.01)
    assert (rusca.rep_rate_hz, rusca.dead_time_ns, rusca.eps_sec, rusca.eps_cor) == (
        1e9, 100.0, 1e-9, 1e-15)


def test_bench_file_gives_its_model():
    cfg = load_bench(SIM)
    m = load_keyrate_model(SIM)
    dets = cfg.sim.detectors
    assert m.model == "lim2014" and not m.optimise and m.name == cfg.name
    assert m.eta_bob == pytest.approx(np.mean([d.efficiency for d in dets])
                                      * 10 ** (-cfg.sim.bob_insertion_loss_db / 10))
    assert m.dark_count_probability == pytest.approx(
        np.mean([d.dark_count_rate_hz for d in dets]) * cfg.analysis.gate_width_ps * 1e-12)
    assert (m.basis_choice, m.dead_time_scope) == ("passive", "detector")
    assert m.dead_time_ns == pytest.approx(np.mean([d.dead_time_ns for d in dets]))
    assert m.mean_photon_numbers == cfg.source.mean_photon_numbers
    assert m.intensity_probabilities == cfg.source.intensity_probabilities
    assert (m.z_basis_probability, m.bob_z) == (cfg.source.z_basis_probability,
                                                cfg.receiver.z_basis_probability)
    assert m.misalignment == cfg.sim.misalignment and m.rep_rate_hz == cfg.source.rep_rate_hz
    rx = m.receiver
    assert [(d.basis, d.bit) for d in rx.detectors] == [
        (0 if d.basis == "Z" else 1, d.bit) for d in cfg.receiver.detectors]
    assert rx.transmittance == pytest.approx(10 ** (-cfg.sim.bob_insertion_loss_db / 10))
    assert [d.dead_time_ps for d in rx.detectors] == [50_000] * 4
    assert (rx.gate_width_ps, rx.multi_click) == (cfg.analysis.gate_width_ps,
                                                  cfg.analysis.multi_click)
    p = evaluate(m, 50.0)
    assert p.secret_bits_per_pulse > 0 and not p.result.aborted
    # misalignment, plus the multi-clicks (a random bit) and dark counts
    assert cfg.sim.misalignment < p.qber_key < 1.1 * cfg.sim.misalignment


def test_bench_without_sim_table(tmp_path):
    text = SIM.read_text(encoding="utf-8")
    path = write(tmp_path, text[:text.index("[sim]")], "bench.toml")
    with pytest.raises(ConfigError, match=r"bench\.toml: sim: missing"):
        load_keyrate_model(path)


@pytest.mark.parametrize("old, new, text", [
    ("efficiency = 0.10", "efficency = 0.10", "receiver.efficency: unknown key"),
    ('model = "lim2014"', 'model = "lim"', "keyrate.model: 'lim' is not allowed"),
    ("misalignment = 5.0e-3", "misalignment = 0.7", "receiver.misalignment: 0.7 is out of range"),
    ("mean_photon_numbers = [0.5, 0.1, 2.0e-4]", "mean_photon_numbers = [0.2, 0.1999, 2.0e-4]",
     "source.mean_photon_numbers: [0.2, 0.1999, 0.0002]: Lim et al. 2014 need mu1 > mu2 + mu3"),
    ("intensity_probabilities = [0.7, 0.2, 0.1]", "intensity_probabilities = [0.7, 0.2, 0.2]",
     "source.intensity_probabilities: [0.7, 0.2, 0.2] sums to 1.1"),
    ("block_sizes = [1.0e4, 1.0e5, 1.0e6, 1.0e7, 1.0e8, 1.0e9]", "",
     "postprocessing.block_sizes: missing"),
    ("eps_cor = 1.0e-15", "eps_cor = 1.0e-15\neps_sec = 1e-9",
     "postprocessing.eps_sec_per_key_bit: give eps_sec or eps_sec_per_key_bit, not both"),
    ("[distances]", "[distance]", "distance: unknown table"),
])
def test_bad_keyrate_file(tmp_path, old, new, text):
    path = variant(tmp_path, LIM, old, new)
    with pytest.raises(ConfigError) as ei:
        load_keyrate_model(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: ") and text in msg and "\n" not in msg


def test_files_that_are_neither(tmp_path):
    with pytest.raises(ConfigError, match="neither a keyrate file"):
        load_keyrate_model(write(tmp_path, "[foo]\nx = 1\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_keyrate_model(write(tmp_path, "[keyrate\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_keyrate_model(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="postprocessing.block_sizes: not used by the "
                                          "asymptotic model"):
        load_keyrate_model(write(tmp_path, GYS + "block_sizes = [1e6]\n"))


# --------------------------------------------------------------------------- counts
def test_expected_statistics_match_the_published_model():
    """Lim et al. Sec. IV: n_{X,k} = N p_k q^2 R_k, m_{X,k} = N p_k q^2 e_k, Z with (1-q)^2."""
    m = load_keyrate_model()
    params = {"mu1": 0.4, "mu2": 0.15, "p_mu1": 0.5, "p_mu2": 0.3, "p_z": 0.8}
    n, dist = 1e11, 75.0
    s = expected_statistics(m, dist, n, params)
    mus, ps = np.array([0.4, 0.15, 2e-4]), np.array([0.5, 0.3, 0.2])
    eta = 0.1 * 10 ** (-0.2 * dist / 10)
    d = 1 - (1 - 2 * 6e-7) * np.exp(-eta * mus)
    e = 6e-7 + 5e-3 * (1 - np.exp(-eta * mus)) + 4e-2 * d / 2
    np.testing.assert_allclose(s.n_key, n * ps * 0.64 * d * 1.04, rtol=1e-12)
    np.testing.assert_allclose(s.m_key, n * ps * 0.64 * e, rtol=1e-12)
    np.testing.assert_allclose(s.n_test, n * ps * 0.04 * d * 1.04, rtol=1e-12)
    np.testing.assert_allclose(s.m_test, n * ps * 0.04 * e, rtol=1e-12)
    assert leak_ec_bits(m, s) == pytest.approx(
        1.16 * s.n_key_total * float(-(lambda x: x * np.log2(x) + (1 - x) * np.log2(1 - x))(
            s.qber_key)))
    r = expected_statistics(m, dist, n, params, rounded=True)
    assert all(float(x).is_integer() for x in r.n_key + r.m_test)


def _bench_counts_by_enumeration(cfg, n, dist, live):
    """Sifted counts and errors of the bench, computed afresh: per state and click
    pattern, with each detector's click probability scaled by ``live``."""
    src, rx, sim = cfg.source, cfg.receiver, cfg.sim
    by_ch = {d.channel: d for d in sim.detectors}
    dets = [(d.basis, d.bit, by_ch[d.channel]) for d in rx.detectors]
    t = 10 ** (-sim.fiber_attenuation_db_per_km * dist / 10) * sim.bob_transmittance
    e = sim.misalignment
    gate = cfg.analysis.gate_width_ps
    out = {b: (np.zeros(3), np.zeros(3)) for b in "ZX"}
    for k, (mu, pk) in enumerate(zip(src.mean_photon_numbers, src.intensity_probabilities,
                                     strict=True)):
        for a, x in product("ZX", (0, 1)):
            pa = src.z_basis_probability if a == "Z" else 1 - src.z_basis_probability
            clicks = []
            for j, (b, y, s) in enumerate(dets):
                share = rx.z_basis_probability if b == "Z" else 1 - rx.z_basis_probability
                route = (1 - e if y == x else e) if b == a else 0.5
                photon = 1 - np.exp(-mu * t * share * route * s.efficiency)
                # detector and sync jitter, the tagger's bins (two roundings)
                sigma = np.sqrt(s.jitter_ps**2 + sim.sync_jitter_ps**2
                                + sim.tagger_resolution_ps**2 / 6)
                accept = norm.cdf(gate / 2 / sigma) - norm.cdf(-gate / 2 / sigma)
                dark = 1 - np.exp(-s.dark_count_rate_hz * gate * 1e-12)  # Poisson
                clicks.append(live[j] * (1 - (1 - dark) * (1 - accept * photon)))
            for pattern in product((0, 1), repeat=len(dets)):
                prob = np.prod([c if on else 1 - c for c, on in zip(clicks, pattern,
                                                                     strict=True)])
                on = [d for d, hit in zip(dets, pattern, strict=True) if hit]
                if not on:
                    continue
                bases = {d[0] for d in on}
                bits = {d[1] for d in on}
                if len(bases) == 2:  # random basis, random bit
                    results = [(bb, yy, 0.25) for bb in "ZX" for yy in (0, 1)]
                elif len(bits) == 2:  # random bit
                    results = [(on[0][0], yy, 0.5) for yy in (0, 1)]
                else:
                    results = [(on[0][0], on[0][1], 1.0)]
                for bb, yy, w in results:
                    if bb == a:
                        out[a][0][k] += n * pk * pa * 0.5 * prob * w
                        out[a][1][k] += n * pk * pa * 0.5 * prob * w * (yy != x)
    return out


def test_expected_statistics_of_the_bench():
    """Passive receiver: the 16 click patterns per state, squashed, with dead time."""
    cfg = load_bench(SIM)
    m = load_keyrate_model(SIM)
    n, dist = 1e9, 50.0
    rx = m.receiver
    # without dead time the counts are the plain enumeration
    no_dead = replace(m, receiver=replace(rx, detectors=tuple(
        replace(d, dead_time_ps=0) for d in rx.detectors)))
    s = expected_statistics(no_dead, dist, n)
    ref = _bench_counts_by_enumeration(cfg, n, dist, [1.0] * 4)
    for got, want in ((s.n_key, ref["Z"][0]), (s.m_key, ref["Z"][1]), (s.n_test, ref["X"][0]),
                      (s.m_test, ref["X"][1])):
        np.testing.assert_allclose(got, want, rtol=1e-8)
    # dead time: a click registers unless the detector clicked within the last D - 1
    # pulses (D = 50); at the 50th pulse, when the jitter of the two clicks (and the
    # tagger's whole picoseconds) put it at least the dead time after the first.
    # Dark counts (1.5e-6 of the load) are left out here, hence rtol 1e-5.
    period = cfg.source.period_ps * (1 + cfg.sim.clock_drift_ppm * 1e-6)
    sig = np.sqrt(2) * 30.0
    v = (np.arange(2000) + 0.5) / 2000  # the tagger's rounding, uniform in [0, 1) ps
    open_50 = float(np.mean(norm.sf((50_000 - 50 * period - v) / sig)))
    assert 0.49 < open_50 < 0.52
    s = expected_statistics(m, dist, n)
    ts = no_dead.channel_transmittance(dist) * rx.transmittance
    mus = np.array(cfg.source.mean_photon_numbers)
    ps = np.array(cfg.source.intensity_probabilities)
    pa, pb = cfg.source.z_basis_probability, cfg.receiver.z_basis_probability
    e = cfg.sim.misalignment
    live = []
    for d in rx.detectors:
        share = pb if d.basis == 0 else 1 - pb
        load = 0.0
        for a, x in ((0, 0), (0, 1), (1, 0), (1, 1)):
            route = (1 - e if d.bit == x else e) if d.basis == a else 0.5
            w = (pa if a == 0 else 1 - pa) * 0.5
            load += w * np.sum(ps * (1 - np.exp(-mus * ts * share * route * d.efficiency)))
        live.append(1 / (1 + load * (49 + 1 - open_50)))
    assert 0.8 < min(live) and max(live) < 0.96  # Z and X detectors
    ref = _bench_counts_by_enumeration(cfg, n, dist, live)
    for got, want in ((s.n_key, ref["Z"][0]), (s.m_key, ref["Z"][1]), (s.n_test, ref["X"][0]),
                      (s.m_test, ref["X"][1])):
        np.testing.assert_allclose(got, want, rtol=1e-5)


# --------------------------------------------------------------------------- the optimised curve
def test_optimised_curve_is_smooth_and_below_plob():
    m = load_keyrate_model()
    rows = keyrate_table(m, list(range(0, 201, 20)), block_size=1e6)
    rates = [r["secret_bits_per_pulse"] for r in rows]
    positive = [r for r in rates if r > 0]
    assert len(positive) >= 8 and rates[: len(positive)] == positive  # zero only at the end
    assert all(a > b for a, b in zip(positive, positive[1:], strict=False))
    # smooth: on a log scale the slope starts at the fiber's -0.02 decades/km and bends
    # down gradually towards the maximal distance (no jumps between optimiser runs)
    slopes = np.diff(np.log10(positive)) / 20
    assert slopes[0] == pytest.approx(-0.02, abs=0.002)
    assert np.all(np.diff(slopes) < 5e-4)
    assert np.all(np.abs(np.diff(slopes[:-1])) < 0.005)
    for r in rows:
        assert r["block_size"] == 1e6
        if r["plob_bits_per_pulse"] is not None:
            assert r["secret_bits_per_pulse"] < r["plob_bits_per_pulse"]
        if r["secret_bits_per_pulse"] > 0:
            assert 0 < r["p_z"] < 1 and r["mu1"] > r["mu2"] + r["mu3"]
            assert r["p_mu1"] + r["p_mu2"] + r["p_mu3"] == pytest.approx(1)
            assert r["phase_error_bound"] < 0.11 and r["pulses"] > 1e6
        else:
            assert r["mu1"] is None
    assert rows[0]["plob_bits_per_pulse"] is None  # infinite at 0 km


def test_lim2014_figure1_rate_ratio_at_100_km():
    """Lim et al.: at 100 km the rate with n_X = 10^9 is about 1.75 times that with 10^7."""
    m = load_keyrate_model()
    r9 = optimise_point(m, 100.0, block_size=1e9).secret_bits_per_pulse
    r7 = optimise_point(m, 100.0, block_size=1e7).secret_bits_per_pulse
    assert 1.6 < r9 / r7 < 1.95  # 1.79 here


def test_lim2014_small_blocks_reach_about_135_km():
    """Lim et al.: with n_X = 10^4 keys are still distributed over 135 km (here ~128 km)."""
    m = load_keyrate_model()
    near = optimise_point(m, 120.0, block_size=1e4)
    assert near.secret_bits_per_pulse > 0 and near.result.secret_bits > 0
    far = optimise_point(m, 140.0, block_size=1e4, start=near.parameters, starts=4)
    assert far.secret_bits_per_pulse == 0


def test_finite_rate_grows_with_the_block_towards_the_asymptote():
    m = replace(load_keyrate_model(), eps_sec_per_key_bit=None, eps_sec=1e-10)
    params = {"mu1": 0.45, "mu2": 0.12, "p_mu1": 0.7, "p_mu2": 0.2, "p_z": 0.9}
    rates = [evaluate(m, 50.0, params, block_size=b).secret_bits_per_pulse
             for b in (1e7, 1e9, 1e11, 1e14)]
    assert all(a < b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[2] > 0.9 * rates[3]


def test_rusca2018_one_decoy_beats_two_decoys_for_practical_blocks():
    """Rusca et al.: below 10^8 bits the 1-decoy protocol gives the higher key rate."""
    one = load_keyrate_model(RUSCA)
    two = replace(one, model="lim2014", mean_photon_numbers=(0.5, 0.1, 2e-4),
                  intensity_probabilities=(0.7, 0.2, 0.1))
    for dist in (50.0, 100.0):  # 10 and 20 dB
        r1 = optimise_point(one, dist, block_size=1e6)
        r2 = optimise_point(two, dist, block_size=1e6)
        assert r1.secret_bits_per_pulse > 1.02 * r2.secret_bits_per_pulse > 0
    assert r1.parameters["mu1"] > r1.parameters["mu2"] > 0


def test_asymptotic_gys_reaches_about_140_km(tmp_path):
    m = load_keyrate_model(write(tmp_path, GYS))
    assert m.model == "asymptotic"
    d = max_distance_km(m, resolution_km=0.5)
    assert 137.0 < d < 142.0  # Ma et al. 2005: about 140 km (vacuum + weak decoy, nu = 0.1)
    rows = keyrate_table(m, [0.0, 100.0, 150.0])
    assert rows[0]["secret_bits_per_pulse"] > rows[1]["secret_bits_per_pulse"] > 0
    assert rows[2]["secret_bits_per_pulse"] == 0 and rows[1]["nu"] == 0.1
    assert rows[1]["block_size"] is None
    with pytest.raises(QkdctlError, match="no block size"):
        keyrate_table(m, [10.0], block_size=1e6)


# --------------------------------------------------------------------------- command line
def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qkdctl")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_prints_a_table(capsys):
    args = cli(["keyrate", "--config", str(RUSCA), "--distances", "0:100:50",
                "--block-size", "1e6"])
    assert args.func is cmd_keyrate
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert "rusca2018" in out[0] and "optimised" in out[0]
    assert out[1].split()[:4] == ["km", "block", "bits/pulse", "bits/s"]
    assert [line.split()[0] for line in out[2:]] == ["0.0", "50.0", "100.0"]
    assert out[2].split()[4] == "inf"


def test_cli_json_rows(capsys):
    args = cli(["keyrate", "--config", str(SIM), "--distances", "25,50", "--json"])
    assert cmd_keyrate(args) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["model"] == "lim2014" and obj["optimised"] is False
    rows = obj["rows"]
    assert [r["distance_km"] for r in rows] == [25.0, 50.0]
    for r in rows:
        for key in ("distance_km", "secret_bits_per_pulse", "secret_bits_per_s",
                    "plob_bits_per_pulse", "mu1", "mu2", "mu3", "p_mu1", "p_mu2", "p_mu3",
                    "p_z"):
            assert key in r
        assert r["secret_bits_per_pulse"] > 0
        assert r["mu1"] == load_bench(SIM).source.mean_photon_numbers[0]
        assert r["secret_bits_per_s"] == pytest.approx(1e9 * r["secret_bits_per_pulse"])


def test_cli_bad_arguments(capsys):
    for argv in (["keyrate", "--distances", "0:10"], ["keyrate", "--distances", "10:0:5"],
                 ["keyrate", "--block-size", "0"]):
        with pytest.raises(SystemExit) as ei:
            cli(argv)
        assert ei.value.code == 2
    assert "START:STOP:STEP" in capsys.readouterr().err


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "rate.png"
    args = cli(["keyrate", "--config", str(RUSCA), "--distances", "0:100:50",
                "--block-size", "1e6", "--plot", str(png)])
    assert cmd_keyrate(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {png}" in capsys.readouterr().out


def test_cli_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    args = cli(["keyrate", "--config", str(SIM), "--distances", "50",
                "--plot", str(tmp_path / "x.png")])
    with pytest.raises(QkdctlError, match="--plot needs matplotlib"):
        cmd_keyrate(args)


def test_model_is_a_frozen_dataclass():
    m = load_keyrate_model()
    assert isinstance(m, KeyRateModel)
    with pytest.raises(AttributeError):
        m.eta_bob = 0.2  # type: ignore[misc]
