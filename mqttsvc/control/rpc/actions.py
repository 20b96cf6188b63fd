"""
Operator actions as events: who called which method, on which site,
recorded once the action is done.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from mqttsvc.control.rpc.dispatcher import Call
from mqttsvc.db.events import Events


class OperatorActions:
    """
    Records the calls that changed something as C{operator} events.
    """

    log = Logger()

    def __init__(self, events: Events) -> None:
        self._events = events

    async def record(self, call: Call, site_id: str | None, **details: Any) -> bool:
        """
        Publish C{call} as an C{operator} event of C{site_id}.  The action
        itself is done: failing to record it fails nothing but the event
        (it is logged).

        @return: whether the event was recorded.
        """
        try:
            await self._events.record_operator_action(call.caller, call.method, site_id, **details)
        except Exception as e:
            self.log.warn(
                "could not record {method} of {site_id} by {caller} as an event: {error}",
                method=call.method,
                site_id=site_id,
                caller=call.caller,
                error=str(e).strip(),
            )
            return False
        return True
