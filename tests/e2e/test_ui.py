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
DOC_SHOTS = REPO / "docs" / "ui"
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


def doc_shot(page: Any, name: str, scroll_to: str = "") -> None:
    """Also a screenshot for docs/ui.md (the visible part of the page from `scroll_to`,
    kept small), only with FLEETRUN_UI_DOCS=1: an ordinary test run leaves the docs alone."""
    shot(page, name)
    if os.environ.get("FLEETRUN_UI_DOCS") == "1":
        page.set_viewport_size({"width": 1280, "height": 760})
        if scroll_to:
            page.locator(scroll_to).evaluate("e => window.scrollTo(0, e.offsetTop - 40)")
        page.screenshot(path=str(DOC_SHOTS / f"{name}.png"))
        page.set_viewport_size({"width": 1440, "height": 900})


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
    doc_shot(page, "runs")
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
    # and the toast agrees with the page; the interrupted step is canceled, not failed
    page.locator("#flash", has_text="CANCELED").wait_for()
    step = page.locator("table.steps tr[data-step='wait_for_gate']")
    assert "canceled" in step.inner_text() and "failure" not in step.inner_text()
    assert page.locator("svg.gantt rect.bar.canceled").count() == 1
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
        doc_shot(page, "queue")
        page.goto(f"{cp.url}/ui/agents")
        agent_row = page.locator("tr[data-agent='agent-1']")
        assert "1 / 4" in agent_row.inner_text() and "ONLINE" in agent_row.inner_text()
        agent_row.get_by_role("button", name="Drain").click()
        agent_row.locator(".status", has_text="DRAINING").wait_for()
        doc_shot(page, "agents")
        agent_row.get_by_role("button", name="Undrain").click()
        agent_row.locator(".status", has_text="ONLINE").wait_for()
        page.goto(f"{cp.url}/ui/schedules")
        nightly = page.locator("tr[data-name='nightly']")
        assert "STOPPED" in nightly.inner_text()
        nightly.get_by_role("button", name="Start").click()
        nightly.locator(".status", has_text="RUNNING").wait_for()
        assert re.search(r"\d{4}-\d\d-\d\d 03:00:00", nightly.inner_text())
        doc_shot(page, "schedules")
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
        doc_shot(page, "sign-in")
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
        # the launch form sends the signed-in user's token: a viewer may not launch
        page.goto(f"{cp.url}/ui/launch?location=gates&job=quick")
        page.click("#launch-submit")
        page.locator("#form-error", has_text="403 forbidden").wait_for()
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
        doc_shot(page, "alerts")
    finally:
        agent.stop()
        cp.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProc]:
    """One control plane and agent for the deployment pages: a job with a diamond graph,
    a schedule and a sensor (watching `cp.inbox`), and a location that fails to load."""
    folder = tmp_path_factory.mktemp("deployment")
    inbox = folder / "inbox"
    inbox.mkdir()
    before = os.environ.get("FLEETRUN_TEST_INBOX")
    os.environ["FLEETRUN_TEST_INBOX"] = str(inbox)
    cp = start_control_plane(folder)
    locations = {
        "graphs": FIXTURES / "graph_jobs.py",
        "daemon": FIXTURES / "daemon_jobs.py",
        "broken": FIXTURES / "broken_location.py",
    }
    agent = start_agent(cp, folder, "agent-1", locations)
    try:
        yield cp
    finally:
        agent.stop()
        cp.stop()
        if before is None:
            os.environ.pop("FLEETRUN_TEST_INBOX", None)
        else:
            os.environ["FLEETRUN_TEST_INBOX"] = before


def test_the_jobs_page_shows_locations_jobs_and_load_errors(
    deployment: ControlPlaneProc, page: Any
) -> None:
    page.goto(f"{deployment.url}/ui/runs")
    page.locator("header nav").get_by_role("link", name="Jobs").click()
    page.wait_for_url("**/ui/jobs")
    # the load error in full, not a tooltip
    broken = page.locator("tr[data-location='broken']")
    assert "module_that_does_not_exist" in broken.locator("pre.load-error").inner_text()
    assert "load error" in broken.inner_text()
    daemon = page.locator("tr[data-location='daemon']")
    assert "every_minute" in daemon.inner_text() and "inbox" in daemon.inner_text()
    diamond = page.locator("tr[data-job='graphs/diamond']")
    ops = diamond.locator(".op")
    assert [ops.nth(i).inner_text() for i in range(ops.count())] == [
        "extract",
        "clean",
        "enrich",
        "publish",
    ]
    assert "multiprocess" in diamond.inner_text() and "team=data" in diamond.inner_text()
    noted = page.locator("tr[data-job='daemon/noted']")
    assert "schedule every_minute" in noted.inner_text() and "sensor inbox" in noted.inner_text()
    doc_shot(page, "jobs")
    diamond.get_by_role("link", name="diamond").click()
    page.wait_for_url("**/ui/jobs/graphs/diamond")


def test_the_job_page_draws_the_op_graph_and_links_recent_runs(
    deployment: ControlPlaneProc, page: Any
) -> None:
    run_id = deployment.submit("diamond", location="graphs")
    assert deployment.wait_run(run_id)["status"] == "SUCCESS"
    page.goto(f"{deployment.url}/ui/jobs/graphs/diamond")
    columns = {
        name: page.locator(f"svg.op-graph g.op[data-op='{name}']").get_attribute("data-column")
        for name in ("extract", "clean", "enrich", "publish")
    }
    assert columns == {"extract": "0", "clean": "1", "enrich": "1", "publish": "2"}
    edges = page.locator("svg.op-graph path.edge")
    pairs = {
        (edges.nth(i).get_attribute("data-from"), edges.nth(i).get_attribute("data-to"))
        for i in range(edges.count())
    }
    assert pairs == {
        ("extract", "clean"),
        ("extract", "enrich"),
        ("clean", "publish"),
        ("enrich", "publish"),
    }
    assert "kind=source" in page.locator("table.ops tr[data-op='extract']").inner_text()
    assert "clean, enrich" in page.locator("table.ops tr[data-op='publish']").inner_text()
    policy = page.locator("table.ops tr[data-op='clean'] td.retry-policy").inner_text()
    assert policy == "up to 2 retries, 0.1 s apart", policy
    assert page.locator("table.ops tr[data-op='enrich'] td.retry-policy").inner_text() == "none"
    doc_shot(page, "job")
    page.locator(f"table.runs tr[data-run='{run_id}'] a").click()
    page.wait_for_url(f"**/ui/runs/{run_id}")


def test_the_launch_form_checks_config_and_opens_the_new_run(
    deployment: ControlPlaneProc, page: Any
) -> None:
    page.goto(f"{deployment.url}/ui/jobs/graphs/diamond")
    page.click("#launch")
    page.wait_for_url("**/ui/launch?location=graphs&job=diamond")
    assert page.locator("#launch-job").input_value() == "graphs/diamond"
    # JSON that does not parse is caught in the page: nothing is sent
    page.fill("#launch-config", '{"rows": 1')
    page.click("#launch-submit")
    page.locator("#config-error", has_text="not valid JSON").wait_for()
    assert deployment.get("/api/v1/runs?job=diamond&tag=team:ops")["runs"] == []
    # JSON the API refuses: its 422 message is shown next to the field
    page.fill("#launch-config", "[1, 2]")
    page.click("#launch-submit")
    page.locator("#config-error", has_text="422 bad_request: config: expected a table").wait_for()
    doc_shot(page, "launch")
    # a good one: tags, queue and priority become the run's tags
    page.fill("#launch-config", '{"rows": 5}')
    page.fill("#launch-tags", "team=ops\nnote=from the form")
    page.fill("#launch-queue", "default")
    page.fill("#launch-priority", "7")
    page.click("#launch-submit")
    page.wait_for_url(re.compile(r".*/ui/runs/[0-9a-f-]{36}$"))
    run_id = page.url.rsplit("/", 1)[1]
    run = deployment.wait_run(run_id)
    assert run["status"] == "SUCCESS" and run["config"] == {"rows": 5}
    assert {k: run["tags"][k] for k in ("team", "note", "fleetrun/queue", "fleetrun/priority")} == {
        "team": "ops",
        "note": "from the form",
        "fleetrun/queue": "default",
        "fleetrun/priority": "7",
    }
    # the run page: its config, and every step's status with times to the millisecond
    page.locator("#run-status", has_text="SUCCESS").wait_for()
    assert '"rows": 5' in page.locator("#run-config").inner_text()
    rows = page.locator("table.steps tbody tr")
    assert [rows.nth(i).get_attribute("data-step") for i in range(rows.count())] == [
        "extract",
        "clean",
        "enrich",
        "publish",
    ]
    for i in range(4):
        cells = rows.nth(i).locator("td")
        assert cells.nth(1).inner_text() == "success" and cells.nth(2).inner_text() == "1"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", cells.nth(3).inner_text())
    assert page.locator(".legend .swatch.canceled").count() == 1
    doc_shot(page, "run", scroll_to="#run-config")


def test_schedule_and_sensor_pages_show_their_ticks(
    deployment: ControlPlaneProc, page: Any
) -> None:
    inbox = Path(os.environ["FLEETRUN_TEST_INBOX"])
    page.goto(f"{deployment.url}/ui/sensors")
    page.locator("tr[data-name='inbox']").get_by_role("link", name="inbox").click()
    page.wait_for_url("**/ui/sensors/inbox?location=daemon")
    skipped = page.locator("table.ticks tr.SKIPPED").first
    skipped.get_by_text("no files yet").wait_for()  # refreshed live
    (inbox / "file-1").write_text("")
    made = page.locator("table.ticks tr.SUCCESS").first
    made.locator("a").first.wait_for()
    run_id = made.locator("a").first.get_attribute("href").rsplit("/", 1)[1]
    assert "file-1" in made.locator("td").nth(4).inner_text()  # the cursor
    assert deployment.wait_run(run_id)["tags"]["fleetrun/run_key"] == "file-1"
    (inbox / "boom").write_text("")
    failed = page.locator("table.ticks tr.FAILURE").first
    failed.locator("pre.tick-error", has_text="the inbox sensor blew up").wait_for()
    assert re.fullmatch(r"\d+", failed.locator("td").nth(6).inner_text())
    (inbox / "boom").unlink()
    doc_shot(page, "sensor")
    page.goto(f"{deployment.url}/ui/schedules")
    page.locator("tr[data-name='nightly']").get_by_role("link", name="nightly").click()
    page.wait_for_url("**/ui/schedules/nightly?location=daemon")
    assert "0 3 * * *" in page.locator(".facts").inner_text()
    page.get_by_role("button", name="Start").click()
    page.locator("#instigator-status", has_text="RUNNING").wait_for()
    assert re.search(r"\d{4}-\d\d-\d\d 03:00:00", page.locator(".facts").inner_text())
    page.get_by_role("button", name="Stop").click()
    page.locator("#instigator-status", has_text="STOPPED").wait_for()
    page.goto(f"{deployment.url}/ui/schedules/every_minute?location=daemon")
    assert "* * * * *" in page.locator(".facts").inner_text()
    doc_shot(page, "schedule")
    page.goto(f"{deployment.url}/ui/schedules/no_such_schedule")
    assert "no schedule named 'no_such_schedule'" in page.locator("main").inner_text()


def test_delete_from_a_finished_run_page(
    fleet: ControlPlaneProc, page: Any, tmp_path: Path
) -> None:
    # Given a finished run and one still running
    done = fleet.submit("three_steps")
    fleet.wait_run(done)
    live = fleet.submit("gated", config={"gate": str(tmp_path / "never")})
    page.goto(f"{fleet.url}/ui/runs/{live}")
    page.locator("#run-status", has_text="STARTED").wait_for()
    # Then a running run offers no Delete button
    assert page.locator("#delete").count() == 0
    # When Delete is clicked on the finished run's page (and confirmed)
    page.goto(f"{fleet.url}/ui/runs/{done}")
    page.locator("#delete").click()
    # Then the run list opens, without the run, and the API no longer knows it
    page.wait_for_url("**/ui/runs")
    assert page.dialogs and page.dialogs[0].startswith("Delete this run")
    assert page.locator(f"tr[data-run='{done}']").count() == 0
    assert fleet.call("GET", f"/api/v1/runs/{done}")[0] == 404
    fleet.call("POST", f"/api/v1/runs/{live}/cancel", {})
