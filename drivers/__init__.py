"""Instrument drivers (imported as ``qkdctl.drivers``).

:mod:`.base` holds the interfaces (:class:`Laser`, :class:`PolarizationModulator`,
:class:`SinglePhotonDetector`, :class:`TimeTagger`); each instrument family has
its module; :mod:`.mock` holds the simulated instruments. :data:`DRIVERS` maps
a bench file's ``driver`` name and an instrument's role to the driver class.
"""

from __future__ import annotations

from qkdctl.errors import ConfigError

from .base import (
    ROLES,
    STATIC,
    Identity,
    Instrument,
    Laser,
    PolarizationController,
    PolarizationModulator,
    SinglePhotonDetector,
    TimeTagger,
)
from .mock import (
    MOCK_DRIVERS,
    MockDetectors,
    MockLaser,
    MockPolarizationModulator,
    MockTimeTagger,
    build_mock_bench,
)

__all__ = [
    "DRIVERS",
    "ROLES",
    "STATIC",
    "Identity",
    "Instrument",
    "Laser",
    "MockDetectors",
    "MockLaser",
    "MockPolarizationModulator",
    "MockTimeTagger",
    "PolarizationController",
    "PolarizationModulator",
    "SinglePhotonDetector",
    "TimeTagger",
    "available_drivers",
    "build_mock_bench",
    "driver_class",
]

from .elliptec import ELL14  # noqa: E402
from .idq_id120 import IdqId120  # noqa: E402
from .idq_tagger import IdqTimeController  # noqa: E402
from .keysight_awg import KeysightAWG  # noqa: E402
from .passive import PassiveDetectors  # noqa: E402
from .picoquant import HydraHarp400, MultiHarp150  # noqa: E402
from .single_quantum import SingleQuantumSnspd  # noqa: E402
from .swabian import SwabianTimeTagger  # noqa: E402
from .thorlabs_ld import CLD1015, ITC4000  # noqa: E402
from .thorlabs_mpc320 import MPC320  # noqa: E402

DRIVERS: dict[str, dict[str, type[Instrument]]] = {
    "mock": dict(MOCK_DRIVERS),
    "thorlabs-itc4000": {"laser": ITC4000},
    "thorlabs-cld1015": {"laser": CLD1015},
    "keysight-33500": {"modulator": KeysightAWG},
    "thorlabs-ell14": {"polarization": ELL14},
    "thorlabs-mpc320": {"polarization": MPC320},
    "idq-id120": {"detectors": IdqId120},
    "single-quantum": {"detectors": SingleQuantumSnspd},
    "passive": {"detectors": PassiveDetectors},
    "swabian": {"tagger": SwabianTimeTagger},
    "idq-id900": {"tagger": IdqTimeController},
    "idq-id1000": {"tagger": IdqTimeController},
    "picoquant-hydraharp": {"tagger": HydraHarp400},
    "picoquant-multiharp": {"tagger": MultiHarp150},
}
"""Driver name (``[instruments.<role>] driver = ...``) -> role -> driver class."""


def available_drivers() -> dict[str, tuple[str, ...]]:
    """Driver names, each with the roles it provides, sorted by name."""
    return {name: tuple(roles) for name, roles in sorted(DRIVERS.items())}


def driver_class(driver: str, role: str) -> type[Instrument]:
    """The class of driver ``driver`` for role ``role`` (ConfigError if there is none)."""
    if driver not in DRIVERS:
        raise ConfigError(f"unknown driver {driver!r}; available: {', '.join(sorted(DRIVERS))}")
    roles = DRIVERS[driver]
    if role not in roles:
        raise ConfigError(f"driver {driver!r} has no {role!r} instrument; it provides: "
                          f"{', '.join(roles)}")
    return roles[role]
