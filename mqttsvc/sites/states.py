"""
The states of a site's connection: the one list the state machine, the
status it maps to and the metrics all read.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

STOPPED = "stopped"
CONNECTING = "connecting"
CONNECTED = "connected"
WAITING = "waiting"
ERROR = "error"
STOPPING = "stopping"
RESTARTING = "restarting"

#: Every state of the machine (L{mqttsvc.sites.site}), and the
#: C{mqtt_connection.status} value it shows as.
STATUS_OF_STATE: Mapping[str, str] = MappingProxyType(
    {
        STOPPED: "disconnected",
        CONNECTING: "connecting",
        CONNECTED: "connected",
        WAITING: "disconnected",
        ERROR: "error",
        STOPPING: "disconnected",
        RESTARTING: "connecting",
    }
)

#: The states, in the order the metrics list them.
STATES: tuple[str, ...] = tuple(STATUS_OF_STATE)

#: The connection statuses a site can be in, as C{service.status} counts
#: them (in this order).
STATUSES: tuple[str, ...] = ("connected", "connecting", "disconnected", "error")

assert set(STATUSES) == set(STATUS_OF_STATE.values())
