"""The ``qkdctl`` command: ``qkdctl.cli.main(argv)`` in-process, and the installed script.

User errors must give a non-zero exit status and one line on stderr, never a
traceback: ``qkdctl: error: ...`` for errors qkdctl reports, and argparse's own
``usage: ...`` / ``qkdctl run: error: argument ...`` (exit status 2) for arguments of
the wrong type.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qkdctl.session
from qkdctl.cli import main
from qkdctl.config import default_bench_path
from qkdctl.drivers import MockTimeTagger
from qkdctl.errors import InstrumentError

SIM_TEXT = default_bench_path().read_text(encoding="utf-8")
REQUIRED_KEYS = ("pulses_sent", "detections_by_channel", "sifted_bits", "qber",
                 "counts_by_intensity", "duration_s")


def run_cli(capsys, *argv):
    """Call main(argv); returns (exit status, stdout, stderr). argparse exits via SystemExit."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def qkdctl_script() -> str:
    """The installed console script (next to this interpreter; else on PATH)."""
    p = Path(sys.executable).parent / "qkdctl"
    if p.exists():
        return str(p)
    found = shutil.which("qkdctl")
    if found is None:
        pytest.skip("the qkdctl script is not installed")
    return found


def bench_variant(tmp_path: Path, old: str, new: str, count: int = 1) -> Path:
    """configs/sim.toml with the first ``count`` occurrences of old replaced by new."""
    assert old in SIM_TEXT, f"test bug: {old!r} not in sim.toml"
    p = tmp_path / "bench.toml"
    p.write_text(SIM_TEXT.replace(old, new, count), encoding="utf-8")
    return p


def check_summary(s, duration_s=None):
    for key in REQUIRED_KEYS:
        assert key in s, f"summary has no {key!r}"
    assert set(s["qber"]) == {"Z", "X"}
    assert set(s["counts_by_intensity"]) == {"signal", "decoy", "vacuum"}
    if duration_s is not None:
        assert s["duration_s"] == pytest.approx(duration_s)
    assert s["pulses_sent"] == round(s["duration_s"] * 1e9)
    by_int = s["counts_by_intensity"].values()
    assert sum(d["detections"] for d in by_int) == s["detected_pulses"]
    for b in ("Z", "X"):
        assert sum(d["sifted"][b] for d in by_int) == s["sifted_bits_by_basis"][b]
        assert s["qber"][b] == pytest.approx(s["errors"][b] / s["sifted_bits_by_basis"][b])
    assert s["sifted_bits"] == s["sifted_bits_by_basis"]["Z"] > 0
    assert set(s["detections_by_channel"]) == {"Z0", "Z1", "X0", "X1"}
    assert all(v > 0 for v in s["detections_by_channel"].values())
    assert 0.005 < s["qber"]["Z"] < 0.02


def no_traceback(*texts):
    for t in texts:
        assert "Traceback" not in t, t


def without_wall(s):
    """The summary without what depends on the wall clock: timings, new key IDs."""
    if isinstance(s, dict):
        return {k: without_wall(v) for k, v in s.items()
                if k not in ("wall_s", "seconds", "key_ids")}
    if isinstance(s, list):
        return [without_wall(v) for v in s]
    return s


# ------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def json_run():
    """`qkdctl run --json --duration 0.05 --seed 3`, in-process (exit status, stdout, stderr)."""
    mp = pytest.MonkeyPatch()
    import io
    out, err = io.StringIO(), io.StringIO()
    mp.setattr(sys, "stdout", out)
    mp.setattr(sys, "stderr", err)
    try:
        code = main(["run", "--json", "--duration", "0.05", "--seed", "3"])
    finally:
        mp.undo()
    return code, out.getvalue(), err.getvalue()


def test_run_json(json_run):
    code, out, err = json_run
    assert code == 0
    s = json.loads(out)   # the whole of stdout is one JSON document ...
    assert isinstance(s, dict)   # ... and it is an object
    check_summary(s, 0.05)
    assert s["seed"] == 3 and s["interrupted"] is False
    no_traceback(out, err)


def test_run_text_summary(json_run, capsys):
    s = json.loads(json_run[1])
    code, out, err = run_cli(capsys, "run", "--duration", "0.05", "--seed", "3")
    assert code == 0
    no_traceback(out, err)
    lines = out.splitlines()
    assert "seed 3" in lines[0]
    for b in ("Z", "X"):
        row = [ln for ln in lines if ln.strip().startswith(f"QBER {b}")]
        assert len(row) == 1, f"no single QBER {b} line in\n{out}"
        assert f"{100 * s['qber'][b]:.3f} %" in row[0]
        assert f"{s['errors'][b]:,} errors in {s['sifted_bits_by_basis'][b]:,}" in row[0]
    for name, d in s["counts_by_intensity"].items():
        row = [ln for ln in lines if ln.split()[:1] == [name]]
        assert len(row) == 1, f"no single row for {name} in\n{out}"
        assert f"{d['detections']:,}" in row[0] and f"{d['sifted']['Z']:,}" in row[0]
    assert f"{s['sifted_bits']:,} bits" in out


def test_run_without_seed_reports_a_seed_that_reproduces_it(capsys):
    code, out, _ = run_cli(capsys, "run", "--json", "--duration", "0.02")
    assert code == 0
    a = json.loads(out)
    assert isinstance(a["seed"], int)
    code, out, _ = run_cli(capsys, "run", "--json", "--duration", "0.02", "--seed",
                           str(a["seed"]))
    assert code == 0
    assert without_wall(json.loads(out)) == without_wall(a)


def test_run_with_explicit_config_file(tmp_path, capsys):
    p = bench_variant(tmp_path, 'name = "sim-1GHz-50km"', 'name = "my-bench"')
    code, out, err = run_cli(capsys, "run", "--config", str(p), "--json", "--duration",
                             "0.02", "--seed", "1")
    assert code == 0, err
    s = json.loads(out)
    assert s["bench"] == "my-bench" and s["config"] == str(p)
    check_summary(s, 0.02)


# ------------------------------------------------------------------------ bad inputs


BAD_CONFIGS = {
    # name: (old, new, count, what the message must name)
    "efficiency above 1": ("efficiency = 0.6", "efficiency = 1.5", 1,
                           ["sim.detectors[0].efficiency", "1.5"]),
    "unknown key": ("rep_rate_hz = 1.0e9", "rep_rate_hz = 1.0e9\ncolour = 'blue'", 1,
                    ["source.colour", "unknown key"]),
    "not TOML": ("[bench]", "[bench", 1, ["not valid TOML"]),
    "wrong type": ("fiber_length_km = 50.0", 'fiber_length_km = "fifty"', 1,
                   ["sim.fiber_length_km", "expected a number"]),
    "current above limit": ("current_ma = 45.0", "current_ma = 75.0", 1,
                            ["instruments.laser", "current_ma", "75"]),
    "no sim table": ("[sim]", "[simulation]", 1, ["simulation", "unknown table"]),
    "unknown laser setting": ("temperature_c = 25.0 }", "temperature_c = 25.0, colour = 1 }",
                              1, ["instruments.laser.settings.colour", "unknown setting"]),
    "missing instrument": ('[instruments.tagger]\ndriver = "mock"', "", 1,
                           ["[instruments.tagger]", "missing"]),
    "unknown role": ('[instruments.tagger]', '[instruments.camera]\ndriver = "mock"\n\n'
                     '[instruments.tagger]', 1, ["instruments.camera", "unknown instrument"]),
    "unknown driver": ('driver = "mock"', 'driver = "nosuch"', 4,
                       ["instruments.laser.driver", "unknown driver 'nosuch'"]),
    "mixed drivers": ('[instruments.tagger]\ndriver = "mock"',
                      '[instruments.tagger]\ndriver = "nosuch"', 1,
                      ["instruments.tagger.driver", "'nosuch'", "cannot be combined"]),
}


def check_one_line_error(code, out, err, *needles):
    assert code != 0
    assert out == "", f"stdout should be empty on error, got {out!r}"
    no_traceback(out, err)
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("qkdctl: error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_file(tmp_path, capsys, case):
    old, new, count, needles = BAD_CONFIGS[case]
    p = bench_variant(tmp_path, old, new, count)
    code, out, err = run_cli(capsys, "run", "--config", str(p), "--duration", "0.02")
    check_one_line_error(code, out, err, str(p), *needles)
    assert code == 2


def test_nonexistent_config_file(tmp_path, capsys):
    p = tmp_path / "no-such-bench.toml"
    code, out, err = run_cli(capsys, "run", "--config", str(p))
    check_one_line_error(code, out, err, str(p), "no such bench file")


def test_config_is_a_directory(tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", "--config", str(tmp_path))
    check_one_line_error(code, out, err, str(tmp_path))


@pytest.mark.parametrize("argv, needle", [
    (["--duration", "-1"], "--duration"),
    (["--duration", "0"], "--duration"),
    (["--duration", "abc"], "--duration"),
    (["--duration", "nan"], "--duration"),
    (["--duration", "inf"], "--duration"),
    (["--seed", "xyz"], "--seed"),
    (["--seed", "-5"], "--seed"),
    (["--seed", "1.5"], "--seed"),
    (["--seed", str(2**63)], "--seed"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_argparse_format(capsys, argv, needle):
    code, out, err = run_cli(capsys, "run", *argv)
    assert code == 2
    assert out == ""
    no_traceback(out, err)
    lines = err.splitlines()
    assert lines[0].startswith("usage: qkdctl"), err
    assert lines[-1].startswith("qkdctl"), err
    assert ": error: " in lines[-1] and needle in lines[-1], err
    # the usage text (possibly wrapped) and exactly one error line
    assert sum(": error: " in ln for ln in lines) == 1, err


def test_seed_accepts_hex(capsys):
    code, out, err = run_cli(capsys, "run", "--json", "--duration", "0.02", "--seed", "0x10")
    assert code == 0, err
    assert json.loads(out)["seed"] == 16


# ------------------------------------------------------------- failures during a run


@pytest.fixture
def captured_bench(mocker):
    """The bench the CLI builds, for inspection after the run."""
    return mocker.spy(qkdctl.session, "build_bench")


def assert_bench_safe(bench):
    t = bench["laser"].table
    assert t.laser_on is False
    assert not any(d.biased for d in t.detectors)
    assert bench["tagger"]._get_running() is False
    assert bench["modulator"]._get_running() is False


def test_instrument_error_during_run(capsys, mocker, captured_bench):
    real = MockTimeTagger.read_block
    calls = []

    def read_block(self, duration_s):
        calls.append(duration_s)
        if len(calls) == 3:
            raise InstrumentError("tagger: read_block: lost the USB link")
        return real(self, duration_s)

    mocker.patch.object(MockTimeTagger, "read_block", read_block)
    code, out, err = run_cli(capsys, "run", "--json", "--duration", "0.1", "--seed", "1")
    check_one_line_error(code, out, err, "tagger: read_block: lost the USB link")
    assert code == 2
    assert len(calls) == 3
    assert_bench_safe(captured_bench.spy_return)


def test_keyboard_interrupt_during_run_aborts(capsys, mocker, captured_bench):
    mocker.patch.object(MockTimeTagger, "read_block", side_effect=KeyboardInterrupt)
    code, out, err = run_cli(capsys, "run", "--json", "--duration", "0.1", "--seed", "1")
    assert code == 130
    assert out == ""
    no_traceback(out, err)
    assert err.splitlines() == ["qkdctl: aborted"]
    assert_bench_safe(captured_bench.spy_return)


def test_sigint_in_process_prints_partial_summary(capsys, mocker):
    """First Ctrl-C during the run: exit 130 with the summary of what ran."""
    real = MockTimeTagger.read_block
    calls = []

    def read_block(self, duration_s):
        calls.append(duration_s)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, duration_s)

    mocker.patch.object(MockTimeTagger, "read_block", read_block)
    code, out, err = run_cli(capsys, "run", "--json", "--duration", "1", "--seed", "1")
    assert code == 130
    no_traceback(out, err)
    s = json.loads(out)
    assert s["interrupted"] is True
    check_summary(s, 0.03)


# --------------------------------------------------------------- the installed script


def test_installed_script_runs(json_run):
    r = subprocess.run([qkdctl_script(), "run", "--json", "--duration", "0.05", "--seed", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    no_traceback(r.stdout, r.stderr)
    s = json.loads(r.stdout)
    check_summary(s, 0.05)
    # the same run as in-process, bit for bit
    assert without_wall(s) == without_wall(json.loads(json_run[1]))


def test_ctrl_c_on_installed_script():
    """SIGINT during `qkdctl run --duration 30`: exit 130, a valid partial JSON summary.

    ``-v`` logs "session on ..." once the bench is armed and the SIGINT handler is in
    place; the signal is sent 0.5 s after that line.
    """
    argv = [qkdctl_script(), "-v", "run", "--duration", "30", "--seed", "1", "--json"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    out_parts: list[str] = []
    started = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            err_lines.append(line)
            if "session on" in line:
                started.set()

    readers = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=lambda: out_parts.append(proc.stdout.read()),
                                daemon=True)]
    for r in readers:
        r.start()
    try:
        assert started.wait(60), "run did not start within 60 s:\n" + "".join(err_lines)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        t_sig = time.monotonic()
        code = proc.wait(timeout=max(1.0, 60 - (time.monotonic() - t0)))
        t_end = time.monotonic()
    finally:
        if proc.poll() is None:   # did not stop within 60 s: kill it (the test fails)
            proc.kill()
            proc.wait()
        for r in readers:
            r.join(10)
    out = "".join(out_parts)
    err = "".join(err_lines)
    assert code == 130, err
    assert t_end - t_sig < 30, "the run did not stop promptly after SIGINT"
    no_traceback(out, err)
    assert "stop requested" in err
    s = json.loads(out)
    assert s["interrupted"] is True
    assert 0 < s["duration_s"] < 30
    check_summary(s)
    # stopped at a block boundary (blocks of 10 ms of bench time)
    assert math.isclose(s["duration_s"] * 100, round(s["duration_s"] * 100), abs_tol=1e-6)


def test_keyrate_through_the_cli(capsys):
    """`qkdctl keyrate` on the built-in bench: rows at the asked distances, the
    rate falling with distance and below the PLOB bound."""
    from qkdctl.config import default_bench_path

    rc = main(["keyrate", "--config", str(default_bench_path()), "--distances", "25:75:25",
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert [r["distance_km"] for r in rows] == [25.0, 50.0, 75.0]
    rates = [r["secret_bits_per_pulse"] for r in rows]
    assert rates[0] > rates[1] > rates[2] > 0
    assert all(r["secret_bits_per_pulse"] < r["plob_bits_per_pulse"] for r in rows)
    with pytest.raises(SystemExit) as e:
        main(["keyrate", "--distances", "oops"])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_instruments_list_identify_status(capsys):
    assert main(["instruments", "list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["instruments"]) == {"laser", "modulator", "detectors", "tagger"}
    assert out["drivers"]["mock"] == ["laser", "modulator", "detectors", "tagger",
                                     "polarization"]
    assert main(["instruments", "identify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    laser = out["instruments"]["laser"]
    assert laser["ok"] and laser["identity"]["model"] == "MockLaser"
    assert laser["state"] == {"is_on": False}
    assert main(["instruments", "status"]) == 0
    text = capsys.readouterr().out
    assert "current_ma = 45.0" in text and "MockTimeTagger" in text
