"""Submit -> STARTED and submit -> SUCCESS for a one-op job on an idle machine.

Starts a real control plane (`fleetrun serve`) on a free loopback port and one real
agent, then submits the `hello` example job N times, one after the other, waiting for
each to finish. Times: `t0` is taken just before the POST; STARTED is the run's
`start_time` (stamped by the run worker when execution begins) and SUCCESS its `end_time`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLEETRUN = [sys.executable, "-m", "control_plane.cli"]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _wait(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(runs: int) -> dict[str, list[float]]:
    folder = Path(tempfile.mkdtemp(prefix="fleetrun-bench-"))
    (folder / "cp.toml").write_text('[server]\nport = 0\n[storage]\nurl = "sqlite:///b.db"\n')
    cp_log = open(folder / "cp.log", "wb")
    cp = subprocess.Popen([*FLEETRUN, "serve", "--config", str(folder / "cp.toml")],
                          stdout=cp_log, stderr=subprocess.STDOUT)  # fmt: skip
    agent = None
    try:
        match = _wait(
            lambda: re.search(r"listening on (http://\S+)", (folder / "cp.log").read_text()),
            60, "the control plane",
        )  # fmt: skip
        url = match.group(1)
        (folder / "agent.toml").write_text(
            f'control_plane_url = "{url}"\nname = "bench"\n[[code_locations]]\n'
            f'name = "examples"\npython_file = "{REPO / "examples" / "demo_jobs.py"}"\n'
        )
        agent = subprocess.Popen([*FLEETRUN, "agent", "--config", str(folder / "agent.toml")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        _wait(lambda: _get(f"{url}/api/v1/jobs")["jobs"], 60, "the agent")
        started, finished = [], []
        for _ in range(runs):
            t0 = time.time()
            run_id = _post(f"{url}/api/v1/runs", {"job": "hello"})["run_id"]
            run = _wait(
                lambda rid=run_id: (r := _get(f"{url}/api/v1/runs/{rid}"))["end_time"] and r,
                60, "the run",
            )  # fmt: skip
            assert run["status"] == "SUCCESS", run
            started.append(_ts(run["start_time"]) - t0)
            finished.append(_ts(run["end_time"]) - t0)
        return {"submit -> STARTED": started, "submit -> SUCCESS": finished}
    finally:
        for proc in (agent, cp):
            if proc is not None:
                proc.terminate()
                proc.wait(20)
        cp_log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" else [])
    results = measure(args.runs)
    print(f"one-op job, {args.runs} sequential runs, idle machine (ms)")
    print(f"{'measure':<20}{'p50':>8}{'p90':>8}{'max':>8}")
    for name, values in results.items():
        ms = [v * 1000 for v in values]
        print(f"{name:<20}{statistics.median(ms):>8.1f}{_pct(ms, 0.9):>8.1f}{max(ms):>8.1f}")


if __name__ == "__main__":
    main()
