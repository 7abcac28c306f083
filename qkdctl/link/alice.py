"""Alice's host: laser, modulator, her sequence of choices, her key store.

:func:`run_alice` is what ``qkdctl alice`` does. Alice listens for Bob
(``link.alice_listen``, loopback unless the bench file says otherwise),
checks that the two bench files agree, arms her laser and encoder (loading
her sequence or pattern into the encoder), tells Bob she is on, and answers
his announcements: for each block, which detected pulses to keep, looked up in
her sequence for exactly the pulses he announced (the intensity classes stay
with her; she sends each distilled block's counts per class). Distillation
runs beside it on the lanes of :class:`~qkdctl.postprocess.lanes.AliceLanes`.
The session ends when Bob has sent his last block and both have finished every
block; on any way out her laser goes off and her encoder stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from ..config import SIDES, BenchConfig, parse_address
from ..errors import ConfigError
from ..postprocess.lanes import AliceLanes
from ..protocol import AliceRole, SiftCoding
from ..sequence import AliceSequence
from ..session import StopRequest, load_sequence, new_seed
from ..sifting import SiftStats
from .common import (
    Done,
    Ready,
    build_side_bench,
    link_figures,
    link_options,
    meet,
    side_keystore,
    side_psk,
    stop_link,
)
from .mux import Link
from .report import add_public_counts, alice_summary, apply_distillation

__all__ = ["run_alice"]

log = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def run_alice(cfg: BenchConfig, seed: int | None = None, *, keystore=None,
              psk_file: str | None = None, bench=None,
              progress: Callable[[dict[str, Any]], None] | None = None,
              on_listening: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Alice's side of a two-host session; returns her summary.

    ``seed``: the run's seed (Alice's sequence and, on the simulated bench,
    her side of distillation); ``keystore``: the directory whose ``alice/``
    store receives her keys (False: none); ``on_listening(port)`` is called
    once she listens.
    """
    seed = new_seed() if seed is None else seed
    real = any(i.driver != "mock" for n, i in cfg.instruments.items()
               if SIDES.get(n) == "alice")
    sequence = AliceSequence.from_config(cfg.source, seed, secret=real)
    psk = side_psk(cfg, "alice", psk_file)
    store = side_keystore(keystore, "alice") if cfg.postprocess.enabled else None
    host, port = parse_address(cfg.link.alice_listen)
    if not _is_loopback(host):
        log.warning("alice: listening on %s:%d, beyond this machine (link.alice_listen)",
                    host, port)
    t_wall = time.perf_counter()
    link = Link.listen(host, port, psk, on_listening=on_listening, **link_options(cfg))
    log.info("alice: Bob connected")
    try:
        with StopRequest() as ctrl_c:
            s = _session(cfg, link, psk, store, seed, sequence, bench, progress, ctrl_c,
                         t_wall)
    except BaseException as e:
        stop_link(link, "Alice", e)
        raise
    link.close()
    s["link"] = link_figures(link)
    return s


def _session(cfg, link, psk, store, seed, sequence, bench, progress, ctrl_c,
             t_wall) -> dict[str, Any]:
    session = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + link.link_id.hex()[:8]
    eps, _, reconciled = meet(link, cfg, psk, store, "alice", session)
    control = eps["control"]
    if bench is None:
        bench = build_side_bench(cfg, "alice", seed)
    simulated = all(i.driver == "mock" for n, i in cfg.instruments.items() if n in bench)
    lanes = AliceLanes(cfg, eps["lanes"], keystore=store, key_prefix=session,
                       rng_seed=seed if simulated else None,
                       meta={"bench": cfg.name, "role": "alice", "session": session,
                             "link": True}) \
        if cfg.postprocess.enabled else None
    alice = AliceRole(sequence, eps["sifting"], SiftCoding.from_config(cfg))
    stats = SiftStats(len(cfg.source.mean_photon_numbers))
    sifted = 0
    interrupted = False
    try:
        with contextlib.ExitStack() as stack:
            laser, mod = bench["laser"], bench["modulator"]
            stack.enter_context(laser)
            stack.enter_context(mod)
            load_sequence(cfg, mod, sequence)
            laser.output_on()
            mod.start()
            control.send(Ready(0))
            log.info("alice: laser on, encoder running")
            last = 0
            while True:
                codes = alice.reply()
                keep = alice.last_keep
                sifted += add_public_counts(stats, alice.last_bases, codes >> 2, keep)
                if lanes is not None:
                    lanes.add(codes, keep)
                    if lanes.error is not None:
                        raise lanes.error
                if alice.last_pulses.size:
                    last = int(alice.last_pulses[-1])
                if progress is not None:
                    progress({"bench_s": last / cfg.source.rep_rate_hz, "duration_s": None,
                              "detected_pulses": int(stats.detected.sum()),
                              "sifted_bits": sifted, "qber_z": None, "qber_x": None})
                if alice.finished:
                    break
                if ctrl_c.requested:
                    raise KeyboardInterrupt
            if lanes is not None:
                lanes.finish()
            done = control.recv()
            if not isinstance(done, Done):
                raise ConfigError(f"{cfg.path}: Bob did not close the session")
            control.send(Done("alice", done.duration_s, lanes.next_block if lanes else 0))
            pulses = getattr(mod, "pulses_sent", None)
    finally:
        if lanes is not None:
            lanes.abort()
    if pulses is None:
        pulses = round(done.duration_s * cfg.source.rep_rate_hz)
    s = alice_summary(cfg, stats, seed=seed, sequence=sequence, pulses_sent=pulses,
                      duration_s=done.duration_s, wall_s=time.perf_counter() - t_wall,
                      interrupted=interrupted, sifted_bits=sifted,
                      source="simulated bench" if simulated else "bench")
    s["keystore_reconciliation"] = reconciled
    if lanes is not None:
        apply_distillation(s, lanes.summary(done.duration_s), store)
    return s
