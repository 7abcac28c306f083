"""The key store: file modes, atomic writes, no key material outside key files, and bits
never handed out twice."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest

from qkdctl import keystore as ks_mod
from qkdctl.errors import QkdctlError
from qkdctl.keystore import (
    KeyExhaustedError,
    KeyRecord,
    KeyStore,
    KeyStoreError,
    default_keystore_dir,
)

RNG = np.random.default_rng(99)


def bits(n: int) -> np.ndarray:
    return RNG.integers(0, 2, n).astype(np.uint8)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def fast_tmp(tmp_path):
    """A scratch directory on tmpfs when there is one (file syncs cost nothing there, which
    keeps these tests fast on a busy disk), else pytest's tmp_path."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="qkdctl-test-", dir=shm))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


@pytest.fixture
def store(fast_tmp: Path) -> KeyStore:
    return KeyStore(fast_tmp / "keys")


def material_forms(b: np.ndarray) -> list[bytes]:
    """Ways key bits could leak into a text or binary file."""
    packed = np.packbits(b).tobytes()
    return [packed[:8], packed[:8].hex().encode(), packed[:8].hex().upper().encode(),
            "".join(map(str, b[:64])).encode(), json.dumps(b[:16].tolist()).encode()]


# ----------------------------------------------------------------------------------------
# location and directory

def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QKDCTL_KEYSTORE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_keystore_dir() == tmp_path / "explicit"
    monkeypatch.delenv("QKDCTL_KEYSTORE")
    assert default_keystore_dir() == tmp_path / "xdg" / "qkdctl" / "keys"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_keystore_dir() == tmp_path / "home" / ".local" / "share" / "qkdctl" / "keys"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_keystore_dir() == tmp_path / "home" / ".local" / "share" / "qkdctl" / "keys"
    monkeypatch.setenv("QKDCTL_KEYSTORE", str(tmp_path / "env"))
    assert KeyStore().path == tmp_path / "env"


def test_modes_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        s = KeyStore(tmp_path / "a" / "b" / "keys")
        rec = s.add(bits(100), 1e-9)
        s.consume(8, "test")
    finally:
        os.umask(old)
    assert mode(s.path) == 0o700
    files = sorted(os.listdir(s.path))
    assert files == sorted([f"{rec.key_id}.key", "index.json", "usage.jsonl", ".lock"])
    for f in files:
        assert mode(s.path / f) == 0o600, f


@pytest.mark.parametrize("bad_mode", [0o770, 0o702, 0o777, 0o720])
def test_writable_directory_refused(fast_tmp, bad_mode):
    d = fast_tmp / "keys"
    d.mkdir()
    d.chmod(bad_mode)
    with pytest.raises(KeyStoreError, match=r"writable by group or others \(mode 0"
                                             r"\d+\); run 'chmod 700"):
        KeyStore(d)


def test_readable_directory_warns(fast_tmp, caplog):
    d = fast_tmp / "keys"
    d.mkdir()
    d.chmod(0o755)
    with caplog.at_level(logging.WARNING):
        KeyStore(d)
    assert "readable by group or others" in caplog.text


def test_not_a_directory(fast_tmp):
    f = fast_tmp / "file"
    f.write_text("x")
    with pytest.raises(KeyStoreError, match="file"):
        KeyStore(f)


def test_key_files_created_exclusive_and_0600(store, monkeypatch):
    calls = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **kw):
        calls.append((str(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(ks_mod.os, "open", spy)
    store.add(bits(64), 0.0)
    created = [c for c in calls if c[1] & os.O_CREAT and ".tmp-" in c[0]]
    assert len(created) == 2    # the key file and the index
    for _, flags, m in created:
        assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and m == 0o600


# ----------------------------------------------------------------------------------------
# add, list, read

def test_add_list_read_round_trip(store):
    b1, b2 = bits(1000), bits(7)
    r1 = store.add(b1, 1e-10, {"session": "s1", "block": 3})
    r2 = store.add(b2.astype(bool), 2e-10)
    assert isinstance(r1, KeyRecord) and r1.n_bits == 1000 and r1.eps == 1e-10
    assert r1.created.tzinfo is not None and r1.key_id != r2.key_id
    assert [r.key_id for r in store.list()] == [r1.key_id, r2.key_id]
    assert store.get(r1.key_id).meta == {"session": "s1", "block": 3}
    assert store.available_bits() == 1007
    out = store.read(r2.key_id)
    assert out.dtype == np.uint8 and np.array_equal(out, b2)
    assert np.array_equal(KeyStore(store.path).read(r1.key_id), b1)


def test_key_ids_unique_and_custom(store):
    ids = {store.add(bits(8), 0.0).key_id for _ in range(12)}
    assert len(ids) == 12
    rec = store.add(bits(8), 0.0, key_id="session-42.block_0")
    assert rec.key_id == "session-42.block_0"
    with pytest.raises(KeyStoreError, match="already exists"):
        store.add(bits(8), 0.0, key_id="session-42.block_0")
    for bad in ("../x", ".hidden", "", "a/b", "x" * 200, "a b"):
        with pytest.raises(ValueError, match="bad key ID"):
            store.add(bits(8), 0.0, key_id=bad)


@pytest.mark.parametrize("arr, eps, meta, match", [
    (np.zeros(0, np.uint8), 0.0, None, "non-empty"),
    (np.zeros((2, 2), np.uint8), 0.0, None, "1-D"),
    (np.array([0, 2], np.uint8), 0.0, None, "0 or 1"),
    (np.array([0.0, 1.0]), 0.0, None, "dtype"),
    (np.array([0, 1], np.uint8), -1.0, None, "eps"),
    (np.array([0, 1], np.uint8), float("nan"), None, "eps"),
    (np.array([0, 1], np.uint8), 0.0, {"k": b"raw"}, "JSON"),
    (np.array([0, 1], np.uint8), 0.0, {1: "x"}, "string keys"),
])
def test_add_validates(store, arr, eps, meta, match):
    with pytest.raises(ValueError, match=match):
        store.add(arr, eps, meta)


def test_read_marks_delivered_and_consume_skips_it(store):
    b1, b2 = bits(64), bits(64)
    r1 = store.add(b1, 0.0)
    store.add(b2, 0.0)
    store.read(r1.key_id)
    assert store.get(r1.key_id).delivered
    assert store.available_bits() == 64
    assert store.consume(16, "pad") == np.packbits(b2).tobytes()[:2]
    assert np.array_equal(KeyStore(store.path).read(r1.key_id), b1)   # the user may re-read


def test_partly_consumed_block_not_delivered(store):
    r = store.add(bits(64), 0.0)
    store.consume(8, "pad")
    with pytest.raises(KeyStoreError, match="8 of its 64 bits were used already"):
        store.read(r.key_id)


def test_unknown_key(store):
    with pytest.raises(KeyStoreError, match="no key 'nope'"):
        store.read("nope")


# ----------------------------------------------------------------------------------------
# consume

def test_consume_in_order_across_blocks_and_reopen(store):
    b1, b2 = bits(20), bits(100)
    store.add(b1, 0.0)
    store.add(b2, 0.0)
    stream = np.concatenate([b1, b2])
    got = [store.consume(8, "a"), store.consume(16, "b")]
    assert store.available_bits() == 96
    again = KeyStore(store.path)
    assert again.available_bits() == 96
    got.append(again.consume(96, "c"))
    assert b"".join(got) == np.packbits(stream).tobytes()
    assert [r.used_bits for r in again.list()] == [20, 100]
    with pytest.raises(KeyExhaustedError, match="8 key bits needed for d, only 0 unused"):
        again.consume(8, "d")


def test_exhaustion_takes_nothing(store):
    store.add(bits(64), 0.0)
    with pytest.raises(KeyExhaustedError, match="128 key bits needed for auth, only 64"):
        store.consume(128, "auth")
    assert store.available_bits() == 64
    assert isinstance(KeyExhaustedError("x"), QkdctlError)


@pytest.mark.parametrize("n", [0, 7, -8, 12, 1.5, True])
def test_consume_sizes(store, n):
    store.add(bits(64), 0.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        store.consume(n, "x")


def test_consume_marks_before_use(store, monkeypatch):
    store.add(bits(64), 0.0)
    real_save = KeyStore._save

    def save_then_crash(self, records):
        real_save(self, records)
        raise RuntimeError("simulated crash after the index was written")

    monkeypatch.setattr(KeyStore, "_save", save_then_crash)
    with pytest.raises(RuntimeError):
        store.consume(32, "pad")
    monkeypatch.undo()
    assert KeyStore(store.path).available_bits() == 32   # the bits count as used


def test_consume_never_hands_out_the_same_bits_twice(fast_tmp):
    b = bits(4096)
    s = KeyStore(fast_tmp / "k")
    s.add(b, 0.0)
    seen = bytearray()
    for i in range(20):
        s = KeyStore(fast_tmp / "k") if i % 5 == 0 else s
        seen += s.consume(8 * int(RNG.integers(1, 4)), f"round {i}")
    assert bytes(seen) == np.packbits(b).tobytes()[:len(seen)]
    usage = [json.loads(line) for line in (s.path / "usage.jsonl").read_text().splitlines()]
    assert len(usage) == 20 and usage[0]["purpose"] == "round 0"
    ranges = [tuple(r[1:]) for u in usage for r in u["ranges"]]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


# ----------------------------------------------------------------------------------------
# atomicity and integrity

def test_failed_write_leaves_store_unchanged(store, monkeypatch):
    store.add(bits(16), 0.0)
    before = store.list()

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ks_mod.os, "replace", fail)
    with pytest.raises(KeyStoreError, match="No space left on device"):
        store.add(bits(16), 0.0)
    monkeypatch.undo()
    assert store.list() == before
    assert not [f for f in os.listdir(store.path) if f.startswith(".tmp-")]
    assert len([f for f in os.listdir(store.path) if f.endswith(".key")]) == 1


def test_leftover_temp_files_removed_on_open(store, caplog):
    fd = os.open(store.path / ".tmp-deadbeef", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"partial")
    os.close(fd)
    with caplog.at_level(logging.WARNING):
        KeyStore(store.path)
    assert not (store.path / ".tmp-deadbeef").exists()
    assert "interrupted write" in caplog.text


def test_corrupt_key_file_detected(store):
    r = store.add(bits(256), 0.0)
    p = store.path / f"{r.key_id}.key"
    data = bytearray(p.read_bytes())
    data[20] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(KeyStoreError, match="corrupt"):
        store.read(r.key_id)
    with pytest.raises(KeyStoreError, match="corrupt"):
        store.consume(8, "pad")
    assert store.available_bits() == 256


def test_key_file_readable_by_others_refused(store):
    r = store.add(bits(64), 0.0)
    (store.path / f"{r.key_id}.key").chmod(0o644)
    with pytest.raises(KeyStoreError, match="accessible by group or others"):
        store.read(r.key_id)


@pytest.mark.parametrize("text, match", [
    ("{", "not valid JSON"),
    ('{"format": "other"}', "not a qkdctl key store index"),
    ('{"format": "qkdctl-keystore", "version": 9, "keys": []}', "version: 9"),
    ('{"format": "qkdctl-keystore", "version": 1, "keys": [{}]}', r"keys\[0\]: key_id"),
])
def test_corrupt_index_reported(store, text, match):
    (store.path / "index.json").write_text(text)
    with pytest.raises(KeyStoreError, match=match) as e:
        KeyStore(store.path)
    assert "index.json" in str(e.value)


# ----------------------------------------------------------------------------------------
# no key material outside the key files

def test_index_usage_repr_and_logs_hold_no_key_material(store, caplog):
    b = bits(512)
    with caplog.at_level(logging.DEBUG, logger="qkdctl"):
        rec = store.add(b, 1e-12, {"bench": "sim"})
        store.consume(64, "authentication")
        store.add(bits(256), 0.0, key_id="pads")
        pos, pad = store.allocate_pad(0, 64, "tag pad")
        rec2 = store.add(bits(64), 0.0)
        store.read(rec2.key_id)
    index = (store.path / "index.json").read_bytes()
    doc = json.loads(index)
    assert set(doc) == {"format", "version", "keys"}
    assert set(doc["keys"][0]) == {"key_id", "n_bits", "eps", "created", "meta", "used_bits",
                                   "delivered", "pad_used"}
    texts = [index, (store.path / "usage.jsonl").read_bytes(), repr(rec).encode(),
             str(rec).encode(), repr(store).encode(), str(store).encode(),
             repr(store.list()).encode(), caplog.text.encode()]
    for form in material_forms(b) + [pad, pad.hex().encode()]:
        for t in texts:
            assert form not in t
    assert "KeyStore(" in repr(store) and rec.key_id in repr(rec)


# ----------------------------------------------------------------------------------------
# one-time pads for authentication

def test_pads_by_direction_positions_and_claims(fast_tmp):
    b1, b2 = bits(1000), bits(512)
    stream = np.concatenate([b1, b2])
    a, b = KeyStore(fast_tmp / "a"), KeyStore(fast_tmp / "b")
    for s in (a, b):
        s.add(b1, 0.0, key_id="k1")
        s.add(b2, 0.0, key_id="k2")
    assert a.get("k1").pad_region(0) == (0, 496) and a.get("k1").pad_region(1) == (496, 1000)
    sent = [a.allocate_pad(0, 128, f"message {i}") for i in range(5)]
    # three pads fit in k1's first half (496 bits), then k2's first half
    assert [p for p, _ in sent] == [0, 128, 256, 1000, 1128]
    for p, pad in sent:
        assert pad == np.packbits(stream[p:p + 128]).tobytes()
    for p, pad in reversed(sent):          # claims may come in any order
        assert b.claim_pad(0, p, 128, "received") == pad
    back = b.allocate_pad(1, 128, "reply")
    assert back[0] == 496 and a.claim_pad(1, 496, 128, "reply") == back[1]
    assert a.available_bits() == b.available_bits() == 1512 - 6 * 128
    with pytest.raises(ks_mod.PadUnavailableError, match=r"alice->bob pad at key bits "
                                                         r"128\.\.255 is used already"):
        b.claim_pad(0, 128, 128, "replayed")
    with pytest.raises(ks_mod.PadUnavailableError, match="outside the bob->alice pad part of "
                                                         "key k1"):
        b.claim_pad(1, 384, 128, "wrong direction")
    with pytest.raises(ks_mod.PadUnavailableError, match="outside the alice->bob pad part"):
        b.claim_pad(0, 400, 128, "spans the middle")
    with pytest.raises(ks_mod.PadUnavailableError, match="beyond the end of the key store "
                                                         r"\(1512 bits\)"):
        b.claim_pad(0, 5000, 128, "past the end")
    assert a.pad_bits_available(0) == 112    # k1's first half has 112 bits left, too few
    with pytest.raises(KeyExhaustedError, match="only 112 unused alice->bob pad bits left"):
        a.allocate_pad(0, 128, "one more")
    again = KeyStore(a.path)
    assert again.get("k1").pad_used == (((0, 384),), ((496, 624),))
    assert again.get("k2").pad_used == (((0, 256),), ())      # offsets within the block
    with pytest.raises(KeyStoreError, match="were used already"):
        again.read("k1")


def test_pads_and_consume_use_separate_blocks(store):
    store.add(bits(256), 0.0, key_id="x")
    store.add(bits(256), 0.0, key_id="y")
    store.consume(8, "hash key")                           # x is now a consumed block
    assert store.allocate_pad(0, 64, "pad")[0] == 256      # so pads start in y
    assert store.consume(248, "rest of x")                 # consume never touches y
    with pytest.raises(KeyExhaustedError):
        store.consume(8, "more")
    with pytest.raises(ks_mod.PadUnavailableError, match="key x is not available for pads"):
        store.claim_pad(1, 200, 8, "into x")
    r = store.add(bits(256), 0.0, key_id="z")
    store.read(r.key_id)
    with pytest.raises(ks_mod.PadUnavailableError, match="key z is not available for pads"):
        store.claim_pad(0, 512, 8, "into a delivered block")
    assert store.pad_bits_available(0) == 128 - 64 and store.pad_bits_available(1) == 128


def test_pad_marked_before_use(store, monkeypatch):
    store.add(bits(256), 0.0)
    real_save = KeyStore._save

    def save_then_crash(self, records):
        real_save(self, records)
        raise RuntimeError("simulated crash after the index was written")

    monkeypatch.setattr(KeyStore, "_save", save_then_crash)
    with pytest.raises(RuntimeError):
        store.allocate_pad(0, 128, "pad")
    monkeypatch.undo()
    assert KeyStore(store.path).pad_bits_available(0) == 0


@pytest.mark.parametrize("pads", ["[]", "[[], [[10, 5]]]", "[[[0, 200]], []]",
                                  "[[[0, 10], [5, 20]], []]", '[["a"], []]'])
def test_corrupt_pad_ranges_reported(store, pads):
    r = store.add(bits(256), 0.0)
    doc = json.loads((store.path / "index.json").read_text())
    doc["keys"][0]["pad_used"] = json.loads(pads)
    (store.path / "index.json").write_text(json.dumps(doc))
    with pytest.raises(KeyStoreError, match=r"keys\[0\]: pad_used"):
        KeyStore(store.path)
    assert r.key_id


@pytest.mark.parametrize("call", [
    lambda s: s.allocate_pad(2, 128, "x"), lambda s: s.allocate_pad(0, 100, "x"),
    lambda s: s.claim_pad(0, -1, 128, "x"), lambda s: s.allocate_pad(0, 128, " "),
])
def test_pad_arguments_checked(store, call):
    store.add(bits(256), 0.0)
    with pytest.raises(ValueError):
        call(store)
