"""1,000 sensors with 1 s intervals, each skipping (for bench/daemon.py)."""

from agent.sdk import DefaultSensorStatus, Definitions, SkipReason, job, op, sensor


@op
def nothing(context):
    return None


@job
def idle():
    nothing()


def _make(i: int):
    @sensor(
        job=idle,
        name=f"sensor_{i}",
        minimum_interval_seconds=1,
        default_status=DefaultSensorStatus.RUNNING,
    )
    def check(context):
        return SkipReason("nothing new")

    return check


defs = Definitions(jobs=[idle], sensors=[_make(i) for i in range(1000)])
