"""The code location the bench serves with `dagster code-server start` (runs in the dagster venv).

`hello` is the equivalent of fleetrun's `hello` example: one op that does nothing, so what is
timed is the orchestrator's own cost. Dagster's default executor (multiprocess) is kept, since
the bench measures Dagster's defaults.
"""

from dagster import Definitions, job, op


@op
def noop() -> None:
    """Does nothing."""


@job
def hello() -> None:
    noop()


defs = Definitions(jobs=[hello])
