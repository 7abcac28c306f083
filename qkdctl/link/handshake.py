"""The opening of every TCP connection between Alice's and Bob's hosts.

A mutual challenge-response under the pre-shared key, before any message of
the session is read. Alice listens, Bob connects::

    Alice -> Bob   CHALLENGE  magic "QKDL", version, nonce_a (32 bytes)
    Bob -> Alice   HELLO      magic, version, 0, nonce_b (32), link id (16),
                              frames Bob has received (u64), mac_b (32)
    Alice -> Bob   WELCOME    magic, version, status, link id (16),
                              frames Alice has received (u64), mac_a (32)

``mac_b = HMAC-SHA256(k, "hello" | nonce_a | nonce_b | link id | count)`` and
``mac_a = HMAC-SHA256(k, "welcome" | nonce_a | nonce_b | status | link id |
count)``, with ``k = HMAC-SHA256(psk, "qkdctl link handshake v1")``; both sides
prove the key on fresh nonces, so a recorded handshake cannot be replayed. A
link id of zeros asks for a new session (Alice draws its id from both
nonces); any other resumes the session of that id after a dropped connection,
and the two counts say which frames each side must send again
(:mod:`.mux`).

Status: 0 accepted, 1 authentication failed (Bob's mac is wrong: a different
pre-shared key), 2 busy (another session is running), 3 unknown session (a
resume for a session Alice does not have). Whatever is not this exchange --
other bytes, a truncated frame, silence past the handshake timeout -- is not a
qkdctl peer: Alice drops the connection, logs it, and goes on listening.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

from ..auth import AuthenticationError, TcpTransport, TransportError

__all__ = [
    "HandshakeError",
    "Hello",
    "LinkRefused",
    "challenge",
    "check_hello",
    "connect_handshake",
    "handshake_key",
    "welcome",
]

MAGIC = b"QKDL"
VERSION = 1
NONCE_BYTES = 32
LINK_ID_BYTES = 16
NEW_LINK = bytes(LINK_ID_BYTES)

_CHALLENGE = struct.Struct("<4sB32s")
_HELLO = struct.Struct("<4sBB32s16sQ32s")
_WELCOME = struct.Struct("<4sBB16sQ32s")

OK, AUTH_FAILED, BUSY, UNKNOWN_LINK = 0, 1, 2, 3
_STATUS_TEXT = {AUTH_FAILED: "authentication failed (the pre-shared keys differ)",
                BUSY: "another session is running there",
                UNKNOWN_LINK: "it has no session to resume (it was restarted)"}


class HandshakeError(TransportError):
    """The peer does not speak the qkdctl link handshake (dropped, not fatal)."""


class LinkRefused(TransportError):
    """Alice refused the connection (busy, or a session she does not know)."""


def handshake_key(psk: bytes) -> bytes:
    return hmac.new(psk, b"qkdctl link handshake v1", hashlib.sha256).digest()


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class Hello:
    """Bob's hello as Alice received it (authenticated)."""

    nonce_a: bytes
    nonce_b: bytes
    link_id: bytes
    received: int


def challenge(conn: TcpTransport) -> bytes:
    """Alice: send the challenge; returns her nonce."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    conn.send_bytes(_CHALLENGE.pack(MAGIC, VERSION, nonce))
    return nonce


def check_hello(conn: TcpTransport, key: bytes, nonce_a: bytes) -> Hello:
    """Alice: read and authenticate Bob's hello.

    :class:`HandshakeError` if it is not a qkdctl hello at all;
    :class:`~qkdctl.auth.AuthenticationError` if it is one whose mac is wrong
    (Alice answers ``AUTH_FAILED`` first, so that Bob knows why).
    """
    try:
        frame = conn.recv_bytes()
    except TransportError as e:
        raise HandshakeError(f"no hello: {e}") from None
    if len(frame) != _HELLO.size or frame[:4] != MAGIC:
        raise HandshakeError(f"not a qkdctl hello ({len(frame)} bytes, starting "
                             f"{frame[:4]!r})")
    magic, version, flags, nonce_b, link_id, received, mac = _HELLO.unpack(frame)
    if version != VERSION or flags:
        raise HandshakeError(f"link protocol version {version} (flags {flags}); this is "
                             f"version {VERSION}")
    good = _mac(key, b"hello", nonce_a, nonce_b, link_id, struct.pack("<Q", received))
    if not hmac.compare_digest(good, mac):
        try:
            welcome(conn, key, Hello(nonce_a, nonce_b, link_id, received), AUTH_FAILED,
                    NEW_LINK, 0)
        except TransportError:
            pass
        raise AuthenticationError("the peer's hello failed authentication: the two hosts' "
                                  "pre-shared keys differ (or the peer is not the other side "
                                  "of this link)")
    return Hello(nonce_a, nonce_b, link_id, received)


def welcome(conn: TcpTransport, key: bytes, hello: Hello, status: int, link_id: bytes,
            received: int) -> None:
    """Alice: answer a hello (``status`` OK with the session's link id)."""
    mac = (_mac(key, b"welcome", hello.nonce_a, hello.nonce_b, bytes([status]), link_id,
                struct.pack("<Q", received)) if status != AUTH_FAILED else bytes(32))
    conn.send_bytes(_WELCOME.pack(MAGIC, VERSION, status, link_id, received, mac))


def new_link_id(hello: Hello) -> bytes:
    return hashlib.sha256(b"qkdctl link id" + hello.nonce_a + hello.nonce_b).digest()[
        :LINK_ID_BYTES]


def connect_handshake(conn: TcpTransport, key: bytes, link_id: bytes,
                      received: int) -> tuple[bytes, int, bytes, bytes]:
    """Bob: answer Alice's challenge and check her welcome.

    Returns (link id, frames Alice has received, nonce_a, nonce_b). Raises
    :class:`~qkdctl.auth.AuthenticationError` if Alice's answer is not
    authentic or she says Bob's was not, :class:`LinkRefused` if she refuses
    for another reason, :class:`HandshakeError` if what answers is not a qkdctl
    host.
    """
    try:
        frame = conn.recv_bytes()
    except TransportError as e:
        raise HandshakeError(f"no challenge from {conn.peer}: {e}") from None
    if len(frame) != _CHALLENGE.size or frame[:4] != MAGIC:
        raise HandshakeError(f"{conn.peer} is not a qkdctl link (its first frame is "
                             f"{len(frame)} bytes)")
    _, version, nonce_a = _CHALLENGE.unpack(frame)
    if version != VERSION:
        raise HandshakeError(f"{conn.peer} speaks link protocol version {version}; this is "
                             f"version {VERSION}")
    nonce_b = secrets.token_bytes(NONCE_BYTES)
    mac = _mac(key, b"hello", nonce_a, nonce_b, link_id, struct.pack("<Q", received))
    conn.send_bytes(_HELLO.pack(MAGIC, VERSION, 0, nonce_b, link_id, received, mac))
    try:
        frame = conn.recv_bytes()
    except TransportError as e:
        raise HandshakeError(f"no welcome from {conn.peer}: {e}") from None
    if len(frame) != _WELCOME.size or frame[:4] != MAGIC:
        raise HandshakeError(f"{conn.peer}: malformed welcome ({len(frame)} bytes)")
    _, version, status, got_id, peer_received, mac = _WELCOME.unpack(frame)
    if status == AUTH_FAILED:
        raise AuthenticationError(f"{conn.peer} refused our authentication: "
                                  f"{_STATUS_TEXT[AUTH_FAILED]}")
    good = _mac(key, b"welcome", nonce_a, nonce_b, bytes([status]), got_id,
                struct.pack("<Q", peer_received))
    if not hmac.compare_digest(good, mac):
        raise AuthenticationError(f"{conn.peer}'s welcome failed authentication: the two "
                                  "hosts' pre-shared keys differ (or that is not the other "
                                  "side of this link)")
    if status != OK:
        raise LinkRefused(f"{conn.peer} refused the connection: "
                          f"{_STATUS_TEXT.get(status, f'status {status}')}")
    if link_id != NEW_LINK and got_id != link_id:
        raise LinkRefused(f"{conn.peer} resumed another session")
    return got_id, peer_received, nonce_a, nonce_b
