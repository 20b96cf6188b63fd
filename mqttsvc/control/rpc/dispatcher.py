"""
A JSON-RPC 2.0 dispatcher over a registry of declared methods.

It implements the whole specification: single calls and batches,
notifications, parameters by name or by position, and the standard error
codes.  Each method declares its parameters; they are checked before the
method runs, and a bad one is reported as -32602 naming the field.  Every
string in a parameter, at any depth, is checked too: no control character
(NUL included), no lone surrogate, a bounded length.

One body costs bounded memory whatever it holds: a batch has at most
C{max_batch} calls, run one after the other, and its answer stops growing
at C{max_response} bytes (issue 13: 300 C{reading.list} calls in one batch
answered 118 MiB and peaked at 732 MB when they ran side by side).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
from twisted.logger import Logger

from mqttsvc.config import CONTROL_OR_SURROGATE

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: Application errors (the -32000..-32099 range the spec reserves for servers).
NOT_FOUND = -32001
CONFLICT = -32002
UNAVAILABLE = -32003
RESPONSE_TOO_LARGE = -32004

#: Calls in one batch.
MAX_BATCH = 100

#: Bytes of one answer (a result, or a batch's results together): room for
#: the largest page of any list (1,000 items, 0.2 MB; a page of dead letters
#: stops near 2.4 MB, see L{mqttsvc.db.dead_letters.DEAD_LETTER_PAGE_BYTES}).
MAX_RESPONSE = 4 * 1024 * 1024

#: Characters of a string parameter, unless its declaration says otherwise.
MAX_STRING = 1024

#: Characters of a string inside an object or array parameter (a path).
MAX_NESTED_STRING = 4096

#: Levels an object or array parameter may nest.
MAX_DEPTH = 16

#: L{CONTROL_OR_SURROGATE} as a JSON Schema pattern, for the OpenRPC document
#: (which cannot say "no lone surrogate").
STRING_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"


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


def _string_problem(value: str, max_length: int) -> str | None:
    if len(value) > max_length:
        return f"must be at most {max_length} characters"
    bad = CONTROL_OR_SURROGATE.search(value)
    if bad is None:
        return None
    if "\ud800" <= bad.group() <= "\udfff":
        return "must not contain a lone surrogate (\\ud800-\\udfff): it is not valid Unicode"
    return "must not contain NUL or other control characters (U+0000-U+001F, U+007F-U+009F)"


def check_strings(field: str, value: Any, max_length: int = MAX_STRING) -> None:
    """
    Check every string of a parameter's value: C{value} itself against
    C{max_length}, the keys and values inside an object or array, at any
    depth, against L{MAX_NESTED_STRING}.  Iterative, so that no depth
    of nesting can exhaust the stack.

    @raise RPCError: -32602 naming C{field}.
    """
    if isinstance(value, str):
        problem = _string_problem(value, max_length)
        if problem is not None:
            raise invalid_params(field, problem)
        return
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            problem = _string_problem(item, MAX_NESTED_STRING)
            if problem is not None:
                raise invalid_params(field, problem)
            continue
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= MAX_DEPTH:
            raise invalid_params(field, f"must not nest more than {MAX_DEPTH} levels deep")
        pending.extend((child, depth + 1) for child in children)


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
    max_length: int = MAX_STRING

    def check(self, value: Any) -> None:
        if value is None:
            if not self.nullable:
                raise invalid_params(self.name, "must not be null")
            return
        if not _JSON_TYPES[self.type](value):
            raise invalid_params(self.name, f"must be of type {self.type}")
        check_strings(self.name, value, self.max_length)


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
    #: The JSON Schema of its result, for the OpenRPC document (None: any).
    result: dict[str, Any] | None = None
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


def _valid_id(id_: Any) -> bool:
    return id_ is None or (not isinstance(id_, bool) and isinstance(id_, str | int | float))


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
        max_batch: int = MAX_BATCH,
        max_response: int = MAX_RESPONSE,
    ) -> None:
        """
        @param errors: exceptions that methods may raise and the RPC errors
            they stand for (for example the database being unreachable).
        @param max_batch: the most calls in one batch.
        @param max_response: the most bytes of one answer.
        """
        self._errors = errors or {}
        self._max_batch = max_batch
        self._max_response = max_response
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
        except RecursionError:
            return _dump(
                _error_response(
                    None, RPCError(PARSE_ERROR, "Parse error: nested too deeply to be parsed")
                )
            )
        except (ValueError, UnicodeDecodeError) as e:
            return _dump(_error_response(None, RPCError(PARSE_ERROR, f"Parse error: {e}")))
        if isinstance(request, list):
            if not request:
                return _dump(
                    _error_response(None, RPCError(INVALID_REQUEST, "Invalid Request: empty batch"))
                )
            if len(request) > self._max_batch:
                return _dump(
                    _error_response(
                        None,
                        RPCError(
                            INVALID_REQUEST,
                            f"Invalid Request: a batch holds at most {self._max_batch} calls",
                            {"limit": self._max_batch, "calls": len(request)},
                        ),
                    )
                )
            return await self._batch(request, caller)
        response = await self._one(request, caller)
        if response is None:
            return None
        encoded = _encode(response)
        if len(encoded) > self._max_response:
            encoded = self._too_large(response["id"], len(encoded))
        return encoded.encode("utf-8")

    async def _batch(self, requests: list[Any], caller: str) -> bytes | None:
        """
        Run a batch's calls one after the other, so that one result at a
        time is held besides the answer so far; once the answer would pass
        C{max_response}, the calls left are not run.
        """
        answered: list[str] = []
        size = 2
        for request in requests:
            if size >= self._max_response:
                if isinstance(request, dict) and "id" in request:
                    answered.append(_encode(self._not_run(request["id"])))
                continue
            response = await self._one(request, caller)
            if response is None:
                continue
            encoded = _encode(response)
            if size + len(encoded) + 1 > self._max_response:
                encoded = self._too_large(response["id"], len(encoded))
                size = self._max_response
            else:
                size += len(encoded) + 1
            answered.append(encoded)
        return ("[" + ",".join(answered) + "]").encode("utf-8") if answered else None

    def _too_large(self, id_: Any, size: int) -> str:
        """
        The answer of a call that ran but whose result does not fit.
        """
        return _encode(
            _error_response(
                id_,
                RPCError(
                    RESPONSE_TOO_LARGE,
                    f"Response too large: this result ({size} bytes) would make the answer "
                    f"pass its limit of {self._max_response} bytes; the call ran, ask for "
                    "less (a smaller limit, or fewer calls in the batch)",
                    {"limit": self._max_response, "size": size, "ran": True},
                ),
            )
        )

    def _not_run(self, id_: Any) -> dict[str, Any]:
        return _error_response(
            id_ if _valid_id(id_) else None,
            RPCError(
                RESPONSE_TOO_LARGE,
                f"Response limit reached: the batch's answer reached {self._max_response} "
                "bytes, so this call was not run; send it again",
                {"limit": self._max_response, "ran": False},
            ),
        )

    async def _one(self, request: Any, caller: str) -> dict[str, Any] | None:
        if not isinstance(request, dict):
            return _error_response(
                None, RPCError(INVALID_REQUEST, "Invalid Request: not a JSON object")
            )
        is_notification = "id" not in request
        id_ = request.get("id")
        if not _valid_id(id_):
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
            return _error_response(id_, self._mapped(e))
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

    def _mapped(self, e: Exception) -> RPCError:
        """
        The RPC error for C{e}: that of its nearest class (or base class)
        among the registered ones, as C{except} picks its clause.
        """
        for cls in type(e).__mro__:
            convert = self._errors.get(cls)
            if convert is not None:
                return convert(e)
        raise AssertionError(f"{type(e).__name__} is not a registered error")


_encode = json.JSONEncoder(separators=(",", ":")).encode


def _dump(value: Any) -> bytes:
    return _encode(value).encode("utf-8")
