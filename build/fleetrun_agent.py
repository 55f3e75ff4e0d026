"""Entry point of the one-file agent binary (see fleetrun-agent.spec)."""

import sys

from agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
