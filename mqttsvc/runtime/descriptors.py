"""
File descriptors: the budget every site draws on.

Each connected site holds one descriptor (its broker socket), as does every
database connection, HTTP client, event stream and log file.  Under the
usual soft limit of 1,024 a deployment tops out near a thousand sites, and
then fails as one connect error per site.  So mqttsvc raises its soft limit
towards the hard one at start (L{raise_soft_limit}), and reports what it
needs against what it has (L{DescriptorBudget}: C{service.status} and
C{/metrics}), warning well before the limit.

Imports nothing of mqttsvc: the wiring is in L{mqttsvc.tap}.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: The soft limit is raised at most to this (Linux's default fs.nr_open),
#: when the hard limit is unlimited.
CEILING = 1 << 20

#: Descriptors kept for everything but the sites and the HTTP clients: the
#: database pools and listeners, log files, the manhole, a connect thread's
#: socket in flight.
RESERVED = 64

#: Warn once the descriptors needed reach this share of the limit.
WARN_SHARE = 0.8

#: Seconds a count of the open descriptors is reused: counting lists
#: /proc/self/fd, which with 1,000 sites cost C{service.status} two thirds
#: of its rate (3,880 to 1,252 req/s in C{make bench}).
OPEN_COUNT_MAX_AGE = 1.0

log = Logger()


def raise_soft_limit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> tuple[int, int, int]:
    """
    Raise the soft RLIMIT_NOFILE to the hard limit (at most L{CEILING}).

    @return: the soft limit before and after, and the hard limit (a soft
        limit that cannot be raised stays as it was).
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    wanted = CEILING if hard == resource.RLIM_INFINITY else min(hard, CEILING)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as e:
            log.warn(
                "could not raise the file descriptor limit from {soft} to {wanted}: {error}",
                soft=soft,
                wanted=wanted,
                error=str(e),
            )
            return soft, soft, hard
        return soft, wanted, hard
    return soft, soft, hard


def soft_limit() -> int:
    """The soft RLIMIT_NOFILE now (L{CEILING} for unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return CEILING if soft == resource.RLIM_INFINITY else soft


def open_descriptors() -> int:
    """How many descriptors the process has open (Linux: /proc/self/fd)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own
    except OSError:
        return -1


class DescriptorBudget:
    """
    What the sites and the rest need, against the limit.

    @param sites: how many sites run (each needs a descriptor).
    @param http_connections: the HTTP connection cap.
    @param clock: with one, a count of the open descriptors is reused for
        L{OPEN_COUNT_MAX_AGE} seconds.
    """

    def __init__(
        self,
        sites: Callable[[], int],
        http_connections: int,
        limit: Callable[[], int] = soft_limit,
        open_now: Callable[[], int] = open_descriptors,
        clock: IReactorTime | None = None,
    ) -> None:
        self._sites = sites
        self._http = http_connections
        self._limit = limit
        self._open_now = open_now
        self._clock = clock
        self._counted: tuple[float, int] | None = None
        self._warned = False

    def _open(self) -> int:
        if self._clock is None:
            return self._open_now()
        now = self._clock.seconds()
        if self._counted is None or now - self._counted[0] >= OPEN_COUNT_MAX_AGE:
            self._counted = (now, self._open_now())
        return self._counted[1]

    def report(self) -> dict[str, Any]:
        """
        C{limit}, C{open}, C{sites}, C{needed} (a descriptor per site, the
        HTTP cap and L{RESERVED}), C{sites_possible} (how many sites the
        limit leaves room for) and C{warning} (None, or why to act).
        """
        limit, sites = self._limit(), self._sites()
        needed = sites + self._http + RESERVED
        warning = None
        if needed >= WARN_SHARE * limit:
            warning = (
                f"{sites} sites need about {needed} file descriptors with the HTTP cap "
                f"({self._http}) and the rest ({RESERVED}); the limit is {limit}: raise "
                "RLIMIT_NOFILE (LimitNOFILE= in systemd, ulimits in compose)"
            )
            if not self._warned:
                log.warn("{warning}", warning=warning)
        self._warned = warning is not None
        return {
            "limit": limit,
            "open": self._open(),
            "sites": sites,
            "needed": needed,
            "sites_possible": max(0, limit - self._http - RESERVED),
            "warning": warning,
        }
