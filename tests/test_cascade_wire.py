"""Cascade's requests and replies as they travel (qkdctl.postprocess.cascade_wire)."""

from __future__ import annotations

import numpy as np
import pytest

from qkdctl import wire
from qkdctl.postprocess import cascade
from qkdctl.postprocess.cascade_wire import (
    CodedParityReply,
    CompactCascadeChannel,
    decode_request,
    encode_request,
)
from qkdctl.protocol import LocalChannel


def request(passes, starts, ends) -> cascade.ParityRequest:
    return cascade.ParityRequest(np.array(passes, np.int32), np.array(starts, np.int64),
                                 np.array(ends, np.int64))


def same(a: cascade.ParityRequest, b: cascade.ParityRequest) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f))
               for f in ("pass_index", "start", "end"))


@pytest.mark.parametrize("req", [
    request([], [], []),
    request([0], [0], [1]),
    request([0, 0, 0, 3, 3, 63], [0, 0, 64, 5, 2**40, 7], [32, 16, 96, 6, 2**41, 8]),
])
def test_requests_round_trip_through_the_wire(req):
    coded = wire.decode(wire.encode(encode_request(req)))
    assert same(decode_request(coded), req)


def test_every_request_of_a_real_reconciliation_round_trips_and_is_small():
    rng = np.random.default_rng(3)
    n = 1 << 17
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = a ^ (rng.random(n) < 0.02).astype(np.uint8)
    alice, bob = cascade.CascadeAlice(a), cascade.CascadeBob(b, 0.02, 99)
    reply = alice.handle(bob.start())
    plain = coded = ranges = 0
    while (req := bob.next_request(reply)) is not None:
        c = encode_request(req)
        assert same(decode_request(wire.decode(wire.encode(c))), req)
        plain += len(wire.encode(req))
        coded += len(wire.encode(c))
        ranges += req.start.shape[0]
        reply = alice.handle(req)
    assert coded < plain / 3
    assert 8 * coded / ranges < 40


def test_unsorted_or_empty_ranges_are_refused():
    with pytest.raises(ValueError, match="not sorted"):
        encode_request(request([1, 0], [0, 0], [1, 1]))
    with pytest.raises(ValueError, match="empty"):
        encode_request(request([0], [5], [5]))


def test_malformed_coded_requests_raise_wire_errors():
    good = encode_request(request([0, 2], [0, 8], [4, 12]))
    for bad in (
        type(good)(good.passes[::-1].copy(), good.counts, good.starts, good.lengths),
        type(good)(good.passes, good.counts + 1, good.starts, good.lengths),
        type(good)(good.passes, good.counts, good.starts[:1], good.lengths),
        type(good)(good.passes, good.counts, good.starts, good.lengths[:-1]),
        type(good)(np.array([0, 64], np.uint8), good.counts, good.starts, good.lengths),
    ):
        with pytest.raises(wire.WireError):
            decode_request(bad)


def test_the_channel_codes_requests_and_replies_and_passes_the_rest():
    ch = LocalChannel()

    class Seq:  # LocalChannel numbers messages; the coded ones carry no number
        def __init__(self, end):
            self.end = end

        def send(self, msg):
            self.end.inbox.append(msg)

        def recv(self):
            return self.end.inbox.popleft()

    alice, bob = CompactCascadeChannel(Seq(ch.alice)), CompactCascadeChannel(Seq(ch.bob))
    req = request([0, 1], [0, 10], [8, 12])
    bob.send(req)
    assert type(ch.bob.inbox[0]).__name__ == "CodedParityRequest"
    got = CompactCascadeChannel(Seq(ch.bob)).recv()
    assert same(got, req)
    alice.send(cascade.ParityReply(np.array([1, 0, 1], np.uint8)))
    assert isinstance(ch.alice.inbox[0], CodedParityReply)
    assert list(CompactCascadeChannel(Seq(ch.alice)).recv().parities) == [1, 0, 1]
    start = cascade.CascadeStart(10, np.array([2, 4], np.int64), 5)
    bob.send(start)
    assert CompactCascadeChannel(Seq(ch.bob)).recv() is start
