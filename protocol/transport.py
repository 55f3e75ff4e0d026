"""Why a connection to the control plane failed, in words that name the fix.

The agent, its `check-config` and the `fleetrun` CLI each meet the same two setup
mistakes: an `http://` URL for a control plane that speaks TLS (the server hangs up
without a word, which clients report as a disconnect), and a certificate that does
not verify (a private CA nobody named). Each side words them here, alike, naming the
setting to change in its own terms."""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH: the certificate is fine, the name is not.
_HOSTNAME_MISMATCH = 62


def https_url(url: str) -> str:
    """`url` with https:// in place of http://, the rest kept."""
    return "https://" + url.removeprefix("http://")


def speaks_https(url: str, url_setting: str = "") -> str:
    """The line for an http:// URL whose control plane answered a TLS handshake;
    `url_setting` names where the URL came from, when the context does not."""
    where = f" ({url_setting})" if url_setting else ""
    return f"the control plane at {url} speaks HTTPS: use {https_url(url)}{where}"


def certificate_problem(error: ssl.SSLCertVerificationError, ca_setting: str) -> str:
    """The line for a certificate that does not verify; `ca_setting` is how this side
    names its CA bundle (`ca_file in agent.toml`, `--ca-file or FLEETRUN_CA_FILE`)."""
    reason = ": ".join(filter(None, (error.reason, error.verify_message))) or str(error)
    if error.verify_code == _HOSTNAME_MISMATCH:
        return (
            f"the control plane's certificate does not verify ({reason}): use a host name "
            "the certificate names in the URL, or reissue it with this one as a SAN"
        )
    return (
        f"the control plane's certificate does not verify ({reason}): give the CA that "
        f"signed it with {ca_setting}"
    )


def is_plain_http(url: str) -> bool:
    return url.startswith("http://")


def answers_tls(url: str, timeout: float = 5.0) -> bool:
    """Whether the host and port of `url` complete a TLS handshake. Asked only after a
    plain-HTTP request was hung up on: nothing is sent over it, so nothing is verified."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname or "localhost", parts.port or 80
    except ValueError:  # a port that is not a number: no server to ask
        return False
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except OSError:  # ssl.SSLError too: refused, reset, or not TLS
        return False
