"""
The baselines mqttsvc is compared with in the same run:

 - L{drain} with no handler: a bare paho-mqtt client per site, every
   socket multiplexed on one thread, reading each socket until it is
   empty (as mqttsvc's transport does) and acknowledging at once, with no
   processing at all.  The fastest a Python paho consumer can empty the
   backlog.
 - L{OldProcessor}: the design mqttsvc replaces: per message, route by
   regular expression, parse, look each row up, update or insert it, and
   commit, synchronously, before paho acknowledges.
"""

from __future__ import annotations

import json
import re
import select
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import psycopg2
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

#: Packets read from one socket before the loop looks at the others.
READ_BUDGET = 200


def drain(
    port: int,
    client_ids: list[str],
    expected: int,
    timeout: float,
    handle: Callable[[str, bytes], None] | None = None,
) -> dict[str, Any]:
    """
    Resume the persistent sessions C{client_ids} and consume until
    C{expected} messages have been handled (and so acknowledged).

    @return: C{messages}, C{seconds} (from the first connect until the last
        message was handled) and C{cpu_seconds} of this process.
    """
    count = 0

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        nonlocal count
        if handle is not None:
            handle(message.topic, bytes(message.payload))
        count += 1

    cpu = time.process_time()
    started = time.perf_counter()
    clients = []
    for client_id in client_ids:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        client.on_message = on_message
        client.connect("127.0.0.1", port, keepalive=60)
        clients.append(client)
    sockets: dict[Any, paho.Client] = {c.socket(): c for c in clients}
    deadline = started + timeout
    last_misc = started
    finished = started
    while count < expected:
        now = time.perf_counter()
        if now > deadline:
            break
        writing = [s for s, c in sockets.items() if c.want_write()]
        readable, writable, _ = select.select(list(sockets), writing, [], 0.1)
        for sock in readable:
            client = sockets[sock]
            for _ in range(READ_BUDGET):
                rc = client._packet_read()
                if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                    break
                if rc > 0:
                    raise RuntimeError(f"connection lost: {paho.error_string(rc)}")
            if client.want_write():
                client.loop_write()
        for sock in writable:
            sockets[sock].loop_write()
        if now - last_misc > 1.0:
            last_misc = now
            for c in clients:
                c.loop_misc()
        finished = time.perf_counter()
    seconds = finished - started
    cpu = time.process_time() - cpu
    for c in clients:
        while c.want_write():
            c.loop_write()
        c.disconnect()
    return {"messages": count, "seconds": seconds, "cpu_seconds": cpu}


_GATEWAY = r"^([^/]+)/gateway/([^/]+)/heartbeat$"
_DATALOGGER = r"^([^/]+)/datalogger/([^/]+)/([^/]+)/heartbeat$"
_SENSOR = r"^([^/]+)/sensor/([^/]+)/data$"


class OldProcessor:
    """
    The old processor's write path: one synchronous transaction per
    message, each row looked up, then updated or inserted.
    """

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg2.connect(dsn)
        self._cur = self._conn.cursor()

    def close(self) -> None:
        self._conn.close()

    def handle(self, topic: str, payload: bytes) -> None:
        cur = self._cur
        data = json.loads(payload.decode())
        text = json.dumps(data)
        site = topic.split("/", 1)[0]
        cur.execute(
            "SELECT id FROM discovered_topic WHERE site_id = %s AND topic_path = %s", (site, topic)
        )
        row = cur.fetchone()
        if row:
            cur.execute(
                "UPDATE discovered_topic SET last_seen_at = now(), "
                "message_count = message_count + 1 WHERE id = %s",
                (row[0],),
            )
        else:
            cur.execute(
                "INSERT INTO discovered_topic (site_id, topic_path, first_seen_at, last_seen_at, "
                "message_count) VALUES (%s, %s, now(), now(), 1)",
                (site, topic),
            )
        if m := re.match(_SENSOR, topic):
            self._device(cur, "sensor", ("sensor_id",), (m.group(1), m.group(2)), text)
            values = dict(data.get("values") or {})
            if "value" in data:
                values["value"] = data["value"]
            for name, value in values.items():
                cur.execute(
                    "INSERT INTO sensor_reading (site_id, sensor_id, ts, name, value, unit) "
                    "VALUES (%s, %s, to_timestamp(%s), %s, %s, %s) ON CONFLICT DO NOTHING",
                    (m.group(1), m.group(2), data["ts"], name, value, data.get("unit")),
                )
        elif m := re.match(_DATALOGGER, topic):
            self._device(cur, "datalogger", ("gateway_id", "datalogger_id"), m.groups(), text)
        elif m := re.match(_GATEWAY, topic):
            self._device(cur, "gateway", ("gateway_id",), m.groups(), text)
        self._conn.commit()

    @staticmethod
    def _device(
        cur: Any, table: str, id_columns: tuple[str, ...], ids: tuple[str, ...], payload: str
    ) -> None:
        where = " AND ".join(f"{c} = %s" for c in ("site_id", *id_columns))
        cur.execute(f"SELECT id FROM {table} WHERE {where}", ids)
        row = cur.fetchone()
        if row:
            cur.execute(
                f"UPDATE {table} SET last_seen_at = now(), last_payload = %s, status = 'online' "
                "WHERE id = %s",
                (payload, row[0]),
            )
        else:
            columns = ", ".join(("site_id", *id_columns))
            marks = ", ".join(["%s"] * len(ids))
            cur.execute(
                f"INSERT INTO {table} ({columns}, status, first_seen_at, last_seen_at, "
                f"last_payload) VALUES ({marks}, 'online', now(), now(), %s)",
                (*ids, payload),
            )
