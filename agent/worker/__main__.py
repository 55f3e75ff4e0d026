"""`python -m agent.worker MODE`: a run worker (see main.py)."""

import sys

from agent.worker.main import main

sys.exit(main(sys.argv[1:]))
