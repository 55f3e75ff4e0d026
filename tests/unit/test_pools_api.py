"""The pools API, the config of pools and placement, and the SDK's pools: what users
write and send, accepted or refused with a message naming what was wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_agent_config
from agent.sdk import DefinitionError, job, op
from control_plane.config import load_control_plane_config
from protocol.messages import CodeLocationInfo, Register, Registered
from protocol.schema import ConfigError
from tests.unit.test_api import Client, agent_call, client  # noqa: F401 (a fixture)


async def test_pools_are_set_listed_and_deleted(client: Client) -> None:  # noqa: F811
    empty = await (await client.get("/api/v1/pools")).json()
    assert empty == {"granularity": "op", "default_pool_limit": 0, "pools": []}
    resp = await client.put("/api/v1/pools/warehouse", json={"limit": 3})
    assert resp.status == 200 and await resp.json() == {
        "name": "warehouse",
        "limit": 3,
        "source": "api",
    }
    (pool,) = (await (await client.get("/api/v1/pools")).json())["pools"]
    assert (pool["name"], pool["limit"], pool["in_use"], pool["waiters"]) == ("warehouse", 3, 0, [])
    resp = await client.delete("/api/v1/pools/warehouse")
    assert await resp.json() == {"name": "warehouse", "limit": None, "source": "default"}
    resp = await client.delete("/api/v1/pools/warehouse")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_pool"


@pytest.mark.parametrize(
    ("path", "body", "status", "named"),
    [
        ("/api/v1/pools/warehouse", {"limit": -1}, 422, "limit"),
        ("/api/v1/pools/warehouse", {"limit": 1.5}, 422, "limit"),
        ("/api/v1/pools/warehouse", {"limit": True}, 422, "limit"),
        ("/api/v1/pools/warehouse", {}, 422, "limit"),
        ("/api/v1/pools/warehouse", {"limit": 1, "extra": 2}, 422, "extra"),
        ("/api/v1/pools/no%20such", {"limit": 1}, 400, "pool name"),
    ],
)
async def test_a_bad_pool_limit_is_refused_naming_it(
    client: Client,  # noqa: F811
    path: str,
    body: dict,
    status: int,
    named: str,
) -> None:
    resp = await client.put(path, json=body)
    assert resp.status == status
    assert named in (await resp.json())["error"]["message"]


async def test_placement_tags_are_refused_at_submission_naming_the_tag(
    client: Client,  # noqa: F811
) -> None:
    for tags, named in (
        ({"fleetrun/requires": "gpu"}, "fleetrun/requires"),
        ({"fleetrun/gpus": "-1"}, "fleetrun/gpus"),
        ({"fleetrun/memory_mb": "lots"}, "fleetrun/memory_mb"),
    ):
        resp = await client.post("/api/v1/runs", json={"job": "etl", "tags": tags})
        assert resp.status == 422, await resp.text()
        assert named in (await resp.json())["error"]["message"]


async def test_an_agent_registers_its_labels_and_resources(client: Client) -> None:  # noqa: F811
    message = Register(
        "w1", "h", "0.1", ["default"], 2, [CodeLocationInfo("loc")], labels={"gpu": "a100"}
    )
    registered = await agent_call(
        client, "register", Register(**{**message.__dict__, "resources": {"cpus": 8}}), Registered
    )
    assert isinstance(registered, Registered)
    (agent,) = (await (await client.get("/api/v1/agents")).json())["agents"]
    assert (agent["labels"], agent["resources"], agent["resources_free"]) == (
        {"gpu": "a100"},
        {"cpus": 8},
        {"cpus": 8},
    )
    bad = Register(**{**message.__dict__, "labels": {"gpu": "a,b"}})
    status, error = await agent_call(client, "register", bad, Registered)
    assert status == 422 and "label value" in error.message
    bad = Register(**{**message.__dict__, "resources": {"tpus": 1}})
    status, error = await agent_call(client, "register", bad, Registered)
    assert status == 422 and "resources.tpus" in error.message


def test_concurrency_config(tmp_path: Path) -> None:
    path = tmp_path / "control-plane.toml"
    path.write_text(
        '[concurrency]\ndefault_pool_limit = 4\ngranularity = "run"\n'
        '[[concurrency.pools]]\nname = "warehouse"\nlimit = 2\n'
    )
    config = load_control_plane_config(str(path)).concurrency
    limits = config.limits({"api_set": 0})
    assert (config.granularity, limits.limit_of("warehouse"), limits.limit_of("other")) == (
        "run",
        2,
        4,
    )
    assert limits.limit_of("api_set") == 0
    path.write_text(
        '[concurrency]\ngranularity = "step"\n[[concurrency.pools]]\nname = "a b"\nlimit = -1\n'
        '[[concurrency.pools]]\nname = "x"\nlimit = 1\n[[concurrency.pools]]\nname = "x"\n'
        "limit = 2\n"
    )
    with pytest.raises(ConfigError) as info:
        load_control_plane_config(str(path))
    text = str(info.value)
    for named in ("granularity", "pools[0].name", "pools[0].limit", "pools[2].name"):
        assert named in text, text


def test_agent_labels_and_resources_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('labels = { gpu = "a100" }\n[resources]\ncpus = 8\ngpus = 1\n')
    config = load_agent_config(str(path))
    assert config.labels == {"gpu": "a100"}
    assert config.resources.offered() == {"cpus": 8, "gpus": 1}
    path.write_text('labels = { "a=b" = "x" }\n[resources]\ncpus = -1\nram = 3\n')
    with pytest.raises(ConfigError) as info:
        load_agent_config(str(path))
    text = str(info.value)
    for named in ("labels", "resources.cpus", "resources.ram"):
        assert named in text, text


def test_ops_and_jobs_name_their_pool() -> None:
    @op(pool="warehouse")
    def load(context):
        return None

    @op
    def other(context):
        return None

    @job(pool="default_pool")
    def etl():
        load()
        other()

    assert (etl.pool_for("load"), etl.pool_for("other")) == ("warehouse", "default_pool")
    assert [o.pool for o in etl.to_info().ops] == ["warehouse", "default_pool"]
    with pytest.raises(DefinitionError, match="pool 'no such' is invalid"):
        op(name="bad", pool="no such")(lambda context: None)
    with pytest.raises(DefinitionError, match=r"tag_concurrency_limits\[0\].limit"):

        @job(executor={"name": "multiprocess", "tag_concurrency_limits": [{"key": "a"}]})
        def limited():
            load()
