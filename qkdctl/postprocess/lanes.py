"""Distillation on one host: each side's blocks, several in flight at once.

When Alice and Bob run on two hosts each distils its own half of every block
(:class:`AliceLanes`, :class:`BobLanes`). The sifted bits are cut into blocks
exactly as :class:`.stream.KeyDistillation` cuts them (both sides see the same
keep masks and bases, so they cut at the same places), and block ``b`` is
distilled on *lane* ``b mod L`` (``postprocess.blocks_in_flight``): each lane
is a channel of its own with a worker thread on each side. Cascade needs a
round trip per round; with ``L`` lanes, ``L`` blocks wait for their round trips
at the same time, so the network's latency is paid once per ``L`` blocks rather
than once per block.

Per lane and block, Bob drives :class:`.distill.BobDistiller` and Alice
answers with :class:`.distill.AliceDistiller` (the role code of
:func:`.distill.distill_block`), then Bob closes the block with a
:class:`.distill.BlockDone`: the block's figures (no key material). After a
tamper alarm Bob distils no further block and closes each with
``skipped=True``. Keys are committed to each host's key store in block order,
whatever order the lanes finish in, under the same key IDs on both sides,
with a digest of public data (:func:`.distill.key_digest`) by which the two
stores are compared when the sides next meet.

On the simulated bench the random choices of block ``b`` come from
:func:`.stream.block_random`, as in the one-process session, so both layouts
give the same secret key.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
from typing import Any

import numpy as np

from .distill import (
    AliceDistiller,
    BlockDone,
    BlockResult,
    BobDistiller,
    DistillParams,
    KeyBlock,
    ProtocolError,
)
from .stream import SideBuffer, block_random, summarise

__all__ = ["AliceLanes", "BobLanes"]

log = logging.getLogger(__name__)


class _Lanes:
    """What both sides share: the buffer, the cut, the lanes, the ordered commit."""

    role = "?"

    def __init__(self, cfg, channels, *, keystore=None, key_prefix: str,
                 rng_seed: int | None = None, extra_leak_bits: int = 0, meta=None):
        self.cfg = cfg
        self.params = DistillParams.from_config(cfg, extra_leak_bits=extra_leak_bits)
        self.block_bits = cfg.postprocess.block_bits
        self.min_block_bits = cfg.postprocess.min_block_bits
        self.keystore = keystore
        self.key_prefix = key_prefix
        self.rng_seed = rng_seed
        self.meta = dict(meta or {})
        self.buffer = SideBuffer.empty()
        self.next_block = 0
        self.discarded_bits = 0
        self.results: dict[int, BlockResult] = {}
        self.key_ids: list[str] = []
        self.alarm: str | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._keys: dict[int, tuple[np.ndarray, str] | None] = {}
        self._next_commit = 0
        self._queues = [queue.Queue() for _ in channels]
        self._threads = [threading.Thread(target=self._lane, args=(i, ch, q), daemon=True,
                                          name=f"qkdctl-{self.role}-lane{i}")
                         for i, (ch, q) in enumerate(zip(channels, self._queues, strict=True))]
        for t in self._threads:
            t.start()

    # -- input ------------------------------------------------------------------------
    def _cut_full_blocks(self) -> None:
        while self.buffer.n_key >= self.block_bits:
            self._submit(self.block_bits)

    def _submit(self, n: int, last: bool = False) -> None:
        blk = self.buffer.cut(self.next_block, n, last)
        self._queues[self.next_block % len(self._queues)].put(blk)
        self.next_block += 1

    def finish(self) -> None:
        """After the last sifted block: the last, partial block if it is long enough, then
        wait for every lane."""
        rest = self.buffer.n_key
        if rest >= self.min_block_bits:
            self._submit(rest, last=True)
        elif rest:
            self._discard(rest)
            self.buffer.cut(self.next_block, rest)
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop the lanes without waiting for them (the link is being closed)."""
        for q in self._queues:
            q.put(None)

    # -- lanes ------------------------------------------------------------------------
    def _lane(self, i: int, channel, q: queue.Queue) -> None:
        while True:
            blk = q.get()
            if blk is None:
                return
            if self.error is not None:
                continue
            try:
                res, key, digest = self._distil(channel, blk)
                self._record(res, key, digest)
            except BaseException as e:  # reported by finish(); the session stops
                with self._lock:
                    if self.error is None:
                        self.error = e
                log.error("%s lane %d: block %d: %s", self.role, i, blk.block, e)

    def _random(self, block: int):
        if self.rng_seed is None:
            return secrets.token_bytes
        return block_random(self.rng_seed, self.role, block)

    def _record(self, res: BlockResult, key, digest) -> None:
        """Keep the figures; commit the keys in block order, none after a block that
        raised a tamper alarm (a later block may have finished first on another lane;
        both sides drop it alike, since both commit in block order)."""
        with self._lock:
            self.results[res.block] = res
            if res.alarm is not None and self.alarm is None:
                self.alarm = f"block {res.block}: {res.alarm}"
                log.error("TAMPER ALARM: %s", self.alarm)
            self._keys[res.block] = None if key is None else (key, digest)
            while self._next_commit in self._keys:
                b = self._next_commit
                item = self._keys.pop(b)
                if res_alarm_before(self.results, b):
                    done = self.results[b]
                    if item is not None or done.secret_bits:
                        self.discarded_bits += done.sifted_bits
                        done.secret_bits, done.key_digest = 0, None
                        done.abort_reason = "not kept: an earlier block raised a tamper alarm"
                elif item is not None:
                    self._commit(b, *item)
                self._next_commit += 1
            self._done.notify_all()

    def _discard(self, bits: int) -> None:
        with self._lock:
            self.discarded_bits += bits

    def _commit(self, block: int, key: np.ndarray, digest: str) -> None:
        key_id = f"{self.key_prefix}-b{block:05d}"
        if self.keystore is not None:
            self.key_ids.append(key_id)
            meta = {**self.meta, "block": block, "protocol": self.params.protocol,
                    "eps_sec": self.params.eps_sec, "eps_cor": self.params.eps_cor,
                    "digest": digest}
            self.keystore.add(key, self.params.eps_sec + self.params.eps_cor, meta,
                              key_id=key_id)

    # -- report -----------------------------------------------------------------------
    def results_so_far(self) -> list[BlockResult]:
        """The blocks finished so far, in block order."""
        with self._lock:
            return [self.results[b] for b in sorted(self.results)]

    def summary(self, duration_s: float) -> dict[str, Any]:
        return summarise(self.params, self.results_so_far(), duration_s, alarm=self.alarm,
                         discarded_bits=self.discarded_bits, key_ids=self.key_ids)


class BobLanes(_Lanes):
    """Bob's half: his bits, the decisions, Cascade's driver."""

    role = "bob"

    def add(self, det, keep: np.ndarray) -> None:
        """One sifted block: Bob's detections and Alice's keep mask (Bob does not learn
        the intensity classes: Alice sends each block's counts per class)."""
        kz = keep & (det.basis == 0)
        kx = keep & (det.basis == 1)
        z, x = det.bit[kz].astype(np.uint8), det.bit[kx].astype(np.uint8)
        self.buffer.add(z, np.zeros_like(z), x, np.zeros_like(x))
        self._cut_full_blocks()

    def _distil(self, channel, blk: KeyBlock):
        if self.alarm is not None:
            self._discard(blk.key.shape[0])
            channel.send(BlockDone(blk.block, True, "{}"))
            res = BlockResult(block=blk.block, sifted_bits=int(blk.key.shape[0]),
                              test_bits=int(blk.test_bits.shape[0]), aborted=True,
                              abort_reason="not distilled after a tamper alarm")
            return res, None, None
        bob = BobDistiller(self.params, channel, self._random(blk.block))
        res, key = bob.run(blk)
        channel.send(BlockDone(blk.block, False, json.dumps(res.to_dict())))
        return res, key, res.key_digest


class AliceLanes(_Lanes):
    """Alice's half: her bits, the answers, the sample, hash and seed she draws."""

    role = "alice"

    def add(self, codes: np.ndarray, keep: np.ndarray) -> None:
        """One sifted block: Alice's codes of the announced pulses and the keep mask."""
        basis = (codes >> 1) & 1
        kz = keep & (basis == 0)
        kx = keep & (basis == 1)
        iz = (codes[kz] >> 2).astype(np.uint8)
        ix = (codes[kx] >> 2).astype(np.uint8)
        self.buffer.add((codes[kz] & 1).astype(np.uint8), iz,
                        (codes[kx] & 1).astype(np.uint8), ix)
        self._cut_full_blocks()

    def _distil(self, channel, blk: KeyBlock):
        first = channel.recv()
        if isinstance(first, BlockDone):
            if not first.skipped or first.block != blk.block:
                raise ProtocolError(f"alice: block {blk.block}: unexpected outcome from Bob")
            self._discard(blk.key.shape[0])
            res = BlockResult(block=blk.block, sifted_bits=int(blk.key.shape[0]),
                              test_bits=int(blk.test_bits.shape[0]), aborted=True,
                              abort_reason="not distilled after a tamper alarm")
            return res, None, None
        alice = AliceDistiller(self.params, _Pushback(channel, first),
                               self._random(blk.block))
        for _ in alice.steps(blk):
            pass
        done = channel.recv()
        if not isinstance(done, BlockDone) or done.block != blk.block or done.skipped:
            raise ProtocolError(f"alice: block {blk.block}: expected Bob's outcome of the "
                                f"block, got {type(done).__name__}")
        res = _result_from_json(done.result_json, blk.block)
        if (alice.key is None) != (res.secret_bits == 0) or (
                alice.key is not None and (alice.key.shape[0] != res.secret_bits
                                           or alice.key_digest != res.key_digest)):
            raise ProtocolError(f"alice: block {blk.block}: Bob's outcome ({res.secret_bits} "
                                "secret bits) does not match Alice's")
        return res, alice.key, alice.key_digest


def res_alarm_before(results: dict[int, BlockResult], block: int) -> bool:
    """Whether a block before ``block`` raised a tamper alarm (all are known: the
    commits go in block order)."""
    return any(r.alarm is not None for b, r in results.items() if b < block)


class _Pushback:
    """A channel that returns one message already received before the rest."""

    def __init__(self, channel, first):
        self.channel = channel
        self._first = [first]

    def send(self, msg) -> None:
        self.channel.send(msg)

    def recv(self):
        return self._first.pop() if self._first else self.channel.recv()


def _result_from_json(text: str, block: int) -> BlockResult:
    try:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("block") != block:
            raise ValueError("wrong block")
        return BlockResult(**d)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"alice: block {block}: Bob's outcome is malformed ({e})") from None
