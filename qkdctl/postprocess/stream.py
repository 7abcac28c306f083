"""Secret-key distillation alongside sifting: buffers, blocks, the worker, the key stores.

:class:`KeyDistillation` collects each side's sifted bits as the sifting
pipeline produces them (Alice's from her codes, Bob's from his detections,
the intensity classes from Alice's codes: only Alice's side uses them), cuts
them into blocks of
``postprocess.block_bits`` key-basis bits, and distils each block
(:func:`.distill.distill_block`) on a worker thread while sifting goes on
(the numba kernels release the GIL). Blocks are distilled in order. The last,
partial block of a run is distilled if it has ``postprocess.min_block_bits``;
otherwise its bits are reported as not distilled.

A tamper alarm in any block stops the distillation: no later block is
distilled and :attr:`KeyDistillation.alarm` tells the session to stop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..rng import role_seed
from .distill import (
    AliceDistiller,
    BlockResult,
    BobDistiller,
    DistillParams,
    KeyBlock,
    SeededRandom,
    distill_block,
)

__all__ = ["KeyDistillation", "SideBuffer", "block_random", "summarise"]

log = logging.getLogger(__name__)


def block_random(seed: int, role: str, block: int) -> SeededRandom:
    """The reproducible random source of one role for one block (simulated bench).

    One stream per block, so that blocks distilled concurrently, in whatever
    order, draw exactly what they would draw one after the other."""
    return SeededRandom(seed, f"{role} block {block}")


@dataclass
class SideBuffer:
    """One side's sifted bits not yet in a block."""

    key: list[np.ndarray]
    intensity: list[np.ndarray]
    test: list[np.ndarray]
    test_intensity: list[np.ndarray]
    n_key: int = 0

    @classmethod
    def empty(cls) -> SideBuffer:
        return cls([], [], [], [])

    def add(self, key, intensity, test, test_intensity) -> None:
        self.key.append(key)
        self.intensity.append(intensity)
        self.test.append(test)
        self.test_intensity.append(test_intensity)
        self.n_key += key.shape[0]

    def cut(self, block: int, n: int, last: bool = False) -> KeyBlock:
        """The first ``n`` key bits and every test bit so far, as a block (``last``: the
        session's last)."""
        key = np.concatenate(self.key) if self.key else np.zeros(0, np.uint8)
        inten = np.concatenate(self.intensity) if self.intensity else np.zeros(0, np.uint8)
        test = np.concatenate(self.test) if self.test else np.zeros(0, np.uint8)
        tint = np.concatenate(self.test_intensity) if self.test_intensity else \
            np.zeros(0, np.uint8)
        blk = KeyBlock(block, key[:n], inten[:n], test, tint, last)
        self.key, self.intensity = [key[n:]], [inten[n:]]
        self.test, self.test_intensity = [], []
        self.n_key = key.shape[0] - n
        return blk

    def __repr__(self) -> str:  # never show key material
        return f"SideBuffer(n_key={self.n_key})"


class KeyDistillation:
    """Distils the sifted key of a run, block by block, on a worker thread."""

    def __init__(self, cfg, alice_channel, bob_channel, *, extra_leak_bits: int = 0,
                 keystores: tuple[Any, Any] | None = None, on_block=None,
                 rng_seed: int | None = None):
        """``rng_seed``: draw the random choices from this seed (the simulated bench:
        Alice's from the run's seed, Bob's from his role seed, a fresh
        :class:`.distill.SeededRandom` per block, as the two-host session does); None:
        from the operating system."""
        self.cfg = cfg
        self.block_bits = cfg.postprocess.block_bits
        self.min_block_bits = cfg.postprocess.min_block_bits
        params = DistillParams.from_config(cfg, extra_leak_bits=extra_leak_bits)
        self.params = params
        self._seeds = None if rng_seed is None else (rng_seed, role_seed(rng_seed, "bob"))
        self.alice = AliceDistiller(params, alice_channel, secrets.token_bytes)
        self.bob = BobDistiller(params, bob_channel, secrets.token_bytes)
        self._a = SideBuffer.empty()
        self._b = SideBuffer.empty()
        self._next_block = 0
        self.results: list[BlockResult] = []
        self.key_ids: list[str] = []
        self.alarm: str | None = None
        self.error: BaseException | None = None
        self.discarded_bits = 0
        self.keystores = keystores
        #: prefix of the key IDs: when the session started and a random part
        self.session_id = (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-"
                           + secrets.token_hex(4))
        self.on_block = on_block
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="qkdctl-distill")
        self._futures: list[concurrent.futures.Future] = []

    # -- input, from the sifting worker --------------------------------------------------
    def add(self, det, codes: np.ndarray, keep: np.ndarray) -> None:
        """One sifted block: Bob's detections, Alice's codes of them, the keep mask."""
        kz = keep & (det.basis == 0)
        kx = keep & (det.basis == 1)
        # Alice's bits come from her codes, Bob's from his detections; the intensity
        # classes are public (Alice's sifting reply)
        iz = (codes[kz] >> 2).astype(np.uint8)
        ix = (codes[kx] >> 2).astype(np.uint8)
        self._a.add((codes[kz] & 1).astype(np.uint8), iz, (codes[kx] & 1).astype(np.uint8), ix)
        self._b.add(det.bit[kz].astype(np.uint8), iz, det.bit[kx].astype(np.uint8), ix)
        while self._b.n_key >= self.block_bits:
            self._submit(self.block_bits)

    def _submit(self, n: int, last: bool = False) -> None:
        a = self._a.cut(self._next_block, n, last)
        b = self._b.cut(self._next_block, n, last)
        self._next_block += 1
        if self.alarm is not None or self.error is not None:
            self.discarded_bits += n
            return
        self._futures.append(self._worker.submit(self._distil, a, b))

    def _distil(self, a: KeyBlock, b: KeyBlock) -> None:
        if self.alarm is not None or self.error is not None:
            self.discarded_bits += b.key.shape[0]
            return
        if self._seeds is not None:
            self.alice.rng_bytes = block_random(self._seeds[0], "alice", a.block)
            self.bob.rng_bytes = block_random(self._seeds[1], "bob", b.block)
        try:
            res = distill_block(self.alice, self.bob, a, b)
        except BaseException as e:  # reported by finish(); stops later blocks
            self.error = e
            raise
        if res.keys is not None and self.keystores is not None:
            meta = {"block": res.block, "bench": self.cfg.name, "protocol": self.params.protocol,
                    "eps_sec": self.params.eps_sec, "eps_cor": self.params.eps_cor,
                    "digest": res.key_digest}
            eps = self.params.eps_sec + self.params.eps_cor
            key_id = f"{self.session_id}-b{res.block:05d}"
            for store, k in zip(self.keystores, res.keys, strict=True):
                store.add(k, eps, meta, key_id=key_id)
            self.key_ids.append(key_id)
        res.keys = None  # the keys are in the stores (or dropped); never kept in results
        self.results.append(res)
        if res.alarm is not None and self.alarm is None:
            self.alarm = f"block {res.block}: {res.alarm}"
            log.error("TAMPER ALARM: %s", self.alarm)
        elif res.secret_bits:
            log.info("block %d: %d secret bits from %d sifted (QBER %.3f %%, f = %.3f)",
                     res.block, res.secret_bits, res.sifted_bits,
                     100 * res.ec_errors / max(res.key_bits, 1), res.ec_efficiency or math.nan)
        else:
            log.warning("block %d: no secret key: %s", res.block, res.abort_reason)
        if self.on_block is not None:
            self.on_block(res)

    # -- end of run -------------------------------------------------------------------------
    def finish(self) -> None:
        """Distil the last, partial block if it is long enough; wait for all blocks."""
        rest = self._b.n_key
        if rest >= self.min_block_bits:
            self._submit(rest, last=True)
        elif rest:
            self.discarded_bits += rest
            self._a.cut(self._next_block, rest)
            self._b.cut(self._next_block, rest)
        self.wait()

    def wait(self) -> None:
        for f in self._futures:
            f.result()
        self._futures.clear()

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # -- report ----------------------------------------------------------------------------
    def summary(self, duration_s: float) -> dict[str, Any]:
        """The distillation part of the run summary (no key material)."""
        return summarise(self.params, self.results, duration_s, alarm=self.alarm,
                         discarded_bits=self.discarded_bits, key_ids=self.key_ids)


def summarise(params: DistillParams, rs: list[BlockResult], duration_s: float, *,
              alarm: str | None, discarded_bits: int, key_ids: list[str]) -> dict[str, Any]:
    """The distillation part of a summary from the blocks' results (no key material)."""
    secret = sum(r.secret_bits for r in rs)
    leaked = sum(r.ec_leaked_bits for r in rs)
    denom = 0.0
    for r in rs:
        if r.key_bits and r.ec_errors:
            q = r.ec_errors / r.key_bits
            denom += r.key_bits * (-q * math.log2(q) - (1 - q) * math.log2(1 - q))
    phase = [r.finite_key["phase_error_bound"] for r in rs
             if r.finite_key and r.finite_key.get("phase_error_bound") is not None]
    aborted = alarm is not None
    return {
        "protocol": params.protocol,
        "secret_bits": secret,
        "secret_key_rate_bps": secret / duration_s if duration_s > 0 else None,
        "blocks": [r.to_dict() for r in rs],
        "blocks_distilled": len(rs),
        "blocks_with_key": sum(1 for r in rs if r.secret_bits > 0),
        "blocks_failed_verification": sum(1 for r in rs if r.verified is False),
        "undistilled_bits": discarded_bits,
        "ec_leaked_bits": leaked,
        "ec_efficiency": leaked / denom if denom > 0 else None,
        "phase_error_bound": max(phase) if phase else None,
        "eps_sec": params.eps_sec,
        "eps_cor": params.eps_cor,
        "tamper_alarm": aborted,
        "aborted": aborted,
        "abort_reason": alarm,
        "key_ids": list(key_ids),
    }
