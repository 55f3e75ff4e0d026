"""The pool granter: gives free pool slots to the steps waiting for them.

Woken the moment a slot is claimed or freed (a step asks, a step's attempt ends, a run
ends or is fenced, a limit changes), it runs one grant pass: `plan_grants` decides over
every live claim, storage records the grants in the same transaction, and each granted
step's agent is woken, so its held-open poll carries the grant to the worker at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.bus import WakeBus, slots_granted
from control_plane.config import ConcurrencyConfig
from control_plane.model.pools import Claim, GrantPlan, plan_grants
from control_plane.storage.port import PoolStore


@dataclass(frozen=True)
class PoolGranter:
    storage: PoolStore
    config: ConcurrencyConfig
    bus: WakeBus


async def grant_pass(granter: PoolGranter, now: float) -> None:
    def decide(claims: list[Claim], set_limits: dict[str, int]) -> GrantPlan:
        return plan_grants(claims, granter.config.limits(set_limits))

    granted = await granter.storage.grant_slots(now, decide)
    if granted:
        slots_granted(granter.bus, {c.agent_id for c in granted}, {c.run_id for c in granted})
