"""
A synchronous client for mqttsvc's JSON-RPC control plane.

It uses the standard library only, so the Django backend (or any script)
can import it without Twisted or any other dependency::

    from mqttsvc.rpcclient import MqttSvcClient, NotFound

    client = MqttSvcClient("http://127.0.0.1:8780/rpc", token="...", timeout=5)
    client.site_create("site_001", "broker.example.com", port=8883)
    print(client.site_status("site_001")["status"])

Every call blocks for at most about C{timeout} seconds (see L{MqttSvcClient})
and either returns the decoded result or raises an L{MqttSvcError}:

  - L{RPCError} (and its subclasses L{NotFound}, L{Conflict},
    L{Unavailable}, L{InvalidParams}, L{MethodNotFound}): the service
    answered, and refused the call;
  - L{AuthenticationError}: the service refused the token (HTTP 401);
  - L{TransportError} (and L{Timeout}): no usable answer arrived.
"""

from __future__ import annotations

import http.client
import itertools
import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, NotRequired, Required, TypedDict, TypeVar, Unpack, cast

__all__ = [
    "AuthenticationError",
    "Conflict",
    "ConnectionFields",
    "DeadLetter",
    "Descriptors",
    "Device",
    "DiscoveredTopic",
    "Event",
    "InvalidParams",
    "MethodNotFound",
    "MqttSvcClient",
    "MqttSvcError",
    "NotFound",
    "Page",
    "RPCError",
    "Reading",
    "ResponseTooLarge",
    "ServiceStatus",
    "Site",
    "SiteFields",
    "SiteStatus",
    "SiteTest",
    "SiteUpdate",
    "SiteWithStatus",
    "Timeout",
    "TopicSpec",
    "TransportError",
    "Unavailable",
]

#: Where C{twistd mqttsvc} listens unless told otherwise.
DEFAULT_URL = "http://127.0.0.1:8780/rpc"

#: The least time C{site_test} waits by default: the service spends up to 10 s
#: connecting to the broker and up to 10 s disconnecting.
SITE_TEST_TIMEOUT = 25.0

#: The largest answer read, in bytes; anything longer is a transport error.
MAX_RESPONSE = 64 * 1024 * 1024

#: Items asked for per page by the C{iter_*} methods: the most the service
#: gives (C{mqttsvc.control.rpc.paging.MAX_LIMIT}), and of sites
#: (C{mqttsvc.control.rpc.paging.MAX_SITE_LIMIT}).
PAGE_SIZE = 1000
SITE_PAGE_SIZE = 100

#: The C{since} of C{iter_readings} when none is given: before any reading.
EARLIEST = "0001-01-01T00:00:00Z"

# JSON-RPC error codes that have an exception class of their own.
NOT_FOUND = -32001
CONFLICT = -32002
UNAVAILABLE = -32003
RESPONSE_TOO_LARGE = -32004
INVALID_PARAMS = -32602
METHOD_NOT_FOUND = -32601


# --- errors -------------------------------------------------------------------


class MqttSvcError(Exception):
    """
    A call did not produce a result.  Catch this to handle every failure.
    """


class RPCError(MqttSvcError):
    """
    The service answered with a JSON-RPC error object.

    @ivar code: the JSON-RPC error code.
    @ivar message: the service's message, meant for people.
    @ivar data: the error's C{data} (details such as the bad field), or None.
    @ivar method: the method that was called.
    """

    def __init__(
        self, code: int, message: str, data: Any = None, method: str | None = None
    ) -> None:
        super().__init__(code, message, data, method)
        self.code = code
        self.message = message
        self.data = data
        self.method = method

    def __str__(self) -> str:
        return f"{self.message} (code {self.code})"

    @classmethod
    def from_error(cls, error: dict[str, Any], method: str | None = None) -> RPCError:
        """
        The exception for a JSON-RPC error object, of the subclass its code
        selects.
        """
        code = error.get("code")
        message = error.get("message")
        if not isinstance(code, int) or not isinstance(message, str):
            raise TransportError(f"malformed JSON-RPC error object: {error!r}")
        kind = _ERRORS_BY_CODE.get(code, RPCError)
        return kind(code, message, error.get("data"), method)


class NotFound(RPCError):
    """
    The site (or other object) named in the call does not exist (-32001).
    """


class Conflict(RPCError):
    """
    The call conflicts with what exists, e.g. the site already exists (-32002).
    """


class Unavailable(RPCError):
    """
    The service cannot reach its database right now; try again shortly (-32003).
    """


class ResponseTooLarge(RPCError):
    """
    The answer would have passed the service's limit (-32004; C{data} has
    the C{limit} in bytes): ask for less, e.g. a smaller C{limit}.
    """


class MethodNotFound(RPCError):
    """
    The service does not know the method (-32601): it is older than this
    client, or the name is wrong.
    """


class InvalidParams(RPCError):
    """
    A parameter was missing or invalid (-32602).

    @ivar field: the name of the offending parameter (e.g. C{"port"} or
        C{"topics[0].qos"}), or None when the service did not name one.
    """

    @property
    def field(self) -> str | None:
        if isinstance(self.data, dict):
            field = self.data.get("field")
            if isinstance(field, str):
                return field
        return None


_ERRORS_BY_CODE: dict[int, type[RPCError]] = {
    NOT_FOUND: NotFound,
    CONFLICT: Conflict,
    UNAVAILABLE: Unavailable,
    RESPONSE_TOO_LARGE: ResponseTooLarge,
    INVALID_PARAMS: InvalidParams,
    METHOD_NOT_FOUND: MethodNotFound,
}


class AuthenticationError(MqttSvcError):
    """
    The service refused the call for want of a valid bearer token (HTTP 401).
    """


class TransportError(MqttSvcError):
    """
    No usable answer: the service could not be reached, or it answered with
    something other than a JSON-RPC response (an HTTP error page, a 5xx).

    @ivar status: the HTTP status of the answer, or None when there was none.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Timeout(TransportError):
    """
    No answer within the timeout.

    Unlike a refused connection, the service may have received and carried
    out the call: a retried C{site.create} may then fail with L{Conflict}.
    """


# --- result shapes ------------------------------------------------------------


class Descriptors(TypedDict):
    """
    File descriptors against the process's limit (see C{service.status}).
    """

    limit: int
    open: int
    sites: int
    needed: int
    sites_possible: int
    warning: str | None


class ServiceStatus(TypedDict, total=False):
    """
    The result of C{service.status}: counts of sites by connection status,
    and the file descriptors the sites need against the limit.
    """

    state: Required[str]
    total: Required[int]
    connected: Required[int]
    connecting: Required[int]
    disconnected: Required[int]
    error: Required[int]
    descriptors: Descriptors


class ClusterMember(TypedDict):
    """
    A live instance in C{cluster.status}: the sites whose lease it holds,
    each lease's epoch, and when it joined and last renewed (ISO 8601).
    """

    instance: str
    sites: list[str]
    epochs: dict[str, int]
    started_at: str
    renewed_at: str
    expires_at: str


class ClusterStatus(TypedDict):
    """
    The result of C{cluster.status}: the instance that answered, whether it
    runs with C{--cluster}, and the live instances of the cluster.
    """

    instance: str
    cluster: bool
    instances: list[ClusterMember]


class TopicSpec(TypedDict):
    """
    One subscription of a site.  C{kind} is C{gateway_heartbeat},
    C{datalogger_heartbeat}, C{sensor_data} or C{other}.
    """

    topic: str
    kind: NotRequired[str]
    qos: NotRequired[int]


class DeviceIntervals(TypedDict):
    """
    Expected seconds between messages, per device kind.
    """

    gateway: float
    datalogger: float
    sensor: float


class Subscription(TypedDict):
    """
    What the broker answered to one subscription: whether it granted it,
    and its reason code (e.g. C{"Granted QoS 1"}, C{"Not authorized"}).
    """

    topic: str
    granted: bool
    reason: str


class SiteStatus(TypedDict):
    """
    The result of C{site.status}, C{site.start}, C{site.stop} and
    C{site.restart}.  Timestamps are ISO 8601 UTC strings.
    """

    site_id: str
    status: Literal["connected", "connecting", "disconnected", "error"]
    is_enabled: bool
    last_connected_at: str | None
    mqtt_retry_count: int
    mqtt_next_retry: str | None
    topics_list: list[str]
    last_error: str | None
    state: str
    state_since: str | None
    subscriptions: list[Subscription]
    messages_received: int
    messages_rejected: int
    last_message_at: str | None


class Site(TypedDict):
    """
    The result of C{site.get}: a site's configuration (C{has_password}
    instead of the password).
    """

    site_id: str
    host: str
    port: int
    username: str | None
    has_password: bool
    client_id_prefix: str
    is_enabled: bool
    protocol: str
    keepalive: int
    topics: list[TopicSpec]
    status_topic: str | None
    device_intervals: DeviceIntervals
    offline_grace: float
    #: None: the service's --max-devices.
    max_devices: int | None
    created_at: str | None
    updated_at: str | None


class SiteWithStatus(Site):
    """
    A site's configuration with its status: the items of C{site.list} and
    the result of C{site.create} and C{site.update}.
    """

    status: SiteStatus


class DeleteResult(TypedDict):
    """
    The result of C{site.delete}.
    """

    site_id: str
    deleted: bool


class SiteTest(TypedDict):
    """
    The result of C{site.test}: whether a connection succeeded, and if not,
    the error's category (C{refused}, C{timeout}, C{dns}, C{tls}, C{auth},
    C{protocol}, C{network}) and detail.
    """

    ok: bool
    category: str | None
    error: str | None


class Device(TypedDict):
    """
    One gateway, datalogger or sensor of a site.
    """

    kind: Literal["gateway", "datalogger", "sensor"]
    device_id: str
    gateway_id: str | None
    status: str
    reported_status: str | None
    first_seen_at: str | None
    last_seen_at: str | None


class DeviceCounts(TypedDict):
    """
    How many devices of one site are online, offline and unknown.
    """

    site_id: str
    online: int
    offline: int
    unknown: int


class Reading(TypedDict):
    """
    One value a sensor reported.
    """

    sensor_id: str
    ts: str
    name: str
    value: Any
    unit: str | None
    received_at: str | None


class DiscoveredTopic(TypedDict):
    """
    A topic a site's broker delivered, with how often.
    """

    topic_path: str
    first_seen_at: str | None
    last_seen_at: str | None
    message_count: int


class Event(TypedDict):
    """
    An event: a connection's state change or a device's status change.
    """

    id: int
    type: Literal["connection", "device"]
    site_id: str
    at: str
    data: dict[str, Any]


class DeadLetter(TypedDict):
    """
    A message that could not be processed, with the reason.  C{payload} is
    the text when the payload is UTF-8, else None; C{payload_base64} is
    always the exact bytes kept: the whole payload, or its first 64 KiB
    when C{truncated} (C{payload_size} and C{payload_sha256} are the whole
    payload's).  C{topic} is storable text (a NUL or bytes that are not
    UTF-8 escaped, cut at 1,024 characters); when that is not the topic as
    received, C{topic_raw_base64} holds its bytes (up to 4 KiB).
    """

    id: int
    site_id: str
    topic: str
    topic_raw_base64: str | None
    payload: str | None
    payload_base64: str
    payload_size: int
    payload_sha256: str
    truncated: bool
    reason: str
    received_at: str


class ReplayResult(TypedDict):
    """
    The result of C{deadletter.replay}.
    """

    replayed: int
    dead_again: int


class PurgeResult(TypedDict):
    """
    The result of C{deadletter.purge}.
    """

    purged: int


_T = TypeVar("_T")


class Page(list[_T]):
    """
    One page of a list method: a list of its items, and C{next_cursor},
    which gives the next page when passed as C{cursor} (None after the
    last page).  Being a list, code that loops over a list method's result
    keeps working, over the first page.
    """

    def __init__(self, items: Iterable[_T], next_cursor: str | None) -> None:
        super().__init__(items)
        self.next_cursor = next_cursor

    def __repr__(self) -> str:
        return f"Page({list.__repr__(self)}, next_cursor={self.next_cursor!r})"


# --- parameters ---------------------------------------------------------------


class ConnectionFields(TypedDict, total=False):
    """
    How to reach a site's broker (the optional parameters of C{site.test}).
    """

    port: int
    username: str | None
    password: str | None
    protocol: Literal["3.1.1", "5"]
    keepalive: int


class SiteFields(ConnectionFields, total=False):
    """
    The optional parameters of C{site.create}.  Give only what should be
    set; None clears a nullable field (e.g. C{password=None}: no password).
    """

    client_id_prefix: str
    is_enabled: bool
    topics: list[TopicSpec]
    status_topic: str | None
    device_intervals: dict[str, float] | None
    offline_grace: float | None
    max_devices: int | None


class SiteUpdate(SiteFields, total=False):
    """
    The parameters of C{site.update}: any of C{site.create}'s but the site
    id.  Fields not given keep their values.
    """

    host: str


def _present(**params: Any) -> dict[str, Any]:
    # Optional filters: None means "not given", so leave it out.
    return {name: value for name, value in params.items() if value is not None}


# --- the client ---------------------------------------------------------------


class MqttSvcClient:
    """
    A client of one mqttsvc instance.

    Calls are independent HTTP requests, so one instance may be shared by
    threads.  Environment proxy settings (C{HTTP_PROXY}, ...) are ignored:
    the bearer token goes to the service and nowhere else.

    @param url: the JSON-RPC endpoint, e.g. C{http://127.0.0.1:8780/rpc}.
    @param token: the bearer token, or None for a service without tokens.
    @param timeout: seconds to wait for the connection, and then for the
        answer, of each call (unless the call is given its own C{timeout}).
        It bounds every wait on the socket; the service sends its answer in
        one piece, so in practice it bounds the call.  Name resolution of
        the host is not covered: use an IP address or a name in
        C{/etc/hosts}.
    """

    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 10.0
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http:// or https:// URL, not {url!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.url = url
        self.timeout = timeout
        self._token = token
        self._ids = itertools.count(1)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        # Never the token: reprs end up in logs and error reports.
        return f"MqttSvcClient({self.url!r}, timeout={self.timeout})"

    def call(
        self,
        method: str,
        params: dict[str, Any] | Sequence[Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """
        Call any method and return its decoded result.

        @param params: by name (a dict) or by position (a list), or None.
        @param timeout: seconds for this call instead of the client's.
        @raise MqttSvcError: see the module docstring.
        """
        call_id = next(self._ids)
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": call_id}
        if params is not None:
            request["params"] = params if isinstance(params, dict) else list(params)
        body = self._post(
            json.dumps(request).encode("utf-8"), self.timeout if timeout is None else timeout
        )
        try:
            response = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise TransportError(
                f"{self.url} answered with something other than JSON: {_excerpt(body)}"
            ) from None
        if not isinstance(response, dict) or ("result" not in response and "error" not in response):
            raise TransportError(
                f"{self.url} answered with something other than a JSON-RPC response: "
                f"{_excerpt(body)}"
            )
        if "error" in response:
            error = response["error"]
            if not isinstance(error, dict):
                raise TransportError(f"malformed JSON-RPC error object: {error!r}")
            raise RPCError.from_error(error, method)
        if response.get("id") != call_id:
            raise TransportError(
                f"{self.url} answered call {call_id} with the id {response.get('id')!r}"
            )
        return response["result"]

    def _post(self, body: bytes, timeout: float) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=timeout) as response:
                answer = response.read(MAX_RESPONSE + 1)
        except urllib.error.HTTPError as e:
            return self._http_error(e)
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise Timeout(f"no connection to {self.url} within {timeout} s") from None
            raise TransportError(f"cannot reach mqttsvc at {self.url}: {_reason(e)}") from None
        except TimeoutError:
            raise Timeout(f"{self.url} did not answer within {timeout} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise TransportError(f"the call to {self.url} failed: {_reason(e)}") from None
        if len(answer) > MAX_RESPONSE:
            raise TransportError(f"{self.url} answered with more than {MAX_RESPONSE} bytes")
        return answer

    def _http_error(self, e: urllib.error.HTTPError) -> bytes:
        try:
            detail = e.read(64 * 1024)
        except (OSError, http.client.HTTPException):
            detail = b""
        finally:
            e.close()
        if e.code == 401:
            message = _json_field(detail, "error") or "a valid bearer token is required"
            if not self._token:
                message = f"no token was given, and {message}"
            raise AuthenticationError(f"{self.url} answered HTTP 401: {message}")
        if _is_rpc_error(detail):
            # E.g. 413 for a body that is too large: a JSON-RPC error all the same.
            return detail
        described = _json_field(detail, "error") or _excerpt(detail)
        raise TransportError(f"{self.url} answered HTTP {e.code}: {described}", e.code)

    def _page(self, method: str, params: dict[str, Any], timeout: float | None) -> Page[Any]:
        result = self.call(method, params, timeout=timeout)
        if (
            not isinstance(result, dict)
            or not isinstance(result.get("items"), list)
            or not isinstance(result.get("next_cursor", 0), str | None)
        ):
            answer = _excerpt(json.dumps(result).encode())
            raise TransportError(f"{method} answered something other than a page: {answer}")
        return Page(result["items"], result["next_cursor"])

    def _every(
        self,
        method: str,
        params: dict[str, Any],
        timeout: float | None,
        feed: bool = False,
        page_size: int = PAGE_SIZE,
    ) -> Iterator[Any]:
        """
        Every item of a list method, a page at a time, following the cursors
        until there is none; for a C{feed} (reading.list in receive order,
        which always gives a cursor to poll with later), until a page is
        shorter than asked.
        """
        cursor = None
        while True:
            page = self._page(
                method, {**params, **_present(cursor=cursor), "limit": page_size}, timeout
            )
            yield from page
            if page.next_cursor is None or (feed and len(page) < page_size):
                return
            cursor = page.next_cursor

    # --- the methods, one by one ------------------------------------------------

    def service_status(self, *, timeout: float | None = None) -> ServiceStatus:
        """
        Counts of sites by connection status.
        """
        return cast(ServiceStatus, self.call("service.status", timeout=timeout))

    def cluster_status(self, *, timeout: float | None = None) -> ClusterStatus:
        """
        The live instances of the cluster and the sites each owns.
        """
        return cast(ClusterStatus, self.call("cluster.status", timeout=timeout))

    def site_list(
        self,
        status: str | None = None,
        *,
        cursor: str | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Page[SiteWithStatus]:
        """
        A page of the sites in site id order (C{limit}: 1 to 100, the
        service's default 100), with their configuration and status;
        optionally only those in one C{status} (C{connected},
        C{connecting}, C{disconnected}, C{error}).
        """
        params = _present(status=status, cursor=cursor, limit=limit)
        return self._page("site.list", params, timeout)

    def iter_sites(
        self, status: str | None = None, *, timeout: float | None = None
    ) -> Iterator[SiteWithStatus]:
        """
        Every site (or those in C{status}), a page at a time.
        """
        return self._every("site.list", _present(status=status), timeout, page_size=SITE_PAGE_SIZE)

    def site_get(self, site_id: str, *, timeout: float | None = None) -> Site:
        """
        A site's configuration.

        @raise NotFound: there is no such site.
        """
        return cast(Site, self.call("site.get", {"site_id": site_id}, timeout=timeout))

    def site_create(
        self,
        site_id: str,
        host: str,
        *,
        timeout: float | None = None,
        **fields: Unpack[SiteFields],
    ) -> SiteWithStatus:
        """
        Create a site; an enabled site (the default) connects at once.

        @raise Conflict: the site exists already.
        @raise InvalidParams: a field is invalid; C{.field} names it.
        """
        params = {"site_id": site_id, "host": host, **fields}
        return cast(SiteWithStatus, self.call("site.create", params, timeout=timeout))

    def site_update(
        self, site_id: str, *, timeout: float | None = None, **fields: Unpack[SiteUpdate]
    ) -> SiteWithStatus:
        """
        Change some of a site's fields; the others keep their values.  A
        change of how to connect reconnects the site.

        @raise NotFound: there is no such site.
        @raise InvalidParams: a field is invalid; C{.field} names it.
        """
        params = {"site_id": site_id, **fields}
        return cast(SiteWithStatus, self.call("site.update", params, timeout=timeout))

    def site_delete(self, site_id: str, *, timeout: float | None = None) -> DeleteResult:
        """
        Disconnect a site cleanly and delete it.

        @raise NotFound: there is no such site.
        """
        return cast(DeleteResult, self.call("site.delete", {"site_id": site_id}, timeout=timeout))

    def site_start(self, site_id: str, *, timeout: float | None = None) -> SiteStatus:
        """
        Enable a site and connect it now (a site waiting or in error retries
        at once).

        @raise NotFound: there is no such site.
        """
        return cast(SiteStatus, self.call("site.start", {"site_id": site_id}, timeout=timeout))

    def site_stop(self, site_id: str, *, timeout: float | None = None) -> SiteStatus:
        """
        Disable a site and disconnect it cleanly.

        @raise NotFound: there is no such site.
        """
        return cast(SiteStatus, self.call("site.stop", {"site_id": site_id}, timeout=timeout))

    def site_restart(self, site_id: str, *, timeout: float | None = None) -> SiteStatus:
        """
        Enable a site, reset its retry count and reconnect now.

        @raise NotFound: there is no such site.
        """
        return cast(SiteStatus, self.call("site.restart", {"site_id": site_id}, timeout=timeout))

    def site_status(self, site_id: str, *, timeout: float | None = None) -> SiteStatus:
        """
        A site's connection status.

        @raise NotFound: there is no such site.
        """
        return cast(SiteStatus, self.call("site.status", {"site_id": site_id}, timeout=timeout))

    def site_test(
        self, host: str, *, timeout: float | None = None, **fields: Unpack[ConnectionFields]
    ) -> SiteTest:
        """
        Try to connect to a broker as a site would, without creating one.
        A failed connection is a result (C{ok} false), not an exception.

        Unless given a C{timeout}, it waits at least L{SITE_TEST_TIMEOUT}
        seconds, longer than the service's own limits on the attempt.
        """
        params = {"host": host, **fields}
        if timeout is None:
            timeout = max(self.timeout, SITE_TEST_TIMEOUT)
        return cast(SiteTest, self.call("site.test", params, timeout=timeout))

    def device_list(
        self,
        site_id: str,
        kind: str | None = None,
        status: str | None = None,
        *,
        cursor: str | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Page[Device]:
        """
        A page of a site's devices (by kind, gateway and id), optionally
        only of one kind (C{gateway}, C{datalogger}, C{sensor}) or status
        (C{online}, C{offline}, C{unknown}).
        """
        params = _present(site_id=site_id, kind=kind, status=status, cursor=cursor, limit=limit)
        return self._page("device.list", params, timeout)

    def iter_devices(
        self,
        site_id: str,
        kind: str | None = None,
        status: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[Device]:
        """
        Every device of a site (of C{kind}, in C{status}), a page at a time.
        """
        return self._every(
            "device.list", _present(site_id=site_id, kind=kind, status=status), timeout
        )

    def device_counts(
        self, site_id: str | None = None, *, timeout: float | None = None
    ) -> list[DeviceCounts]:
        """
        Per site that has devices (or only C{site_id}): how many are
        online, offline and unknown.
        """
        params = _present(site_id=site_id)
        return cast(list[DeviceCounts], self.call("device.counts", params, timeout=timeout))

    def reading_list(
        self,
        site_id: str,
        sensor_id: str,
        since: str | None = None,
        limit: int | None = None,
        *,
        until: str | None = None,
        order: Literal["ts", "received"] | None = None,
        cursor: str | None = None,
        timeout: float | None = None,
    ) -> Page[Reading]:
        """
        A page of a sensor's readings, oldest first by C{order}: C{"ts"}
        (the sensor's time, the default) or C{"received"} (when mqttsvc
        received them).  After C{since} (ISO 8601, exclusive) up to
        C{until} (inclusive), both on that same time, or from C{cursor};
        with neither C{since} nor C{cursor}, the latest C{limit}.

        To poll for new readings use C{order="received"}: its pages always
        carry a C{next_cursor}; keep it and pass it as C{cursor} next time.
        """
        params = _present(
            site_id=site_id,
            sensor_id=sensor_id,
            since=since,
            limit=limit,
            until=until,
            order=order,
            cursor=cursor,
        )
        return self._page("reading.list", params, timeout)

    def iter_readings(
        self,
        site_id: str,
        sensor_id: str,
        since: str | None = None,
        *,
        until: str | None = None,
        order: Literal["ts", "received"] | None = None,
        timeout: float | None = None,
    ) -> Iterator[Reading]:
        """
        Every reading of a sensor after C{since} (from the first, unless
        given) up to C{until}, in C{order}, a page at a time.
        """
        params = _present(
            site_id=site_id, sensor_id=sensor_id, since=since or EARLIEST, until=until, order=order
        )
        return self._every("reading.list", params, timeout, feed=order == "received")

    def topic_list(
        self,
        site_id: str,
        prefix: str | None = None,
        *,
        cursor: str | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Page[DiscoveredTopic]:
        """
        A page of the topics a site's broker has delivered, with counts, in
        code point order; only those that start with C{prefix}, if given.
        """
        params = _present(site_id=site_id, prefix=prefix, cursor=cursor, limit=limit)
        return self._page("topic.list", params, timeout)

    def iter_topics(
        self, site_id: str, prefix: str | None = None, *, timeout: float | None = None
    ) -> Iterator[DiscoveredTopic]:
        """
        Every topic of a site (that starts with C{prefix}), a page at a time.
        """
        return self._every("topic.list", _present(site_id=site_id, prefix=prefix), timeout)

    def event_list(
        self,
        site_id: str | None = None,
        since: str | None = None,
        limit: int | None = None,
        *,
        until: str | None = None,
        event_type: Literal["connection", "device"] | None = None,
        cursor: str | None = None,
        timeout: float | None = None,
    ) -> Page[Event]:
        """
        A page of events, oldest first, after C{since} (ISO 8601, exclusive)
        up to C{until} (inclusive), of one type if given.  C{limit} is 1 to
        1000 (the service's default is 100).  Read on with C{next_cursor}
        (events at the same instant as the last one are not lost, as they
        would be by passing its C{at} as C{since}).
        """
        params = _present(
            site_id=site_id, since=since, limit=limit, until=until, type=event_type, cursor=cursor
        )
        return self._page("event.list", params, timeout)

    def iter_events(
        self,
        site_id: str | None = None,
        since: str | None = None,
        *,
        until: str | None = None,
        event_type: Literal["connection", "device"] | None = None,
        timeout: float | None = None,
    ) -> Iterator[Event]:
        """
        Every event (of a site, between C{since} and C{until}, of a type),
        oldest first, a page at a time.
        """
        params = _present(site_id=site_id, since=since, until=until, type=event_type)
        return self._every("event.list", params, timeout)

    def deadletter_list(
        self,
        site_id: str | None = None,
        limit: int | None = None,
        *,
        since: str | None = None,
        until: str | None = None,
        cursor: str | None = None,
        timeout: float | None = None,
    ) -> Page[DeadLetter]:
        """
        A page of the messages that could not be processed, with the
        reasons, newest first; C{since} (exclusive) and C{until}
        (inclusive) bound when they were received.
        """
        params = _present(site_id=site_id, limit=limit, since=since, until=until, cursor=cursor)
        return self._page("deadletter.list", params, timeout)

    def iter_deadletters(
        self,
        site_id: str | None = None,
        *,
        since: str | None = None,
        until: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[DeadLetter]:
        """
        Every dead letter (of a site, received between C{since} and
        C{until}), newest first, a page at a time.
        """
        params = _present(site_id=site_id, since=since, until=until)
        return self._every("deadletter.list", params, timeout)

    def deadletter_replay(
        self, ids: Sequence[int], *, timeout: float | None = None
    ) -> ReplayResult:
        """
        Process dead letters again (e.g. after a configuration fix); those
        that fail again stay dead letters.
        """
        return cast(
            ReplayResult, self.call("deadletter.replay", {"ids": list(ids)}, timeout=timeout)
        )

    def deadletter_purge(self, ids: Sequence[int], *, timeout: float | None = None) -> PurgeResult:
        """
        Delete dead letters.
        """
        return cast(PurgeResult, self.call("deadletter.purge", {"ids": list(ids)}, timeout=timeout))

    def discover(self, *, timeout: float | None = None) -> dict[str, Any]:
        """
        The service's OpenRPC document: every method with its parameters.
        """
        return cast(dict[str, Any], self.call("rpc.discover", timeout=timeout))


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _excerpt(body: bytes, length: int = 200) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return "(an empty body)"
    return repr(text[:length] + ("..." if len(text) > length else ""))


def _json_field(body: bytes, name: str) -> str | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(value, dict) and isinstance(value.get(name), str):
        return cast(str, value[name])
    return None


def _is_rpc_error(body: bytes) -> bool:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(value, dict) and isinstance(value.get("error"), dict)
