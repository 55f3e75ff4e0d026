"""`GET /api/v1/alerts` and the Alerts page, on the real app: answers match the OpenAPI
document, webhook URLs are shown by their origin only, viewers may read them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from aiohttp.test_utils import TestClient

from control_plane.config import AlertRule
from control_plane.http.alerts import masked_url
from control_plane.http.keys import STORAGE
from control_plane.model.alerts import Occurrence
from tests.conftest import app_for, free_port
from tests.unit.test_openapi import Api, unit_config

SECRET_HOOK = f"http://127.0.0.1:{free_port()}/services/T000/B000/very-secret"


async def alerts_client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> TestClient:
    rule = AlertRule("oncall", ["run_failure", "agent_offline"], SECRET_HOOK, jobs=["etl"])
    return await aiohttp_client(app_for(replace(unit_config(tmp_path), alerts=[rule])))


async def test_alerts_answer_matches_the_document_and_hides_the_webhook_path(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> None:
    client = await alerts_client(aiohttp_client, tmp_path)
    storage = client.app[STORAGE]
    body = {"text": "[fleetrun] oncall: run r1 of job etl failed: boom", "run_id": "r1"}
    await storage.record_alerts(
        [Occurrence("oncall", "run_failure", f"run_failure/r{i}", body) for i in range(3)], {}, 1.0
    )
    api = Api(client)
    answer = await api("GET", "/api/v1/alerts", query="?limit=2")
    (rule,) = answer["rules"]
    assert rule["name"] == "oncall" and rule["on"] == ["run_failure", "agent_offline"]
    assert rule["webhook_url"] == masked_url(SECRET_HOOK) and "secret" not in str(answer)
    assert [d["key"] for d in answer["deliveries"]] == ["run_failure/r2", "run_failure/r1"]
    assert answer["deliveries"][0]["alert"] == "oncall"
    await api("GET", "/api/v1/alerts", 400, query="?limit=0")
    page = await client.get("/ui/alerts")
    html = await page.text()
    assert page.status == 200
    assert 'data-rule="oncall"' in html and 'data-key="run_failure/r0"' in html
    assert 'href="/ui/runs/r1"' in html and "very-secret" not in html
    assert '<a href="/ui/alerts" class="active">Alerts</a>' in html


def test_a_webhook_is_shown_by_its_origin() -> None:
    assert masked_url("https://hooks.slack.com/services/T/B/x") == "https://hooks.slack.com/…"
    assert masked_url("http://127.0.0.1:9000/") == "http://127.0.0.1:9000"
    assert masked_url("http://[::1]:80/x?token=y") == "http://[::1]:80/…"
