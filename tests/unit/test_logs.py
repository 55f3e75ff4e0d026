"""Redaction of log lines: what `protocol.logs.redact` masks, what it leaves, and that both
formatters apply it to message, arguments and exceptions of any logger."""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest
from aiohttp import http_exceptions

from protocol.logs import JsonLines, TextLines, redact

TOKEN = "fru_0123456789abcdef_S3cr3t-Part_with-underscores"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"refused {TOKEN} twice", "refused fru_0123456789abcdef_*** twice"),
        (f"cookie=x;{TOKEN.replace('fru', 'fra')};", "cookie=***"),
        ("FRA_0123456789ABCDEF_Secret here", "FRA_0123456789ABCDEF_*** here"),
        ("Authorization: Basic dXNlcjpwYXNz\r\nHost: x", "Authorization: ***\r\nHost: x"),
        ("{'authorization': 'Bearer x y z', 'host': 'h'}", "{'authorization': ***"),
        ("sent Bearer opaque.jwt.value to x", "sent Bearer *** to x"),
        ("Set-Cookie: fleetrun_session=abc; HttpOnly", "Set-Cookie: ***"),
        ("postgresql://fleet:S3cret@db:5432/x", "postgresql://fleet:***@db:5432/x"),
        ("'postgres://u:p@ss/w0rd@h/db?x=1'", "'postgres://u:***@h/db?x=1'"),
        ("postgresql://u:pw@h1:5432,h2:5432/db", "postgresql://u:***@h1:5432,h2:5432/db"),
        ("redis://:pw@cache/0 and http://a:b@c", "redis://:***@cache/0 and http://a:***@c"),
        ("db?sslmode=require&password=abc&x=1", "db?sslmode=require&password=***&x=1"),
        ("host=h sslpassword=abc dbname=d", "host=h sslpassword=*** dbname=d"),
    ],
)
def test_secrets_are_masked(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # masking twice changes nothing


@pytest.mark.parametrize(
    "text",
    [
        "run 1234abcd launched on agent worker-1 (lease 42)",
        "control plane listening on http://127.0.0.1:8470 (storage postgresql://u@h/db)",
        "password authentication failed for user 'fleet'",
        "sqlite:////var/lib/fleetrun/fleetrun.db",
        "fru_not-a-token and a bearer",
    ],
)
def test_lines_without_secrets_are_left_alone(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize(
    "hostile",
    [
        "://a:" * 200_000,
        "bearer " * 150_000,
        "fru_0123456789abcdef_" * 50_000,
        "Authorization:" * 70_000,
        "://" + "a" * 1_000_000,
    ],
)
def test_redaction_takes_linear_time_on_hostile_lines(hostile: str) -> None:
    started = time.perf_counter()
    redact(hostile)
    assert time.perf_counter() - started < 2.0  # quadratic would take minutes


def record_with(exc: BaseException, msg: str, *args: object) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, msg, args, info)


@pytest.mark.parametrize("formatter", [TextLines(), JsonLines()])
def test_formatters_mask_message_arguments_and_exceptions(formatter: logging.Formatter) -> None:
    line = formatter.format(record_with(ValueError(f"bad {TOKEN}"), "from %s", TOKEN))
    assert "S3cr3t" not in line and line.count("fru_0123456789abcdef_***") == 2


@pytest.mark.parametrize("formatter", [TextLines(), JsonLines()])
def test_an_http_parse_error_is_logged_without_the_request_text(
    formatter: logging.Formatter,
) -> None:
    # aiohttp's C parser quotes the offending line; an obs-fold line may hold only a secret
    quoted = "Unexpected whitespace after header value:\n\n  b' OnlyTheSecretPart'\n  ^"
    line = formatter.format(record_with(http_exceptions.BadHttpMessage(quoted), "Error"))
    assert "OnlyTheSecretPart" not in line
    text = json.loads(line)["exception"] if isinstance(formatter, JsonLines) else line
    assert "BadHttpMessage: 400 Unexpected whitespace after header value (the request's" in text
    # the pure-Python parser puts the raw request target in the message itself
    raw = http_exceptions.InvalidURLError("/runs?key=Plain Secret\x01")
    assert "Plain Secret" not in formatter.format(record_with(raw, "Error"))
