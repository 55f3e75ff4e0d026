"""The code locations the fleet's agents host: what each defines, as of one version."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.messages import CodeLocationInfo, JobInfo


@dataclass
class CodeLocation:
    agent_id: str
    info: CodeLocationInfo


@dataclass(frozen=True)
class CodeCatalog:
    """Every agent's code locations as of one catalog version (it moves with each
    registration), so they are parsed once per change, not on every submit and poll."""

    version: int
    by_agent: dict[str, list[CodeLocation]]
    locations: list[CodeLocation]  # by name, then agent id
    hosted: dict[str, set[str]]  # agent id -> the names of its locations that loaded
    by_name: dict[str, list[CodeLocation]]
    jobs: dict[str, set[str]]  # location name -> the jobs any agent's copy defines
    # (agent id, location) -> the code versions the agent has of it (serving or kept)
    code_versions: dict[tuple[str, str], set[str]]

    def job_info(self, location: str, job: str, agent_id: str | None = None) -> JobInfo | None:
        """Job `job` of `location`: as agent `agent_id` has it, else as any agent does."""
        copies = self.by_name.get(location, ())
        preferred = sorted(copies, key=lambda loc: loc.agent_id != agent_id)
        for loc in preferred:
            for info in loc.info.jobs:
                if info.name == job:
                    return info
        return None

    @classmethod
    def of(cls, version: int, by_agent: dict[str, list[CodeLocation]]) -> CodeCatalog:
        locations = sorted(
            (loc for locs in by_agent.values() for loc in locs),
            key=lambda loc: (loc.info.name, loc.agent_id),
        )
        hosted: dict[str, set[str]] = {}
        by_name: dict[str, list[CodeLocation]] = {}
        jobs: dict[str, set[str]] = {}
        versions: dict[tuple[str, str], set[str]] = {}
        seen: set[int] = set()  # agents share parsed infos: look at each one once
        for loc in locations:
            by_name.setdefault(loc.info.name, []).append(loc)
            if loc.info.error is None:
                hosted.setdefault(loc.agent_id, set()).add(loc.info.name)
                held = {v for v in (loc.info.version, *loc.info.versions) if v}
                if held:
                    versions[(loc.agent_id, loc.info.name)] = held
            if id(loc.info) not in seen:
                seen.add(id(loc.info))
                jobs.setdefault(loc.info.name, set()).update(j.name for j in loc.info.jobs)
        return cls(version, by_agent, locations, hosted, by_name, jobs, versions)
