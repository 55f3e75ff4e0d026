"""`python -m bench.ingest_load URL RUNS EVENTS BATCH`: runs that log as fast as they can.

One simulated agent (RUNS slots) registers a location defining the `chatty` job, takes
the launches the control plane hands it on its long-poll, and for every run sends
RUN_START, EVENTS LOG events and RUN_SUCCESS in batches of BATCH records, all runs at
once, the way an agent's outbox does (the next batch once the previous one is acked).
Runs in its own process so that its CPU is not the control plane's. Prints "ready" once
registered, then one JSON line when every run is done: the first and last send times.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from agent.client import ControlPlaneClient
from protocol.messages import (
    CodeLocationInfo,
    EventAck,
    EventBatch,
    JobInfo,
    LaunchRun,
    OpInfo,
    Poll,
    PollReply,
    Register,
    Registered,
    RunRecord,
)


def _records(first_seq: int, count: int, total: int) -> list[RunRecord]:
    records = []
    data: dict[str, Any]
    for seq in range(first_seq, first_seq + count):
        if seq == 1:
            kind, data = "RUN_START", {"launch_received_time": time.time()}
        elif seq == total:
            kind, data = "RUN_SUCCESS", {}
        else:
            kind, data = "LOG", {"level": "INFO"}
        records.append(
            RunRecord(
                seq=seq,
                time=time.time(),
                kind="event",
                type=kind,
                step=None if kind != "LOG" else "chatter",
                message=f"row {seq} processed",
                data=data,
            )
        )
    return records


async def _send_run(
    client: ControlPlaneClient, agent_id: str, launch: LaunchRun, events: int, batch: int
) -> None:
    total = events + 2
    seq = 1
    while seq <= total:
        count = min(batch, total - seq + 1)
        message = EventBatch(
            agent_id=agent_id,
            run_id=launch.run_id,
            lease=launch.lease,
            records=_records(seq, count, total),
        )
        ack = await client.call("events", message, EventAck, 120)
        seq = ack.acked_seq + 1


async def main(url: str, runs: int, events: int, batch: int) -> None:
    async with ControlPlaneClient(url) as client:
        job = JobInfo(name="chatty", ops=[OpInfo(name="chatter")])
        location = CodeLocationInfo(name="ingest", jobs=[job])
        reply = await client.call(
            "register",
            Register(
                name="ingest",
                hostname="sim",
                version="sim",
                queues=["ingest"],
                max_concurrent_runs=runs,
                code_locations=[location],
            ),
            Registered,
            60,
        )
        print("ready", flush=True)
        launches: dict[str, LaunchRun] = {}
        deadline = time.monotonic() + 120
        while len(launches) < runs and time.monotonic() < deadline:
            held = [launch.lease for launch in launches.values()]
            polled = await client.call(
                "poll",
                Poll(agent_id=reply.agent_id, held_leases=held),
                PollReply,
                reply.poll_timeout_seconds + 30,
            )
            launches.update((launch.run_id, launch) for launch in polled.launches)
        if len(launches) < runs:
            raise SystemExit(f"only {len(launches)} of {runs} runs were launched")
        started = time.time()
        await asyncio.gather(
            *(
                _send_run(client, reply.agent_id, launch, events, batch)
                for launch in launches.values()
            )
        )
        print(json.dumps({"started": started, "finished": time.time()}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], *(int(a) for a in sys.argv[2:5])))
