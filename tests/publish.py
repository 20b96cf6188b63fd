"""
A real MQTT publisher for tests: paho in a worker thread, QoS 1, waiting
for every PUBACK.
"""

from __future__ import annotations

import uuid

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from twisted.internet.threads import deferToThread


def publish_blocking(host: str, port: int, messages: list[tuple[str, bytes]], retain: bool) -> None:
    """
    Publish C{(topic, payload)} pairs with QoS 1 from this thread, and
    return once the broker has acknowledged all of them (10 s each at most).
    """
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}")
    client.connect(host, port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1, retain=retain) for t, p in messages]
        for info in infos:
            info.wait_for_publish(timeout=10)
            if not info.is_published():
                raise AssertionError("the broker did not acknowledge a publish within 10 s")
    finally:
        client.disconnect()
        client.loop_stop()


async def publish(
    messages: list[tuple[str, bytes]],
    host: str = "127.0.0.1",
    port: int = 1883,
    retain: bool = False,
) -> None:
    """
    Publish C{(topic, payload)} pairs with QoS 1 and return once the broker
    has acknowledged all of them.
    """
    await deferToThread(publish_blocking, host, port, messages, retain)
