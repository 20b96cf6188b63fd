"""
The C{mqttsvc} command: operate a running mqttsvc over its JSON-RPC API,
or apply the database migrations.

  mqttsvc [--url URL] [--token-file PATH] [--json] status
  mqttsvc ... cluster
  mqttsvc ... sites [--status STATUS] [PAGING]
  mqttsvc ... site start|stop|restart|status SITE
  mqttsvc ... devices SITE [--kind KIND] [--status STATUS] [PAGING]
  mqttsvc ... topics SITE [--prefix PREFIX] [PAGING]
  mqttsvc ... deadletters [--site SITE] [PAGING]
  mqttsvc ... call METHOD [JSON-PARAMS]
  mqttsvc migrate --db DSN

PAGING is C{--limit N} (items in the page), C{--cursor CURSOR} (the page
that a hint on stderr names) or C{--all} (every page, one after the other).

Output is a table or summary for people, or JSON with C{--json}.  A failure
is one line on stderr, C{mqttsvc: REASON}, with exit status 1 when the call
failed and 2 when the command line was wrong.

It runs outside the service and may block; it never starts a reactor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from mqttsvc.config import ConfigError
from mqttsvc.rpcclient import (
    DEFAULT_URL,
    AuthenticationError,
    MqttSvcClient,
    MqttSvcError,
    Page,
    RPCError,
)

_ICONS = {
    "RUNNING": "🟢",
    "connected": "🟢",
    "connecting": "🟡",
    "disconnected": "🔴",
    "error": "❌",
}


class UsageError(Exception):
    """
    The command line cannot be carried out as given (exit status 2).
    """


# --- formatting ---------------------------------------------------------------


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
    if "instances" in status:
        # With --cluster: which live instance runs how many of them.
        lines.append(f"Instances: {len(status['instances'])}")
        lines.extend(
            f"  {m['instance']}: {len(m['sites'])} sites, renewed {m['renewed_at']}"
            for m in status["instances"]
        )
    return "\n".join(lines)


def format_cluster(status: dict[str, Any]) -> str:
    """
    C{cluster.status} as a table, one live instance a line.
    """
    if not status["instances"]:
        alone = "" if status["cluster"] else f" ({status['instance']} runs without --cluster)"
        return f"no instance runs with --cluster{alone}"
    return format_table(
        ["INSTANCE", "SITES", "RENEWED", "STARTED"],
        [
            [m["instance"], len(m["sites"]), m["renewed_at"], m["started_at"]]
            for m in status["instances"]
        ],
    )


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """
    Left-aligned columns, two spaces apart, under upper-case headers; None
    is shown as C{-}.
    """
    cells = [[_text(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def format_sites(sites: list[dict[str, Any]]) -> str:
    """
    C{site.list} as a table, one site a line.
    """
    if not sites:
        return "no sites"
    return format_table(
        ["SITE", "BROKER", "ENABLED", "STATUS", "STATE", "RETRIES", "LAST ERROR"],
        [
            [
                s["site_id"],
                f"{s['host']}:{s['port']}",
                s["is_enabled"],
                s["status"]["status"],
                s["status"]["state"],
                s["status"]["mqtt_retry_count"],
                s["status"]["last_error"],
            ]
            for s in sites
        ],
    )


def format_site_status(status: dict[str, Any]) -> str:
    """
    C{site.status} as one labelled line per aspect.
    """
    icon = _ICONS.get(status["status"], "⚪")
    subscriptions = ", ".join(
        f"{s['topic']} ({s.get('reason') or 'granted'})"
        if s["granted"]
        else f"{s['topic']} (refused: {s.get('reason') or 'no reason given'})"
        for s in status.get("subscriptions", [])
    )
    items = [
        ("site", status["site_id"]),
        ("status", f"{icon} {status['status']}"),
        ("state", f"{status['state']} since {_text(status['state_since'])}"),
        ("enabled", _text(status["is_enabled"])),
        ("last connected", _text(status["last_connected_at"])),
        (
            "retries",
            f"{status['mqtt_retry_count']}, next at {_text(status['mqtt_next_retry'])}",
        ),
        ("last error", _text(status["last_error"])),
        ("topics", ", ".join(status.get("topics_list", [])) or "-"),
        ("subscriptions", subscriptions or "-"),
        (
            "messages",
            f"{status['messages_received']} received, {status['messages_rejected']} rejected, "
            f"last at {_text(status['last_message_at'])}",
        ),
    ]
    width = max(len(label) for label, _ in items)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in items)


def format_devices(devices: list[dict[str, Any]]) -> str:
    """
    C{device.list} as a table.
    """
    if not devices:
        return "no devices"
    return format_table(
        ["KIND", "DEVICE", "GATEWAY", "STATUS", "REPORTED", "LAST SEEN"],
        [
            [
                d["kind"],
                d["device_id"],
                d.get("gateway_id"),
                d["status"],
                d.get("reported_status"),
                d.get("last_seen_at"),
            ]
            for d in devices
        ],
    )


def format_topics(topics: list[dict[str, Any]]) -> str:
    """
    C{topic.list} as a table.
    """
    if not topics:
        return "no topics"
    return format_table(
        ["TOPIC", "MESSAGES", "LAST SEEN"],
        [[t["topic_path"], t["message_count"], t["last_seen_at"]] for t in topics],
    )


def format_deadletters(letters: list[dict[str, Any]]) -> str:
    """
    C{deadletter.list} as a table (payloads only with C{--json}).
    """
    if not letters:
        return "no dead letters"
    return format_table(
        ["ID", "SITE", "RECEIVED", "TOPIC", "REASON"],
        [[d["id"], d["site_id"], d["received_at"], d["topic"], d["reason"]] for d in letters],
    )


def describe(error: MqttSvcError) -> str:
    """
    One line saying why a call failed.
    """
    if isinstance(error, RPCError):
        data = f" {json.dumps(error.data, ensure_ascii=False)}" if error.data is not None else ""
        return f"{error.method} failed: {error.message} (code {error.code}){data}"
    if isinstance(error, AuthenticationError):
        return f"{error}; give the right token with --token-file or MQTTSVC_RPC_TOKEN_FILE"
    return str(error)


# --- the command line ---------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other failure; --help has the usage.
        self.exit(2, f"mqttsvc: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """
    The argument parser of the C{mqttsvc} command.
    """
    parser = _Parser(
        prog="mqttsvc",
        description="Operate a running mqttsvc over its JSON-RPC API, or migrate its database.",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("MQTTSVC_URL", DEFAULT_URL),
        help=f"JSON-RPC URL [env MQTTSVC_URL; default {DEFAULT_URL}]",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        default=os.environ.get("MQTTSVC_RPC_TOKEN_FILE"),
        help="token file; its first token is used [env MQTTSVC_RPC_TOKEN_FILE]",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="seconds to wait for an answer [default 10]",
    )
    json_help = "print the result as JSON"
    parser.add_argument("--json", action="store_true", help=json_help)
    # --json is also accepted after the command; SUPPRESS keeps a subcommand
    # from resetting a --json given before it.
    after = _Parser(add_help=False)
    after.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", parents=[after], help="print the service's status summary")
    commands.add_parser(
        "cluster", parents=[after], help="list the live instances and how many sites each owns"
    )
    paged = _Parser(add_help=False)
    paged.add_argument("--limit", type=_positive_int, metavar="N", help="items in the page")
    paged.add_argument("--cursor", metavar="CURSOR", help="the page to show, as a hint named it")
    paged.add_argument("--all", action="store_true", help="every page, one after the other")
    sites = commands.add_parser(
        "sites", parents=[after, paged], help="list the sites with their status"
    )
    sites.add_argument("--status", choices=("connected", "connecting", "disconnected", "error"))

    site = commands.add_parser("site", help="start, stop, restart a site or show its status")
    actions = site.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("start", "enable a site and connect it now"),
        ("stop", "disable a site and disconnect it cleanly"),
        ("restart", "enable a site, reset its retries and reconnect now"),
        ("status", "show a site's connection status"),
    ):
        one = actions.add_parser(action, parents=[after], help=text)
        one.add_argument("site_id", metavar="SITE")

    devices = commands.add_parser("devices", parents=[after, paged], help="list a site's devices")
    devices.add_argument("site_id", metavar="SITE")
    devices.add_argument("--kind", choices=("gateway", "datalogger", "sensor"))
    devices.add_argument("--status", choices=("online", "offline", "unknown"))

    topics = commands.add_parser(
        "topics", parents=[after, paged], help="list the topics a site's broker delivered"
    )
    topics.add_argument("site_id", metavar="SITE")
    topics.add_argument("--prefix", help="only the topics that start with it")

    deadletters = commands.add_parser(
        "deadletters", parents=[after, paged], help="list messages that could not be processed"
    )
    deadletters.add_argument("--site", dest="site_id", metavar="SITE")

    call = commands.add_parser("call", parents=[after], help="make any JSON-RPC call")
    call.add_argument("method", metavar="METHOD")
    call.add_argument(
        "params", nargs="?", metavar="JSON", help="params as JSON (an object or an array)"
    )

    migrate = commands.add_parser("migrate", help="apply the database schema migrations")
    migrate.add_argument(
        "--db", metavar="DSN", default=os.environ.get("MQTTSVC_DB"), help="[env MQTTSVC_DB]"
    )
    commands.add_parser(
        "generate-key", help="print a new key for --secret-key-file (store it with mode 600)"
    )
    rotate = commands.add_parser(
        "rotate-key", help="re-encrypt every stored broker password from one key to another"
    )
    rotate.add_argument("--old", metavar="FILE", required=True, help="the key in use now")
    rotate.add_argument("--new", metavar="FILE", required=True, help="the key to use from now on")
    rotate.add_argument(
        "--db", metavar="DSN", default=os.environ.get("MQTTSVC_DB"), help="[env MQTTSVC_DB]"
    )
    return parser


def _rotate_key(args: argparse.Namespace) -> str:
    from mqttsvc.db import schema as database
    from mqttsvc.db.secrets import SecretError, load_key

    if not args.db:
        raise UsageError("rotate-key: no database given (use --db or MQTTSVC_DB)")
    old, new = load_key(args.old), load_key(args.new)
    try:
        count = database.rotate_key(args.db, old, new)
    except SecretError as e:
        raise ConfigError("old", f"{e}; nothing was changed") from None
    return f"re-encrypted {count} passwords; restart mqttsvc with --secret-key-file {args.new}"


def _client(args: argparse.Namespace) -> MqttSvcClient:
    token = None
    if args.token_file:
        from mqttsvc.control.tokens import load_tokens

        try:
            token = load_tokens(args.token_file, check_permissions=False).first()
        except ConfigError as e:
            raise UsageError(str(e)) from None
    try:
        return MqttSvcClient(args.url, token=token, timeout=args.timeout)
    except ValueError as e:
        raise UsageError(f"--url: {e}") from None


def _params(text: str | None) -> dict[str, Any] | list[Any] | None:
    if text is None:
        return None
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"params are not JSON: {e}") from None
    if not isinstance(params, dict | list):
        raise UsageError("params must be a JSON object or array")
    return params


def _run(args: argparse.Namespace) -> tuple[Any, Callable[[Any], str]]:
    """
    Carry out the command; return its result and how to show it to people.
    """
    client = _client(args)
    if args.command == "status":
        return client.service_status(), format_status
    if args.command == "cluster":
        return client.cluster_status(), format_cluster
    if args.command == "sites":
        return _listed(
            args,
            lambda: client.iter_sites(args.status),
            lambda: client.site_list(args.status, cursor=args.cursor, limit=args.limit),
        ), format_sites
    if args.command == "site":
        action = {
            "start": client.site_start,
            "stop": client.site_stop,
            "restart": client.site_restart,
            "status": client.site_status,
        }[args.action]
        return action(args.site_id), format_site_status
    if args.command == "devices":
        return _listed(
            args,
            lambda: client.iter_devices(args.site_id, args.kind, args.status),
            lambda: client.device_list(
                args.site_id, args.kind, args.status, cursor=args.cursor, limit=args.limit
            ),
        ), format_devices
    if args.command == "topics":
        return _listed(
            args,
            lambda: client.iter_topics(args.site_id, args.prefix),
            lambda: client.topic_list(
                args.site_id, args.prefix, cursor=args.cursor, limit=args.limit
            ),
        ), format_topics
    if args.command == "deadletters":
        return _listed(
            args,
            lambda: client.iter_deadletters(args.site_id),
            lambda: client.deadletter_list(args.site_id, args.limit, cursor=args.cursor),
        ), format_deadletters
    assert args.command == "call"
    return client.call(args.method, _params(args.params)), _as_json


def _listed(
    args: argparse.Namespace,
    every: Callable[[], Iterator[Any]],
    one_page: Callable[[], Page[Any]],
) -> list[Any]:
    """
    Every item with C{--all}, else the page asked for (a L{Page}, whose
    C{next_cursor} L{main} names in a hint).
    """
    if args.all:
        if args.cursor is not None or args.limit is not None:
            raise UsageError("--all reads every page: give it without --cursor and --limit")
        return list(every())
    return one_page()


def _as_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _migrate(db: str | None) -> str:
    if not db:
        raise UsageError("migrate: no database given (use --db or MQTTSVC_DB)")
    from mqttsvc.db import schema as database

    applied = database.migrate(db)
    return f"applied: {', '.join(applied)}" if applied else "the schema is up to date"


def main(argv: list[str] | None = None) -> int:
    """
    Run the C{mqttsvc} command; return its exit status.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "migrate":
            print(_migrate(args.db))
        elif args.command == "generate-key":
            from mqttsvc.db.secrets import Secrets

            print(Secrets.generate_key().decode())
        elif args.command == "rotate-key":
            print(_rotate_key(args))
        else:
            result, human = _run(args)
            print(_as_json(result) if args.json else human(result))
            if isinstance(result, Page) and result.next_cursor is not None:
                print(
                    f"mqttsvc: {len(result)} shown, more follow: add --cursor "
                    f"{result.next_cursor} for the next page, or --all for every one",
                    file=sys.stderr,
                )
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (e.g. `head`) has gone; don't complain about it at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UsageError as e:
        print(f"mqttsvc: {e}", file=sys.stderr)
        return 2
    except MqttSvcError as e:
        print(f"mqttsvc: {describe(e)}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"mqttsvc: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
