"""Test-wide settings."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_keystore(tmp_path_factory):
    """Runs keep their secret keys in a temporary key store, never the user's."""
    old = os.environ.get("QKDCTL_KEYSTORE")
    os.environ["QKDCTL_KEYSTORE"] = str(tmp_path_factory.mktemp("keystore") / "keys")
    yield
    if old is None:
        os.environ.pop("QKDCTL_KEYSTORE", None)
    else:
        os.environ["QKDCTL_KEYSTORE"] = old
