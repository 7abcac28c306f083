"""Bench configurations shipped with qkdctl (``sim.toml`` is the built-in simulated bench)."""
