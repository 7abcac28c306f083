"""Recording and replay: bit-for-bit replays, crash safety, write errors, bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from qkdctl.cli import main
from qkdctl.config import load_bench
from qkdctl.drivers import build_mock_bench
from qkdctl.errors import DataError
from qkdctl.recording import Recorder, Recording, RecordingError
from qkdctl.replay import describe_file, replay
from qkdctl.session import run_session

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"wall_s", "source", "config", "recording", "recording_complete", "keystore",
            "seconds", "key_ids"}


def bench_tags(cfg, seed, duration_s):
    """The tags the simulated bench gives when armed as a session arms it."""
    bench = build_mock_bench(cfg, seed)
    with bench["detectors"] as det, bench["laser"] as laser, bench["modulator"] as mod, \
            bench["tagger"] as tagger:
        det.bias_on()
        laser.output_on()
        mod.start()
        tagger.start()
        ts, ch = tagger.read_block(duration_s)
        t2, c2 = tagger.finish()
    return ts, ch, t2, c2


def stable(summary):
    """The summary without what depends on the wall clock or where keys were kept."""
    if isinstance(summary, dict):
        return {k: stable(v) for k, v in summary.items() if k not in VOLATILE}
    if isinstance(summary, list):
        return [stable(v) for v in summary]
    return summary


@pytest.fixture(scope="module")
def cfg():
    return load_bench()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, cfg):
    path = tmp_path_factory.mktemp("rec") / "run.h5"
    live = run_session(cfg, sifted_digest=True, duration_s=0.1, seed=11, record=str(path))
    return path, live


def test_replay_reproduces_the_live_run(recorded):
    path, live = recorded
    rep = replay(str(path), sifted_digest=True)
    assert rep["sifted_key_sha256"] == live["sifted_key_sha256"]
    assert stable(rep) == stable(live)
    assert rep["recording_complete"] is True


def test_replay_does_not_depend_on_block_size(recorded):
    path, live = recorded
    for block in (1000, 77_777):
        assert stable(replay(str(path), sifted_digest=True, block_tags=block)) == stable(live)


def test_recording_holds_every_tag_and_the_metadata(recorded, cfg):
    path, live = recorded
    ts, ch, t2, c2 = bench_tags(cfg, 11, 0.1)
    with Recording(path) as r:
        got_t = np.concatenate([b[0] for b in r.blocks()])
        got_c = np.concatenate([b[1] for b in r.blocks()])
        np.testing.assert_array_equal(got_t, np.concatenate([ts, t2]))
        np.testing.assert_array_equal(got_c, np.concatenate([ch, c2]))
        d = r.describe()
        assert d["complete"] and d["seed"] == 11 and d["pulses_sent"] == 100_000_000
        assert d["duration_s"] == pytest.approx(0.1)
        assert set(d["instruments"]) == {"laser", "modulator", "detectors", "tagger"}
        assert d["instruments"]["laser"]["identity"]["model"] == "MockLaser"
        assert d["calibration"]["delays_ps"] == {"1": 2500, "2": 2620, "3": 3180, "4": 2940}
        assert r.summary["sifted_key_sha256"] == live["sifted_key_sha256"]
        assert r.bench().raw == cfg.raw
    with h5py.File(path, "r") as f:  # a complete recording opens with plain h5py too
        assert f["photon_data/timestamps_specs/timestamps_unit"][()] == 1e-12
        assert f["identity/format_name"][()] == b"Photon-HDF5"
        assert f["photon_data/timestamps"].shape == (got_t.shape[0],)


def test_config_override_reanalyses(recorded, cfg, tmp_path):
    path, live = recorded
    text = cfg.text.replace("gate_width_ps = 300.0", "gate_width_ps = 60.0")
    text = text.replace("delay_ps = 2_500\n\n[[receiver.detectors]]",
                        "delay_ps = 2_560\n\n[[receiver.detectors]]", 1)
    # physics in the override is ignored: only [analysis] and delays count
    text = text.replace("fiber_length_km = 50.0", "fiber_length_km = 5.0")
    p = tmp_path / "narrow.toml"
    p.write_text(text)
    rep = replay(str(path), sifted_digest=True, config=load_bench(p))
    assert rep["pulses_sent"] == live["pulses_sent"]
    assert rep["detections_by_channel"] == live["detections_by_channel"]
    # a 60 ps gate keeps about 68 % of a 30 ps-jitter peak (+-1 sigma); shifted by 60 ps
    # (2 sigma) channel Z0 keeps about 16 %
    frac = {k: rep["detections_in_gate_by_channel"][k] / live["detections_in_gate_by_channel"][k]
            for k in live["detections_in_gate_by_channel"]}
    assert 0.6 < frac["Z1"] < 0.75 and 0.6 < frac["X0"] < 0.75
    assert 0.1 < frac["Z0"] < 0.22


def test_time_range(recorded):
    path, live = recorded
    whole = replay(str(path), sifted_digest=True)
    a = replay(str(path), sifted_digest=True, stop_s=0.05)
    b = replay(str(path), sifted_digest=True, start_s=0.05)
    with Recording(path) as r:
        ts = np.concatenate([x[0] for x in r.blocks()])
    t_cut = ts[0] + 50_000_000_000
    na = int((ts < t_cut).sum())
    assert sum(a["detections_by_channel"].values()) + a["sync_tags"] <= na
    tot = {k: a["detections_by_channel"][k] + b["detections_by_channel"][k]
           for k in whole["detections_by_channel"]}
    assert tot == whole["detections_by_channel"]
    # pulses of a range: from its first to its last sync, plus one sync period
    assert a["pulses_sent"] == pytest.approx(50_000_000, abs=2000)
    assert abs(a["detected_pulses"] + b["detected_pulses"] - whole["detected_pulses"]) < 10


def test_cli_record_replay_info(tmp_path, capsys):
    p = tmp_path / "cli.h5"
    assert main(["run", "--duration", "0.02", "--seed", "5", "--record", str(p), "--json",
                 "-q", "--sifted-digest"]) == 0
    live = json.loads(capsys.readouterr().out)
    assert main(["replay", str(p), "--json", "-q", "--sifted-digest"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["sifted_key_sha256"] == live["sifted_key_sha256"]
    assert stable(rep) == stable(live)
    assert main(["info", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "qkdctl" and info["complete"] is True
    assert info["n_tags"] == sum(live["detections_by_channel"].values()) + live["sync_tags"]
    assert main(["replay", str(p), "-q"]) == 0
    assert "QBER Z" in capsys.readouterr().out
    # a recording is never overwritten unless asked
    code = main(["run", "--duration", "0.01", "--record", str(p), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1
    assert main(["run", "--duration", "0.01", "--seed", "1", "--record", str(p),
                 "--overwrite", "-q"]) == 0


def _wait_for_tags(path: Path, n: int, proc, timeout: float = 120.0) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()
        if path.exists():
            try:
                with Recording(path) as r:
                    if r.n_tags >= n:
                        return r.n_tags
            except DataError:
                pass
        time.sleep(0.1)
    raise AssertionError("the recording did not grow")


def test_sigkill_leaves_a_readable_recording(tmp_path, cfg):
    p = tmp_path / "killed.h5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdctl.cli", "run", "--duration", "60", "--seed", "21",
         "--record", str(p), "--flush-interval", "0.2", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_tags(p, 2_000_000, proc)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    with Recording(p) as r:
        n = r.n_tags
        assert not r.complete and n >= 2_000_000
        ts = np.concatenate([b[0] for b in r.blocks()])
        ch = np.concatenate([b[1] for b in r.blocks()])
    # the tags on disk are exactly the start of the run's tag stream
    ref_t, ref_c, _, _ = bench_tags(cfg, 21, (int(ts[-1] - ts[0]) + 10**8) * 1e-12)
    np.testing.assert_array_equal(ts, ref_t[:n])
    np.testing.assert_array_equal(ch, ref_c[:n])
    rep = replay(str(p), sifted_digest=True)
    assert rep["recording_complete"] is False and rep["interrupted"] is True
    assert rep["detected_pulses"] > 0 and rep["qber"]["Z"] < 0.02


WRITE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8_000_000, 8_000_000))
    from qkdctl.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_write_error_stops_the_run_cleanly(tmp_path):
    """A file that cannot grow (as on a full disk): one-line error, file valid to last flush."""
    p = tmp_path / "full.h5"
    r = subprocess.run([sys.executable, "-c", WRITE_LIMIT, "run", "--duration", "5",
                        "--seed", "3", "--record", str(p), "--flush-interval", "0.05", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qkdctl: error: "), r.stderr
    assert "write failed" in lines[0] and str(p) in lines[0]
    assert "Traceback" not in r.stderr
    with Recording(p) as rec:
        assert rec.n_tags > 0 and not rec.complete
        ts = np.concatenate([b[0] for b in rec.blocks()])
        assert ts.shape[0] == rec.n_tags and np.all(np.diff(ts) >= 0)
    assert replay(str(p), sifted_digest=True)["detected_pulses"] > 0


def test_recorder_refuses_bad_options(tmp_path, cfg):
    from qkdctl.sequence import AliceSequence
    seq = AliceSequence.from_config(cfg.source, 1)
    with pytest.raises(RecordingError, match="compression"):
        Recorder(tmp_path / "a.h5", cfg, 1, seq, compression="zstd-max")
    with pytest.raises(RecordingError, match="flush interval"):
        Recorder(tmp_path / "a.h5", cfg, 1, seq, flush_interval_s=0)
    with pytest.raises(RecordingError, match="cannot create"):
        Recorder(tmp_path / "no" / "such" / "dir.h5", cfg, 1, seq)


def test_compressions_round_trip(tmp_path, cfg):
    for comp in ("none", "lzf", "bitshuffle-lz4"):
        p = tmp_path / f"{comp}.h5"
        live = run_session(cfg, duration_s=0.01, seed=4, record=str(p), compression=comp,
                           sifted_digest=True)
        rep = replay(str(p), sifted_digest=True)
        assert rep["sifted_key_sha256"] == live["sifted_key_sha256"]
        assert describe_file(str(p))["compression"] == comp


def _copy_truncated(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def test_bad_recordings_give_one_line_errors(recorded, tmp_path, capsys):
    path, _ = recorded
    cases = {
        "truncated": _copy_truncated(path, tmp_path / "trunc.h5", 0.5),
        "header only": _copy_truncated(path, tmp_path / "head.h5", 0.001),
        "not a tag file": tmp_path / "notes.txt",
        "empty": tmp_path / "empty.h5",
        "missing": tmp_path / "missing.h5",
    }
    cases["not a tag file"].write_text("hello\n")
    cases["empty"].write_bytes(b"")
    corrupt = tmp_path / "corrupt.h5"
    data = bytearray(path.read_bytes())
    data[200:4000] = os.urandom(3800)
    corrupt.write_bytes(bytes(data))
    cases["corrupted"] = corrupt
    for name, p in cases.items():
        for verb in ("replay", "info"):
            code = main([verb, str(p), "-q"] if verb == "replay" else [verb, str(p)])
            out, err = capsys.readouterr()
            lines = err.strip().splitlines()
            assert code == 2, (name, verb, out, err)
            assert len(lines) == 1 and lines[0].startswith("qkdctl: error: "), (name, err)
            assert str(p) in lines[0], (name, lines[0])
            assert "Traceback" not in err


def test_non_monotonic_timestamps_are_refused(tmp_path, cfg):
    p = tmp_path / "bad.h5"
    run_session(cfg, sifted_digest=True, duration_s=0.01, seed=2, record=str(p))
    with h5py.File(p, "r+") as f:
        ts = f["photon_data/timestamps"]
        ts[1000] = ts[999] - 5
    with pytest.raises(DataError, match=r"timestamps decrease at tag 1000"):
        replay(str(p), sifted_digest=True)


def test_ctrl_c_during_a_recorded_run_keeps_a_complete_recording(tmp_path):
    """Ctrl-C reaches the writer process too; the run still stops cleanly and closes the file."""
    p = tmp_path / "ctrlc.h5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdctl.cli", "-v", "run", "--duration", "30", "--seed", "9",
         "--record", str(p), "--json", "-q", "--sifted-digest"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_tags(p, 500_000, proc)
        os.killpg(proc.pid, signal.SIGINT)  # as the terminal does: the whole group
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    live = json.loads(out)
    assert live["interrupted"] is True and live["duration_s"] < 30
    with Recording(p) as r:
        assert r.complete
    rep = replay(str(p), sifted_digest=True)
    assert rep["sifted_key_sha256"] == live["sifted_key_sha256"]
    assert stable(rep) == stable(live)


SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared real-data folder {SHARED} is absent")
def test_convert_a_ptu_file_and_replay_it(tmp_path, capsys, caplog):
    src = SHARED / "picoquant" / "picoharp_v30_t2.ptu"
    out = tmp_path / "converted.h5"
    assert main(["convert", str(src), str(out), "--json"]) == 0
    conv = json.loads(capsys.readouterr().out)
    assert conv["tags"] == 920_177 and conv["format"] == "ptu"
    assert main(["replay", str(src), "--json", "-q"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert main(["replay", str(out), "--json", "-q"]) == 0
    again = json.loads(capsys.readouterr().out)
    for k in ("tags", "tags_by_channel", "first_timestamp_ps", "last_timestamp_ps",
              "duration_s"):
        assert again[k] == direct[k], k
    assert direct["tags_by_channel"] == {"0": 531_477, "1": 388_700}
    assert direct["first_timestamp_ps"] == 32486569 * 4
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["has_alice_sequence"] is False and info["converted_from"] == str(src)
    assert info["n_tags"] == 920_177
    # converted tags have no Alice sequence: --config has nothing to re-analyse (a warning)
    assert main(["replay", str(out), "--config", str(ROOT / "configs" / "sim.toml"), "-q"]) == 0
    assert "no Alice sequence" in caplog.text


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared real-data folder {SHARED} is absent")
def test_photon_hdf5_without_unit_via_the_cli(tmp_path, capsys):
    src = SHARED / "photon-hdf5" / "photon_hdf5_min.h5"
    code = main(["replay", str(src), "--json", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "--timestamps-unit" in err and "Traceback" not in err
    assert main(["replay", str(src), "--json", "-q", "--timestamps-unit", "5e-9"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tags"] == 1280 and d["tags_by_channel"] == {"0": 727, "1": 553}
