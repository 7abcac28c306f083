"""What ``qkdctl instruments`` does: list, identify and read the bench's instruments.

:func:`list_instruments` reads the bench file only. :func:`identify` and
:func:`read_status` connect to each instrument *without* applying its
configured settings and close the link afterwards without touching the
instrument's state: they are read-only, so they can be run next to a bench
that is in use (a laser that is on stays on). An instrument that cannot be
reached is reported with its error; the others are still read.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from .config import BenchConfig
from .drivers import available_drivers, driver_class
from .errors import QkdctlError

__all__ = ["identify", "list_instruments", "read_status"]

log = logging.getLogger(__name__)


def list_instruments(cfg: BenchConfig) -> dict[str, Any]:
    """The configured instruments and the drivers available."""
    return {
        "bench": cfg.name,
        "config": cfg.path,
        "instruments": {
            name: {"driver": inst.driver, "resource": inst.resource, "backend": inst.backend,
                   "settings": dict(inst.settings), "limits": dict(inst.limits)}
            for name, inst in cfg.instruments.items()},
        "drivers": {name: list(roles) for name, roles in available_drivers().items()},
    }


def _read_only_bench(cfg: BenchConfig, seed: int):
    """The bench's instruments, built with only the settings that configure the driver
    (channel maps, calibration curves: ``STATIC``), so that connecting applies nothing."""
    from .drivers import STATIC
    from .session import build_bench

    def static_only(name, inst):
        if inst.driver == "mock":
            return {}
        cls = driver_class(inst.driver, name)
        return {k: v for k, v in inst.settings.items() if cls.SETTINGS.get(k) == STATIC}

    bare = dataclasses.replace(cfg, instruments={
        n: dataclasses.replace(i, settings=static_only(n, i))
        for n, i in cfg.instruments.items()})
    return build_bench(bare, seed)


def _each(cfg: BenchConfig, what: str, seed: int = 0) -> dict[str, Any]:
    bench = _read_only_bench(cfg, seed)
    out: dict[str, Any] = {}
    for name, inst in bench.items():
        entry: dict[str, Any] = {"driver": cfg.instruments[name].driver,
                                 "resource": cfg.instruments[name].resource}
        try:
            inst.connect()
            try:
                entry["identity"] = dataclasses.asdict(inst.identity())
                if what == "status":
                    entry["status"] = inst.status()
                else:
                    entry["state"] = _state(inst)
            finally:
                inst.close()
            entry["ok"] = True
        except QkdctlError as e:
            entry["ok"] = False
            entry["error"] = str(e)
            log.warning("%s", e)
        out[name] = entry
    return {"bench": cfg.name, "config": cfg.path, "instruments": out}


def _state(inst) -> dict[str, Any]:
    """The few values that say what an instrument is doing (on/off, running)."""
    state: dict[str, Any] = {}
    for attr in ("is_on", "running"):
        try:
            v = getattr(inst, attr)
            state[attr] = v() if callable(v) else v
        except (QkdctlError, AttributeError, NotImplementedError):
            continue
    return state


def identify(cfg: BenchConfig) -> dict[str, Any]:
    """Connect to each instrument: make, model, serial, firmware and state."""
    return _each(cfg, "identify")


def read_status(cfg: BenchConfig) -> dict[str, Any]:
    """Connect to each instrument and read its live values."""
    return _each(cfg, "status")
