"""Shared helpers of the two-host tests: qkdctl sim-table, alice and bob as real processes.

Every process is ``python -m qkdctl ...`` on 127.0.0.1 with ports chosen by the
operating system (port files), a bench file written for the test (short link
timeouts), and its stderr collected line by line so that a test can wait for a
log line ("session on ...") before it kills something.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from qkdctl.config import default_bench_path

LINK = """
[link]
connect_timeout_s = 30.0
link_timeout_s = 2.0
idle_timeout_s = 1.0
"""


def bench_file(tmp: Path, extra: str = "", name: str = "bench.toml",
               link: str = LINK) -> Path:
    """The built-in simulated bench with short link timeouts (and ``extra`` TOML)."""
    text = default_bench_path().read_text() + link + extra
    p = tmp / name
    p.write_text(text)
    return p


def psk_file(tmp: Path, name: str = "psk", key: bytes | None = None) -> Path:
    p = tmp / name
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32) if key is None else key)
    return p


class Proc:
    """A qkdctl process with its stderr collected in the background."""

    def __init__(self, name: str, args: list[str], env=None):
        self.name = name
        self.args = args
        self.p = subprocess.Popen([sys.executable, "-m", "qkdctl", *args],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        self.lines: list[str] = []
        self._out: list[bytes] = []
        self._t = threading.Thread(target=self._collect, daemon=True)
        self._t.start()
        self._t_out = threading.Thread(target=lambda: self._out.append(self.p.stdout.read()),
                                       daemon=True)
        self._t_out.start()
        self.stdout = b""

    def _collect(self) -> None:
        for raw in self.p.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.p.poll() is not None:
                self._t.join(2)
                if any(text in line for line in self.lines):
                    return
                raise AssertionError(f"{self.name} exited ({self.p.returncode}) before "
                                     f"{text!r}:\n{self.stderr}")
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no {text!r} within {timeout} s:\n{self.stderr}")

    def finish(self, timeout: float = 120.0) -> int:
        """Wait for the exit; returns the status (stdout kept in :attr:`stdout`)."""
        self.p.wait(timeout=timeout)
        self._t.join(5)
        self._t_out.join(5)
        self.stdout = b"".join(self._out)
        return self.p.returncode

    def json(self) -> dict:
        return json.loads(self.stdout)

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def wait_port(path: Path, proc: Proc, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip().isdigit():
            return int(path.read_text())
        if proc.p.poll() is not None:
            proc._t.join(2)
            raise AssertionError(f"{proc.name} exited ({proc.p.returncode}) before "
                                 f"listening:\n{proc.stderr}")
        time.sleep(0.02)
    raise AssertionError(f"{proc.name} did not listen within {timeout} s")


class Hosts:
    """sim-table, alice and bob of one test, stopped at the end whatever happens."""

    def __init__(self, tmp: Path, bench: Path, seed: int = 5):
        self.tmp = tmp
        self.bench = bench
        self.seed = seed
        self.procs: list[Proc] = []
        self.table_port: int | None = None
        self.alice_port: int | None = None

    def _start(self, name: str, args: list[str]) -> Proc:
        p = Proc(name, args)
        self.procs.append(p)
        return p

    def table(self, *extra: str) -> Proc:
        pf = self.tmp / "table.port"
        pf.unlink(missing_ok=True)
        p = self._start("sim-table", ["-v", "sim-table", "--config", str(self.bench),
                                      "--seed", str(self.seed), "--listen", "127.0.0.1:0",
                                      "--port-file", str(pf), *extra])
        self.table_port = wait_port(pf, p)
        return p

    def alice(self, *extra: str, psk: Path, keystore: Path | None = None,
              bench: Path | None = None) -> Proc:
        pf = self.tmp / "alice.port"
        pf.unlink(missing_ok=True)
        ks = ["--keystore", str(keystore)] if keystore else ["--no-keystore"]
        p = self._start("alice", ["-v", "alice", "--config", str(bench or self.bench),
                                  "--seed", str(self.seed), "--json", "-q", "--psk-file",
                                  str(psk), "--listen", "127.0.0.1:0", "--port-file", str(pf),
                                  "--sim-table", f"127.0.0.1:{self.table_port}", *ks, *extra])
        self.alice_port = wait_port(pf, p)
        return p

    def bob(self, *extra: str, psk: Path, seed: int, duration: float = 0.3,
            keystore: Path | None = None, alice_port: int | None = None,
            bench: Path | None = None) -> Proc:
        ks = ["--keystore", str(keystore)] if keystore else ["--no-keystore"]
        port = self.alice_port if alice_port is None else alice_port
        return self._start("bob", ["-v", "bob", "--config", str(bench or self.bench),
                                   "--seed", str(seed), "--json", "-q", "--psk-file", str(psk),
                                   "--duration", repr(duration), "--alice", f"127.0.0.1:{port}",
                                   "--sim-table", f"127.0.0.1:{self.table_port}", *ks, *extra])

    def close(self) -> None:
        for p in self.procs:
            p.stop()
