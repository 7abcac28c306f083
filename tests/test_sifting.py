"""The sifting core against its plain-Python and numpy references, and block-size invariance."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from qkdctl.config import parse_bench
from qkdctl.sequence import AliceSequence, decode
from qkdctl.sifting import (
    FLAG_CROSS_BASIS,
    FLAG_SAME_BASIS,
    FLAG_SIFTED,
    Detections,
    Sifter,
    SiftParams,
)
from qkdctl.sifting_reference import assign_numpy, assign_python
from qkdctl.sim.engine import TagGenerator
from qkdctl.sim.table import OpticalTable

SIM = Path(__file__).resolve().parents[1] / "configs" / "sim.toml"
BOB_FIELDS = ("pulse", "basis", "bit")


def bench(**analysis):
    data = tomllib.loads(SIM.read_text())
    data["analysis"].update(analysis)
    return parse_bench(data, str(SIM))


def sift_in_blocks(params, ts, ch, cuts, sequence=None):
    """Feed the tags cut at the given indices (empty blocks allowed); return all detections."""
    s = Sifter(params, sequence)
    parts = []
    edges = [0, *cuts, len(ts)]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        parts.append(s.process(ts[a:b], ch[a:b]))
    parts.append(s.finish())
    return Detections.concat(parts), s


def same_bob(a: Detections, b: Detections) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in BOB_FIELDS) and \
        np.array_equal(a.flag & 3, b.flag & 3)


def synthetic(rng, params, *, n_syncs=400, drift_ppm=0.0, drop_syncs=(), spurious=(),
              p_det=0.05, edge_cases=True, negative_before=True, duplicates=True):
    """A sorted tag stream: sync tags on their grid, detections near pulse slots.

    Detections are placed at random phases within and around the gate,
    including phases exactly on the gate edges (exact when the drift is 0).
    """
    P = params.period_ps * (1 + drift_ppm * 1e-6)
    ns = params.sync_period_pulses
    t0 = 5_000_000
    ts, ch = [], []
    for k in range(n_syncs):
        if k in drop_syncs:
            continue
        ts.append(t0 + round(k * ns * P) + int(rng.integers(-3, 4)))
        ch.append(params.sync_channel)
    for k in spurious:  # sync tags off the sync grid
        ts.append(t0 + round((k + 0.37) * ns * P))
        ch.append(params.sync_channel)
    det_ch = params.det_channel
    n_pulses = n_syncs * ns
    pulses = np.flatnonzero(rng.random(n_pulses) < p_det)
    lo, hi = params.gate_lo_ps, params.gate_hi_ps
    for n in pulses:
        nclick = 1 + (rng.random() < 0.1) + (rng.random() < 0.05)
        for c in rng.choice(det_ch, size=nclick, replace=duplicates):
            r = rng.random()
            if edge_cases and r < 0.05:
                phase = lo
            elif edge_cases and r < 0.10:
                phase = hi
            elif edge_cases and r < 0.15:
                phase = rng.choice([lo - 1, lo + 1, hi - 1, hi + 1, lo + 0.5, hi - 0.5])
            else:
                phase = rng.uniform(lo - 80, hi + 80)
            ts.append(t0 + int(math.floor(n * P + params.delay_ps[c] + phase)))
            ch.append(int(c))
    if negative_before:  # detections before the first sync and on unmapped channels
        for _ in range(5):
            ts.append(t0 - int(rng.integers(1, 5000)))
            ch.append(int(rng.choice(det_ch)))
        for _ in range(20):
            ts.append(t0 + int(rng.integers(0, n_pulses * 1000)))
            ch.append(9)
    ts = np.array(ts, np.int64)
    ch = np.array(ch, np.uint8)
    order = np.argsort(ts, kind="stable")
    return ts[order], ch[order]


@pytest.fixture(scope="module")
def params():
    return SiftParams.from_config(bench(), seed=5)


@pytest.mark.parametrize("drift_ppm", [0.0, 50.0, -50.0])
@pytest.mark.parametrize("seed", [1, 2])
def test_kernel_matches_python_reference_on_random_streams(params, drift_ppm, seed):
    rng = np.random.default_rng(seed)
    ts, ch = synthetic(rng, params, drift_ppm=drift_ppm, drop_syncs={7, 8, 100, 250},
                       spurious=(30, 31, 200))
    ref = assign_python(ts, ch, params)
    assert len(ref) > 1000
    assert (ref.flag & 3 == FLAG_SAME_BASIS).any() and (ref.flag & 3 == FLAG_CROSS_BASIS).any()
    cuts = sorted(rng.choice(len(ts), size=40, replace=False).tolist())
    cuts = cuts[:10] + [cuts[10]] * 3 + cuts[10:]  # empty blocks
    got, s = sift_in_blocks(params, ts, ch, cuts)
    assert same_bob(got, ref)
    c = s.counters
    assert c["syncs_rejected"] == 3
    assert c["sync_gaps"] == 3 and c["syncs_missed"] == 4
    assert c["other_channel"] == 20
    assert c["before_first_sync"] >= 5
    # the period follows the drift; the sync jitter is +-3 ps over 64 sync intervals
    assert s.period_ps == pytest.approx(params.period_ps * (1 + drift_ppm * 1e-6), abs=1e-3)


def test_gate_edges_exactly(params):
    """A phase equal to gate_lo is kept, one equal to gate_hi is not (half-open gate)."""
    ns = params.sync_period_pulses
    P = params.period_ps
    c = int(params.det_channel[0])
    d = int(params.delay_ps[c])
    lo, hi = int(params.gate_lo_ps), int(params.gate_hi_ps)
    ts = np.array([0, ns * 1000, 2 * ns * 1000, 2 * ns * 1000 + int(5 * P) + d + lo,
                   2 * ns * 1000 + int(6 * P) + d + hi, 2 * ns * 1000 + int(7 * P) + d + hi - 1,
                   2 * ns * 1000 + int(8 * P) + d + lo - 1], np.int64)
    chs = np.array([params.sync_channel] * 3 + [c] * 4, np.uint8)
    for fn in (lambda: sift_in_blocks(params, ts, chs, [])[0],
               lambda: assign_python(ts, chs, params), lambda: assign_numpy(ts, chs, params)):
        det = fn()
        assert det.pulse.tolist() == [2 * ns + 5, 2 * ns + 7]


@pytest.mark.parametrize("seed", [3, 4])
def test_numpy_reference_matches_kernel(params, seed):
    rng = np.random.default_rng(seed)
    ts, ch = synthetic(rng, params, drift_ppm=20.0, drop_syncs={50})
    got, _ = sift_in_blocks(params, ts, ch, [len(ts) // 3])
    assert same_bob(assign_numpy(ts, ch, params), got)


def test_discard_policy_drops_cross_basis_clicks():
    p = SiftParams.from_config(bench(multi_click="discard"), seed=5)
    rng = np.random.default_rng(9)
    ts, ch = synthetic(rng, p)
    got, s = sift_in_blocks(p, ts, ch, [1000, 5000])
    ref = assign_python(ts, ch, p)
    assert same_bob(got, ref)
    assert not (got.flag & 3 == FLAG_CROSS_BASIS).any()
    assert s.counters["multi_discarded"] == s.counters["multi_cross_basis"] > 0
    assert same_bob(assign_numpy(ts, ch, p), got)


def test_squashing_draws_fair_bits(params):
    """Double clicks in one basis get a random bit: half zeros, half ones."""
    rng = np.random.default_rng(11)
    ts, ch = synthetic(rng, params, n_syncs=2000, p_det=0.02, edge_cases=False,
                       negative_before=False, duplicates=False)
    det, _ = sift_in_blocks(params, ts, ch, [])
    same = det.flag & 3 == FLAG_SAME_BASIS
    cross = det.flag & 3 == FLAG_CROSS_BASIS
    n = int(same.sum())
    assert n > 500
    assert abs(det.bit[same].mean() - 0.5) < 5 * 0.5 / math.sqrt(n)
    m = int(cross.sum())
    assert abs(det.basis[cross].mean() - 0.5) < 5 * 0.5 / math.sqrt(m)


def test_empty_input(params):
    s = Sifter(params)
    e = s.process(np.zeros(0, np.int64), np.zeros(0, np.uint8))
    assert len(e) == 0 and len(s.finish()) == 0
    assert s.counters["syncs"] == 0


def test_mismatched_arrays_are_refused(params):
    with pytest.raises(ValueError, match="equal length"):
        Sifter(params).process(np.zeros(3, np.int64), np.zeros(2, np.uint8))


@pytest.fixture(scope="module")
def sim_run():
    cfg = bench()
    gen = TagGenerator(OpticalTable.from_config(cfg, 7), 7)
    ts, ch = gen.generate(20_000_000)
    t2, c2 = gen.finish()
    return cfg, np.concatenate([ts, t2]), np.concatenate([ch, c2])


@pytest.mark.parametrize("block", [1, 7, 1000, 10**6])
def test_block_size_invariance_on_a_simulated_run(sim_run, block):
    """The same run cut into blocks of 1, 7, 1000 and 1e6 tags: identical key and statistics."""
    cfg, ts, ch = sim_run
    params = SiftParams.from_config(cfg, 7)
    seq = AliceSequence.from_config(cfg.source, 7)
    whole, s_whole = sift_in_blocks(params, ts, ch, [], seq)
    got, s = sift_in_blocks(params, ts, ch, list(range(block, len(ts), block)), seq)
    for f in Detections.FIELDS:
        np.testing.assert_array_equal(getattr(got, f), getattr(whole, f))
    for name in ("detected", "sifted", "errors"):
        np.testing.assert_array_equal(getattr(s.stats, name), getattr(s_whole.stats, name))
    assert s.counters == s_whole.counters
    assert s.period_ps == s_whole.period_ps
    assert len(whole) > 150_000


def test_sifter_with_alice_matches_reference_statistics(sim_run):
    """Alice's columns and the statistics equal an independent computation from the reference."""
    cfg, ts, ch = sim_run
    params = SiftParams.from_config(cfg, 7)
    seq = AliceSequence.from_config(cfg.source, 7)
    got, s = sift_in_blocks(params, ts, ch, [12345, 777777], seq)
    ref = assign_python(ts[:300_000], ch[:300_000], params)
    head = got.pulse < ref.pulse[-1] - 5
    ref_head = ref.pulse < ref.pulse[-1] - 5
    assert same_bob(Detections(*(getattr(got, f)[head] for f in Detections.FIELDS)),
                    Detections(*(getattr(ref, f)[ref_head] for f in Detections.FIELDS)))
    codes = seq.codes(got.pulse)
    np.testing.assert_array_equal(got.code, codes)
    a_basis, a_bit, k = decode(codes)
    sifted = a_basis == got.basis
    np.testing.assert_array_equal((got.flag & FLAG_SIFTED) != 0, sifted)
    for kk in range(3):
        for b in range(2):
            m = (k == kk) & (got.basis == b)
            assert s.stats.detected[kk, b] == m.sum()
            assert s.stats.sifted[kk, b] == (m & sifted).sum()
            assert s.stats.errors[kk, b] == (m & sifted & (a_bit != got.bit)).sum()
    np.testing.assert_array_equal(got.key_index(), np.flatnonzero(sifted & (got.basis == 0)))


def test_detections_far_from_sync_use_the_tracked_period(params):
    """With syncs missing for a long stretch, pulse numbers extrapolate from the tracked period."""
    rng = np.random.default_rng(21)
    ts, ch = synthetic(rng, params, n_syncs=600, drift_ppm=45.0,
                       drop_syncs=set(range(300, 340)), edge_cases=False)
    got, s = sift_in_blocks(params, ts, ch, [100, 20000])
    assert same_bob(got, assign_python(ts, ch, params))
    assert s.counters["syncs_missed"] == 40
