"""The ``qkdctl`` command. Thin: parse, call the library, print.

Errors a user can cause are printed on one line (``qkdctl: error: ...``) with
a non-zero exit status, never a traceback.

Exit status: 0 success; 2 a user error (bad configuration, bad input, an
instrument problem); 3 a tamper alarm (the statistics show an eavesdropper, or
a classical-channel message failed authentication: no key from the rest of the
run); 130 a run stopped by Ctrl-C (its summary is printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any

from . import __version__
from .config import load_bench
from .errors import ConfigError, QkdctlError

EXIT_TAMPER = 3
EXIT_INTERRUPTED = 130


class _Progress:
    """One self-overwriting status line on stderr, at most a few times a second."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._last = 0.0
        self._shown = False

    def __call__(self, p: dict[str, Any]) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and p["bench_s"] < (p["duration_s"]
                                                                         or math.inf)):
            return
        self._last = now

        def pct(x):
            return "  n/a  " if x is None else f"{100 * x:6.3f}%"

        where = f"tags {p['tags']:,}" if "tags" in p else f"bench {p['bench_s']:.3f} s"
        # Alice's host does not know how long Bob will run: no percentage there
        done = (f"{100 * p['bench_s'] / p['duration_s']:5.1f} %  " if p["duration_s"]
                else "")
        sys.stderr.write(f"\r  {done}{where}  detected "
                         f"{p['detected_pulses']:>12,}  sifted {p['sifted_bits']:>12,}  "
                         f"QBER Z {pct(p['qber_z'])}  X {pct(p['qber_x'])} ")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(_json_safe(obj), indent=2) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    from .session import run_session
    from .summary import format_summary

    if args.split:
        return _run_split(args)
    cfg = _calibrated(load_bench(args.config), args)
    progress = _Progress(enabled=sys.stderr.isatty() and not args.quiet)
    try:
        summary = run_session(cfg, duration_s=args.duration, seed=args.seed,
                              progress=progress, record=args.record,
                              flush_interval_s=args.flush_interval,
                              compression=args.compression, overwrite=args.overwrite,
                              keystore=False if args.no_keystore else args.keystore,
                              sifted_digest=args.sifted_digest)
    finally:
        progress.close()
    if args.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
    return _exit_status(summary)


def _run_split(args: argparse.Namespace) -> int:
    from .link.report import format_side_summary
    from .link.split import run_split
    from .session import new_seed

    if args.record:
        raise ConfigError("--record: a split session records nothing yet; run without --split")
    load_bench(args.config)  # a bad bench file fails here, not in three processes
    seed = new_seed() if args.seed is None else args.seed
    cal = (["--no-calibration"] if args.no_calibration else
           (["--calibration", args.calibration] if args.calibration else []))
    out = run_split(args.config, duration_s=args.duration, seed=seed, keystore=args.keystore,
                    no_keystore=args.no_keystore, calibration=cal, verbose=args.verbose)
    codes = out["exit"]
    if args.json:
        _print_json({"seed": seed, "alice": out["alice"], "bob": out["bob"],
                     "exit_status": codes})
    else:
        for role in ("alice", "bob"):
            if out[role] is not None:
                print(format_side_summary(out[role]))
    for role in ("alice", "bob"):
        err = out["stderr"][role].strip()
        if codes[role] and err:
            print(f"qkdctl {role}: {err.splitlines()[-1]}", file=sys.stderr)
    worst = [c for c in (codes["bob"], codes["alice"]) if c]
    return EXIT_TAMPER if EXIT_TAMPER in worst else (worst[0] if worst else 0)


def _link_overrides(cfg, args: argparse.Namespace):
    """The bench with ``--listen``, ``--alice`` and ``--sim-table`` applied to ``[link]``."""
    import dataclasses

    from .config import parse_address

    changes = {}
    for opt, key in (("listen", "alice_listen"), ("alice", "alice_address"),
                     ("sim_table", "sim_table")):
        value = getattr(args, opt, None)
        if value is not None:
            try:
                parse_address(value)
            except ValueError as e:
                raise ConfigError(f"--{opt.replace('_', '-')}: {e}") from None
            changes[key] = value
    return dataclasses.replace(cfg, link=dataclasses.replace(cfg.link, **changes)) \
        if changes else cfg


def _port_file(path: str | None):
    """A callback writing the listening port to ``path`` (for scripts and ``--split``)."""
    if not path:
        return None

    def write(port: int) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, path)
    return write


def cmd_side(args: argparse.Namespace) -> int:
    """``qkdctl alice`` and ``qkdctl bob``: one host of a two-host link."""
    from .link.report import format_side_summary

    cfg = _link_overrides(_calibrated(load_bench(args.config), args), args)
    _terminate_as_interrupt()   # a SIGTERM (kill, systemd) leaves the bench safe too
    progress = _Progress(enabled=sys.stderr.isatty() and not args.quiet)
    common = {"seed": args.seed, "progress": progress, "psk_file": args.psk_file,
              "keystore": False if args.no_keystore else args.keystore}
    try:
        if args.command == "alice":
            from .link.alice import run_alice

            summary = run_alice(cfg, on_listening=_port_file(args.port_file), **common)
        else:
            from .link.bob import run_bob

            summary = run_bob(cfg, duration_s=args.duration, **common)
    finally:
        progress.close()
    if args.json:
        _print_json(summary)
    else:
        print(format_side_summary(summary))
    return _exit_status(summary)


def _terminate_as_interrupt() -> None:
    """SIGTERM stops the command as Ctrl-C aborts it: through every way out that makes the
    bench safe."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def cmd_sim_table(args: argparse.Namespace) -> int:
    from .config import parse_address
    from .session import new_seed
    from .sim.server import serve_table

    cfg = _link_overrides(_calibrated(load_bench(args.config), args), args)
    host, port = parse_address(cfg.link.sim_table)
    seed = new_seed() if args.seed is None else args.seed
    _terminate_as_interrupt()
    write_port = _port_file(args.port_file)

    def ready(bound: int) -> None:
        print(f"qkdctl sim-table: {cfg.name} on {host}:{bound}, seed {seed}", file=sys.stderr,
              flush=True)
        if write_port is not None:
            write_port(bound)
    try:
        serve_table(cfg, seed, host, port, ready=ready)
    except KeyboardInterrupt:
        pass
    return 0


def _calibrated(cfg, args: argparse.Namespace):
    """The bench with its calibration record applied: ``--calibration FILE``, else the
    record beside the bench file if there is one (``--no-calibration``: none)."""
    from .calibration.record import CalibrationRecord, default_record_path

    if args.no_calibration:
        return cfg
    path = args.calibration or default_record_path(cfg)
    if args.calibration is None and not os.path.exists(path):
        return cfg
    record = CalibrationRecord.load(path)
    logging.getLogger("qkdctl").info("using the calibration record %s", path)
    return record.apply(cfg)


def _exit_status(summary: dict[str, Any]) -> int:
    if summary.get("tamper_alarm"):
        print(f"qkdctl: TAMPER ALARM: {summary['abort_reason']}", file=sys.stderr)
        return EXIT_TAMPER
    return EXIT_INTERRUPTED if summary["interrupted"] else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import replay
    from .summary import format_raw_statistics, format_summary

    override = load_bench(args.config) if args.config else None
    progress = _Progress(enabled=sys.stderr.isatty() and not args.quiet)
    try:
        summary = replay(args.file, config=override, start_s=args.start, stop_s=args.stop,
                         timestamps_unit=args.timestamps_unit, progress=progress,
                         keystore=args.keystore or False, sifted_digest=args.sifted_digest)
    finally:
        progress.close()
    if args.json:
        _print_json(summary)
    elif "qber" in summary:
        print(format_summary(summary))
    else:
        print(format_raw_statistics(summary))
    return _exit_status(summary) if "qber" in summary else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .replay import convert

    result = convert(args.input, args.output, timestamps_unit=args.timestamps_unit,
                     compression=args.compression, overwrite=args.overwrite)
    if args.json:
        _print_json(result)
    else:
        print(f"{result['input']} ({result['format']}) -> {result['output']}: "
              f"{result['tags']:,} tags, {result['compression']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .replay import describe_file

    info = describe_file(args.file, timestamps_unit=args.timestamps_unit, scan=args.scan)
    if args.json:
        _print_json(info)
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, dict | list):
                v = json.dumps(_json_safe(v))
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_instruments(args: argparse.Namespace) -> int:
    from .instruments import identify, list_instruments, read_status

    cfg = load_bench(args.config)
    if args.action == "list":
        out = list_instruments(cfg)
        if args.json:
            _print_json(out)
            return 0
        print(f"{out['bench']} ({out['config']})")
        for name, i in out["instruments"].items():
            where = i["resource"] or "-"
            if i["backend"]:
                where += f" via {i['backend']}"
            print(f"  {name:<13} {i['driver']:<20} {where}")
        print("drivers available:")
        for d, roles in out["drivers"].items():
            print(f"  {d:<20} {', '.join(roles)}")
        return 0
    out = identify(cfg) if args.action == "identify" else read_status(cfg)
    if args.json:
        _print_json(out)
    else:
        print(f"{out['bench']} ({out['config']})")
        for name, e in out["instruments"].items():
            if not e["ok"]:
                print(f"  {name:<13} ERROR {e['error']}")
                continue
            idn = e["identity"]
            print(f"  {name:<13} {idn['make']} {idn['model']}, serial {idn['serial']}, "
                  f"firmware {idn['firmware']}")
            for k, v in (e.get("state") or e.get("status") or {}).items():
                print(f"  {'':<13}   {k} = {v}")
    return 0 if all(e["ok"] for e in out["instruments"].values()) else 2


CALIBRATIONS = ("delays", "polarization", "detectors")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration.record import CalibrationRecord, default_record_path
    from .session import new_seed

    cfg = load_bench(args.config)
    path = args.write or default_record_path(cfg)
    record = CalibrationRecord.load_or_new(path, cfg.name)
    seed = new_seed() if args.seed is None else args.seed
    steps = CALIBRATIONS if args.what == "all" else (args.what,)
    if args.what == "all" and "polarization" not in cfg.instruments:
        logging.getLogger("qkdctl").warning(
            "%s: no [instruments.polarization]: polarization not calibrated", cfg.path)
        steps = tuple(s for s in steps if s != "polarization")
    results: dict[str, Any] = {}
    for step in steps:
        # each step runs on the bench as calibrated so far (polarization needs the delays)
        current = record.apply(cfg) if record.sections else cfg
        plot_dir = None
        if args.plot:
            plot_dir = os.path.join(args.plot, step)
            os.makedirs(plot_dir, exist_ok=True)
        if step == "delays":
            from .calibration.delays import calibrate_delays as fn
        elif step == "polarization":
            from .calibration.polarization import calibrate_polarization as fn
        else:
            from .calibration.detectors import calibrate_detectors as fn
        opts = {}
        if step == "detectors" and args.dark_s is not None:
            opts["dark_s"] = args.dark_s
        res = fn(current, seed=seed, plot_dir=plot_dir, **opts)
        record.update(step, res.section())
        results[step] = res.to_dict()
        record.save(path)
    out = {"bench": cfg.name, "record": str(path), "seed": seed, **results}
    if args.json:
        _print_json(out)
    else:
        print(f"{cfg.name}: calibration record {path} (seed {seed})")
        for step in steps:
            print(f"  [{step}]")
            for line in _flat(record.sections[step]):
                print(f"    {line}")
    return 0


def _flat(d: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.extend(_flat(v, f"{prefix}{k}."))
        else:
            lines.append(f"{prefix}{k} = {v:.6g}" if isinstance(v, float)
                         else f"{prefix}{k} = {v}")
    return lines


def _unit(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r}: a timestamps unit is a positive "
                                         "number of seconds, e.g. 5e-9")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a time >= 0 in seconds")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is an integer from 0 to 2**63-1")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkdctl",
        description="Hardware-in-the-loop controller for BB84 QKD benches.")
    p.add_argument("--version", action="version", version=f"qkdctl {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log more (-v: info, -vv: debug) on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run a BB84 session (default: the built-in simulated bench)",
                       description="Run a decoy-state BB84 session and print its summary.")
    r.add_argument("--config", metavar="FILE",
                   help="bench file (TOML); default: the built-in simulated bench")
    r.add_argument("--duration", type=_positive_float, default=2.0, metavar="SECONDS",
                   help="bench time to acquire (default 2)")
    r.add_argument("--seed", type=_seed, default=None, metavar="N",
                   help="random seed; the same seed reproduces a simulated run bit for bit "
                        "(default: a fresh one, printed in the summary)")
    r.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout instead of the text summary")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    r.add_argument("--record", metavar="FILE.h5",
                   help="record the run (every tag, configuration, Alice's sequence) to FILE.h5")
    r.add_argument("--flush-interval", type=_positive_float, default=1.0, metavar="SECONDS",
                   help="write the recording to disk at least this often (default 1)")
    r.add_argument("--compression", choices=("bitshuffle-lz4", "lzf", "none"),
                   default="bitshuffle-lz4", help="recording compression (default %(default)s)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing recording file")
    r.add_argument("--keystore", metavar="DIR",
                   help="key store for the secret keys (Alice's and Bob's under DIR/alice and "
                        "DIR/bob, files mode 0600; default: $QKDCTL_KEYSTORE or "
                        "~/.local/share/qkdctl/keys)")
    r.add_argument("--no-keystore", action="store_true",
                   help="distil and report secret key, but keep no key")
    r.add_argument("--sifted-digest", action="store_true",
                   help="add the SHA-256 of the sifted key to the summary (to compare runs "
                        "and replays; privacy amplification then subtracts its 256 bits)")
    r.add_argument("--calibration", metavar="FILE",
                   help="calibration record to apply (default: <bench>.calibration.toml "
                        "beside the bench file, if there is one)")
    r.add_argument("--no-calibration", action="store_true",
                   help="run with the bench file's own delays, gate and angles")
    r.add_argument("--split", action="store_true",
                   help="run Alice, Bob and the simulated table as three processes on "
                        "loopback (as on three hosts) and print both sides' summaries")
    r.set_defaults(func=cmd_run)

    def side_options(sp, role: str) -> None:
        sp.add_argument("--config", metavar="FILE",
                        help="bench file (TOML) of this host; default: the built-in "
                             "simulated bench")
        sp.add_argument("--seed", type=_seed, default=None, metavar="N",
                        help="this side's random seed (default: a fresh one)")
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress line")
        sp.add_argument("--keystore", metavar="DIR",
                        help=f"key store directory; this host's keys go to DIR/{role} "
                             "(default: $QKDCTL_KEYSTORE or ~/.local/share/qkdctl/keys)")
        sp.add_argument("--no-keystore", action="store_true", help="keep no key")
        sp.add_argument("--psk-file", metavar="FILE",
                        help=f"pre-shared key file (default: link.{role}_psk_file)")
        sp.add_argument("--sim-table", metavar="HOST:PORT",
                        help="address of the simulated table (default: link.sim_table)")
        sp.add_argument("--calibration", metavar="FILE",
                        help="calibration record to apply (default: the one beside the "
                             "bench file, if any)")
        sp.add_argument("--no-calibration", action="store_true",
                        help="use the bench file's own delays, gate and angles")

    al = sub.add_parser("alice", help="Alice's host of a two-host link: laser, modulator, "
                                      "her sequence; waits for Bob",
                        description="Run Alice's side of a session: listen for Bob, arm the "
                                    "laser and encoder, answer Bob's announcements, distil "
                                    "her half of the key; prints her summary.")
    side_options(al, "alice")
    al.add_argument("--listen", metavar="HOST:PORT",
                    help="where to listen for Bob (default: link.alice_listen)")
    al.add_argument("--port-file", metavar="FILE",
                    help="write the port listened on to FILE once listening")
    al.set_defaults(func=cmd_side)

    bo = sub.add_parser("bob", help="Bob's host of a two-host link: detectors, tagger; "
                                    "connects to Alice",
                        description="Run Bob's side of a session: connect to Alice, arm the "
                                    "detectors and tagger, sift and announce, distil his half "
                                    "of the key; prints his summary.")
    side_options(bo, "bob")
    bo.add_argument("--duration", type=_positive_float, default=2.0, metavar="SECONDS",
                    help="bench time to acquire (default 2)")
    bo.add_argument("--alice", metavar="HOST:PORT",
                    help="Alice's address (default: link.alice_address)")
    bo.set_defaults(func=cmd_side)

    st = sub.add_parser("sim-table", help="the simulated optical table as a process of its "
                                          "own, for two-host sessions on the simulated bench",
                        description="Serve the simulated optical table (source optics, "
                                    "fiber, eavesdropper, Bob's optics, detectors, tagger) to "
                                    "the mock instruments of qkdctl alice and qkdctl bob, "
                                    "until stopped (Ctrl-C or SIGTERM).")
    st.add_argument("--config", metavar="FILE",
                    help="bench file (TOML); default: the built-in simulated bench")
    st.add_argument("--seed", type=_seed, default=None, metavar="N",
                    help="the physics' random seed (default: a fresh one)")
    st.add_argument("--listen", dest="sim_table", metavar="HOST:PORT",
                    help="where to listen (default: link.sim_table)")
    st.add_argument("--port-file", metavar="FILE",
                    help="write the port listened on to FILE once listening")
    st.add_argument("--calibration", metavar="FILE", help=argparse.SUPPRESS)
    st.add_argument("--no-calibration", action="store_true", help=argparse.SUPPRESS)
    st.set_defaults(func=cmd_sim_table)

    unit_help = ("timestamp unit in seconds for a Photon-HDF5 file that does not give one "
                 "(e.g. 5e-9)")
    rp = sub.add_parser("replay", help="replay a recording (or a PTU / Photon-HDF5 file)",
                        description="Run recorded time tags through the sifting pipeline and "
                                    "print the summary; a file without Alice's sequence gives "
                                    "raw-tag statistics.")
    rp.add_argument("file", metavar="FILE")
    rp.add_argument("--config", metavar="FILE",
                    help="bench file whose [analysis] and detector delays replace the recorded")
    rp.add_argument("--start", type=_seconds, metavar="SECONDS",
                    help="replay from this time (seconds from the first tag)")
    rp.add_argument("--stop", type=_seconds, metavar="SECONDS",
                    help="replay up to this time (seconds from the first tag)")
    rp.add_argument("--timestamps-unit", type=_unit, metavar="SECONDS", help=unit_help)
    rp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    rp.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    rp.add_argument("--keystore", metavar="DIR",
                    help="keep the secret keys the replay distils in this key store "
                         "(default: none are kept)")
    rp.add_argument("--sifted-digest", action="store_true",
                    help="add the SHA-256 of the sifted key to the summary")
    rp.set_defaults(func=cmd_replay)

    cv = sub.add_parser("convert", help="convert a PTU or Photon-HDF5 file to a recording",
                        description="Write the time tags of a foreign file as a qkdctl "
                                    "recording.")
    cv.add_argument("input", metavar="IN")
    cv.add_argument("output", metavar="OUT.h5")
    cv.add_argument("--timestamps-unit", type=_unit, metavar="SECONDS", help=unit_help)
    cv.add_argument("--compression", choices=("bitshuffle-lz4", "lzf", "none"),
                    default="bitshuffle-lz4")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5")
    cv.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    cv.set_defaults(func=cmd_convert)

    inf = sub.add_parser("info", help="describe a recording or tag file without reading it all")
    inf.add_argument("file", metavar="FILE")
    inf.add_argument("--timestamps-unit", type=_unit, metavar="SECONDS", help=unit_help)
    inf.add_argument("--scan", action="store_true",
                     help="also read the tags once, to count them per channel")
    inf.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    inf.set_defaults(func=cmd_info)

    ins = sub.add_parser("instruments", help="list, identify or read the bench's instruments",
                         description="list: the configured instruments and the drivers "
                                     "available; identify: connect to each and print its "
                                     "identity and state; status: its live values. identify "
                                     "and status change nothing on the instruments.")
    ins.add_argument("action", choices=("list", "identify", "status"))
    ins.add_argument("--config", metavar="FILE",
                     help="bench file (TOML); default: the built-in simulated bench")
    ins.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ins.set_defaults(func=cmd_instruments)

    cal = sub.add_parser("calibrate", help="calibrate the bench: delays, polarization, "
                                           "detectors, or all of them in order",
                         description="Find the channel delays and clock, align the "
                                     "polarization, characterize the detectors; the results "
                                     "go to the calibration record that qkdctl run uses.")
    cal.add_argument("what", choices=(*CALIBRATIONS, "all"))
    cal.add_argument("--config", metavar="FILE",
                     help="bench file (TOML); default: the built-in simulated bench")
    cal.add_argument("--write", metavar="FILE",
                     help="calibration record to update (default: <bench>.calibration.toml "
                          "beside the bench file)")
    cal.add_argument("--seed", type=_seed, default=None, metavar="N",
                     help="random seed of the simulated bench's acquisitions")
    cal.add_argument("--plot", metavar="DIR", help="write PNG figures to DIR/<step>/")
    cal.add_argument("--dark-s", type=_positive_float, metavar="SECONDS",
                     help="laser-off acquisition of the detector calibration (default 10)")
    cal.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    cal.set_defaults(func=cmd_calibrate)

    from .keyrate import register as register_keyrate

    register_keyrate(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except QkdctlError as e:
        msg = " ".join(str(e).split("\n"))
        from .auth import AuthenticationError

        if isinstance(e, AuthenticationError):
            print(f"qkdctl: TAMPER ALARM: classical channel: {msg}; the session stopped and "
                  "kept no key from the blocks not yet distilled", file=sys.stderr)
            return EXIT_TAMPER
        print(f"qkdctl: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qkdctl: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of our output went away (qkdctl info FILE | head): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
