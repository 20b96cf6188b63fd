"""
File descriptors (issue 15, item 17): the soft limit is raised towards the
hard one at start, and what the sites need is shown against the limit in
service.status and /metrics, with a warning well before it is reached.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet.task import Clock

from mqttsvc.control.httpserver import default_max_connections, descriptor_limit
from mqttsvc.runtime.descriptors import (
    CEILING,
    OPEN_COUNT_MAX_AGE,
    RESERVED,
    DescriptorBudget,
    raise_soft_limit,
)
from tests.conftest import BROKER_HOST
from tests.service import RunningService
from tests.test_observability import samples
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[1]


def test_the_soft_limit_is_raised_to_the_hard_one_in_a_real_process() -> None:
    """
    A process started with the usual soft limit of 1,024 (and a higher hard
    one) has the hard limit as its soft limit after raise_soft_limit.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = CEILING if hard == resource.RLIM_INFINITY else min(hard, CEILING)
    assert expected > 1024, "this machine's hard limit leaves nothing to raise"
    script = (
        "import json, resource\n"
        "from mqttsvc.runtime.descriptors import raise_soft_limit\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))\n"
        "result = raise_soft_limit()\n"
        "print(json.dumps([*result, resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    before, after, _, now = json.loads(run.stdout)
    assert (before, after, now) == (1024, expected, expected)


def test_an_unlimited_hard_limit_raises_to_the_ceiling_and_a_refusal_keeps_the_soft_one() -> None:
    """With no hard limit the soft one goes to CEILING; if refused, it stays, logged."""
    calls: list[tuple[int, int]] = []

    def unlimited(_: int) -> tuple[int, int]:
        return 1024, resource.RLIM_INFINITY

    assert raise_soft_limit(unlimited, lambda _, v: calls.append(v)) == (
        1024,
        CEILING,
        resource.RLIM_INFINITY,
    )
    assert calls == [(CEILING, resource.RLIM_INFINITY)]

    def refuse(_: int, __: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    assert raise_soft_limit(lambda _: (1024, 4096), refuse) == (1024, 1024, 4096)


def test_the_budget_warns_well_before_the_limit() -> None:
    """Sites + HTTP cap + reserve under 80% of the limit: no warning; at 80%: a warning."""
    sites = [0]
    budget = DescriptorBudget(lambda: sites[0], 256, limit=lambda: 1024, open_now=lambda: 40)
    report = budget.report()
    assert report == {
        "limit": 1024,
        "open": 40,
        "sites": 0,
        "needed": 256 + RESERVED,
        "sites_possible": 1024 - 256 - RESERVED,
        "warning": None,
    }
    sites[0] = 499  # 499 + 256 + 64 = 819 < 819.2
    assert budget.report()["warning"] is None
    sites[0] = 500
    warning = budget.report()["warning"]
    assert warning is not None and "500 sites" in warning and "1024" in warning


def test_the_open_count_is_reused_for_a_second() -> None:
    """Counting open descriptors lists /proc/self/fd: once a second at most, with a clock."""
    clock = Clock()
    counts = iter(range(40, 50))
    budget = DescriptorBudget(
        lambda: 1, 256, limit=lambda: 1024, open_now=lambda: next(counts), clock=clock
    )
    assert [budget.report()["open"] for _ in range(3)] == [40, 40, 40]
    clock.advance(OPEN_COUNT_MAX_AGE)
    assert budget.report()["open"] == 41


@pytest_twisted.ensureDeferred
async def test_service_status_and_metrics_show_descriptors(
    running: RunningService, site_id: str
) -> None:
    """service.status and /metrics give the limit, those open and those the sites need."""
    await running.call("site.create", {"site_id": site_id, "host": BROKER_HOST})
    status = await eventually(
        lambda: running.call("service.status"),
        what="service.status",
    )
    limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    descriptors = status["descriptors"]
    assert descriptors["limit"] == limit
    assert descriptors["sites"] == 1 and descriptors["open"] > 0
    http_cap = default_max_connections(descriptor_limit())
    assert descriptors["needed"] == descriptors["sites"] + http_cap + RESERVED
    m = await samples(running)
    assert m[("mqttsvc_descriptors_limit", ())] == limit
    assert m[("mqttsvc_descriptors_needed", ())] == descriptors["needed"]
    assert m[("mqttsvc_descriptors_open", ())] > 0
