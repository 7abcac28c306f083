"""What Alice's and Bob's host sessions share: channels, keys, instruments, control.

Channels of the link (the same numbers on both sides): 0 control, 1 sifting,
2 .. 2 + L - 1 the distillation lanes (``postprocess.blocks_in_flight``). Each
is an :class:`~qkdctl.auth.AuthenticatedEndpoint` with a session ID made of
its label and the link's ID, so that a frame of one channel or session is
refused on any other.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from typing import Any

from .. import wire
from ..auth import AuthenticatedEndpoint, HmacSha256, WegmanCarter
from ..config import SIDES, BenchConfig, parse_address
from ..errors import ConfigError
from ..protocol import read_psk_file
from .agreement import agreement, compare
from .mux import BYE_ALARM, BYE_ERROR, Link

__all__ = [
    "Done",
    "KeyInventory",
    "Ready",
    "SIDE_ROLES",
    "build_side_bench",
    "link_figures",
    "meet",
    "open_endpoints",
    "reconcile_keystores",
    "side_keystore",
    "side_psk",
]

log = logging.getLogger(__name__)

CONTROL, SIFTING, LANES = 0, 1, 2
CHANNEL_NAMES = {CONTROL: "control", SIFTING: "sifting"}

#: the instruments each host needs, in the order they are armed (made safe in reverse)
SIDE_ROLES = {"alice": ("laser", "modulator"), "bob": ("detectors", "tagger")}


@wire.message("link.Ready")
@dataclass(frozen=True)
class Ready:
    """Alice -> Bob: her laser and encoder are on; Bob may start his tagger."""

    pulses_sent: int


@wire.message("link.Done")
@dataclass(frozen=True)
class Done:
    """Either way, at the end: this side has finished every block (and, from Bob, how
    much bench time his tagger saw)."""

    role: str
    duration_s: float
    blocks: int


@wire.message("link.KeyInventory")
@dataclass(frozen=True)
class KeyInventory:
    """Either way, at session start: the two-host keys this side holds (IDs, the
    digests of public data, :func:`qkdctl.postprocess.distill.key_digest`, and whether
    each was delivered to an application; never key bits). ``has_store``: false for a
    side that keeps no keys (nothing is reconciled then)."""

    role: str
    has_store: bool
    key_ids: tuple
    digests: tuple
    delivered: tuple


def inventory(store, role: str) -> KeyInventory:
    if store is None:
        return KeyInventory(role, False, (), (), ())
    # only the keys two-host sessions made: a one-process run's keys are both halves on
    # one host, and none of the other host's business
    recs = [r for r in store.list() if r.meta.get("link") and "digest" in r.meta]
    return KeyInventory(role, True, tuple(r.key_id for r in recs),
                        tuple(str(r.meta["digest"]) for r in recs),
                        tuple(bool(r.delivered) for r in recs))


def reconcile_keystores(control, store, role: str) -> dict[str, Any]:
    """Make this side's two-host keys exactly those the other side holds too.

    Each side sends its inventory and discards every key the other does not hold
    under the same ID with the same digest: a block one side committed and the
    other did not (a session that stopped in between) goes on both sides, never a
    key on one side only, never two keys under one ID. Both sides reach the same
    conclusion from the same two inventories.

    Nothing is discarded when a side keeps no keys, or when the other side's store
    holds no two-host key at all (a new store: its keys were not lost in a session,
    and a key Alice's applications may already use is not thrown away for that); a
    key that was delivered to an application is never discarded (it is reported).
    """
    mine = inventory(store, role)
    control.send(mine)
    theirs = control.recv()
    n = len(theirs.key_ids) if isinstance(theirs, KeyInventory) else -1
    if not isinstance(theirs, KeyInventory) or theirs.role == role \
            or not isinstance(theirs.has_store, bool) \
            or len(theirs.digests) != n or len(theirs.delivered) != n \
            or not all(isinstance(x, str) for x in (*theirs.key_ids, *theirs.digests)):
        raise ConfigError("the other side did not send its key inventory")
    out: dict[str, Any] = {"kept": len(mine.key_ids), "discarded": [], "unmatched": []}
    if not (mine.has_store and theirs.has_store):
        return out
    if mine.key_ids and not theirs.key_ids:
        log.warning("%s: the other host's key store holds no two-host key (a new store?): "
                    "nothing reconciled; %d key(s) here have no counterpart there", role,
                    len(mine.key_ids))
        out["unmatched"] = list(mine.key_ids)
        return out
    other = dict(zip(theirs.key_ids, theirs.digests, strict=True))
    for key_id, digest, delivered in zip(mine.key_ids, mine.digests, mine.delivered,
                                         strict=True):
        if other.get(key_id) == digest:
            continue
        why = ("the other side does not hold it" if key_id not in other else
               "the other side holds a different key under this ID")
        if delivered:
            log.error("%s: key %s was delivered to an application, but %s", role, key_id, why)
            out["unmatched"].append(key_id)
            continue
        store.discard(key_id, f"key-store reconciliation: {why}")
        out["discarded"].append(key_id)
    out["kept"] -= len(out["discarded"]) + len(out["unmatched"])
    if out["discarded"]:
        log.warning("%s: key-store reconciliation discarded %d key(s) the other side does not "
                    "hold; %d kept", role, len(out["discarded"]), out["kept"])
    return out


def side_psk(cfg: BenchConfig, role: str, override: str | None = None) -> bytes:
    """This host's copy of the pre-shared key: ``override``, else ``link.<role>_psk_file``,
    else ``postprocess.psk_file``."""
    if override:
        return read_psk_file(override, f"--psk-file {override}")
    own = getattr(cfg.link, f"{role}_psk_file")
    if own:
        return read_psk_file(own, f"{cfg.path}: link.{role}_psk_file", cfg.path)
    if cfg.postprocess.psk_file:
        return read_psk_file(cfg.postprocess.psk_file, f"{cfg.path}: postprocess.psk_file",
                             cfg.path)
    raise ConfigError(f"{cfg.path}: link.{role}_psk_file: missing; the two hosts authenticate "
                      "their link with a pre-shared key: give each host a copy of the same "
                      "file of at least 32 random bytes (mode 600)")


def side_keystore(keystore: str | os.PathLike | bool | None, role: str):
    """This host's key store: ``<keystore>/<role>`` (None: the default; False: none)."""
    from ..keystore import KeyStore
    from ..session import keystore_dir

    top = keystore_dir(keystore)
    return None if top is None else KeyStore(top / role)


def link_options(cfg: BenchConfig) -> dict[str, Any]:
    return {"connect_timeout_s": cfg.link.connect_timeout_s,
            "link_timeout_s": cfg.link.link_timeout_s,
            "idle_timeout_s": cfg.link.idle_timeout_s,
            "name": f"link {cfg.name}"}


def open_endpoints(link: Link, cfg: BenchConfig, psk: bytes, keystore) -> dict[str, Any]:
    """The authenticated channels of a session: ``control``, ``sifting`` and ``lanes``."""
    method = cfg.postprocess.auth
    if method == "wegman-carter" and keystore is None:
        raise ConfigError(f"{cfg.path}: postprocess.auth: 'wegman-carter' takes its tag pads "
                          "from the key store; this session has none")
    hk = hmac.new(psk, b"qkdctl wegman-carter hash key", hashlib.sha256).digest()[:16]

    def endpoint(number: int, label: str) -> AuthenticatedEndpoint:
        auth = HmacSha256(psk) if method == "hmac-sha256" else WegmanCarter(hk, keystore)
        sid = f"link {label}:".encode() + link.link_id
        return AuthenticatedEndpoint(link.channel(number), auth, link.role, sid)

    lanes = [endpoint(LANES + i, f"lane {i}") for i in range(cfg.postprocess.blocks_in_flight)]
    return {"control": endpoint(CONTROL, "control"), "sifting": endpoint(SIFTING, "sifting"),
            "lanes": lanes}


def meet(link: Link, cfg: BenchConfig, psk: bytes, store, role: str,
         session: str = "") -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Open the session's channels, check that both bench files agree, reconcile the
    key stores. Returns (endpoints, the session's key-ID prefix (Alice's), what the
    reconciliation kept and discarded)."""
    eps = open_endpoints(link, cfg, psk, store)
    control = eps["control"]
    mine = agreement(cfg, role, session)
    control.send(mine)
    theirs = control.recv()
    compare(mine, theirs, cfg.path)
    reconciled = reconcile_keystores(control, store, role)
    return eps, session if role == "alice" else theirs.session, reconciled


def link_figures(link: Link) -> dict[str, Any]:
    """What the link carried (for the summary)."""
    return {"reconnects": link.reconnects, "bytes_sent": link.bytes_sent,
            "bytes_received": link.bytes_received,
            "sent_by_channel": {CHANNEL_NAMES.get(k, f"lane {k - LANES}"): v
                                for k, v in sorted(link.sent_by_channel.items())}}


def stop_link(link: Link, role: str, e: BaseException) -> None:
    """Close the link on the way out of a failed session, telling the other host why in
    one line; an authentication failure or a tamper alarm stops it with exit status 3
    as well."""
    from ..auth import AuthenticationError
    from ..postprocess.distill import TamperAlarm

    alarm = isinstance(e, AuthenticationError | TamperAlarm) or getattr(e, "exit_code", 0) == 3
    link.close(f"{role} stopped: " + " ".join((str(e) or type(e).__name__).split())[:400],
               code=BYE_ALARM if alarm else BYE_ERROR)


def build_side_bench(cfg: BenchConfig, role: str, seed: int):
    """This host's instruments: the bench file's instruments that belong to ``role``
    (:data:`qkdctl.config.SIDES`). Mock instruments reach the simulated table at
    ``link.sim_table``; real ones their own resources."""
    from ..session import build_real_instruments

    mine = {n: i for n, i in cfg.instruments.items() if SIDES.get(n) == role}
    others = [n for n in cfg.instruments if n not in SIDES]
    if others:
        raise ConfigError(f"{cfg.path}: instruments.{others[0]}: unknown instrument role; "
                          f"the roles are {', '.join(SIDES)}")
    missing = [r for r in SIDE_ROLES[role] if r not in mine]
    if missing:
        raise ConfigError(f"{cfg.path}: instruments: {role}'s host needs "
                          f"[instruments.{missing[0]}] ({role} has "
                          f"{', '.join(SIDE_ROLES[role])})")
    mock = [n for n, i in mine.items() if i.driver == "mock"]
    if mock and len(mock) != len(mine):
        real = next(n for n in mine if n not in mock)
        raise ConfigError(f"{cfg.path}: instruments.{real}.driver: a real instrument cannot be "
                          f"combined with mock ones ({', '.join(mock)}) on one host")
    if mock:
        from ..drivers.mock import build_remote_bench

        host, port = parse_address(cfg.link.sim_table)
        return build_remote_bench(cfg, role, host, port, seed)
    return build_real_instruments(cfg, mine)
