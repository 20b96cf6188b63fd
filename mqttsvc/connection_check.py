"""
A dry-run connection: can mqttsvc reach this broker with these settings?

Used by C{site.test} before a site is saved.  It connects once with a
throw-away client id and a clean session (so the broker keeps nothing),
reports the broker's verdict, and disconnects.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.defer import CancelledError

from mqttsvc.config import SiteConfig
from mqttsvc.transport import ConnectFailed, MQTTClient

#: How long the whole check may take.
CHECK_TIMEOUT = 10.0


async def check_connection(
    reactor: Any, config: SiteConfig, within: float = CHECK_TIMEOUT
) -> dict[str, Any]:
    """
    Connect once and disconnect.

    @return: C{{"ok": True, "category": None, "error": None}}, or C{ok}
        false with the failure's category (C{refused}, C{timeout}, C{dns},
        C{tls}, C{auth}, C{protocol}, C{network}) and explanation.
    """
    client = MQTTClient(
        reactor,
        config,
        on_message=lambda message: None,
        on_lost=lambda error: None,
        client_id=f"mqttsvc-check-{uuid.uuid4().hex[:12]}",
        persistent=False,
    )
    attempt = client.connect()
    attempt.addTimeout(within, reactor)
    try:
        await attempt
    except ConnectFailed as e:
        return {"ok": False, "category": e.category, "error": f"{e.category}: {e.detail}"}
    except (CancelledError, TimeoutError):
        await client.disconnect()
        return {
            "ok": False,
            "category": "timeout",
            "error": f"timeout: no answer within {within:g}s",
        }
    closing = client.disconnect()
    closing.addTimeout(within, reactor)
    try:
        await closing
    except (CancelledError, TimeoutError):
        client.abort()
    return {"ok": True, "category": None, "error": None}
