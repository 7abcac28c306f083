"""The three processes of a simulated link on one machine: ``qkdctl run --split``.

Starts ``qkdctl sim-table``, ``qkdctl alice`` and ``qkdctl bob`` as separate
processes on loopback, each with its own options, exactly as a user would on
three hosts (the ports are picked by the operating system and handed on
through port files, so that runs never collide), waits for them, and returns
both summaries. With the run's seed ``S`` the table and Alice get ``S`` and
Bob gets only his role seed (:func:`qkdctl.rng.role_seed`), so the split
session gives the same sifted and secret key as ``qkdctl run --seed S``. With
no pre-shared key in the bench file a fresh one is written for the two sides
(mode 0600, removed afterwards).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import QkdctlError
from ..rng import role_seed

__all__ = ["SplitError", "run_split", "wait_for_port_file"]


class SplitError(QkdctlError):
    """A process of the split session failed."""


def wait_for_port_file(path: Path, proc: subprocess.Popen, what: str,
                       timeout_s: float = 120.0, errfile=None) -> int:
    """The port a child process wrote to ``path`` once it listens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text().strip()
            if text.isdigit():
                return int(text)
        if proc.poll() is not None:
            err = _read(errfile).decode(errors="replace") if errfile is not None else ""
            raise SplitError(f"{what} exited with status {proc.returncode} before listening: "
                             f"{err.strip()[-500:]}")
        time.sleep(0.02)
    raise SplitError(f"{what} did not start listening within {timeout_s:g} s")


def _read(f) -> bytes:
    f.seek(0)
    return f.read()


def _qkdctl() -> list[str]:
    return [sys.executable, "-m", "qkdctl"]


def run_split(config: str | None, *, duration_s: float, seed: int,
              keystore: str | None, no_keystore: bool = False,
              calibration: list[str] | None = None, verbose: int = 0,
              timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run the three processes; returns ``{"alice": ..., "bob": ..., "exit": {...}}``."""
    cfg_args = ["--config", config] if config else []
    extra = list(calibration or [])
    ks = ["--no-keystore"] if no_keystore else (["--keystore", keystore] if keystore else [])
    vb = ["-v"] * verbose
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="qkdctl-split-") as tmp:
        tmpd = Path(tmp)
        psk = tmpd / "psk"
        fd = os.open(psk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            # stderr to files: a chatty child (-vv) must never block on a full pipe
            errs = {name: open(tmpd / f"{name}.err", "w+b")  # noqa: SIM115
                    for name in ("table", "alice", "bob")}
            table = subprocess.Popen(
                [*_qkdctl(), *vb, "sim-table", *cfg_args, *extra, "--seed", str(seed),
                 "--listen", "127.0.0.1:0", "--port-file", str(tmpd / "table.port")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errs["table"])
            procs.append(table)
            table_port = wait_for_port_file(tmpd / "table.port", table, "qkdctl sim-table",
                                            errfile=errs["table"])
            table_addr = f"127.0.0.1:{table_port}"
            alice = subprocess.Popen(
                [*_qkdctl(), *vb, "alice", *cfg_args, *extra, *ks, "--json", "-q",
                 "--seed", str(seed), "--psk-file", str(psk), "--listen", "127.0.0.1:0",
                 "--port-file", str(tmpd / "alice.port"), "--sim-table", table_addr],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errs["alice"])
            procs.append(alice)
            alice_port = wait_for_port_file(tmpd / "alice.port", alice, "qkdctl alice",
                                            errfile=errs["alice"])
            bob = subprocess.Popen(
                [*_qkdctl(), *vb, "bob", *cfg_args, *extra, *ks, "--json", "-q",
                 "--seed", str(role_seed(seed, "bob")), "--duration", repr(duration_s),
                 "--psk-file", str(psk), "--alice", f"127.0.0.1:{alice_port}",
                 "--sim-table", table_addr],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errs["bob"])
            procs.append(bob)
            out_b, _ = bob.communicate(timeout=timeout_s)
            out_a, _ = alice.communicate(timeout=timeout_s)
            err_a, err_b = (_read(errs["alice"]), _read(errs["bob"]))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for f in locals().get("errs", {}).values():
                f.close()
    result: dict[str, Any] = {"exit": {"alice": alice.returncode, "bob": bob.returncode},
                              "stderr": {"alice": err_a.decode(errors="replace"),
                                         "bob": err_b.decode(errors="replace")}}
    for role, out in (("alice", out_a), ("bob", out_b)):
        try:
            result[role] = json.loads(out) if out.strip() else None
        except ValueError:
            result[role] = None
    return result
