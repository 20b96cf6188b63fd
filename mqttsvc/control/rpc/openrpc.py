"""
The OpenRPC document of the control plane, generated from the method
registry itself so that it can never drift from the code.
"""

from __future__ import annotations

from typing import Any

from mqttsvc import __version__
from mqttsvc.control.rpc.dispatcher import (
    MAX_DEPTH,
    MAX_NESTED_STRING,
    STRING_PATTERN,
    Method,
    Param,
)


def _schema(param: Param) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": [param.type, "null"] if param.nullable else param.type}
    if param.type == "string":
        schema["maxLength"] = param.max_length
        schema["pattern"] = STRING_PATTERN
    return schema


def document(methods: list[Method]) -> dict[str, Any]:
    """
    An OpenRPC 1.2.6 document describing C{methods}.
    """
    return {
        "openrpc": "1.2.6",
        "info": {
            "title": "mqttsvc",
            "version": __version__,
            "description": "Control plane of mqttsvc: sites, their connections, and what "
            "their devices sent. Bearer token authentication. No string in a param, at any "
            "depth, may hold a control character (U+0000-U+001F, U+007F-U+009F) or a lone "
            f"surrogate; strings inside objects and arrays hold at most {MAX_NESTED_STRING} "
            f"characters, nested at most {MAX_DEPTH} levels deep.",
        },
        "methods": [
            {
                "name": m.name,
                "summary": m.summary,
                "paramStructure": "either",
                "params": [
                    {
                        "name": p.name,
                        "required": p.required,
                        "description": p.description,
                        "schema": _schema(p),
                    }
                    for p in m.params
                ],
                "result": {"name": "result", "schema": m.result or {}},
                "errors": [
                    {"code": -32602, "message": "Invalid params"},
                    {"code": -32001, "message": "Not found"},
                    {"code": -32002, "message": "Conflict"},
                    {"code": -32003, "message": "Database unavailable"},
                    {"code": -32004, "message": "Response too large"},
                ],
            }
            for m in methods
        ],
    }
