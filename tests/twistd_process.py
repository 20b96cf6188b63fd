"""
A real C{twistd mqttsvc} in a subprocess, for tests that talk to it as the
backend and operators do: over HTTP, with a token, through the client and
the C{mqttsvc} command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import free_port

T = TypeVar("T")

BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    """
    This process's environment without any C{MQTTSVC_} setting, plus C{extra}.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTTSVC_")}
    env.update(extra)
    return env


def wait_until(
    check: Callable[[], T],
    *,
    within: float = 10.0,
    what: str = "the condition",
    interval: float = 0.05,
) -> T:
    """
    Call C{check} every C{interval} seconds until it returns something
    truthy and return that; fail with the last value seen once C{within}
    seconds have passed.  (Blocking: for tests that do not run the reactor.)
    """
    deadline = time.monotonic() + within
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within}s (last: {last!r})")
        time.sleep(interval)


def rpc_call(url: str, token: str, method: str, params: Any = None, timeout: float = 20) -> Any:
    """
    Call a JSON-RPC method of a running mqttsvc with a bearer token and
    return its result; an error answer fails the test.
    """
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        body["params"] = params
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())
    assert "error" not in answer, answer
    return answer["result"]


class TwistdService:
    """
    C{twistd -n mqttsvc} on a database, listening on a free loopback port,
    with a token file whose only token is L{TOKEN}.
    """

    TOKEN = "client-test-token-0123456789"

    def __init__(self, db_dsn: str, directory: Path) -> None:
        self.db_dsn = db_dsn
        self.token_file = directory / "tokens"
        self.token_file.write_text(f"ops {self.TOKEN}\n")
        self.token_file.chmod(0o600)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/rpc"
        self.log = directory / "twistd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """
        Start it and wait until C{/healthz} answers.
        """
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    *(str(BIN / "twistd"), "-n", "--pidfile=", "mqttsvc"),
                    *("--db", self.db_dsn),
                    *("--rpc", f"tcp:{self.port}:interface=127.0.0.1"),
                    *("--rpc-token-file", str(self.token_file)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=clean_env(),
            )
        health = f"http://127.0.0.1:{self.port}/healthz"

        def healthy() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"twistd mqttsvc exited with {self.process.returncode}: "
                    + self.log.read_text(errors="replace")[-2000:]
                )
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until(healthy, within=30, what="twistd mqttsvc answering /healthz")

    def stop(self) -> None:
        """
        Stop it as an operator would (SIGTERM); kill it if that takes too long.
        """
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
