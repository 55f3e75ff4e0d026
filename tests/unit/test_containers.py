"""The docker launcher's pure parts: a run's container from its tags and [docker]; the
[docker] table's checks; the resource tags' checks (agent/container_spec.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.codeversions import LocationVersion
from agent.config import DockerConfig, OutputStoreConfig, load_agent_config
from agent.container_spec import (
    ContainerPlan,
    container_binds,
    container_config,
    container_env,
    container_plan,
    oom_message,
    step_container_settings,
)
from protocol.messages import LaunchRun, LocationSpec
from protocol.schema import ConfigError
from protocol.tags import tag_problem

# A version of a local location: its copy in the agent's state dir, run from its folder.
LOC = LocationVersion(
    "etl",
    "abc123",
    "/state/code/etl/abc123",
    "python3",
    "/code/etl",
    LocationSpec(
        "etl", "/state/code/etl/abc123/defs.py", None, "/code/etl", "/state/code/etl/abc123"
    ),
)
LAUNCH = LaunchRun(run_id="r-1", job="etl", location="etl", lease=7)


def test_tags_override_the_agents_defaults() -> None:
    config = DockerConfig(image="base:1", cpus=2, memory_mb=1024, network="none")
    assert container_plan({}, config) == ContainerPlan("base:1", 2, 1024, "none")
    tags = {"fleetrun/image": "etl:2", "fleetrun/cpus": "0.5", "fleetrun/memory_mb": "64"}
    assert container_plan(tags, config) == ContainerPlan("etl:2", 0.5, 64, "none")


def test_the_container_body_has_the_limits_mounts_labels_and_no_bridge() -> None:
    config = DockerConfig(mounts=["/data:/data:ro"], labels={"team": "a"}, user="1000:1000")
    plan = ContainerPlan("etl:2", 1.5, 64, "host")
    binds = container_binds(
        LOC, "/state/workers/7", OutputStoreConfig("filesystem", "/out"), config
    )
    assert binds == [
        "/state/workers/7:/state/workers/7:rw",
        "/code/etl:/code/etl:ro",
        "/state/code/etl/abc123:/state/code/etl/abc123:ro",  # the version the run imports
        "/out:/out:rw",
        "/data:/data:ro",
    ]
    in_place = dataclasses.replace(LOC, folder="/code/etl")  # a location not versioned
    assert container_binds(in_place, "/w", OutputStoreConfig(), DockerConfig()) == [
        "/w:/w:rw",
        "/code/etl:/code/etl:ro",
    ]
    env = container_env({"FLEETRUN_RUN_ID": "r-1"}, "/state/workers/7", config, {})
    body = container_config(plan, LAUNCH, LOC, binds, env, config, "agent-1")
    host = body["HostConfig"]
    assert host["NetworkMode"] == "host" and host["Init"] is True
    assert host["Memory"] == host["MemorySwap"] == 64 * 1024 * 1024
    assert host["NanoCpus"] == 1_500_000_000
    assert body["Labels"] == {
        "team": "a",
        "fleetrun.run_id": "r-1",
        "fleetrun.lease": "7",
        "fleetrun.agent": "agent-1",
    }
    assert body["Cmd"] == ["python3", "-m", "agent.worker", "run"]
    assert body["User"] == "1000:1000" and body["WorkingDir"] == "/code/etl"
    assert "FLEETRUN_CHANNEL=/state/workers/7" in body["Env"]


def test_no_limit_means_no_limit_key_and_only_named_variables_pass() -> None:
    config = DockerConfig(env=["TOKEN_FOR_RUNS", "ABSENT"])
    env = container_env({}, "/c", config, {"TOKEN_FOR_RUNS": "x", "OTHER": "y"})
    assert env["TOKEN_FOR_RUNS"] == "x" and "OTHER" not in env and "ABSENT" not in env
    body = container_config(container_plan({}, config), LAUNCH, LOC, [], env, config, "a")
    assert "Memory" not in body["HostConfig"] and "NanoCpus" not in body["HostConfig"]


def test_step_containers_are_the_runs_with_the_channel_left_to_the_step() -> None:
    settings = step_container_settings(
        LOC, LAUNCH, {}, "/state/workers/7/scratch", OutputStoreConfig(), DockerConfig(), "a"
    )
    assert settings["socket"] == "/var/run/docker.sock"
    assert settings["scratch"] == "/state/workers/7/scratch"
    assert "/state/workers/7:/state/workers/7:rw" in settings["container"]["HostConfig"]["Binds"]
    assert not any(e.startswith("FLEETRUN_OPEN_CHANNEL") for e in settings["container"]["Env"])


def test_the_oom_message_names_the_limit() -> None:
    assert "memory limit of 64 MB" in oom_message(64)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('network = "bridge"', "network"),
        ('mounts = ["relative-only"]', "mounts"),
        ('mounts = ["/a:b"]', "mounts"),
        ('pull = "always"', "pull"),
        ('socket = "tcp://127.0.0.1:2375"', "socket"),
        ("memory_mb = 3", "memory_mb"),
        ("cpus = -1", "cpus"),
        ('image = "Not An Image"', "image"),
        ("worker_command = []", "worker_command"),
        ("gpus = 1", "gpus"),
    ],
)
def test_a_bad_docker_table_names_the_key(tmp_path: Path, table: str, key: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'run_launcher = "docker"\n[docker]\n{table}\n')
    with pytest.raises(ConfigError) as raised:
        load_agent_config(str(path))
    assert f"docker.{key}" in str(raised.value), raised.value


def test_mount_host_paths_resolve_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('run_launcher = "docker"\n[docker]\nmounts = ["data:/data:ro"]\n')
    assert load_agent_config(str(path)).docker.mounts == [f"{tmp_path}/data:/data:ro"]


@pytest.mark.parametrize(
    ("tags", "bad"),
    [
        ({"fleetrun/image": "etl:1"}, None),
        ({"fleetrun/image": "registry.local:5000/team/etl:1.2"}, None),
        ({"fleetrun/image": "Bad Image"}, "fleetrun/image"),
        ({"fleetrun/cpus": "0.25"}, None),
        ({"fleetrun/cpus": "0"}, "fleetrun/cpus"),
        ({"fleetrun/cpus": "inf"}, "fleetrun/cpus"),
        ({"fleetrun/memory_mb": "6"}, None),
        ({"fleetrun/memory_mb": "5"}, "fleetrun/memory_mb"),
        ({"fleetrun/memory_mb": "1e3"}, "fleetrun/memory_mb"),
    ],
)
def test_resource_tags_are_checked(tags: dict[str, str], bad: str | None) -> None:
    problem = tag_problem(tags)
    assert (problem is None) if bad is None else (problem is not None and bad in problem)
