"""The sifting messages as they travel between hosts: coded announcements and replies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_session import bench_tags

from qkdctl import codec, wire
from qkdctl.config import load_bench
from qkdctl.protocol import (
    AliceRole,
    BobRole,
    ChannelError,
    CodedAnnouncement,
    CodedReply,
    LocalChannel,
    SiftCoding,
)
from qkdctl.sequence import AliceSequence, decode
from qkdctl.sifting import SiftParams


@pytest.fixture(scope="module")
def cfg():
    return load_bench()


@pytest.fixture(scope="module")
def tags(cfg):
    return bench_tags(cfg, 31, duration_s=2e-3)


def roles(cfg, coded: bool):
    ch = LocalChannel()
    coding = SiftCoding.from_config(cfg) if coded else None
    alice = AliceRole(AliceSequence.from_config(cfg.source, 31), ch.alice, coding)
    bob = BobRole(SiftParams.from_config(cfg, 31), ch.bob, window=4, coding=coding)
    return ch, alice, bob


def run_blocks(cfg, tags, coded):
    ch, alice, bob = roles(cfg, coded)
    ts, c = tags
    cuts = np.linspace(0, ts.shape[0], 5).astype(int)
    out, sent = [], []
    for i in range(4):
        bob.announce(ts[cuts[i]:cuts[i + 1]], c[cuts[i]:cuts[i + 1]])
        sent.append(ch.bob.peer.inbox[-1])
        codes = alice.reply()
        det, keep, intensity = bob.accept()
        out.append((det.pulse.copy(), codes, keep, intensity))
    return out, sent


def test_coded_messages_carry_exactly_what_the_plain_ones_do(cfg, tags):
    coded, msgs = run_blocks(cfg, tags, True)
    plain, _ = run_blocks(cfg, tags, False)
    assert all(isinstance(m, CodedAnnouncement) for m in msgs)
    for (p1, c1, k1, i1), (p2, c2, k2, i2) in zip(coded, plain, strict=True):
        assert np.array_equal(p1, p2) and np.array_equal(c1, c2)
        assert np.array_equal(k1, k2)
        # the classes stay with Alice (the plain reply, for the roles' tests, has them)
        assert i1 is None and np.array_equal(i2, decode(c2)[2])


def test_coded_messages_are_near_the_entropy(cfg):
    """About 8.36 + 0.72 bits a detection from Bob, 0.72 from Alice."""
    rng = np.random.default_rng(4)
    n = 200_000
    pulses = np.cumsum(rng.geometric(8.6e-3, n)).astype(np.int64)
    bases = (rng.random(n) > 0.8).astype(np.uint8)
    coding = SiftCoding.from_config(cfg)
    ann = CodedAnnouncement(0, 0, -1, codec.encode_pulses(pulses, -1),
                            coding.encode_bases(bases), False)
    bob_bits = 8 * len(wire.encode(ann)) / n
    keep = (rng.random(n) > 0.8).astype(np.uint8) == bases
    alice_bits = 8 * len(wire.encode(CodedReply(0, 0, n, *coding.encode_keep(keep, bases)))) / n
    assert 8.3 + 0.72 < bob_bits < 8.45 + 0.73
    assert 0.715 < alice_bits < 0.735


def test_a_gap_in_the_announcements_is_refused(cfg, tags):
    ch, alice, bob = roles(cfg, True)
    ts, c = tags
    bob.announce(ts[: ts.shape[0] // 2], c[: ts.shape[0] // 2])
    msg = ch.bob.peer.inbox.pop()
    ch.bob.peer.inbox.append(dataclasses.replace(msg, previous=msg.previous + 1))
    with pytest.raises(ChannelError, match="continues from pulse 0"):
        alice.reply()


def test_malformed_coded_messages_are_channel_errors(cfg, tags):
    ch, alice, bob = roles(cfg, True)
    ts, c = tags
    bob.announce(ts, c)
    msg = ch.bob.peer.inbox.pop()
    ch.bob.peer.inbox.append(dataclasses.replace(msg, pulses=msg.pulses[:-1]))
    with pytest.raises(ChannelError, match="malformed"):
        alice.reply()
    ch, alice, bob = roles(cfg, True)
    bob.announce(ts, c)
    alice.reply()
    rep = ch.alice.peer.inbox.pop()
    ch.alice.peer.inbox.append(dataclasses.replace(rep, keep_x=rep.keep_x + b"\0"))
    with pytest.raises(ChannelError, match="malformed"):
        bob.accept()


def test_a_real_bench_keys_alices_sequence_from_the_operating_system(cfg):
    """The seed is printed; on a real bench it must not decide Alice's choices."""
    a = AliceSequence.from_config(cfg.source, 7)
    assert AliceSequence.from_config(cfg.source, 7).key == a.key
    s1 = AliceSequence.from_config(cfg.source, 7, secret=True)
    s2 = AliceSequence.from_config(cfg.source, 7, secret=True)
    assert len({int(a.key), int(s1.key), int(s2.key)}) == 3
