"""Commands that run or administer an instance: serve, migrate, tokens, completion."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import shtab

from control_plane.cli.client import ApiClient, CliError
from control_plane.cli.render import (
    emit,
    seg,
    table,
)
from control_plane.storage.errors import SchemaTooNew, StorageError
from protocol.logs import redact
from protocol.schema import ConfigError


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from control_plane.config import load_control_plane_config
    from control_plane.http.app import serve_until_signal
    from protocol.logs import configure_logging

    try:
        config = load_control_plane_config(args.config)
    except ConfigError as exc:
        return _config_fail(exc)
    configure_logging(args.log_format)
    try:
        asyncio.run(serve_until_signal(config))
    except KeyboardInterrupt:
        pass
    except SchemaTooNew as exc:
        return _fail(f"cannot serve: {exc}", code=2)
    except (OSError, StorageError) as exc:
        return _fail(f"cannot serve: {exc}")
    return 0


def _fail(message: str, code: int = 1) -> int:
    """One line on stderr, masked: errors about storage may quote its URL."""
    print(f"fleetrun: {redact(message)}", file=sys.stderr)
    return code


def _config_fail(exc: ConfigError) -> int:
    """Exit 2 with a line for each problem of the config file, so all are fixed at once."""
    for line in exc.lines:
        _fail(f"config error: {line}")
    return 2


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply schema migrations, or (--from) copy a whole instance into a new database."""
    import asyncio

    from control_plane.config import load_control_plane_config
    from control_plane.storage.transfer import TransferError, copy_instance, migrate_schema

    try:
        dest = args.to or load_control_plane_config(args.config).storage.url
    except ConfigError as exc:
        return _config_fail(exc)
    try:
        if args.source is None:
            before, after = asyncio.run(migrate_schema(dest))
            change = f"{before} -> {after}" if before != after else f"{after} (up to date)"
            emit(
                args,
                {"storage": redact(dest), "from_version": before, "to_version": after},
                f"{redact(dest)}: schema version {change}",
            )
            return 0
        copied = asyncio.run(
            copy_instance(
                args.source,
                dest,
                None
                if args.json
                else lambda table, n: print(f"{table}: {n} rows", file=sys.stderr),
            )
        )
        emit(
            args,
            {"from": redact(args.source), "to": redact(dest), "rows": copied},
            f"copied {sum(copied.values())} rows from {redact(args.source)} to {redact(dest)}",
        )
        return 0
    except SchemaTooNew as exc:
        return _fail(f"migrate: {exc}", code=2)
    except (TransferError, StorageError, ValueError, OSError) as exc:
        return _fail(f"migrate: {exc}")


def _token_storage(config_path: str) -> Any:
    from control_plane.config import load_control_plane_config
    from control_plane.storage import open_storage

    try:
        return open_storage(load_control_plane_config(config_path).storage.url)
    except ConfigError as exc:
        raise CliError("; ".join(f"config error: {line}" for line in exc.lines)) from None


def _with_storage(config_path: str, action: Any) -> Any:
    """Run `action(storage)` against the instance's database (no control plane needed)."""
    import asyncio

    async def run() -> Any:
        storage = _token_storage(config_path)
        await storage.open()
        try:
            return await action(storage)
        finally:
            await storage.close()

    try:
        return asyncio.run(run())
    except StorageError as exc:  # the database is unreachable, or a token name is taken
        raise CliError(str(exc)) from None


def _print_tokens(args: argparse.Namespace, tokens: list[dict[str, Any]]) -> int:
    rows = [
        [
            t["name"],
            t["kind"],
            t["role"] or "",
            "revoked" if t["revoked"] else "active",
            t["create_time"],
            t["last_used"] or "never",
        ]
        for t in tokens
    ]
    emit(
        args,
        {"tokens": tokens},
        table(rows, ["NAME", "KIND", "ROLE", "STATE", "CREATED", "LAST USED"]),
    )
    return 0


def cmd_tokens_create(args: argparse.Namespace, client: ApiClient) -> int:
    """Prints the token once; only its salted hash is stored."""
    from control_plane.http.tokens import TokenRequestError, create_token

    role = args.role if args.kind == "user" else None
    if args.kind == "user" and role is None:
        raise CliError("a user token needs --role viewer|operator|admin")
    if args.config:
        try:
            token, record = _with_storage(
                args.config,
                lambda storage: create_token(storage, args.name, args.kind, role, time.time()),
            )
        except TokenRequestError as exc:
            raise CliError(str(exc)) from None
        data = {**record.to_json(), "token": token}
    else:
        data = client.request(
            "POST", "/tokens", {"name": args.name, "kind": args.kind, "role": role}
        )
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(data["token"])
        print(
            f"(token {data['name']}, {data['kind']}{', ' + role if role else ''}: shown "
            "once; store it now)",
            file=sys.stderr,
        )
    return 0


def cmd_tokens_list(args: argparse.Namespace, client: ApiClient) -> int:
    if args.config:
        records = _with_storage(args.config, lambda storage: storage.list_tokens())
        return _print_tokens(args, [r.to_json() for r in records])
    return _print_tokens(args, client.request("GET", "/tokens")["tokens"])


def cmd_tokens_revoke(args: argparse.Namespace, client: ApiClient) -> int:
    """A running control plane refuses the token within a second."""
    if args.config:
        record = _with_storage(args.config, lambda s: s.revoke_token(args.name, time.time()))
        if record is None:
            raise CliError(f"no live token named {args.name!r}")
        data = record.to_json()
    else:
        data = client.request("POST", f"/tokens/{seg(args.name)}/revoke")
    emit(args, data, f"revoked token {data['name']}")
    return 0


def cmd_completion(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(shtab.complete(parser, shell=args.shell), end="")
    return 0
