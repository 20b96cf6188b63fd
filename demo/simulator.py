"""
A device simulator for the mqttsvc demo: gateways, dataloggers and sensors
of a few sites publishing to one MQTT broker.

Every round it publishes, with QoS 1, for each site S:

  S/gateway/gw-01/heartbeat          {"status": "ok", "interval": 5, "ts": ..., "uptime": ...}
  S/datalogger/gw-01/dl-01/heartbeat {"status": "ok", ..., "gateway": "gw-01"}
  S/sensor/sn-001/data               {"ts": ..., "value": 21.4, "unit": "°C"}
  S/sensor/sn-004/data               {"ts": ..., "values": {"temperature": ..., "humidity": ...}}

Dataloggers are numbered across the site (gw-01 has dl-01 and dl-02, gw-02
has dl-03 and dl-04), so that every datalogger is told apart at a glance.
Every fourth sensor reports temperature and humidity together.

It is a separate process with paho's own network thread, not part of the
service, so it may block.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

#: How long a round waits for the broker's PUBACKs before it reports.
ACK_TIMEOUT = 5.0


@dataclass(frozen=True)
class Topology:
    """
    The devices of every simulated site.
    """

    sites: tuple[str, ...]
    gateways: int = 2
    dataloggers: int = 2  # per gateway
    sensors: int = 4  # per site

    def gateway_ids(self) -> list[str]:
        return [f"gw-{g:02d}" for g in range(1, self.gateways + 1)]

    def datalogger_ids(self) -> list[tuple[str, str]]:
        """
        (gateway id, datalogger id) pairs, numbered across the site.
        """
        return [
            (gw, f"dl-{g * self.dataloggers + d + 1:02d}")
            for g, gw in enumerate(self.gateway_ids())
            for d in range(self.dataloggers)
        ]

    def sensor_ids(self) -> list[str]:
        return [f"sn-{s:03d}" for s in range(1, self.sensors + 1)]


def _heartbeat(now: float, started: float, interval: float) -> dict[str, Any]:
    return {
        "status": "ok",
        "interval": int(interval) if interval == int(interval) else interval,
        "ts": int(now),
        "uptime": int(now - started),
    }


def _temperature(site: str, index: int, now: float, rng: random.Random) -> float:
    # A slow daily-looking wave, offset per sensor, plus a little noise.
    phase = (sum(site.encode()) + index) % 24
    return round(20 + 4 * math.sin(2 * math.pi * (now / 3600 + phase / 24)) + rng.gauss(0, 0.2), 2)


def sensor_payload(site: str, index: int, now: float, rng: random.Random) -> dict[str, Any]:
    """
    The reading of the C{index}th sensor (from 0) of a site.
    """
    temperature = _temperature(site, index, now, rng)
    if index % 4 == 3:
        humidity = round(min(100.0, max(0.0, 55 - (temperature - 20) * 3 + rng.gauss(0, 1))), 1)
        return {"ts": int(now), "values": {"temperature": temperature, "humidity": humidity}}
    return {"ts": int(now), "value": temperature, "unit": "°C"}


def round_messages(
    topology: Topology, now: float, started: float, interval: float, rng: random.Random
) -> list[tuple[str, dict[str, Any]]]:
    """
    The (topic, payload) pairs of one round, for every site.
    """
    messages: list[tuple[str, dict[str, Any]]] = []
    for site in topology.sites:
        for gw in topology.gateway_ids():
            messages.append((f"{site}/gateway/{gw}/heartbeat", _heartbeat(now, started, interval)))
        for gw, dl in topology.datalogger_ids():
            payload = {**_heartbeat(now, started, interval), "gateway": gw}
            messages.append((f"{site}/datalogger/{gw}/{dl}/heartbeat", payload))
        for index, sensor in enumerate(topology.sensor_ids()):
            messages.append((f"{site}/sensor/{sensor}/data", sensor_payload(site, index, now, rng)))
    return messages


def _acknowledged(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # published while disconnected; still queued
        return False


class Simulator:
    """
    Publishes rounds of device messages until stopped or C{count} rounds
    are done.
    """

    def __init__(
        self, client: mqtt.Client, topology: Topology, interval: float, count: int
    ) -> None:
        self._client = client
        self._topology = topology
        self._interval = interval
        self._count = count
        self._rng = random.Random()
        self._started = time.time()
        self._was_connected = False
        self.connected = threading.Event()
        self.stopping = threading.Event()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            print(f"simulator: the broker refused the connection: {reason_code}", flush=True)
            return
        if self._was_connected:
            print("simulator: reconnected", flush=True)
        self._was_connected = True
        self.connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if self.connected.is_set() and not self.stopping.is_set():
            print(f"simulator: disconnected ({reason_code}); reconnecting", flush=True)
        self.connected.clear()

    def stop(self) -> None:
        self.stopping.set()

    def publish_round(self, number: int) -> None:
        now = time.time()
        messages = round_messages(self._topology, now, self._started, self._interval, self._rng)
        infos = [
            self._client.publish(
                topic, json.dumps(payload, ensure_ascii=False, separators=(",", ":")), qos=1
            )
            for topic, payload in messages
        ]
        deadline = time.monotonic() + ACK_TIMEOUT
        for info in infos:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stopping.is_set():
                break
            try:
                info.wait_for_publish(remaining)
            except (RuntimeError, ValueError):
                # Not connected: paho keeps QoS 1 messages and sends them
                # after it reconnects.
                pass
        acked = sum(_acknowledged(info) for info in infos)
        sites = len(self._topology.sites)
        print(
            f"{time.strftime('%H:%M:%S')} round {number}: {len(infos)} messages "
            f"for {sites} site{'s' if sites != 1 else ''}, {acked} acknowledged",
            flush=True,
        )

    def run(self) -> None:
        self._started = time.time()
        # Rounds keep a fixed cadence however long the acknowledgements take.
        next_round = time.monotonic()
        number = 0
        while not self.stopping.is_set():
            number += 1
            self.publish_round(number)
            if self._count and number >= self._count:
                break
            next_round = max(next_round + self._interval, time.monotonic())
            self.stopping.wait(next_round - time.monotonic())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _interval(text: str) -> float:
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError("must be at least 1 second (timestamps are in seconds)")
    return value


def _sites(text: str) -> tuple[str, ...]:
    sites = tuple(s.strip() for s in text.split(",") if s.strip())
    if not sites:
        raise argparse.ArgumentTypeError("give at least one site id")
    for site in sites:
        if any(c in site for c in "/+#"):
            raise argparse.ArgumentTypeError(f"{site!r} cannot be an MQTT topic level")
    return sites


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="broker port (default 1883)")
    parser.add_argument(
        "--sites", type=_sites, required=True, help="comma-separated site ids, e.g. s1,s2"
    )
    parser.add_argument(
        "--gateways", type=_positive_int, default=2, help="gateways per site (default 2)"
    )
    parser.add_argument(
        "--dataloggers", type=_positive_int, default=2, help="dataloggers per gateway (default 2)"
    )
    parser.add_argument(
        "--sensors", type=_positive_int, default=4, help="sensors per site (default 4)"
    )
    parser.add_argument(
        "--interval", type=_interval, default=5.0, help="seconds between rounds (default 5)"
    )
    parser.add_argument(
        "--count", type=int, default=0, help="rounds to publish; 0 means until stopped (default)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    topology = Topology(args.sites, args.gateways, args.dataloggers, args.sensors)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"mqttsvc-simulator-{os.getpid()}",
        protocol=mqtt.MQTTv311,
    )
    client.max_queued_messages_set(0)  # keep everything while the broker is away
    simulator = Simulator(client, topology, args.interval, args.count)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        simulator.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    try:
        client.connect(args.host, args.port, keepalive=30)
    except OSError as e:
        print(f"simulator: cannot connect to {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not simulator.connected.wait(0.2):
            if simulator.stopping.is_set():
                return 0
            if time.monotonic() > deadline:
                print(
                    f"simulator: no CONNACK from {args.host}:{args.port} in 10 s", file=sys.stderr
                )
                return 1
        print(
            f"simulator: connected to {args.host}:{args.port}; publishing for "
            f"{', '.join(topology.sites)} every {args.interval:g} s",
            flush=True,
        )
        simulator.run()
    finally:
        simulator.stop()
        client.disconnect()
        client.loop_stop()
    print("simulator: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
