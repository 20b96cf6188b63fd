"""
The paho adapter: the one module of mqttsvc that touches paho-mqtt's
private names.

mqttsvc reads a broker's socket itself, in blocks, and decodes PUBLISH
itself (L{mqttsvc.mqtt.codec}); paho still runs the session: CONNECT,
CONNACK, SUBSCRIBE, PINGREQ, the keepalive and the outgoing queue.  Sharing
one connection that way needs a handful of paho's internals, each wrapped
here in a method named for what mqttsvc wants of it:

  - L{PahoClient.read_block}: C{_sock_recv}, and C{_last_bytes_received}
    so that paho's keepalive knows the link is alive;
  - L{PahoClient.handle_packet}: a whole packet we framed, set as
    C{_in_packet} and handed to C{_packet_handle};
  - L{PahoClient.close_for}: C{_loop_rc_handle}, paho's own reaction to an
    error code (close, then C{on_disconnect});
  - L{PahoClient.queue_packet}: C{_packet_queue}, bytes we encoded (PUBACKs);
  - L{PahoClient.close_socket}: C{_sock_close}.

They were written against paho-mqtt 2.1 and 2.2; importing this module
with any other release raises ImportError, and
C{tests/test_paho_contract.py} fails, naming what changed, when a release
changes any of them.
"""

from __future__ import annotations

import re
import time

import paho.mqtt.client as paho
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import MQTTErrorCode

#: The paho-mqtt releases this adapter was written for: at least the first,
#: below the second (setup.cfg's C{paho-mqtt >= 2.1, < 2.3}).
PAHO_VERSIONS = ((2, 1), (2, 3))

#: The private methods of C{paho.Client} used here.
PRIVATE_METHODS = (
    "_sock_recv",
    "_sock_close",
    "_loop_rc_handle",
    "_packet_handle",
    "_packet_queue",
)

#: The private attributes of a C{paho.Client} used here.
PRIVATE_ATTRIBUTES = ("_in_packet", "_last_bytes_received")

#: The fields of paho's C{_InPacket}, the state of the packet being read.
IN_PACKET_FIELDS = (
    "command",
    "have_remaining",
    "remaining_count",
    "remaining_mult",
    "remaining_length",
    "packet",
    "to_process",
    "pos",
)


def check_version(found: str) -> None:
    """
    @raise ImportError: when paho-mqtt release C{found} is outside
        L{PAHO_VERSIONS}.
    """
    (low_major, low_minor), (high_major, high_minor) = PAHO_VERSIONS
    wanted = f"paho-mqtt >= {low_major}.{low_minor}, < {high_major}.{high_minor}"
    match = re.match(r"(\d+)\.(\d+)", found)
    if match is None or not (PAHO_VERSIONS[0] <= (int(match[1]), int(match[2])) < PAHO_VERSIONS[1]):
        raise ImportError(
            f"mqttsvc.mqtt.pahoclient uses paho's private internals as of {wanted}, "
            f"but paho-mqtt {found} is installed: install a release in that range, or "
            "check the adapter against this one (tests/test_paho_contract.py) and widen "
            "PAHO_VERSIONS and setup.cfg"
        )


check_version(paho_version)


def _empty_in_packet() -> paho._InPacket:
    """
    paho's state for a packet it has not started to read.
    """
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }


class PahoClient(paho.Client):
    """
    A C{paho.Client} whose socket is read, and whose packets are framed, by
    its owner: the methods below are what that owner needs of paho's
    internals.  Everything else is paho's public API.
    """

    def read_block(self, size: int) -> bytes:
        """
        Read up to C{size} bytes from the socket (empty at end of stream)
        and, if any came, tell paho's keepalive that the broker spoke.

        @raise BlockingIOError: nothing to read yet (TLS included).
        @raise OSError: the connection failed.
        """
        data = self._sock_recv(size)
        if data:
            self._last_bytes_received = time.monotonic()
        return data

    def handle_packet(self, command: int, length: int, body: bytearray) -> MQTTErrorCode:
        """
        Handle a whole packet other than our PUBLISH, as if paho had read
        it: C{command} is its fixed header's first byte, C{body} its
        C{length} bytes after the fixed header.

        @return: paho's error code (nonzero: hand it to L{close_for}).
        @raise paho.MalformedPacket: paho could not decode it.
        """
        self._in_packet = {
            "command": command,
            "have_remaining": 1,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": length,
            "packet": body,
            "to_process": 0,
            "pos": 0,
        }
        try:
            return self._packet_handle()
        finally:
            self._in_packet = _empty_in_packet()

    def close_for(self, rc: MQTTErrorCode) -> None:
        """
        End the connection for error C{rc} as paho's own loop does: the
        socket is closed and C{on_disconnect} called.
        """
        self._loop_rc_handle(rc)

    def queue_packet(self, command: int, packet: bytes) -> None:
        """
        Queue bytes we encoded (C{command}'s packets, one or more of them)
        for paho to write as one entry of its outgoing queue.
        """
        self._packet_queue(command, packet, 0, 1)

    def close_socket(self) -> None:
        """
        Close the socket at once, without DISCONNECT and without
        C{on_disconnect} (C{on_socket_close} is called).
        """
        self._sock_close()
