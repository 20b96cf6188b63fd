"""
Per-site counters last as long as the process, across a site's stops and
starts (issue 15, item 10), and /metrics shows every site, a stopped one
too (item 12).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.conftest import BROKER_HOST
from tests.publish import publish
from tests.service import RunningService
from tests.test_observability import samples
from tests.waiting import eventually


async def status_when(running: RunningService, site_id: str, **wanted: Any) -> dict[str, Any]:
    async def check() -> Any:
        status: dict[str, Any] = await running.call("site.status", {"site_id": site_id})
        return status if all(status[k] == v for k, v in wanted.items()) else None

    result: dict[str, Any] = await eventually(check, what=f"{site_id} with {wanted}")
    return result


@pytest_twisted.ensureDeferred
async def test_counters_survive_a_stop_and_a_start(running: RunningService, site_id: str) -> None:
    """
    Three messages, a stop, a start and two more: the site counts five
    received (and one rejected), in site.status while stopped and after,
    and in /metrics, where the stopped site shows as stopped with its
    counts (before, a stopped site was missing and a started one began at
    zero).
    """
    topic = f"{site_id}/gateway/g/heartbeat"
    await running.call("site.create", {"site_id": site_id, "host": BROKER_HOST})
    await status_when(running, site_id, state="connected")
    await publish([(topic, b"{}"), (topic, b"{}"), (topic, b"not json")])
    await status_when(running, site_id, messages_received=3)
    await running.call("site.stop", {"site_id": site_id})
    stopped = await status_when(running, site_id, state="stopped")
    assert (stopped["messages_received"], stopped["messages_rejected"]) == (3, 1)
    assert stopped["last_message_at"] is not None
    m = await samples(running)
    assert m[("mqttsvc_site_state", (("site_id", site_id), ("state", "stopped")))] == 1
    assert m[("mqttsvc_site_state", (("site_id", site_id), ("state", "connected")))] == 0
    assert m[("mqttsvc_messages_received_total", (("site_id", site_id),))] == 3

    await running.call("site.start", {"site_id": site_id})
    await status_when(running, site_id, state="connected")
    await publish([(topic, b"{}"), (topic, b"{}")])
    again = await status_when(running, site_id, messages_received=5)
    assert again["messages_rejected"] == 1
    m = await samples(running)
    assert m[("mqttsvc_messages_received_total", (("site_id", site_id),))] == 5
    assert m[("mqttsvc_site_connects_total", (("site_id", site_id),))] == 2
    assert m[("mqttsvc_site_state", (("site_id", site_id), ("state", "connected")))] == 1
