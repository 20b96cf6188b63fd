"""
The service tree running in the test process against the real database
and broker, with its JSON-RPC API on a free loopback port.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.web.server import Site

from mqttsvc.rpc.dispatcher import Dispatcher
from mqttsvc.rpc.methods import ControlPlane
from mqttsvc.service import RootService
from mqttsvc.store import Store
from mqttsvc.supervisor import SiteSupervisor
from mqttsvc.web import WebApp


class RunningService:
    """
    Store, supervisor and web server as C{twistd mqttsvc} builds them.
    """

    def __init__(self, reactor: Any, dsn: str) -> None:
        self.reactor = reactor
        self.root = RootService()
        self.store = Store(reactor, dsn)
        self.store.setServiceParent(self.root)
        self.supervisor = SiteSupervisor(reactor, self.store)
        self.supervisor.setServiceParent(self.root)
        self.web = WebApp(Dispatcher(ControlPlane(self.store, self.supervisor).methods()), None)
        self.url = ""
        self._port: Any = None
        self._ids = 0

    async def start(self) -> None:
        self.root.startService()
        await self.supervisor.whenLoaded()
        self._port = self.reactor.listenTCP(0, Site(self.web.resource()), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self._port.getHost().port}/rpc"

    async def stop(self) -> None:
        if self._port is not None:
            await self._port.stopListening()
        stopped: Deferred[None] = self.root.stopService()
        stopped.addTimeout(20, self.reactor)
        await stopped

    async def call_raw(self, method: str, params: Any = None) -> dict[str, Any]:
        self._ids += 1
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._ids}
        if params is not None:
            body["params"] = params
        response = await treq.post(
            self.url,
            json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            persistent=False,
        )
        assert response.code == 200, response.code
        result: dict[str, Any] = await response.json()
        return result

    async def call(self, method: str, params: Any = None) -> Any:
        """
        Call a method and return its result, failing the test on an error.
        """
        response = await self.call_raw(method, params)
        assert "error" not in response, response["error"]
        return response["result"]
