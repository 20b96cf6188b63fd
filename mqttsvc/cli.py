"""
The C{mqttsvc} command: apply migrations, print the status summary, or make
any JSON-RPC call.

  mqttsvc migrate --db DSN
  mqttsvc [--url URL] [--token-file PATH] status
  mqttsvc [--url URL] [--token-file PATH] call METHOD [JSON-PARAMS]

It runs outside the service, so it may block; it never starts a reactor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from mqttsvc.config import ConfigError

DEFAULT_URL = "http://127.0.0.1:8780/rpc"

_ICONS = {
    "RUNNING": "🟢",
    "connected": "🟢",
    "connecting": "🟡",
    "disconnected": "🔴",
    "error": "❌",
}


class CallFailed(Exception):
    """
    The call did not produce a result; the message says why.
    """


def rpc_call(url: str, token: str | None, method: str, params: Any = None) -> Any:
    """
    Make one JSON-RPC call and return its result.

    @raise CallFailed: for HTTP, connection and JSON-RPC errors alike.
    """
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        request["params"] = params
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    http_request = urllib.request.Request(
        url, data=json.dumps(request).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(http_request, timeout=10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        raise CallFailed(f"{url} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CallFailed(f"cannot reach mqttsvc at {url}: {reason}") from None
    if "error" in body:
        error = body["error"]
        data = f" {json.dumps(error['data'])}" if "data" in error else ""
        raise CallFailed(f"{method} failed: {error['message']} (code {error['code']}){data}")
    return body["result"]


def format_status(status: dict[str, Any]) -> str:
    """
    The old management command's summary of C{service.status}.
    """
    state = status["state"]
    lines = [
        f"Manager Status: {_ICONS.get(state, '⚪')} {state}",
        f"Total Connections: {status['total']}",
    ]
    for name in ("connected", "connecting", "disconnected", "error"):
        count = status.get(name, 0)
        if count or name in ("connected", "disconnected"):
            lines.append(f"  {_ICONS[name]} {name.upper()}: {count}")
    return "\n".join(lines)


def _token(path: str | None) -> str | None:
    if not path:
        return None
    from mqttsvc.tokens import load_tokens

    return load_tokens(path, check_permissions=False).first()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mqttsvc", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("MQTTSVC_URL", DEFAULT_URL),
        help=f"JSON-RPC URL [env MQTTSVC_URL; default {DEFAULT_URL}]",
    )
    parser.add_argument(
        "--token-file",
        default=os.environ.get("MQTTSVC_RPC_TOKEN_FILE"),
        help="token file; its first token is used [env MQTTSVC_RPC_TOKEN_FILE]",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="apply the database schema migrations")
    migrate.add_argument("--db", default=os.environ.get("MQTTSVC_DB"), help="[env MQTTSVC_DB]")
    commands.add_parser("status", help="print the service status summary")
    call = commands.add_parser("call", help="make a JSON-RPC call and print its result")
    call.add_argument("method")
    call.add_argument("params", nargs="?", help="params as JSON (an object or an array)")
    args = parser.parse_args(argv)

    try:
        if args.command == "migrate":
            from mqttsvc import database

            applied = database.migrate(args.db or "")
            print(f"applied: {', '.join(applied)}" if applied else "the schema is up to date")
        elif args.command == "status":
            print(format_status(rpc_call(args.url, _token(args.token_file), "service.status")))
        else:
            params = json.loads(args.params) if args.params else None
            result = rpc_call(args.url, _token(args.token_file), args.method, params)
            print(json.dumps(result, indent=2, ensure_ascii=False))
    except (CallFailed, ConfigError) as e:
        print(f"mqttsvc: {e}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as e:
        print(f"mqttsvc: params are not JSON: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
