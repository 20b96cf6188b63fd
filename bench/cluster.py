"""
The C{cluster} scenario: several real C{twistd -n mqttsvc --cluster}
processes sharing the sites of one fresh database on a private Mosquitto
(docs/cluster.md), watched from outside, through the database, as an
operator could.

- B{Failover.}  Three instances share the sites.  SIGKILL one, and time
  until every site it owned is owned by a live instance (C{site_lease}, by
  the database's clock) I{and} reported connected by that owner
  (C{mqtt_connection.status} is C{connected} with a C{last_connected_at}
  after the lease's C{changed_at}).
- B{Join.}  The killed instance is started again while the two others hold
  every site: the sites whose owner changed, the lease epochs raised and
  the connections made, against the ideal (the third's share), and the
  time until every site is with the instance the assignment gives it
  (L{mqttsvc.cluster.assignment.assign}, what every instance computes) and
  connected.
- B{Throughput.}  The same QoS 1 backlog drained by one instance and by
  three (and by one without C{--cluster}, for what the fence costs).

Everything runs on this one host, so the database's C{now()}, the
instances' clocks and ours are one clock: the figures are differences of
the timestamps the database holds (when a lease was taken, when its new
owner connected), not of when a poll happened to see them.

This module runs in the C{python -m bench} process: it only starts
processes, publishes and reads the database.  What it measures are the
C{twistd} processes, each a process of its own as in production.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import psycopg2

from bench import environment, wire, workload
from bench.environment import Broker, Database
from bench.servers import Mosquitto, free_port
from mqttsvc.cluster.assignment import assign
from mqttsvc.config import SiteConfig

if TYPE_CHECKING:
    from bench.cli import Runner

Params = dict[str, Any]
T = TypeVar("T")

#: The instances' names (C{--instance}).
NAMES = ("bench-a", "bench-b", "bench-c")

#: How often the database is asked, in seconds.  The figures come from
#: its timestamps, so this bounds only the cost of asking (a query over
#: every site) and how soon the next step starts.
POLL = 0.1

TWISTD = Path(sys.executable).parent / "twistd"


@attrs.frozen
class Leasing:
    """
    The lease settings of a cluster: C{--lease-ttl}, C{--lease-renew},
    C{--handover-rate}.
    """

    ttl: float
    renew: float
    rate: int

    def args(self) -> list[str]:
        return [
            "--cluster",
            *("--lease-ttl", f"{self.ttl:g}"),
            *("--lease-renew", f"{self.renew:g}"),
            *("--handover-rate", str(self.rate)),
        ]

    def failover_bound(self, sites: int, survivors: int) -> float:
        """
        The worst case of docs/cluster.md, without the connect: the ttl
        (it died just after renewing), a renewal (the survivors' next
        round), then the paced acquisitions.
        """
        return self.ttl + self.renew + math.ceil(sites / (survivors * self.rate)) - 1

    def figures(self) -> Params:
        return {"ttl": self.ttl, "renew": self.renew, "rate": self.rate}


@attrs.frozen
class Place:
    """
    Where a site is, as the database says.

    @ivar owner: the lease's owner while the lease and its owner are live,
        else None.
    @ivar connected: its row says C{connected}, since the lease was taken
        (so by this owner).
    """

    owner: str | None
    epoch: int
    changed_at: float | None
    connected: bool
    connected_at: float | None


_PLACEMENT = """
SELECT c.site_id,
       CASE WHEN l.expires_at > now() AND i.expires_at > now() AND NOT i.stopping
            THEN l.owner END,
       COALESCE(l.epoch, 0),
       extract(epoch FROM l.changed_at)::float8,
       COALESCE(c.status = 'connected' AND c.last_connected_at >= l.changed_at, false),
       extract(epoch FROM c.last_connected_at)::float8
FROM mqtt_connection c
LEFT JOIN site_lease l USING (site_id)
LEFT JOIN mqttsvc_instance i ON i.instance = l.owner
WHERE c.is_enabled
"""


class Watch:
    """
    A connection of our own to the cluster's database (autocommit) and the
    questions the scenario asks it.
    """

    def __init__(self, dsn: str) -> None:
        self._conn: Any = psycopg2.connect(dsn)
        self._conn.autocommit = True

    def _rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with self._conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []

    def _one(self, sql: str, *params: Any) -> Any:
        return self._rows(sql, *params)[0][0]

    def placement(self) -> dict[str, Place]:
        """Every enabled site's L{Place}."""
        return {site_id: Place(*rest) for site_id, *rest in self._rows(_PLACEMENT)}

    def live(self) -> dict[str, float]:
        """Live instance -> when it (last) joined, by the database's clock."""
        rows = self._rows(
            "SELECT instance, extract(epoch FROM started_at)::float8 FROM mqttsvc_instance "
            "WHERE expires_at > now() AND NOT stopping"
        )
        return dict(rows)

    def server_pids(self) -> list[int]:
        """
        The PostgreSQL processes that work for this database: its backends
        (the instances' and ours) and the server's background processes
        (WAL writer, checkpointer and the like, which every database on the
        server shares), not the backends of other databases.
        """
        rows = self._rows(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() OR datname IS NULL"
        )
        return [pid for (pid,) in rows]

    def enable(self) -> None:
        """Enable every site, in one statement (one NOTIFY each)."""
        self._rows("UPDATE mqtt_connection SET is_enabled = true WHERE NOT is_enabled")

    def connects_since(self, at: float) -> int:
        """Connection events to C{connected} at or after C{at}."""
        return int(
            self._one(
                "SELECT count(*) FROM connection_event "
                "WHERE to_state = 'connected' AND at >= to_timestamp(%s)",
                at,
            )
        )

    def counted(self) -> int:
        """Messages counted by topic: one per committed message."""
        return int(self._one("SELECT COALESCE(sum(message_count), 0) FROM discovered_topic"))

    def checks(self) -> Params:
        """
        What was committed, and whether two instances ever committed for
        one site under one epoch (C{site_writer}, filled by the fence).
        """
        return {
            "readings_stored": int(self._one("SELECT count(*) FROM sensor_reading")),
            "dead_letters": int(self._one("SELECT count(*) FROM dead_letter")),
            "epochs_with_two_writers": int(
                self._one(
                    "SELECT count(*) FROM (SELECT 1 FROM site_writer GROUP BY site_id, epoch "
                    "HAVING count(DISTINCT instance) > 1) AS twice"
                )
            ),
            "fenced_epochs": int(self._one("SELECT count(*) FROM site_writer")),
        }

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(check: Callable[[], T | None], within: float, what: str, interval: float = POLL) -> T:
    """
    Ask C{check} every C{interval} seconds until it answers something
    truthy, and return that.

    @raise TimeoutError: naming C{what} after C{within} seconds.
    """
    deadline = time.monotonic() + within
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {within:g}s")
        time.sleep(interval)


class Instance:
    """
    One C{twistd -n mqttsvc} process on the cluster's database, its
    JSON-RPC on a free loopback port (no tokens: only C{/healthz} is
    used), its output in a log file per start.
    """

    def __init__(self, dsn: str, directory: Path, name: str, args: Sequence[str]) -> None:
        self.dsn = dsn
        self.directory = directory
        self.name = name
        self.args = list(args)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log = directory / f"{name}.log"

    def start(self) -> None:
        """Start it; L{wait_healthy} waits until it answers."""
        self.starts += 1
        self.log = self.directory / f"{self.name}-{self.starts}.log"
        twistd = str(TWISTD) if TWISTD.exists() else "twistd"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MQTTSVC_")}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    *(twistd, "-n", "--pidfile=", "mqttsvc"),
                    *("--db", self.dsn, "--instance", self.name),
                    *("--rpc", f"tcp:{self.port}:interface=127.0.0.1"),
                    *self.args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def healthy(self) -> bool:
        """
        Whether it answers C{GET /healthz}.

        @raise RuntimeError: with the end of its log, if it has exited.
        """
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")
        try:
            url = f"http://127.0.0.1:{self.port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> float:
        """SIGKILL, as a crash; the wall-clock time of the kill."""
        assert self.process is not None
        killed_at = time.time()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        return killed_at

    def metrics(self) -> dict[str, float]:
        """
        Its C{/metrics} samples, summed by name over their labels.
        """
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            samples[name] = samples.get(name, 0.0) + float(value)
        return samples

    def cpu_seconds(self) -> float:
        """CPU time it has used so far."""
        assert self.process is not None
        return environment.process_cpu_seconds(self.process.pid)

    def terminate(self) -> None:
        """SIGTERM, if it runs (L{wait} waits for the end)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait(self, within: float = 30) -> None:
        """Wait until it has exited; SIGKILL it after C{within} seconds."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


@contextmanager
def instances(
    dsn: str, directory: Path, names: Sequence[str], args: Sequence[str]
) -> Iterator[dict[str, Instance]]:
    """
    Instances of C{names} (not started yet), all stopped (SIGTERM, at
    once) on the way out.
    """
    directory.mkdir(parents=True, exist_ok=True)
    made = {name: Instance(dsn, directory, name, args) for name in names}
    try:
        yield made
    finally:
        for instance in made.values():
            instance.terminate()
        for instance in made.values():
            instance.wait()


def start(group: Sequence[Instance], watch: Watch, clustered: bool, within: float = 60) -> None:
    """
    Start C{group} at once and wait until each answers C{/healthz} and,
    in a cluster, has joined (its row is live).
    """
    for instance in group:
        instance.start()
    names = {instance.name for instance in group}
    wait_for(
        lambda: all(instance.healthy() for instance in group), within, "every instance healthy"
    )
    if clustered:
        wait_for(lambda: names <= set(watch.live()), within, f"{sorted(names)} live")


def balanced(watch: Watch, members: Sequence[str], within: float) -> dict[str, Place]:
    """
    Wait until every site is owned by the live instance that the assignment
    over C{members} gives it, and connected by it; the placement then.
    """
    names = sorted(members)

    def check() -> dict[str, Place] | None:
        placement = watch.placement()
        if sorted(watch.live()) != names:
            return None
        wanted = assign(placement, names)
        if all(p.owner == wanted[s] and p.connected for s, p in placement.items()):
            return placement
        return None

    return wait_for(check, within, f"every site with its instance among {names} and connected")


def _latest(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return max(present) if present else math.nan


def _earliest(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return min(present) if present else math.nan


def failover(
    watch: Watch, group: dict[str, Instance], victim: str, leasing: Leasing
) -> tuple[Params, dict[str, Place]]:
    """
    SIGKILL C{victim}; wait until its sites are owned and connected
    elsewhere, then until the survivors hold every site as the assignment
    over them says.

    @return: the figures, and the placement once the survivors settled.
    """
    survivors = sorted(n for n in group if n != victim)
    before = watch.placement()
    theirs = sorted(s for s, p in before.items() if p.owner == victim)
    bound = leasing.failover_bound(len(theirs), len(survivors))
    killed_at = group[victim].kill()

    def moved() -> dict[str, Place] | None:
        placement = watch.placement()
        if all(placement[s].owner in survivors and placement[s].connected for s in theirs):
            return placement
        return None

    after = wait_for(moved, bound + 60, f"the sites of {victim} connected elsewhere")
    observed = time.time() - killed_at
    settled = balanced(watch, survivors, 60 + len(before) / leasing.rate)
    others = [s for s, p in before.items() if p.owner != victim]
    result = {
        "victim": victim,
        "sites": len(theirs),
        "survivors": len(survivors),
        "owned_s": _latest([after[s].changed_at for s in theirs]) - killed_at,
        # The first lease taken: its expiry (ttl after the last renewal)
        # and the survivors' next round; the rest is the pacing.
        "first_owned_s": _earliest([after[s].changed_at for s in theirs]) - killed_at,
        "pacing_bound_s": math.ceil(len(theirs) / (len(survivors) * leasing.rate)) - 1,
        "connected_s": _latest([after[s].connected_at for s in theirs]) - killed_at,
        "observed_s": observed,
        "bound_s": bound,
        "lease_changes": sum(settled[s].epoch - before[s].epoch for s in before),
        "others_moved": sum(1 for s in others if settled[s].owner != before[s].owner),
        "reconnects": watch.connects_since(killed_at),
    }
    return result, settled


def join(
    watch: Watch,
    group: dict[str, Instance],
    joiner: str,
    before: dict[str, Place],
    leasing: Leasing,
) -> Params:
    """
    Start C{joiner} while the others hold every site (C{before}) and wait
    until the sites are balanced over all of them.
    """
    started = time.time()
    group[joiner].start()
    wait_for(group[joiner].healthy, 60, f"{joiner} healthy")
    joined_at = wait_for(lambda: watch.live().get(joiner), 60, f"{joiner} live")
    after = balanced(watch, sorted(group), 60 + 3 * len(before) / leasing.rate)
    changed = [s for s in before if after[s].epoch != before[s].epoch]
    last = _latest([after[s].connected_at for s in changed])
    share = sum(1 for p in after.values() if p.owner == joiner)
    moved = sum(1 for s in before if after[s].owner != before[s].owner)
    return {
        "joiner": joiner,
        "sites": len(before),
        "ideal": share,
        "moved": moved,
        "moved_per_ideal": moved / share if share else math.nan,
        "lease_changes": sum(after[s].epoch - before[s].epoch for s in before),
        "reconnects": watch.connects_since(started),
        "balanced_from_start_s": last - started,
        "balanced_from_join_s": last - joined_at,
        "first_moved_s": _earliest([after[s].changed_at for s in changed]) - joined_at,
        "start_to_join_s": joined_at - started,
        "paced_s": share / leasing.rate,
    }


def failover_series(run: Runner, size: Params, label: str, leasing: Leasing, times: int) -> Params:
    """
    Three instances share C{cluster_sites} sites: a cold start (every site
    enabled at once on three live instances), then C{times} failovers,
    each followed by the join of the killed instance started again.
    """
    sites = workload.site_ids(size["cluster_sites"])
    directory = run.workdir / f"cluster-{label}"
    others = environment.Others()
    with (
        Broker(directory / "broker") as broker,
        Database("cluster") as db,
        Watch(db.dsn) as watch,
        instances(db.dsn, directory, NAMES, leasing.args()) as group,
    ):
        workload.insert_sites(db.dsn, sites, broker.port, enabled=False)
        start(list(group.values()), watch, clustered=True)
        enabled_at = time.time()
        watch.enable()
        placement = balanced(watch, NAMES, 120 + 3 * len(sites) / leasing.rate)
        cold = {
            "seconds": _latest([p.connected_at for p in placement.values()]) - enabled_at,
            "paced_s": math.ceil(len(sites) / len(NAMES)) / leasing.rate,
        }
        run.say(f"cluster {label}: {len(sites)} sites on 3 instances in {cold['seconds']:.1f}s")
        failovers, joins = [], []
        for n in range(times):
            victim = NAMES[n % len(NAMES)]
            result, placement = failover(watch, group, victim, leasing)
            failovers.append(result)
            run.say(
                f"cluster {label} failover {n}: {result['sites']} sites of {victim} connected "
                f"elsewhere after {result['connected_s']:.2f}s (bound {result['bound_s']:g}s "
                "+ connect)"
            )
            joined = join(watch, group, victim, placement, leasing)
            joins.append(joined)
            run.say(
                f"cluster {label} join {n}: {joined['moved']} sites moved "
                f"(ideal {joined['ideal']}), {joined['reconnects']} reconnects, balanced "
                f"{joined['balanced_from_join_s']:.2f}s after it joined"
            )
        checks = watch.checks()
    return {
        "label": label,
        "sites": len(sites),
        "instances": len(NAMES),
        "leasing": leasing.figures(),
        "cold_start": cold,
        "failovers": failovers,
        "joins": joins,
        "epochs_with_two_writers": checks["epochs_with_two_writers"],
        **others.figures(),
    }


#: The throughput runs: (key, instances, clustered).
MODES = (("alone", 1, False), ("one", 1, True), ("three", 3, True))


def _taking_part(
    group: dict[str, Instance], broker: Mosquitto, watch: Watch
) -> dict[str, list[int]]:
    """
    The processes of a throughput run by role: the instances, the broker,
    and PostgreSQL's that work for this run (L{Watch.server_pids}).
    """
    return {
        "instances": [i.process.pid for i in group.values() if i.process is not None],
        "broker": [broker.process.pid] if broker.process is not None else [],
        "postgres": watch.server_pids(),
    }


def _cpu_seconds(roles: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    return {
        role: {pid: environment.process_cpu_seconds(pid) for pid in pids}
        for role, pids in roles.items()
    }


def _cpu_used(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """
    CPU seconds each role used between two readings (a process that
    started meanwhile counts from 0; one that ended meanwhile is missed).
    """
    return {
        role: sum(seconds - before[role].get(pid, 0.0) for pid, seconds in now.items())
        for role, now in after.items()
    }


def throughput_run(run: Runner, size: Params, rep: int, mode: str) -> Params:
    """
    A backlog queued (QoS 1, persistent sessions), then the instances of
    C{mode} started with every site disabled, then every site enabled at
    once: messages a second until every one is committed.
    """
    _, count_instances, clustered = next(m for m in MODES if m[0] == mode)
    names = NAMES[:count_instances]
    sites = workload.site_ids(size["cluster_ingest_sites"])
    count = size["cluster_messages"]
    # A rate that lets each instance take all its sites at once: pacing
    # is measured by the failover series, not here.
    args = ["--cluster", "--handover-rate", str(len(sites))] if clustered else []
    client_ids = [
        SiteConfig(site_id=s, host="127.0.0.1").client_id(None if clustered else names[0])
        for s in sites
    ]
    directory = run.workdir / f"cluster-ingest-{mode}-{rep}"
    with (
        Broker(directory / "broker") as broker,
        Database("cluster_ingest") as db,
        Watch(db.dsn) as watch,
        instances(db.dsn, directory, names, args) as group,
    ):
        workload.insert_sites(db.dsn, sites, broker.port, enabled=False)
        workload.prime(broker.port, client_ids, sites)
        _, readings = workload.publish_backlog(broker.port, sites, count)
        start(list(group.values()), watch, clustered)
        others = environment.Others()
        cpu = _cpu_seconds(_taking_part(group, broker, watch))
        machine = environment.cpu_times()
        started = time.perf_counter()
        watch.enable()
        wait_for(
            lambda: watch.counted() >= count, 120 + count / 200, "every message committed", 0.05
        )
        seconds = time.perf_counter() - started
        busy = environment.busy_percent(machine, environment.cpu_times())
        used = _cpu_used(cpu, _cpu_seconds(_taking_part(group, broker, watch)))
        figures = others.figures()
        scraped = [instance.metrics() for instance in group.values()]
        for instance in group.values():
            instance.terminate()
        for instance in group.values():
            instance.wait()
        with ThreadPoolExecutor(max_workers=len(client_ids)) as pool:
            left = sum(pool.map(lambda c: wire.count_queued(broker.port, c, wait=0.3), client_ids))
        counted = watch.counted()
        checks = watch.checks()
    check = {
        "topics_counted": counted,
        "readings_expected": readings,
        "readings_stored": checks["readings_stored"],
        "dead_letters": checks["dead_letters"],
        "left_on_broker": left,
        "epochs_with_two_writers": checks["epochs_with_two_writers"],
    }
    check["ok"] = (
        counted == count
        and checks["readings_stored"] == readings
        and checks["dead_letters"] == 0
        and left == 0
        and checks["epochs_with_two_writers"] == 0
    )
    return {
        "mode": mode,
        "instances": count_instances,
        "clustered": clustered,
        "sites": len(sites),
        "messages": count,
        "seconds": seconds,
        "rate": count / seconds,
        "cpu_us_per_message": 1e6 * used["instances"] / count,
        "postgres_us_per_message": 1e6 * used["postgres"] / count,
        "broker_us_per_message": 1e6 * used["broker"] / count,
        "machine_busy_percent": busy,
        "own_busy_percent": 100 * sum(used.values()) / seconds,
        **_batches(scraped),
        "check": check,
        **figures,
    }


def _batches(scraped: list[dict[str, float]]) -> Params:
    """
    The instances' batches from their metrics: how many messages one held
    and how long one took to commit, on average, and how many the fence
    refused.
    """

    def total(name: str) -> float:
        return sum(samples.get(name, 0.0) for samples in scraped)

    batches = total("mqttsvc_batch_size_count")
    return {
        "batches": batches,
        "mean_batch": total("mqttsvc_batch_size_sum") / max(1.0, batches),
        "mean_commit_ms": 1000 * total("mqttsvc_commit_seconds_sum") / max(1.0, batches),
        "fenced_batches": total("mqttsvc_fenced_batches_total"),
    }


def throughput_rep(run: Runner, size: Params, rep: int) -> Params:
    """
    One repetition: each mode on a backlog of its own, in an order that
    turns with the repetition (so none always runs first).
    """
    order = [m[0] for m in MODES]
    order = order[rep % len(order) :] + order[: rep % len(order)]
    result = {mode: throughput_run(run, size, rep, mode) for mode in order}
    result["three_per_one"] = result["three"]["rate"] / result["one"]["rate"]
    result["one_per_alone"] = result["one"]["rate"] / result["alone"]["rate"]
    ok = all(result[m]["check"]["ok"] for m in order)
    run.say(
        f"cluster throughput {rep}: alone {result['alone']['rate']:.0f}/s, "
        f"1 instance {result['one']['rate']:.0f}/s, 3 instances {result['three']['rate']:.0f}/s "
        f"(the three and PostgreSQL busy {result['three']['own_busy_percent']:.0f}% of "
        f"{100 * (os.cpu_count() or 1)}%), checks {'ok' if ok else 'FAILED'}"
    )
    return result


def scenario(run: Runner, size: Params, reps: int) -> Params:
    """
    The whole scenario: the failover series with the sizes' lease settings
    (the defaults, but for the smoke test's tiny size), the labelled one
    with short leases if the size asks for it, and C{reps} throughput
    repetitions.
    """
    leasing = Leasing(size["cluster_ttl"], size["cluster_renew"], size["cluster_rate"])
    result: Params = {
        "failover": failover_series(run, size, "main", leasing, size["cluster_failovers"])
    }
    if size["cluster_short_failovers"]:
        short = Leasing(
            size["cluster_short_ttl"], size["cluster_short_renew"], size["cluster_short_rate"]
        )
        result["short"] = failover_series(
            run, size, "short", short, size["cluster_short_failovers"]
        )
    result["throughput"] = [throughput_rep(run, size, r) for r in range(reps)]
    return result
