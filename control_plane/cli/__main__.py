"""`python -m control_plane.cli`: the `fleetrun` command."""

import sys

from control_plane.cli import main

sys.exit(main())
