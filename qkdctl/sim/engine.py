"""The numba time-tag generator of the simulated bench.

Pulses are simulated in sub-chunks of :data:`SUB_PULSES` pulses. Drawing a
random number per pulse would be a thousand times too much work at 1 GHz, so
the generator draws the gap to the next *candidate* pulse from a geometric law
at the largest per-pulse click probability ``P_max`` over Alice's states, then
keeps the candidate with probability ``P_any(state) / P_max`` (thinning), which
is exact. Given that at least one detector clicks, the first clicking detector
is drawn from its conditional law and the others click independently.

Each physical process owns a random stream: photon clicks and their jitter,
the sync jitter, each detector's dark counts, each detector's afterpulses.
Events are held back until no later pulse can produce an earlier one (the
horizon), then pass each detector's non-paralysable dead time in time order,
and finally all channels are merged into one time-sorted tag stream. The tags
are therefore a function of the seed and the bench alone, not of the chunking.

Times inside are int64 picoseconds on the tagger's clock:
``t(n) = offset + n * P_tag + delay + jitter`` with ``P_tag = P (1 + drift)``,
quantized to the tagger resolution on output. Timing jitter is a normal law
cut at ``jitter_clip_sigmas``; the cut bounds how far an event can move and so
makes the horizon exact.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ..rng import (
    derive_key,
    hash_index,
    next_normal_clipped,
    next_uniform,
    normal_clipped_at,
    uniform_at,
)
from ..sequence import alice_code
from .table import OpticalTable

__all__ = ["BATCH_SUBCHUNKS", "SUB_PULSES", "TagGenerator"]

SUB_PULSES = 1 << 16
BATCH_SUBCHUNKS = 16
_NEVER = np.int64(1) << np.int64(62)
nb_prange = nb.prange


@nb.njit(cache=True, inline="always")
def _tag_time(n, offset, p_int, p_frac, extra):
    return offset + n * p_int + np.int64(math.floor(n * p_frac + extra))


@nb.njit(cache=True, inline="always")
def _exp_gap(state, mean_ps):
    return np.int64(-math.log(next_uniform(state)) * mean_ps)


@nb.njit(cache=True)
def _insertion_sort(a, n):
    for i in range(1, n):
        v = a[i]
        j = i - 1
        while j >= 0 and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v


@nb.njit(cache=True)
def _merge(a, na, b, nb_, out):
    i = 0
    j = 0
    k = 0
    while i < na and j < nb_:
        if b[j] < a[i]:
            out[k] = b[j]
            j += 1
        else:
            out[k] = a[i]
            i += 1
        k += 1
    while i < na:
        out[k] = a[i]
        i += 1
        k += 1
    while j < nb_:
        out[k] = b[j]
        j += 1
        k += 1
    return k


@nb.njit(cache=True, inline="always")
def _eve_code(c, code, eve_mode, eve_key, eve_thr, ncode):
    """Extended code of pulse ``c`` under the attack (see :class:`~.table.EveTables`)."""
    h = hash_index(eve_key, c)
    if (h >> np.uint64(11)) >= eve_thr:
        return code
    if eve_mode == 1:
        # intercept-resend: a random basis; the right one gives Alice's bit, the
        # other a random bit
        a = (code >> 1) & 1
        eb = np.int64(h & np.uint64(1))
        xb = (code & 1) if eb == a else np.int64((h >> np.uint64(1)) & np.uint64(1))
        return ncode + ((code & ~3) | (eb << 1) | xb)
    return 2 * ncode + code


@nb.njit(cache=True)
def _photons(c, n1, ctr, ph_t, ph_n, mode, key, z_thr, cum_thr, pattern, p_click, p_any,
             p_rest, p_max, log1m_pmax, offset, p_int, p_frac, delay, jitter, jit_clip,
             eve_mode, eve_key, eve_thr, p_ext, ir_scale, m_cdf, w_cum):
    """Photon clicks of candidates c .. n1-1; returns (next candidate, stream counter).

    The stream counter is kept in a register here: this loop runs for every
    candidate pulse and is the simulator's hottest.
    """
    ndet = ph_n.shape[0]
    cap = ph_t.shape[1]
    ncode = p_click.shape[0]
    for j in range(ndet):
        ph_n[j] = 0
    while c < n1:
        code = np.int64(alice_code(c, mode, key, z_thr, cum_thr, pattern))
        u, ctr = uniform_at(ctr)
        v = u * p_max
        if eve_mode != 0:
            code = _eve_code(c, code, eve_mode, eve_key, eve_thr, ncode)
            keep = v <= p_ext[code]
            if keep and code >= 2 * ncode:
                # photon-number splitting: photons reaching Bob from their law given
                # a click, then each detected or lost, until at least one is detected
                code -= 2 * ncode
                r = v / p_ext[2 * ncode + code]
                m = 0
                while m < m_cdf.shape[1] - 1 and r > m_cdf[code, m]:
                    m += 1
                hit = 0
                while hit == 0:
                    for _ in range(m):
                        g, ctr = uniform_at(ctr)
                        for j in range(ndet):
                            if g <= w_cum[code, j]:
                                hit |= 1 << j
                                break
                for j in range(ndet):
                    if hit & (1 << j):
                        x, ctr = normal_clipped_at(ctr, jit_clip)
                        if ph_n[j] >= cap:
                            return c, ctr, True
                        ph_t[j, ph_n[j]] = _tag_time(c, offset, p_int, p_frac,
                                                     delay[j] + jitter[j] * x)
                        ph_n[j] += 1
                keep = False
            elif keep and code >= ncode:
                # intercept-resend: Bob sees Eve's pulse, sent if she detected one
                code -= ncode
                v = v / ir_scale[code >> 2]
        else:
            keep = v <= p_any[code]
        if keep:
            # Given a click among detectors start.. , v is uniform on (0, P(click)]
            # and picks the first of them that clicks; then one draw decides whether
            # any later detector clicks too (probability p_rest), and so on.
            start = 0
            while True:
                q = 1.0
                first = ndet - 1
                for j in range(start, ndet):
                    q *= 1.0 - p_click[code, j]
                    if v <= 1.0 - q:
                        first = j
                        break
                x, ctr = normal_clipped_at(ctr, jit_clip)
                if ph_n[first] >= cap:
                    return c, ctr, True
                ph_t[first, ph_n[first]] = _tag_time(c, offset, p_int, p_frac,
                                                     delay[first] + jitter[first] * x)
                ph_n[first] += 1
                if first == ndet - 1:
                    break
                v, ctr = uniform_at(ctr)
                if v > p_rest[code, first]:
                    break
                start = first + 1
        if p_max >= 1.0:
            c += 1
        else:
            g, ctr = uniform_at(ctr)
            c += 1 + np.int64(math.log(g) / log1m_pmax)
    return c, ctr, False


@nb.njit(cache=True, parallel=True)
def _photons_batch(s_first, nb, n0, n_end, carry_c, carry_ctr, photon_key, ph_t, ph_n,
                   end_c, end_ctr, overflow, mode, key, z_thr, cum_thr, pattern, p_click,
                   p_any, p_rest, p_max, log1m_pmax, offset, p_int, p_frac, delay, jitter,
                   jit_clip, eve_mode, eve_key, eve_thr, p_ext, ir_scale, m_cdf, w_cum):
    """Photon clicks of sub-chunks s_first .. s_first+nb-1, in parallel.

    Sub-chunk s covers pulses [s * SUB_PULSES, (s + 1) * SUB_PULSES) and has a
    random stream of its own keyed by s; its first candidate is drawn afresh
    from its first pulse (exact: the geometric law is memoryless). A sub-chunk
    cut by the end of a call continues from (carry_c, carry_ctr) in the next.
    """
    sub = np.int64(SUB_PULSES)
    for b in nb_prange(nb):
        s = s_first + b
        lo = max(n0, s * sub)
        hi = min(n_end, (s + 1) * sub)
        if b == 0 and lo % sub != 0:
            c = carry_c
            ctr = carry_ctr
        else:
            ctr = hash_index(photon_key, s)
            if p_max <= 0.0:
                c = _NEVER
            elif p_max >= 1.0:
                c = lo
            else:
                g, ctr = uniform_at(ctr)
                c = lo + np.int64(math.log(g) / log1m_pmax)
        c, ctr, ovf = _photons(c, hi, ctr, ph_t[b], ph_n[b], mode, key, z_thr, cum_thr,
                               pattern, p_click, p_any, p_rest, p_max, log1m_pmax, offset,
                               p_int, p_frac, delay, jitter, jit_clip, eve_mode, eve_key,
                               eve_thr, p_ext, ir_scale, m_cdf, w_cum)
        end_c[b] = c
        end_ctr[b] = ctr
        overflow[b] = ovf


@nb.njit(cache=True)
def _simulate(n_end, out_t, out_ch,
              # state
              pos, sync_rng, dark_rng, ap_rng, next_dark, last_reg, pending_ap,
              cand_t, cand_n, reg_t, reg_n,
              # work: photon clicks of the batch's sub-chunks, from _photons_batch
              ph_t3, ph_n2, dk_t, tmp_a, tmp_b,
              # physics
              offset, p_int, p_frac, resolution, sync_period, sync_jitter, sync_clip,
              det_channel, sync_channel, delay, jitter, jit_clip, dark_mean_ps,
              dead_ps, ap_prob, ap_mean_ps):
    """Everything after the photon clicks, for pulses pos[0] .. n_end-1; returns tags written.

    The caller sizes ``out_t`` for the worst case of the batch.
    """
    ndet = det_channel.shape[0]
    n_out = 0
    sub = np.int64(SUB_PULSES)
    cap_reg = reg_t.shape[1]
    cap_cand = cand_t.shape[1]
    cap_dk = dk_t.shape[1]
    b = -1
    while pos[0] < n_end:
        b += 1
        n0 = pos[0]
        n1 = min((n0 // sub + 1) * sub, n_end)
        ph_t = ph_t3[b]
        ph_n = ph_n2[b]

        # 2. sync tags (final once below their horizon; stored as stream ndet)
        first_sync = ((n0 + sync_period - 1) // sync_period) * sync_period
        s_idx = ndet
        for n in range(first_sync, n1, sync_period):
            x = next_normal_clipped(sync_rng, sync_clip) if sync_jitter > 0 else 0.0
            if reg_n[s_idx] >= cap_reg:
                raise ValueError("simulator: sync buffer overflow")
            reg_t[s_idx, reg_n[s_idx]] = _tag_time(n, offset, p_int, p_frac, sync_jitter * x)
            reg_n[s_idx] += 1

        # 3. per detector: dark counts, merge with photons and carry, dead time
        h_min = _tag_time(n1, offset, p_int, p_frac, -sync_jitter * sync_clip) - 1
        for j in range(ndet):
            window_end = _tag_time(n1, offset, p_int, p_frac, delay[j])
            horizon = _tag_time(n1, offset, p_int, p_frac, delay[j] - jitter[j] * jit_clip) - 1
            if horizon < h_min:
                h_min = horizon
            nd = 0
            if dark_mean_ps[j] > 0:
                while next_dark[j] < window_end:
                    if nd >= cap_dk:
                        raise ValueError("simulator: dark-count buffer overflow")
                    dk_t[j, nd] = next_dark[j]
                    nd += 1
                    next_dark[j] += 1 + _exp_gap(dark_rng[j:j + 1], dark_mean_ps[j])
            else:
                next_dark[j] = max(next_dark[j], window_end)
            _insertion_sort(ph_t[j], ph_n[j])
            k = _merge(cand_t[j], cand_n[j], ph_t[j], ph_n[j], tmp_a)
            k = _merge(tmp_a, k, dk_t[j], nd, tmp_b)
            # dead-time pass over the final candidates, interleaved with afterpulses
            i = 0
            while True:
                t_c = tmp_b[i] if i < k and tmp_b[i] < horizon else _NEVER
                t_ap = pending_ap[j] if pending_ap[j] < horizon else _NEVER
                if t_c == _NEVER and t_ap == _NEVER:
                    break
                if t_ap <= t_c:
                    t = t_ap
                    pending_ap[j] = _NEVER
                else:
                    t = t_c
                    i += 1
                if t - last_reg[j] >= dead_ps[j]:
                    if reg_n[j] >= cap_reg:
                        raise ValueError("simulator: event buffer overflow")
                    reg_t[j, reg_n[j]] = t
                    reg_n[j] += 1
                    last_reg[j] = t
                    pending_ap[j] = _NEVER
                    if ap_prob[j] > 0.0 and next_uniform(ap_rng[j:j + 1]) < ap_prob[j]:
                        pending_ap[j] = t + dead_ps[j] + _exp_gap(ap_rng[j:j + 1],
                                                                  ap_mean_ps[j])
            rest = k - i
            if rest > cap_cand:
                raise ValueError("simulator: carry buffer overflow")
            for r in range(rest):
                cand_t[j, r] = tmp_b[i + r]
            cand_n[j] = rest

        # 4. merge all streams up to the common horizon into the output
        n_out = _merge_streams(reg_t, reg_n, h_min, out_t, out_ch, n_out, det_channel,
                               sync_channel, resolution)
        pos[0] = n1
    return n_out


@nb.njit(cache=True)
def _merge_streams(reg_t, reg_n, h_min, out_t, out_ch, n_out, det_channel, sync_channel,
                   resolution):
    """Move every held event earlier than ``h_min`` to the output, in time order.

    Stream s < ndet is detector s, stream ndet the sync. Returns the new output count.
    """
    nstream = reg_t.shape[0]
    ndet = nstream - 1
    heads = np.zeros(nstream, np.int64)
    cur = np.empty(nstream, np.int64)
    for s in range(nstream):
        cur[s] = reg_t[s, 0] if reg_n[s] > 0 and reg_t[s, 0] < h_min else _NEVER
    while True:
        best = 0
        bt = cur[0]
        for s in range(1, nstream):
            v = cur[s]
            if v < bt:
                bt = v
                best = s
        if bt == _NEVER:
            break
        out_t[n_out] = bt if resolution == 1 else (bt // resolution) * resolution
        out_ch[n_out] = sync_channel if best == ndet else det_channel[best]
        n_out += 1
        h = heads[best] + 1
        heads[best] = h
        cur[best] = reg_t[best, h] if h < reg_n[best] and reg_t[best, h] < h_min else _NEVER
    for s in range(nstream):
        h = heads[s]
        m = reg_n[s] - h
        for r in range(m):
            reg_t[s, r] = reg_t[s, h + r]
        reg_n[s] = m
    return n_out


class TagGenerator:
    """Time tags of the simulated bench, pulse by pulse.

    ``generate(n_pulses)`` simulates the next ``n_pulses`` pulses of Alice and
    returns the tags that are final (sorted by time); ``finish()`` returns the
    events still held back. Concatenating all the blocks gives the same tags
    whatever the sizes asked for. The photon clicks of up to
    :data:`BATCH_SUBCHUNKS` sub-chunks are drawn in parallel (numba threads).
    """

    def __init__(self, table: OpticalTable, seed: int):
        self.table = table
        self.seed = int(seed)
        ndet = len(table.detectors)
        self._ndet = ndet
        # [next pulse to simulate, next photon candidate of a cut sub-chunk]
        self.pos = np.zeros(2, np.int64)
        self.photon_key = np.uint64(derive_key(self.seed, "photons"))
        self.eve_key = np.uint64(derive_key(self.seed, "eavesdropper"))
        self.photon_ctr = np.uint64(0)  # stream counter of a cut sub-chunk
        self.sync_rng = np.array([derive_key(self.seed, "sync")], dtype=np.uint64)
        self.dark_rng = np.array([derive_key(self.seed, f"dark{j}") for j in range(ndet)],
                                 dtype=np.uint64)
        self.ap_rng = np.array([derive_key(self.seed, f"afterpulse{j}") for j in range(ndet)],
                               dtype=np.uint64)
        self.last_reg = np.full(ndet, -_NEVER, np.int64)
        self.pending_ap = np.full(ndet, _NEVER, np.int64)
        self.next_dark = np.zeros(ndet, np.int64)
        self._version = None
        self._dk_cap = 0
        self._build(initial=True)

    @property
    def pulses_simulated(self) -> int:
        return int(self.pos[0])

    def _build(self, initial: bool = False) -> None:
        t = self.table
        ndet = self._ndet
        period = t.period_ps
        p_tag = period * (1.0 + t.clock_drift_ppm * 1e-6)
        self.p_int = np.int64(math.floor(p_tag))
        self.p_frac = float(p_tag - math.floor(p_tag))
        self.offset = np.int64(t.clock_offset_ps)
        self.p_click, self.p_any, self.p_rest = t.click_probabilities()
        self.p_max = float(self.p_any.max()) if self.p_any.size else 0.0
        self.eve_mode = np.int64(t.eve_attack if t.eve_fraction > 0 else 0)
        self.eve_thr = np.uint64(min(round(t.eve_fraction * 2.0**53), 2**53))
        self.eve = t.eve_tables() if self.eve_mode else None
        if self.eve is not None:
            self.p_max = max(self.p_max, float(self.eve.p_any.max()))
        self.log1m_pmax = math.log1p(-self.p_max) if 0 < self.p_max < 1 else -1.0
        # Memorylessness: after any change the next photon candidate and the next
        # dark count are redrawn from the current pulse, which is exact. (A change
        # at a sub-chunk boundary needs no redraw: the next sub-chunk starts afresh.)
        redraw = np.random.default_rng([self.seed, int(self.pos[0]), t.version])
        if self.p_max <= 0.0:
            self.pos[1] = _NEVER
        else:
            u = 1.0 - redraw.random()
            gap = 0 if self.p_max >= 1 else int(math.log(u) / self.log1m_pmax)
            self.pos[1] = self.pos[0] + gap
        d = t.detectors
        self.det_channel = np.array([x.channel for x in d], np.uint8)
        self.delay = np.array([x.delay_ps for x in d], np.float64)
        self.jitter = np.array([x.jitter_ps for x in d], np.float64)
        self.dark_mean_ps = np.array(
            [1e12 / x.dark_count_rate_hz if (x.biased and x.dark_count_rate_hz > 0) else 0.0
             for x in d], np.float64)
        self.dead_ps = np.array([round(x.dead_time_ns * 1e3) for x in d], np.int64)
        self.ap_prob = np.array([x.afterpulse_probability if x.biased else 0.0 for x in d])
        self.ap_mean_ps = np.array([x.afterpulse_time_constant_ns * 1e3 for x in d])
        self.clip = float(t.jitter_clip_sigmas)
        n0 = int(self.pos[0])
        for j in range(ndet):
            start = int(self.offset) + n0 * int(self.p_int) + math.floor(
                n0 * self.p_frac + self.delay[j])
            u = 1.0 - redraw.random()
            gap = int(-math.log(u) * self.dark_mean_ps[j]) if self.dark_mean_ps[j] > 0 else 0
            self.next_dark[j] = start + gap
        # photon buffers: a sub-chunk's clicks per detector, mean + 20 sigma (a batch
        # that overflows is redrawn, identically, with room for a click per pulse)
        pj = float(self.p_click.max()) if self.p_click.size else 0.0
        if self.eve is not None:
            pj = max(pj, float(self.eve.p_any.max()))
        mean_ph = SUB_PULSES * pj
        self._ph_cap = min(SUB_PULSES, int(mean_ph + 20 * math.sqrt(mean_ph) + 64))
        # the other buffers, sized for the worst case of one sub-chunk
        sub_ps = SUB_PULSES * p_tag
        rates = [1e12 / m if m > 0 else 0.0 for m in self.dark_mean_ps]
        mean_dk = max(rates) * sub_ps * 1e-12 if rates else 0.0
        dk_cap = int(mean_dk + 12 * math.sqrt(mean_dk) + 64)
        spread_ps = (self.delay.max() - self.delay.min() if ndet else 0.0) + \
            2 * self.clip * (max(self.jitter.max(), t.sync_jitter_ps) if ndet else 0.0)
        spread_pulses = int(spread_ps / period) + 2
        cand_cap = dk_cap + int(2 * self.clip * self.jitter.max() / period) + 64
        reg_cap = 2 * (SUB_PULSES + dk_cap + cand_cap) + 2 * spread_pulses + 64
        if initial or dk_cap > self._dk_cap or reg_cap > self.reg_t.shape[1]:
            old = None if initial else (self.cand_t, self.cand_n, self.reg_t, self.reg_n)
            self.dk_t = np.empty((ndet, dk_cap), np.int64)
            self.cand_t = np.empty((ndet, cand_cap), np.int64)
            self.cand_n = np.zeros(ndet, np.int64)
            self.reg_t = np.empty((ndet + 1, reg_cap), np.int64)
            self.reg_n = np.zeros(ndet + 1, np.int64)
            work = SUB_PULSES + dk_cap + cand_cap
            self.tmp_a = np.empty(work, np.int64)
            self.tmp_b = np.empty(work, np.int64)
            if old is not None:
                ct, cn, rt, rn = old
                for j in range(ndet):
                    self.cand_t[j, :cn[j]] = ct[j, :cn[j]]
                self.cand_n[:] = cn
                for s in range(ndet + 1):
                    self.reg_t[s, :rn[s]] = rt[s, :rn[s]]
                self.reg_n[:] = rn
            self._dk_cap = dk_cap
        self._ph_t = None
        self._version = t.version

    def _eve_args(self) -> tuple:
        e = self.eve
        if e is None:
            z1, z2 = np.zeros(1), np.zeros((1, 1))
            return np.int64(0), self.eve_key, np.uint64(0), z1, z1, z2, z2
        return (self.eve_mode, self.eve_key, self.eve_thr, e.p_any, e.ir_scale, e.m_cdf,
                e.w_cum)

    def _photon_buffers(self, cap: int):
        if self._ph_t is None or self._ph_t.shape[2] != cap:
            self._ph_t = np.empty((BATCH_SUBCHUNKS, self._ndet, cap), np.int64)
            self._ph_n = np.zeros((BATCH_SUBCHUNKS, self._ndet), np.int64)
            self._end_c = np.zeros(BATCH_SUBCHUNKS, np.int64)
            self._end_ctr = np.zeros(BATCH_SUBCHUNKS, np.uint64)
            self._ovf = np.zeros(BATCH_SUBCHUNKS, np.bool_)
        return self._ph_t, self._ph_n

    def _batch(self, n_end: int) -> tuple[np.ndarray, np.ndarray]:
        """Simulate from pos[0] up to n_end or the end of a batch of sub-chunks."""
        t = self.table
        n0 = int(self.pos[0])
        s_first = n0 // SUB_PULSES
        s_last = min((n_end - 1) // SUB_PULSES, s_first + BATCH_SUBCHUNKS - 1)
        nb = s_last - s_first + 1
        b_end = min(n_end, (s_last + 1) * SUB_PULSES)
        seq = t.sequence
        cap = self._ph_cap
        while True:
            ph_t, ph_n = self._photon_buffers(cap)
            if self.p_max <= 0.0:
                # no light (laser off, detectors unbiased): no photon clicks; the stream
                # counters end where the parallel kernel would leave them
                ph_n[:nb] = 0
                self._end_c[:nb] = _NEVER
                last = s_last if nb > 1 or n0 % SUB_PULSES == 0 else None
                self._end_ctr[nb - 1] = (self.photon_ctr if last is None
                                         else hash_index(self.photon_key, np.int64(last)))
                break
            _photons_batch(np.int64(s_first), nb, np.int64(n0), np.int64(b_end),
                           self.pos[1], self.photon_ctr, self.photon_key, ph_t, ph_n,
                           self._end_c, self._end_ctr, self._ovf, *seq.params, self.p_click,
                           self.p_any, self.p_rest, self.p_max, self.log1m_pmax, self.offset,
                           self.p_int, self.p_frac, self.delay, self.jitter, self.clip,
                           *self._eve_args())
            if not self._ovf[:nb].any():
                break
            if cap == SUB_PULSES:
                raise RuntimeError("simulator: photon buffer overflow")
            cap = SUB_PULSES
        ndet = self._ndet
        out_cap = int(self.reg_n.sum()) + nb * (
            2 * ndet * (cap + self.dk_t.shape[1] + self.cand_t.shape[1])
            + SUB_PULSES // t.sync_period_pulses + 2)
        out_t = np.empty(out_cap, np.int64)
        out_c = np.empty(out_cap, np.uint8)
        n = _simulate(np.int64(b_end), out_t, out_c, self.pos, self.sync_rng, self.dark_rng,
                      self.ap_rng, self.next_dark, self.last_reg, self.pending_ap, self.cand_t,
                      self.cand_n, self.reg_t, self.reg_n, ph_t, ph_n, self.dk_t, self.tmp_a,
                      self.tmp_b, self.offset, self.p_int, self.p_frac,
                      np.int64(t.tagger_resolution_ps), np.int64(t.sync_period_pulses),
                      float(t.sync_jitter_ps), self.clip, self.det_channel,
                      np.uint8(t.sync_channel), self.delay, self.jitter, self.clip,
                      self.dark_mean_ps, self.dead_ps, self.ap_prob, self.ap_mean_ps)
        # a sub-chunk cut by n_end continues from here in the next call
        self.pos[1] = self._end_c[nb - 1]
        self.photon_ctr = self._end_ctr[nb - 1]
        return out_t[:n], out_c[:n]

    def generate(self, n_pulses: int) -> tuple[np.ndarray, np.ndarray]:
        """Simulate the next ``n_pulses`` pulses; return the final tags (timestamps, channels)."""
        if self.table.version != self._version:
            self._build()
        n_end = int(self.pos[0]) + int(n_pulses)
        parts_t, parts_c = [], []
        while self.pos[0] < n_end:
            ts, ch = self._batch(n_end)
            parts_t.append(ts)
            parts_c.append(ch)
        self.table.pulses_simulated = int(self.pos[0])  # a read-back: no version bump
        if not parts_t:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8)
        return np.concatenate(parts_t), np.concatenate(parts_c)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Release the events still held back at the end of the run."""
        cap = int(self.reg_n.sum()) + 1
        out_t = np.empty(cap, np.int64)
        out_c = np.empty(cap, np.uint8)
        n = _merge_streams(self.reg_t, self.reg_n, _NEVER, out_t, out_c, 0, self.det_channel,
                           np.uint8(self.table.sync_channel),
                           np.int64(self.table.tagger_resolution_ps))
        return out_t[:n], out_c[:n]
