"""Reference implementations of the sifting core, for tests and benchmarks.

- :func:`assign_python`: a plain-Python, tag-by-tag, whole-run version of
  :func:`qkdctl.sifting.assign_kernel`, written from the specification in
  :mod:`qkdctl.sifting` (its own SplitMix64, its own sort), with no numba.
- :func:`assign_numpy`: the same sifting vectorized with numpy. It numbers the
  sync tags with the nominal period, so it agrees with the kernel whenever
  every sync interval is within half a pulse period of a whole number of
  sync periods (true for clock drifts up to ``1 / (2 * sync_period_pulses)``).

Both return the detections of the whole run (after the end-of-run release).
"""

from __future__ import annotations

import math

import numpy as np

from .sifting import (
    FLAG_CROSS_BASIS,
    FLAG_SAME_BASIS,
    FLAG_SINGLE,
    MULTI_DISCARD,
    Detections,
    SiftParams,
)

__all__ = ["assign_numpy", "assign_python", "mix64_py"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def mix64_py(z: int) -> int:
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _squash_py(key: int, pulse: int) -> tuple[int, int]:
    h = mix64_py(int(key) + pulse * _GOLDEN)
    return h & 1, (h >> 1) & 1


def _merge_pulse(mask: int, pulse: int, p: SiftParams):
    z = x = 0
    first = None
    for d in range(p.det_basis.shape[0]):
        if mask >> d & 1:
            if first is None:
                first = d
            if p.det_basis[d] == 0:
                z |= 1 << int(p.det_bit[d])
            else:
                x |= 1 << int(p.det_bit[d])
    if z and x:
        if p.multi_click == MULTI_DISCARD:
            return None
        b, bit = _squash_py(p.squash_key, pulse)
        return b, bit, FLAG_CROSS_BASIS
    if z == 3 or x == 3:
        _, bit = _squash_py(p.squash_key, pulse)
        return (0 if z else 1), bit, FLAG_SAME_BASIS
    return int(p.det_basis[first]), int(p.det_bit[first]), FLAG_SINGLE


def _emit(pairs, p: SiftParams) -> Detections:
    pairs = sorted(set(pairs))
    rows = []
    i = 0
    while i < len(pairs):
        pulse = pairs[i][0]
        mask = 0
        while i < len(pairs) and pairs[i][0] == pulse:
            mask |= 1 << pairs[i][1]
            i += 1
        r = _merge_pulse(mask, pulse, p)
        if r is not None:
            rows.append((pulse, *r))
    if not rows:
        return Detections.empty()
    a = np.array(rows, dtype=np.int64)
    return Detections(a[:, 0].copy(), a[:, 1].astype(np.uint8), a[:, 2].astype(np.uint8),
                      a[:, 3].astype(np.uint8), np.full(len(rows), 255, np.uint8))


def assign_python(ts, ch, p: SiftParams) -> Detections:
    """Tag-by-tag reference of the assignment, multi-click merge and squashing."""
    ns = p.sync_period_pulses
    period = p.period_ps
    inv_period = 1.0 / period
    syncs: list[tuple[int, int]] = []
    pairs = []
    for t, c in zip(ts.tolist(), ch.tolist(), strict=True):
        if c == p.sync_channel:
            if not syncs:
                syncs.append((t, p.first_sync_pulse))
            else:
                last_t, last_p = syncs[-1]
                interval = t - last_t
                k = math.floor(interval * inv_period * (1.0 / (ns * 1.0)) + 0.5)
                resid = interval - k * (ns * 1.0) * period
                if k < 1 or resid < -0.5 * period or resid >= 0.5 * period:
                    continue
                syncs.append((t, last_p + k * ns))
            back = min(len(syncs) - 1, p.tracking_syncs)
            if back > 0:
                (t1, p1), (t0, p0) = syncs[-1], syncs[-1 - back]
                period = float(t1 - t0) * (1.0 / (p1 - p0))
                inv_period = (p1 - p0) / float(t1 - t0)
            continue
        d = int(p.det_index[c])
        if d < 0 or not syncs:
            continue
        last_t, last_p = syncs[-1]
        dt = float(t - int(p.delay_ps[c]) - last_t)
        slot = math.floor(dt * inv_period + 0.5)
        phase = dt - slot * period
        if p.gate_lo_ps <= phase < p.gate_hi_ps and last_p + slot >= 0:
            pairs.append((last_p + slot, d))
    return _emit(pairs, p)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def assign_numpy(ts, ch, p: SiftParams) -> Detections:
    """Vectorized numpy version of the whole assignment (see module docstring)."""
    ts = np.asarray(ts, np.int64)
    ch = np.asarray(ch, np.uint8)
    is_sync = ch == p.sync_channel
    s_t = ts[is_sync]
    if s_t.size == 0:
        return Detections.empty()
    ns = p.sync_period_pulses
    k = np.floor(np.diff(s_t) / (ns * 1.0 * p.period_ps) + 0.5).astype(np.int64)
    s_p = p.first_sync_pulse + np.concatenate([[0], np.cumsum(k * ns)])
    idx = np.arange(s_t.size)
    back = np.minimum(idx, p.tracking_syncs)
    o = idx - back
    dt_s = (s_t - s_t[o]).astype(np.float64)
    dp_s = (s_p - s_p[o]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(back > 0, dt_s * (1.0 / dp_s), p.period_ps)
        inv_per = np.where(back > 0, dp_s / dt_s, 1.0 / p.period_ps)
    # reference sync of each tag: the last sync before it in the stream
    ref = np.cumsum(is_sync) - 1
    det = p.det_index[ch]
    sel = (~is_sync) & (det >= 0) & (ref >= 0)
    r = ref[sel]
    c = ch[sel]
    P = per[r]
    dt = (ts[sel] - p.delay_ps[c] - s_t[r]).astype(np.float64)
    slot = np.floor(dt * inv_per[r] + 0.5)
    phase = dt - slot * P
    pulse = s_p[r] + slot.astype(np.int64)
    g = (phase >= p.gate_lo_ps) & (phase < p.gate_hi_ps) & (pulse >= 0)
    keys = np.sort((pulse[g] << 8) | det[sel][g].astype(np.int64))
    keys = keys[np.concatenate([[True], np.diff(keys) != 0])] if keys.size else keys
    pul = keys >> 8
    start = np.flatnonzero(np.concatenate([[True], np.diff(pul) != 0]))
    mask = np.bitwise_or.reduceat(np.int64(1) << (keys & 255), start) if keys.size else keys
    up = pul[start]
    nd = p.det_basis.shape[0]
    bits = (mask[:, None] >> np.arange(nd)[None, :]) & 1
    zdet = (p.det_basis == 0)
    zmask = (bits[:, zdet] << p.det_bit[zdet].astype(np.int64)).sum(1) if nd else mask
    xmask = (bits[:, ~zdet] << p.det_bit[~zdet].astype(np.int64)).sum(1) if nd else mask
    # zmask/xmask: bit y set when the detector of bit y in that basis clicked
    zmask = np.where(bits[:, zdet].sum(1) > 1, 3, zmask)
    xmask = np.where(bits[:, ~zdet].sum(1) > 1, 3, xmask)
    first = np.argmax(bits, axis=1)
    basis = p.det_basis[first].copy()
    bit = p.det_bit[first].copy()
    flag = np.full(up.shape, FLAG_SINGLE, np.uint8)
    h = _mix64_np(np.uint64(p.squash_key) + up.astype(np.uint64) * np.uint64(_GOLDEN))
    hb = ((h >> np.uint64(1)) & np.uint64(1)).astype(np.uint8)
    same = ((zmask == 3) & (xmask == 0)) | ((xmask == 3) & (zmask == 0))
    cross = (zmask > 0) & (xmask > 0)
    basis[same] = np.where(zmask[same] == 3, 0, 1)
    bit[same] = hb[same]
    flag[same] = FLAG_SAME_BASIS
    basis[cross] = (h[cross] & np.uint64(1)).astype(np.uint8)
    bit[cross] = hb[cross]
    flag[cross] = FLAG_CROSS_BASIS
    keep = ~cross if p.multi_click == MULTI_DISCARD else np.ones(up.shape, bool)
    return Detections(up[keep], basis[keep], bit[keep], flag[keep],
                      np.full(int(keep.sum()), 255, np.uint8))
