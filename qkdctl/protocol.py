"""Alice and Bob, and the messages they exchange over the classical channel.

Sifting for decoy-state BB84, block by block:

1. Bob runs the sifting core on his time tags and announces, for every
   detected pulse, its pulse number and his measurement basis
   (:class:`DetectionAnnouncement`). His bit values stay with him.
2. Alice looks up her choices for exactly those pulses and answers which to
   keep (bases equal). Between two hosts the messages travel compactly coded
   (:class:`CodedAnnouncement`, :class:`CodedReply`) and the reply carries the
   keep flags only: the decoy analysis gets the counts per intensity class from
   Alice during distillation. The plain :class:`SiftingReply`, for tests of the
   roles, also carries the class of every announced pulse.
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

from . import codec, wire
from .errors import ConfigError, QkdctlError
from .sequence import AliceSequence, decode
from .sifting import Detections, Sifter, SiftParams

__all__ = [
    "AliceRole",
    "BobRole",
    "Channel",
    "CodedAnnouncement",
    "CodedReply",
    "ChannelError",
    "DetectionAnnouncement",
    "LocalChannel",
    "SiftCoding",
    "SiftingReply",
    "load_psk",
    "open_channels",
    "read_psk_file",
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
    final: bool = False  # the last block of the run


@wire.message("sift.SiftingReply")
@dataclass(frozen=True)
class SiftingReply:
    """Alice -> Bob: which announced pulses to keep, and their intensity classes."""

    seq: int
    block: int
    keep: np.ndarray        # bool, one per announced pulse
    intensity: np.ndarray   # uint8, one per announced pulse


@wire.message("sift.Announcement")
@dataclass(frozen=True)
class CodedAnnouncement:
    """Bob -> Alice: :class:`DetectionAnnouncement` as it travels, compactly coded.

    ``pulses``: the detected pulse numbers, Rice-coded gaps from ``previous`` (the
    last pulse of the block before, -1 at the start; :func:`qkdctl.codec.encode_pulses`);
    ``bases``: Bob's bases, coded under the public model :class:`SiftCoding`.
    """

    seq: int
    block: int
    previous: int
    pulses: bytes
    bases: bytes
    final: bool


@wire.message("sift.Reply")
@dataclass(frozen=True)
class CodedReply:
    """Alice -> Bob: the keep flags of the announced pulses, coded under the public
    model :class:`SiftCoding`. Unlike :class:`SiftingReply` it does not carry the
    intensity classes: Alice keeps them and sends the distillation's per-class counts
    instead (:class:`qkdctl.postprocess.distill.VerifyTag`), which saves a bit and a
    half per detection on the classical channel."""

    seq: int
    block: int
    count: int
    keep_z: bytes      # keep flags of the pulses Bob measured in Z
    keep_x: bytes      # and in X


@dataclass(frozen=True)
class SiftCoding:
    """The public model both sides code the sifting messages with: Bob's and Alice's
    basis probabilities (from the bench files, which both sides agree on). A keep flag
    is coded knowing Bob's basis: a pulse Bob measured in Z is kept with Alice's
    probability of Z (0.72 bit a flag on the default bench, against 0.90 without the
    context)."""

    z_bob: float
    z_alice: float

    @classmethod
    def from_config(cls, cfg) -> SiftCoding:
        # a model probability must be inside (0, 1): keep the extremes codable
        def inside(p: float) -> float:
            return min(max(p, 1e-6), 1 - 1e-6)
        return cls(inside(cfg.receiver.z_basis_probability),
                   inside(cfg.source.z_basis_probability))

    # each coded with a static-model rANS coder under the public probabilities, within a
    # thousandth of a bit of the entropy (qkdctl.codec)
    def encode_bases(self, bases: np.ndarray) -> bytes:
        return codec.encode_bits(bases, 1.0 - self.z_bob)

    def decode_bases(self, data: bytes, count: int) -> np.ndarray:
        return codec.decode_bits(data, count, 1.0 - self.z_bob)

    def encode_keep(self, keep: np.ndarray, bases: np.ndarray) -> tuple[bytes, bytes]:
        k = keep.view(np.uint8)
        z = bases == 0
        return (codec.encode_bits(k[z], self.z_alice),
                codec.encode_bits(k[~z], 1.0 - self.z_alice))

    def decode_keep(self, keep_z: bytes, keep_x: bytes, bases: np.ndarray) -> np.ndarray:
        z = bases == 0
        keep = np.zeros(bases.shape[0], bool)
        nz = int(np.count_nonzero(z))
        keep[z] = codec.decode_bits(keep_z, nz, self.z_alice).view(bool)
        keep[~z] = codec.decode_bits(keep_x, bases.shape[0] - nz,
                                     1.0 - self.z_alice).view(bool)
        return keep


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

    def __init__(self, params: SiftParams, channel: Channel, window: int = 1,
                 coding: SiftCoding | None = None):
        """``window``: how many announced blocks may wait for Alice's reply at once;
        ``coding``: send the compact :class:`CodedAnnouncement` under this model (None:
        the plain :class:`DetectionAnnouncement`, for tests of the roles)."""
        if window < 1:
            raise ValueError("window must be >= 1")
        self.sifter = Sifter(params)
        self.channel = channel
        self.window = window
        self.coding = coding
        self._last_pulse = -1
        self._seq = 0
        self._block = 0
        self._pending: deque[_Pending] = deque()

    def announce(self, ts: np.ndarray, ch: np.ndarray, final: bool = False) -> Detections:
        """Sift a block of tags and announce its detections; returns them (Bob's copy)."""
        if len(self._pending) >= self.window:
            raise ChannelError("bob: a block is still waiting for Alice's reply")
        det = self.sifter.finish() if final else self.sifter.process(ts, ch)
        if self.coding is None:
            msg = DetectionAnnouncement(self._seq, self._block, det.pulse, det.basis, final)
        else:
            msg = CodedAnnouncement(self._seq, self._block, self._last_pulse,
                                    codec.encode_pulses(det.pulse, self._last_pulse),
                                    self.coding.encode_bases(det.basis), final)
        if det.pulse.size:
            self._last_pulse = int(det.pulse[-1])
        self.channel.send(msg)
        self._seq += 1
        self._pending.append(_Pending(self._block, det))
        self._block += 1
        return det

    def accept(self) -> tuple[Detections, np.ndarray, np.ndarray]:
        """Receive Alice's reply to the oldest pending block.

        Returns (detections, keep mask, intensity classes); the classes are None when
        the reply was a :class:`CodedReply` (Alice keeps them).
        """
        reply = self.channel.recv()
        p = self._pending[0] if self._pending else None
        if not isinstance(reply, SiftingReply | CodedReply) or p is None \
                or reply.block != p.block:
            raise ChannelError("bob: expected Alice's sifting reply to block "
                               f"{None if p is None else p.block}")
        if isinstance(reply, CodedReply):
            reply = self._decode_reply(reply, p)
        if reply.keep.shape != p.det.pulse.shape or (
                reply.intensity is not None and reply.intensity.shape != p.det.pulse.shape):
            raise ChannelError(f"bob: reply to block {p.block} has {reply.keep.shape[0]} "
                               f"entries for {p.det.pulse.shape[0]} announced pulses")
        self._pending.popleft()
        return p.det, reply.keep, reply.intensity

    def _decode_reply(self, reply: CodedReply, p: _Pending) -> SiftingReply:
        n = p.det.pulse.shape[0]
        if self.coding is None or reply.count != n:
            raise ChannelError(f"bob: reply to block {p.block} has {reply.count} entries for "
                               f"{n} announced pulses")
        try:
            keep = self.coding.decode_keep(reply.keep_z, reply.keep_x, p.det.basis)
        except wire.WireError as e:
            raise ChannelError(f"bob: reply to block {p.block} is malformed: {e}") from None
        return SiftingReply(reply.seq, reply.block, keep, None)


class AliceRole:
    """Alice: her sequence of choices, the sifting replies, and her half of the key."""

    def __init__(self, sequence: AliceSequence, channel: Channel,
                 coding: SiftCoding | None = None):
        """``coding``: the model of the compact messages (needed to answer
        :class:`CodedAnnouncement`, which is answered with a :class:`CodedReply`)."""
        self.sequence = sequence
        self.channel = channel
        self.coding = coding
        self._last_pulse = -1
        self._seq = 0
        self.last_codes = np.zeros(0, np.uint8)
        self.last_keep = np.zeros(0, bool)
        self.last_bases = np.zeros(0, np.uint8)
        self.last_pulses = np.zeros(0, np.int64)
        #: the last announcement was the run's last block
        self.finished = False

    def reply(self) -> np.ndarray:
        """Answer Bob's next announcement; returns Alice's codes of the announced pulses."""
        ann = self.channel.recv()
        coded = isinstance(ann, CodedAnnouncement)
        if coded:
            ann = self._decode_announcement(ann)
        elif not isinstance(ann, DetectionAnnouncement):
            raise ChannelError("alice: expected Bob's detection announcement")
        if ann.pulses.shape != ann.bases.shape:
            raise ChannelError(f"alice: announcement of block {ann.block} is malformed")
        codes = self.sequence.codes(ann.pulses)
        basis, _, intensity = decode(codes)
        keep = basis == ann.bases
        if coded:
            self.channel.send(CodedReply(self._seq, ann.block, int(keep.shape[0]),
                                         *self.coding.encode_keep(keep, ann.bases)))
        else:
            self.channel.send(SiftingReply(self._seq, ann.block, keep, intensity))
        self._seq += 1
        self.last_codes = codes
        self.last_keep = keep
        self.last_bases = ann.bases
        self.last_pulses = ann.pulses
        self.finished = bool(ann.final)
        return codes

    def _decode_announcement(self, ann: CodedAnnouncement) -> DetectionAnnouncement:
        if self.coding is None:
            raise ChannelError("alice: a coded announcement, and no coding model")
        if ann.previous != self._last_pulse:
            raise ChannelError(f"alice: announcement of block {ann.block} continues from "
                               f"pulse {ann.previous}, the last one announced was "
                               f"{self._last_pulse}")
        try:
            pulses = codec.decode_pulses(ann.pulses, ann.previous)
            bases = self.coding.decode_bases(ann.bases, pulses.shape[0])
        except wire.WireError as e:
            raise ChannelError(f"alice: announcement of block {ann.block} is malformed: "
                               f"{e}") from None
        if pulses.size:
            self._last_pulse = int(pulses[-1])
        return DetectionAnnouncement(ann.seq, ann.block, pulses, bases, ann.final)


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
    return read_psk_file(name, key, cfg.path)


def read_psk_file(name: str, key: str, cfg_path: str = "") -> bytes:
    """A pre-shared key file: at least 32 bytes, readable by its owner only. ``name`` is
    taken relative to the bench file ``cfg_path``; errors name ``key``."""
    path = Path(name).expanduser()
    if not path.is_absolute() and cfg_path and cfg_path != "<string>":
        path = Path(cfg_path).parent / path
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
