"""Alice and Bob as real processes on loopback, with the simulated table as a third.

Nothing is mocked: ``python -m qkdctl sim-table``, ``alice`` and ``bob`` talk
over TCP. Keys are compared inside the tests and never printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from netproxy import NetProxy
from twohosts import Hosts, bench_file, psk_file

from qkdctl.keystore import KeyStore
from qkdctl.rng import derive_key, role_seed
from qkdctl.sim.remote import RemoteTable

SEED = 5


@pytest.fixture
def hosts(tmp_path):
    h = Hosts(tmp_path, bench_file(tmp_path), seed=SEED)
    yield h
    h.close()


def keys(store_dir) -> dict[str, np.ndarray]:
    """Key ID -> bits of every key a session made in a store (read in the test, never
    printed)."""
    store = KeyStore(store_dir)
    return {r.key_id: store.read(r.key_id) for r in store.list() if "digest" in r.meta}


def assert_same_stores(ks) -> int:
    a, b = keys(ks / "alice"), keys(ks / "bob")
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    return len(a)


def qkdctl(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkdctl", *args], capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_split_session_gives_the_key_of_the_one_process_session(tmp_path):
    split = qkdctl("run", "--split", "--seed", "11", "--duration", "0.5", "--json",
                   "--keystore", str(tmp_path / "split"))
    assert split.returncode == 0, split.stderr.decode()
    one = qkdctl("run", "--seed", "11", "--duration", "0.5", "--json", "--keystore",
                 str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr.decode()
    s, o = json.loads(split.stdout), json.loads(one.stdout)
    alice, bob = s["alice"], s["bob"]
    assert bob["sifted_bits"] == alice["sifted_bits"] == o["sifted_bits"]
    assert bob["secret_bits"] == alice["secret_bits"] == o["secret_bits"] > 0
    assert bob["detected_pulses"] == o["detected_pulses"]
    assert alice["pulses_sent"] == bob["pulses_sent"] == o["pulses_sent"]
    assert bob["clock_drift_ppm"] == pytest.approx(o["clock_drift_ppm"])
    # the QBER both hosts report is the distillation's: the errors Cascade corrected
    blocks = o["distillation"]["blocks"]
    z = sum(b["ec_errors"] for b in blocks) / sum(b["key_bits"] for b in blocks)
    assert bob["qber"]["Z"] == alice["qber"]["Z"] == pytest.approx(z)
    assert abs(bob["qber"]["Z"] - o["qber"]["Z"]) < 5 * o["qber_std"]["Z"]
    n = assert_same_stores(tmp_path / "split")
    split_keys = keys(tmp_path / "split" / "alice")
    one_keys = keys(tmp_path / "one" / "alice")
    assert n == len(one_keys) >= 1
    assert all(np.array_equal(x, y) for x, y in
               zip(split_keys.values(), one_keys.values(), strict=True))
    for side in (alice, bob):
        assert side["distillation"]["key_ids"] == alice["distillation"]["key_ids"]


def test_bob_sifts_with_his_own_seed_only(hosts, tmp_path):
    """Bob's process gets role_seed(S, "bob"), from which Alice's sequence key cannot be
    had; sifting still agrees with Alice's (equal keys, QBER at the bench's 1 %)."""
    bob_seed = role_seed(SEED, "bob")
    assert bob_seed != SEED and derive_key(bob_seed, "alice") != derive_key(SEED, "alice")
    psk = psk_file(tmp_path)
    hosts.table()
    a = hosts.alice(psk=psk, keystore=tmp_path / "ks")
    b = hosts.bob(psk=psk, seed=bob_seed, keystore=tmp_path / "ks")
    assert b.finish() == 0, b.stderr
    assert a.finish() == 0, a.stderr
    assert int(b.args[b.args.index("--seed") + 1]) == bob_seed != SEED
    sb, sa = b.json(), a.json()
    assert 0.005 < sb["qber"]["Z"] < 0.02 and 0.005 < sb["qber"]["X"] < 0.02
    assert sb["secret_bits"] == sa["secret_bits"] > 0
    assert_same_stores(tmp_path / "ks")
    # the simulated table never tells Bob's side Alice's sequence
    from qkdctl.errors import InstrumentError
    from qkdctl.sim.server import Get

    with RemoteTable("127.0.0.1", hosts.table_port, "bob", hosts_cfg(hosts)) as t, \
            pytest.raises(InstrumentError, match="sequence"):
        t.request(Get("sequence"))


def hosts_cfg(hosts):
    from qkdctl.config import load_bench

    return load_bench(hosts.bench)


def remote_state(hosts, side: str, name: str):
    with RemoteTable("127.0.0.1", hosts.table_port, side, hosts_cfg(hosts)) as t:
        return getattr(t, name)


def wait_for_keys(ks, timeout: float = 120.0) -> None:
    """Until the first two-host keys are committed on both sides."""
    deadline = time.monotonic() + timeout
    while not all((ks / side / "index.json").exists() for side in ("alice", "bob")) \
            and time.monotonic() < deadline:
        time.sleep(0.05)


def next_session_reconciles(tmp_path, bench, psk, ks) -> None:
    """A new session (new table, new processes) starts by reconciling the stores: each
    side discards exactly its keys the other does not hold alike; after it both hold the
    same keys under the same IDs."""
    ids = {side: {r.key_id: r.meta["digest"] for r in KeyStore(ks / side).list()
                  if r.meta.get("link")} for side in ("alice", "bob")}
    h = Hosts(tmp_path, bench, seed=SEED + 1)
    try:
        h.table()
        a = h.alice(psk=psk, keystore=ks)
        b = h.bob(psk=psk, seed=2, keystore=ks, duration=0.3)
        assert b.finish() == 0, b.stderr
        assert a.finish() == 0, a.stderr
        rb, ra = b.json()["keystore_reconciliation"], a.json()["keystore_reconciliation"]
        assert rb["kept"] == ra["kept"] == len(ids["alice"].items() & ids["bob"].items())
        assert ra["discarded"] == [k for k in ids["alice"] if ids["bob"].get(k) !=
                                   ids["alice"][k]]
        assert rb["discarded"] == [k for k in ids["bob"] if ids["alice"].get(k) !=
                                   ids["bob"][k]]
        assert b.json()["distillation"]["blocks_with_key"] == 1
    finally:
        h.close()
    assert assert_same_stores(ks) == rb["kept"] + 1


@pytest.mark.parametrize("victim", ["alice", "bob"])
def test_a_host_killed_mid_run_stops_the_other_safely(hosts, tmp_path, victim):
    """SIGKILL one host: the other stops within a few seconds with one line, its
    instruments safe (Alice: laser off; Bob: detectors biased down); the next session
    makes the two key stores identical again."""
    psk, ks = psk_file(tmp_path), tmp_path / "ks"
    hosts.table()
    a = hosts.alice(psk=psk, keystore=ks)
    b = hosts.bob(psk=psk, seed=1, duration=30.0, keystore=ks)
    wait_for_keys(ks)
    killed, survivor = (a, b) if victim == "alice" else (b, a)
    killed.kill()
    t0 = time.monotonic()
    assert survivor.finish(timeout=30) not in (0, 3)
    assert time.monotonic() - t0 < 8.0
    last = [ln for ln in survivor.lines if ln.startswith("qkdctl")]
    assert len(last) == 1 and "did not come back within 2 s" in last[0], survivor.stderr
    if victim == "bob":
        assert remote_state(hosts, "alice", "laser_on") is False
    else:
        dets = remote_state(hosts, "bob", "detectors")
        assert dets and not any(d.biased for d in dets)
    hosts.close()
    next_session_reconciles(tmp_path, hosts.bench, psk, ks)


def test_table_killed_mid_run_stops_both(hosts, tmp_path):
    psk = psk_file(tmp_path)
    table = hosts.table()
    a = hosts.alice(psk=psk)
    b = hosts.bob(psk=psk, seed=1, duration=30.0)
    b.wait_for("session on")
    time.sleep(0.5)
    table.kill()
    t0 = time.monotonic()
    assert b.finish(timeout=30) != 0
    assert a.finish(timeout=30) != 0
    assert time.monotonic() - t0 < 8.0
    assert "sim table" in b.stderr.lower() or "127.0.0.1" in b.stderr


def test_wrong_pre_shared_key_stops_both_with_status_3(hosts, tmp_path):
    hosts.table()
    a = hosts.alice(psk=psk_file(tmp_path, "a"))
    b = hosts.bob(psk=psk_file(tmp_path, "b"), seed=1)
    assert b.finish(timeout=60) == 3, b.stderr
    assert a.finish(timeout=60) == 3, a.stderr
    assert "pre-shared keys differ" in a.stderr


def test_benches_that_differ_stop_both_naming_the_key(hosts, tmp_path):
    psk = psk_file(tmp_path)
    other = bench_file(tmp_path, "\n[postprocess]\nblock_bits = 1048576\n", name="other.toml")
    hosts.table()
    a = hosts.alice(psk=psk)
    b = hosts.bob(psk=psk, seed=1, bench=other)
    assert b.finish(timeout=60) == 2
    assert a.finish(timeout=60) == 2
    for p in (a, b):
        line = [ln for ln in p.lines if ln.startswith("qkdctl")][-1]
        assert "postprocess.block_bits" in line and "4194304" in line and "1048576" in line


def test_a_peer_that_is_not_qkdctl_is_dropped_and_the_session_goes_on(hosts, tmp_path):
    import socket

    psk = psk_file(tmp_path)
    hosts.table()
    a = hosts.alice(psk=psk, keystore=tmp_path / "ks")
    junk = socket.create_connection(("127.0.0.1", hosts.alice_port))
    junk.sendall(b"\x00\x00\x00\x10garbage-garbage!" * 4)
    b = hosts.bob(psk=psk, seed=1, keystore=tmp_path / "ks")
    assert b.finish() == 0, b.stderr
    assert a.finish() == 0, a.stderr
    junk.close()
    assert "dropped a connection" in a.stderr
    assert assert_same_stores(tmp_path / "ks") >= 1


def test_link_cut_and_restored_within_the_timeout_loses_nothing(hosts, tmp_path):
    psk = psk_file(tmp_path)
    hosts.table()
    a = hosts.alice(psk=psk, keystore=tmp_path / "ks")
    with NetProxy(("127.0.0.1", hosts.alice_port)) as proxy:
        b = hosts.bob(psk=psk, seed=1, duration=1.0, keystore=tmp_path / "ks",
                      alice_port=proxy.port)
        b.wait_for("session on")
        for _ in range(3):
            time.sleep(0.4)
            proxy.cut()
        assert b.finish() == 0, b.stderr
        assert a.finish() == 0, a.stderr
    sb, sa = b.json(), a.json()
    assert sb["link"]["reconnects"] >= 1
    assert sb["secret_bits"] == sa["secret_bits"] > 0
    assert assert_same_stores(tmp_path / "ks") >= 2


def test_link_down_for_good_stops_both_and_the_next_session_reconciles(hosts, tmp_path):
    psk, ks = psk_file(tmp_path), tmp_path / "ks"
    hosts.table()
    a = hosts.alice(psk=psk, keystore=ks)
    with NetProxy(("127.0.0.1", hosts.alice_port)) as proxy:
        b = hosts.bob(psk=psk, seed=1, duration=30.0, keystore=ks, alice_port=proxy.port)
        wait_for_keys(ks)
        proxy.block()
        proxy.cut()
        t0 = time.monotonic()
        assert b.finish(timeout=60) != 0
        assert a.finish(timeout=60) != 0
        assert time.monotonic() - t0 < 10
    for p in (a, b):
        assert "did not come back within 2 s" in p.stderr
    hosts.close()
    next_session_reconciles(tmp_path, hosts.bench, psk, ks)


def test_wegman_carter_between_two_hosts_keeps_the_stores_in_step(hosts, tmp_path):
    """Tags encrypted with pads from each host's own store: both stores start with the
    same key and end with the same pads used and the same new keys."""
    wc = bench_file(tmp_path, '\n[postprocess]\nauth = "wegman-carter"\n', name="wc.toml")
    ks = tmp_path / "ks"
    seed_key = np.random.default_rng(9).integers(0, 2, 1 << 20, dtype=np.uint8)
    for side in ("alice", "bob"):
        ks.mkdir(mode=0o700, exist_ok=True)
        KeyStore(ks / side).add(seed_key, 1e-9, {"source": "initial"}, key_id="initial")
    psk = psk_file(tmp_path)
    hosts.bench = wc
    hosts.table()
    a = hosts.alice(psk=psk, keystore=ks)
    b = hosts.bob(psk=psk, seed=1, keystore=ks)
    assert b.finish() == 0, b.stderr
    assert a.finish() == 0, a.stderr
    sa, sb = KeyStore(ks / "alice"), KeyStore(ks / "bob")
    ra, rb = sa.get("initial"), sb.get("initial")
    assert ra.pad_used == rb.pad_used and ra.pad_used_bits > 0
    assert assert_same_stores(ks) == b.json()["distillation"]["blocks_with_key"] >= 1


def test_a_tampered_message_stops_both_with_status_3(hosts, tmp_path):
    """A bit flipped on the path inside a message: its tag fails, that host stops on a
    tamper alarm and tells the other, which stops the same way; no key from the blocks
    not yet distilled."""
    psk = psk_file(tmp_path)
    hosts.table()
    a = hosts.alice(psk=psk, keystore=tmp_path / "ks")
    with NetProxy(("127.0.0.1", hosts.alice_port)) as proxy:
        b = hosts.bob(psk=psk, seed=1, duration=30.0, keystore=tmp_path / "ks",
                      alice_port=proxy.port)
        b.wait_for("session on")
        proxy.corrupt(up=True, after=200_000)
        assert a.finish(timeout=60) == 3, a.stderr
        assert b.finish(timeout=60) == 3, b.stderr
        assert proxy.corrupted
    assert "failed authentication" in a.stderr
    assert "TAMPER ALARM" in b.stderr and "failed authentication" in b.stderr
