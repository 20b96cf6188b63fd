"""
/metrics and /readyz of a running service tree.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BROKER_HOST, free_port
from tests.publish import publish
from tests.service import RunningService
from tests.waiting import eventually


def base(service: RunningService) -> str:
    return service.url.rsplit("/rpc", 1)[0]


async def samples(service: RunningService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await treq.get(base(service) + "/metrics", persistent=False)
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type")[0].startswith("text/plain")
    text = (await response.content()).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_metrics_follow_the_live_state(running: RunningService, site_id: str) -> None:
    """Per-site state and counters, batch histograms, queue depth and devices by status."""
    await running.call("site.create", {"site_id": site_id, "host": BROKER_HOST})

    async def connected() -> bool:
        m = await samples(running)
        return m.get(("mqttsvc_site_state", (("site_id", site_id), ("state", "connected")))) == 1

    await eventually(connected, what="the connected state in the metrics")
    await publish(
        [(f"{site_id}/gateway/g/heartbeat", b"{}"), (f"{site_id}/gateway/g/heartbeat", b"x")]
    )

    async def counted() -> Any:
        m = await samples(running)
        return (
            m if m.get(("mqttsvc_messages_committed_total", (("site_id", site_id),))) == 2 else None
        )

    m = await eventually(counted, what="two committed messages")
    assert m[("mqttsvc_messages_received_total", (("site_id", site_id),))] == 2
    assert m[("mqttsvc_messages_rejected_total", (("site_id", site_id),))] == 1
    assert m[("mqttsvc_site_connects_total", (("site_id", site_id),))] == 1
    assert m[("mqttsvc_site_state", (("site_id", site_id), ("state", "waiting")))] == 0
    assert m[("mqttsvc_batch_size_count", ())] >= 1
    assert m[("mqttsvc_commit_seconds_count", ())] >= 1
    assert m[("mqttsvc_write_queue_depth", ())] >= 0
    assert m[("mqttsvc_devices", (("status", "online"),))] == 1


@pytest_twisted.ensureDeferred
async def test_metrics_show_http_refusals(running: RunningService) -> None:
    """
    Issue 13: the open connections and streams, the cap, and what the HTTP
    server refused (here one body over the limit) are metrics.
    """
    from twisted.internet.threads import deferToThread

    from mqttsvc.control.httpserver import default_max_connections, descriptor_limit
    from tests.test_http_abuse import exchange

    port = int(base(running).rsplit(":", 1)[1])
    head = b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"
    answer, _ = await deferToThread(exchange, port, head)
    assert answer.startswith(b"HTTP/1.1 413 ")
    m = await samples(running)
    assert m[("mqttsvc_http_refused_total", (("reason", "body"),))] == 1
    assert m[("mqttsvc_http_refused_total", (("reason", "connection"),))] == 0
    assert m[("mqttsvc_http_connections", ())] >= 1
    assert m[("mqttsvc_http_max_connections", ())] == default_max_connections(descriptor_limit())
    assert m[("mqttsvc_event_streams", ())] == 0


@pytest_twisted.ensureDeferred
async def test_alone_the_instance_is_named_and_no_member(running: RunningService) -> None:
    """
    Issue 17: without --cluster the instance's name is its info series, it
    is no member, its cluster series are 0, and the fenced batches and
    messages are those its writer's lanes counted (0 alone; set here on
    the lanes to see them summed into the exposition).
    """
    m = await samples(running)
    assert m[("mqttsvc_instance_info", (("instance", "test"),))] == 1
    assert m[("mqttsvc_cluster_member", ())] == 0
    assert m[("mqttsvc_cluster_owned_sites", ())] == 0
    assert m[("mqttsvc_cluster_lease_renewals_total", (("result", "ok"),))] == 0
    assert m[("mqttsvc_fenced_batches_total", ())] == 0
    assert m[("mqttsvc_fenced_messages_total", ())] == 0
    lanes = running.ingest.writer.lanes
    assert len(lanes) >= 2
    lanes[0].batches_fenced, lanes[0].messages_fenced = 1, 4
    lanes[-1].batches_fenced, lanes[-1].messages_fenced = 2, 3
    m = await samples(running)
    assert m[("mqttsvc_fenced_batches_total", ())] == 3
    assert m[("mqttsvc_fenced_messages_total", ())] == 7


@pytest_twisted.ensureDeferred
async def test_ready_when_the_database_answers(running: RunningService) -> None:
    response = await treq.get(base(running) + "/readyz", persistent=False)
    assert response.code == 200
    assert await response.json() == {"status": "ready"}


@pytest_twisted.ensureDeferred
async def test_not_ready_without_a_database() -> None:
    """With the database unreachable, /readyz answers 503 with the reasons."""
    from twisted.internet import reactor

    service = RunningService(reactor, f"host=127.0.0.1 port={free_port()} dbname=nothing")
    service.root.startService()
    port = await service.root.getServiceNamed("web")._waitingForPort
    try:
        response = await treq.get(
            f"http://127.0.0.1:{port.getHost().port}/readyz", persistent=False
        )
        assert response.code == 503
        body = await response.json()
        assert body["status"] == "not ready"
        assert "the sites have not been loaded from the database yet" in body["reasons"]
        assert any(r.startswith("the database does not answer") for r in body["reasons"])
        health = await treq.get(f"http://127.0.0.1:{port.getHost().port}/healthz", persistent=False)
        assert health.code == 200
    finally:
        stopped = service.root.stopService()
        stopped.addTimeout(20, reactor)
        await stopped
