"""`GET /api/v1/openapi.json`: an OpenAPI 3.1 description of every JSON route.

Written by hand from what the handlers in api.py and token_api.py accept and answer, so
that clients and fuzzers (tests/e2e/test_openapi_fuzz.py) can rely on it; a unit test
fails when a route the app registers is missing here, or the other way round. Bounds that
come from `[limits]` are taken from the running server's config when there is one.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from control_plane.config import ControlPlaneConfig, LimitsConfig
from control_plane.http.auth import KINDS, PUBLIC, ROLES, ROUTE_ACCESS
from control_plane.http.keys import CONFIG
from control_plane.http.params import MAX_LIST_LIMIT, MAX_WAIT_SECONDS
from control_plane.http.runs import NAME_RE
from control_plane.http.tokens import TOKEN_NAME_RE
from control_plane.model.alerts import ALERT_EVENTS, DELIVERY_STATUSES
from control_plane.model.statuses import RunStatus
from protocol.tags import (
    MAX_RETRIES_TAG,
    MAX_RUNTIME_TAG,
    ON_LOST_CONTACT_CHOICES,
    ON_LOST_CONTACT_TAG,
    PRIORITY_TAG,
    QUEUE_TAG,
    RESERVED_TAGS,
    RETRY_STRATEGIES,
    RETRY_STRATEGY_TAG,
)

OPENAPI_PATH = "/api/v1/openapi.json"
Schema = dict[str, Any]

# Strings the tag checks in tags.py accept: a subset of what int() and float() parse
# (no "1_000", non-ASCII digits or exponents), so every string matching them passes.
_INT_TEXT = r"^\s*[+-]?[0-9]+\s*$"
_NON_NEGATIVE_INT_TEXT = r"^\s*\+?[0-9]+\s*$"
_SECONDS_TEXT = r"^\s*\+?[0-9]{1,300}(\.[0-9]*)?\s*$"  # no exponent: 1e999 is inf
_STATUS_LIST = "(" + "|".join(s.value for s in RunStatus) + ")"

# --- JSON Schema helpers ---------------------------------------------------------------


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def string(**keywords: Any) -> Schema:
    return {"type": "string", **keywords}


def integer(minimum: int | None = None, maximum: int | None = None, **keywords: Any) -> Schema:
    schema: Schema = {"type": "integer", **keywords}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def nullable(schema: Schema) -> Schema:
    """`schema` or null, in OpenAPI 3.1 (plain JSON Schema) spelling."""
    if isinstance(schema.get("type"), str):
        out = {**schema, "type": [schema["type"], "null"]}
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [schema, {"type": "null"}]}


def timestamp() -> Schema:
    return string(format="date-time", description="ISO-8601 UTC, e.g. 2026-11-24T02:47:25Z")


def array(items: Schema, **keywords: Any) -> Schema:
    return {"type": "array", "items": items, **keywords}


def string_map(**keywords: Any) -> Schema:
    return {"type": "object", "additionalProperties": {"type": "string"}, **keywords}


def obj(
    properties: dict[str, Schema],
    optional: tuple[str, ...] = (),
    closed: bool = False,
    **keywords: Any,
) -> Schema:
    """An object whose properties are all required except `optional`; `closed` refuses
    other keys (request bodies whose handler rejects unknown keys)."""
    schema: Schema = {"type": "object", "properties": properties, **keywords}
    required = [name for name in properties if name not in optional]
    if required:
        schema["required"] = required
    if closed:
        schema["additionalProperties"] = False
    return schema


def name_pattern() -> Schema:
    return string(pattern=NAME_RE.pattern, minLength=1, maxLength=128)


# --- component schemas -----------------------------------------------------------------


def run_schemas() -> dict[str, Schema]:
    statuses = [s.value for s in RunStatus]
    run_status = string(enum=statuses)
    run = obj(
        {
            "run_id": string(),
            "job": string(),
            "location": string(),
            "status": run_status,
            "status_reason": nullable(string()),
            "tags": string_map(),
            "config": {"type": "object"},
            "agent": nullable(string(description="id of the agent the run was assigned to")),
            "create_time": timestamp(),
            "start_time": nullable(timestamp()),
            "end_time": nullable(timestamp()),
            "lease": nullable(integer(description="current attempt's lease; null once fenced")),
            "failure_kind": nullable(
                string(
                    description="why a FAILURE happened: op_failure, "
                    "worker_crash, agent_lost, agent_restarted, "
                    "start_timeout, max_runtime"
                )
            ),
            "parent_run_id": nullable(string()),
            "root_run_id": nullable(string()),
            "not_before": nullable(timestamp()),
            "reuse_outputs": string_map(description="step -> the run that stored its output"),
            "code_version": nullable(
                string(
                    description="the version of its code location the run ran with (a git "
                    "commit, or a hash of the location's files); null until it started"
                )
            ),
        }
    )
    chain_link = obj(
        {
            "run_id": string(),
            "status": run_status,
            "parent_run_id": nullable(string()),
            "kind": string(enum=["original", "retry", "reexecution"]),
        }
    )
    return {
        "RunStatus": run_status,
        "Run": run,
        "RunDetail": {
            "allOf": [ref("Run"), obj({"chain": array(chain_link)})],
            "description": "A run plus `chain`: its family (root, retries, re-executions), "
            "oldest first; empty for a run with none.",
        },
        "RunAccepted": obj({"run_id": string(), "status": run_status}),
        "RunDeleted": obj({"run_id": string(), "deleted": {"type": "boolean"}}),
        "RunList": obj(
            {
                "runs": array(ref("Run")),
                "next_cursor": nullable(string(description="pass back as `cursor`")),
            }
        ),
        "Event": obj(
            {
                "seq": integer(1, description="counts from 1 without gaps"),
                "time": timestamp(),
                "type": string(),
                "step": nullable(string()),
                "message": string(),
                "data": {"type": "object"},
            }
        ),
        "EventList": obj({"events": array(ref("Event"))}),
        "LogChunk": obj(
            {
                "id": integer(),
                "step": nullable(string()),
                "stream": string(),
                "time": timestamp(),
                "text": string(),
            }
        ),
        "LogList": obj({"logs": array(ref("LogChunk"))}),
    }


def tags_schema(limits: LimitsConfig) -> Schema:
    """Tags as `_check_tags` accepts them: counts, lengths, reserved keys, read values."""
    return string_map(
        maxProperties=limits.max_tags_per_run,
        propertyNames={
            **string(minLength=1, maxLength=limits.max_tag_key_length),
            "not": {"enum": sorted(RESERVED_TAGS)},
        },
        additionalProperties=string(maxLength=limits.max_tag_value_length),
        properties={
            PRIORITY_TAG: string(pattern=_INT_TEXT, maxLength=limits.max_tag_value_length),
            QUEUE_TAG: string(maxLength=limits.max_tag_value_length),
            MAX_RETRIES_TAG: string(pattern=_NON_NEGATIVE_INT_TEXT),
            RETRY_STRATEGY_TAG: string(enum=list(RETRY_STRATEGIES)),
            MAX_RUNTIME_TAG: string(pattern=_SECONDS_TEXT, description="finite seconds >= 0"),
            ON_LOST_CONTACT_TAG: string(enum=list(ON_LOST_CONTACT_CHOICES)),
        },
        description=f"At most {limits.max_tags_per_run} tags (max_tags_per_run); tags the "
        "control plane reads are refused with 422 bad_tag when their value is wrong, and "
        "the lineage tags it sets itself cannot be given.",
    )


def request_schemas(limits: LimitsConfig) -> dict[str, Schema]:
    token_name = string(pattern=TOKEN_NAME_RE.pattern, minLength=1, maxLength=128)
    return {
        "SubmitRun": obj(
            {
                "job": name_pattern(),
                "location": nullable(name_pattern()),
                "tags": tags_schema(limits),
                "config": {
                    "type": "object",
                    "description": f"the run config; at most {limits.max_run_config_bytes} "
                    "bytes as compact JSON (max_run_config_bytes), else 413",
                },
            },
            optional=("location", "tags", "config"),
            closed=True,
            description="`location` may be left out when exactly one code location "
            "defines the job.",
        ),
        "Reexecute": obj(
            {"strategy": string(enum=list(RETRY_STRATEGIES), default="FROM_FAILURE")},
            optional=("strategy",),
            closed=True,
        ),
        "SetPoolLimit": obj({"limit": integer(0, 1_000_000)}, closed=True),
        "SetPriority": obj(
            {"priority": integer(-(2**31), 2**31 - 1, description="a JSON integer, not 1.0")},
            closed=True,
        ),
        "NewToken": {"oneOf": [ref("NewUserToken"), ref("NewAgentToken")]},
        "NewUserToken": obj(
            {"name": token_name, "kind": string(const="user"), "role": string(enum=list(ROLES))},
            closed=True,
        ),
        "NewAgentToken": obj(
            {"name": token_name, "kind": string(const="agent"), "role": {"type": "null"}},
            optional=("role",),
            closed=True,
            description="agent tokens have no role",
        ),
    }


def fleet_schemas() -> dict[str, Schema]:
    location = obj(
        {
            "name": string(),
            "jobs": array(string()),
            "error": nullable(string(description="no version loads")),
            "version": nullable(string(description="the code version new runs use")),
            "versions": array(
                string(), description="every version the agent has, serving one first"
            ),
            "reload_error": nullable(
                string(description="the last reload failed; `version` still serves")
            ),
        }
    )
    agent = obj(
        {
            "agent_id": string(),
            "name": string(),
            "hostname": string(),
            "status": string(enum=["ONLINE", "OFFLINE", "DRAINING"]),
            "queues": array(string()),
            "max_concurrent_runs": integer(),
            "launcher": nullable(string(enum=["forkserver", "subprocess", "docker"])),
            "running": integer(0),
            "step_tasks": integer(0, description="step tasks of fleet runs it runs now"),
            "last_heartbeat": nullable(timestamp()),
            "version": string(),
            "code_locations": array(location),
            "labels": string_map(description="what `fleetrun/requires` selects on"),
            "resources": {
                "type": "object",
                "additionalProperties": integer(0),
                "description": "what it offers to placement: cpus, memory_mb, gpus",
            },
            "resources_free": {
                "type": "object",
                "additionalProperties": {"type": "number"},
                "description": "what its running runs do not hold (cpus may be a fraction)",
            },
        }
    )
    retry_policy = obj(
        {
            "max_retries": integer(),
            "delay": nullable({"type": "number"}),
            "backoff": nullable(string(enum=["LINEAR", "EXPONENTIAL"])),
            "jitter": nullable(string(enum=["FULL", "PLUS_MINUS"])),
        }
    )
    op = obj(
        {
            "name": string(),
            "upstream": array(string()),
            "tags": string_map(),
            "retry_policy": nullable(retry_policy),
            "pool": nullable(string(description="the concurrency pool its steps take a slot of")),
        }
    )
    job = obj(
        {
            "name": string(),
            "location": string(),
            "ops": array(op),
            "tags": string_map(),
            "executor": string(),
            "agents": array(string()),
            "code_versions": array(string(), description="the versions agents serve"),
        }
    )
    queued = obj(
        {
            "position": integer(1),
            "run_id": string(),
            "job": string(),
            "location": string(),
            "queue": string(),
            "priority": integer(),
            "create_time": timestamp(),
            "waiting_for": nullable(string(description="null when the next pass launches it")),
            "next_agent": nullable(string()),
        }
    )
    step_task = obj(
        {
            "task_id": integer(1),
            "run_id": string(),
            "step": string(),
            "attempt": integer(0),
            "queue": string(),
            "create_time": timestamp(),
            "waiting_for": nullable(string(description="null when the next pass places it")),
            "next_agent": nullable(string()),
        }
    )
    limit = obj(
        {"limit": string(), "max": integer(), "in_use": integer(0), "runs": array(string())}
    )
    return {
        "Agent": agent,
        "AgentList": obj({"agents": array(ref("Agent"))}),
        "AgentStatus": obj(
            {"agent_id": string(), "name": string(), "status": string(enum=["ONLINE", "DRAINING"])}
        ),
        "Job": job,
        "JobList": obj(
            {
                "jobs": array(ref("Job")),
                "location_errors": array(
                    obj(
                        {
                            "location": string(),
                            "agent": string(),
                            "error": string(),
                            "serving_version": string(
                                description="a failed reload: the version still serving"
                            ),
                        },
                        optional=("serving_version",),
                    )
                ),
            }
        ),
        "Queue": obj(
            {
                "runs": array(queued),
                "step_tasks": array(
                    step_task, description="step tasks of fleet runs waiting for an agent"
                ),
                "limits": array(limit),
                "pools": array(ref("Pool"), description="pools with steps waiting for a slot"),
            }
        ),
        "Reload": obj(
            {"location": name_pattern()},
            optional=("location",),
            closed=True,
            description="Send `{}` (or nothing) to reload every code location of the agent.",
        ),
        "ReloadAccepted": obj(
            {"agent_id": string(), "name": string(), "location": nullable(string())}
        ),
        **pool_schemas(),
    }


def pool_schemas() -> dict[str, Schema]:
    claim = obj(
        {
            "run_id": string(),
            "step": nullable(string(description="null: the run's own slot (run granularity)")),
            "attempt": integer(0),
            "priority": integer(),
            "since": timestamp(),
        }
    )
    pool = obj(
        {
            "name": string(),
            "limit": nullable(integer(0, description="null: unlimited; 0: paused")),
            "source": string(enum=["api", "config", "default"]),
            "in_use": integer(0),
            "waiting": integer(0),
            "holders": array(claim),
            "waiters": array(claim, description="in the order they get slots"),
        }
    )
    return {
        "Pool": pool,
        "PoolList": obj(
            {
                "granularity": string(enum=["op", "run"]),
                "default_pool_limit": integer(0),
                "pools": array(ref("Pool")),
            }
        ),
        "PoolLimit": obj(
            {
                "name": string(),
                "limit": nullable(integer(0)),
                "source": string(enum=["api", "config", "default"]),
            }
        ),
    }


def token_schemas() -> dict[str, Schema]:
    token = obj(
        {
            "name": string(),
            "kind": string(enum=list(KINDS)),
            "role": nullable(string(enum=list(ROLES))),
            "create_time": timestamp(),
            "last_used": nullable(timestamp()),
            "revoked": {"type": "boolean"},
            "revoked_time": nullable(timestamp()),
        }
    )
    created = {
        "allOf": [ref("Token"), obj({"token": string(description="shown this once")})],
    }
    return {
        "Token": token,
        "TokenList": obj({"tokens": array(ref("Token"))}),
        "CreatedToken": created,
    }


def instigator_schemas() -> dict[str, Schema]:
    """Schedules and sensors; an ORPHANED one (no longer defined) lacks the definition's
    fields, so those are optional."""
    base = {
        "name": string(),
        "location": string(),
        "status": string(enum=["RUNNING", "STOPPED", "ORPHANED"]),
        "job": nullable(string()),
    }
    schedule = obj(
        {
            **base,
            "cron": string(),
            "timezone": string(),
            "catchup": integer(),
            "next_ticks": array(timestamp(), description="the next 3, when RUNNING"),
            "last_tick_time": nullable(timestamp()),
        },
        optional=("cron", "timezone", "catchup", "next_ticks"),
    )
    sensor = obj(
        {
            **base,
            "minimum_interval_seconds": {"type": "number"},
            "cursor": nullable(string()),
            "last_run_key": nullable(string()),
            "run_status": nullable(string(description="a run status sensor's status")),
            "monitored_jobs": array(string(), description="empty: its location's jobs"),
            "monitor_all_locations": {"type": "boolean"},
            "last_tick_time": nullable(timestamp()),
        },
        optional=(
            "minimum_interval_seconds",
            "cursor",
            "last_run_key",
            "run_status",
            "monitored_jobs",
            "monitor_all_locations",
        ),
    )
    tick = obj(
        {
            "tick_id": integer(),
            "scheduled_time": nullable(timestamp()),
            "status": string(enum=["STARTED", "SUCCESS", "SKIPPED", "FAILURE"]),
            "skip_reason": nullable(string()),
            "error": nullable(string()),
            "run_ids": array(string()),
            "cursor": nullable(string()),
            "start_time": timestamp(),
            "end_time": nullable(timestamp()),
            "failure_count": integer(description="evaluations of this tick that raised"),
        }
    )
    with_ticks = obj({"recent_ticks": array(ref("Tick"), maxItems=5)})
    return {
        "Schedule": schedule,
        "ScheduleDetail": {"allOf": [ref("Schedule"), with_ticks]},
        "ScheduleList": obj({"schedules": array(ref("Schedule"))}),
        "Sensor": sensor,
        "SensorDetail": {"allOf": [ref("Sensor"), with_ticks]},
        "SensorList": obj({"sensors": array(ref("Sensor"))}),
        "Tick": tick,
        "TickList": obj({"ticks": array(ref("Tick"))}),
        "InstigatorStatus": obj(
            {"name": string(), "location": string(), "status": string(enum=["RUNNING", "STOPPED"])}
        ),
    }


def alert_schemas() -> dict[str, Schema]:
    event = string(enum=list(ALERT_EVENTS))
    rule = obj(
        {
            "name": string(),
            "on": array(event),
            "webhook_url": string(
                description="its scheme, host and port only: a path may be a secret"
            ),
            "jobs": array(string(), description="run events of these jobs only; empty: all"),
            "tags": string_map(description="run events of runs with each of these tags only"),
            "queued_seconds": {"type": "number"},
        }
    )
    delivery = obj(
        {
            "id": integer(1),
            "alert": string(description="the rule's name"),
            "event": event,
            "key": string(
                description="the occurrence (run_failure/<run id>…): one delivery per rule and key"
            ),
            "status": string(enum=list(DELIVERY_STATUSES)),
            "attempts": integer(0),
            "next_attempt_at": nullable(timestamp()),
            "last_error": nullable(string()),
            "created_at": timestamp(),
            "sent_at": nullable(timestamp()),
            "text": string(description="the message, as Slack shows it"),
            "payload": {"type": "object", "description": "the JSON body the webhook gets"},
        }
    )
    return {
        "AlertRule": rule,
        "AlertDelivery": delivery,
        "Alerts": obj(
            {"rules": array(ref("AlertRule")), "deliveries": array(ref("AlertDelivery"))}
        ),
    }


def misc_schemas() -> dict[str, Schema]:
    loop = obj(
        {
            "seconds_since_beat": {"type": "number"},
            "last_error": nullable(string()),
            "standby": {"type": "boolean"},
        },
        optional=("seconds_since_beat", "last_error", "standby"),
        description="a loop this replica runs, or (standby) one another replica runs",
    )
    version = string(description="the control plane's fleetrun version, e.g. 0.1.0")
    return {
        "Error": obj(
            {"error": obj({"code": string(), "message": string()})},
            description="every refusal: a machine-readable code and a message for people",
        ),
        "Health": obj({"status": string(const="ok"), "version": version}),
        "Version": obj(
            {
                "version": version,
                "protocol_version": integer(
                    1, description="the agent protocol it speaks (and the one before)"
                ),
            }
        ),
        "Ready": obj(
            {
                "status": string(const="ready"),
                "version": version,
                "replica": string(description="this process, as leader election names it"),
                "leading": {
                    "type": "array",
                    "items": string(),
                    "description": "the daemon loops this replica runs",
                },
                "loops": {"type": "object", "additionalProperties": loop},
            }
        ),
        "OpenApiDocument": obj(
            {"openapi": string(), "info": {"type": "object"}, "paths": {"type": "object"}}
        ),
    }


# --- responses and parameters ----------------------------------------------------------

ERRORS = {
    400: "malformed JSON, a body that is not a JSON object, or a bad query parameter",
    401: "no, unknown or revoked token (only with [auth] enabled = true)",
    403: "a token of the wrong kind or role (only with [auth] enabled = true)",
    404: "unknown run, job, location, agent, token, schedule or sensor",
    408: "the body did not arrive within body_timeout_seconds",
    409: "the request conflicts with the current state (see the code)",
    413: "the body (max_body_bytes) or run config (max_run_config_bytes) is too large",
    422: "well-formed JSON with wrong fields or values",
    503: "not ready: storage_unavailable or daemon_stale",
}
BODY_ERRORS = (400, 408, 413, 422)


def error_responses() -> dict[str, Any]:
    """Shared 4xx/5xx responses, each the common `{"error": {code, message}}` shape."""
    return {
        str(status): {
            "description": text,
            "content": {"application/json": {"schema": ref("Error")}},
        }
        for status, text in ERRORS.items()
    }


def ok(schema: str, description: str, status: int = 200) -> dict[str, Any]:
    return {
        str(status): {
            "description": description,
            "content": {"application/json": {"schema": ref(schema)}},
        }
    }


def query(name: str, schema: Schema, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
        **extra,
    }


def path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": string(),
        "description": description,
    }


def int_query(name: str, default: int, lo: int, hi: int, description: str) -> dict[str, Any]:
    return query(name, integer(lo, hi, default=default), description)


def wait_query() -> dict[str, Any]:
    return query(
        "wait",
        {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS, "default": 0},
        "seconds to hold the request until something arrives (long-poll)",
    )


def location_query(kind: str) -> dict[str, Any]:
    return query(
        "location",
        string(),
        f"the code location defining the {kind}; needed "
        "when the name is defined in several (else 409 ambiguous_name)",
    )


RUN_ID = path_param(
    "run_id",
    "a run id, or a unique prefix of it of at least 4 characters (the UI shows 8); a "
    "prefix that starts several runs gets 409 ambiguous_run_id naming up to 5 of them",
)


def json_body(schema: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": ref(schema)}}}


# --- operations ------------------------------------------------------------------------


def operation(
    op_id: str,
    summary: str,
    tag: str,
    success: dict[str, Any],
    errors: tuple[int, ...] = (),
    params: tuple[dict[str, Any], ...] = (),
    body: str | None = None,
    description: str | None = None,
    body_required: bool = True,
) -> dict[str, Any]:
    """One operation; one with a body also gets the body errors (400, 408, 413, 422).
    `apply_access` adds the auth errors later, from the route table."""
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": [tag]}
    if description:
        op["description"] = description
    if params:
        op["parameters"] = list(params)
    codes = set(errors)
    if body is not None:
        op["requestBody"] = json_body(body, body_required)
        codes |= set(BODY_ERRORS)
    op["responses"] = {
        **success,
        **{str(c): {"$ref": f"#/components/responses/E{c}"} for c in sorted(codes)},
    }
    return op


def run_filters() -> tuple[dict[str, Any], ...]:
    """`GET /api/v1/runs`'s query, as `api.parse_filter` and `list_runs` read it."""
    status = string(pattern=rf"^\s*{_STATUS_LIST}\s*(,\s*{_STATUS_LIST}\s*)*$")
    return (
        query(
            "status",
            array(status),
            "run statuses, repeated or comma-separated (case-insensitive)",
            style="form",
            explode=True,
        ),
        query("job", string(), "only runs of this job"),
        query(
            "tag",
            array(string(pattern="^[^:=]+[:=]")),
            "key=value, repeated: runs with every one of these tags (the key ends at the "
            "first = or :, so the older key:value is still accepted)",
            style="form",
            explode=True,
        ),
        query(
            "agent",
            string(),
            "only runs assigned to this agent (id or name); an unknown agent has none",
        ),
        int_query("limit", 100, 1, MAX_LIST_LIMIT, "page size"),
        query("cursor", string(pattern="^[0-9]*$"), "`next_cursor` of the previous page"),
    )


def run_operations() -> dict[str, dict[str, Any]]:
    after = "return {} with {} > after"
    return {
        "/api/v1/runs": {
            "post": operation(
                "submitRun",
                "Submit a run (queued)",
                "runs",
                ok("RunAccepted", "queued", 201),
                (404,),
                body="SubmitRun",
            ),
            "get": operation(
                "listRuns",
                "List runs, newest first",
                "runs",
                ok("RunList", "a page of runs"),
                (400,),
                run_filters(),
            ),
        },
        "/api/v1/runs/{run_id}": {
            "parameters": [RUN_ID],
            "get": operation(
                "getRun",
                "A run and its chain of retries/re-executions",
                "runs",
                ok("RunDetail", "the run"),
                (404, 409),
            ),
            "delete": operation(
                "deleteRun",
                "Delete a finished run with its events, logs and outputs (admin)",
                "runs",
                ok("RunDeleted", "the run is gone"),
                (404, 409),
                description="409 run_active unless the run is SUCCESS, FAILURE or "
                "CANCELED; 409 run_has_live_children while a retry or re-execution of "
                "it has not ended. Its ended retries keep naming it as parent and root; "
                "their chain shows it as DELETED.",
            ),
        },
        "/api/v1/runs/{run_id}/events": {
            "parameters": [RUN_ID],
            "get": operation(
                "getRunEvents",
                "The run's event log",
                "runs",
                ok("EventList", "events in seq order"),
                (400, 404, 409),
                (
                    int_query("after", 0, 0, 2**62, after.format("events", "seq")),
                    int_query("limit", 1000, 1, 10_000, "at most this many events"),
                    wait_query(),
                ),
            ),
        },
        "/api/v1/runs/{run_id}/logs": {
            "parameters": [RUN_ID],
            "get": operation(
                "getRunLogs",
                "Compute-log chunks (stdout/stderr) in order",
                "runs",
                ok("LogList", "chunks; `step` null outside any step"),
                (400, 404, 409),
                (
                    query("step", name_pattern(), "only this step's chunks"),
                    int_query("after", 0, 0, 2**62, after.format("chunks", "id")),
                    wait_query(),
                ),
            ),
        },
        "/api/v1/runs/{run_id}/priority": {
            "parameters": [RUN_ID],
            "post": operation(
                "setRunPriority",
                "Reorder a queued run",
                "runs",
                ok("Run", "the run"),
                (404, 409),
                body="SetPriority",
                description="409 not_queued unless the run is QUEUED.",
            ),
        },
        "/api/v1/runs/{run_id}/cancel": {
            "parameters": [RUN_ID],
            "post": operation(
                "cancelRun",
                "Cancel a run",
                "runs",
                ok("RunAccepted", "CANCELED or CANCELING"),
                (404, 409),
                description="A queued run is CANCELED at once; a starting or "
                "started one becomes CANCELING. An ended run gets 409 "
                "already_finished.",
            ),
        },
        "/api/v1/runs/{run_id}/reexecute": {
            "parameters": [RUN_ID],
            "post": operation(
                "reexecuteRun",
                "Re-execute a FAILURE or CANCELED run",
                "runs",
                ok("RunAccepted", "the new run, queued", 201),
                (404, 409),
                body="Reexecute",
                description="Send `{}` for the default strategy "
                "(FROM_FAILURE); another run status gets 409 not_reexecutable.",
            ),
        },
    }


def fleet_operations() -> dict[str, dict[str, Any]]:
    agent = path_param("agent", "an agent id or name")
    return {
        "/api/v1/queue": {
            "get": operation(
                "getQueue",
                "Queued runs in dequeue order, and the limits",
                "queue",
                ok("Queue", "the queue"),
            ),
        },
        "/api/v1/agents": {
            "get": operation(
                "listAgents",
                "Agents and their code locations",
                "agents",
                ok("AgentList", "every agent"),
            ),
        },
        "/api/v1/agents/{agent}/drain": {
            "parameters": [agent],
            "post": operation(
                "drainAgent",
                "No new runs for this agent",
                "agents",
                ok("AgentStatus", "now DRAINING"),
                (404,),
            ),
        },
        "/api/v1/agents/{agent}/undrain": {
            "parameters": [agent],
            "post": operation(
                "undrainAgent",
                "The agent takes runs again",
                "agents",
                ok("AgentStatus", "now ONLINE"),
                (404,),
            ),
        },
        "/api/v1/agents/{agent}/reload": {
            "parameters": [agent],
            "post": operation(
                "reloadAgent",
                "Reload the agent's code locations (or one) now",
                "agents",
                ok("ReloadAccepted", "the agent reloads at its next poll", 202),
                (404,),
                body="Reload",
                body_required=False,
                description="New runs, schedules and sensors use the new version once it "
                "loads; a version that fails to load leaves the last good one serving "
                "(`reload_error` on /agents).",
            ),
        },
        "/api/v1/jobs": {
            "get": operation(
                "listJobs",
                "Jobs of every code location, and load errors",
                "jobs",
                ok("JobList", "jobs and location errors"),
            ),
        },
        "/api/v1/pools": {
            "get": operation(
                "listPools",
                "Concurrency pools: limit, slots in use, holders and waiters in order",
                "pools",
                ok("PoolList", "every pool with a limit or a claim"),
            ),
        },
        "/api/v1/pools/{name}": {
            "parameters": [path_param("name", "a pool name")],
            "put": operation(
                "setPoolLimit",
                "Set a pool's limit (it wins over the config's)",
                "pools",
                ok("PoolLimit", "the limit now in force"),
                (400,),
                body="SetPoolLimit",
                description='`{"limit": N}`: at most N slots in use at once; 0 pauses '
                "the pool. Steps waiting that now fit start at once.",
            ),
            "delete": operation(
                "deletePoolLimit",
                "Forget the limit set through the API",
                "pools",
                ok("PoolLimit", "the limit now in force (config's or default)"),
                (400, 404),
            ),
        },
    }


def alert_operations() -> dict[str, dict[str, Any]]:
    return {
        "/api/v1/alerts": {
            "get": operation(
                "listAlerts",
                "The [[alerts]] rules and the recent deliveries, newest first",
                "alerts",
                ok("Alerts", "rules and deliveries"),
                (400,),
                (int_query("limit", 50, 1, MAX_LIST_LIMIT, "deliveries to return"),),
            ),
        },
    }


def token_operations() -> dict[str, dict[str, Any]]:
    return {
        "/api/v1/tokens": {
            "get": operation(
                "listTokens",
                "Tokens (never a secret or hash)",
                "tokens",
                ok("TokenList", "every token"),
            ),
            "post": operation(
                "createToken",
                "Create a token",
                "tokens",
                ok("CreatedToken", "created; `token` is shown this once", 201),
                (409,),
                body="NewToken",
                description="409 name_taken if the name was ever used.",
            ),
        },
        "/api/v1/tokens/{name}/revoke": {
            "parameters": [path_param("name", "the token's name")],
            "post": operation(
                "revokeToken", "Revoke a token", "tokens", ok("Token", "the revoked token"), (404,)
            ),
        },
    }


def instigator_operations(kind: str) -> dict[str, dict[str, Any]]:
    """The five routes `api.instigator_routes(kind)` registers. The list ignores
    `?location=`; the others take it to pick among locations defining the name."""
    title, base, tag = kind.capitalize(), f"/api/v1/{kind}s", f"{kind}s"
    name, where, found = path_param("name", f"the {kind}'s name"), location_query(kind), (404, 409)

    def switch(verb: str, status: str) -> dict[str, Any]:
        return {
            "parameters": [name],
            "post": operation(
                f"{verb}{title}",
                f"{verb.capitalize()} the {kind}",
                tag,
                ok("InstigatorStatus", f"now {status}"),
                found,
                (where,),
                description="An ORPHANED one gets 409 orphaned.",
            ),
        }

    return {
        base: {
            "get": operation(
                f"list{title}s",
                f"Every {kind}",
                tag,
                ok(f"{title}List", f"every {kind}, orphans included"),
            ),
        },
        base + "/{name}": {
            "parameters": [name],
            "get": operation(
                f"get{title}",
                f"One {kind} with its recent ticks",
                tag,
                ok(f"{title}Detail", f"the {kind}"),
                found,
                (where,),
            ),
        },
        base + "/{name}/ticks": {
            "parameters": [name],
            "get": operation(
                f"list{title}Ticks",
                f"The {kind}'s ticks, newest first",
                tag,
                ok("TickList", "ticks"),
                (400, *found),
                (where, int_query("limit", 50, 1, 1000, "at most this many")),
            ),
        },
        base + "/{name}/start": switch("start", "RUNNING"),
        base + "/{name}/stop": switch("stop", "STOPPED"),
    }


def service_operations() -> dict[str, dict[str, Any]]:
    metrics = {
        "200": {
            "description": "Prometheus text format (no token needed)",
            "content": {"text/plain": {"schema": string()}},
        }
    }
    return {
        OPENAPI_PATH: {
            "get": operation(
                "getOpenApi", "This document", "meta", ok("OpenApiDocument", "OpenAPI 3.1")
            ),
        },
        "/healthz": {
            "get": operation(
                "healthz", "200 while the process serves", "health", ok("Health", "serving")
            ),
        },
        "/api/v1/version": {
            "get": operation(
                "getVersion",
                "The control plane's fleetrun version and agent protocol version",
                "meta",
                ok("Version", "the versions"),
            ),
        },
        "/readyz": {
            "get": operation(
                "readyz",
                "Storage answers and every daemon loop beats",
                "health",
                ok("Ready", "ready"),
                (503,),
            ),
        },
        "/metrics": {"get": operation("metrics", "Prometheus metrics", "health", metrics)},
    }


def apply_access(paths: dict[str, dict[str, Any]]) -> None:
    """Per operation, the role `auth.ROUTE_ACCESS` demands: public routes need no token;
    the others list 401/403 and say which role (this document's own route is public)."""
    for path, item in paths.items():
        for method, op in item.items():
            if method == "parameters":
                continue
            access = ROUTE_ACCESS.get((method.upper(), path))
            if access is None and path == OPENAPI_PATH:
                access = PUBLIC
            if access == PUBLIC:
                op["security"] = []
                continue
            op["x-fleetrun-role"] = access or "unlisted"
            op["responses"].setdefault("401", {"$ref": "#/components/responses/E401"})
            op["responses"].setdefault("403", {"$ref": "#/components/responses/E403"})


# --- the document ----------------------------------------------------------------------

TAGS = (
    "runs",
    "queue",
    "agents",
    "jobs",
    "pools",
    "tokens",
    "schedules",
    "sensors",
    "alerts",
    "health",
    "meta",
)
DESCRIPTION = """\
The fleetrun control plane's JSON API. Times are ISO-8601 UTC, null until known.
Every refusal is `{"error": {"code": "...", "message": "..."}}` with a 4xx status.

Authentication: with `[auth] enabled = true` in control-plane.toml every call except
the public ones (`security: []`) carries `Authorization: Bearer TOKEN`, and
`x-fleetrun-role` names the least role that may make it (viewer < operator < admin).
With auth off (the default) no token is needed. (The web UI's own calls use its
sign-in cookie instead, with the `X-Fleetrun-UI` header.)
"""


def openapi_document(config: ControlPlaneConfig | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document; `config` supplies the [limits] and [auth] in force
    (defaults otherwise), so the bounds it states are the ones the server enforces."""
    config = config or ControlPlaneConfig()
    limits = config.limits
    paths: dict[str, dict[str, Any]] = {
        **run_operations(),
        **fleet_operations(),
        **token_operations(),
        **instigator_operations("schedule"),
        **instigator_operations("sensor"),
        **alert_operations(),
        **service_operations(),
    }
    apply_access(paths)
    bearer = {
        "type": "http",
        "scheme": "bearer",
        "description": "a fleetrun user token (fru_…); required when [auth] enabled = true",
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "fleetrun control plane", "version": "1", "description": DESCRIPTION},
        "tags": [{"name": tag} for tag in TAGS],
        # `{}`: no token at all is fine while auth is off.
        "security": [{"bearer": []}] if config.auth.enabled else [{"bearer": []}, {}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": bearer},
            "responses": {f"E{code}": spec for code, spec in error_responses().items()},
            "schemas": {
                **run_schemas(),
                **request_schemas(limits),
                **fleet_schemas(),
                **token_schemas(),
                **instigator_schemas(),
                **alert_schemas(),
                **misc_schemas(),
            },
        },
    }


async def get_openapi(request: web.Request) -> web.Response:
    """Serve the document for this server's own limits and auth setting."""
    return web.json_response(openapi_document(request.app.get(CONFIG)))


def add_routes(app: web.Application) -> None:
    """Register GET /api/v1/openapi.json (public in auth.ROUTE_ACCESS)."""
    app.router.add_get(OPENAPI_PATH, get_openapi)
