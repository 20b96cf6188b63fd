"""
A broker connection on the reactor: L{MQTTClient}, a paho-mqtt client
whose socket is driven by the Twisted reactor, and L{BrokerClient}, what a
site needs of it.

paho has no non-blocking connect: C{reconnect()} resolves the name, opens
the TCP connection and does the TLS handshake synchronously.  We run it in a
worker thread; once it returns, the socket is non-blocking and every later
read, write and keepalive check happens on the reactor thread through a
reader/writer registered with the reactor and the shared
L{KeepaliveSweep} for C{loop_misc}.  The worker thread and the sweep come
from the L{Connector <mqttsvc.mqtt.connector.Connector>} that made the
client.

The read path is ours, not paho's: a block read (L{MQTTClient._readable}),
our framing (L{MQTTClient._frame}) and PUBLISH decoding
(L{mqttsvc.mqtt.codec.decode_publish}); other packets go to paho through
the adapter (L{mqttsvc.mqtt.pahoclient.PahoClient}), the only module that
touches paho's private names.

While C{reconnect()} runs in its thread nothing on the reactor touches the
client; the socket callbacks it fires there are marshalled back with
C{callFromThread}.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import attrs
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mqttsvc.config import DEFAULT_MAX_PAYLOAD, SiteConfig
from mqttsvc.mqtt.codec import (
    HEADER_ROOM,
    PUBACK,
    QOS2_PUBLISH,
    Malformed,
    OversizedPublish,
    ReceivedMessage,
    begin_oversized,
    decode_publish,
    encode_pubacks,
    packet_size,
    varint,
)
from mqttsvc.mqtt.errors import ConnectFailed, classify_connack, classify_connect_error
from mqttsvc.mqtt.keepalive import KeepaliveSweep
from mqttsvc.mqtt.pahoclient import PahoClient
from mqttsvc.mqtt.tls import tls_context

#: Bytes read from a site's socket per readable event (about 60 small
#: PUBLISH packets): the packets in them are handled before the reactor
#: turns to other sockets, so one busy site cannot starve the others or
#: the database connection for long.
READ_SIZE = 8 * 1024

#: Linux's TCP_QUICKACK, where there is one.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _quickack(sock: Any) -> None:
    """
    Acknowledge received TCP segments at once rather than with a delayed
    ACK.  Our PUBACKs wait for the commit, so no data of ours carries the
    ACK soon; a broker that sends with Nagle's algorithm (Mosquitto does
    unless C{set_tcp_nodelay true}) then holds its next small PUBLISH until
    the delayed ACK: about 10 ms of latency per message at a steady rate.
    Linux resets the flag as it goes, so it is set again after every read.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except (OSError, AttributeError):
        pass


#: How many unacknowledged QoS 1 messages an MQTT 5 broker may have in
#: flight to us (the CONNECT's Receive Maximum).  Messages are acknowledged
#: after their batch is committed, so a window smaller than a batch (the
#: broker's own default: 20 in Mosquitto) would cap each site at a few
#: messages per commit.  MQTT 3.1.1 has no such property: there the
#: broker's setting applies (Mosquitto's C{max_inflight_messages}).
RECEIVE_MAXIMUM = 1000

#: Seconds to wait for CONNACK after the TCP (and TLS) connection is open.
CONNACK_TIMEOUT = 10.0

#: The link is taken for dead when nothing at all (not even PINGRESP) has
#: arrived for this many keepalive periods.
SILENCE_FACTOR = 2.0

#: Session expiry asked of MQTT 5 brokers, so that the persistent session
#: (and its queued QoS 1 messages) outlives our own restarts and outages.
SESSION_EXPIRY = 7 * 24 * 3600

#: A packet must arrive whole within this many keepalive periods plus one
#: second per L{PACKET_RATE_FLOOR} bytes of it, counted from its first
#: byte; otherwise the link is closed.  The silence watchdog takes any byte
#: as a sign of life, so a broker trickling one endless packet would
#: otherwise keep a site "connected" with nothing received.
PACKET_TIMEOUT_FACTOR = 1.5

#: Bytes per second below which a large packet counts as stalled (see
#: L{PACKET_TIMEOUT_FACTOR}): a 256 MiB packet gets 256 s more.
PACKET_RATE_FLOOR = 1024 * 1024


@attrs.frozen
class SubscriptionResult:
    """
    What the broker answered to one topic filter of a SUBSCRIBE.
    """

    topic: str
    granted: bool
    reason: str


@runtime_checkable
class BrokerClient(Protocol):
    """
    What a site service needs of its broker connection (L{MQTTClient}, or a
    fake in tests).
    """

    def connect(self) -> Deferred[bool]: ...

    def subscribe(self, topics: list[tuple[str, int]]) -> Deferred[list[SubscriptionResult]]: ...

    def unsubscribe(self, topics: list[str]) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def ack(self, messages: list[ReceivedMessage]) -> int: ...

    def heard_after(self, at: float) -> Deferred[None]: ...

    def disconnect(self) -> Deferred[None]: ...

    def abort(self, reason: ConnectFailed | None = None) -> None: ...


@implementer(IReadDescriptor, IWriteDescriptor)
class _SocketDescriptor:
    """
    The reactor's view of a paho socket; the file number is captured at
    creation so that removal still works after paho closed the socket.
    """

    def __init__(self, connection: MQTTClient, sock: Any) -> None:
        self._connection = connection
        self._fd = sock.fileno()

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        try:
            self._connection._readable()
        except Exception:
            # Raised on, the reactor would drop this reader and the site
            # would hear nothing until the silence watchdog fired.
            self._connection._read_failed(Failure())

    def doWrite(self) -> None:
        self._connection._writable()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor calls this only when it drops the descriptor itself
        # (for example a closed file number); paho will notice on its own.
        pass

    def logPrefix(self) -> str:
        return f"mqtt:{self._connection.site_id}"


class MQTTClient:
    """
    One site's paho client on the reactor.

    C{connect()} makes one attempt and fires with the CONNACK's
    C{session_present} flag, or fails with L{ConnectFailed}.  After that,
    received messages go to C{on_message} and an unrequested end of the
    connection goes to C{on_lost}.  C{disconnect()} sends DISCONNECT and
    fires when the socket is closed.

    @param max_payload: the payload limit in bytes.  A PUBLISH whose payload
        is larger is read without being held (see L{ReceivedMessage.size});
        MQTT 5 brokers are told not to send packets larger than this plus
        L{HEADER_ROOM}.
    @param threads: the pool that runs the blocking connect (its
        L{Connector <mqttsvc.mqtt.connector.Connector>}'s own).
    @param sweep: the timer that runs L{housekeeping} once a second while
        there is a socket.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: SiteConfig,
        on_message: Callable[[ReceivedMessage], None],
        on_lost: Callable[[ConnectFailed], None],
        client_id: str,
        *,
        threads: ThreadPool,
        sweep: KeepaliveSweep,
        connect_timeout: float = 5.0,
        persistent: bool = True,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self._reactor = reactor
        self._max_payload = max_payload
        # A packet announcing more than this takes the slow branch of
        # _frame: refused, read without holding it, or (a PUBLISH under
        # the payload limit) held after all.
        self._large = min(max_payload, HEADER_ROOM)
        self._threads = threads
        self._config = config
        self._on_message = on_message
        self._on_lost = on_lost
        self.site_id = config.site_id
        self.generation = 0
        self._descriptor: _SocketDescriptor | None = None
        self._writing = False
        self._connecting: Deferred[bool] | None = None
        self._connack_timeout: IDelayedCall | None = None
        self._closing: Deferred[None] | None = None
        self._connected = False
        self._aborted = False
        self._opening: Deferred[object] | None = None
        self._opening_waiters: list[Deferred[None]] = []
        self._subscribing: dict[int, tuple[list[str], Deferred[list[SubscriptionResult]]]] = {}
        self._tls_ready = False
        self._socket_error: str | None = None
        self._paused = False
        self._buffer = bytearray()
        self._oversized: OversizedPublish | None = None
        self._last_rx = 0.0
        # When the last packet was completed, and when the buffer last went
        # from empty to not: the later is when the partial packet in the
        # buffer began.
        self._last_packet_at = 0.0
        self._partial_since = 0.0
        self._heard: list[tuple[float, Deferred[None]]] = []
        self._lost_reason: ConnectFailed | None = None
        self._sweep = sweep
        self._client = self._make_client(client_id, connect_timeout, persistent)

    def _make_client(self, client_id: str, connect_timeout: float, persistent: bool) -> PahoClient:
        config = self._config
        v5 = config.protocol == "5"
        client = PahoClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if v5 else not persistent,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        client.connect_timeout = connect_timeout
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_subscribe = self._paho_subscribe
        client.on_log = self._paho_log
        if config.status_topic is not None:
            # Retained, so that whoever subscribes later still learns that
            # this site's connection is gone.
            client.will_set(config.status_topic, b"offline", qos=1, retain=True)
        client.on_socket_open = self._marshal(self._socket_open)
        client.on_socket_close = self._marshal(self._socket_close)
        client.on_socket_register_write = self._marshal(self._register_write)
        client.on_socket_unregister_write = self._marshal(self._unregister_write)
        connect_properties = None
        if v5:
            connect_properties = Properties(PacketTypes.CONNECT)
            connect_properties.ReceiveMaximum = RECEIVE_MAXIMUM
            # A broker must not send us a larger packet (it drops such a
            # message instead); MQTT caps the value at 268,435,460.
            connect_properties.MaximumPacketSize = min(self._max_payload + HEADER_ROOM, 268_435_460)
            if persistent:
                connect_properties.SessionExpiryInterval = SESSION_EXPIRY
        client.connect_async(
            config.host,
            config.port,
            keepalive=config.keepalive,
            clean_start=not persistent if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect_properties,
        )
        return client

    def _marshal(self, f: Callable[..., None]) -> Callable[..., None]:
        def callback(client: paho.Client, userdata: object, sock: Any) -> None:
            if threadable.isInIOThread():
                f(sock)
            else:
                self._reactor.callFromThread(f, sock)

        return callback

    # Socket registration, always on the reactor thread.

    def _socket_open(self, sock: Any) -> None:
        self._buffer = bytearray()
        self._oversized = None
        self._descriptor = _SocketDescriptor(self, sock)
        self._last_rx = self._last_packet_at = self._reactor.seconds()
        if not self._paused:
            self._reactor.addReader(self._descriptor)
        if self._writing:
            self._reactor.addWriter(self._descriptor)

    def _socket_close(self, sock: Any) -> None:
        self._buffer = bytearray()
        self._oversized = None
        if self._descriptor is not None:
            self._reactor.removeReader(self._descriptor)
            self._reactor.removeWriter(self._descriptor)
            self._descriptor = None
        self._writing = False

    def _register_write(self, sock: Any) -> None:
        self._writing = True
        if self._descriptor is not None:
            self._reactor.addWriter(self._descriptor)

    def _unregister_write(self, sock: Any) -> None:
        self._writing = False
        if self._descriptor is not None:
            self._reactor.removeWriter(self._descriptor)

    def _readable(self) -> None:
        """
        Read what the socket holds (up to L{READ_SIZE} bytes) and handle
        every complete packet in it.

        paho's own C{_packet_read} makes a system call per header byte and
        per packet; reading in blocks and framing here is several times
        cheaper.  PUBLISH packets at QoS 0 and 1 (all a site may receive)
        are decoded here; every other packet is handed to paho as if paho
        had read it.  A PUBLISH over the payload limit is read on the way
        by L{_read_oversized}, never held whole.
        """
        if self._paused:
            return
        client = self._client
        if client.socket() is None:
            return
        try:
            data = client.read_block(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self._socket_error = str(e) or type(e).__name__
            client.close_for(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            return
        if not data:
            client.close_for(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            return
        self._last_rx = self._reactor.seconds()
        if _QUICKACK is not None:
            _quickack(client.socket())
        self._received(data)
        sock = client.socket()
        # A TLS socket may hold decrypted bytes that will not make it
        # readable again: come back for them explicitly.
        if isinstance(sock, ssl.SSLSocket) and sock.pending() and not self._paused:
            self._reactor.callLater(0, self._readable)

    def _received(self, data: bytes) -> None:
        """
        Handle the bytes of one read.
        """
        if self._oversized is not None:
            data = self._read_oversized(data)
            if not data:
                return
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = bytearray(data)
            self._partial_since = self._last_rx
        self._frame()

    def _frame(self) -> None:
        """
        Handle the complete packets at the start of the read buffer.
        """
        buffer = self._buffer
        size = len(buffer)
        pos = 0
        v5 = self._config.protocol == "5"
        client = self._client
        on_message = self._on_message
        generation = self.generation
        large = self._large
        try:
            while pos + 2 <= size and not self._paused:
                command = buffer[pos]
                try:
                    header = varint(buffer, pos + 1, size)
                except Malformed as e:
                    self._protocol_error(f"remaining length: {e}")
                    return
                if header is None:
                    return  # the rest of the header is still to come
                length, i = header
                if length > large and self._too_large(command, length):
                    # Refused, or read without holding it: the slow branch.
                    if pos:
                        self._last_packet_at = self._last_rx
                    read = self._begin_oversized(buffer, pos, i, length)
                    if read is None:
                        return  # its header is still to come, or the link closed
                    pos = read
                    if self._oversized is not None or self._buffer is not buffer:
                        return  # the rest is still to come, or the link closed
                    continue
                end = i + length
                if end > size:
                    return
                pos = end
                if command & 0xF0 == 0x30 and not command & 0x04:
                    # PUBLISH, QoS 0 or 1: ours to decode.
                    try:
                        message = decode_publish(buffer, command, i, end, v5, generation)
                    except Malformed as e:
                        self._protocol_error(str(e))
                        return
                    on_message(message)
                    if self._buffer is not buffer:
                        return  # the connection closed meanwhile
                    continue
                if command & 0xF0 == 0x30:
                    self._protocol_error(QOS2_PUBLISH)
                    return
                try:
                    rc = client.handle_packet(command, length, bytearray(buffer[i:end]))
                except paho.MalformedPacket as e:
                    self.log.debug(
                        "site {site_id}: malformed packet: {error}", site_id=self.site_id, error=e
                    )
                    rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                if rc:
                    client.close_for(rc)
                if client.socket() is None or self._buffer is not buffer:
                    return  # closed, or a new connection: the rest is void
                generation = self.generation
        finally:
            if self._buffer is buffer and pos:
                del buffer[:pos]
                if self._oversized is None:
                    self._last_packet_at = self._last_rx

    def _too_large(self, command: int, length: int) -> bool:
        """
        Whether a packet of this type and length may not be held whole.
        """
        return length > (self._max_payload if command & 0xF0 == 0x30 else HEADER_ROOM)

    def _begin_oversized(self, buffer: bytearray, pos: int, i: int, length: int) -> int | None:
        """
        The packet at C{buffer[pos]}, whose variable header starts at
        C{buffer[i]}, announces C{length} bytes, more than may be held:
        refuse it, or, a PUBLISH over the payload limit, start reading it
        without holding it (from what the buffer already has).

        @return: the position after what was read, or None when the header
            is still incomplete or the link was closed.
        """
        try:
            stream = begin_oversized(
                buffer,
                pos,
                i,
                length,
                self._config.protocol == "5",
                self._max_payload,
                max(self._partial_since, self._last_packet_at),
            )
        except Malformed as e:
            self._protocol_error(str(e))
            return None
        if stream is None:
            return None
        self._oversized = stream
        if not stream.remaining:
            self._finish_oversized(stream)
        return min(len(buffer), i + length)

    def _read_oversized(self, data: bytes) -> bytes:
        """
        Feed a read to the oversized PUBLISH being read.

        @return: what of C{data} follows that packet.
        """
        stream = self._oversized
        assert stream is not None
        wanted = stream.remaining
        if len(data) < wanted:
            stream.feed(data)
            return b""
        stream.feed(data[:wanted])
        self._finish_oversized(stream)
        if self._client.socket() is None:
            return b""  # closed by whoever took the message
        return data[wanted:]

    def _finish_oversized(self, stream: OversizedPublish) -> None:
        self._oversized = None
        self._last_packet_at = self._last_rx
        self.log.debug(
            "site {site_id}: a PUBLISH on {topic!r} of {size} bytes read without holding it",
            site_id=self.site_id,
            topic=stream.topic,
            size=stream.size,
        )
        self._on_message(stream.message(self.generation))

    def _partial_packet(self) -> tuple[int, float] | None:
        """
        The size and start time of the packet being read, if any.
        """
        stream = self._oversized
        if stream is not None:
            return stream.total, stream.started
        buffer = self._buffer
        if not buffer:
            return None
        return packet_size(buffer), max(self._partial_since, self._last_packet_at)

    def _read_failed(self, failure: Failure) -> None:
        """
        Handling what was read raised (a bug): say so and drop the
        connection, so that the site reconnects on its schedule and the
        broker redelivers what was not acknowledged.
        """
        self.log.failure(
            "site {site_id}: handling data from the broker failed", failure, site_id=self.site_id
        )
        self._buffer = bytearray()
        self._oversized = None
        kind = failure.type.__name__ if failure.type is not None else "error"
        self.abort(
            ConnectFailed(
                "protocol", f"internal error while reading: {kind}: {failure.getErrorMessage()}"
            )
        )

    def _protocol_error(self, why: str) -> None:
        self.log.warn(
            "site {site_id}: broken packet from the broker: {why}", site_id=self.site_id, why=why
        )
        self._buffer = bytearray()
        self._oversized = None
        self._lost_reason = ConnectFailed("protocol", why)
        self._client.close_for(MQTTErrorCode.MQTT_ERR_PROTOCOL)

    def _writable(self) -> None:
        self._client.loop_write()

    def housekeeping(self) -> None:
        """
        Once a second, from the L{KeepaliveSweep}: close a silent link or
        one stuck in a packet, tell who waits for proof of life, and let
        paho send PINGREQ and judge its keepalive.
        """
        if self._paused:
            # Not reading, so not hearing PINGRESP either: neither paho's
            # keepalive nor the watchdog can judge the link now.
            return
        now = self._reactor.seconds()
        keepalive = self._config.keepalive
        silence = now - self._last_rx
        if self._connected and silence > SILENCE_FACTOR * keepalive:
            self.log.warn(
                "site {site_id}: nothing from the broker for {silence:.0f}s, closing the link",
                site_id=self.site_id,
                silence=silence,
            )
            self.abort(ConnectFailed("timeout", f"no data from the broker for {silence:.0f}s"))
            return
        partial = self._partial_packet()
        if partial is not None:
            size, started = partial
            elapsed = now - started
            if elapsed > PACKET_TIMEOUT_FACTOR * keepalive + size / PACKET_RATE_FLOOR:
                self.log.warn(
                    "site {site_id}: a packet of {size} bytes is still incomplete after "
                    "{elapsed:.0f}s, closing the link",
                    site_id=self.site_id,
                    size=size,
                    elapsed=elapsed,
                )
                self.abort(
                    ConnectFailed(
                        "timeout", f"packet of {size} bytes incomplete after {elapsed:.0f}s"
                    )
                )
                return
        if self._heard:
            self._tell_heard()
        self._client.loop_misc()

    def _tell_heard(self) -> None:
        heard = self._last_packet_at
        waiting = self._heard
        self._heard = [(at, d) for at, d in waiting if at > heard]
        for at, d in waiting:
            if at <= heard:
                d.callback(None)

    # paho callbacks, on the reactor thread once connected.

    def _paho_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._cancel_connack_timeout()
        attempt, self._connecting = self._connecting, None
        if attempt is None:
            return
        if reason.is_failure:
            attempt.errback(classify_connack(reason))
            return
        self._connected = True
        self.generation += 1
        if self._config.status_topic is not None:
            client.publish(self._config.status_topic, b"online", qos=1, retain=True)
        attempt.callback(flags.session_present)

    def _paho_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected, self._connected = self._connected, False
        self._sweep.discard(self)
        self._cancel_connack_timeout()
        attempt, self._connecting = self._connecting, None
        closing, self._closing = self._closing, None
        subscribing, self._subscribing = self._subscribing, {}
        for topics, waiting in subscribing.values():
            waiting.callback([SubscriptionResult(t, False, "connection lost") for t in topics])
        # After those: what they start waiting for dies with this connection.
        self._heard = []
        if closing is not None:
            closing.callback(None)
            return
        failure = self._lost_reason or ConnectFailed("network", f"connection lost: {reason}")
        self._lost_reason = None
        if attempt is not None and self._config.tls is not None and self._socket_error:
            # With TLS 1.3 the broker refuses a client certificate after
            # the handshake: it shows as the first read failing.
            failure = ConnectFailed(
                "tls", f"the broker ended the TLS session: {self._socket_error}"
            )
        if attempt is not None:
            attempt.errback(failure)
        elif was_connected:
            self._on_lost(failure)

    def _paho_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        pending = self._subscribing.pop(mid, None)
        if pending is None:
            return
        topics, waiting = pending
        waiting.callback(
            [
                SubscriptionResult(topic, not reason.is_failure, str(reason))
                for topic, reason in zip(topics, reasons, strict=False)
            ]
        )

    # The interface used by the site service.

    def connect(self) -> Deferred[bool]:
        """
        Make one connection attempt.

        @return: fires with the CONNACK's C{session_present} flag, or fails
            with L{ConnectFailed}.
        """
        assert self._connecting is None, "a connection attempt is already in progress"
        self._aborted = False
        self._lost_reason = None
        attempt: Deferred[bool] = Deferred()
        self._connecting = attempt
        opened = self._opening = deferToThreadPool(self._reactor, self._threads, self._open)

        def opened_ok(rc: object) -> None:
            if self._aborted:
                self._client.close_socket()
                self._fail_attempt(attempt, ConnectFailed("network", "attempt cancelled"))
                return
            self._sweep.add(self)
            self._connack_timeout = self._reactor.callLater(
                CONNACK_TIMEOUT, self._connack_timed_out, attempt
            )

        def opened_failed(f: Failure) -> None:
            self._fail_attempt(attempt, classify_connect_error(f.value or Exception(f)))

        def thread_done(_: object) -> None:
            self._opening = None
            waiters, self._opening_waiters = self._opening_waiters, []
            for w in waiters:
                w.callback(None)

        opened.addCallbacks(opened_ok, opened_failed).addBoth(thread_done)
        return attempt

    def _open(self) -> object:
        """
        In the worker thread: set up TLS the first time (reading the
        certificate files), then open the connection (DNS, TCP, TLS
        handshake) and send CONNECT.
        """
        tls = self._config.tls
        if tls is not None and not self._tls_ready:
            try:
                context = tls_context(tls)
            except (OSError, ssl.SSLError) as e:
                raise ConnectFailed("tls", f"cannot load the TLS files: {e}") from None
            self._client.tls_set_context(context)
            self._tls_ready = True
        self._socket_error = None
        return self._client.reconnect()

    def _paho_log(self, client: paho.Client, userdata: object, level: int, message: str) -> None:
        # paho reports a broken TLS session only here ("failed to receive on
        # socket: [SSL: ...]"); keep it to name the failure.
        if message.startswith(("failed to receive on socket", "failed to send on socket")):
            self._socket_error = message.split(": ", 1)[-1]

    def _fail_attempt(self, attempt: Deferred[bool], failure: ConnectFailed) -> None:
        if self._connecting is attempt:
            self._connecting = None
            attempt.errback(failure)

    def _cancel_connack_timeout(self) -> None:
        if self._connack_timeout is not None and self._connack_timeout.active():
            self._connack_timeout.cancel()
        self._connack_timeout = None

    def _connack_timed_out(self, attempt: Deferred[bool]) -> None:
        self._connack_timeout = None
        if self._connecting is attempt:
            self._connecting = None
            self._sweep.discard(self)
            self._client.close_socket()
            attempt.errback(ConnectFailed("timeout", "no CONNACK from the broker"))

    def subscribe(self, topics: list[tuple[str, int]]) -> Deferred[list[SubscriptionResult]]:
        """
        Subscribe to C{(filter, qos)} pairs on the current connection.

        @return: fires with the SUBACK's verdict on each filter (all refused
            with "connection lost" if the connection ends first).
        """
        if not topics:
            return succeed([])
        rc, mid = self._client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return succeed([SubscriptionResult(t, False, paho.error_string(rc)) for t, _ in topics])
        waiting: Deferred[list[SubscriptionResult]] = Deferred()
        self._subscribing[mid] = ([t for t, _ in topics], waiting)
        return waiting

    def heard_after(self, at: float) -> Deferred[None]:
        """
        Wait for proof that the link carries packets: fires (within about a
        second) once a whole packet, of any kind, has arrived at or after
        reactor time C{at} on the current connection.  A byte alone is no
        proof (a broker may trickle one endless packet).  Never fires if the
        connection ends first.
        """
        waiting: Deferred[None] = Deferred()
        self._heard.append((at, waiting))
        return waiting

    def unsubscribe(self, topics: list[str]) -> None:
        """
        Drop subscriptions on the current connection.
        """
        if topics and self._connected:
            self._client.unsubscribe(topics)

    def pause(self) -> None:
        """
        Stop reading from the broker: at shutdown (take no new messages
        while the ones in hand are committed and acknowledged), and while
        the database cannot keep up.  It lasts, across reconnections,
        until L{resume}.
        """
        self._paused = True
        if self._descriptor is not None:
            self._reactor.removeReader(self._descriptor)

    def resume(self) -> None:
        """
        Read from the broker again after L{pause}.
        """
        if self._paused:
            self._paused = False
            if self._descriptor is not None:
                # The clocks of the silence and packet timeouts stood still.
                self._last_rx = self._partial_since = self._reactor.seconds()
                if self._oversized is not None:
                    self._oversized.started = self._last_rx
                self._reactor.addReader(self._descriptor)
                if self._buffer:
                    # Packets read before the pause wait in the buffer; the
                    # socket may never become readable for them.
                    self._reactor.callLater(0, self._resume_buffered)

    def _resume_buffered(self) -> None:
        if not self._paused and self._buffer and self._client.socket() is not None:
            self._frame()

    def ack(self, messages: list[ReceivedMessage]) -> int:
        """
        Acknowledge messages, those that the current connection carried;
        the broker redelivers the others.  The PUBACKs of QoS 1 messages
        go out in one write.

        @return: how many acknowledgements were queued.
        """
        if not self._connected:
            return 0
        generation = self.generation
        mids = [m.mid for m in messages if m.qos == 1 and m.generation == generation]
        if mids:
            # paho writes a queued packet as bytes, so one entry holds them all.
            self._client.queue_packet(PUBACK, encode_pubacks(mids))
        # No QoS 2 message reaches here: _frame closes the link on one.
        return len(mids)

    @property
    def connected(self) -> bool:
        return self._connected

    def disconnect(self) -> Deferred[None]:
        """
        Send DISCONNECT (or abandon an attempt in progress) and fire once the
        socket is closed.
        """
        if self._connecting is not None:
            self._aborted = True
            self._fail_attempt(self._connecting, ConnectFailed("network", "attempt cancelled"))
            if self._opening is not None:
                # reconnect() is still running in its thread and owns the
                # client: wait for it; its socket is closed when it returns.
                waiter: Deferred[None] = Deferred()
                self._opening_waiters.append(waiter)
                return waiter
            self._sweep.discard(self)
            self._cancel_connack_timeout()
            self._client.close_socket()
            return succeed(None)
        if not self._connected:
            return succeed(None)
        closing: Deferred[None] = Deferred()
        self._closing = closing
        if self._config.status_topic is not None:
            # A clean DISCONNECT discards the will: say it ourselves.
            self._client.publish(self._config.status_topic, b"offline", qos=1, retain=True)
        self._client.disconnect()
        return closing

    def abort(self, reason: ConnectFailed | None = None) -> None:
        """
        Close the socket at once, without DISCONNECT (a silent link, or a
        broker that does not answer our DISCONNECT).  A connection still
        being opened in its thread is left to finish.
        """
        if self._opening is not None:
            return
        self._lost_reason = reason
        self._client.close_socket()
        self._paho_disconnect(
            self._client,
            None,
            paho.DisconnectFlags(False),
            ReasonCode(PacketTypes.DISCONNECT, "Unspecified error"),
            None,
        )
