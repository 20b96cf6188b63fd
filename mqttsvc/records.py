"""
The values that cross from one room to another: what a message did (the
effects that processing makes and the database writes), and what a site's
connection reports (its state, its transitions, and what the database
remembers of it when mqttsvc starts).

This module imports nothing of mqttsvc, so that every package may import
it and none has to import another's records.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import attrs


class DeviceKey(NamedTuple):
    """
    Identifies a device: dataloggers are known under their gateway.

    A named tuple: one is made and hashed per message (the offline
    detector's key), and a tuple's hash and equality are a fraction of an
    attrs class's.
    """

    site_id: str
    kind: str
    gateway_id: str | None
    device_id: str


@attrs.frozen
class TopicSeen:
    """
    A message arrived on this exact topic.
    """

    site_id: str
    topic: str
    at: datetime
    #: The raw payload, kept for a dead letter should the database refuse
    #: the message's other effects.
    payload: bytes = attrs.field(default=b"", repr=False, eq=False)


@attrs.frozen
class DeviceSeen:
    """
    A device spoke (a heartbeat, or a sensor's data); it is alive.

    @ivar gateway_id: a datalogger's gateway; None for other kinds.
    @ivar payload: the message's JSON object, as the text it came in.
    @ivar reported_status: the heartbeat's own C{status} field.
    @ivar interval: seconds until the next heartbeat is due, if it said.
    @ivar ts: the message's own time, when it gave one (else the receive
        time stands for it): the stored payload and reported status follow
        the newest; liveness follows the receive time C{at}.
    """

    site_id: str
    kind: str
    gateway_id: str | None
    device_id: str
    at: datetime
    payload: str
    reported_status: str | None = None
    interval: float | None = None
    ts: datetime | None = None

    @property
    def key(self) -> DeviceKey:
        return DeviceKey(self.site_id, self.kind, self.gateway_id, self.device_id)


@attrs.frozen
class DeviceStatus:
    """
    A device's liveness changed (online, offline or unknown), and why.

    @ivar recorded: whether it is an event; not when a device only returns
        to the status it had before its site made it unknown (its row is
        updated all the same).
    """

    key: DeviceKey
    from_status: str
    status: str
    at: datetime
    reason: str
    recorded: bool = True


@attrs.frozen
class SiteDevicesStatus:
    """
    Every device of a site changed to one status at once (unknown, when
    its connection is lost or mqttsvc starts), and why: one event and one
    statement per table, however many devices the site has.

    @ivar devices: how many devices changed.
    """

    site_id: str
    status: str
    at: datetime
    reason: str
    devices: int


@attrs.frozen
class Reading:
    """
    One sensor value at one time.
    """

    site_id: str
    sensor_id: str
    ts: datetime
    name: str
    value: float
    unit: str | None
    received_at: datetime


@attrs.frozen
class DeadLetter:
    """
    A message that could not be processed, kept with the reason.

    The topic may hold what the database cannot store as text (a NUL, or
    lone surrogates standing for bytes that are not UTF-8); the writer
    escapes it and keeps the raw bytes beside it (L{mqttsvc.db.batch}).

    @ivar size: the payload's full size in bytes when C{payload} is only its
        beginning (the broker connection did not keep the rest); None when it is
        whole.
    @ivar sha256: the full payload's SHA-256 when it was cut.
    """

    site_id: str
    topic: str
    payload: bytes
    reason: str
    at: datetime
    size: int | None = None
    sha256: bytes | None = None


Effect = TopicSeen | DeviceSeen | Reading | DeadLetter | DeviceStatus | SiteDevicesStatus


@attrs.frozen
class StatusUpdate:
    """
    The connection state of one site as the C{mqtt_connection} row shows it.
    """

    site_id: str
    status: str
    last_connected_at: datetime | None
    retry_count: int
    next_retry: datetime | None
    last_error: str | None


@attrs.frozen
class ConnectionEvent:
    """
    One transition of a site's connection, for the C{connection_event}
    history.
    """

    site_id: str
    at: datetime
    from_state: str
    to_state: str
    reason: str | None


@attrs.frozen
class ResumeState:
    """
    What the database remembers of a site's connection when mqttsvc starts.
    """

    status: str
    retry_count: int
    next_retry: datetime | None
    last_error: str | None
    last_connected_at: datetime | None
