"""Errors a user can cause. The CLI prints them on one line and exits non-zero."""


class QkdctlError(Exception):
    """Base class of every error qkdctl reports to the user without a traceback."""

    exit_code = 2


class ConfigError(QkdctlError):
    """A bench or analysis configuration is missing, malformed or out of range."""


class InstrumentError(QkdctlError):
    """An instrument did not answer, answered nonsense, or reported an error."""


class LimitError(InstrumentError):
    """A requested setting is outside the instrument's configured safety limits.

    Raised before anything is sent to the instrument.
    """


class DataError(QkdctlError):
    """Input data (time tags, recordings) is malformed."""
