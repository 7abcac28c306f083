"""The key store: where the final secret keys of QKD sessions are kept.

A key store is a directory (mode 0700, owned by the user) holding

``<key_id>.key``
    one file per key block (mode 0600): the bits, packed eight to a byte,
    with a small header and a SHA-256 checksum of the file contents;
``index.json``
    the list of blocks in the order they were added, with their size, the
    security parameter ``eps`` of the block, creation time, user metadata and
    how much of each block is spent. It holds no key material;
``usage.jsonl``
    an append-only record of what bits were taken for which purpose (key IDs,
    bit ranges and purposes only);
``.lock``
    the lock serialising updates between processes sharing the directory.

Files are created with ``os.open(..., O_CREAT | O_EXCL, 0o600)``, so a key file
is never readable by anyone else, not even for a moment. Every file is
written to a temporary file in the same directory, flushed with ``fsync`` and
renamed into place; the directory is then synced. A crash leaves either the
old or the new state, never a partial key file or index (a crash between
writing a new key file and the index leaves that file unlisted and unused;
it is reported when the store is opened). ``usage.jsonl`` is informational;
the index is authoritative.

Bits leave the store in three ways, and the store guarantees that no bit leaves
it twice:

* :meth:`KeyStore.read` hands a whole block to an application. The block is
  marked *delivered* (persisted before the bits are returned) and is never
  used for anything else afterwards. A block of which any bits were used is
  not delivered.
* :meth:`KeyStore.allocate_pad` and :meth:`KeyStore.claim_pad` hand out
  one-time pads for message authentication (the Wegman-Carter tags of
  :mod:`qkdctl.auth`). Each block is split in two: the first half (rounded
  down to a whole byte) holds the pads of messages from Alice to Bob, the
  rest those of messages from Bob to Alice. The sender of a message
  *allocates* the next unused pad of its direction and names its position in
  the message; the receiver *claims* the pad at that position in its own copy
  of the store, which fails if those bits are used already. Because positions
  are explicit and each direction has its own part of every block, the two
  stores stay consistent however messages of several channels and both
  directions interleave.
* :meth:`KeyStore.consume` takes bits from the front of the oldest blocks
  that hold no pads, for one-off uses that both sides perform at the same
  point (for example a hash key before any session runs). Blocks it touches
  hold no pads afterwards.

Every use is marked in the index *before* the bits are returned (mark
before use), so after a crash bits count as used even if they never were.
Positions are bit offsets in the concatenation of all blocks in the order they
were added; Alice's and Bob's stores must hold the same blocks in the same
order (use ``key_id`` to give both copies the same ID). A pad in a block the
receiver's store does not hold yet, or has delivered, is refused: a block
must be in both stores before either side can need it for pads (pads come
from the oldest block with room, so a new block is reached only once the
older ones are full), and be delivered from both while no session runs.

Key material is never logged and never appears in the ``repr`` or ``str`` of
:class:`KeyStore` or :class:`KeyRecord`, nor in error messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QkdctlError

__all__ = [
    "KeyExhaustedError",
    "KeyRecord",
    "KeyStore",
    "KeyStoreError",
    "PadUnavailableError",
    "default_keystore_dir",
]

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
USAGE_NAME = "usage.jsonl"
LOCK_NAME = ".lock"
_TMP_PREFIX = ".tmp-"
_KEY_SUFFIX = ".key"
_FORMAT = "qkdctl-keystore"
_VERSION = 1
_KEY_MAGIC = b"QKDKEY\x00\x01"
_KEY_HEADER = struct.Struct("<8sQ")
_KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class KeyStoreError(QkdctlError):
    """The key store directory or one of its files is missing, unsafe or corrupt."""


class KeyExhaustedError(KeyStoreError):
    """The key store has fewer unused bits than requested."""


class PadUnavailableError(KeyStoreError):
    """The pad a message names cannot be claimed: used already, or not a pad of that
    direction (replay, tampering, or stores out of step)."""


def default_keystore_dir() -> Path:
    """The key store used when none is given.

    ``$QKDCTL_KEYSTORE`` if set; otherwise ``$XDG_DATA_HOME/qkdctl/keys`` when
    ``XDG_DATA_HOME`` is set to an absolute path; otherwise
    ``~/.local/share/qkdctl/keys``.
    """
    env = os.environ.get("QKDCTL_KEYSTORE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "qkdctl" / "keys"


Intervals = tuple[tuple[int, int], ...]
DIRECTIONS = ("alice->bob", "bob->alice")


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """What the store knows about one key block (no key material).

    ``used_bits``: bits from the start of the block taken by
    :meth:`KeyStore.consume`. ``delivered``: the block was handed to an
    application with :meth:`KeyStore.read`. ``pad_used``: for each direction
    (0 = alice->bob, 1 = bob->alice), the bit ranges ``(start, stop)`` of the
    block used as one-time pads.
    """

    key_id: str
    n_bits: int
    eps: float
    created: datetime
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    used_bits: int = 0
    delivered: bool = False
    pad_used: tuple[Intervals, Intervals] = ((), ())

    @property
    def pad_used_bits(self) -> int:
        """Bits of this block used as pads, both directions."""
        return sum(b - a for region in self.pad_used for a, b in region)

    @property
    def available_bits(self) -> int:
        """Bits of this block not used in any way."""
        return 0 if self.delivered else self.n_bits - self.used_bits - self.pad_used_bits

    def pad_region(self, direction: int) -> tuple[int, int]:
        """The bit range of this block holding the pads of ``direction``."""
        split = self.n_bits // 16 * 8
        return (0, split) if direction == 0 else (split, self.n_bits)

    def _consumable(self) -> int:
        return 0 if self.delivered or self.pad_used_bits else self.n_bits - self.used_bits

    def _pad_next(self, direction: int) -> int:
        lo, _ = self.pad_region(direction)
        used = self.pad_used[direction]
        return max(lo, used[-1][1]) if used else lo

    def _pad_free(self, direction: int) -> int:
        if self.delivered or self.used_bits:
            return 0
        return self.pad_region(direction)[1] - self._pad_next(direction)

    def _with_pad(self, direction: int, start: int, stop: int) -> KeyRecord:
        merged: list[list[int]] = []
        for a, b in sorted([*self.pad_used[direction], (start, stop)]):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        pads = list(self.pad_used)
        pads[direction] = tuple((a, b) for a, b in merged)
        return dataclasses.replace(self, pad_used=(pads[0], pads[1]))

    def _to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "n_bits": self.n_bits, "eps": self.eps,
                "created": self.created.isoformat(), "meta": self.meta,
                "used_bits": self.used_bits, "delivered": self.delivered,
                "pad_used": [[list(r) for r in region] for region in self.pad_used]}


class KeyStore:
    """A directory of secret key blocks (see the module documentation).

    ``path`` defaults to :func:`default_keystore_dir`. The directory is created
    with mode 0700 if missing; an existing directory that is not owned by the
    user or is writable by group or others is refused with
    :class:`KeyStoreError`. Every operation reloads the index under the lock,
    so several :class:`KeyStore` objects, threads or processes may share a
    directory. The checked contents of the two key files used last are kept in
    memory (key files never change once written).
    """

    _CACHE_BLOCKS = 2

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(default_keystore_dir() if path is None else path)
        # checked contents of recently used key files (they never change once written)
        self._cache: dict[str, bytes] = {}
        self._prepare_dir()
        with self._locked():
            self._cleanup()
            self._load()   # a corrupt index is reported now rather than at first use

    def __repr__(self) -> str:
        return f"KeyStore({str(self.path)!r})"

    __str__ = __repr__

    # ------------------------------------------------------------------ public API

    def add(self, bits: np.ndarray, eps: float, meta: dict[str, Any] | None = None, *,
            key_id: str | None = None) -> KeyRecord:
        """Store a key block and return its record.

        ``bits``: 1-D array of 0/1 values (uint8 or bool), at least one bit.
        ``eps``: the block's security parameter (0 <= eps <= 1). ``meta``: JSON-
        serialisable metadata (session, bench, block numbers -- never key
        material). ``key_id``: an ID agreed with the peer (letters, digits,
        ``_.-``; up to 128 characters); by default a new unique ID is made.
        """
        arr = _check_bits(bits)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
                or not 0 <= eps <= 1:
            raise ValueError(f"eps must be a number in [0, 1], got {eps!r}")
        meta = _check_meta({} if meta is None else meta)
        created = datetime.now(UTC)
        if key_id is None:
            key_id = f"{created:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:16]}"
        elif not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
            raise ValueError(f"bad key ID {key_id!r}: use 1-128 letters, digits, '_', '.', "
                             "'-', not starting with '.', '_' or '-'")
        rec = KeyRecord(key_id, int(arr.size), float(eps), created, meta)
        packed = np.packbits(arr).tobytes()
        header = _KEY_HEADER.pack(_KEY_MAGIC, arr.size)
        content = header + packed + hashlib.sha256(header + packed).digest()
        with self._locked():
            records = self._load()
            if any(r.key_id == key_id for r in records) or self._key_file(key_id).exists():
                raise KeyStoreError(f"{self.path}: key {key_id} already exists")
            self._atomic_write(self._key_file(key_id), content)
            records.append(rec)
            self._save(records)
        log.info("key store %s: added key %s (%d bits, eps %.3g)", self.path, key_id,
                 rec.n_bits, rec.eps)
        return rec

    def list(self) -> list[KeyRecord]:
        """All key blocks, oldest first."""
        with self._locked():
            return self._load()

    def get(self, key_id: str) -> KeyRecord:
        """The record of one key block."""
        with self._locked():
            return self._find(self._load(), key_id)

    def read(self, key_id: str) -> np.ndarray:
        """The bits of a key block, for an application (uint8 array of 0/1).

        The block is marked delivered (persisted before the bits are returned)
        and is never consumed for pads afterwards. A block from which bits were
        already consumed is refused.
        """
        with self._locked():
            records = self._load()
            rec = self._find(records, key_id)
            used = rec.used_bits + rec.pad_used_bits
            if used:
                raise KeyStoreError(f"{self.path}: key {key_id}: {used} of its "
                                    f"{rec.n_bits} bits were used already; the block cannot "
                                    "be handed to an application")
            bits = self._read_bits(rec)
            if not rec.delivered:
                i = records.index(rec)
                records[i] = dataclasses.replace(rec, delivered=True)
                self._save(records)
        log.info("key store %s: key %s delivered (%d bits)", self.path, key_id, rec.n_bits)
        return bits

    def discard(self, key_id: str, reason: str) -> KeyRecord:
        """Remove a key block that must not be used: its entry, then its file.

        For a block the other side's store does not hold (a session that stopped
        between the two sides' commits) or holds differently. A block already
        handed to an application cannot be taken back and is refused.
        """
        if not isinstance(reason, str) or not reason:
            raise ValueError("a reason is required")
        with self._locked():
            records = self._load()
            rec = self._find(records, key_id)
            if rec.delivered:
                raise KeyStoreError(f"{self.path}: key {key_id} was delivered to an "
                                    "application; it cannot be discarded")
            self._save([r for r in records if r.key_id != key_id])
            self._cache.pop(key_id, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._key_file(key_id))
            self._sync_dir()
            self._log_usage(f"discarded: {reason}", rec.n_bits, [[key_id, 0, rec.n_bits]])
        log.warning("key store %s: discarded key %s (%s)", self.path, key_id, reason)
        return rec

    def consume(self, n_bits: int, purpose: str) -> bytes:
        """Take ``n_bits`` unused bits (a multiple of 8) for a one-off purpose.

        The bits come from the front of the oldest blocks that were neither
        delivered nor used for pads, in order, and are marked used in the index
        before they are returned; they are never handed out again. They are
        returned packed, first bit in the most significant bit of the first
        byte. Raises :class:`KeyExhaustedError` (taking nothing) if fewer bits
        are left. Both sides must call this at the same point (not while a
        session takes pads) to get the same bits.
        """
        _check_request(n_bits, purpose)
        with self._locked():
            records = self._load()
            left = sum(r._consumable() for r in records)
            if left < n_bits:
                raise KeyExhaustedError(f"{self.path}: {n_bits} key bits needed for {purpose}, "
                                        f"only {left} unused bits left in the key store")
            taken: list[tuple[int, int, int]] = []   # (record index, start, stop)
            need = n_bits
            for i, r in enumerate(records):
                if need == 0:
                    break
                if r._consumable():
                    k = min(need, r._consumable())
                    taken.append((i, r.used_bits, r.used_bits + k))
                    need -= k
            parts = [self._read_bits(records[i], a, b) for i, a, b in taken]
            for i, _, b in taken:
                records[i] = dataclasses.replace(records[i], used_bits=b)
            self._save(records)   # mark before use
            ranges = [[records[i].key_id, a, b] for i, a, b in taken]
            self._log_usage(purpose, n_bits, ranges)
        log.debug("key store %s: %d bits consumed for %s from %s", self.path, n_bits, purpose,
                  ", ".join(f"{k}[{a}:{b}]" for k, a, b in ranges))
        return np.packbits(np.concatenate(parts)).tobytes()

    def available_bits(self) -> int:
        """Bits not yet used in any way (in blocks not delivered)."""
        with self._locked():
            return sum(r.available_bits for r in self._load())

    def pad_bits_available(self, direction: int) -> int:
        """Unused bits in the ``direction`` parts of the blocks that can hold pads
        (a pad does not span blocks, so fewer may be usable)."""
        _check_direction(direction)
        with self._locked():
            return sum(r._pad_free(direction) for r in self._load())

    def allocate_pad(self, direction: int, n_bits: int, purpose: str) -> tuple[int, bytes]:
        """Take the next unused pad of ``n_bits`` bits for a message in ``direction``
        (0 = alice->bob, 1 = bob->alice), to be named to the receiver by its position.

        Returns (position, packed bits). The pad lies within one block, in that
        block's part for ``direction``; blocks delivered or touched by
        :meth:`consume` are skipped. Marked used before it is returned.
        Raises :class:`KeyExhaustedError` if no block has room.
        """
        _check_direction(direction)
        _check_request(n_bits, purpose)
        with self._locked():
            records = self._load()
            offset = 0
            for i, r in enumerate(records):
                if r._pad_free(direction) >= n_bits:
                    start = r._pad_next(direction)
                    bits = self._read_bits(r, start, start + n_bits)
                    records[i] = r._with_pad(direction, start, start + n_bits)
                    self._save(records)   # mark before use
                    self._log_usage(purpose, n_bits, [[r.key_id, start, start + n_bits]])
                    break
                offset += r.n_bits
            else:
                left = sum(r._pad_free(direction) for r in records)
                raise KeyExhaustedError(f"{self.path}: {n_bits} key bits needed for {purpose}, "
                                        f"only {left} unused {DIRECTIONS[direction]} pad bits "
                                        "left in the key store")
        log.debug("key store %s: %s pad of %d bits at %d (%s[%d:%d]) for %s", self.path,
                  DIRECTIONS[direction], n_bits, offset + start, r.key_id, start,
                  start + n_bits, purpose)
        return offset + start, np.packbits(bits).tobytes()

    def claim_pad(self, direction: int, position: int, n_bits: int, purpose: str) -> bytes:
        """Take the pad of ``n_bits`` bits at ``position`` that the sender of a message in
        ``direction`` allocated in its copy of the store.

        Raises :class:`PadUnavailableError` if those bits are not all unused bits
        of one block's part for ``direction`` (a replayed or altered message, or
        stores out of step). Marked used before it is returned.
        """
        _check_direction(direction)
        _check_request(n_bits, purpose)
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"position must be a non-negative integer, got {position!r}")
        what = f"{DIRECTIONS[direction]} pad at key bits {position}..{position + n_bits - 1}"
        with self._locked():
            records = self._load()
            i, offset = _locate(records, position)
            if i is None:
                raise PadUnavailableError(f"{self.path}: {what} is beyond the end of the key "
                                          f"store ({offset} bits); the stores are out of step")
            r = records[i]
            start, stop = position - offset, position - offset + n_bits
            lo, hi = r.pad_region(direction)
            if r.delivered or r.used_bits:
                raise PadUnavailableError(f"{self.path}: {what}: key {r.key_id} is not "
                                          "available for pads (delivered or consumed)")
            if start < lo or stop > hi:
                raise PadUnavailableError(f"{self.path}: {what} is outside the "
                                          f"{DIRECTIONS[direction]} pad part of key {r.key_id}")
            if any(a < stop and start < b for a, b in r.pad_used[direction]):
                raise PadUnavailableError(f"{self.path}: {what} is used already (a replayed "
                                          "or altered message, or the stores are out of step)")
            bits = self._read_bits(r, start, stop)
            records[i] = r._with_pad(direction, start, stop)
            self._save(records)   # mark before use
            self._log_usage(purpose, n_bits, [[r.key_id, start, stop]])
        log.debug("key store %s: claimed %s for %s", self.path, what, purpose)
        return np.packbits(bits).tobytes()

    # ------------------------------------------------------------------ directory

    def _prepare_dir(self) -> None:
        p = self.path
        try:
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(p)
        except OSError as e:
            raise KeyStoreError(f"{p}: cannot create the key store directory: "
                                f"{e.strerror or e}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise KeyStoreError(f"{p}: not a directory")
        if st.st_uid != os.geteuid():
            raise KeyStoreError(f"{p}: key store directory is owned by uid {st.st_uid}, "
                                f"not by this user (uid {os.geteuid()})")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise KeyStoreError(f"{p}: key store directory is writable by group or others "
                                f"(mode {mode:04o}); run 'chmod 700 {p}'")
        if mode & 0o077:
            log.warning("%s: key store directory is readable by group or others (mode %04o); "
                        "'chmod 700' is recommended", p, mode)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.path / LOCK_NAME,
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise KeyStoreError(f"{self.path}: cannot open the lock file: "
                                f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _cleanup(self) -> None:
        """Remove temporary files left by a crash; report key files missing from the index."""
        names = {r.key_id for r in self._load()}
        for entry in os.scandir(self.path):
            if entry.name.startswith(_TMP_PREFIX):
                log.warning("%s: removing %s left by an interrupted write", self.path,
                            entry.name)
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            elif entry.name.endswith(_KEY_SUFFIX) and entry.name[:-4] not in names:
                log.warning("%s: key file %s is not in the index (interrupted add?); "
                            "it is ignored", self.path, entry.name)

    def _key_file(self, key_id: str) -> Path:
        return self.path / f"{key_id}{_KEY_SUFFIX}"

    def _atomic_write(self, dest: Path, content: bytes) -> None:
        tmp = self.path / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise KeyStoreError(f"{dest}: cannot write: {e.strerror or e}") from None
        try:
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise KeyStoreError(f"{dest}: cannot write: {e.strerror or e}") from None
            raise
        self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ index

    def _load(self) -> list[KeyRecord]:
        index = self.path / INDEX_NAME
        try:
            text = index.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            raise KeyStoreError(f"{index}: cannot read: {e}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise KeyStoreError(f"{index}: not valid JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise KeyStoreError(f"{index}: not a qkdctl key store index")
        if doc.get("version") != _VERSION:
            raise KeyStoreError(f"{index}: version: {doc.get('version')!r} is not supported "
                                f"(expected {_VERSION})")
        keys = doc.get("keys")
        if not isinstance(keys, list):
            raise KeyStoreError(f"{index}: keys: expected a list")
        records = []
        seen = set()
        for i, k in enumerate(keys):
            rec = _record_from_json(k, f"{index}: keys[{i}]")
            if rec.key_id in seen:
                raise KeyStoreError(f"{index}: keys[{i}]: key_id: {rec.key_id} appears twice")
            seen.add(rec.key_id)
            records.append(rec)
        return records

    def _save(self, records: list[KeyRecord]) -> None:
        doc = {"format": _FORMAT, "version": _VERSION, "keys": [r._to_json() for r in records]}
        text = json.dumps(doc, sort_keys=True, allow_nan=False, separators=(",", ":")) + "\n"
        self._atomic_write(self.path / INDEX_NAME, text.encode("utf-8"))

    def _find(self, records: list[KeyRecord], key_id: str) -> KeyRecord:
        for r in records:
            if r.key_id == key_id:
                return r
        raise KeyStoreError(f"{self.path}: no key {key_id!r} in the key store")

    def _log_usage(self, purpose: str, n_bits: int, ranges: list[list[Any]]) -> None:
        line = json.dumps({"time": datetime.now(UTC).isoformat(), "purpose": purpose,
                           "n_bits": n_bits, "ranges": ranges}, sort_keys=True) + "\n"
        try:
            fd = os.open(self.path / USAGE_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                         | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        except OSError as e:   # informational only; the index is authoritative
            log.warning("%s: cannot append to %s: %s", self.path, USAGE_NAME, e)

    # ------------------------------------------------------------------ key files

    def _read_bits(self, rec: KeyRecord, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Bits ``start:stop`` of a block, from its checked key file."""
        stop = rec.n_bits if stop is None else stop
        packed = self._cache.get(rec.key_id)
        if packed is None:
            packed = self._load_key_file(rec)
            self._cache[rec.key_id] = packed
            while len(self._cache) > self._CACHE_BLOCKS:
                self._cache.pop(next(iter(self._cache)))
        lo = start // 8
        chunk = np.frombuffer(packed, np.uint8, count=(stop + 7) // 8 - lo, offset=lo)
        return np.unpackbits(chunk)[start - 8 * lo:stop - 8 * lo]

    def _load_key_file(self, rec: KeyRecord) -> bytes:
        path = self._key_file(rec.key_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise KeyStoreError(f"{path}: cannot open key file: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeyStoreError(f"{path}: key file is accessible by group or others "
                                    f"(mode {mode:04o}); refusing to use it")
            with os.fdopen(fd, "rb", closefd=False) as f:
                content = f.read()
        finally:
            os.close(fd)
        n_packed = (rec.n_bits + 7) // 8
        expected = _KEY_HEADER.size + n_packed + 32
        if len(content) != expected:
            raise KeyStoreError(f"{path}: key file is corrupt ({len(content)} bytes, "
                                f"expected {expected})")
        body, digest = content[:-32], content[-32:]
        magic, n = _KEY_HEADER.unpack_from(body)
        if magic != _KEY_MAGIC or n != rec.n_bits \
                or hashlib.sha256(body).digest() != digest:
            raise KeyStoreError(f"{path}: key file is corrupt (bad header or checksum)")
        return body[_KEY_HEADER.size:]


def _locate(records: list[KeyRecord], position: int) -> tuple[int | None, int]:
    """(index of the block holding bit ``position``, offset of that block); (None, total)
    past the end."""
    offset = 0
    for i, r in enumerate(records):
        if position < offset + r.n_bits:
            return i, offset
        offset += r.n_bits
    return None, offset


def _check_direction(direction: int) -> None:
    if direction not in (0, 1) or isinstance(direction, bool):
        raise ValueError(f"direction must be 0 (alice->bob) or 1 (bob->alice), got {direction!r}")


def _check_request(n_bits: int, purpose: str) -> None:
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or n_bits <= 0 or n_bits % 8:
        raise ValueError(f"n_bits must be a positive multiple of 8, got {n_bits!r}")
    if not isinstance(purpose, str) or not purpose.strip():
        raise ValueError("purpose must be a non-empty string")


def _check_bits(bits: Any) -> np.ndarray:
    arr = np.asarray(bits)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"bits must be a non-empty 1-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "bui":
        raise ValueError(f"bits must be a uint8 or bool array, got dtype {arr.dtype}")
    if arr.dtype.kind != "b" and (arr.min() < 0 or arr.max() > 1):
        raise ValueError("bits must be 0 or 1")
    return arr.astype(np.uint8)


def _check_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise ValueError("meta must be a dict with string keys")
    try:
        return json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from None


def _record_from_json(k: Any, where: str) -> KeyRecord:
    if not isinstance(k, dict):
        raise KeyStoreError(f"{where}: expected an object")

    def get(name: str, types: tuple[type, ...]) -> Any:
        v = k.get(name)
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise KeyStoreError(f"{where}: {name}: missing or of the wrong type")
        return v

    key_id = get("key_id", (str,))
    if not _KEY_ID_RE.fullmatch(key_id):
        raise KeyStoreError(f"{where}: key_id: {key_id!r} is not a valid key ID")
    n_bits = get("n_bits", (int,))
    used = get("used_bits", (int,))
    eps = get("eps", (int, float))
    if n_bits <= 0 or not 0 <= used <= n_bits:
        raise KeyStoreError(f"{where}: n_bits/used_bits out of range")
    try:
        created = datetime.fromisoformat(get("created", (str,)))
    except ValueError:
        raise KeyStoreError(f"{where}: created: not an ISO 8601 time") from None
    meta = get("meta", (dict,))
    rec = KeyRecord(key_id, n_bits, float(eps), created, meta, used, get("delivered", (bool,)))
    pads = get("pad_used", (list,))
    regions: list[Intervals] = []
    for d in (0, 1):
        lo, hi = rec.pad_region(d)
        region = pads[d] if len(pads) == 2 and isinstance(pads[d], list) else None
        if region is None or not all(
                isinstance(iv, list) and len(iv) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in iv)
                for iv in region):
            raise KeyStoreError(f"{where}: pad_used: expected two lists of [start, stop]")
        prev = lo
        for a, b in region:
            if not prev <= a < b <= hi:
                raise KeyStoreError(f"{where}: pad_used: range [{a}, {b}) out of order or "
                                    "outside its part of the block")
            prev = b
        regions.append(tuple((a, b) for a, b in region))
    if rec.used_bits and (regions[0] or regions[1]):
        raise KeyStoreError(f"{where}: both consumed and used for pads")
    return dataclasses.replace(rec, pad_used=(regions[0], regions[1]))
