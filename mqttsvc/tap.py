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
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.application import strports
from twisted.application.service import Application, IService
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from mqttsvc.cluster.commands import CommandReceiver
from mqttsvc.cluster.keeper import HANDOVER_RATE, LEASE_RENEW, LEASE_TTL, LeaseKeeper
from mqttsvc.cluster.publisher import LivePublisher
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
    make_manhole_service,
    read_authorized_keys,
    tree_namespace,
)
from mqttsvc.control.metrics import Metrics
from mqttsvc.control.rpc.methods import control_plane
from mqttsvc.control.rpc.sites import running_status
from mqttsvc.control.sse import HEARTBEAT, MAX_STREAMS, EventStreams
from mqttsvc.control.tokens import Tokens, load_tokens
from mqttsvc.control.web import WebApp, access_log_line
from mqttsvc.db import schema as database
from mqttsvc.db.leases import CHANNEL as CLUSTER_CHANNEL
from mqttsvc.db.live import COMMANDS
from mqttsvc.db.notifications import ConfigListener, NotificationListener
from mqttsvc.db.secrets import load_key
from mqttsvc.db.store import WRITE_CONNECTIONS, Store
from mqttsvc.events.alerts import LIMIT, AlertDispatcher, AlertRules, describe_url, http_post
from mqttsvc.events.hub import EventHub
from mqttsvc.ingest.fencing import Fences
from mqttsvc.ingest.service import Ingest
from mqttsvc.ingest.writer import BATCH_DELAY, BATCH_SIZE
from mqttsvc.mqtt.connector import Connector
from mqttsvc.mqtt.keepalive import KeepaliveSweep
from mqttsvc.mqtt.probe import ConnectionTests
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


@attrs.frozen
class Setting:
    """
    One option of C{twistd mqttsvc}: its name, what it does, and its
    default, written once; the option, its environment variable and its
    help text are all made from this.

    @ivar default: the default as a value (a number's default is its
        owner's constant), or None for no default.
    @ivar shown: how the help shows a default that is not a plain value.
    @ivar number: whether it is a positive number (L{check_values}).
    """

    name: str
    help: str
    default: str | float | None = None
    shown: str | None = None
    number: bool = False

    @property
    def env(self) -> str:
        return "MQTTSVC_" + self.name.upper().replace("-", "_")

    @property
    def default_text(self) -> str | None:
        """The default as it would be given on the command line."""
        if self.default is None or isinstance(self.default, str):
            return self.default
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def option(self) -> list[Any]:
        shown = self.shown if self.shown is not None else self.default_text
        if shown is None:
            default = ""
        else:
            default = "; default" + (shown if shown.startswith(":") else f" {shown}")
        return [self.name, None, None, f"{self.help} [env {self.env}{default}]."]


SETTINGS = [
    Setting("db", "PostgreSQL connection string"),
    Setting("rpc", "JSON-RPC listener, a strports description", DEFAULT_RPC),
    Setting("rpc-token-file", "File of 'NAME TOKEN' lines accepted as bearer tokens"),
    Setting(
        "instance",
        "This instance's name: in MQTT client ids (alone), or in the cluster (--cluster, "
        "where it must be unique among running instances); keep it stable across restarts",
        shown=": the host name",
    ),
    Setting(
        "lease-ttl",
        "With --cluster: seconds a site's lease lasts without renewal (how long a dead "
        "instance's sites wait, at most, before others take them)",
        LEASE_TTL,
        number=True,
    ),
    Setting(
        "lease-renew",
        "With --cluster: seconds between renewals of this instance's leases; less than --lease-ttl",
        LEASE_RENEW,
        number=True,
    ),
    Setting(
        "handover-rate",
        "With --cluster: the most sites this instance acquires or hands over in any second",
        HANDOVER_RATE,
        number=True,
    ),
    Setting(
        "monitor-interval",
        "Seconds between full reconciliations of the sites",
        MONITOR_INTERVAL,
        number=True,
    ),
    Setting(
        "probe-interval",
        "Seconds between connection probes of a site in error",
        PROBE_INTERVAL,
        number=True,
    ),
    Setting(
        "proving-time",
        "Seconds a connection must stay up, subscribed and heard from, before it counts as "
        "a success and resets the retry count",
        PROVING_TIME,
        number=True,
    ),
    Setting(
        "shutdown-deadline",
        "Seconds after SIGTERM by which the process exits, finished stopping or not "
        "(the brokers redeliver what was not acknowledged)",
        SHUTDOWN_DEADLINE,
        number=True,
    ),
    Setting(
        "max-payload",
        "Largest payload processed, in bytes; larger ones are dead letters",
        DEFAULT_MAX_PAYLOAD,
        number=True,
    ),
    Setting(
        "max-clock-skew",
        "Seconds a message's ts may be ahead of its receive time; further ahead it is a "
        "dead letter",
        DEFAULT_MAX_CLOCK_SKEW,
        number=True,
    ),
    Setting(
        "max-devices",
        "Devices a site may have unless its max_devices says otherwise; a new device id "
        "beyond it is a dead letter",
        DEFAULT_MAX_DEVICES,
        number=True,
    ),
    Setting("batch-size", "Write a batch once this many messages wait", BATCH_SIZE, number=True),
    Setting(
        "batch-delay-ms",
        "...or once the oldest has waited this many milliseconds",
        BATCH_DELAY * 1000,
        number=True,
    ),
    Setting(
        "write-connections",
        "Database connections writing batches side by side, each for its share of the sites",
        WRITE_CONNECTIONS,
        number=True,
    ),
    Setting(
        "manhole",
        "SSH manhole listener, a strports description; bind it to loopback, e.g. "
        "tcp:2222:interface=127.0.0.1 (without interface= it listens on every interface)",
        shown=": no manhole",
    ),
    Setting(
        "manhole-keys",
        "Authorized keys file of the SSH keys that may log in to the manhole; "
        "required with --manhole",
    ),
    Setting(
        "manhole-host-key",
        "The manhole's SSH host key, generated with mode 0600 if missing",
        DEFAULT_MANHOLE_HOST_KEY,
        shown=f"./{DEFAULT_MANHOLE_HOST_KEY}",
    ),
    Setting(
        "secret-key-file",
        "Key that encrypts broker passwords at rest (make one with `mqttsvc generate-key`; "
        "mode 600)",
    ),
    Setting("log-format", "text or json (one JSON object a line)", logs.FORMATS[0]),
    Setting(
        "log-file",
        "Log to this file, rotated by size, instead of standard output "
        "(twistd's --logfile works too)",
    ),
    Setting("log-max-bytes", "Rotate the log file at this size", logs.MAX_BYTES, number=True),
    Setting("log-keep", "Rotated log files to keep", logs.KEEP, number=True),
    Setting(
        "events-heartbeat",
        "Seconds between heartbeat comments on /events streams",
        HEARTBEAT,
        number=True,
    ),
    Setting(
        "alert-limit", "Alerts per site per 10 minutes; more are summarised", LIMIT, number=True
    ),
    Setting(
        "events-max-streams", "Open /events streams at most; more get 503", MAX_STREAMS, number=True
    ),
    Setting(
        "http-max-connections",
        "Open HTTP connections at most; more get 503, leaving the other descriptors to "
        "brokers and the database",
        default_max_connections(descriptor_limit()),
        shown=f"a quarter of RLIMIT_NOFILE, from {MIN_CONNECTIONS} to {MAX_CONNECTIONS}",
        number=True,
    ),
    Setting(
        "http-request-timeout",
        "Seconds an HTTP connection has to send a whole request, from when it opens or "
        "its previous response was sent; then it is closed",
        REQUEST_TIMEOUT,
        number=True,
    ),
]

#: The numeric options, by name.
_NUMBERS = [s.name for s in SETTINGS if s.number]


class Options(usage.Options):
    """
    Options of C{twistd mqttsvc}; each falls back to an environment
    variable.
    """

    synopsis = (
        "[--db DSN] [--rpc ENDPOINT] [--rpc-token-file PATH] [--migrate] "
        "[--manhole ENDPOINT --manhole-keys PATH]"
    )
    optParameters = [setting.option() for setting in SETTINGS]
    optFlags = [
        ["migrate", None, "Apply pending schema migrations at start [env MQTTSVC_MIGRATE=1]."],
        [
            "cluster",
            None,
            "Share the sites with the other instances started with --cluster on this "
            "database, each site owned by one live instance (docs/cluster.md) "
            "[env MQTTSVC_CLUSTER=1].",
        ],
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
        for setting in SETTINGS:
            if self[setting.name] is None and self._environ.get(setting.env):
                self[setting.name] = self._environ[setting.env]
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
        for setting in SETTINGS:
            if self[setting.name] is None:
                self[setting.name] = setting.default_text
        if self["instance"] is None:
            self["instance"] = socket.gethostname().split(".")[0] or "mqttsvc"
        if not self["no-gc-freeze"]:
            freeze = self._environ.get("MQTTSVC_GC_FREEZE", "1").strip().lower()
            self["no-gc-freeze"] = freeze in ("0", "false", "no")
        self["cluster"] = bool(self["cluster"]) or _truthy(self._environ.get("MQTTSVC_CLUSTER"))
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
        "handover-rate",
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
    if options["lease-renew"] >= options["lease-ttl"]:
        raise ConfigError(
            "lease-renew",
            f"must be less than --lease-ttl ({options['lease-ttl']:g}s): a lease must be "
            "renewed before it expires",
        )
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


def build_service(
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
        name=f"mqttsvc {options['instance']}",
    )
    store.setServiceParent(root)
    # With --cluster the lease keeper decides which sites the supervisor
    # runs, the supervisor stops them when the keeper (or the writer's
    # fence) says so, and the writer fences every batch with the keeper's
    # epochs: each needs another built after it, so these callbacks name
    # the supervisor, which is built below, before any of them can run.
    keeper = None
    if options["cluster"]:
        keeper = LeaseKeeper(
            reactor,
            store.leases,
            options["instance"],
            ttl=options["lease-ttl"],
            renew_interval=options["lease-renew"],
            handover_rate=options["handover-rate"],
            on_acquired=lambda site_id, epoch: supervisor.acquired(site_id),
            on_lost=lambda site_id: supervisor.lost(site_id),
            hand_over=lambda site_id: supervisor.hand_over(site_id),
        )
    ingest = make_ingest(
        options, reactor, store, metrics, keeper, lambda stale: supervisor.fenced(stale)
    )
    ingest.setServiceParent(root)
    # One housekeeping timer for every broker connection, the sites' and
    # site.test's.
    sweep = KeepaliveSweep(reactor)
    # Started before the sites and stopped after them.
    connector = Connector(reactor, sweep)
    connector.setServiceParent(root)
    supervisor = SiteSupervisor(
        reactor,
        store,
        ingest,
        # In a cluster a site's client id is the same for every owner.
        instance=None if keeper is not None else options["instance"],
        ownership=keeper,
        monitor_interval=options["monitor-interval"],
        probe_interval=options["probe-interval"],
        proving_time=options["proving-time"],
        max_payload=options["max-payload"],
        client_factory=connector.client,
        max_clock_skew=options["max-clock-skew"],
        max_devices=options["max-devices"],
    )
    supervisor.setServiceParent(root)
    ingest.liveness.setServiceParent(root)
    ConfigListener(
        reactor, options["db"], partial(_site_changed, supervisor, keeper), supervisor.resync
    ).setServiceParent(root)
    hub = EventHub(reactor, options["db"], store.events)
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
    connection_tests = ConnectionTests(reactor, sweep)
    connection_tests.setServiceParent(root)
    dispatcher = control_plane(
        reactor,
        store,
        supervisor,
        connection_tests,
        descriptors,
        writer=ingest.writer,
        instance=options["instance"],
        clustered=keeper is not None,
    )
    metrics.watch(supervisor, ingest)
    metrics.watch_cluster(options["instance"], keeper)
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
        supervisor.when_loaded().addCallback(lambda _: freeze_startup_heap())
    if options["manhole"]:
        make_manhole_service(
            reactor,
            options["manhole"],
            options["manhole-keys"],
            options["manhole-host-key"],
            tree_namespace(root, reactor),
        ).setServiceParent(root)
    publisher = commands = None
    if keeper is not None:
        # Any replica answers for any site: this one publishes the live
        # status of the sites it owns, and restarts one of them when
        # another replica asks (docs/cluster.md, "Any replica answers").
        publisher = LivePublisher(
            reactor,
            options["instance"],
            keeper.owned,
            partial(running_status, supervisor, ingest.writer, options["instance"]),
            store.live,
        )
        publisher.setServiceParent(root)
        commands = CommandReceiver(
            options["instance"], partial(_restart_here, supervisor), publisher.publish_now
        )
        NotificationListener(
            reactor,
            options["db"],
            COMMANDS,
            commands.received,
            lambda: None,
            what="site commands",
        ).setServiceParent(root)
        # A join, a leave or a release elsewhere: re-plan now, so that a
        # clean stop of another instance hands its sites over within a
        # round (docs/cluster.md).
        NotificationListener(
            reactor,
            options["db"],
            CLUSTER_CHANNEL,
            lambda instance: keeper.poke(),
            keeper.poke,
            what="cluster",
        ).setServiceParent(root)
        # Last, so that it stops first: it hands every site over while the
        # supervisor, the writer and the database are still there, then
        # leaves the cluster.
        keeper.setServiceParent(root)
    metrics.watch_live(publisher, commands)
    return root


def make_ingest(
    options: Options,
    reactor: Any,
    store: Store,
    metrics: Metrics,
    keeper: LeaseKeeper | None,
    on_fenced: Callable[[list[str]], None],
) -> Ingest:
    """
    The ingest service; in a cluster (a C{keeper}) every batch it writes is
    fenced with the epochs of its sites' leases, C{on_fenced} hears of
    the sites whose batch the database refused, and device liveness loads
    each site's devices when it is acquired, not every site's at start.
    Alone it writes unfenced and loads every site's devices at start.
    Either way every connection and device event it writes carries the
    C{--instance} name.
    """
    make = partial(
        Ingest,
        reactor,
        store.write_pool,
        store.devices,
        lanes=options["write-connections"],
        batch_size=options["batch-size"],
        batch_delay=options["batch-delay-ms"] / 1000.0,
        repair_interval=options["monitor-interval"],
        observe=metrics.observe_batch,
        on_stall=store.write_lane_stalled,
        on_device_limit=store.device_limit_reached,
        instance=options["instance"],
    )
    if keeper is None:
        return make()
    fences = Fences(keeper, on_fenced)
    # Device liveness tracks only the sites the keeper acquires.
    return make(fence=fences.fence, on_fenced=fences.refused, per_site=store.devices)


def _restart_here(supervisor: SiteSupervisor, site_id: str) -> bool:
    """
    Restart a site another replica asked this one, its owner, to restart;
    C{False} if it does not run here (any more).
    """
    site = supervisor.site(site_id)
    if site is None:
        return False
    site.restart()
    return True


def _site_changed(supervisor: SiteSupervisor, keeper: LeaseKeeper | None, site_id: str) -> None:
    """
    A site's configuration changed: reconcile it, and in a cluster re-plan
    at once (a new or enabled site is acquired by its owner within a round,
    a disabled one handed over).
    """
    supervisor.notified(site_id)
    if keeper is not None:
        keeper.poke()


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
    return build_service(options, reactor, tokens, options["shutdown-deadline"])
