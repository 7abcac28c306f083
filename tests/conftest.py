"""Test-wide settings."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_user_files(tmp_path_factory):
    """Runs keep their secret keys and calibration records in temporary folders,
    never the user's (and never pick up the user's calibration)."""
    new = {"QKDCTL_KEYSTORE": str(tmp_path_factory.mktemp("keystore") / "keys"),
           "XDG_DATA_HOME": str(tmp_path_factory.mktemp("xdg-data"))}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
