"""The master's HTTP face: a Klein app under ``{prefix}/v1`` (SPEC §8).

Handlers only decode and validate requests and encode answers; every
operation is a :class:`~nodepass.master.service.MasterService` method.  A
request body is validated *completely* before anything is applied, so a 400
never leaves a change half made.

Routes accept every method and dispatch themselves, so a wrong method gets
NodePass's JSON ``405 Method not allowed`` (with CORS headers) rather than
werkzeug's HTML page.  Methods are case-sensitive (RFC 9110 §9.1): ``get``
is an unknown method, not ``GET``.

Requests Twisted cannot even parse (a malformed request line or header, a
request line or header block over the limits below) get the same kind of
answer from :class:`MasterChannel`: a JSON error with CORS headers, then the
connection is closed once the client had a chance to read it.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Awaitable, Callable, Optional

from klein import Klein
from werkzeug.exceptions import NotFound
from twisted.internet import defer
from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import IResource, Resource

from nodepass.config.urls import URLError, text_problem
from nodepass.base.logs import escape_controls
from nodepass.master.records import MAX_TEXT, PEER_FIELDS, RequestError, json_utf8

MAX_BODY = 64 * 1024
ACTIONS = ("start", "stop", "restart", "reset")

MAX_LINE = 16 * 1024  # the request line, and each header line
MAX_HEAD = 32 * 1024  # the request line and every header line together
MAX_HEADERS = 200  # header lines in one request
# After refusing a request head, what the client is still sending is read
# and discarded for at most this long and this much, then the connection
# is aborted.
DRAIN_SECONDS = 2.0
DRAIN_BYTES = 1 << 20
MAX_MESSAGE = 300  # characters of an error message

CORS = {
    b"access-control-allow-origin": b"*",
    b"access-control-allow-methods": b"GET, PATCH, POST, PUT, DELETE, OPTIONS",
    b"access-control-allow-headers": b"Content-Type, Authorization, X-API-Key, Cache-Control",
}

_log = Logger(namespace="nodepass.master.http")


class CappedRequest(server.Request):
    """A request whose body is kept only up to ``MAX_BODY`` bytes; beyond
    that it is discarded and the handler answers 413."""

    max_body = MAX_BODY
    too_large = False
    _received = 0

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self.too_large = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            self.content = BytesIO()
            return
        super().handleContentChunk(data)


def refusal(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP answer for a request that never became a
    :class:`CappedRequest`: JSON error body, CORS headers, ``Connection:
    close``."""
    body = json_utf8({"error": message})
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason.encode("ascii")),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    lines += [b"%s: %s" % (name.title(), value) for name, value in CORS.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class MasterChannel(http.HTTPChannel):
    """An HTTP channel that answers requests it refuses to parse.

    ``HTTPChannel`` drops a connection whose request line or header line is
    longer than ``MAX_LENGTH`` without a word, and answers other unparsable
    heads with a bare ``400`` before closing at once, so a client still
    sending gets a connection reset (which can destroy the answer before it
    is read).  Here the head is measured as it arrives: a request line over
    ``MAX_LINE`` gets ``414``, header lines over ``MAX_LINE`` or a head
    over ``MAX_HEAD`` / ``MAX_HEADERS`` get ``431``, anything else
    unparsable ``400`` -- each as JSON with CORS headers.  After the answer
    the channel stops parsing, half-closes where the transport can, and
    discards input until the client closes (bounded by ``DRAIN_SECONDS``
    and ``DRAIN_BYTES``).
    """

    MAX_LENGTH = MAX_LINE
    # Twisted's own limits stay as a backstop, set above ours so that ours
    # (which answer properly) always trip first.
    totalHeadersSize = MAX_HEAD + MAX_LINE + 4
    maxHeaders = MAX_HEADERS * 2

    _head_lines = 0  # lines of the current request head so far
    _head_bytes = 0
    _refused = False
    _drained = 0
    _drain_timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            self._discard(data)
            return
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            self._discard(data)
            return
        super().rawDataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if not line:  # the end of this request's head (or a stray CRLF before one)
            self._head_lines = self._head_bytes = 0
            super().lineReceived(line)
            return
        self._head_lines += 1  # the request line, then header lines
        self._head_bytes += len(line)
        if self._head_bytes > MAX_HEAD or self._head_lines > MAX_HEADERS + 1:
            self.refuse(431, "Request Header Fields Too Large", "Request header fields too large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._refused:
            return
        if self._head_lines == 0:
            self.refuse(414, "URI Too Long", f"Request line too long (limit {MAX_LINE} bytes)")
        else:
            self.refuse(431, "Request Header Fields Too Large", f"Request header line too long (limit {MAX_LINE} bytes)")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Private hook, checked against Twisted 26.10.0: HTTPChannel calls it
        # for every request head it cannot parse (bad request line, header
        # without a colon, invalid header name or value, its own size
        # limits) and Request for a malformed multipart body.  Its contract
        # is "answer, then stop reading this connection"; we keep it, with a
        # JSON answer and the drain of ``refuse`` instead of a bare 400 and
        # an immediate close.  Should a later Twisted stop calling it, the
        # bare 400 comes back and tests.test_master_hostile notices.
        self.refuse(400, "Bad Request", "Bad request: malformed request line or header")

    def refuse(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` and stop parsing this connection."""
        if self._refused:
            return
        self._refused = True
        self.clearLineBuffer()
        self.setTimeout(None)
        transport = self.transport
        transport.write(refusal(status, reason, message))
        # Half-close: the answer and our FIN go out while the client may
        # still be sending.  Closing with unread input would send a reset.
        # Only a socket itself can do that: a TLS wrapper claims the
        # interfaces of the TCP transport beneath it and forwards
        # loseWriteConnection() to it, which would cut the TLS stream short;
        # over TLS we wait for the client to close instead.
        if isinstance(transport, FileDescriptor):
            transport.loseWriteConnection()
        self._drain_timer = self.callLater(DRAIN_SECONDS, self._abort)

    def _discard(self, data: bytes) -> None:
        self._drained += len(data)
        if self._drained > DRAIN_BYTES and self._drain_timer is not None:
            # Not from inside dataReceived: a TLS transport aborted while it
            # is still delivering data fails on its own cleared state.
            self._drain_timer.reset(0)

    def _abort(self) -> None:
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        super().connectionLost(reason)


class MasterSite(server.Site):
    """The Site of one master: capped requests, no access log, and a record
    of open connections so stopping the master closes keep-alive and SSE
    connections instead of leaving them to the peer."""

    requestFactory = CappedRequest
    noisy = False
    # Plain HTTP/1.1 channels (the master offers no HTTP/2 over ALPN), which
    # answer unparsable request heads.
    protocol = MasterChannel

    def __init__(self, resource, master):
        super().__init__(resource)
        self.master = master
        self.channels: dict[object, defer.Deferred] = {}

    def log(self, request) -> None:  # no per-request access log (Go prints none)
        pass

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        gone: defer.Deferred = defer.Deferred()
        self.channels[proto] = gone
        original = proto.connectionLost

        def connectionLost(reason, _orig=original, _proto=proto):
            self.channels.pop(_proto, None)
            try:
                return _orig(reason)
            finally:
                if not gone.called:
                    gone.callback(None)

        proto.connectionLost = connectionLost
        return proto

    async def close_connections(self, reactor, timeout: float = 2.0) -> None:
        """Close every connection: politely first (so a final SSE
        ``shutdown`` event still reaches its reader), then abort whatever is
        still open after ``timeout`` (a reader that stopped reading)."""
        transports = []
        waits = []
        for proto, gone in list(self.channels.items()):
            waits.append(gone)
            # Site builds _GenericHTTPChannelProtocol proxies, which do not
            # expose ``transport``; the real channel does.
            transport = getattr(proto, "transport", None) or getattr(getattr(proto, "_channel", None), "transport", None)
            if transport is not None:
                transports.append(transport)
                transport.loseConnection()
        if not waits:
            return
        d = defer.DeferredList(waits, consumeErrors=True)
        d.addTimeout(timeout, reactor)
        try:
            await d
            return
        except defer.TimeoutError:
            pass
        for transport in transports:
            abort = getattr(transport, "abortConnection", None)
            if abort is not None and getattr(transport, "connected", True):
                abort()


# ---------------------------------------------------------------- validation


def _text(name: str, value) -> str:
    """A text field: a string of valid UTF-8 text with no control
    characters (it is logged, saved and served), at most ``MAX_TEXT``."""
    if not isinstance(value, str):
        raise RequestError(400, f"Invalid {name}: must be a string")
    problem = text_problem(value)
    if problem:
        raise RequestError(400, f"Invalid {name}: {problem}")
    if len(value) > MAX_TEXT:
        raise RequestError(400, f"Invalid {name}: at most {MAX_TEXT} characters")
    return value


def _bool(name: str, value) -> bool:
    if type(value) is not bool:
        raise RequestError(400, f"Invalid {name}: must be true or false")
    return value


def _action(value) -> str:
    if isinstance(value, str) and value in ACTIONS:
        return value
    if isinstance(value, str):
        shown = value[:100]
    else:
        try:
            shown = json.dumps(value)[:100]
        except (RecursionError, ValueError):  # too deep to show
            shown = type(value).__name__
    raise RequestError(400, f"Invalid action: {shown}")


def _meta(value) -> Optional[dict]:
    """Validated ``meta``: ``{"peer": {...} | None, "tags": {...} | None}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(400, "Invalid meta: must be an object")
    for name in value:
        if name not in ("peer", "tags"):
            raise RequestError(400, f"Invalid meta: unknown field {name}")
    out: dict = {"peer": None, "tags": None}
    peer = value.get("peer")
    if peer is not None:
        if not isinstance(peer, dict):
            raise RequestError(400, "Invalid meta.peer: must be an object")
        for name in peer:
            if name not in PEER_FIELDS:
                raise RequestError(400, f"Invalid meta.peer: unknown field {name}")
        out["peer"] = {k: _text(f"meta.peer.{k}", v) for k, v in peer.items()}
    tags = value.get("tags")
    if tags is not None:
        if not isinstance(tags, dict):
            raise RequestError(400, "Invalid meta.tags: must be an object of strings")
        clean = {}
        for k, v in tags.items():
            problem = text_problem(k)
            if problem:
                raise RequestError(400, f"Invalid meta.tags: key {problem}")
            if len(k) > MAX_TEXT:
                raise RequestError(400, f"Invalid meta.tags: key longer than {MAX_TEXT} characters")
            clean[k] = _text(f"meta.tags.{k[:40]}", v)
        out["tags"] = clean
    return out


def _not_json(name: str):
    """``json.loads`` takes ``NaN`` and ``Infinity``; JSON has neither."""
    raise ValueError(f"{name} is not JSON")


def read_body(request, allowed: tuple[str, ...]) -> dict:
    """The JSON object body, refusing non-objects and unknown fields."""
    if request.too_large:
        raise RequestError(413, f"Request body too large (limit {MAX_BODY} bytes)")
    raw = request.content.read() if request.content is not None else b""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
    except UnicodeDecodeError:
        raise RequestError(400, "Invalid request body: not UTF-8") from None
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise RequestError(400, "Invalid request body") from None
    if not isinstance(body, dict):
        raise RequestError(400, "Invalid request body")
    for name in body:
        if name not in allowed:
            raise RequestError(400, f"Invalid request body: unknown field {name}")
    return body


# ---------------------------------------------------------------- responses


def _json(request, status: int, obj) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json_utf8(obj)


def _error(request, status: int, message: str) -> bytes:
    """``{"error": message}``; the message may quote what the client sent
    (an unknown field's name, an action), so it is escaped and cut short."""
    message = escape_controls(message)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "..."
    return _json(request, status, {"error": message})


def _allow(handlers: dict) -> bytes:
    """The ``Allow`` header of a route: its methods, HEAD with GET, OPTIONS."""
    methods = set(handlers) | {"OPTIONS"}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods)).encode("ascii")


Handler = Callable[..., Awaitable[object]]


class _PathGuard(Resource):
    """Answers a request whose path or Host is not UTF-8 (once
    percent-decoded) with a JSON 400 and CORS headers.  Klein would log a
    traceback for it and answer a bare text page."""

    isLeaf = True

    def __init__(self, inner: IResource):
        super().__init__()
        self.inner = inner

    def render(self, request):
        try:
            b"/".join(request.prepath + request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            for name, value in CORS.items():
                request.setHeader(name, value)
            return _error(request, 400, "Invalid request path: not UTF-8")
        return self.inner.render(request)


def make_resource(master) -> IResource:
    """The Klein resource of ``master`` (a MasterService)."""
    app = Klein()
    # No 308 redirect (HTML, without CORS) for "//" in a path: such a path
    # simply matches nothing and gets the JSON 404.
    app.url_map.merge_slashes = False
    base = master.config.prefix.rstrip("/") + "/v1"

    def route(
        path: str,
        handlers: dict[str, Handler],
        public: bool = False,
        branch: bool = False,
        fallback: Optional[Handler] = None,
    ):
        """Serve ``path``: ``handlers`` by method, ``fallback`` for any other
        method (405 when there is none)."""
        allow = _allow(handlers)

        async def endpoint(request, **kwargs):
            for name, value in CORS.items():
                request.setHeader(name, value)
            # Case-sensitive (RFC 9110 §9.1): "get" is an unknown method.
            method = request.method.decode("ascii", "replace")
            if method == "OPTIONS":
                request.setResponseCode(200)
                return b""
            try:
                if not public:
                    master.check_key(request.getHeader(b"x-api-key"))
                handler = handlers.get("GET" if method == "HEAD" else method, fallback)
                if handler is None:
                    request.setHeader(b"allow", allow)
                    raise RequestError(405, "Method not allowed")
                return await handler(request, **kwargs)
            except RequestError as e:
                return _error(request, e.status, e.message)
            except defer.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - never a traceback page
                _log.failure("Master API request failed: {method} {path}", method=method, path=request.path)
                master.log.error("API request failed: %s %s", method, request.path.decode("utf-8", "replace"))
                return _error(request, 500, "Internal server error")

        endpoint.__name__ = "ep_" + path.replace("/", "_").replace("<", "").replace(">", "").replace(":", "_")
        app.route(path, branch=branch, strict_slashes=False)(endpoint)

    # -- instances ---------------------------------------------------------

    async def list_instances(request):
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        return master.list_json_bytes()

    async def create_instance(request):
        body = read_body(request, ("url", "alias", "restart", "meta"))
        url = body.get("url")
        if not isinstance(url, str) or not url.strip():
            raise RequestError(400, "Invalid request body")
        alias = _text("alias", body["alias"]) if body.get("alias") is not None else None
        restart = _bool("restart", body["restart"]) if body.get("restart") is not None else None
        meta = _meta(body.get("meta"))
        rec = await master.create(url, alias, restart, meta)
        return _json(request, 201, rec.to_json())

    async def get_instance(request, rid):
        return _json(request, 200, master.get(rid).to_json())

    def _patch_fields(body):
        alias = _text("alias", body["alias"]) if body.get("alias") is not None else None
        action = _action(body["action"]) if "action" in body else None
        restart = _bool("restart", body["restart"]) if body.get("restart") is not None else None
        meta = _meta(body.get("meta"))
        return alias, action, restart, meta

    async def patch_instance(request, rid):
        master.get(rid)
        body = read_body(request, ("alias", "action", "restart", "meta"))
        alias, action, restart, meta = _patch_fields(body)
        rec = await master.patch(rid, alias, action, restart, meta)
        return _json(request, 200, rec.to_json())

    async def put_instance(request, rid):
        rec = master.get(rid)
        if rec.is_key:
            raise RequestError(403, "Forbidden: API Key")
        body = read_body(request, ("url", "action"))
        if ("url" in body) == ("action" in body):
            raise RequestError(400, "Invalid request body")
        if "url" in body:
            if not isinstance(body["url"], str) or not body["url"].strip():
                raise RequestError(400, "Invalid request body")
            rec = await master.put(rid, body["url"], None)
        else:
            rec = await master.put(rid, None, _action(body["action"]))
        return _json(request, 200, rec.to_json())

    async def delete_instance(request, rid):
        await master.delete(rid)
        request.setResponseCode(204)
        return b""

    route(base + "/instances", {"GET": list_instances, "POST": create_instance})
    route(
        base + "/instances/<rid>",
        {"GET": get_instance, "PATCH": patch_instance, "PUT": put_instance, "DELETE": delete_instance},
    )

    # -- events, info, tcping ---------------------------------------------

    async def events(request):
        await master.hub.subscribe(request, master.list_json())
        return None

    async def get_info(request):
        return _json(request, 200, master.info())

    async def post_info(request):
        body = read_body(request, ("alias",))
        if "alias" not in body:
            raise RequestError(400, "Invalid request body")
        master.set_alias(_text("alias", body["alias"]))
        return _json(request, 200, master.info())

    async def tcping(request):
        raw = request.args.get(b"target", [b""])[0].decode("utf-8", "replace")
        problem = text_problem(raw)  # before strip(), which would hide a newline
        if problem:
            raise RequestError(400, f"Invalid target address: {problem}")
        raw = raw.strip()
        if not raw:
            raise RequestError(400, "Target address required")
        try:
            result = await master.tcping(raw)
        except URLError as e:
            raise RequestError(400, f"Invalid target address: {e}") from None
        return _json(request, 200, result)

    route(base + "/events", {"GET": events})
    route(base + "/info", {"GET": get_info, "POST": post_info})
    route(base + "/tcping", {"GET": tcping})

    # -- documentation (public) -------------------------------------------

    async def openapi(request):
        from nodepass.master.openapi import openapi_document

        return _json(request, 200, openapi_document(master.config.prefix))

    async def docs(request):
        from nodepass.master.swagger import docs_page

        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return docs_page(master.config.prefix)

    async def docs_static(request):
        from nodepass.master.swagger import static_resource

        return static_resource()

    route(base + "/openapi.json", {"GET": openapi}, public=True)
    route(base + "/docs", {"GET": docs}, public=True)
    route(base + "/docs/static/", {"GET": docs_static}, public=True, branch=True)

    # -- everything else: JSON 404 ------------------------------------------

    async def not_found(request, rest=""):
        raise RequestError(404, "Not found")

    # A path that does not exist is a 404 whatever the method, known or not.
    route("/", {}, public=True, fallback=not_found)
    route("/<path:rest>", {}, public=True, fallback=not_found)

    @app.handle_errors(NotFound)
    def unmatched(request, failure):
        # Paths no rule can match at all (a decoded newline defeats even
        # the catch-all): the same JSON 404, not werkzeug's HTML page.
        for name, value in CORS.items():
            request.setHeader(name, value)
        return _error(request, 404, "Not found")

    return _PathGuard(app.resource())
