"""`python -m bench.simagents URL N`: N simulated agents speaking the real agent protocol.

Each registers (serving a queue no run uses, so it is idle), then heartbeats at the
interval the control plane asks for and keeps a long-poll open, like a real agent. Runs
in its own process so its CPU is not the control plane's. Prints "ready" once all have
registered; runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

from agent.client import ControlPlaneClient
from protocol.messages import (
    CodeLocationInfo,
    Heartbeat,
    HeartbeatReply,
    Poll,
    PollReply,
    Register,
    Registered,
)


async def one_agent(url: str, index: int, registered: asyncio.Queue) -> None:
    async with ControlPlaneClient(url) as client:  # its own connections, as a real agent's
        await serve(client, index, registered)


async def serve(client: ControlPlaneClient, index: int, registered: asyncio.Queue) -> None:
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
        60,
    )
    await registered.put(index)

    async def heartbeat() -> None:
        while True:
            await client.call("heartbeat", Heartbeat(agent_id=reply.agent_id), HeartbeatReply, 60)
            await asyncio.sleep(reply.heartbeat_interval_seconds)

    async def poll() -> None:
        while True:
            await client.call(
                "poll", Poll(agent_id=reply.agent_id), PollReply, reply.poll_timeout_seconds + 30
            )

    await asyncio.gather(heartbeat(), poll())


async def main(url: str, count: int) -> None:
    registered: asyncio.Queue[int] = asyncio.Queue()
    tasks = [asyncio.create_task(one_agent(url, i, registered)) for i in range(count)]
    for _ in range(count):
        await registered.get()
    print("ready", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
