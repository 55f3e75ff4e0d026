"""`python -m bench.simagents URL N`: N simulated agents speaking the real agent protocol.

Each registers (serving a queue no run uses, so it is idle), then heartbeats at the
interval the control plane asks for, jittered as a real agent's (`heartbeat_pause`), and
keeps a long-poll open, like a real agent. Runs in its own process so its CPU is not the
control plane's. Prints "ready" once all have registered; runs until killed. SIGUSR1
toggles flood mode: every agent heartbeats back to back, to find how many heartbeats per
second the control plane can take.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import sys

from agent.client import ControlPlaneClient, ControlPlaneUnreachable
from agent.heartbeat import heartbeat_pause
from control_plane import collector
from protocol.messages import (
    CodeLocationInfo,
    Heartbeat,
    HeartbeatReply,
    Poll,
    PollReply,
    Register,
    Registered,
)

REGISTERING_AT_ONCE = 50  # like a fleet coming up, not 5,000 registrations in one instant


async def one_agent(
    url: str, index: int, registered: asyncio.Queue, gate: asyncio.Semaphore, flood: asyncio.Event
) -> None:
    async with ControlPlaneClient(url) as client:  # its own connections, as a real agent's
        await serve(client, index, registered, gate, flood)


async def serve(
    client: ControlPlaneClient,
    index: int,
    registered: asyncio.Queue,
    gate: asyncio.Semaphore,
    flood: asyncio.Event,
) -> None:
    async with gate:
        reply = await client.call(
            "register",
            Register(
                name=f"sim-{index}",
                hostname="sim",
                version="sim",
                queues=["sim-idle"],
                max_concurrent_runs=1,
                code_locations=[CodeLocationInfo(name="sim")],
            ),
            Registered,
            120,
        )
    await registered.put(index)

    async def heartbeat() -> None:
        while True:
            with contextlib.suppress(ControlPlaneUnreachable):  # retried, as an agent does
                await client.call(
                    "heartbeat", Heartbeat(agent_id=reply.agent_id), HeartbeatReply, 120
                )
            if not flood.is_set():
                await asyncio.sleep(heartbeat_pause(reply.heartbeat_interval_seconds))

    async def poll() -> None:
        while True:
            try:
                await client.call(
                    "poll",
                    Poll(agent_id=reply.agent_id),
                    PollReply,
                    reply.poll_timeout_seconds + 60,
                )
            except ControlPlaneUnreachable:  # e.g. a kept-alive connection the server closed
                await asyncio.sleep(1.0)

    await asyncio.gather(heartbeat(), poll())


async def main(url: str, count: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two connections per agent
    registered: asyncio.Queue[int] = asyncio.Queue()
    gate = asyncio.Semaphore(REGISTERING_AT_ONCE)
    flood = asyncio.Event()

    def toggle() -> None:
        if flood.is_set():
            flood.clear()
        else:
            flood.set()

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, toggle)
    tasks = [asyncio.create_task(one_agent(url, i, registered, gate, flood)) for i in range(count)]
    for _ in range(count):
        await registered.get()
    # 5,000 agents' sessions and connections are a large heap: CPython's full collections
    # of it froze this process for up to a second, and every agent then heartbeat and
    # polled at once on waking, a burst no real fleet of separate hosts produces. The
    # control plane's own policy keeps the load generator's pauses out of the figures.
    collector.tune()
    print("ready", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
