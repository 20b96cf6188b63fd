"""
C{twistd mqttsvc}: command-line options and the service tree they build.

This is one of the few modules that touch the real reactor: the plugin and
C{tac/service.tac} call L{makeService}, which passes the reactor down.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from twisted.application import strports
from twisted.application.service import Application, IService
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from mqttsvc.config import (
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_MAX_DEVICES,
    DEFAULT_MAX_PAYLOAD,
    MAX_DEVICES_LIMIT,
    ConfigError,
)
from mqttsvc.control.health import readiness
from mqttsvc.control.httpserver import (
    MAX_CONNECTIONS,
    MIN_CONNECTIONS,
    REQUEST_TIMEOUT,
    BoundedSite,
    Limits,
    default_max_connections,
    descriptor_limit,
)
from mqttsvc.control.manhole import (
    load_host_key,
    makeManholeService,
    read_authorized_keys,
    tree_namespace,
)
from mqttsvc.control.metrics import Metrics
from mqttsvc.control.rpc.methods import control_plane
from mqttsvc.control.sse import HEARTBEAT, MAX_STREAMS, EventStreams
from mqttsvc.control.tokens import Tokens, load_tokens
from mqttsvc.control.web import WebApp, access_log_line
from mqttsvc.db import schema as database
from mqttsvc.db.notifications import ConfigListener
from mqttsvc.db.secrets import load_key
from mqttsvc.db.store import Store
from mqttsvc.events.alerts import LIMIT, AlertDispatcher, AlertRules, describe_url, http_post
from mqttsvc.events.hub import EventHub
from mqttsvc.ingest.service import Ingest
from mqttsvc.mqtt.connection_check import ConnectionTests
from mqttsvc.mqtt.transport import ConnectThreads
from mqttsvc.runtime import logs
from mqttsvc.runtime.descriptors import DescriptorBudget, raise_soft_limit
from mqttsvc.runtime.heap import freeze_startup_heap
from mqttsvc.runtime.root import SHUTDOWN_DEADLINE, RootService
from mqttsvc.sites.site import PROBE_INTERVAL, PROVING_TIME
from mqttsvc.sites.supervisor import MONITOR_INTERVAL, SiteSupervisor

DEFAULT_RPC = "tcp:8780:interface=127.0.0.1"
#: Relative to the working directory (twistd --rundir), beside twistd.pid.
DEFAULT_MANHOLE_HOST_KEY = "mqttsvc-manhole-host-key"

log = Logger()

_ENV = {
    "db": "MQTTSVC_DB",
    "rpc": "MQTTSVC_RPC",
    "rpc-token-file": "MQTTSVC_RPC_TOKEN_FILE",
    "instance": "MQTTSVC_INSTANCE",
    "monitor-interval": "MQTTSVC_MONITOR_INTERVAL",
    "probe-interval": "MQTTSVC_PROBE_INTERVAL",
    "proving-time": "MQTTSVC_PROVING_TIME",
    "shutdown-deadline": "MQTTSVC_SHUTDOWN_DEADLINE",
    "max-payload": "MQTTSVC_MAX_PAYLOAD",
    "max-clock-skew": "MQTTSVC_MAX_CLOCK_SKEW",
    "max-devices": "MQTTSVC_MAX_DEVICES",
    "batch-size": "MQTTSVC_BATCH_SIZE",
    "batch-delay-ms": "MQTTSVC_BATCH_DELAY_MS",
    "write-connections": "MQTTSVC_WRITE_CONNECTIONS",
    "log-format": "MQTTSVC_LOG_FORMAT",
    "log-file": "MQTTSVC_LOG_FILE",
    "log-max-bytes": "MQTTSVC_LOG_MAX_BYTES",
    "log-keep": "MQTTSVC_LOG_KEEP",
    "secret-key-file": "MQTTSVC_SECRET_KEY_FILE",
    "manhole": "MQTTSVC_MANHOLE",
    "manhole-keys": "MQTTSVC_MANHOLE_KEYS",
    "manhole-host-key": "MQTTSVC_MANHOLE_HOST_KEY",
    "events-heartbeat": "MQTTSVC_EVENTS_HEARTBEAT",
    "alert-limit": "MQTTSVC_ALERT_LIMIT",
    "events-max-streams": "MQTTSVC_EVENTS_MAX_STREAMS",
    "http-max-connections": "MQTTSVC_HTTP_MAX_CONNECTIONS",
    "http-request-timeout": "MQTTSVC_HTTP_REQUEST_TIMEOUT",
}

#: Defaults of the numeric options, as their text would be given.
_NUMBERS = {
    "monitor-interval": str(MONITOR_INTERVAL),
    "probe-interval": str(PROBE_INTERVAL),
    "proving-time": f"{PROVING_TIME:g}",
    "shutdown-deadline": f"{SHUTDOWN_DEADLINE:g}",
    "max-payload": str(DEFAULT_MAX_PAYLOAD),
    "max-clock-skew": f"{DEFAULT_MAX_CLOCK_SKEW:g}",
    "max-devices": str(DEFAULT_MAX_DEVICES),
    "batch-size": "1000",
    "batch-delay-ms": "10",
    "write-connections": "2",
    "log-max-bytes": str(10 * 1024 * 1024),
    "log-keep": "10",
    "events-heartbeat": f"{HEARTBEAT:g}",
    "alert-limit": str(LIMIT),
    "events-max-streams": str(MAX_STREAMS),
    "http-max-connections": str(default_max_connections(descriptor_limit())),
    "http-request-timeout": f"{REQUEST_TIMEOUT:g}",
}


class Options(usage.Options):
    """
    Options of C{twistd mqttsvc}; each falls back to an environment
    variable.
    """

    synopsis = (
        "[--db DSN] [--rpc ENDPOINT] [--rpc-token-file PATH] [--migrate] "
        "[--manhole ENDPOINT --manhole-keys PATH]"
    )
    optParameters = [
        ["db", None, None, "PostgreSQL connection string [env MQTTSVC_DB]."],
        [
            "rpc",
            None,
            None,
            f"JSON-RPC listener, a strports description [env MQTTSVC_RPC; default {DEFAULT_RPC}].",
        ],
        [
            "rpc-token-file",
            None,
            None,
            "File of 'NAME TOKEN' lines accepted as bearer tokens [env MQTTSVC_RPC_TOKEN_FILE].",
        ],
        [
            "instance",
            None,
            None,
            "This instance's name in MQTT client ids; keep it stable across restarts "
            "[env MQTTSVC_INSTANCE; default: the host name].",
        ],
        [
            "monitor-interval",
            None,
            None,
            f"Seconds between full reconciliations of the sites "
            f"[env MQTTSVC_MONITOR_INTERVAL; default {MONITOR_INTERVAL:g}].",
        ],
        [
            "probe-interval",
            None,
            None,
            f"Seconds between connection probes of a site in error "
            f"[env MQTTSVC_PROBE_INTERVAL; default {PROBE_INTERVAL:g}].",
        ],
        [
            "proving-time",
            None,
            None,
            f"Seconds a connection must stay up, subscribed and heard from, before it counts as "
            f"a success and resets the retry count [env MQTTSVC_PROVING_TIME; default "
            f"{PROVING_TIME:g}].",
        ],
        [
            "shutdown-deadline",
            None,
            None,
            f"Seconds after SIGTERM by which the process exits, finished stopping or not "
            f"(the brokers redeliver what was not acknowledged) "
            f"[env MQTTSVC_SHUTDOWN_DEADLINE; default {SHUTDOWN_DEADLINE:g}].",
        ],
        [
            "max-payload",
            None,
            None,
            f"Largest payload processed, in bytes; larger ones are dead letters "
            f"[env MQTTSVC_MAX_PAYLOAD; default {DEFAULT_MAX_PAYLOAD}].",
        ],
        [
            "max-clock-skew",
            None,
            None,
            f"Seconds a message's ts may be ahead of its receive time; further ahead it is a "
            f"dead letter [env MQTTSVC_MAX_CLOCK_SKEW; default {DEFAULT_MAX_CLOCK_SKEW:g}].",
        ],
        [
            "max-devices",
            None,
            None,
            f"Devices a site may have unless its max_devices says otherwise; a new device id "
            f"beyond it is a dead letter [env MQTTSVC_MAX_DEVICES; default {DEFAULT_MAX_DEVICES}].",
        ],
        [
            "batch-size",
            None,
            None,
            "Write a batch once this many messages wait [env MQTTSVC_BATCH_SIZE; default 1000].",
        ],
        [
            "batch-delay-ms",
            None,
            None,
            "...or once the oldest has waited this many milliseconds "
            "[env MQTTSVC_BATCH_DELAY_MS; default 10].",
        ],
        [
            "write-connections",
            None,
            None,
            "Database connections writing batches side by side, each for its share of the "
            "sites [env MQTTSVC_WRITE_CONNECTIONS; default 2].",
        ],
        [
            "manhole",
            None,
            None,
            "SSH manhole listener, a strports description; bind it to loopback, e.g. "
            "tcp:2222:interface=127.0.0.1 (without interface= it listens on every "
            "interface) [env MQTTSVC_MANHOLE; default: no manhole].",
        ],
        [
            "manhole-keys",
            None,
            None,
            "Authorized keys file of the SSH keys that may log in to the manhole; "
            "required with --manhole [env MQTTSVC_MANHOLE_KEYS].",
        ],
        [
            "manhole-host-key",
            None,
            None,
            "The manhole's SSH host key, generated with mode 0600 if missing "
            f"[env MQTTSVC_MANHOLE_HOST_KEY; default ./{DEFAULT_MANHOLE_HOST_KEY}].",
        ],
    ]
    optParameters += [
        [
            "secret-key-file",
            None,
            None,
            "Key that encrypts broker passwords at rest (make one with `mqttsvc generate-key`; "
            "mode 600) [env MQTTSVC_SECRET_KEY_FILE].",
        ],
        [
            "log-format",
            None,
            None,
            "text or json (one JSON object a line) [env MQTTSVC_LOG_FORMAT; default text].",
        ],
        [
            "log-file",
            None,
            None,
            "Log to this file, rotated by size, instead of standard output "
            "(twistd's --logfile works too) [env MQTTSVC_LOG_FILE].",
        ],
        [
            "log-max-bytes",
            None,
            None,
            "Rotate the log file at this size [env MQTTSVC_LOG_MAX_BYTES; default 10485760].",
        ],
        ["log-keep", None, None, "Rotated log files to keep [env MQTTSVC_LOG_KEEP; default 10]."],
        [
            "events-heartbeat",
            None,
            None,
            f"Seconds between heartbeat comments on /events streams "
            f"[env MQTTSVC_EVENTS_HEARTBEAT; default {HEARTBEAT:g}].",
        ],
        [
            "alert-limit",
            None,
            None,
            f"Alerts per site per 10 minutes; more are summarised "
            f"[env MQTTSVC_ALERT_LIMIT; default {LIMIT}].",
        ],
        [
            "events-max-streams",
            None,
            None,
            f"Open /events streams at most; more get 503 "
            f"[env MQTTSVC_EVENTS_MAX_STREAMS; default {MAX_STREAMS}].",
        ],
        [
            "http-max-connections",
            None,
            None,
            "Open HTTP connections at most; more get 503, leaving the other descriptors to "
            "brokers and the database [env MQTTSVC_HTTP_MAX_CONNECTIONS; default a quarter of "
            f"RLIMIT_NOFILE, from {MIN_CONNECTIONS} to {MAX_CONNECTIONS}].",
        ],
        [
            "http-request-timeout",
            None,
            None,
            "Seconds an HTTP connection has to send a whole request, from when it opens or "
            "its previous response was sent; then it is closed "
            f"[env MQTTSVC_HTTP_REQUEST_TIMEOUT; default {REQUEST_TIMEOUT:g}].",
        ],
    ]
    optFlags = [
        ["migrate", None, "Apply pending schema migrations at start [env MQTTSVC_MIGRATE=1]."],
        [
            "alert-device-offline",
            None,
            "Also alert when a device goes offline [env MQTTSVC_ALERT_DEVICE_OFFLINE=1].",
        ],
        [
            "no-gc-freeze",
            None,
            "Do not move the objects alive once the sites are loaded out of the garbage "
            "collector's full collections [env MQTTSVC_GC_FREEZE=0].",
        ],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self["alert-webhook"] = []

    def opt_alert_webhook(self, url: str) -> None:
        """POST alerts to this URL; repeatable [env MQTTSVC_ALERT_WEBHOOKS, comma-separated]."""
        self["alert-webhook"].append(url)

    def postOptions(self) -> None:
        for option, variable in _ENV.items():
            if self[option] is None and self._environ.get(variable):
                self[option] = self._environ[variable]
        if not self["alert-webhook"] and self._environ.get("MQTTSVC_ALERT_WEBHOOKS"):
            self["alert-webhook"] = [
                url.strip()
                for url in self._environ["MQTTSVC_ALERT_WEBHOOKS"].split(",")
                if url.strip()
            ]
        if not self["alert-device-offline"]:
            self["alert-device-offline"] = _truthy(
                self._environ.get("MQTTSVC_ALERT_DEVICE_OFFLINE")
            )
        if self["rpc"] is None:
            self["rpc"] = DEFAULT_RPC
        if self["manhole-host-key"] is None:
            self["manhole-host-key"] = DEFAULT_MANHOLE_HOST_KEY
        if self["instance"] is None:
            self["instance"] = socket.gethostname().split(".")[0] or "mqttsvc"
        for name, default in _NUMBERS.items():
            if self[name] is None:
                self[name] = default
        if self["log-format"] is None:
            self["log-format"] = "text"
        if not self["no-gc-freeze"]:
            freeze = self._environ.get("MQTTSVC_GC_FREEZE", "1").strip().lower()
            self["no-gc-freeze"] = freeze in ("0", "false", "no")
        if not self["migrate"]:
            # Read here, not with the logger (which twistd may not let us
            # install): tac/service.tac ignored MQTTSVC_MIGRATE (issue 15).
            self["migrate"] = _truthy(self._environ.get("MQTTSVC_MIGRATE"))
        self._install_logger()

    def log_settings(self) -> tuple[str, str | None, int, int]:
        """
        The log format, file (None: standard output), size and number of
        old files these options ask for.

        @raise usage.UsageError: for a bad format or number.
        """
        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(logs.FORMATS)}")
        try:
            max_bytes, keep = int(self["log-max-bytes"]), int(self["log-keep"])
        except ValueError:
            raise usage.UsageError("--log-max-bytes and --log-keep must be whole numbers") from None
        return self["log-format"], self["log-file"] or None, max_bytes, keep

    def _install_logger(self) -> None:
        """
        Give twistd (our parent command, when there is one) the log
        observer these options describe, unless it was told another one.
        """
        parent = getattr(self, "parent", None)
        if parent is None or parent.get("logger"):
            return
        log_format, path, max_bytes, keep = self.log_settings()
        path = path or parent.get("logfile") or None
        if path is None and not parent.get("nodaemon"):
            path = "twistd.log"
        parent["logger"] = logs.configure(log_format, path, max_bytes, keep)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def _is_loopback(endpoint: Any) -> bool:
    interface = getattr(endpoint, "_interface", None)
    if interface is not None:
        return interface in ("127.0.0.1", "::1", "localhost") or interface.startswith("127.")
    return type(endpoint).__name__ == "UNIXServerEndpoint"


def check_config(options: Options, reactor: Any) -> Tokens | None:
    """
    Validate everything that can be checked before the reactor runs, so
    that a bad configuration stops start-up with one clear line.

    Blocking (it connects to the database once): call it before the
    reactor runs.

    @raise ConfigError: naming the problem.
    """
    dsn = options["db"]
    if not dsn:
        raise ConfigError("db", "no database given (use --db or MQTTSVC_DB)")
    database.parse_dsn(dsn)
    try:
        endpoint = serverFromString(reactor, options["rpc"])
    except Exception as e:
        raise ConfigError("rpc", f"malformed endpoint {options['rpc']!r}: {e}") from None
    check_values(options)
    tokens = None
    if options["rpc-token-file"]:
        tokens = load_tokens(options["rpc-token-file"])
    elif not _is_loopback(endpoint):
        raise ConfigError(
            "rpc-token-file",
            f"required when the JSON-RPC listener {options['rpc']!r} is not on loopback",
        )
    if options["manhole"]:
        check_manhole(options, reactor)
    if options["migrate"]:
        applied = database.migrate(dsn)
        if applied:
            log.info("applied migrations {applied}", applied=applied)
    else:
        database.check_connection(dsn)
        pending = database.pending_migrations(dsn)
        if pending:
            raise ConfigError(
                "db",
                f"{database.describe(dsn)} lacks migrations {pending}; run "
                "'mqttsvc migrate --db DSN' or start with --migrate",
            )
    secrets = load_key(options["secret-key-file"]) if options["secret-key-file"] else None
    database.check_secrets(dsn, secrets)
    options["secrets"] = secrets
    return tokens


def check_manhole(options: Options, reactor: Any) -> None:
    """
    Check the SSH manhole's options and key files, generating the host key
    on first start.

    @raise ConfigError: naming the option.
    """
    try:
        endpoint = serverFromString(reactor, options["manhole"])
    except Exception as e:
        raise ConfigError("manhole", f"malformed endpoint {options['manhole']!r}: {e}") from None
    if not options["manhole-keys"]:
        raise ConfigError(
            "manhole-keys", "required with --manhole: the SSH public keys that may log in"
        )
    read_authorized_keys(options["manhole-keys"])
    load_host_key(options["manhole-host-key"])
    if not _is_loopback(endpoint):
        log.warn(
            "the SSH manhole {endpoint} is not on loopback: anyone who reaches it may try keys",
            endpoint=options["manhole"],
        )


def check_values(options: Options) -> None:
    """
    Check the options that need no I/O, turning the numeric ones into
    numbers.

    @raise ConfigError: naming the option.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", options["instance"]):
        raise ConfigError(
            "instance", f"{options['instance']!r} must be 1-64 letters, digits, '_', '-' or '.'"
        )
    for name in _NUMBERS:
        options[name] = _positive_number(name, options[name])
    for name in (
        "max-payload",
        "max-devices",
        "batch-size",
        "alert-limit",
        "write-connections",
        "events-max-streams",
        "http-max-connections",
    ):
        if options[name] != int(options[name]):
            raise ConfigError(name, "must be a whole number")
        options[name] = int(options[name])
    if options["max-devices"] > MAX_DEVICES_LIMIT:
        raise ConfigError("max-devices", f"must be a whole number from 1 to {MAX_DEVICES_LIMIT}")
    if options["alert-limit"] < 1:
        raise ConfigError("alert-limit", "must be a whole number of at least 1")
    if not 1 <= options["write-connections"] <= 16:
        raise ConfigError("write-connections", "must be a whole number from 1 to 16")
    for url in options["alert-webhook"]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                "alert-webhook",
                f"{describe_url(url) if parts.hostname else 'a URL'} must be an http:// or "
                "https:// URL with a host",
            )


def _positive_number(name: str, value: str | float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(name, f"{value!r} is not a number") from None
    if not number > 0:
        raise ConfigError(name, "must be more than 0")
    return number


def buildService(
    options: Options, reactor: Any, tokens: Tokens | None, deadline: float | None = None
) -> RootService:
    """
    The service tree: store, ingest (writer and device liveness), site
    supervisor, web server, and the SSH manhole when C{--manhole} is given.

    @param deadline: seconds after the stop began by which the process
        exits (L{RootService}); None for a tree that shares its process
        (tests).
    """
    root = RootService(deadline)
    metrics = Metrics()
    # The root stops its children last first: the store (its pools) after
    # the ingest writer has written what the sites left, the writer after
    # the sites, and device liveness before them (no device is declared
    # offline while the sites disconnect).
    store = Store(
        reactor,
        options["db"],
        secrets=options.get("secrets"),
        write_connections=options["write-connections"],
    )
    store.setServiceParent(root)
    ingest = Ingest(
        reactor,
        store.write_pool,
        store,
        lanes=options["write-connections"],
        batch_size=options["batch-size"],
        batch_delay=options["batch-delay-ms"] / 1000.0,
        repair_interval=options["monitor-interval"],
        observe=metrics.observe_batch,
        on_stall=store.write_lane_stalled,
        on_device_limit=store.device_limit_reached,
    )
    ingest.setServiceParent(root)
    # Started before the sites and stopped after them.
    connect_threads = ConnectThreads(reactor)
    connect_threads.setServiceParent(root)
    supervisor = SiteSupervisor(
        reactor,
        store,
        ingest,
        instance=options["instance"],
        monitor_interval=options["monitor-interval"],
        probe_interval=options["probe-interval"],
        proving_time=options["proving-time"],
        max_payload=options["max-payload"],
        connect_threads=connect_threads.pool,
        max_clock_skew=options["max-clock-skew"],
        max_devices=options["max-devices"],
    )
    supervisor.setServiceParent(root)
    ingest.liveness.setServiceParent(root)
    ConfigListener(reactor, options["db"], supervisor.notified, supervisor.resync).setServiceParent(
        root
    )
    hub = EventHub(reactor, options["db"], store.pool)
    hub.setServiceParent(root)
    if options["alert-webhook"]:
        alerts = AlertDispatcher(
            reactor,
            options["alert-webhook"],
            http_post(reactor),
            AlertRules(device_offline=options["alert-device-offline"]),
            limit=options["alert-limit"],
        )
        hub.subscribe(alerts.observe)
        alerts.setServiceParent(root)
        log.info(
            "alerts go to {urls}",
            urls=", ".join(describe_url(u) for u in options["alert-webhook"]),
        )
    streams = EventStreams(
        reactor,
        hub,
        heartbeat=options["events-heartbeat"],
        max_streams=options["events-max-streams"],
    )
    streams.setServiceParent(root)
    descriptors = DescriptorBudget(
        lambda: len(supervisor.sites()), options["http-max-connections"], clock=reactor
    )
    # site.test's own threads, apart from the sites' connects.
    connection_tests = ConnectionTests(reactor)
    connection_tests.setServiceParent(root)
    dispatcher = control_plane(
        reactor, store, supervisor, connection_tests, descriptors, writer=ingest.writer
    )
    metrics.watch(supervisor, ingest)
    metrics.watch_descriptors(descriptors)
    web = WebApp(
        dispatcher,
        tokens,
        metrics.render,
        partial(readiness, reactor, store, supervisor, ingest.writer),
        events=streams,
    )
    if tokens is None:
        log.warn("no --rpc-token-file: the JSON-RPC API accepts calls without a token")
    site = BoundedSite(
        web.resource(),
        reactor,
        Limits(
            request_timeout=options["http-request-timeout"],
            max_connections=options["http-max-connections"],
        ),
        logFormatter=access_log_line,
    )
    site.displayTracebacks = False
    metrics.watch_http(site, streams)
    http = strports.service(options["rpc"], site, reactor=reactor)
    http.setName("web")
    http.setServiceParent(root)
    if not options["no-gc-freeze"]:
        supervisor.whenLoaded().addCallback(lambda _: freeze_startup_heap())
    if options["manhole"]:
        makeManholeService(
            reactor,
            options["manhole"],
            options["manhole-keys"],
            options["manhole-host-key"],
            tree_namespace(root, reactor),
        ).setServiceParent(root)
    return root


def tac_application(environ: Mapping[str, str] | None = None) -> Componentized:
    """
    The application of C{tac/service.tac}: the options C{twistd mqttsvc}
    would build from the same environment (and no arguments), the same
    service tree, and, when C{MQTTSVC_LOG_FORMAT} or C{MQTTSVC_LOG_FILE} is
    set, the same logging (to standard output without a file); otherwise
    twistd's own (C{-l}).
    """
    options = Options(environ)
    options.parseOptions([])
    application = Application("mqttsvc")
    if options._environ.get("MQTTSVC_LOG_FORMAT") or options._environ.get("MQTTSVC_LOG_FILE"):
        application.setComponent(ILogObserver, logs.make_observer(*options.log_settings()))
    makeService(options).setServiceParent(application)
    return application


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the service for C{twistd mqttsvc} or C{tac/service.tac}; a bad
    configuration ends the process with one line on standard error.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        tokens = check_config(options, reactor)
    except ConfigError as e:
        sys.stderr.write(f"mqttsvc: configuration error: {e}\n")
        raise SystemExit(1) from None
    before, after, hard = raise_soft_limit()
    log.info(
        "file descriptors: soft limit {after} (was {before}, hard limit {hard}): room for "
        "about {sites} sites beside {http} HTTP connections",
        before=before,
        after=after,
        hard=hard,
        sites=DescriptorBudget(lambda: 0, options["http-max-connections"]).report()[
            "sites_possible"
        ],
        http=options["http-max-connections"],
    )
    return buildService(options, reactor, tokens, options["shutdown-deadline"])
