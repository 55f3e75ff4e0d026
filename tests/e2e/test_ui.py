"""The web UI in headless Chromium (Debian's `chromium`, driven by Playwright), against a
real control plane and agent: pages, live updates, buttons, escaping, sign-in.

Screenshots of each page land in test-artifacts/ui/ (kept by CI as artefacts). Without
a browser these tests fail with how to install one; they never skip silently.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    REPO,
    ControlPlaneProc,
    free_port,
    start_agent,
    start_control_plane,
    write_control_plane_config,
)

pytestmark = pytest.mark.e2e
CHROMIUM = os.environ.get("FLEETRUN_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "ui"
UI_JOBS = {"ui": FIXTURES / "ui_jobs.py", "gates": FIXTURES / "gate_jobs.py"}
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"the UI tests need headless Chromium at {CHROMIUM}: install Debian's package "
            "(apt-get install -y chromium) or set FLEETRUN_CHROMIUM to a Chromium binary"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", on_dialog)
    page.dialogs = dialogs
    yield page
    context.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[ControlPlaneProc]:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path, "agent-1", UI_JOBS)
    yield cp
    agent.stop()
    cp.stop()


def test_runs_list_and_run_detail(fleet: ControlPlaneProc, page: Any) -> None:
    # Given a finished three-step run
    run_id = fleet.submit("three_steps", tags={"team": "data"})
    assert fleet.wait_run(run_id)["status"] == "SUCCESS"
    # When the runs page is opened, filtered by tag
    page.goto(f"{fleet.url}/ui/runs?tag=team:data")
    row = page.locator(f"tr[data-run='{run_id}']")
    assert row.locator(".status").inner_text() == "SUCCESS"
    assert "team=data" in row.inner_text()
    shot(page, "runs")
    # and the run is opened from it
    row.locator("a").click()
    page.wait_for_url(f"**/ui/runs/{run_id}")
    # Then its steps are drawn as bars in order, and its logs follow
    bars = page.locator("svg.gantt rect.bar")
    assert [bars.nth(i).get_attribute("data-step") for i in range(bars.count())] == [
        "first",
        "second",
        "third",
    ]
    assert all("success" in bars.nth(i).get_attribute("class") for i in range(3))
    page.locator("#logs").get_by_text("second step got 1").wait_for()
    page.select_option("#log-step", "first")
    page.locator("#logs").get_by_text("first step says hello").wait_for()
    assert "second step" not in page.locator("#logs").inner_text()
    assert "RUN_SUCCESS" in page.locator("table.events").inner_text()
    shot(page, "run-detail")


def test_cancel_from_the_run_page(fleet: ControlPlaneProc, page: Any, tmp_path: Path) -> None:
    # Given a run that waits for a gate
    run_id = fleet.submit("gated", config={"gate": str(tmp_path / "never")})
    page.goto(f"{fleet.url}/ui/runs/{run_id}")
    page.locator("#run-status", has_text="STARTED").wait_for()
    # When cancel is clicked (and confirmed)
    page.locator("#cancel").click()
    # Then the page shows it canceled, live, without a reload
    page.locator("#run-status", has_text="CANCELED").wait_for()
    assert page.dialogs == ["Cancel this run?"]
    assert fleet.get(f"/api/v1/runs/{run_id}")["status"] == "CANCELED"
    shot(page, "run-canceled")
    # and re-executing it opens the new run
    page.locator("#reexecute").click()
    page.wait_for_url(re.compile(r".*/ui/runs/(?!" + run_id + ").+"))
    new_id = page.url.rsplit("/", 1)[1]
    assert fleet.get(f"/api/v1/runs/{new_id}")["parent_run_id"] == run_id
    fleet.call("POST", f"/api/v1/runs/{new_id}/cancel", {})


def test_markup_from_jobs_is_shown_as_text(fleet: ControlPlaneProc, page: Any) -> None:
    hostile = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
    run_id = fleet.submit("hostile", tags={"note": hostile})
    assert fleet.wait_run(run_id)["status"] == "FAILURE"
    for path in ("/ui/runs", f"/ui/runs/{run_id}"):
        page.goto(fleet.url + path)
        page.locator("main table").first.wait_for()
        assert page.locator("img").count() == 0 and page.locator("main script").count() == 0
        assert hostile in page.locator("main").inner_text()
    page.locator("#logs").get_by_text(hostile).first.wait_for()
    page.wait_for_timeout(2500)  # one live refresh of the page's fragment
    assert page.locator("img").count() == 0
    assert page.dialogs == []
    shot(page, "hostile-escaped")


def test_agents_queue_and_schedules_pages(tmp_path: Path, page: Any) -> None:
    cp = start_control_plane(tmp_path, "[run_coordinator]\nmax_concurrent_runs = 1\n")
    agent = start_agent(cp, tmp_path, "agent-1", {**UI_JOBS, "daemon": FIXTURES / "daemon_jobs.py"})
    try:
        gate = tmp_path / "gate"
        first = cp.submit("gated", config={"gate": str(gate)})
        waiting = cp.submit("gated", config={"gate": str(gate)})
        page.goto(f"{cp.url}/ui/queue")
        row = page.locator("table.queue tr", has_text=waiting[:8])
        assert "max_concurrent_runs: 1 of 1 in use" in row.inner_text()
        shot(page, "queue")
        page.goto(f"{cp.url}/ui/agents")
        agent_row = page.locator("tr[data-agent='agent-1']")
        assert "1 / 4" in agent_row.inner_text() and "ONLINE" in agent_row.inner_text()
        agent_row.get_by_role("button", name="Drain").click()
        agent_row.locator(".status", has_text="DRAINING").wait_for()
        shot(page, "agents")
        agent_row.get_by_role("button", name="Undrain").click()
        agent_row.locator(".status", has_text="ONLINE").wait_for()
        page.goto(f"{cp.url}/ui/schedules")
        nightly = page.locator("tr[data-name='nightly']")
        assert "STOPPED" in nightly.inner_text()
        nightly.get_by_role("button", name="Start").click()
        nightly.locator(".status", has_text="RUNNING").wait_for()
        assert re.search(r"\d{4}-\d\d-\d\d 03:00:00", nightly.inner_text())
        shot(page, "schedules")
        page.goto(f"{cp.url}/ui/sensors")
        assert page.locator("tr[data-name='inbox']").count() == 1
        gate.write_text("open")
        assert cp.wait_run(first)["status"] == "SUCCESS"
        assert cp.wait_run(waiting)["status"] == "SUCCESS"
    finally:
        agent.stop()
        cp.stop()


def _token(config: Path, name: str, role: str) -> str:
    result = subprocess.run(
        [
            *FLEETRUN,
            "tokens",
            "create",
            "--config",
            str(config),
            "--kind",
            "user",
            "--name",
            name,
            "--role",
            role,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def test_sign_in_with_a_user_token(tmp_path: Path, page: Any) -> None:
    config = write_control_plane_config(tmp_path)
    viewer = _token(config, "watcher", "viewer")
    operator = _token(config, "ops", "operator")
    agent_token = subprocess.run(
        [
            *FLEETRUN,
            "tokens",
            "create",
            "--config",
            str(config),
            "--kind",
            "agent",
            "--name",
            "agent-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (tmp_path / "agent.token").write_text(agent_token)
    cp = start_control_plane(tmp_path, "[auth]\nenabled = true\n", token=operator)
    agent = start_agent(cp, tmp_path, "agent-1", UI_JOBS, extra='token_file = "agent.token"')
    try:
        # A page on another site that posts the sign-in form with the attacker's token
        # (login CSRF) gets a 403, and the browser is not signed in
        attack = (
            f'<form method="post" action="{cp.url}/ui/login"><input name="token" '
            f'value="{operator}"></form><script>document.forms[0].submit()</script>'
        )
        page.route(
            "http://evil.test/", lambda route: route.fulfill(body=attack, content_type="text/html")
        )
        with page.expect_response(f"{cp.url}/ui/login") as refused:
            page.goto("http://evil.test/")
        assert refused.value.status == 403 and "cross_origin" in refused.value.text()
        assert page.context.cookies() == []
        # Signed out: every page leads to the sign-in form
        page.goto(f"{cp.url}/ui/agents")
        page.wait_for_url(re.compile(r".*/ui/login\?next=.*"))
        page.fill("input[name=token]", "fru_0000000000000000_wrong")
        page.click("button[type=submit]")
        assert "not accepted" in page.locator(".error").inner_text()
        # A viewer signs in and lands where they were going; buttons they may not use
        # say so
        page.fill("input[name=token]", viewer)
        page.click("button[type=submit]")
        page.wait_for_url("**/ui/agents")
        assert "watcher (viewer)" in page.locator(".who").inner_text()
        run_id = cp.submit("gated", config={"gate": str(tmp_path / "gate")})
        page.goto(f"{cp.url}/ui/runs/{run_id}")
        page.locator("#cancel").click()
        page.locator("#flash", has_text="403").wait_for()
        # and the token never appears in a page, a cookie readable by scripts or a URL
        for html in (page.content(), page.url):
            assert viewer.split("_", 2)[2] not in html
        assert page.evaluate("document.cookie") == ""
        shot(page, "signed-in-viewer")
        # The API takes the sign-in cookie only with the UI's header, which another
        # site's page cannot send (no cross-site requests in the user's name)
        assert page.request.get(f"{cp.url}/api/v1/runs").status == 401
        marked = page.request.get(f"{cp.url}/api/v1/runs", headers={"X-Fleetrun-UI": "1"})
        assert marked.status == 200
        page.click("text=sign out")
        page.wait_for_url("**/ui/login")
        page.goto(f"{cp.url}/ui/runs")
        page.wait_for_url(re.compile(r".*/ui/login\?next=.*"))
        (tmp_path / "gate").write_text("open")
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
    finally:
        agent.stop()
        cp.stop()


def test_the_alerts_page_shows_rules_and_deliveries(tmp_path: Path, page: Any) -> None:
    closed = f"http://127.0.0.1:{free_port()}/hook/secret-part"  # nothing listens there
    rule = f'[[alerts]]\nname = "oncall"\non = ["run_failure"]\nwebhook_url = "{closed}"\n'
    cp = start_control_plane(tmp_path, rule)
    agent = start_agent(cp, tmp_path, "agent-1", UI_JOBS)
    try:
        run_id = cp.submit("hostile")
        assert cp.wait_run(run_id)["status"] == "FAILURE"
        page.goto(f"{cp.url}/ui/runs")
        page.locator("header nav").get_by_role("link", name="Alerts").click()
        assert "secret-part" not in page.locator("tr[data-rule='oncall']").inner_text()
        row = page.locator(f"tr[data-key='run_failure/{run_id}']")
        row.locator(".status", has_text="pending").wait_for()  # refreshed live
        row.get_by_text("Cannot connect to host").wait_for()  # the last error
        link = row.get_by_role("link", name="of job hostile failed: steps failed: shout")
        assert link.get_attribute("href") == f"/ui/runs/{run_id}"
        assert page.locator("img").count() == 0 and page.dialogs == []
        shot(page, "alerts")
    finally:
        agent.stop()
        cp.stop()
