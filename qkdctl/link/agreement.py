"""What the two hosts' bench files must agree on, checked when the sides meet.

Each side reads its own bench file (Alice's names her instruments, Bob's his).
The values both protocols depend on must be the same in both: the protocol,
Alice's source as Bob's analysis assumes it (pulse rate, intensities and
their probabilities, basis probability, sequence, sync period), the numbering
of pulses, the distillation parameters (block sizes, sample, thresholds,
epsilons, error correction, authentication, blocks in flight) and the
software's wire version. :func:`agreement` lists them as strings, each side
sends its list, and :func:`compare` names the first that differs with both
values.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import wire
from ..config import BenchConfig
from ..errors import ConfigError

__all__ = ["Agreement", "LINK_PROTOCOL_VERSION", "agreement", "compare"]

#: the version of the messages Alice and Bob exchange; both must speak the same
LINK_PROTOCOL_VERSION = 1

_KEYS = (
    "protocol",
    "source.rep_rate_hz", "source.mean_photon_numbers", "source.intensity_probabilities",
    "source.z_basis_probability", "source.sequence", "source.pattern_length",
    "source.sync_period_pulses", "analysis.first_sync_pulse", "receiver.z_basis_probability",
    "postprocess.enabled", "postprocess.block_bits", "postprocess.min_block_bits",
    "postprocess.qber_sample_fraction", "postprocess.qber_abort",
    "postprocess.phase_error_tolerance", "postprocess.eps_sec", "postprocess.eps_cor",
    "postprocess.error_correction", "postprocess.auth", "postprocess.blocks_in_flight",
)


@wire.message("link.Agreement")
@dataclass(frozen=True)
class Agreement:
    """One side's values of what both must agree on, and its session details."""

    role: str
    names: tuple
    values: tuple
    session: str        # Alice's: the prefix of the session's key IDs; Bob's: ""


def agreement(cfg: BenchConfig, role: str, session: str = "") -> Agreement:
    values = [f"wire {wire.FORMAT_VERSION}, link {LINK_PROTOCOL_VERSION}"]
    for key in _KEYS:
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        values.append(repr(list(obj) if isinstance(obj, tuple) else obj))
    return Agreement(role, ("software", *_KEYS), tuple(values), session)


def compare(mine: Agreement, theirs: Agreement, path: str) -> None:
    """ConfigError naming the first key on which the two sides differ."""
    if not isinstance(theirs, Agreement) or theirs.role == mine.role:
        raise ConfigError(f"{path}: the other side did not send its bench parameters")
    ours = dict(zip(mine.names, mine.values, strict=True))
    other = dict(zip(theirs.names, theirs.values, strict=False))
    for key, value in ours.items():
        if other.get(key) != value:
            theirs_v = other.get(key, "(missing)")
            raise ConfigError(f"{path}: the two sides differ on {key}: {mine.role} has "
                              f"{value}, {theirs.role} has {theirs_v}")
