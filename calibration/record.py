"""The calibration record: what ``qkdctl calibrate`` found, in a TOML file.

One file per bench, beside the bench file (``<bench>.calibration.toml``) or
where ``--write`` says. Each procedure writes its own table and leaves the
others as they were::

    [calibration]                 # who and when
    bench = "sim-1GHz-50km"
    created = 2026-12-01T11:40:00Z
    software = "qkdctl 0.1.0"

    [delays]                      # calibrate delays
    period_ps = 1000.002
    clock_drift_ppm = 2.0
    gate_width_ps = 280.0
    [delays.channels.1]
    delay_ps = 2500
    uncertainty_ps = 0.3
    jitter_ps = 30.1

    [polarization]                # calibrate polarization
    angles_deg = [12.5, 40.1, 3.0]
    qber = { Z = 0.0105, X = 0.012 }

    [detectors.channels.1]        # calibrate detectors
    dark_count_rate_hz = 30.2
    ...

:meth:`CalibrationRecord.apply` makes the bench configuration that a run
uses: the detector delays and the gate width from ``[delays]``, the waveplate
angles of the polarization controller from ``[polarization]``. Recordings
store the record's text.

Files are written atomically (a temporary file in the same directory,
flushed, then renamed), so a crash leaves the old record or the new one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from qkdctl.config import BenchConfig
from qkdctl.errors import ConfigError

__all__ = ["CalibrationRecord", "default_record_path"]

log = logging.getLogger(__name__)

SECTIONS = ("delays", "polarization", "detectors")


def default_record_path(cfg: BenchConfig) -> Path:
    """``<bench file>.calibration.toml`` beside the bench file; for the built-in
    bench (inside the installed package), in the user's data directory."""
    from qkdctl.config import default_bench_path

    p = Path(cfg.path)
    if cfg.path in ("", "<string>") or p.resolve() == default_bench_path().resolve():
        xdg = os.environ.get("XDG_DATA_HOME")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
        return base / "qkdctl" / "calibration" / f"{cfg.name}.calibration.toml"
    return p.with_name(p.stem + ".calibration.toml")


@dataclasses.dataclass
class CalibrationRecord:
    """The tables of a calibration record (see the module documentation)."""

    bench: str
    sections: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    created: str = ""
    path: str | None = None

    # -- files ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationRecord:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such calibration record") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the calibration record: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        head = data.pop("calibration", {})
        if not isinstance(head, dict) or "bench" not in head:
            raise ConfigError(f"{p}: calibration: missing (a [calibration] table with the "
                              "bench's name)")
        for k in data:
            if k not in SECTIONS:
                raise ConfigError(f"{p}: {k}: unknown table; allowed: {', '.join(SECTIONS)}")
            if not isinstance(data[k], dict):
                raise ConfigError(f"{p}: {k}: expected a table")
        return cls(bench=str(head["bench"]), sections=data, created=str(head.get("created", "")),
                   path=str(p))

    @classmethod
    def load_or_new(cls, path: str | os.PathLike, bench: str) -> CalibrationRecord:
        p = Path(path)
        if p.exists():
            return cls.load(p)
        return cls(bench=bench, path=str(p))

    def text(self) -> str:
        import tomli_w

        from qkdctl import __version__

        doc = {"calibration": {"bench": self.bench, "created": self.created,
                               "software": f"qkdctl {__version__}"}}
        doc.update({k: _plain(self.sections[k]) for k in SECTIONS if k in self.sections})
        return ("# qkdctl calibration record (written by qkdctl calibrate)\n"
                + tomli_w.dumps(doc))

    def save(self, path: str | os.PathLike | None = None) -> Path:
        p = Path(path or self.path or "")
        if not str(p):
            raise ConfigError("calibration record: no path to write it to")
        self.created = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = self.text()
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            with _suppress():
                os.unlink(tmp)
            raise
        self.path = str(p)
        log.info("calibration record written to %s", p)
        return p

    # -- contents ---------------------------------------------------------------------
    def update(self, section: str, data: dict[str, Any]) -> None:
        if section not in SECTIONS:
            raise ValueError(f"unknown calibration section {section!r}")
        self.sections[section] = data

    def apply(self, cfg: BenchConfig) -> BenchConfig:
        """The bench configuration with the calibrated delays, gate and angles.

        The change is made to the bench file's parsed document too (``cfg.raw``),
        so that a recording of the run rebuilds the calibrated configuration.
        """
        import copy

        from qkdctl.config import parse_bench

        where = self.path or "calibration record"
        if self.bench != cfg.name:
            raise ConfigError(f"{where}: calibration.bench: this record is for bench "
                              f"{self.bench!r}, not {cfg.name!r}")
        raw = copy.deepcopy(cfg.raw)
        d = self.sections.get("delays")
        if d:
            chans = d.get("channels", {})
            for det in raw.get("receiver", {}).get("detectors", []):
                c = chans.get(str(det.get("channel")))
                if c and "delay_ps" in c:
                    det["delay_ps"] = int(round(c["delay_ps"]))
            if "gate_width_ps" in d:
                raw.setdefault("analysis", {})["gate_width_ps"] = float(d["gate_width_ps"])
        pol = self.sections.get("polarization")
        if pol and "angles_deg" in pol and "polarization" in raw.get("instruments", {}):
            inst = raw["instruments"]["polarization"]
            inst["settings"] = dict(inst.get("settings", {}), angles_deg=list(pol["angles_deg"]))
        out = parse_bench(raw, cfg.path, cfg.text)
        return dataclasses.replace(out, calibration_path=self.path,
                                   calibration_text=self.text())


def _plain(x: Any) -> Any:
    """TOML-ready values: tables with string keys, floats and ints, no None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items() if v is not None}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    return x


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True
