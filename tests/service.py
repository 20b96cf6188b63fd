"""
The service tree running in the test process against the real database
and broker, with its JSON-RPC API on a free loopback port: the benchmarks'
builder (L{bench.service.Tree}) with the tests' settings and JSON-RPC calls.
"""

from __future__ import annotations

import json
from typing import Any

import treq

from bench.service import Tree
from mqttsvc.db.secrets import Secrets

#: One key for the whole test run, so that services started one after the
#: other read each other's stored passwords.
TEST_SECRETS = Secrets(Secrets.generate_key())


class RunningService(Tree):
    """
    The service tree exactly as C{twistd mqttsvc} builds it, with the
    JSON-RPC listener on a free loopback port and no tokens, instance
    C{test} (unless named otherwise), and the run's L{TEST_SECRETS}.
    """

    def __init__(self, reactor: Any, dsn: str, *extra_args: str, instance: str = "test") -> None:
        # Many services come and go in one test process: freezing each
        # one's heap would keep their garbage.
        super().__init__(
            reactor, dsn, "--no-gc-freeze", *extra_args, instance=instance, secrets=TEST_SECRETS
        )
        self._ids = 0

    async def stop(self, within: float = 20.0) -> None:
        """
        Stop the tree; fail the test if that takes over C{within} seconds.
        """
        await super().stop(within)

    async def call_raw(self, method: str, params: Any = None) -> dict[str, Any]:
        """
        Call a method and return the whole JSON-RPC response (an answer
        of HTTP 200 is asserted).
        """
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
