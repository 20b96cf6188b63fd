"""
A JSON-RPC 2.0 dispatcher over a registry of declared methods.

It implements the whole specification: single calls and batches,
notifications, parameters by name or by position, and the standard error
codes.  Each method declares its parameters; they are checked before the
method runs, and a bad one is reported as -32602 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: Application errors (the -32000..-32099 range the spec reserves for servers).
NOT_FOUND = -32001
CONFLICT = -32002
UNAVAILABLE = -32003


class RPCError(Exception):
    """
    An error to return as a JSON-RPC error object.
    """

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def as_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def invalid_params(field: str, problem: str) -> RPCError:
    return RPCError(
        INVALID_PARAMS, f"Invalid params: {field} {problem}", {"field": field, "problem": problem}
    )


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


@attrs.frozen
class Param:
    """
    One declared parameter: its name, JSON type, and whether it may be
    omitted (then it is absent from the call's params) or null.
    """

    name: str
    type: str = attrs.field(validator=attrs.validators.in_(_JSON_TYPES))
    required: bool = True
    nullable: bool = False
    description: str = ""

    def check(self, value: Any) -> None:
        if value is None:
            if not self.nullable:
                raise invalid_params(self.name, "must not be null")
            return
        if not _JSON_TYPES[self.type](value):
            raise invalid_params(self.name, f"must be of type {self.type}")


@attrs.frozen
class Call:
    """
    A validated call: the method's parameters by name, and who called.
    """

    method: str
    params: dict[str, Any]
    caller: str


@attrs.frozen
class Method:
    """
    A method in the registry.
    """

    name: str
    handler: Callable[[Call], Awaitable[Any]]
    params: tuple[Param, ...] = ()
    summary: str = ""
    _names: frozenset[str] = attrs.field(
        init=False,
        repr=False,
        eq=False,
        default=attrs.Factory(lambda self: frozenset(p.name for p in self.params), takes_self=True),
    )

    def bind(self, raw: Any, caller: str) -> Call:
        """
        Check raw params (an object, an array or absent) against the
        declaration.
        """
        if raw is None:
            named: dict[str, Any] = {}
        elif isinstance(raw, list):
            if len(raw) > len(self.params):
                raise RPCError(
                    INVALID_PARAMS,
                    f"Invalid params: {self.name} takes at most {len(self.params)} "
                    f"positional params, got {len(raw)}",
                    {"expected": [p.name for p in self.params]},
                )
            named = {p.name: v for p, v in zip(self.params, raw, strict=False)}
        elif isinstance(raw, dict):
            named = dict(raw)
            for name in named:
                if name not in self._names:
                    raise invalid_params(name, "is not a parameter of " + self.name)
        else:
            raise RPCError(INVALID_REQUEST, "Invalid Request: params must be an object or array")
        for p in self.params:
            if p.name in named:
                p.check(named[p.name])
            elif p.required:
                raise invalid_params(p.name, "is required")
        return Call(self.name, named, caller)


def _error_response(id_: Any, error: RPCError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": error.as_json(), "id": id_}


class Dispatcher:
    """
    Routes JSON-RPC requests to the methods of a registry.
    """

    log = Logger()

    def __init__(
        self,
        methods: Iterable[Method],
        errors: dict[type[Exception], Callable[[Exception], RPCError]] | None = None,
    ) -> None:
        """
        @param errors: exceptions that methods may raise and the RPC errors
            they stand for (for example the database being unreachable).
        """
        self._errors = errors or {}
        self.methods: dict[str, Method] = {}
        for m in methods:
            if m.name in self.methods:
                raise ValueError(f"method {m.name} is registered twice")
            self.methods[m.name] = m

    async def handle(self, body: bytes, caller: str) -> bytes | None:
        """
        Answer one HTTP body.

        @return: the response body, or None when there is nothing to send
            (the request was only notifications).
        """
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _dump(_error_response(None, RPCError(PARSE_ERROR, f"Parse error: {e}")))
        if isinstance(request, list):
            if not request:
                return _dump(
                    _error_response(None, RPCError(INVALID_REQUEST, "Invalid Request: empty batch"))
                )
            responses = await gatherResults(
                [Deferred.fromCoroutine(self._one(r, caller)) for r in request]
            )
            answered = [r for r in responses if r is not None]
            return _dump(answered) if answered else None
        response = await self._one(request, caller)
        return _dump(response) if response is not None else None

    async def _one(self, request: Any, caller: str) -> dict[str, Any] | None:
        if not isinstance(request, dict):
            return _error_response(
                None, RPCError(INVALID_REQUEST, "Invalid Request: not a JSON object")
            )
        is_notification = "id" not in request
        id_ = request.get("id")
        if id_ is not None and (isinstance(id_, bool) or not isinstance(id_, str | int | float)):
            return _error_response(
                None, RPCError(INVALID_REQUEST, "Invalid Request: id must be a string or number")
            )
        try:
            if request.get("jsonrpc") != "2.0":
                raise RPCError(INVALID_REQUEST, 'Invalid Request: jsonrpc must be "2.0"')
            name = request.get("method")
            if not isinstance(name, str):
                raise RPCError(INVALID_REQUEST, "Invalid Request: method must be a string")
            method = self.methods.get(name)
            if method is None:
                raise RPCError(METHOD_NOT_FOUND, f"Method not found: {name}", {"method": name})
            call = method.bind(request.get("params"), caller)
            result = await method.handler(call)
        except RPCError as e:
            if is_notification and e.code != INVALID_REQUEST:
                return None
            return _error_response(id_, e)
        except tuple(self._errors) as e:
            if is_notification:
                return None
            return _error_response(id_, self._errors[type(e)](e))
        except Exception:
            self.log.failure(
                "JSON-RPC method {method} failed (called by {caller})",
                method=request.get("method"),
                caller=caller,
            )
            if is_notification:
                return None
            return _error_response(
                id_, RPCError(INTERNAL_ERROR, "Internal error; the service log has the details")
            )
        if is_notification:
            return None
        return {"jsonrpc": "2.0", "result": result, "id": id_}


_encode = json.JSONEncoder(separators=(",", ":")).encode


def _dump(value: Any) -> bytes:
    return _encode(value).encode("utf-8")
