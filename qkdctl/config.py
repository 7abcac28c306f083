"""Bench configuration: TOML in, validated typed objects out.

A bench file describes one QKD bench: what Alice sends (``[source]``), how
Bob's detectors map to BB84 outcomes (``[receiver]``), how the time tags are
analysed (``[analysis]``), which instrument drivers make up the bench
(``[instruments.*]``) and, for the simulated bench, the physics of the
simulated optical table (``[sim]``). Units are in the key names.

Every value is checked before anything starts. A bad file raises
:class:`~qkdctl.errors.ConfigError` with one line naming the file, the key,
the value and what is allowed.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "AnalysisConfig",
    "BenchConfig",
    "DetectorChannel",
    "EavesdropperConfig",
    "InstrumentConfig",
    "LinkConfig",
    "PostprocessConfig",
    "ReceiverConfig",
    "SimConfig",
    "SimDetector",
    "SourceConfig",
    "default_bench_path",
    "SIDES",
    "load_bench",
    "parse_address",
    "parse_bench",
]

BASES = ("Z", "X")


def _spec(doc: str = "", *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, hi_open: bool = False,
          choices: tuple[Any, ...] | None = None, default: Any = MISSING,
          default_factory: Any = MISSING) -> Any:
    """A dataclass field with range / choice metadata used by the validator."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "choices": choices}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _allowed(meta: dict[str, Any]) -> str:
    if meta.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    def num(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    parts = []
    if meta.get("lo") is not None:
        parts.append(("> " if meta["lo_open"] else ">= ") + num(meta["lo"]))
    if meta.get("hi") is not None:
        parts.append(("< " if meta["hi_open"] else "<= ") + num(meta["hi"]))
    return " and ".join(parts)


@dataclass(frozen=True)
class SourceConfig:
    """Alice's transmitter: pulse rate, decoy intensities, basis choice, sync."""

    rep_rate_hz: float = _spec("pulse repetition rate", lo=1e3, hi=1e11)
    intensity_names: tuple[str, ...] = _spec(
        "names of the intensity classes, strongest first",
        default=("signal", "decoy", "vacuum"))
    mean_photon_numbers: tuple[float, ...] = _spec(
        "mean photon number of each intensity class", lo=0.0, hi=10.0,
        default=(0.5, 0.1, 2e-4))
    intensity_probabilities: tuple[float, ...] = _spec(
        "probability of each intensity class", lo=0.0, hi=1.0, default=(0.7, 0.2, 0.1))
    z_basis_probability: float = _spec("probability that Alice prepares a Z state",
                                       lo=0.0, hi=1.0, default=0.5)
    sequence: str = _spec("where Alice's per-pulse choices come from",
                          choices=("stream", "pattern"), default="stream")
    pattern_length: int = _spec("length of the repeating pattern (sequence = 'pattern')",
                                lo=1, hi=2**31, default=1024)
    sync_period_pulses: int = _spec("pulses between two sync tags", lo=1, hi=2**31,
                                    default=1000)

    @property
    def period_ps(self) -> float:
        return 1e12 / self.rep_rate_hz


@dataclass(frozen=True)
class DetectorChannel:
    """One of Bob's detectors as the analysis sees it."""

    channel: int = _spec("time-tagger input of this detector", lo=0, hi=254)
    basis: str = _spec("measurement basis behind this detector", choices=BASES)
    bit: int = _spec("bit value this detector reports", choices=(0, 1))
    name: str = _spec("label", default="")
    delay_ps: int = _spec("arrival time of pulse n minus its sync tag time, from calibration",
                          lo=-10**9, hi=10**9, default=0)


@dataclass(frozen=True)
class ReceiverConfig:
    """Bob's receiver: passive basis splitter and the detector-to-outcome map."""

    z_basis_probability: float = _spec("fraction of light the basis splitter sends to Z",
                                       lo=0.0, hi=1.0, default=0.5)
    sync_channel: int = _spec("time-tagger input carrying Alice's sync", lo=0, hi=254,
                              default=0)
    detectors: tuple[DetectorChannel, ...] = _spec("Bob's detectors", default=())


@dataclass(frozen=True)
class AnalysisConfig:
    """How time tags become sifted key."""

    gate_width_ps: float = _spec("width of the acceptance window centred on the expected "
                                 "arrival", lo=0.0, lo_open=True, default=300.0)
    multi_click: str = _spec("what to do with clicks in both bases in one pulse",
                             choices=("random", "discard"), default="random")
    period_tracking_syncs: int = _spec("sync intervals the period estimate spans",
                                       lo=1, hi=4096, default=64)
    first_sync_pulse: int = _spec("Alice's pulse number of the first sync tag", lo=0,
                                  default=0)
    block_tags: int = _spec("time tags per block read from the tagger", lo=1, hi=2**28,
                            default=1 << 20)


@dataclass(frozen=True)
class PostprocessConfig:
    """From sifted key to secret key: estimation, error correction, verification,
    privacy amplification, finite-key length, authentication of the classical channel."""

    enabled: bool = _spec("distil secret key (false: stop at sifted key)", default=True)
    block_bits: int = _spec("sifted key bits (key basis) per privacy-amplification block",
                            lo=1024, hi=2**30, default=1 << 22)
    min_block_bits: int = _spec("the last, partial block of a run is distilled if it has at "
                                "least this many bits", lo=1024, hi=2**30, default=1 << 18)
    qber_sample_fraction: float = _spec(
        "fraction of the key-basis bits disclosed to estimate the QBER before error "
        "correction", lo=0.0, hi=0.5, lo_open=True, default=0.005)
    qber_abort: float = _spec("a block whose estimated QBER (either basis) exceeds this "
                              "raises a tamper alarm and yields no key", lo=0.0, hi=0.5,
                              lo_open=True, default=0.11)
    phase_error_tolerance: float = _spec("a block whose phase-error bound exceeds this "
                                         "yields no key", lo=0.0, hi=0.5, lo_open=True,
                                         default=0.11)
    eps_sec: float = _spec("secrecy parameter of each block", lo=0.0, hi=1.0, lo_open=True,
                           hi_open=True, default=1e-9)
    eps_cor: float = _spec("correctness parameter of each block (verification hash)",
                           lo=0.0, hi=1.0, lo_open=True, hi_open=True, default=1e-15)
    error_correction: str = _spec("reconciliation protocol", choices=("cascade",),
                                  default="cascade")
    auth: str = _spec("authentication of the classical channel",
                      choices=("hmac-sha256", "wegman-carter"), default="hmac-sha256")
    psk_file: str = _spec("file holding the pre-shared authentication key (at least 32 "
                          "bytes; empty: a fresh key per session, which only the simulated "
                          "bench may use)", default="")
    blocks_in_flight: int = _spec("blocks distilled at once, each on its own channel, so "
                                  "that the round trips of one block overlap those of the "
                                  "others (the network's latency is paid once, not per "
                                  "block)", lo=1, hi=64, default=4)


@dataclass(frozen=True)
class LinkConfig:
    """Alice and Bob on two hosts: addresses, timeouts, each side's pre-shared key."""

    alice_listen: str = _spec("host:port where Alice's process listens for Bob's (binding "
                              "beyond loopback is an explicit choice)",
                              default="127.0.0.1:47610")
    alice_address: str = _spec("host:port where Bob's process reaches Alice's",
                               default="127.0.0.1:47610")
    sim_table: str = _spec("host:port of the simulated optical table (qkdctl sim-table), "
                           "which the mock instruments of both sides reach",
                           default="127.0.0.1:47611")
    connect_timeout_s: float = _spec("how long either side waits for the other to start",
                                     lo=0.0, lo_open=True, hi=86400.0, default=60.0)
    link_timeout_s: float = _spec("how long a dropped connection may take to come back "
                                  "before both sides stop", lo=0.0, lo_open=True,
                                  hi=3600.0, default=10.0)
    idle_timeout_s: float = _spec("silence after which a connection counts as dropped "
                                  "(keep-alives flow several times within it)", lo=0.1,
                                  hi=3600.0, default=5.0)
    alice_psk_file: str = _spec("Alice's copy of the pre-shared authentication key (empty: "
                                "postprocess.psk_file)", default="")
    bob_psk_file: str = _spec("Bob's copy of the pre-shared authentication key (empty: "
                              "postprocess.psk_file)", default="")


@dataclass(frozen=True)
class InstrumentConfig:
    """One instrument of the bench: its driver, where it is, its settings and limits."""

    driver: str = _spec("driver name", default="mock")
    resource: str = _spec("VISA resource, serial port or address", default="")
    backend: str = _spec("VISA library for a VISA resource: '' (the system's), '@py' "
                         "(pyvisa-py), 'devices.yaml@sim' (pyvisa-sim)", default="")
    timeout_s: float = _spec("how long to wait for a reply", lo=0.0, lo_open=True, hi=600.0,
                             default=2.0)
    settings: dict[str, Any] = _spec("settings applied when the bench is armed",
                                     default_factory=dict)
    limits: dict[str, Any] = _spec("safety limits checked before any command",
                                   default_factory=dict)


@dataclass(frozen=True)
class SimDetector:
    """The physics of one simulated detector and its cable."""

    channel: int = _spec("time-tagger input", lo=0, hi=254)
    efficiency: float = _spec("detection efficiency", lo=0.0, hi=1.0, default=0.6)
    dark_count_rate_hz: float = _spec("dark count rate", lo=0.0, hi=1e8, default=30.0)
    dead_time_ns: float = _spec("non-paralysable dead time", lo=0.0, hi=1e6, default=50.0)
    afterpulse_probability: float = _spec("probability that a click is followed by an "
                                          "afterpulse", lo=0.0, hi=0.5, default=0.0)
    afterpulse_time_constant_ns: float = _spec("mean delay of an afterpulse after the dead "
                                               "time", lo=0.0, lo_open=True, hi=1e6,
                                               default=100.0)
    jitter_ps: float = _spec("RMS timing jitter (detector and tagger)", lo=0.0, hi=1e5,
                             default=30.0)
    delay_ps: int = _spec("true arrival time of pulse n minus its sync tag time",
                          lo=-10**9, hi=10**9, default=0)


@dataclass(frozen=True)
class EavesdropperConfig:
    """An eavesdropper on the simulated quantum channel, at Alice's output.

    ``intercept-resend``: on each attacked pulse Eve measures in a random basis
    with an ideal detector and, when she detects a photon, resends a pulse of
    the same mean photon number in the state she found (none otherwise).
    ``pns``: photon-number splitting. Eve measures the photon number without
    disturbing the polarization, keeps one photon of every multi-photon pulse
    and forwards the rest to Bob over a channel of her own; she blocks single
    photons. Her channel's transmittance (and, if that is not enough, the
    fraction of single photons she lets through) are chosen so that Bob sees the
    signal gain of the honest channel, unless given here.
    """

    attack: str = _spec("the attack", choices=("none", "intercept-resend", "pns"),
                        default="none")
    fraction: float = _spec("fraction of pulses attacked", lo=0.0, hi=1.0, default=1.0)
    pns_channel_transmittance: float | None = _spec(
        "transmittance of Eve's channel to Bob (default: chosen to keep the signal gain)",
        lo=0.0, hi=1.0, default=None)
    pns_single_photon_block_fraction: float | None = _spec(
        "fraction of single-photon pulses Eve blocks (default: chosen to keep the signal "
        "gain)", lo=0.0, hi=1.0, default=None)


@dataclass(frozen=True)
class SimConfig:
    """The simulated optical table behind the mock instruments."""

    fiber_length_km: float = _spec("fiber length", lo=0.0, hi=1000.0, default=50.0)
    fiber_attenuation_db_per_km: float = _spec("fiber loss", lo=0.0, hi=10.0, default=0.2)
    bob_insertion_loss_db: float = _spec("Bob's optical loss before the detectors",
                                         lo=0.0, hi=60.0, default=3.0)
    misalignment: float = _spec("probability that a photon lands in the wrong detector of "
                                "the right basis", lo=0.0, hi=0.5, default=0.01)
    clock_offset_ps: int = _spec("time-tagger clock at Alice's pulse 0", lo=-10**15,
                                 hi=10**15, default=1_000_000)
    clock_drift_ppm: float = _spec("time-tagger clock rate relative to Alice's, minus one",
                                   lo=-1000.0, hi=1000.0, default=2.0)
    tagger_resolution_ps: int = _spec("time-tagger bin size", lo=1, hi=10**6, default=1)
    sync_jitter_ps: float = _spec("RMS jitter of the sync tags", lo=0.0, hi=1e5, default=5.0)
    jitter_clip_sigmas: float = _spec("timing jitter is a normal law cut at this many "
                                      "sigmas", lo=1.0, hi=20.0, default=8.0)
    laser_threshold_ma: float = _spec("laser threshold current", lo=0.0, default=20.0)
    laser_calibrated_current_ma: float = _spec(
        "laser current at which the source's mean photon numbers hold", lo=0.0,
        lo_open=True, default=45.0)
    detectors: tuple[SimDetector, ...] = _spec("simulated detectors", default=())
    eavesdropper: EavesdropperConfig = _spec("an eavesdropper on the channel",
                                             default_factory=EavesdropperConfig)
    channel_rotation_deg: tuple[float, ...] | None = _spec(
        "polarization transformation of the fiber, as Euler angles [a, b, c] on the "
        "Poincare sphere: rotations about S1 by a, about S2 by b, about S1 by c (default: "
        "none)", lo=-720.0, hi=720.0, default=None)
    polarization_seed: int | None = _spec(
        "draw the fiber's polarization transformation uniformly at random from this seed "
        "(instead of channel_rotation_deg)", lo=0, hi=2**63 - 1, default=None)
    waveplate_retardances_deg: tuple[float, ...] = _spec(
        "retardance of each waveplate of Bob's polarization compensation (the mock "
        "polarization controller's axes), in the order the light passes them",
        lo=0.0, hi=360.0, default=(90.0, 180.0, 90.0))
    waveplate_offsets_deg: tuple[float, ...] = _spec(
        "angle of each waveplate's fast axis from H when its mount reads 0", lo=-180.0,
        hi=180.0, default=(0.0, 0.0, 0.0))

    @property
    def channel_transmittance(self) -> float:
        loss_db = self.fiber_length_km * self.fiber_attenuation_db_per_km
        return 10.0 ** (-loss_db / 10.0)

    @property
    def bob_transmittance(self) -> float:
        return 10.0 ** (-self.bob_insertion_loss_db / 10.0)


@dataclass(frozen=True)
class BenchConfig:
    """A whole bench file."""

    name: str = "bench"
    protocol: str = "bb84-decoy"
    source: SourceConfig = field(default_factory=SourceConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    instruments: dict[str, InstrumentConfig] = field(default_factory=dict)
    sim: SimConfig | None = None
    link: LinkConfig = field(default_factory=LinkConfig)
    path: str = "<string>"
    #: the parsed TOML document, as validated (recordings store it to rebuild the config)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: the file's text, when it came from a file
    text: str | None = field(default=None, repr=False, compare=False)
    #: the calibration record applied to this configuration (its path and text), if any
    calibration_path: str | None = field(default=None, repr=False, compare=False)
    calibration_text: str | None = field(default=None, repr=False, compare=False)

    def with_analysis(self, **changes: Any) -> BenchConfig:
        return replace(self, analysis=replace(self.analysis, **changes))

    @property
    def period_ps(self) -> float:
        return self.source.period_ps


# --------------------------------------------------------------------------- parsing

_BENCH_KEYS = {"bench", "source", "receiver", "analysis", "postprocess", "instruments", "sim",
               "link"}
#: which host each instrument role belongs to: Alice's drives the light she sends, Bob's
#: measures it
SIDES = {"laser": "alice", "modulator": "alice", "detectors": "bob", "polarization": "bob",
         "tagger": "bob"}
_BENCH_TABLE = {"name": str, "protocol": str}
#: protocol -> number of intensity classes: "bb84-decoy" is efficient BB84 with two decoys
#: (finite-key bound of Lim et al. 2014), "bb84-one-decoy" with one (Rusca et al. 2018)
PROTOCOLS = {"bb84-decoy": 3, "bb84-one-decoy": 2}


class _Ctx:
    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, msg: str) -> typing.NoReturn:
        # keys and values come from the user's file: keep the message on one line
        key = key.encode("unicode_escape").decode("ascii")
        msg = msg.replace("\n", "\\n").replace("\r", "\\r")
        raise ConfigError(f"{self.path}: {key}: {msg}")


def _typename(t: Any) -> str:
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(
        t, getattr(t, "__name__", str(t)))


def _check_range(ctx: _Ctx, key: str, value: Any, meta: dict[str, Any]) -> None:
    if meta.get("choices") is not None:
        if value not in meta["choices"]:
            ctx.fail(key, f"{value!r} is not allowed; expected {_allowed(meta)}")
        return
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, float) and not math.isfinite(value):
        ctx.fail(key, f"{value!r} is not a finite number")
    bad = False
    if lo is not None:
        bad |= value <= lo if meta["lo_open"] else value < lo
    if hi is not None:
        bad |= value >= hi if meta["hi_open"] else value > hi
    if bad:
        ctx.fail(key, f"{value!r} is out of range; allowed {_allowed(meta)}")


def _convert(ctx: _Ctx, key: str, tp: Any, value: Any, meta: dict[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(ctx, key, args[0], value, meta)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            ctx.fail(key, f"expected a table, got {type(value).__name__}")
        return _build(ctx, tp, value, key + ".")
    if origin is tuple:
        item_t = typing.get_args(tp)[0]
        if not isinstance(value, list):
            ctx.fail(key, f"expected an array, got {value!r}")
        return tuple(_convert(ctx, f"{key}[{i}]", item_t, v, meta) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            ctx.fail(key, f"expected a table, got {value!r}")
        val_t = typing.get_args(tp)[1]
        if val_t is Any:
            return dict(value)
        return {k: _convert(ctx, f"{key}.{k}", val_t, v, meta) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            ctx.fail(key, f"expected a number, got {value!r}")
        value = float(value)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            ctx.fail(key, f"expected an integer, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            ctx.fail(key, f"expected a string, got {value!r}")
    elif tp is bool:
        if not isinstance(value, bool):
            ctx.fail(key, f"expected true or false, got {value!r}")
    _check_range(ctx, key, value, meta)
    return value


def _build(ctx: _Ctx, cls: Any, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    flds = {f.name: f for f in fields(cls)}
    for k in data:
        if k not in flds:
            ctx.fail(prefix + k, "unknown key; allowed keys here: " + ", ".join(flds))
    kwargs = {}
    for name, f in flds.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                ctx.fail(prefix + name, "missing (" + (f.metadata.get("doc") or name) + ")")
            continue
        kwargs[name] = _convert(ctx, prefix + name, hints[name], data[name], dict(f.metadata))
    return cls(**kwargs)


def _check_probabilities(ctx: _Ctx, key: str, probs: tuple[float, ...]) -> None:
    if abs(sum(probs) - 1.0) > 1e-9:
        ctx.fail(key, f"{list(probs)} sums to {sum(probs):.12g}; the probabilities must sum to 1")


def _cross_checks(ctx: _Ctx, b: BenchConfig) -> None:
    s = b.source
    n = len(s.mean_photon_numbers)
    if not 1 <= n <= 4:
        ctx.fail("source.mean_photon_numbers", f"{n} intensity classes; allowed 1 to 4")
    if len(s.intensity_probabilities) != n:
        ctx.fail("source.intensity_probabilities",
                 f"has {len(s.intensity_probabilities)} entries but "
                 f"source.mean_photon_numbers has {n}")
    if len(s.intensity_names) != n:
        ctx.fail("source.intensity_names",
                 f"has {len(s.intensity_names)} entries but source.mean_photon_numbers has {n}")
    _check_probabilities(ctx, "source.intensity_probabilities", s.intensity_probabilities)
    if list(s.mean_photon_numbers) != sorted(s.mean_photon_numbers, reverse=True):
        ctx.fail("source.mean_photon_numbers",
                 f"{list(s.mean_photon_numbers)}: list the classes strongest first")
    if len(set(s.mean_photon_numbers)) != n:
        ctx.fail("source.mean_photon_numbers",
                 f"{list(s.mean_photon_numbers)}: intensity classes must differ")
    want = PROTOCOLS[b.protocol]
    mu = s.mean_photon_numbers
    if n != want:
        ctx.fail("source.mean_photon_numbers",
                 f"{list(mu)}: protocol {b.protocol!r} needs {want} intensity classes")
    if b.protocol == "bb84-decoy" and not mu[0] > mu[1] + mu[2]:
        ctx.fail("source.mean_photon_numbers",
                 f"{list(mu)}: the two-decoy bound needs signal > decoy + vacuum")
    p = b.postprocess
    if p.min_block_bits > p.block_bits:
        ctx.fail("postprocess.min_block_bits", f"{p.min_block_bits} is larger than "
                 f"postprocess.block_bits = {p.block_bits}")

    r = b.receiver
    if not r.detectors:
        ctx.fail("receiver.detectors", "missing: give at least one [[receiver.detectors]]")
    seen: dict[int, int] = {}
    outcomes = set()
    for i, d in enumerate(r.detectors):
        if d.channel == r.sync_channel:
            ctx.fail(f"receiver.detectors[{i}].channel",
                     f"{d.channel} is the sync channel (receiver.sync_channel)")
        if d.channel in seen:
            ctx.fail(f"receiver.detectors[{i}].channel",
                     f"{d.channel} is already used by receiver.detectors[{seen[d.channel]}]")
        seen[d.channel] = i
        outcomes.add((d.basis, d.bit))
    if len(r.detectors) != 4 or len(outcomes) != 4:
        ctx.fail("receiver.detectors",
                 "a passive-basis receiver needs four detectors, one for each of "
                 "(Z,0), (Z,1), (X,0), (X,1)")

    a = b.analysis
    if a.gate_width_ps >= s.period_ps:
        ctx.fail("analysis.gate_width_ps",
                 f"{a.gate_width_ps:g} ps is not shorter than the pulse period "
                 f"{s.period_ps:g} ps (source.rep_rate_hz)")

    for name, inst in b.instruments.items():
        if not inst.driver:
            ctx.fail(f"instruments.{name}.driver", "missing driver name")

    for key in ("alice_listen", "alice_address", "sim_table"):
        try:
            parse_address(getattr(b.link, key))
        except ValueError as e:
            ctx.fail(f"link.{key}", str(e))

    if b.sim is not None:
        sim_seen: dict[int, int] = {}
        for i, d in enumerate(b.sim.detectors):
            if d.channel not in seen:
                ctx.fail(f"sim.detectors[{i}].channel",
                         f"{d.channel} is not one of the receiver's detector channels "
                         f"{sorted(seen)}")
            if d.channel in sim_seen:
                ctx.fail(f"sim.detectors[{i}].channel", f"{d.channel} is already simulated "
                         f"by sim.detectors[{sim_seen[d.channel]}]")
            sim_seen[d.channel] = i
        missing = sorted(set(seen) - set(sim_seen))
        if missing:
            ctx.fail("sim.detectors", f"no simulated detector for channel(s) {missing}")
        if b.sim.laser_calibrated_current_ma <= b.sim.laser_threshold_ma:
            ctx.fail("sim.laser_calibrated_current_ma",
                     f"{b.sim.laser_calibrated_current_ma:g} mA is not above the threshold "
                     f"sim.laser_threshold_ma = {b.sim.laser_threshold_ma:g} mA")


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` (``"[v6]:port"`` for IPv6) as (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        n = int(port)
    except ValueError:
        raise ValueError(f"{text!r}: the port {port!r} is not a number") from None
    if not 0 <= n <= 65535:
        raise ValueError(f"{text!r}: the port must be 0..65535")
    return host, n


def parse_bench(data: dict[str, Any], path: str = "<string>",
                text: str | None = None) -> BenchConfig:
    """Validate a parsed TOML document into a :class:`BenchConfig`."""
    ctx = _Ctx(path)
    for k in data:
        if k not in _BENCH_KEYS:
            ctx.fail(k, "unknown table; allowed: " + ", ".join(sorted(_BENCH_KEYS)))
    bench = data.get("bench", {})
    if not isinstance(bench, dict):
        ctx.fail("bench", "expected a table")
    for k, v in bench.items():
        if k not in _BENCH_TABLE:
            ctx.fail(f"bench.{k}", "unknown key; allowed keys here: name, protocol")
        if not isinstance(v, str):
            ctx.fail(f"bench.{k}", f"expected a string, got {v!r}")
    protocol = bench.get("protocol", "bb84-decoy")
    if protocol not in PROTOCOLS:
        ctx.fail("bench.protocol", f"{protocol!r} is not allowed; expected one of "
                 + ", ".join(repr(p) for p in PROTOCOLS))

    def table(name: str, cls: Any) -> Any:
        v = data.get(name, {})
        if not isinstance(v, dict):
            ctx.fail(name, f"expected a table, got {v!r}")
        return _build(ctx, cls, v, name + ".")

    instruments = {}
    raw_inst = data.get("instruments", {})
    if not isinstance(raw_inst, dict):
        ctx.fail("instruments", "expected a table")
    for name, v in raw_inst.items():
        if not isinstance(v, dict):
            ctx.fail(f"instruments.{name}", f"expected a table, got {v!r}")
        instruments[name] = _build(ctx, InstrumentConfig, v, f"instruments.{name}.")
    cfg = BenchConfig(
        name=bench.get("name", Path(path).stem),
        protocol=protocol,
        source=table("source", SourceConfig),
        receiver=table("receiver", ReceiverConfig),
        analysis=table("analysis", AnalysisConfig),
        postprocess=table("postprocess", PostprocessConfig),
        instruments=instruments,
        sim=table("sim", SimConfig) if "sim" in data else None,
        link=table("link", LinkConfig),
        path=path,
        raw=data,
        text=text,
    )
    _cross_checks(ctx, cfg)
    return cfg


def load_bench(path: str | Path | None = None) -> BenchConfig:
    """Read and validate a bench file; ``None`` gives the built-in simulated bench."""
    p = Path(path) if path is not None else default_bench_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such bench file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a bench file (not UTF-8 text at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_bench(data, str(p), text)


def default_bench_path() -> Path:
    """The simulated bench shipped with the package (``configs/sim.toml``)."""
    return Path(str(resources.files("qkdctl.configs").joinpath("sim.toml")))
