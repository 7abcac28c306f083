"""Alice and Bob, and the messages they exchange over the classical channel.

Sifting for decoy-state BB84, block by block:

1. Bob runs the sifting core on his time tags and announces, for every
   detected pulse, its pulse number and his measurement basis
   (:class:`DetectionAnnouncement`). His bit values stay with him.
2. Alice looks up her choices for exactly those pulses and answers which to
   keep (bases equal) and, as decoy-state BB84 requires, the intensity class
   of every announced pulse (:class:`SiftingReply`).
3. Both keep the bits of the kept pulses: the sifted key (Z basis) and the
   test bits (X basis).

The roles talk only through a :class:`Channel`. :class:`LocalChannel` keeps
both ends in one process; every message carries a sequence number and the
receiver refuses a message out of order. Authentication of the channel is a
separate layer on top of this one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .errors import QkdctlError
from .sequence import AliceSequence, decode
from .sifting import Detections, Sifter, SiftParams

__all__ = [
    "AliceRole",
    "BobRole",
    "Channel",
    "ChannelError",
    "DetectionAnnouncement",
    "LocalChannel",
    "SiftingReply",
]


class ChannelError(QkdctlError):
    """A classical-channel message is missing, out of order, or malformed."""


@dataclass(frozen=True)
class DetectionAnnouncement:
    """Bob -> Alice: the pulses Bob detected in one block and his bases."""

    seq: int
    block: int
    pulses: np.ndarray   # int64, ascending
    bases: np.ndarray    # uint8, 0 = Z, 1 = X


@dataclass(frozen=True)
class SiftingReply:
    """Alice -> Bob: which announced pulses to keep, and their intensity classes."""

    seq: int
    block: int
    keep: np.ndarray        # bool, one per announced pulse
    intensity: np.ndarray   # uint8, one per announced pulse


class Channel:
    """Interface of the classical channel seen by one role."""

    def send(self, msg) -> None:
        raise NotImplementedError

    def recv(self):
        raise NotImplementedError


class LocalChannel:
    """Both ends of an in-process classical channel: ``alice`` and ``bob`` endpoints."""

    class _End(Channel):
        def __init__(self, name: str):
            self.name = name
            self.inbox: deque = deque()
            self.peer: LocalChannel._End | None = None
            self.sent = 0
            self.received = 0

        def send(self, msg) -> None:
            if msg.seq != self.sent:
                raise ChannelError(f"{self.name}: message numbered {msg.seq}, expected "
                                   f"{self.sent}")
            self.sent += 1
            self.peer.inbox.append(msg)

        def recv(self):
            if not self.inbox:
                raise ChannelError(f"{self.name}: no message from the other side")
            msg = self.inbox.popleft()
            if msg.seq != self.received:
                raise ChannelError(f"{self.name}: received message {msg.seq}, expected "
                                   f"{self.received} (reordered or replayed)")
            self.received += 1
            return msg

    def __init__(self):
        self.alice = LocalChannel._End("alice")
        self.bob = LocalChannel._End("bob")
        self.alice.peer = self.bob
        self.bob.peer = self.alice


@dataclass
class _Pending:
    block: int
    det: Detections


class BobRole:
    """Bob: the sifting core on his tags, announcements, and his half of the key."""

    def __init__(self, params: SiftParams, channel: Channel, window: int = 1):
        """``window``: how many announced blocks may wait for Alice's reply at once."""
        if window < 1:
            raise ValueError("window must be >= 1")
        self.sifter = Sifter(params)
        self.channel = channel
        self.window = window
        self._seq = 0
        self._block = 0
        self._pending: deque[_Pending] = deque()

    def announce(self, ts: np.ndarray, ch: np.ndarray, final: bool = False) -> Detections:
        """Sift a block of tags and announce its detections; returns them (Bob's copy)."""
        if len(self._pending) >= self.window:
            raise ChannelError("bob: a block is still waiting for Alice's reply")
        det = self.sifter.finish() if final else self.sifter.process(ts, ch)
        self.channel.send(DetectionAnnouncement(self._seq, self._block, det.pulse, det.basis))
        self._seq += 1
        self._pending.append(_Pending(self._block, det))
        self._block += 1
        return det

    def accept(self) -> tuple[Detections, np.ndarray, np.ndarray]:
        """Receive Alice's reply to the oldest pending block.

        Returns (detections, keep mask, intensity classes).
        """
        reply = self.channel.recv()
        p = self._pending[0] if self._pending else None
        if not isinstance(reply, SiftingReply) or p is None or reply.block != p.block:
            raise ChannelError("bob: expected Alice's sifting reply to block "
                               f"{None if p is None else p.block}")
        if reply.keep.shape != p.det.pulse.shape or reply.intensity.shape != p.det.pulse.shape:
            raise ChannelError(f"bob: reply to block {p.block} has {reply.keep.shape[0]} "
                               f"entries for {p.det.pulse.shape[0]} announced pulses")
        self._pending.popleft()
        return p.det, reply.keep, reply.intensity


class AliceRole:
    """Alice: her sequence of choices, the sifting replies, and her half of the key."""

    def __init__(self, sequence: AliceSequence, channel: Channel):
        self.sequence = sequence
        self.channel = channel
        self._seq = 0
        self.last_codes = np.zeros(0, np.uint8)

    def reply(self) -> np.ndarray:
        """Answer Bob's next announcement; returns Alice's codes of the announced pulses."""
        ann = self.channel.recv()
        if not isinstance(ann, DetectionAnnouncement):
            raise ChannelError("alice: expected Bob's detection announcement")
        if ann.pulses.shape != ann.bases.shape:
            raise ChannelError(f"alice: announcement of block {ann.block} is malformed")
        codes = self.sequence.codes(ann.pulses)
        basis, _, intensity = decode(codes)
        keep = basis == ann.bases
        self.channel.send(SiftingReply(self._seq, ann.block, keep, intensity))
        self._seq += 1
        self.last_codes = codes
        return codes
