"""
Prometheus metrics, through C{prometheus_client}.

Histograms are observed as batches are written; everything else is read
from the live objects when Prometheus scrapes, by a collector, so there is
no second copy of the state to keep in step (and no label left behind for a
deleted site).

The cluster's series (issue #17) are there on every instance: alone
(without C{--cluster}) they are 0, and C{mqttsvc_cluster_member} says so.
Prometheus's advice ("avoid missing metrics"): a series that may be absent
makes a query over it answer nothing instead of 0, so one dashboard or alert
would need two forms.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mqttsvc.cluster.commands import CommandReceiver
from mqttsvc.cluster.publisher import LivePublisher
from mqttsvc.sites.states import STATES

if TYPE_CHECKING:
    from mqttsvc.control.httpserver import BoundedSite
    from mqttsvc.control.sse import EventStreams
    from mqttsvc.ingest.service import Ingest
    from mqttsvc.runtime.descriptors import DescriptorBudget
    from mqttsvc.sites.supervisor import SiteSupervisor


class ClusterMember(Protocol):
    """
    What the metrics read of this instance's lease keeper
    (L{mqttsvc.cluster.keeper.LeaseKeeper}, which the control plane does not
    import): the sites it holds, and what it has done since it started.
    """

    def owned(self) -> dict[str, int]:
        """
        Every site this instance holds now, with its epoch.
        """
        ...

    @property
    def renewals_ok(self) -> int:
        """Heartbeats answered in time."""
        ...

    @property
    def renewals_failed(self) -> int:
        """Heartbeats that failed, timed out or were answered too late."""
        ...

    @property
    def acquisitions(self) -> int:
        """Leases taken."""
        ...

    @property
    def handovers(self) -> int:
        """Hand-overs begun."""
        ...

    @property
    def leases_lost(self) -> int:
        """Sites given up at once: taken over, self-fenced, or not handed over in time."""
        ...

    @property
    def self_fences(self) -> int:
        """Times the keeper stopped every site for not having renewed within a ttl."""
        ...


class _ClusterCollector(Collector):
    def __init__(self, instance: str, keeper: ClusterMember | None) -> None:
        self._instance = instance
        self._keeper = keeper

    def collect(self) -> Iterator[Metric]:
        keeper = self._keeper
        yield InfoMetricFamily(
            "mqttsvc_instance",
            "This instance's name (--instance)",
            value={"instance": self._instance},
        )
        yield GaugeMetricFamily(
            "mqttsvc_cluster_member",
            "1 when this instance shares the sites with others (--cluster), else 0",
            value=0.0 if keeper is None else 1.0,
        )
        yield GaugeMetricFamily(
            "mqttsvc_cluster_owned_sites",
            "Sites whose lease this instance holds (also while handing them over)",
            value=0 if keeper is None else len(keeper.owned()),
        )
        renewals = CounterMetricFamily(
            "mqttsvc_cluster_lease_renewals",
            "Heartbeats renewing this instance's leases: answered in time (ok), or failed, "
            "timed out or answered too late (failed)",
            labels=["result"],
        )
        renewals.add_metric(["ok"], 0 if keeper is None else keeper.renewals_ok)
        renewals.add_metric(["failed"], 0 if keeper is None else keeper.renewals_failed)
        yield renewals
        yield CounterMetricFamily(
            "mqttsvc_cluster_acquisitions",
            "Leases this instance took",
            value=0 if keeper is None else keeper.acquisitions,
        )
        yield CounterMetricFamily(
            "mqttsvc_cluster_handovers",
            "Sites this instance began to hand over to another (clean stop, then release)",
            value=0 if keeper is None else keeper.handovers,
        )
        yield CounterMetricFamily(
            "mqttsvc_cluster_leases_lost",
            "Sites this instance stopped at once: their lease was taken over, the instance "
            "fenced itself, or they were not handed over within a stop's deadline",
            value=0 if keeper is None else keeper.leases_lost,
        )
        yield CounterMetricFamily(
            "mqttsvc_cluster_self_fences",
            "Times this instance stopped every site it held for not having renewed its "
            "leases within a ttl",
            value=0 if keeper is None else keeper.self_fences,
        )


class _PublishedCollector(Collector):
    def __init__(self, publisher: LivePublisher | None, commands: CommandReceiver | None) -> None:
        self._publisher = publisher
        self._commands = commands

    def collect(self) -> Iterator[Metric]:
        publisher, commands = self._publisher, self._commands
        yield CounterMetricFamily(
            "mqttsvc_cluster_live_published",
            "Site statuses this instance published for the other replicas to answer with",
            value=0 if publisher is None else publisher.published,
        )
        yield CounterMetricFamily(
            "mqttsvc_cluster_live_publish_failures",
            "Publications of site statuses that failed (retried a second later)",
            value=0 if publisher is None else publisher.failures,
        )
        received = CounterMetricFamily(
            "mqttsvc_cluster_site_commands",
            "Commands from other replicas to this one as a site's owner: acted on, or "
            "dropped as malformed",
            labels=["result"],
        )
        received.add_metric(["acted"], 0 if commands is None else commands.acted)
        received.add_metric(["malformed"], 0 if commands is None else commands.malformed)
        yield received


class _DescriptorCollector(Collector):
    def __init__(self, budget: DescriptorBudget) -> None:
        self._budget = budget

    def collect(self) -> Iterator[Metric]:
        report = self._budget.report()
        yield GaugeMetricFamily(
            "mqttsvc_descriptors_limit", "The soft RLIMIT_NOFILE", value=report["limit"]
        )
        yield GaugeMetricFamily(
            "mqttsvc_descriptors_open", "File descriptors open", value=report["open"]
        )
        yield GaugeMetricFamily(
            "mqttsvc_descriptors_needed",
            "File descriptors needed: one per running site, the HTTP cap and a reserve",
            value=report["needed"],
        )


class _LiveCollector(Collector):
    def __init__(self, supervisor: SiteSupervisor, ingest: Ingest) -> None:
        self._supervisor = supervisor
        self._writer = ingest.writer
        self._liveness = ingest.liveness

    def collect(self) -> Iterator[Metric]:
        sites = self._supervisor.sites()
        state = GaugeMetricFamily(
            "mqttsvc_site_state",
            "1 for the state each site's connection is in",
            labels=["site_id", "state"],
        )
        received = CounterMetricFamily(
            "mqttsvc_messages_received", "MQTT messages received", labels=["site_id"]
        )
        rejected = CounterMetricFamily(
            "mqttsvc_messages_rejected", "Messages dead-lettered", labels=["site_id"]
        )
        committed = CounterMetricFamily(
            "mqttsvc_messages_committed",
            "Messages whose effects were committed (and so acknowledged)",
            labels=["site_id"],
        )
        connects = CounterMetricFamily(
            "mqttsvc_site_connects",
            "Successful connections (the first and every reconnect)",
            labels=["site_id"],
        )
        # Every site the database has: a stopped or disabled one (no
        # service) shows as stopped, with the counts of its earlier runs.
        current = {site.config.site_id: site.state.state for site in sites}
        current.update(dict.fromkeys(self._supervisor.idle_sites(), "stopped"))
        for site_id in sorted(current):
            for name in STATES:
                state.add_metric([site_id, name], 1.0 if name == current[site_id] else 0.0)
            counts = self._supervisor.counters(site_id)
            received.add_metric([site_id], counts.messages_received)
            rejected.add_metric([site_id], counts.messages_rejected)
            committed.add_metric([site_id], counts.messages_committed)
            connects.add_metric([site_id], counts.connects)
        yield from (state, received, rejected, committed, connects)
        yield GaugeMetricFamily(
            "mqttsvc_write_queue_depth",
            "Messages waiting to be written",
            value=self._writer.queued,
        )
        yield GaugeMetricFamily(
            "mqttsvc_reading_paused",
            "1 while the sites stop reading because the database cannot keep up",
            value=1.0 if self._writer.pressing else 0.0,
        )
        yield GaugeMetricFamily(
            "mqttsvc_write_queue_bytes",
            "Bytes of messages held until they are written",
            value=self._writer.bytes_held,
        )
        yield CounterMetricFamily(
            "mqttsvc_database_dead_letters",
            "Messages the database refused, kept as dead letters",
            value=self._writer.dead_lettered,
        )
        yield CounterMetricFamily(
            "mqttsvc_fenced_batches",
            "Batches the database's fence refused whole: a site in them is owned by another "
            "instance or under a newer epoch (--cluster; 0 alone)",
            value=self._writer.batches_fenced,
        )
        yield CounterMetricFamily(
            "mqttsvc_fenced_messages",
            "Messages of the refused sites dropped unacknowledged (from the batch and the "
            "queue), for the broker to redeliver to the site's owner",
            value=self._writer.messages_fenced,
        )
        failing = GaugeMetricFamily(
            "mqttsvc_write_lane_failing_seconds",
            "Seconds since a write lane last committed, while its writes fail (0 when they do not)",
            labels=["lane"],
        )
        stalled = dict((lane, seconds) for lane, seconds, _ in self._writer.failing())
        for lane in range(len(self._writer.lanes)):
            failing.add_metric([str(lane)], stalled.get(lane, 0.0))
        yield failing
        devices = GaugeMetricFamily(
            "mqttsvc_devices", "Tracked devices by status", labels=["status"]
        )
        for status, count in sorted(self._liveness.devices.counts().items()):
            devices.add_metric([status], count)
        yield devices
        yield CounterMetricFamily(
            "mqttsvc_devices_repaired",
            "Devices of connected sites found without an offline deadline and given one (a bug "
            "if ever above 0)",
            value=self._liveness.devices_repaired,
        )


class _HttpCollector(Collector):
    def __init__(self, site: BoundedSite, streams: EventStreams) -> None:
        self._site = site
        self._streams = streams

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "mqttsvc_http_connections", "Open HTTP connections", value=len(self._site.channels)
        )
        yield GaugeMetricFamily(
            "mqttsvc_http_max_connections",
            "Open HTTP connections allowed (--http-max-connections)",
            value=self._site.limits.max_connections,
        )
        refused = CounterMetricFamily(
            "mqttsvc_http_refused",
            "HTTP connections refused over the cap (connection), requests refused for a body "
            "over the limit (body) or closed for not arriving whole in time (timeout)",
            labels=["reason"],
        )
        for reason, count in sorted(self._site.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily(
            "mqttsvc_event_streams", "Open /events streams", value=self._streams.clients
        )


class Metrics:
    """
    The registry of one mqttsvc process.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batch_size = Histogram(
            "mqttsvc_batch_size",
            "Messages per committed batch",
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "mqttsvc_commit_seconds",
            "Time to write and commit one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )

    def observe_batch(self, messages: int, seconds: float) -> None:
        self.batch_size.observe(messages)
        self.commit_seconds.observe(seconds)

    def watch(self, supervisor: SiteSupervisor, ingest: Ingest) -> None:
        """
        Report the live state of these at every scrape.
        """
        self.registry.register(_LiveCollector(supervisor, ingest))

    def watch_cluster(self, instance: str, keeper: ClusterMember | None) -> None:
        """
        Report this instance's name, and with C{--cluster} (a C{keeper}) its
        leases, at every scrape; without one the cluster's series are 0.
        """
        self.registry.register(_ClusterCollector(instance, keeper))

    def watch_live(self, publisher: LivePublisher | None, commands: CommandReceiver | None) -> None:
        """
        Report, with C{--cluster}, the site statuses this instance published
        and the commands it received from the other replicas; without it
        the series are 0.
        """
        self.registry.register(_PublishedCollector(publisher, commands))

    def watch_descriptors(self, budget: DescriptorBudget) -> None:
        """
        Report file descriptors at every scrape: the limit, those open, and
        those the running sites, the HTTP cap and the rest need.
        """
        self.registry.register(_DescriptorCollector(budget))

    def watch_http(self, site: BoundedSite, streams: EventStreams) -> None:
        """
        Report the HTTP server's connections and refusals, and the open
        event streams, at every scrape.
        """
        self.registry.register(_HttpCollector(site, streams))

    def render(self) -> bytes:
        """
        The text exposition of every metric.
        """
        rendered: bytes = generate_latest(self.registry)
        return rendered
