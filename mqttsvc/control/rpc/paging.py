"""
Pages of the list methods: their limits, and the opaque cursors that say
where the next page starts.

A cursor is the sort key of the last item of a page, tagged with the list
it belongs to, as URL-safe base64 of JSON.  Every list is ordered by a key
that is unique within it, so the next page starts strictly after that key:
pages never repeat or skip an item, however rows are added meanwhile
(those added behind the cursor are simply not seen; keyset pagination
instead of OFFSET, which costs a scan of every row before the page).

A cursor is checked strictly: anything but what the same list gave back is
-32602 naming C{cursor}.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from mqttsvc.control.rpc.dispatcher import Call, Param, RPCError, invalid_params
from mqttsvc.db.pages import Page

#: Items in a page when the call does not say.
DEFAULT_LIMIT = 100

#: The most items in a page.  The largest page of devices, topics or
#: readings is about 200 kB of JSON: its rows become items in 4-5 ms and
#: encode in about 1 ms on this machine (scripts/list_pages.py; 300,000
#: devices read in 300 pages while service.status kept answering within
#: 25 ms, where one device.list of them had held it for 2.5 s).
MAX_LIMIT = 1000

#: The most sites in a page: a site is 1 kB of configuration and status,
#: built from its row and its running service.  1,000 of them took 45 ms a
#: call (6.4 ms of it encoding 0.95 MB), 200 took 11 ms, 100 take 6 ms.
MAX_SITE_LIMIT = 100

#: Characters of a cursor: room for the longest key, a 1,024-byte topic
#: (escaped, in base64).
MAX_CURSOR = 4096

#: What each list's cursor holds after its tag: the types of its sort key.
KEYS: dict[str, tuple[str, ...]] = {
    "site": ("str",),
    "device": ("str", "str?", "str"),
    "topic": ("str",),
    "reading.ts": ("time", "str"),
    "reading.received": ("time", "int"),
    "event": ("time", "str", "int"),
    "deadletter": ("int",),
}


#: The result of every list method, for the OpenRPC document.
PAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {"type": "object"}},
        "next_cursor": {
            "type": ["string", "null"],
            "description": "Pass it as cursor for the next page; null after the last.",
        },
    },
    "required": ["items", "next_cursor"],
    "additionalProperties": False,
}


def cursor_param() -> Param:
    return Param(
        "cursor",
        "string",
        required=False,
        nullable=True,
        max_length=MAX_CURSOR,
        description="Where the page starts: the next_cursor of the page before, unchanged.",
    )


def limit_param(most: int = MAX_LIMIT) -> Param:
    return Param(
        "limit",
        "integer",
        required=False,
        description=f"Items in the page, 1 to {most} (default {DEFAULT_LIMIT}).",
    )


def limit(call: Call, most: int = MAX_LIMIT) -> int:
    value: int = call.params.get("limit", DEFAULT_LIMIT)
    if not 1 <= value <= most:
        raise invalid_params("limit", f"must be from 1 to {most}")
    return value


def encode(tag: str, key: Sequence[Any]) -> str:
    """
    The cursor of C{key} in the list C{tag}.
    """
    values = [v.isoformat() if isinstance(v, datetime) else v for v in key]
    text = json.dumps([tag, *values], separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii").rstrip("=")


def _value(kind: str, value: Any) -> Any:
    if kind == "str?" and value is None:
        return None
    if kind in ("str", "str?") and isinstance(value, str):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "time" and isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(value) from None
        if moment.tzinfo is not None:
            return moment
    raise ValueError(value)


def decode(call: Call, tag: str) -> tuple[Any, ...] | None:
    """
    The sort key in the call's C{cursor}, or None when it has none.

    @raise RPCError: -32602 naming C{cursor} when it is not a cursor that
        the list C{tag} gave.
    """
    cursor: str | None = call.params.get("cursor")
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != cursor:
            raise ValueError("not canonical base64")
        value = json.loads(raw.decode("utf-8"))
        kinds = KEYS[tag]
        if not isinstance(value, list) or len(value) != len(kinds) + 1 or value[0] != tag:
            raise ValueError("not this list's")
        return tuple(_value(kind, v) for kind, v in zip(kinds, value[1:], strict=True))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise bad_cursor(call) from None


def bad_cursor(call: Call) -> RPCError:
    """
    The error for a cursor that the method did not give.
    """
    return invalid_params(
        "cursor", f"is not a cursor that {call.method} gave: pass its next_cursor back unchanged"
    )


def answer(tag: str, page: Page) -> dict[str, Any]:
    """
    A list method's result: the page's items and the cursor of the next
    page, or null when none follows.
    """
    following = encode(tag, page.last) if page.more and page.last is not None else None
    return {"items": page.items, "next_cursor": following}
