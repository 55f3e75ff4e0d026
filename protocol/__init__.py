"""The agent protocol: versioned msgpack messages shared by the control plane and agents.

This package is the only code both sides share, so it holds nothing but message types,
their codec and the typed validation both use.
"""

PROTOCOL_VERSION = 5
# The control plane also speaks the previous version, so agents can be upgraded after it.
SUPPORTED_PROTOCOL_VERSIONS = (PROTOCOL_VERSION - 1, PROTOCOL_VERSION)
FLEETRUN_VERSION = "0.1.0"  # the one place it is set: pyproject.toml reads it from here
