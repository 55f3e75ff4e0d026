"""Concurrency pools (Dagster's op concurrency): how many steps of ops in one pool run at
once, across every run and agent, and who gets the next free slot.

A claim is one slot asked for: by one attempt of a step (op granularity: the step asks
before it starts, and its attempt's end gives it back) or by a run for each pool its
job uses (run granularity: taken when the run is launched, given back when it ends).
Every claim lives under its run's lease, so whatever ends or fences the attempt frees
its slots in the same transaction (storage/sql/transitions.py).

`plan_grants` decides, over every live claim, which waiting ones get a slot now: by run
priority, then first come first served, pool by pool. Pure: storage runs it inside the
transaction that records the grants.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from control_plane.model.times import iso

RUN_SLOT = ""  # the `step` of a run's own claim (run granularity)
GRANULARITIES = ("op", "run")


@dataclass(frozen=True)
class PoolLimits:
    """Every limit that applies: set through the API (`pools set`), configured in
    `[[concurrency.pools]]`, and `default_pool_limit` for a pool neither names."""

    set_limits: dict[str, int] = field(default_factory=dict)
    configured: dict[str, int] = field(default_factory=dict)
    default: int = 0  # 0: a pool nobody configured is unlimited

    def limit_of(self, pool: str) -> int | None:
        """The pool's limit; None when it has none. A set or configured 0 holds every
        step of the pool back (paused); only the default's 0 means unlimited."""
        if pool in self.set_limits:
            return self.set_limits[pool]
        if pool in self.configured:
            return self.configured[pool]
        return self.default or None

    def source_of(self, pool: str) -> str:
        if pool in self.set_limits:
            return "api"
        if pool in self.configured:
            return "config"
        return "default"

    def named(self) -> set[str]:
        return set(self.set_limits) | set(self.configured)


@dataclass(frozen=True)
class Claim:
    """One slot of `pool` asked for by `step` (RUN_SLOT: the run itself), attempt
    `attempt`, of run attempt `lease`; held once `granted_time` is set."""

    claim_id: int
    pool: str
    run_id: str
    lease: int
    step: str
    attempt: int
    priority: int
    create_time: float
    granted_time: float | None = None
    noted: bool = False  # the run's event log says it waits
    agent_id: str | None = None

    @property
    def granted(self) -> bool:
        return self.granted_time is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "step": self.step or None,
            "attempt": self.attempt,
            "priority": self.priority,
            "since": iso(self.granted_time if self.granted else self.create_time),
        }


def waiting_order(claims: Iterable[Claim]) -> list[Claim]:
    """Who is served first: higher run priority, then the older claim."""
    return sorted(claims, key=lambda c: (-c.priority, c.claim_id))


@dataclass
class PoolUsage:
    """One pool as `pools list` shows it."""

    name: str
    limit: int | None
    source: str
    holders: list[Claim] = field(default_factory=list)
    waiters: list[Claim] = field(default_factory=list)

    @property
    def free(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - len(self.holders))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "limit": self.limit,
            "source": self.source,
            "in_use": len(self.holders),
            "waiting": len(self.waiters),
            "holders": [c.to_json() for c in self.holders],
            "waiters": [c.to_json() for c in self.waiters],
        }


def pool_usage(claims: Iterable[Claim], limits: PoolLimits) -> list[PoolUsage]:
    """Every pool with a limit or a claim, by name; waiters in the order they are served."""
    by_pool: dict[str, list[Claim]] = defaultdict(list)
    for claim in claims:
        by_pool[claim.pool].append(claim)
    usage = []
    for name in sorted(limits.named() | set(by_pool)):
        mine = by_pool.get(name, [])
        usage.append(
            PoolUsage(
                name,
                limits.limit_of(name),
                limits.source_of(name),
                sorted((c for c in mine if c.granted), key=lambda c: c.claim_id),
                waiting_order(c for c in mine if not c.granted),
            )
        )
    return usage


@dataclass
class GrantPlan:
    """What a grant pass does: the claims granted now, and the claims that wait and
    whose runs' event logs do not say so yet (each with why)."""

    granted: list[Claim] = field(default_factory=list)
    waiting: list[tuple[Claim, str]] = field(default_factory=list)


def plan_grants(claims: Iterable[Claim], limits: PoolLimits) -> GrantPlan:
    """Grant waiting claims pool by pool, in `waiting_order`, while the pool has room.

    Every claim takes one slot, so the first waiter that does not fit means none behind
    it fits either: a pool's queue is strictly ordered (no overtaking)."""
    plan = GrantPlan()
    for usage in pool_usage(claims, limits):
        in_use = len(usage.holders)
        free = len(usage.waiters) if usage.limit is None else max(0, usage.limit - in_use)
        granted, left = usage.waiters[:free], usage.waiters[free:]
        plan.granted += granted
        in_use += len(granted)
        for position, claim in enumerate(left, start=1):
            if not claim.noted:
                plan.waiting.append((claim, wait_reason(usage, in_use, position, len(left))))
    return plan


def wait_reason(usage: PoolUsage, in_use: int, position: int, line: int) -> str:
    if usage.limit == 0:
        return f"pool {usage.name} is paused (limit 0)"
    return (
        f"pool {usage.name}: {in_use} of {usage.limit} slots in use; {position} of {line} in line"
    )


def run_pool_problem(
    pools: Iterable[str], claims: Iterable[Claim], limits: PoolLimits
) -> str | None:
    """Run granularity: why a run whose job uses `pools` cannot be launched now (a pool
    without a free slot, or with runs ahead of it), or None."""
    held: dict[str, int] = defaultdict(int)
    for claim in claims:
        held[claim.pool] += 1  # waiting step claims count: they are ahead in line
    for pool in sorted(pools):
        limit = limits.limit_of(pool)
        if limit is None:
            continue
        if limit == 0:
            return f"pool {pool} is paused (limit 0)"
        if held[pool] >= limit:
            return f"pool {pool}: {held[pool]} of {limit} slots in use"
    return None
