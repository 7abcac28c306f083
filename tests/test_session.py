"""run_session on the built-in simulated bench, its safe state, and the sifting protocol.

Bench-time durations are kept short (0.02 - 0.1 s: 2e7 - 1e8 pulses, about 2e5 - 1e6
detections) so that the whole file runs in a few seconds once the numba kernels are
cached.

Physics expectations are computed here from the bench file alone (fiber and insertion
loss, detector efficiency, dark counts, dead time, misalignment), not from the
simulator's own tables, so that they check the simulator and the sifting core.
"""

from __future__ import annotations

import math
import os
import signal
from contextlib import ExitStack

import numpy as np
import pytest

from qkdctl.config import load_bench
from qkdctl.errors import InstrumentError, QkdctlError
from qkdctl.protocol import (
    AliceRole,
    BobRole,
    ChannelError,
    DetectionAnnouncement,
    LocalChannel,
    SiftingReply,
)
from qkdctl.sequence import AliceSequence, decode
from qkdctl.session import ARM_ORDER, build_bench, run_session
from qkdctl.sifting import SiftParams

SEED = 20240917
BASES = ("Z", "X")


@pytest.fixture(scope="module")
def cfg():
    return load_bench()


@pytest.fixture(scope="module")
def summary(cfg):
    """One 0.2 s run of the built-in bench (2e8 pulses, about 2e6 detections)."""
    return run_session(cfg, sifted_digest=True, duration_s=0.2, seed=SEED)


def without_wall(s):
    """The summary without what depends on the wall clock: timings, new key IDs."""
    if isinstance(s, dict):
        return {k: without_wall(v) for k, v in s.items()
                if k not in ("wall_s", "seconds", "key_ids")}
    if isinstance(s, list):
        return [without_wall(v) for v in s]
    return s


# ----------------------------------------------------------------- independent physics


def detector_model(cfg):
    """Per-detector click probabilities per Alice state, from the bench file alone.

    Returns (states, p, alive, dark):
    - states: list of (probability, intensity class, basis, bit) of Alice's states;
    - p[s, j]: probability that a photon of state s makes detector j click
      (Poisson photon number; detector j gets mu * T * p_basis * route * eta);
    - alive[j]: fraction of pulses at which detector j is not dead. Non-paralysable
      dead time: a registered click is followed by tau * f - 1/2 lost pulses on
      average (pulses 1 .. tau*f - 1 always, pulse tau*f half of the time, as its
      jitter is as likely earlier as later than the click's), so with a mean click
      probability pbar per pulse the alive fraction is 1 / (1 + (tau f - 1/2) pbar);
    - dark[j]: probability of a dark count in detector j's gate, per pulse.
    """
    src, sim, rx = cfg.source, cfg.sim, cfg.receiver
    t_total = (10 ** (-sim.fiber_length_km * sim.fiber_attenuation_db_per_km / 10)
               * 10 ** (-sim.bob_insertion_loss_db / 10))
    e = sim.misalignment
    by_ch = {d.channel: d for d in sim.detectors}
    dets = [(d.basis, d.bit, by_ch[d.channel]) for d in rx.detectors]
    states, rows = [], []
    for k, (mu, pk) in enumerate(zip(src.mean_photon_numbers, src.intensity_probabilities,
                                     strict=True)):
        for a in BASES:
            pa = src.z_basis_probability if a == "Z" else 1 - src.z_basis_probability
            for x in (0, 1):
                row = []
                for basis, bit, s in dets:
                    p_basis = rx.z_basis_probability if basis == "Z" else \
                        1 - rx.z_basis_probability
                    route = ((1 - e) if bit == x else e) if basis == a else 0.5
                    row.append(-math.expm1(-mu * t_total * p_basis * route * s.efficiency))
                states.append((pk * pa * 0.5, k, a, x))
                rows.append(row)
    p = np.array(rows)
    w = np.array([s[0] for s in states])
    f = src.rep_rate_hz
    dark_pp = np.array([s.dark_count_rate_hz / f for _, _, s in dets])
    pbar = w @ p + dark_pp
    lost = np.array([s.dead_time_ns * 1e-9 * f - 0.5 for _, _, s in dets])
    alive = 1.0 / (1.0 + lost * pbar)
    dark_gate = np.array([s.dark_count_rate_hz * cfg.analysis.gate_width_ps * 1e-12
                          for _, _, s in dets])
    return states, p, alive, dark_gate


def expected_gains(cfg, dead_time=True):
    """Probability per pulse of class k that at least one (alive) detector clicks."""
    states, p, alive, dark = detector_model(cfg)
    a = alive if dead_time else np.ones_like(alive)
    n = len(cfg.source.mean_photon_numbers)
    gain = np.zeros(n)
    for (w, k, _, _), row in zip(states, p, strict=True):
        q = 1.0 - (row + dark - row * dark)          # no click from photons nor dark counts
        gain[k] += w * (1.0 - np.prod(1.0 - a * (1.0 - q)))
    return gain / np.array(cfg.source.intensity_probabilities)


# ------------------------------------------------------------------- consistency checks


def check_consistent(s, cfg, duration_s):
    """Every relation that must hold between the numbers of one summary."""
    rep = cfg.source.rep_rate_hz
    assert s["duration_s"] == pytest.approx(duration_s, rel=1e-12)
    assert s["pulses_sent"] == round(duration_s * rep)
    # one sync tag per sync_period_pulses pulses, from pulse 0
    assert s["sync_tags"] == math.ceil(s["pulses_sent"] / cfg.source.sync_period_pulses)
    assert s["sync_problems"] == {"rejected": 0, "gaps": 0, "missed": 0}

    by_int = s["counts_by_intensity"]
    assert list(by_int) == list(cfg.source.intensity_names)
    assert sum(d["detections"] for d in by_int.values()) == s["detected_pulses"], \
        "detections summed over intensity classes != detected_pulses"
    assert sum(d["pulses_sent"] for d in by_int.values()) == pytest.approx(s["pulses_sent"],
                                                                          rel=1e-9)
    for b in BASES:
        assert sum(d["sifted"][b] for d in by_int.values()) == s["sifted_bits_by_basis"][b]
        assert sum(d["errors"][b] for d in by_int.values()) == s["errors"][b]
        n, err = s["sifted_bits_by_basis"][b], s["errors"][b]
        assert 0 < n and 0 <= err <= n
        e = err / n
        assert s["qber"][b] == pytest.approx(e, rel=1e-12)
        assert s["qber_std"][b] == pytest.approx(math.sqrt(e * (1 - e) / n), rel=1e-12)
    assert s["sifted_bits"] == s["sifted_bits_by_basis"]["Z"]
    sifted_total = s["sifted_bits_by_basis"]["Z"] + s["sifted_bits_by_basis"]["X"]
    assert sifted_total <= s["detected_pulses"]
    for name, d in by_int.items():
        assert d["gain"] == pytest.approx(d["detections"] / d["pulses_sent"], rel=1e-12), name
        assert d["sifted"]["Z"] + d["sifted"]["X"] <= d["detections"], name
        for b in BASES:
            n = d["sifted"][b]
            assert d["qber"][b] == (pytest.approx(d["errors"][b] / n, rel=1e-12) if n
                                    else None), (name, b)

    names = [d.name for d in cfg.receiver.detectors]
    tags, in_gate = s["detections_by_channel"], s["detections_in_gate_by_channel"]
    assert list(tags) == names and list(in_gate) == names
    for n in names:
        assert 0 < in_gate[n] <= tags[n]
        assert s["count_rate_hz_by_channel"][n] == pytest.approx(tags[n] / duration_s,
                                                                 rel=1e-12)
    # every detector tag is in a gate, out of all gates, or before the first sync
    assert sum(tags.values()) == (sum(in_gate.values()) + s["out_of_gate"]
                                  + s["before_first_sync"])
    # a pulse with m in-gate clicks is one detected pulse and, for m > 1, one multi-click
    mc = s["multi_clicks"]
    multi = mc["same_basis"] + mc["cross_basis"]
    assert s["detected_pulses"] + multi <= sum(in_gate.values()) \
        <= s["detected_pulses"] + 3 * multi
    assert mc["discarded"] == 0   # multi_click = "random" in the built-in bench
    assert s["detection_rate_hz"] == pytest.approx(s["detected_pulses"] / duration_s,
                                                   rel=1e-12)
    assert s["sifted_key_rate_bps"] == pytest.approx(s["sifted_bits"] / duration_s,
                                                     rel=1e-12)
    # the tracked period: the bench's 2 ppm clock drift, to better than 1 ppm
    assert s["period_ps"] == pytest.approx(cfg.period_ps * (1 + cfg.sim.clock_drift_ppm * 1e-6),
                                           abs=1e-6 * cfg.period_ps)
    assert abs(s["clock_drift_ppm"] - cfg.sim.clock_drift_ppm) < 1.0
    if "sifted_key_sha256" in s:  # only when asked for: it discloses 256 bits
        assert len(s["sifted_key_sha256"]) == 64
        int(s["sifted_key_sha256"], 16)


def test_summary_numbers_are_consistent(summary, cfg):
    assert summary["interrupted"] is False
    assert summary["seed"] == SEED
    assert summary["source"] == "simulated bench"
    assert summary["bench"] == cfg.name
    check_consistent(summary, cfg, 0.2)


def test_qber_within_bounds_of_misalignment(summary, cfg):
    """QBER Z of the signal class and of the whole key, and QBER X, against bounds.

    Expected: single clicks err with the misalignment e = 0.01, to first order in the
    mean photon number m reaching the detectors of the basis (a wrong click that
    coincides with a right one becomes a double click), so E[QBER] >= e (1 - m).
    Double clicks (same basis, or cross basis squashed into this basis) get a random
    bit, so they add at most half of all multi-click pulses to the errors, and dark
    counts at most all of their expected number: E[QBER] <= e + (multi / 2 + darks) / n.
    Both bounds get 5 binomial sigmas. The X bound is loose (X gets few bits, and
    cross-basis double clicks are a large share of them): it only catches gross errors.
    """
    e = cfg.sim.misalignment
    _, _, _, dark = detector_model(cfg)
    darks = dark.sum() * summary["pulses_sent"]
    mc = summary["multi_clicks"]
    multi = mc["same_basis"] + mc["cross_basis"]
    sim = cfg.sim
    t_total = 10 ** (-(sim.fiber_length_km * sim.fiber_attenuation_db_per_km
                       + sim.bob_insertion_loss_db) / 10)
    eta = max(d.efficiency for d in sim.detectors)
    mu = max(cfg.source.mean_photon_numbers)
    pz = cfg.receiver.z_basis_probability
    sig = summary["counts_by_intensity"]["signal"]
    cases = [
        ("signal Z", sig["errors"]["Z"], sig["sifted"]["Z"], mu * t_total * eta * pz),
        ("all Z", summary["errors"]["Z"], summary["sifted_bits_by_basis"]["Z"],
         mu * t_total * eta * pz),
        ("all X", summary["errors"]["X"], summary["sifted_bits_by_basis"]["X"],
         mu * t_total * eta * (1 - pz)),
    ]
    for label, err, n, m in cases:
        q = err / n
        lo = e * (1 - m)
        hi = e + (multi / 2 + darks) / n
        s_lo, s_hi = math.sqrt(lo * (1 - lo) / n), math.sqrt(hi * (1 - hi) / n)
        assert lo - 5 * s_lo <= q <= hi + 5 * s_hi, (
            f"QBER {label} = {q:.5f} ({err} errors in {n}) outside the expected "
            f"[{lo:.5f}, {hi:.5f}] +- 5 sigma (misalignment {e}, {multi} multi-clicks)")
    # and the key QBER is close to the misalignment, not just inside a loose band
    assert abs(summary["qber"]["Z"] - e) < 0.15 * e


def test_gains_match_poisson_model_with_dead_time(summary, cfg):
    """Gain of each intensity class vs 1 - exp(-eta mu) reduced by dead time.

    The model (detector_model) treats the detectors' dead periods as independent of each
    other and of the present pulse; over 1 s of bench time it agrees with the simulator
    to 5e-4 relative. Allowed: 5 Poisson sigmas of the class's detections plus 0.3 %
    of the model value for that approximation.
    """
    model = expected_gains(cfg)
    no_dead = expected_gains(cfg, dead_time=False)
    by_int = summary["counts_by_intensity"]
    gains = [by_int[n]["gain"] for n in cfg.source.intensity_names]
    assert gains[0] > gains[1] > gains[2] > 0, f"gains not ordered signal > decoy > vacuum: {gains}"
    for k, name in enumerate(cfg.source.intensity_names):
        d = by_int[name]
        sigma = math.sqrt(d["detections"]) / d["pulses_sent"]
        tol = 5 * sigma + 0.003 * model[k]
        assert abs(d["gain"] - model[k]) <= tol, (
            f"{name}: gain {d['gain']:.6g} vs model {model[k]:.6g} (without dead time "
            f"{no_dead[k]:.6g}); allowed +- {tol:.3g} (5 sigma + 0.3 %)")
    # dead time matters at these rates: the signal gain is clearly below 1 - exp(-eta mu)
    sig = by_int["signal"]
    assert sig["gain"] < no_dead[0] - 20 * math.sqrt(sig["detections"]) / sig["pulses_sent"]


def test_same_seed_same_summary(cfg):
    a = run_session(cfg, sifted_digest=True, duration_s=0.03, seed=11)
    b = run_session(cfg, sifted_digest=True, duration_s=0.03, seed=11)
    assert without_wall(a) == without_wall(b)
    c = run_session(cfg, sifted_digest=True, duration_s=0.03, seed=12)
    assert c["sifted_key_sha256"] != a["sifted_key_sha256"]
    assert c["detected_pulses"] != a["detected_pulses"]
    check_consistent(c, cfg, 0.03)


def test_result_does_not_depend_on_block_size(cfg):
    runs = {bs: run_session(cfg, sifted_digest=True, duration_s=0.05, seed=5, block_s=bs)
            for bs in (0.01, 0.003, 0.05)}
    ref = without_wall(runs[0.01])
    for bs, s in runs.items():
        check_consistent(s, cfg, 0.05)
        assert without_wall(s) == ref, f"block_s = {bs} gives a different summary"


def test_no_seed_draws_one_and_reports_it(cfg):
    s = run_session(cfg, sifted_digest=True, duration_s=0.02)
    assert isinstance(s["seed"], int)
    again = run_session(cfg, sifted_digest=True, duration_s=0.02, seed=s["seed"])
    assert without_wall(again) == without_wall(s)


def test_nonpositive_duration_is_a_user_error(cfg):
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(QkdctlError, match="positive number of seconds"):
            run_session(cfg, sifted_digest=True, duration_s=bad, seed=1)


def test_infinite_duration_is_a_user_error(cfg, mocker):
    bench = build_bench(cfg, 1)
    output_on = mocker.spy(bench["laser"], "output_on")
    with pytest.raises(QkdctlError, match="positive number of seconds"):
        run_session(cfg, sifted_digest=True, duration_s=float("inf"), seed=1, bench=bench)
    output_on.assert_not_called()


@pytest.mark.parametrize("block_s", [0.0, -0.01, float("nan")])
def test_bad_block_size_is_refused_before_arming(cfg, mocker, block_s):
    bench = build_bench(cfg, 1)
    output_on = mocker.spy(bench["laser"], "output_on")
    with pytest.raises((QkdctlError, ValueError), match="block"):
        run_session(cfg, sifted_digest=True, duration_s=0.02, seed=1, block_s=block_s, bench=bench)
    output_on.assert_not_called()


def test_progress_reports_every_block(cfg):
    seen = []
    s = run_session(cfg, duration_s=0.05, seed=2, block_s=0.01, progress=seen.append)
    assert [p["bench_s"] for p in seen] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert all(p["duration_s"] == 0.05 for p in seen)
    det = [p["detected_pulses"] for p in seen]
    assert det == sorted(det) and det[-1] <= s["detected_pulses"]
    assert seen[-1]["sifted_bits"] <= s["sifted_bits"]
    assert 0.005 < seen[-1]["qber_z"] < 0.02


def test_discard_mode_accounts_for_discarded_pulses(cfg):
    """multi_click = "discard": cross-basis double clicks are dropped, and counted."""
    c = cfg.with_analysis(multi_click="discard")
    s = run_session(c, sifted_digest=True, duration_s=0.03, seed=4)
    mc = s["multi_clicks"]
    assert mc["discarded"] == mc["cross_basis"] > 0
    total = sum(d["detections"] for d in s["counts_by_intensity"].values())
    assert total + mc["discarded"] == s["detected_pulses"]


# ------------------------------------------------------------------------- stop early


def test_stop_callback_ends_run_early(cfg):
    polls = []

    def stop():
        polls.append(1)
        return len(polls) >= 3

    s = run_session(cfg, sifted_digest=True, duration_s=0.2, seed=8, block_s=0.01, stop=stop)
    assert s["interrupted"] is True
    assert s["duration_s"] == pytest.approx(0.03) and s["duration_s"] < 0.2
    check_consistent(s, cfg, 0.03)
    # what ran is exactly a 0.03 s run: the summary of what was acquired is not truncated
    full = run_session(cfg, sifted_digest=True, duration_s=0.03, seed=8)
    assert full["interrupted"] is False
    assert {**without_wall(s), "interrupted": False} == without_wall(full)


def test_stop_during_the_last_block_is_a_complete_run(cfg):
    """A stop request that arrives with the last block changes nothing: the run was complete."""
    s = run_session(cfg, duration_s=0.02, seed=8, block_s=0.01, stop=lambda: True)
    assert s["interrupted"] is True and s["duration_s"] == pytest.approx(0.01)
    s = run_session(cfg, duration_s=0.01, seed=8, block_s=0.01, stop=lambda: True)
    assert s["interrupted"] is False and s["duration_s"] == pytest.approx(0.01)


def test_sigint_stops_at_end_of_block(cfg):
    """First Ctrl-C (SIGINT) during a run: stop after the current block, summary of it."""
    before = signal.getsignal(signal.SIGINT)
    blocks = []

    def progress(p):
        blocks.append(p["bench_s"])
        if len(blocks) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    s = run_session(cfg, duration_s=0.2, seed=9, block_s=0.01, progress=progress)
    assert s["interrupted"] is True
    assert blocks == pytest.approx([0.01, 0.02])
    check_consistent(s, cfg, 0.02)
    assert signal.getsignal(signal.SIGINT) is before, "SIGINT handler not restored"


# ------------------------------------------------------------------------- safe state


@pytest.fixture
def spied_bench(cfg, mocker):
    """A mock bench whose instruments' safe_state calls are recorded, in order."""
    bench = build_bench(cfg, SEED)
    order = mocker.Mock()
    for role in ARM_ORDER:
        order.attach_mock(mocker.spy(bench[role], "safe_state"), role)
    return bench, order


def assert_safe(bench, order):
    table = bench["laser"].table
    assert all(bench[r].table is table for r in ARM_ORDER)
    assert table.laser_on is False, "laser output left on"
    assert table.power_scale == 0.0
    assert [d.biased for d in table.detectors] == [False] * len(table.detectors), \
        "detectors left biased"
    assert bench["modulator"]._get_running() is False, "modulator left running"
    assert bench["tagger"]._get_running() is False, "tagger left acquiring"
    assert not any(bench[r].connected for r in ARM_ORDER)
    assert [c[0] for c in order.mock_calls] == list(reversed(ARM_ORDER)), \
        f"safe_state calls {order.mock_calls}, expected the reverse of {ARM_ORDER}"
    for r in ARM_ORDER:
        bench[r].safe_state.assert_called_once_with()


def failing_after(mocker, inst, method, n_ok, exc):
    """Make inst.method raise exc on call n_ok + 1 (earlier calls go through)."""
    real = getattr(inst, method)
    calls = []

    def side_effect(*args, **kwargs):
        calls.append(args)
        if len(calls) > n_ok:
            raise exc
        return real(*args, **kwargs)

    mocker.patch.object(inst, method, side_effect=side_effect)
    return calls


def test_safe_state_after_normal_run(cfg, spied_bench):
    bench, order = spied_bench
    run_session(cfg, sifted_digest=True, duration_s=0.02, seed=SEED, bench=bench)
    assert_safe(bench, order)


def test_safe_state_when_read_block_fails_halfway(cfg, spied_bench, mocker):
    bench, order = spied_bench
    err = InstrumentError("tagger: read_block: no answer (simulated)")
    calls = failing_after(mocker, bench["tagger"], "read_block", 5, err)
    live = []

    def progress(p):  # the bench is live while the run goes
        t = bench["laser"].table
        live.append(t.laser_on and all(d.biased for d in t.detectors)
                    and bench["tagger"]._get_running() and bench["modulator"]._get_running())

    with pytest.raises(InstrumentError) as ei:
        run_session(cfg, sifted_digest=True, duration_s=0.1, seed=SEED, block_s=0.01, bench=bench,
                    progress=progress)
    assert ei.value is err
    assert len(calls) == 6 and live == [True] * 5
    assert_safe(bench, order)


def test_safe_state_when_laser_output_on_fails(cfg, spied_bench, mocker):
    bench, order = spied_bench
    mocker.patch.object(bench["laser"], "output_on",
                        side_effect=InstrumentError("laser: output_on: interlock open"))
    bias_on = mocker.spy(bench["detectors"], "bias_on")
    start = mocker.spy(bench["tagger"], "start")
    with pytest.raises(InstrumentError, match="interlock open"):
        run_session(cfg, sifted_digest=True, duration_s=0.05, seed=SEED, bench=bench)
    bias_on.assert_called_once()      # the detectors had been biased before the failure
    start.assert_not_called()
    assert_safe(bench, order)


def test_safe_state_on_keyboard_interrupt_from_read_block(cfg, spied_bench, mocker):
    before = signal.getsignal(signal.SIGINT)
    bench, order = spied_bench
    failing_after(mocker, bench["tagger"], "read_block", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_session(cfg, sifted_digest=True, duration_s=0.1, seed=SEED, block_s=0.01, bench=bench)
    assert_safe(bench, order)
    assert signal.getsignal(signal.SIGINT) is before


def test_safe_state_on_second_sigint(cfg, spied_bench):
    """Two Ctrl-C: the second aborts at once (KeyboardInterrupt), the bench still goes safe."""
    bench, order = spied_bench

    def progress(p):
        if p["bench_s"] > 0.015:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_session(cfg, sifted_digest=True, duration_s=0.1, seed=SEED, block_s=0.01, bench=bench,
                    progress=progress)
    assert_safe(bench, order)


def test_failing_safe_state_does_not_skip_the_others(cfg, spied_bench, mocker):
    bench, order = spied_bench
    err = InstrumentError("modulator: stop: no answer (simulated)")
    real = bench["modulator"]._set_running

    def set_running(running):
        if not running:
            raise err
        real(running)

    mocker.patch.object(bench["modulator"], "_set_running", side_effect=set_running)
    with pytest.raises(InstrumentError) as ei:
        run_session(cfg, sifted_digest=True, duration_s=0.02, seed=SEED, bench=bench)
    assert ei.value is err
    t = bench["laser"].table
    assert t.laser_on is False and not any(d.biased for d in t.detectors)
    assert bench["tagger"]._get_running() is False
    assert [c[0] for c in order.mock_calls] == list(reversed(ARM_ORDER))


def test_failure_while_connecting_makes_the_connected_ones_safe(cfg, spied_bench, mocker):
    bench, order = spied_bench
    mocker.patch.object(bench["tagger"], "connect",
                        side_effect=InstrumentError("tagger: connect: no device"))
    with pytest.raises(InstrumentError, match="no device"):
        run_session(cfg, sifted_digest=True, duration_s=0.02, seed=SEED, bench=bench)
    assert [c[0] for c in order.mock_calls] == ["modulator", "laser", "detectors"]
    bench["tagger"].safe_state.assert_not_called()
    t = bench["laser"].table
    assert t.laser_on is False and not any(d.biased for d in t.detectors)
    assert not any(bench[r].connected for r in ARM_ORDER)


# --------------------------------------------------------------------------- protocol


def bench_tags(cfg, seed, duration_s=2e-4):
    """All tags of a short run of the mock bench (2e5 pulses, about 2000 detections)."""
    bench = build_bench(cfg, seed)
    with ExitStack() as stack:
        for r in ARM_ORDER:
            stack.enter_context(bench[r])
        bench["detectors"].bias_on()
        bench["laser"].output_on()
        bench["modulator"].start()
        bench["tagger"].start()
        parts = [bench["tagger"].read_block(duration_s), bench["tagger"].finish()]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


@pytest.fixture(scope="module")
def tags(cfg):
    return bench_tags(cfg, 31)


@pytest.fixture
def roles(cfg):
    ch = LocalChannel()
    alice = AliceRole(AliceSequence.from_config(cfg.source, 31), ch.alice)
    bob = BobRole(SiftParams.from_config(cfg, 31), ch.bob)
    return ch, alice, bob


def announcement(seq, block, n=5):
    return DetectionAnnouncement(seq, block, np.arange(10, 10 + n, dtype=np.int64),
                                 np.zeros(n, np.uint8))


def test_exchange_keeps_matching_bases(cfg, tags, roles):
    ch, alice, bob = roles
    half = tags[0].shape[0] // 2
    kept = 0
    for ts, c, final in ((tags[0][:half], tags[1][:half], False),
                         (tags[0][half:], tags[1][half:], False), (None, None, True)):
        bob.announce(ts, c, final=final)
        codes = alice.reply()
        det, keep, intensity = bob.accept()
        basis, _, k = decode(codes)
        assert np.array_equal(keep, basis == det.basis)
        assert np.array_equal(intensity, k)
        kept += int(keep.sum())
    assert kept > 100
    assert ch.alice.inbox == ch.bob.inbox == type(ch.alice.inbox)()


def test_channel_error_is_a_user_error():
    assert issubclass(ChannelError, QkdctlError)


def test_alice_refuses_message_out_of_order(roles):
    ch, alice, _ = roles
    ch.alice.inbox.append(announcement(seq=1, block=1))   # message 0 never arrived
    with pytest.raises(ChannelError, match="received message 1, expected 0"):
        alice.reply()
    assert len(ch.bob.inbox) == 0   # no reply was sent


def test_alice_refuses_replayed_announcement(roles, tags):
    ch, alice, bob = roles
    bob.announce(*tags)
    ann = ch.alice.inbox[0]
    assert isinstance(ann, DetectionAnnouncement) and ann.seq == 0
    alice.reply()
    bob.accept()
    ch.alice.inbox.append(ann)    # an attacker (or a bug) sends message 0 again
    with pytest.raises(ChannelError, match="replayed"):
        alice.reply()


def test_bob_refuses_replayed_reply(roles, tags):
    ch, alice, bob = roles
    half = tags[0].shape[0] // 2
    bob.announce(tags[0][:half], tags[1][:half])
    alice.reply()
    old = ch.bob.inbox[0]
    bob.accept()
    bob.announce(tags[0][half:], tags[1][half:])
    ch.bob.inbox.appendleft(old)
    with pytest.raises(ChannelError, match="received message 0, expected 1"):
        bob.accept()


def test_alice_refuses_a_reply_instead_of_an_announcement(roles):
    ch, alice, _ = roles
    ch.alice.inbox.append(SiftingReply(0, 0, np.zeros(3, bool), np.zeros(3, np.uint8)))
    with pytest.raises(ChannelError, match="expected Bob's detection announcement"):
        alice.reply()


def test_alice_refuses_malformed_announcement(roles):
    ch, alice, _ = roles
    ch.alice.inbox.append(DetectionAnnouncement(0, 0, np.arange(5, dtype=np.int64),
                                                np.zeros(4, np.uint8)))
    with pytest.raises(ChannelError, match="malformed"):
        alice.reply()


def test_alice_with_nothing_to_read(roles):
    _, alice, _ = roles
    with pytest.raises(ChannelError, match="no message"):
        alice.reply()


def test_sender_refuses_misnumbered_message(roles):
    ch, _, _ = roles
    with pytest.raises(ChannelError, match="numbered 3, expected 0"):
        ch.bob.send(announcement(seq=3, block=0))
    assert len(ch.alice.inbox) == 0


@pytest.mark.parametrize("which", ["keep", "intensity"])
@pytest.mark.parametrize("delta", [-1, +1])
def test_bob_refuses_reply_of_wrong_length(roles, tags, which, delta):
    ch, _, bob = roles
    det = bob.announce(*tags)
    n = det.pulse.shape[0]
    assert n > 10
    sizes = {"keep": n, "intensity": n, which: n + delta}
    ch.alice.send(SiftingReply(0, 0, np.ones(sizes["keep"], bool),
                               np.zeros(sizes["intensity"], np.uint8)))
    with pytest.raises(ChannelError, match="reply to block 0"):
        bob.accept()


def test_bob_refuses_reply_to_another_block(roles, tags):
    ch, _, bob = roles
    det = bob.announce(*tags)
    n = det.pulse.shape[0]
    ch.alice.send(SiftingReply(0, 7, np.ones(n, bool), np.zeros(n, np.uint8)))
    with pytest.raises(ChannelError, match="expected Alice's sifting reply to block 0"):
        bob.accept()


def test_bob_refuses_to_announce_twice_without_reply(roles, tags):
    _, _, bob = roles
    half = tags[0].shape[0] // 2
    bob.announce(tags[0][:half], tags[1][:half])
    with pytest.raises(ChannelError, match="still waiting"):
        bob.announce(tags[0][half:], tags[1][half:])


def test_refused_announce_does_not_consume_tags(roles, tags):
    _, _, bob = roles
    half = tags[0].shape[0] // 2
    bob.announce(tags[0][:half], tags[1][:half])
    before = bob.sifter.counters
    with pytest.raises(ChannelError):
        bob.announce(tags[0][half:], tags[1][half:])
    assert bob.sifter.counters == before
