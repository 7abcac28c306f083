"""Cascade's messages as they travel: compact codes for the parity requests and replies.

:class:`~.cascade.ParityRequest` names each range Bob asks about by pass,
start and end (20 bytes a range as plain arrays) and
:class:`~.cascade.ParityReply` carries one parity per byte; together they
were most of the classical traffic of a two-host link. Here a request is
sent as :class:`CodedParityRequest`: the passes present with how many ranges
each, the starts of each pass as Rice-coded gaps (:func:`qkdctl.codec.encode_pulses`;
the requests of a round are sorted by pass, then start) and the lengths as
Rice-coded values; a reply as :class:`CodedParityReply`, one bit a parity.
About 1.5 bytes a range instead of 21.

:class:`CompactCascadeChannel` wraps a channel: the distillers send and
receive the plain messages, the wire carries the coded ones. Decoding is
strict: a malformed coded message raises :class:`~qkdctl.wire.WireError`, as
any malformed message does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import codec, wire
from . import cascade
from .cascade import MAX_PASSES, ParityReply, ParityRequest

__all__ = ["CodedParityReply", "CodedParityRequest", "CompactCascadeChannel", "decode_request",
           "encode_request"]


for _cls in (cascade.CascadeStart, cascade.ParityRequest, cascade.ParityReply):
    wire.register(_cls, "cascade." + _cls.__name__)


@wire.message("cascade.CodedParityRequest")
@dataclass(frozen=True)
class CodedParityRequest:
    """A :class:`~.cascade.ParityRequest`: ``passes[i]`` holds ``counts[i]`` ranges, whose
    starts are ``starts[i]`` (coded, see :func:`encode_request`); ``lengths`` codes all
    the ranges' lengths in order."""

    passes: np.ndarray      # uint8, ascending
    counts: np.ndarray      # int64
    starts: tuple           # bytes per pass
    lengths: bytes


@wire.message("cascade.CodedParityReply")
@dataclass(frozen=True)
class CodedParityReply:
    """A :class:`~.cascade.ParityReply`: ``count`` parities, one bit each."""

    count: int
    parities: bytes


def encode_request(req: ParityRequest) -> CodedParityRequest:
    """Code a request whose ranges are sorted by (pass, start), as Bob sends them.

    Starts of a pass ``s_0 <= s_1 <= ...`` are coded as the strictly ascending
    ``s_j + j`` (Rice gaps from -1); lengths ``l >= 1`` as the gaps of their
    running sum.
    """
    p = np.asarray(req.pass_index, np.int64)
    start = np.asarray(req.start, np.int64)
    end = np.asarray(req.end, np.int64)
    n = p.shape[0]
    if not (start.shape == end.shape == (n,)):
        raise ValueError("pass_index, start and end differ in length")
    length = end - start
    if n and (length.min() < 1 or start.min() < 0 or p.min() < 0 or p.max() >= MAX_PASSES):
        raise ValueError("a range is empty, negative or in no pass")
    if n > 1 and np.any((np.diff(p) < 0) | ((np.diff(p) == 0) & (np.diff(start) < 0))):
        raise ValueError("ranges are not sorted by (pass, start)")
    passes, first, counts = np.unique(p, return_index=True, return_counts=True)
    starts = tuple(codec.encode_pulses(start[a:a + c] + np.arange(c), -1)
                   for a, c in zip(first, counts, strict=True))
    return CodedParityRequest(passes.astype(np.uint8), counts.astype(np.int64), starts,
                              codec.encode_pulses(np.cumsum(length) - 1, -1))


def decode_request(msg: CodedParityRequest) -> ParityRequest:
    passes, counts = msg.passes, msg.counts
    if (passes.ndim != 1 or counts.shape != passes.shape or len(msg.starts) != passes.shape[0]
            or (passes.size and (np.any(np.diff(passes.astype(np.int64)) <= 0)
                                 or passes.max() >= MAX_PASSES or counts.min() < 1))):
        raise wire.WireError("coded parity request: malformed pass list")
    parts = []
    for c, data in zip(counts, msg.starts, strict=True):
        if not isinstance(data, bytes):
            raise wire.WireError("coded parity request: starts are not bytes")
        x = codec.decode_pulses(data, -1)
        if x.shape[0] != c:
            raise wire.WireError(f"coded parity request: {x.shape[0]} starts for {c} ranges")
        parts.append(x - np.arange(c))
    start = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    cum = codec.decode_pulses(msg.lengths, -1)
    if cum.shape != start.shape:
        raise wire.WireError(f"coded parity request: {cum.shape[0]} lengths for "
                             f"{start.shape[0]} ranges")
    length = np.diff(cum + 1, prepend=0)
    if start.size and int(start.max()) > np.iinfo(np.int64).max - int(length.max()):
        raise wire.WireError("coded parity request: a range ends beyond int64")
    pass_index = np.repeat(passes.astype(np.int32), counts)
    return ParityRequest(pass_index, start, start + length)


class CompactCascadeChannel:
    """A channel on which Cascade's requests and replies travel coded."""

    def __init__(self, channel):
        self.channel = channel

    def send(self, msg) -> None:
        if isinstance(msg, ParityRequest):
            msg = encode_request(msg)
        elif isinstance(msg, ParityReply):
            bits = np.asarray(msg.parities, np.uint8)
            msg = CodedParityReply(int(bits.shape[0]), codec.pack_bases(bits))
        self.channel.send(msg)

    def recv(self):
        msg = self.channel.recv()
        if isinstance(msg, CodedParityRequest):
            return decode_request(msg)
        if isinstance(msg, CodedParityReply):
            try:
                return ParityReply(codec.unpack_bases(msg.parities, msg.count))
            except (ValueError, TypeError) as e:
                raise wire.WireError(f"coded parity reply: {e}") from None
        return msg
