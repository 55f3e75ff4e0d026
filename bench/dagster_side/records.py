"""Print, as JSON, the timings of the given runs read from the Dagster instance in DAGSTER_HOME.

Run by the dagster venv's python (the main venv has no dagster). Reads the run IDs as a JSON
list on stdin. For each run: its status, create time, start/end time (the run record) and the
times of its RUN_STARTING event (the daemon dequeued it) and of the first ENGINE_EVENT the run
worker writes, "Started process for run (pid: N)." Also prints the run-queue settings in effect.
"""

import json
import sys

from dagster import DagsterEventType, DagsterInstance, RunsFilter

WORKER_STARTED = "Started process for run"


def main() -> None:
    run_ids = json.load(sys.stdin)
    out: dict = {"runs": {}}
    with DagsterInstance.get() as instance:
        coordinator = instance.run_coordinator
        out["run_coordinator"] = type(coordinator).__name__
        out["run_launcher"] = type(instance.run_launcher).__name__
        out["dequeue_interval_seconds"] = getattr(coordinator, "dequeue_interval_seconds", None)
        out["dequeue_use_threads"] = getattr(coordinator, "dequeue_use_threads", None)
        queue = instance.get_concurrency_config().run_queue_config
        out["max_concurrent_runs"] = queue.max_concurrent_runs if queue else None
        records = {}
        for start in range(0, len(run_ids), 500):
            chunk = run_ids[start : start + 500]
            for record in instance.get_run_records(RunsFilter(run_ids=chunk)):
                records[record.dagster_run.run_id] = record
        types = {DagsterEventType.RUN_STARTING, DagsterEventType.ENGINE_EVENT}
        for run_id in run_ids:
            record = records.get(run_id)
            if record is None:
                out["runs"][run_id] = None
                continue
            starting = worker = None
            for entry in instance.all_logs(run_id, of_type=types):
                event_type = entry.dagster_event_type
                if event_type == DagsterEventType.RUN_STARTING and starting is None:
                    starting = entry.timestamp
                elif (
                    event_type == DagsterEventType.ENGINE_EVENT
                    and worker is None
                    and entry.message.startswith(WORKER_STARTED)
                ):
                    worker = entry.timestamp
            out["runs"][run_id] = {
                "status": record.dagster_run.status.value,
                "create_time": record.create_timestamp.timestamp(),
                "starting_time": starting,
                "worker_started_time": worker,
                "start_time": record.start_time,
                "end_time": record.end_time,
            }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
