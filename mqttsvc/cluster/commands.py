"""
Commands to a site's owner: what a replica that does not own a site sends
its owner so that C{site.restart} (and C{site.start} of a site waiting for
its retry) reaches it, whichever replica the call came to.

A command travels as a PostgreSQL notification, which every instance
hears; the instance it names acts on it, the others ignore it.  Anyone who
can NOTIFY on the database can send one, so a payload is parsed as input
from a stranger: bounded, and anything malformed is dropped with a log
line.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import attrs
from twisted.logger import Logger

#: The actions an owner accepts.
ACTIONS = frozenset({"restart"})

#: A payload is refused beyond this many bytes (PostgreSQL's own NOTIFY
#: limit is 8000).
MAX_PAYLOAD_BYTES = 1024


@attrs.frozen
class Command:
    """
    C{action} on the site C{site_id}, by its owner C{instance}.
    """

    instance: str
    site_id: str
    action: str

    def payload(self) -> str:
        """The notification's payload."""
        fields = {"instance": self.instance, "site_id": self.site_id, "action": self.action}
        return json.dumps(fields)

    @classmethod
    def parse(cls, payload: str) -> Command | None:
        """
        The command in a notification's payload, or C{None} for anything
        that is not a well-formed one (too long, not JSON, an unknown
        action, fields that are not strings).
        """
        if len(payload.encode("utf-8", "surrogatepass")) > MAX_PAYLOAD_BYTES:
            return None
        try:
            fields = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(fields, dict):
            return None
        instance, site_id, action = (fields.get(k) for k in ("instance", "site_id", "action"))
        if not (isinstance(instance, str) and isinstance(site_id, str) and action in ACTIONS):
            return None
        return cls(instance, site_id, action)


class CommandReceiver:
    """
    Acts on the commands addressed to this instance.

    @param restart: restarts a site this instance runs; C{False} if it runs
        no such site (it was handed over meanwhile: the caller's wait for
        the new owner's status then times out, and says so).
    @param done: called after a command was acted on (the publisher
        publishes at once, so that the caller sees the effect).
    """

    log = Logger()

    def __init__(
        self, instance: str, restart: Callable[[str], bool], done: Callable[[], object]
    ) -> None:
        self._instance = instance
        self._restart = restart
        self._done = done
        #: Commands acted on, and notifications dropped as malformed.
        self.acted = 0
        self.malformed = 0

    def received(self, payload: str) -> None:
        command = Command.parse(payload)
        if command is None:
            self.malformed += 1
            self.log.warn(
                "dropped a malformed site command ({size} bytes)",
                size=len(payload),
            )
            return
        if command.instance != self._instance:
            return
        if self._restart(command.site_id):
            self.acted += 1
            self.log.info(
                "site {site_id}: {action} asked by another instance",
                site_id=command.site_id,
                action=command.action,
            )
            self._done()
