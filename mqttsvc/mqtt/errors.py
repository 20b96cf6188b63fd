"""
Why a connection attempt failed, in categories an operator can act on:
L{ConnectFailed} and the classification of what paho's blocking connect
raises and of a refusing CONNACK.
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paho.mqtt.reasoncodes import ReasonCode

#: CONNACK reason values that mean "bad credentials": MQTT 3.1.1 return
#: codes 4 and 5 and their MQTT 5 equivalents (0x86 bad user name or
#: password, 0x87 not authorized, 0x8C bad authentication method).
AUTH_REFUSALS = (4, 5, 0x86, 0x87, 0x8C)


class ConnectFailed(Exception):
    """
    A connection attempt failed.

    @ivar category: a short machine-readable class of failure: C{refused},
        C{timeout}, C{dns}, C{tls}, C{auth}, C{protocol} or C{network}.
    @ivar detail: a human-readable explanation (never containing secrets).
    """

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail


def classify_connect_error(e: BaseException) -> ConnectFailed:
    """
    Turn an exception from paho's blocking C{reconnect()} into a failure
    category that an operator can act on.
    """
    if isinstance(e, ConnectFailed):
        return e
    if isinstance(e, socket.gaierror):
        return ConnectFailed("dns", f"cannot resolve host: {e.strerror or e}")
    if isinstance(e, ssl.SSLCertVerificationError):
        return ConnectFailed("tls", f"certificate verification failed: {e.verify_message}")
    if isinstance(e, ssl.SSLError):
        return ConnectFailed("tls", f"TLS handshake failed: {e.reason or e}")
    if isinstance(e, ConnectionRefusedError):
        return ConnectFailed("refused", "connection refused")
    if isinstance(e, TimeoutError | socket.timeout):
        return ConnectFailed("timeout", "timed out connecting")
    if isinstance(e, OSError):
        return ConnectFailed("network", e.strerror or str(e))
    return ConnectFailed("protocol", f"{type(e).__name__}: {e}")


def classify_connack(reason: ReasonCode) -> ConnectFailed:
    """
    Turn a refusing CONNACK into a failure; bad credentials are reported as
    such.
    """
    if reason.value in AUTH_REFUSALS:
        return ConnectFailed("auth", f"broker refused the credentials: {reason}")
    return ConnectFailed("protocol", f"broker refused the connection: {reason}")
