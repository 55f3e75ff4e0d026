"""`fleetrun` as a user runs it: a subprocess against a real control plane and agent.

One fleet serves the whole module (the CLI only reads it, or adds runs the tests tell
apart by job or id), so the many short CLI calls stay cheap.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from control_plane.model.runs import NewRun
from control_plane.storage import open_storage
from protocol import FLEETRUN_VERSION
from tests.conftest import (
    EXAMPLES,
    FIXTURES,
    FLEETRUN,
    ControlPlaneProc,
    Proc,
    start_agent,
    start_control_plane,
    wait_for,
    write_control_plane_config,
)

pytestmark = pytest.mark.e2e

LOCATIONS = {
    "examples": EXAMPLES,
    "daemon": FIXTURES / "daemon_jobs.py",
    "exec": FIXTURES / "executor_jobs.py",
}
NOWHERE = "fleetrun/queue=nowhere"  # no agent serves this queue: the run stays QUEUED


@dataclass
class Fleet:
    cp: ControlPlaneProc
    agent: Proc
    folder: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("cli")
    inbox = folder / "inbox"
    inbox.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLEETRUN_TEST_INBOX", str(inbox))  # read by daemon_jobs' sensor
        cp = start_control_plane(folder)
        try:
            agent = start_agent(cp, folder, "a1", LOCATIONS)
        except BaseException:
            cp.stop()
            raise
    yield Fleet(cp, agent, folder)
    agent.stop()
    cp.stop()


def fleetrun(
    url: str, *args: str, token: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The CLI with FLEETRUN_URL (and FLEETRUN_TOKEN) set, as a user's shell would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETRUN_")}
    env["FLEETRUN_URL"] = url
    if token is not None:
        env["FLEETRUN_TOKEN"] = token
    return subprocess.run(
        [*FLEETRUN, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """A refused command: exit 1, nothing on stdout, one `fleetrun: …` line on stderr."""
    assert result.returncode == 1, (result.args, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleetrun: "), result.stderr
    return lines[0]


def in_order(text: str, *parts: str) -> bool:
    positions = [text.find(p) for p in parts]
    return -1 not in positions and positions == sorted(positions)


def test_submit_wait_shows_step_progress_and_exits_with_the_result(fleet: Fleet) -> None:
    url = fleet.cp.url
    # A succeeding job: progress on stderr, the run id and its status on stdout, exit 0
    done = fleetrun(url, "runs", "submit", "etl", "--wait")
    run_id, status = ok(done).split(":")[0].split()
    assert status == "SUCCESS" and fleet.cp.get(f"/api/v1/runs/{run_id}")["status"] == "SUCCESS"
    assert in_order(
        done.stderr,
        f"submitted run {run_id}",
        "QUEUED",
        "STARTED",
        "extract: started",
        "[1/3] extract: succeeded in ",
        "transform: started",
        "[3/3] load: succeeded in ",
        "SUCCESS    all 3 steps succeeded",
    )

    # A failing job: exit 1; with --json stdout is the final run and nothing else
    failed = fleetrun(url, "runs", "submit", "broken", "--wait", "--json")
    assert failed.returncode == 1, failed.stderr
    run = json.loads(failed.stdout)
    assert (run["job"], run["status"], run["status_reason"]) == (
        "broken",
        "FAILURE",
        "steps failed: validate",
    )
    assert in_order(
        failed.stderr,
        "fetch: succeeded",
        "validate: failed after ",
        "ValueError: expected at least one row, got 0",
        "publish: skipped",
        "FAILURE    steps failed: validate",
    )

    # Step retries show as they happen; --quiet leaves stderr empty
    retried = fleetrun(url, "runs", "submit", "retries", "--location", "exec", "--wait")
    assert retried.returncode == 1 and "FAILURE" in retried.stdout
    assert in_order(
        retried.stderr,
        "exponential: started",
        "exponential: failed after",
        "up for retry: ValueError: again; retry 1 in",
        "exponential: retry 1 started",
        "[6/6] gives_up: failed",
    )
    quiet = fleetrun(url, "runs", "submit", "hello", "--wait", "-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and "SUCCESS" in quiet.stdout

    # `runs show` summarises the steps above its event log
    show = ok(fleetrun(url, "runs", "show", run["run_id"]))
    steps = show[show.index("STEP ") : show.index("SEQ ")].split("\n")
    assert [line.split()[:3] for line in steps[1:4]] == [
        ["fetch", "SUCCESS", "1"],
        ["validate", "FAILURE", "1"],
        ["publish", "SKIPPED", "0"],
    ]


def test_submit_wait_exits_1_when_the_run_is_canceled(fleet: Fleet) -> None:
    env = {**os.environ, "FLEETRUN_URL": fleet.cp.url}
    waiting = subprocess.Popen(
        [*FLEETRUN, "runs", "submit", "hello", "--tag", NOWHERE, "--tag", "test=cancel", "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        run = wait_for(
            lambda: next(iter(fleet.cp.get("/api/v1/runs?tag=test:cancel")["runs"]), None),
            timeout=30,
            what="the run to be queued",
        )
        assert ok(fleetrun(fleet.cp.url, "runs", "cancel", run["run_id"])).split() == [
            run["run_id"],
            "CANCELED",
        ]
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
        waiting.wait()
    assert waiting.returncode == 1, err
    assert out.split(":")[0].split() == [run["run_id"], "CANCELED"]
    assert in_order(err, "QUEUED", "CANCELED")


def test_runs_watch_redraws_and_stops_after_count(fleet: Fleet) -> None:
    url = fleet.cp.url
    fleet.cp.wait_run(fleet.cp.submit("hello"))
    lines = ok(
        fleetrun(
            url, "runs", "watch", "--job", "hello", "--count", "2", "--interval", "0.1", "--json"
        )
    ).splitlines()
    assert len(lines) == 2
    for line in lines:
        doc = json.loads(line)
        assert doc["time"].endswith("Z") and doc["runs"]
        assert {r["job"] for r in doc["runs"]} == {"hello"}
    # Not a terminal: plain tables one after another, no escape codes
    text = ok(
        fleetrun(
            url,
            "runs",
            "watch",
            "--count",
            "3",
            "--interval",
            "0.1",
            "--status",
            "SUCCESS",
            "--limit",
            "1",
        )
    )
    assert text.count("RUN ID") == 3 and text.count("1 SUCCESS") == 3 and "\x1b[" not in text
    rows = [line for line in text.splitlines() if " SUCCESS " in line]
    assert len(rows) == 3 and all(row.split()[3] == "a1" for row in rows)  # by name, not id
    # Ctrl-C ends a watch without a count, with exit code 0
    env = {**os.environ, "FLEETRUN_URL": url}
    endless = subprocess.Popen(
        [*FLEETRUN, "runs", "watch", "--json", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert endless.stdout is not None and json.loads(endless.stdout.readline())["runs"]
        endless.send_signal(signal.SIGINT)
        assert endless.wait(30) == 0
    finally:
        endless.kill()
        endless.communicate()
    bad = fleetrun(url, "runs", "watch", "--count", "0")
    assert bad.returncode == 2 and "must be greater than 0" in bad.stderr


def test_logs_and_events_follow_until_the_run_ends(fleet: Fleet) -> None:
    url = fleet.cp.url
    run_id = ok(fleetrun(url, "runs", "submit", "chatty")).strip()
    env = {**os.environ, "FLEETRUN_URL": url}
    follow = [
        subprocess.Popen(
            [*FLEETRUN, "runs", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for args in (
            ["logs", run_id, "--follow"],
            ["events", run_id, "--follow"],
            ["events", run_id, "--follow", "--json", "--type", "STEP_START,RUN_SUCCESS"],
        )
    ]
    try:
        (logs_out, logs_err), (events_out, _), (json_out, _) = [
            p.communicate(timeout=60) for p in follow
        ]
    finally:
        for p in follow:
            p.kill()
            p.wait()
    assert [p.returncode for p in follow] == [0, 0, 0]
    # Each line once, prefixed once, though a print's newline arrives as its own chunk
    assert logs_out.splitlines() == [f"[chatter] stdout line {i}" for i in range(3)]
    assert logs_err.splitlines() == [f"[chatter] stderr line {i}" for i in range(3)]
    assert in_order(events_out, "RUN_ENQUEUED", "STEP_START", "chatter", "RUN_SUCCESS")
    assert [json.loads(line)["type"] for line in json_out.splitlines()] == [
        "STEP_START",
        "RUN_SUCCESS",
    ]
    events = json.loads(ok(fleetrun(url, "runs", "events", run_id, "--after", "3", "--json")))
    assert events["events"][0]["seq"] == 4


def test_every_command_accepts_json(fleet: Fleet) -> None:
    url = fleet.cp.url
    done = fleet.cp.submit("broken")
    fleet.cp.wait_run(done)
    queued = json.loads(ok(fleetrun(url, "runs", "submit", "hello", "--tag", NOWHERE, "--json")))[
        "run_id"
    ]
    wait_for(
        lambda: len(fleet.cp.get("/api/v1/sensors/inbox/ticks")["ticks"]) >= 2,
        what="two sensor ticks",
    )
    reads = [
        ["runs", "list"],
        ["runs", "list", "--agent", "a1", "--limit", "2"],
        ["runs", "show", done],
        ["runs", "events", done],
        ["runs", "logs", done],
        ["runs", "watch", "--count", "1"],
        ["queue"],
        ["agents", "list"],
        ["jobs", "list"],
        ["schedules", "list"],
        ["schedules", "show", "every_minute"],
        ["schedules", "ticks", "nightly"],
        ["sensors", "list"],
        ["sensors", "show", "inbox"],
        ["sensors", "ticks", "inbox", "--limit", "2", "--location", "daemon"],
        ["tokens", "list"],
        ["health"],
    ]
    # --json after the command, before it, and --url after it (FLEETRUN_URL is wrong then)
    calls = [(url, [*args, "--json"]) for args in reads]
    calls += [(url, ["--json", *args]) for args in reads[:3]]
    calls += [("http://127.0.0.1:9", [*args, "--url", url, "--json"]) for args in reads[:3]]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda call: fleetrun(call[0], *call[1]), calls))
    pairs = zip(calls, results, strict=True)
    docs = {" ".join(args): json.loads(ok(result)) for (_, args), result in pairs}
    assert docs["runs show " + done + " --json"]["status"] == "FAILURE"
    assert docs["runs list --agent a1 --limit 2 --json"]["runs"]
    assert {"hello", "etl"} <= {j["name"] for j in docs["jobs list --json"]["jobs"]}
    assert docs["sensors show inbox --json"]["recent_ticks"]
    assert len(docs["sensors ticks inbox --limit 2 --location daemon --json"]["ticks"]) == 2
    assert docs["health --json"]["status"] == "ready"
    assert queued in [r["run_id"] for r in docs["queue --json"]["runs"]]

    # The commands that change something
    changes = [
        (["runs", "priority", queued, "7"], lambda d: d["tags"]["fleetrun/priority"] == "7"),
        (["runs", "cancel", queued], lambda d: d["status"] == "CANCELED"),
        (["runs", "reexecute", done], lambda d: d["status"] == "QUEUED"),
        (["runs", "submit", "hello", "--wait"], lambda d: d["status"] == "SUCCESS"),
        (["agents", "drain", "a1"], lambda d: d["status"] == "DRAINING"),
        (["agents", "undrain", "a1"], lambda d: d["status"] == "ONLINE"),
        (["agents", "reload", "a1", "--location", "daemon"], lambda d: d["name"] == "a1"),
        (["schedules", "start", "nightly"], lambda d: d["status"] == "RUNNING"),
        (["schedules", "stop", "nightly"], lambda d: d["status"] == "STOPPED"),
        (["sensors", "stop", "inbox"], lambda d: d["status"] == "STOPPED"),
        (["sensors", "start", "inbox"], lambda d: d["status"] == "RUNNING"),
        (
            ["tokens", "create", "--kind", "user", "--name", "cli", "--role", "viewer"],
            lambda d: d["token"] and d["role"] == "viewer",
        ),
        (["tokens", "revoke", "cli"], lambda d: d["revoked"]),
    ]
    for args, check in changes:
        assert check(json.loads(ok(fleetrun(url, *args, "--json")))), args
    # Streams: one JSON document per line
    chatty = fleet.cp.submit("chatty")
    for args in (["runs", "logs", chatty, "--follow"], ["runs", "events", chatty, "--follow"]):
        lines = ok(fleetrun(url, *args, "--json")).splitlines()
        assert lines and all(json.loads(line) for line in lines)


def test_schedules_and_sensors_show_and_ticks(fleet: Fleet) -> None:
    url = fleet.cp.url
    show = ok(fleetrun(url, "schedules", "show", "every_minute"))
    assert "cron:" in show and "* * * * *" in show and "Europe/Berlin" in show
    assert "next ticks:" in show and "recent ticks:" in show
    wait_for(
        lambda: len(fleet.cp.get("/api/v1/sensors/inbox/ticks")["ticks"]) >= 3,
        what="three sensor ticks",
    )
    ticks = ok(fleetrun(url, "sensors", "ticks", "inbox", "--limit", "3")).splitlines()
    assert ticks[0].split() == ["TICK", "STATUS", "STARTED", "TOOK", "RUNS", "DETAIL"]
    assert len(ticks) == 4 and "no files yet" in ticks[2]  # the newest may still be STARTED
    sensor = ok(fleetrun(url, "sensors", "show", "inbox", "--location", "daemon"))
    assert "minimum_interval_seconds: 0.3" in sensor and "SKIPPED" in sensor
    assert ok(fleetrun(url, "schedules", "ticks", "nightly")).split() == [
        "TICK",
        "SCHEDULED",
        "STATUS",
        "STARTED",
        "TOOK",
        "RUNS",
        "DETAIL",
    ]
    missing = one_error_line(fleetrun(url, "sensors", "show", "inbox", "--location", "elsewhere"))
    assert "no sensor named 'inbox' in location 'elsewhere' (404 unknown_sensor)" in missing


def test_api_errors_exit_1_with_the_servers_message(fleet: Fleet) -> None:
    url = fleet.cp.url
    finished = fleet.cp.submit("hello")
    fleet.cp.wait_run(finished)
    expected = {
        ("runs", "show", "no-such-run"): "no run with id 'no-such-run' (404 unknown_run)",
        ("runs", "cancel", finished): "run already ended with SUCCESS (409 already_finished)",
        ("runs", "submit", "hello", "--tag", "fleetrun/priority=high"): "(422 bad_tag)",
        ("runs", "submit", "no_such_job"): "no code location defines job 'no_such_job' (404",
        ("agents", "drain", "nobody"): "(404 unknown_agent)",
        ("runs", "list", "--status", "DONE"): "unknown run status 'DONE' (400 bad_parameter)",
    }
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda args: fleetrun(url, *args), expected))
    for (args, message), result in zip(expected.items(), results, strict=True):
        assert message in one_error_line(result), args
    refused = one_error_line(fleetrun("http://127.0.0.1:9", "runs", "list"))
    assert "cannot reach the control plane at http://127.0.0.1:9" in refused
    assert "must start with http://" in one_error_line(fleetrun("127.0.0.1:9", "queue"))


def seed_runs(folder: Path, run_ids: list[str]) -> None:
    """Queued runs with ids of the test's choosing, written through the storage layer
    into the control plane's own SQLite file (its API makes random ids)."""

    async def create() -> None:
        storage = open_storage(f"sqlite:///{folder / 'fleetrun.db'}")
        await storage.open()
        try:
            for run_id in run_ids:
                new = NewRun(run_id=run_id, job="hello", location="nowhere", tags={}, config={})
                await storage.create_run(new, now=time.time())
        finally:
            await storage.close()

    asyncio.run(create())


def test_short_run_ids_and_key_equals_value_tag_filters(fleet: Fleet) -> None:
    url = fleet.cp.url
    run_id = json.loads(
        ok(fleetrun(url, "runs", "submit", "hello", "--tag", "ticket=ids-27", "--json"))
    )["run_id"]
    fleet.cp.wait_run(run_id)
    short = run_id[:8]
    assert f"run_id:        {run_id}" in ok(fleetrun(url, "runs", "show", short))
    assert json.loads(ok(fleetrun(url, "runs", "events", short, "--json")))["events"]
    ok(fleetrun(url, "runs", "logs", short))
    listed = json.loads(ok(fleetrun(url, "runs", "list", "--tag", "ticket=ids-27", "--json")))
    assert [r["run_id"] for r in listed["runs"]] == [run_id]

    seed_runs(fleet.folder, ["dddd0000-aaaa", "dddd0000-bbbb"])
    ambiguous = one_error_line(fleetrun(url, "runs", "cancel", "dddd"))
    assert ambiguous == (
        "fleetrun: run id 'dddd' is ambiguous: it starts runs dddd0000-aaaa, dddd0000-bbbb; "
        "give more characters (409 ambiguous_run_id)"
    )
    for unique in ("dddd0000-a", "dddd0000-bbbb"):
        assert json.loads(ok(fleetrun(url, "runs", "cancel", unique, "--json")))["status"] == (
            "CANCELED"
        )
    missing = one_error_line(fleetrun(url, "runs", "show", "dddd0000-c"))
    assert missing == "fleetrun: no run with id 'dddd0000-c' (404 unknown_run)"


def test_health_names_the_control_planes_version(fleet: Fleet) -> None:
    first = ok(fleetrun(fleet.cp.url, "health")).splitlines()[0]
    assert first == f"ready  (control plane {FLEETRUN_VERSION})"


def test_auth_errors_are_one_line_and_tokens_come_from_flag_or_env(tmp_path: Path) -> None:
    auth = "[auth]\nenabled = true\n"
    config = write_control_plane_config(tmp_path, auth)
    tokens = {}
    for name, role in (("root", "admin"), ("reader", "viewer")):
        created = fleetrun(
            "http://127.0.0.1:9",
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
        )
        tokens[role] = ok(created).strip()
    cp = start_control_plane(tmp_path, auth)
    try:
        anonymous = one_error_line(fleetrun(cp.url, "runs", "list"))
        assert "(401 unauthenticated); pass --token or set FLEETRUN_TOKEN" in anonymous
        bogus = one_error_line(fleetrun(cp.url, "runs", "list", "--token", "fleetrun_x_y"))
        assert "(401 bad_token)" in bogus and "FLEETRUN_TOKEN" not in bogus
        forbidden = one_error_line(
            fleetrun(cp.url, "runs", "submit", "hello", token=tokens["viewer"])
        )
        assert "(403 forbidden)" in forbidden
        assert (
            json.loads(ok(fleetrun(cp.url, "runs", "list", "--json", token=tokens["viewer"])))[
                "runs"
            ]
            == []
        )
        listed = ok(fleetrun(cp.url, "tokens", "list", "--token", tokens["admin"]))
        assert "reader" in listed and "viewer" in listed and tokens["viewer"] not in listed
    finally:
        cp.stop()


def test_completion_scripts_know_every_command() -> None:
    bash = ok(fleetrun("http://127.0.0.1:9", "completion", "bash"))
    for words in (
        "submit list watch show events logs cancel delete reexecute priority",
        "list show ticks start stop",
        "runs queue schedules sensors agents jobs pools",
    ):
        assert words in bash, words
    assert "--interval" in bash and "--follow" in bash
    if shutil.which("bash"):  # the script loads and registers itself
        check = subprocess.run(
            ["bash", "-c", "source /dev/stdin && complete -p fleetrun"],
            input=bash,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0 and "_shtab_fleetrun" in check.stdout, check.stderr
    for shell in ("zsh", "tcsh"):
        assert "watch" in ok(fleetrun("http://127.0.0.1:9", "completion", shell))
    assert fleetrun("http://127.0.0.1:9", "completion", "fish").returncode == 2


def test_serve_exports_its_event_loop_lag_and_gc_pauses(fleet: Fleet) -> None:
    """The two signals of control_plane/collector.py, from a real `fleetrun serve`."""

    def counts() -> tuple[float, float] | None:
        with urllib.request.urlopen(f"{fleet.cp.url}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        lag = re.search(r"^fleetrun_event_loop_lag_seconds_count (\S+)$", text, re.M)
        young = re.search(r'^fleetrun_gc_pause_seconds_count\{generation="0"\} (\S+)$', text, re.M)
        assert lag is not None and young is not None, "both series are exported"
        found = float(lag.group(1)), float(young.group(1))
        return found if found[0] >= 2 and found[1] >= 1 else None  # sampled, and collected

    wait_for(counts, 60, what="lag samples and a young collection")
