"""
What `make demo` says once it runs names every way in: the status page
and the event stream too (issue 15, item 14).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "demo" / "run.sh"


def closing_message() -> str:
    """
    The script's closing message, rendered by bash with the script's own
    URL variables (the rest stand-ins): running the whole demo needs root
    and minutes.
    """
    text = SCRIPT.read_text()
    urls = re.findall(r"^(?:RPC_PORT|[A-Z]+_URL)=.*$", text, re.MULTILINE)
    [message] = re.findall(r"^cat <<EOF\n.*?^EOF$", text, re.MULTILINE | re.DOTALL)
    stand_ins = "REPO=/repo VENV=/repo/.venv TOKENS=/repo/.demo/tokens LOG=l SIM_LOG=s DB=d"
    rendered = subprocess.run(
        ["bash", "-c", "\n".join([stand_ins, *urls, message])],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return rendered.stdout


def test_the_closing_message_names_the_status_page_and_the_event_stream() -> None:
    """The browser's URL and /events are in it, beside the JSON-RPC URL."""
    message = closing_message()
    assert "http://127.0.0.1:8780/rpc" in message
    assert re.search(r"status page: +http://127\.0\.0\.1:8780/ ", message), message
    assert "http://127.0.0.1:8780/events" in message
    assert "Bearer $(cut -d' ' -f2 /repo/.demo/tokens)\" http://127.0.0.1:8780/events" in message
