"""The root of every error the control plane raises on purpose.

Storage refusals, refused runs and API errors all derive from `ControlPlaneError`, so
a caller can tell a decision of ours from a bug; `control_plane/http/errors.py` turns
each kind into its HTTP status once, for both APIs.
"""

from __future__ import annotations


class ControlPlaneError(Exception):
    """Something the control plane refused or could not do; the message says what."""
