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

The roles talk only through a :class:`Channel`: in a session, an
:class:`~qkdctl.auth.AuthenticatedEndpoint` (:func:`open_channels`), which
encodes each message (:mod:`qkdctl.wire`), numbers and authenticates it, and
refuses a tampered, replayed, reordered or truncated one.
:class:`LocalChannel` keeps both ends in one process without authentication
(for tests of the roles alone); it too refuses messages out of order.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import wire
from .errors import ConfigError, QkdctlError
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
    "load_psk",
    "open_channels",
]


class ChannelError(QkdctlError):
    """A classical-channel message is missing, out of order, or malformed."""


@wire.message("sift.DetectionAnnouncement")
@dataclass(frozen=True)
class DetectionAnnouncement:
    """Bob -> Alice: the pulses Bob detected in one block and his bases."""

    seq: int
    block: int
    pulses: np.ndarray   # int64, ascending
    bases: np.ndarray    # uint8, 0 = Z, 1 = X


@wire.message("sift.SiftingReply")
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


# ------------------------------------------------------------------ authenticated channels
PSK_MIN_BYTES = 32


def load_psk(cfg, *, allow_fresh: bool) -> bytes:
    """The pre-shared authentication key of the bench (``postprocess.psk_file``).

    The file must hold at least 32 bytes and be readable by its owner only. With
    no file named, a fresh random key is made for the session when
    ``allow_fresh`` (both roles in this process: the simulated bench, a replay);
    otherwise that is a configuration error.
    """
    name = cfg.postprocess.psk_file
    key = f"{cfg.path}: postprocess.psk_file"
    if not name:
        if allow_fresh:
            return secrets.token_bytes(PSK_MIN_BYTES)
        raise ConfigError(f"{key}: missing; a real bench authenticates its classical channel "
                          "with a pre-shared key: name a file of at least 32 random bytes")
    path = Path(name).expanduser()
    if not path.is_absolute() and cfg.path and cfg.path != "<string>":
        path = Path(cfg.path).parent / path
    try:
        st = os.stat(path)
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}: {path}: cannot read: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{key}: {path} is accessible to group or others "
                          f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    if len(data) < PSK_MIN_BYTES:
        raise ConfigError(f"{key}: {path} holds {len(data)} bytes; a pre-shared key needs "
                          f"at least {PSK_MIN_BYTES}")
    return data


def open_channels(cfg, labels=("sifting", "distillation"), *, psk: bytes,
                  keystores=None) -> dict[str, tuple[Channel, Channel]]:
    """Authenticated (Alice end, Bob end) pairs, one per label, in this process.

    ``postprocess.auth`` chooses HMAC-SHA256 under the pre-shared key, or
    Wegman-Carter: a polynomial hash keyed from the pre-shared key, its tags
    encrypted with one-time pads taken from each side's key store
    (``keystores = (alice's, bob's)``). Each channel has a fresh session id,
    so that a frame of one channel or session is refused on another.
    """
    from .auth import AuthenticatedEndpoint, HmacSha256, LocalTransport, WegmanCarter

    method = cfg.postprocess.auth
    if method == "wegman-carter" and keystores is None:
        raise ConfigError(f"{cfg.path}: postprocess.auth: 'wegman-carter' takes its tag pads "
                          "from the key store; this run has none")
    out = {}
    for label in labels:
        sid = label.encode() + b":" + secrets.token_bytes(16)
        if method == "hmac-sha256":
            auths = (HmacSha256(psk), HmacSha256(psk))
        else:
            hk = hmac.new(psk, b"qkdctl wegman-carter hash key", hashlib.sha256).digest()[:16]
            auths = (WegmanCarter(hk, keystores[0]), WegmanCarter(hk, keystores[1]))
        ta, tb = LocalTransport.pair()
        out[label] = (AuthenticatedEndpoint(ta, auths[0], "alice", sid),
                      AuthenticatedEndpoint(tb, auths[1], "bob", sid))
    return out
