"""Secret key from the simulated bench: the distillation pipeline end to end.

The secret length of each block is checked against the finite-key formula
evaluated on the block's reported inputs; the keys against each other and the
key store's file modes; the tamper alarms against the simulated eavesdropper.
"""

from __future__ import annotations

import copy
import json
import math
import os
import stat
import threading
import tomllib

import numpy as np
import pytest

from qkdctl import cli
from qkdctl.auth import AuthenticationError, LocalTransport
from qkdctl.config import default_bench_path, parse_bench
from qkdctl.keystore import KeyStore
from qkdctl.postprocess import cascade
from qkdctl.session import run_session

RAW = tomllib.loads(default_bench_path().read_text(encoding="utf-8"))
BLOCK = 1 << 20


def bench(attack: str = "none", fraction: float = 1.0, protocol: str | None = None, **pp):
    raw = copy.deepcopy(RAW)
    raw["postprocess"] = {"block_bits": BLOCK, "min_block_bits": 1 << 18, **pp}
    raw["sim"]["eavesdropper"] = {"attack": attack, "fraction": fraction}
    if protocol == "bb84-one-decoy":
        raw["bench"]["protocol"] = protocol
        raw["source"]["intensity_names"] = ["signal", "decoy"]
        raw["source"]["mean_photon_numbers"] = [0.5, 0.15]
        raw["source"]["intensity_probabilities"] = [0.8, 0.2]
    return parse_bench(raw, "distill.toml")


def h(x: float) -> float:
    return 0.0 if x <= 0 or x >= 1 else -x * math.log2(x) - (1 - x) * math.log2(1 - x)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    store = tmp_path_factory.mktemp("keys")
    s = run_session(bench(), duration_s=0.5, seed=11, keystore=store)
    return s, store


def test_honest_run_gives_secret_key(honest):
    s, _ = honest
    d = s["distillation"]
    assert not s["tamper_alarm"] and not s["aborted"] and s["abort_reason"] is None
    assert d["blocks_distilled"] >= 2
    assert s["secret_bits"] > 0
    assert s["secret_bits"] == sum(b["secret_bits"] for b in d["blocks"])
    assert s["secret_key_rate_bps"] == pytest.approx(s["secret_bits"] / s["duration_s"])
    # every sifted bit went into a block (the last one partial) or is reported
    assert sum(b["sifted_bits"] for b in d["blocks"]) + d["undistilled_bits"] == s["sifted_bits"]
    for b in d["blocks"]:
        assert b["verified"] is True
        if b["sifted_bits"] == BLOCK:  # a full block gives key; the last may be too short
            assert b["secret_bits"] > 0, b["abort_reason"]
        else:
            assert b["secret_bits"] > 0 or "phase-error bound" in b["abort_reason"]
        assert b["alarm"] is None
        assert b["key_bits"] == b["sifted_bits"] - b["sample_bits"]
        # Cascade found exactly the errors the in-process comparison counts overall
        q = b["ec_errors"] / b["key_bits"]
        assert abs(q - s["qber"]["Z"]) < 5 * math.sqrt(q / b["key_bits"]) + 1e-3
        assert b["ec_efficiency"] == pytest.approx(b["ec_leaked_bits"] / (b["key_bits"] * h(q)))
        assert 1.0 < b["ec_efficiency"] < 1.15


def test_secret_length_is_the_bound(honest):
    """l = floor(s0 + s1 (1 - h(phi)) - leak - 6 log2(21/eps_sec) - log2(2/eps_cor))
    (Lim et al. 2014, Eq. 1) with the leak = Cascade's parities + the verification
    tag beyond log2(2/eps_cor), from the block's own reported figures."""
    s, _ = honest
    for b in s["distillation"]["blocks"]:
        fk = b["finite_key"]
        leak = b["ec_leaked_bits"] + fk["leak_verification_bits"]
        assert fk["leak_ec_bits"] == leak
        eps_sec, eps_cor = fk["eps_sec"], fk["eps_cor"]
        ell = (fk["s0_lower"] + fk["s1_lower"] * (1 - h(fk["phase_error_bound"])) - leak
               - 6 * math.log2(21 / eps_sec) - math.log2(2 / eps_cor))
        tol = 0.11  # postprocess.phase_error_tolerance
        assert fk["aborted"] == (fk["phase_error_bound"] >= tol or fk["s1_lower"] <= 0)
        assert b["secret_bits"] == (0 if fk["aborted"] else max(0, math.floor(ell)))
        # the bounds hold against the truth of the simulation: the phase error of
        # single photons cannot be below the observed test-basis QBER by much
        assert fk["phase_error_bound"] > 0.8 * b["qber_test"]
        assert fk["s1_lower"] < b["key_bits"]


def test_keys_are_stored_secret_and_equal(honest):
    s, store = honest
    ids = s["distillation"]["key_ids"]
    assert len(ids) == s["distillation"]["blocks_with_key"]
    alice, bob = KeyStore(store / "alice"), KeyStore(store / "bob")
    total = 0
    for key_id in ids:
        ra, rb = alice.get(key_id), bob.get(key_id)
        assert ra.n_bits == rb.n_bits
        assert ra.eps == pytest.approx(s["distillation"]["eps_sec"] + s["distillation"]["eps_cor"])
        ka, kb = alice.read(key_id), bob.read(key_id)
        np.testing.assert_array_equal(ka, kb)
        # a secret key looks uniform
        assert abs(ka.mean() - 0.5) < 5 * 0.5 / math.sqrt(ka.size)
        total += ra.n_bits
    assert total == s["secret_bits"]
    for side in ("alice", "bob"):
        d = store / side
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        for f in d.iterdir():
            if f.suffix == ".key":
                assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    # nothing of the keys in the summary
    text = json.dumps(cli._json_safe(s))
    assert "keys" not in s["distillation"]["blocks"][0]
    assert len(text) < 200_000


def test_one_decoy_protocol(tmp_path):
    s = run_session(bench(protocol="bb84-one-decoy"), duration_s=0.5, seed=5,
                    keystore=False)
    d = s["distillation"]
    assert d["protocol"] == "bb84-one-decoy" and not s["tamper_alarm"]
    assert s["secret_bits"] > 0
    for b in d["blocks"]:
        fk = b["finite_key"]
        leak = fk["leak_ec_bits"]
        ell = (fk["s0_lower"] + fk["s1_lower"] * (1 - h(fk["phase_error_bound"])) - leak
               - 6 * math.log2(19 / fk["eps_sec"]) - math.log2(2 / fk["eps_cor"]))
        assert b["secret_bits"] == (0 if fk["aborted"] else max(0, math.floor(ell)))


# ------------------------------------------------------------------------ tamper alarms
def test_intercept_resend_raises_the_alarm(tmp_path):
    s = run_session(bench("intercept-resend", 1.0, block_bits=1 << 18), duration_s=0.3,
                    seed=3, keystore=tmp_path / "keys")
    assert s["tamper_alarm"] and s["aborted"]
    assert "QBER" in s["abort_reason"] and "intercept-resend" in s["abort_reason"]
    assert s["secret_bits"] == 0
    assert 0.22 < s["qber"]["Z"] < 0.28
    b = s["distillation"]["blocks"][0]
    assert b["alarm"] and b["ec_leaked_bits"] == 0   # stopped before error correction
    # the run stopped after the alarm: less bench time than asked for
    assert s["duration_s"] < 0.3
    assert not list((tmp_path / "keys" / "alice").glob("*.key"))


def test_pns_attack_is_caught_by_the_decoys():
    s = run_session(bench("pns", 1.0), duration_s=0.3, seed=4, keystore=False)
    assert s["qber"]["Z"] < 0.03           # the QBER alone shows nothing
    assert s["tamper_alarm"] and s["secret_bits"] == 0
    assert "single-photon" in s["abort_reason"]
    b = s["distillation"]["blocks"][0]
    assert b["verified"] is True
    assert b["finite_key"]["point_estimates"]["s1_key"] <= 0


def test_partial_attack_shrinks_the_key(honest):
    s0, _ = honest
    s = run_session(bench("intercept-resend", 0.1), duration_s=0.5, seed=11, keystore=False)
    assert s["qber"]["Z"] > s0["qber"]["Z"] + 0.005
    frac = s["secret_bits"] / s["sifted_bits"]
    frac0 = s0["secret_bits"] / s0["sifted_bits"]
    assert frac < 0.8 * frac0
    # either a smaller key or no key; never an alarm-free key at the honest rate
    for b in s["distillation"]["blocks"]:
        if b["secret_bits"]:
            assert b["finite_key"]["phase_error_bound"] > max(
                x["finite_key"]["phase_error_bound"] for x in s0["distillation"]["blocks"])


def test_cli_exit_code_3_on_alarm(tmp_path, capsys):
    p = tmp_path / "eve.toml"
    text = default_bench_path().read_text(encoding="utf-8")
    text += ('\n[sim.eavesdropper]\nattack = "intercept-resend"\nfraction = 1.0\n'
             f'\n[postprocess]\nblock_bits = {BLOCK}\n')
    p.write_text(text)
    rc = cli.main(["run", "--config", str(p), "--duration", "0.2", "--seed", "1", "--json",
                   "-q", "--no-keystore"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 3
    assert out["tamper_alarm"] is True and out["secret_bits"] == 0
    for k in ("secret_bits", "ec_efficiency", "ec_leaked_bits", "phase_error_bound",
              "aborted", "abort_reason"):
        assert k in out


def test_cli_json_keys_of_an_honest_run(tmp_path, capsys):
    rc = cli.main(["run", "--duration", "0.2", "--seed", "2", "--json", "-q",
                   "--keystore", str(tmp_path / "ks")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["aborted"] is False and out["abort_reason"] is None
    for k in ("secret_bits", "ec_efficiency", "ec_leaked_bits", "phase_error_bound"):
        assert out[k] is not None
    assert "sifted_key_sha256" not in out


# ------------------------------------------------------------------------ channel tampering
def _tamper_nth_frame(monkeypatch, n: int, how: str):
    """Make the n-th frame sent on any in-process transport arrive damaged."""
    orig = LocalTransport.send_bytes
    count = {"n": 0}

    def send_bytes(self, data):
        with lock:
            count["n"] += 1
            if count["n"] == n:
                if how == "flip":
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0x10
                    data = bytes(data)
                elif how == "truncate":
                    data = data[: len(data) // 2]
                elif how == "replay":
                    orig(self, data)
        return orig(self, data)

    lock = threading.Lock()

    monkeypatch.setattr(LocalTransport, "send_bytes", send_bytes)


@pytest.mark.parametrize("how", ["flip", "truncate", "replay"])
def test_tampered_message_stops_the_session(monkeypatch, tmp_path, how):
    _tamper_nth_frame(monkeypatch, 7, how)
    with pytest.raises(AuthenticationError):
        run_session(bench(), duration_s=0.2, seed=9, keystore=tmp_path / "ks")
    assert not list((tmp_path / "ks" / "bob").glob("*.key"))


def test_tampered_message_exit_code(monkeypatch, capsys):
    _tamper_nth_frame(monkeypatch, 5, "flip")
    rc = cli.main(["run", "--duration", "0.1", "--seed", "1", "-q", "--no-keystore"])
    assert rc == 3
    assert "TAMPER ALARM" in capsys.readouterr().err


def test_verification_failure_discards_the_block(monkeypatch):
    """A residual error after Cascade is caught by the hash: no key from that block."""
    real = cascade.CascadeBob.result

    def bad_result(self):
        r = real(self)
        c = r.corrected.copy()
        c[len(c) // 3] ^= 1
        return cascade.CascadeResult(c, r.leaked_bits, r.rounds, r.flipped, r.passes)

    monkeypatch.setattr(cascade.CascadeBob, "result", bad_result)
    s = run_session(bench(), duration_s=0.2, seed=9, keystore=False)
    d = s["distillation"]
    assert d["blocks_failed_verification"] == d["blocks_distilled"] >= 1
    assert s["secret_bits"] == 0 and not s["tamper_alarm"]
    assert all("verification failed" in b["abort_reason"] for b in d["blocks"])


# ------------------------------------------------------------------------ leaks and options
def test_sifted_digest_is_paid_for():
    """The summary's SHA-256 of the sifted key discloses 256 bits: every block's
    leak term grows by exactly that much."""
    plain = run_session(bench(), duration_s=0.25, seed=21, keystore=False)
    digest = run_session(bench(), duration_s=0.25, seed=21, keystore=False, sifted_digest=True)
    assert "sifted_key_sha256" not in plain and len(digest["sifted_key_sha256"]) == 64
    for a, b in zip(plain["distillation"]["blocks"], digest["distillation"]["blocks"],
                    strict=True):
        assert b["ec_leaked_bits"] == a["ec_leaked_bits"]   # same seed, same exchange
        assert b["finite_key"]["leak_ec_bits"] == a["finite_key"]["leak_ec_bits"] + 256
        if a["secret_bits"] and b["secret_bits"]:
            assert b["secret_bits"] in (a["secret_bits"] - 256, a["secret_bits"] - 257)


def test_same_seed_same_secret_key(tmp_path):
    """On the simulated bench the distillation's choices come from the seed."""
    runs = [run_session(bench(), duration_s=0.25, seed=33, keystore=tmp_path / f"k{i}")
            for i in range(2)]
    assert runs[0]["secret_bits"] == runs[1]["secret_bits"] > 0
    ka = [KeyStore(tmp_path / f"k{i}" / "alice") for i in range(2)]
    ids = [r["distillation"]["key_ids"] for r in runs]
    for i0, i1 in zip(ids[0], ids[1], strict=True):
        assert i0 != i1  # key IDs are unique even so
        np.testing.assert_array_equal(ka[0].read(i0), ka[1].read(i1))


def test_wegman_carter_authentication(tmp_path):
    """Tags encrypted with pads from the key stores: both stores start with the same
    key; each message costs its pad on both sides."""
    store = tmp_path / "ks"
    rng = np.random.default_rng(5)
    seed_key = rng.integers(0, 2, 1 << 20, dtype=np.uint8)
    for side in ("alice", "bob"):
        (store).mkdir(mode=0o700, exist_ok=True)
        KeyStore(store / side).add(seed_key, 1e-9, {"source": "initial"}, key_id="initial")
    s = run_session(bench(auth="wegman-carter"), duration_s=0.25, seed=7, keystore=store)
    assert s["secret_bits"] > 0 and not s["tamper_alarm"]
    a, b = KeyStore(store / "alice"), KeyStore(store / "bob")
    ra, rb = a.get("initial"), b.get("initial")
    assert ra.pad_used == rb.pad_used and ra.pad_used_bits > 0
    assert ra.pad_used_bits % 128 == 0
    assert len(a.list()) == 1 + len(s["distillation"]["key_ids"])


def test_wegman_carter_needs_key(tmp_path):
    from qkdctl.auth import PadExhaustedError

    with pytest.raises(PadExhaustedError):
        run_session(bench(auth="wegman-carter"), duration_s=0.05, seed=7,
                    keystore=tmp_path / "empty")


def test_small_honest_blocks_raise_no_alarm():
    """Blocks far too short for the finite-key bound give no key, and no alarm: the
    point estimates must fail by 5 sigma before they count as an attack."""
    s = run_session(bench(block_bits=4096, min_block_bits=1024), duration_s=0.05, seed=2,
                    keystore=False)
    d = s["distillation"]
    assert d["blocks_distilled"] >= 20
    assert not s["tamper_alarm"], s["abort_reason"]


def test_point_estimate_spread_matches_poisson():
    """The reported sigma of s1 equals the spread of s1 over Poisson-drawn counts."""
    from qkdctl.postprocess.distill import point_estimates

    rng = np.random.default_rng(3)
    mu, p = (0.5, 0.1, 2e-4), (0.5, 0.3, 0.2)
    n_mean = np.array([2e5, 3e4, 40.0])
    m_mean = n_mean * 0.01
    s1 = []
    for _ in range(2000):
        n = rng.poisson(n_mean)
        s1.append(point_estimates("bb84-decoy", mu, p, n, rng.poisson(m_mean), n,
                                  rng.poisson(m_mean))["s1_key"])
    pe = point_estimates("bb84-decoy", mu, p, n_mean, m_mean, n_mean, m_mean)
    assert np.std(s1) == pytest.approx(pe["s1_key_sigma"], rel=0.08)
    assert np.mean(s1) == pytest.approx(pe["s1_key"], abs=4 * pe["s1_key_sigma"] / 40)


def test_the_last_block_of_a_session_trades_disclosure_for_round_trips():
    """The block cut when the acquisition ends is distilled with deeper Cascade bursts
    (nothing overlaps its round trips): fewer rounds, a little more disclosed."""
    from qkdctl.postprocess import cascade
    from qkdctl.postprocess.distill import LAST_BLOCK_BURST, _schedule

    n, q = 1 << 20, 0.011
    plain, last = _schedule(n, q, False), _schedule(n, q, True)
    assert plain == cascade.choose_schedule(n, q)
    assert last.burst_levels == LAST_BLOCK_BURST[0] > plain.burst_levels
    assert last.burst_width == int(n * q * LAST_BLOCK_BURST[1]) > plain.burst_width
    rng = np.random.default_rng(8)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = a ^ (rng.random(n) < q).astype(np.uint8)
    r_plain = cascade.reconcile(a, b, q, 5, schedule=plain)
    r_last = cascade.reconcile(a, b, q, 5, schedule=last)
    assert np.array_equal(r_last.corrected, a) and np.array_equal(r_plain.corrected, a)
    assert r_last.rounds < 0.85 * r_plain.rounds
    assert r_plain.leaked_bits < r_last.leaked_bits < 1.1 * r_plain.leaked_bits


def test_only_the_block_cut_at_the_end_is_the_last():
    from qkdctl.postprocess.stream import SideBuffer

    buf = SideBuffer.empty()
    z = np.zeros(100, np.uint8)
    buf.add(z, z, z[:10], z[:10])
    assert not buf.cut(0, 60).last
    assert buf.cut(1, 40, last=True).last
