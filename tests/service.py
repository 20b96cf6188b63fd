"""
The service tree running in the test process against the real database
and broker, with its JSON-RPC API on a free loopback port.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.defer import Deferred

from mqttsvc.db.secrets import Secrets
from mqttsvc.db.store import Store
from mqttsvc.ingest.service import Ingest
from mqttsvc.sites.supervisor import SiteSupervisor
from mqttsvc.tap import Options, buildService, check_values

#: One key for the whole test run, so that services started one after the
#: other read each other's stored passwords.
TEST_SECRETS = Secrets(Secrets.generate_key())


class RunningService:
    """
    The service tree exactly as C{twistd mqttsvc} builds it, with the
    JSON-RPC listener on a free loopback port and no tokens.
    """

    def __init__(self, reactor: Any, dsn: str, *extra_args: str) -> None:
        self.reactor = reactor
        options = Options(environ={})
        options.parseOptions(
            [
                "--db",
                dsn,
                "--rpc",
                "tcp:0:interface=127.0.0.1",
                "--instance",
                "test",
                # Many services come and go in one test process: freezing
                # each one's heap would keep their garbage.
                "--no-gc-freeze",
                *extra_args,
            ]
        )
        check_values(options)
        options["secrets"] = TEST_SECRETS
        self.root = buildService(options, reactor, None)
        self.store: Store = self.root.getServiceNamed("store")
        self.ingest: Ingest = self.root.getServiceNamed("ingest")
        self.supervisor: SiteSupervisor = self.root.getServiceNamed("sites")
        self.url = ""
        self._ids = 0

    async def start(self) -> None:
        self.root.startService()
        await self.supervisor.whenLoaded()
        # The endpoint service's Deferred for its listening port.
        port = await self.root.getServiceNamed("web")._waitingForPort
        self.url = f"http://127.0.0.1:{port.getHost().port}/rpc"

    async def stop(self) -> None:
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
