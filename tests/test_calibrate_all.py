"""`qkdctl calibrate all` on a simulated bench with hidden random delays, clock offset
and drift and an unknown fiber rotation: before it no secret key, after it key."""

from __future__ import annotations

import copy
import json
import tomllib

import numpy as np
import pytest
import tomli_w

from qkdctl import cli
from qkdctl.config import default_bench_path

RAW = tomllib.loads(default_bench_path().read_text(encoding="utf-8"))


def hidden_bench(tmp_path, seed: int):
    """A bench file whose [sim] hides the truth the calibration must find."""
    rng = np.random.default_rng(seed)
    raw = copy.deepcopy(RAW)
    sim = raw["sim"]
    for d in sim["detectors"]:
        d["delay_ps"] = int(d["delay_ps"] + rng.integers(-1_000_000, 1_000_000))
    sim["clock_offset_ps"] = int(rng.integers(0, 10**9))
    sim["clock_drift_ppm"] = float(rng.uniform(-20, 20))
    sim["polarization_seed"] = int(seed)
    raw["instruments"]["polarization"] = {"driver": "mock"}
    raw["postprocess"] = {"block_bits": 1 << 20, "min_block_bits": 1 << 18}
    path = tmp_path / "hidden.toml"
    path.write_text(tomli_w.dumps(raw))
    return path, raw


def run(capsys, path, *extra):
    rc = cli.main(["run", "--config", str(path), "--duration", "0.4", "--seed", "1",
                   "--json", "-q", "--no-keystore", *extra])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("seed", [3, 8])
def test_calibrate_all_then_run_makes_key(tmp_path, capsys, seed):
    path, raw = hidden_bench(tmp_path, seed)
    rc, before = run(capsys, path)
    # misaligned in time and polarization, the bench sees a QBER near 1/2: no key, and the
    # run stops on the QBER alarm (exit status 3), as it would for an eavesdropper
    assert before["secret_bits"] == 0 and rc in (0, 3)
    assert cli.main(["calibrate", "all", "--config", str(path), "--seed", str(seed),
                     "--dark-s", "1", "--json"]) == 0
    cal = json.loads(capsys.readouterr().out)
    assert set(cal) >= {"delays", "polarization", "detectors"}
    # the record lies beside the bench file, and run picks it up
    record = tmp_path / "hidden.calibration.toml"
    assert cal["record"] == str(record) and record.exists()
    truth = {d["channel"]: d["delay_ps"] for d in raw["sim"]["detectors"]}
    text = tomllib.loads(record.read_text())
    for ch, t in truth.items():
        got = text["delays"]["channels"][str(ch)]["delay_ps"]
        assert abs(got - t) <= 8, (ch, got, t)
    rc, after = run(capsys, path)
    assert rc == 0
    assert after["calibration_record"] == str(record)
    assert after["qber"]["Z"] < 0.02 and after["qber"]["X"] < 0.02
    assert after["secret_bits"] > 0
