"""What every SCPI-speaking driver shares: the link, queries, numbers, the error queue.

A driver mixes :class:`ScpiInstrument` in front of its role interface::

    class ITC4000(ScpiInstrument, Laser):
        ...

and gets ``_open``/``_close`` (the link), ``_identity`` from ``*IDN?``, and
the helpers

- :meth:`ScpiInstrument.send`: empty the error queue of what earlier commands
  left there (logged as such), write the command, then read the queue until it
  reports no error; a device error is raised with the command that caused it;
- :meth:`ScpiInstrument.ask` / :meth:`ScpiInstrument.ask_float` /
  :meth:`ScpiInstrument.ask_bool`: query, with a garbled or truncated reply
  reported as such.

Every error names the instrument and the command.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

from qkdctl.errors import InstrumentError

from .base import Identity
from .transport import DEFAULT_TIMEOUT_S, Link, open_link

__all__ = ["ScpiInstrument", "parse_idn"]

log = logging.getLogger(__name__)


def parse_idn(reply: str) -> Identity:
    """``*IDN?`` -> Identity (make, model, serial, firmware); fewer fields are left empty."""
    parts = [p.strip() for p in reply.split(",")]
    parts += [""] * (4 - len(parts))
    return Identity(make=parts[0], model=parts[1], serial=parts[2],
                    firmware=",".join(parts[3:]).strip(","))


class ScpiInstrument:
    """Mixin: an instrument on a SCPI link (see the module documentation)."""

    #: the error-queue query, or None for instruments without one
    ERROR_QUERY: ClassVar[str | None] = "SYST:ERR?"
    #: link options of this instrument family (terminations, baud rate, ...)
    LINK_OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, name: str, *, resource: str = "", backend: str = "",
                 timeout_s: float = DEFAULT_TIMEOUT_S, link: Link | None = None, **kw: Any):
        super().__init__(name, **kw)
        opts = dict(self.LINK_OPTIONS)
        if backend:
            opts["backend"] = backend
        self.link = link if link is not None else open_link(
            name, resource, timeout_s=timeout_s, **opts)

    # -- lifecycle ------------------------------------------------------------------------
    def _open(self) -> None:
        self.link.open()
        self._on_open()

    def _on_open(self) -> None:
        """Hook: what to do right after the link opens (clear status, check the model)."""
        if self.ERROR_QUERY:
            self.write("*CLS")

    def _close(self) -> None:
        self.link.close()

    def _identity(self) -> Identity:
        return parse_idn(self.ask("*IDN?"))

    # -- commands -------------------------------------------------------------------------
    def write(self, command: str) -> None:
        self.link.write(command)

    def ask(self, command: str) -> str:
        reply = self.link.query(command)
        if reply == "":
            raise self.link.fail(f"query {command!r}", "empty reply")
        return reply

    def ask_float(self, command: str) -> float:
        reply = self.ask(command)
        try:
            v = float(reply.split(",")[0])
        except ValueError:
            raise self.link.fail(f"query {command!r}", f"garbled reply {reply[:40]!r} "
                                                       "(expected a number)") from None
        if not math.isfinite(v):
            raise self.link.fail(f"query {command!r}", f"not a finite number: {reply!r}")
        return v

    def ask_bool(self, command: str) -> bool:
        reply = self.ask(command).upper()
        if reply in ("1", "ON"):
            return True
        if reply in ("0", "OFF"):
            return False
        raise self.link.fail(f"query {command!r}", f"garbled reply {reply[:40]!r} "
                                                   "(expected 0 or 1)")

    def send(self, command: str) -> None:
        """Write ``command``, then raise the device's errors it caused, if any.

        Errors already queued (left by a query that failed, say) are logged and
        dropped first, so that an error is always reported against its command.
        """
        try:
            self.check_errors(f"before {command!r}")
        except InstrumentError as e:
            if "device error" not in str(e):
                raise
            log.warning("%s (left by an earlier command)", e)
        self.write(command)
        self.check_errors(command)

    def check_errors(self, command: str = "check errors") -> None:
        """Read the error queue empty; raise InstrumentError listing what it held."""
        if not self.ERROR_QUERY:
            return
        errors = []
        for _ in range(32):
            reply = self.ask(self.ERROR_QUERY)
            code = reply.split(",", 1)[0].strip().lstrip("+")
            try:
                if int(code) == 0:
                    break
            except ValueError:
                raise self.link.fail(f"query {self.ERROR_QUERY!r}",
                                     f"garbled error-queue reply {reply[:60]!r}") from None
            errors.append(reply)
        if errors:
            raise InstrumentError(f"{self.name}: {command}: device error: "
                                  + "; ".join(errors) + f" ({self.link.resource})")
