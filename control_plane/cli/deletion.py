"""`fleetrun runs delete`: finished runs by id, or every finished run a filter selects.

The filter form lists what it selects and deletes nothing without `--yes`, so the same
command line is first a preview and then the deletion.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from control_plane.cli.client import ApiClient, CliError
from control_plane.cli.render import emit, runs_table, seg
from control_plane.model.statuses import TERMINAL_STATUSES

PAGE = 500
FINISHED = ",".join(sorted(TERMINAL_STATUSES))


def parse_before(text: str) -> float:
    """`--before` as a UTC timestamp: a date (midnight UTC) or an ISO-8601 date and time."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"--before must be a date or an ISO-8601 time, e.g. 2026-01-01, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def check_statuses(text: str | None) -> str:
    """The statuses to select (all finished ones by default); only finished ones."""
    if not text:
        return FINISHED
    statuses = [s.strip().upper() for s in text.split(",") if s.strip()]
    wrong = [s for s in statuses if s not in TERMINAL_STATUSES]
    if wrong or not statuses:
        raise CliError(
            f"--status takes finished statuses ({FINISHED.replace(',', ', ')}), "
            f"got {text!r}: an active run cannot be deleted"
        )
    return ",".join(statuses)


def ended_before(run: dict[str, Any], before: float) -> bool:
    end = run.get("end_time")
    return end is not None and parse_before(end) < before


def _selected(client: ApiClient, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Every run the filter selects, page by page."""
    before = parse_before(args.before)
    params = [("status", check_statuses(args.status)), ("limit", str(PAGE))]
    if args.job:
        params.append(("job", args.job))
    cursor = None
    while True:
        page = client.request(
            "GET", "/runs", params=params + ([("cursor", cursor)] if cursor else [])
        )
        yield from (run for run in page["runs"] if ended_before(run, before))
        cursor = page["next_cursor"]
        if not cursor:
            return


def _delete(client: ApiClient, run_ids: list[str]) -> tuple[list[str], list[str]]:
    """Delete each run; (the deleted ids, one line per refusal)."""
    deleted, refused = [], []
    for run_id in run_ids:
        try:
            deleted.append(client.request("DELETE", f"/runs/{seg(run_id)}")["run_id"])
        except CliError as exc:
            refused.append(f"{run_id}: {exc}")
    return deleted, refused


def cmd_runs_delete(args: argparse.Namespace, client: ApiClient) -> int:
    """IDs: delete them. A filter: show what it selects; with --yes, delete that."""
    filtering = args.status or args.before or args.job
    if args.run_ids and filtering:
        raise CliError("give run ids or a filter (--status/--before/--job), not both")
    if not args.run_ids and not args.before:
        raise CliError("give run ids, or --before DATE (with --status, --job) to select runs")
    if args.run_ids:
        run_ids = args.run_ids
    else:
        runs = list(_selected(client, args))
        if not args.yes:
            text = runs_table(runs, {}) + f"\n{len(runs)} runs would be deleted; add --yes"
            emit(args, {"runs": runs, "deleted": []}, text)
            return 0
        run_ids = [run["run_id"] for run in runs]
    deleted, refused = _delete(client, run_ids)
    for line in refused:
        print(f"not deleted: {line}", file=sys.stderr)
    emit(args, {"deleted": deleted, "refused": refused}, f"deleted {len(deleted)} runs")
    return 1 if refused else 0
