"""
The C{twistd mqttsvc} plugin; it imports the service code only when used,
so that listing twistd's plugins stays cheap.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _MqttsvcServiceMaker:
    tapname = "mqttsvc"
    description = "Carry MQTT messages from IoT sites' brokers into PostgreSQL."

    @property
    def options(self) -> Any:
        from mqttsvc.tap import Options

        return Options

    def makeService(self, options: Any) -> Any:
        from mqttsvc.tap import makeService

        return makeService(options)


serviceMaker = _MqttsvcServiceMaker()
