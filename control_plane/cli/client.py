"""The CLI's connection to a control plane: one JSON request per call, errors in one line."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from protocol.logs import redact
from protocol.transport import answers_tls, certificate_problem, is_plain_http, speaks_https

CA_SETTING = "--ca-file or FLEETRUN_CA_FILE"
URL_SETTING = "--url or FLEETRUN_URL"


def one_line(text: Any) -> str:
    """Table cells and error lines stay one line even when a message has several."""
    lines = str(text).strip().splitlines()
    return lines[0] + (" …" if len(lines) > 1 else "") if lines else ""


class CliError(Exception):
    """A failure to report to the user in one line; exit code 1."""


class ApiClient:
    """A small synchronous client of the JSON API, for the CLI."""

    def __init__(self, url: str, token: str | None, ca_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.where = redact(self.url)  # as messages show it: a password in --url is masked
        self.token = token
        self.context = None
        if self.url.startswith("https://"):
            try:
                self.context = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise CliError(f"cannot use --ca-file {ca_file}: {exc}") from None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: list[tuple[str, str]] | None = None,
        wait: float = 30.0,
        prefix: str = "/api/v1",
    ) -> Any:
        """The decoded JSON answer; any failure becomes one CliError line naming the cause."""
        if not self.url.startswith(("http://", "https://")):
            raise CliError(
                f"--url / FLEETRUN_URL must start with http:// or https://, got {self.where!r}"
            )
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{prefix}{path}{query}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=wait + 30, context=self.context) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise CliError(self._http_error(exc)) from None
        except TimeoutError:
            raise CliError(
                f"no answer from the control plane at {self.where} within {wait + 30:g} s"
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise CliError(self._unreachable(getattr(exc, "reason", exc))) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(
                f"{self.where}{prefix}{path} did not answer JSON; is {self.where} a "
                "fleetrun control plane?"
            ) from None

    def _unreachable(self, reason: object) -> str:
        """Why no answer came, with the fix for the two setup mistakes a retry never
        cures: a certificate that does not verify, http:// to a control plane on TLS."""
        if isinstance(reason, ssl.SSLCertVerificationError):
            return f"cannot reach {self.where}: {certificate_problem(reason, CA_SETTING)}"
        hung_up = isinstance(reason, ConnectionResetError | http.client.BadStatusLine)
        if hung_up and is_plain_http(self.url) and answers_tls(self.url):
            return speaks_https(self.where, URL_SETTING)
        return f"cannot reach the control plane at {self.where}: {reason}"

    def _http_error(self, exc: urllib.error.HTTPError) -> str:
        """`message (status code)` from the API's error body, plus a hint for a missing token."""
        try:
            err = json.loads(exc.read())["error"]
            text = f"{one_line(err['message'])} ({exc.code} {err['code']})"
        except (ValueError, KeyError, TypeError, OSError):
            text = f"HTTP {exc.code} {exc.reason} from {self.where}"
        if exc.code == 401 and not self.token:
            text += "; pass --token or set FLEETRUN_TOKEN"
        return text


DEFAULT_URL = "http://127.0.0.1:8470"
