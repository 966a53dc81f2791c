"""The master's REST API (SPEC §8): a Klein app in front of a
:class:`~nodepass.master.domain.Master`.

This module is the only one that knows HTTP statuses.  Handlers decode and
validate a request, call the domain, and encode the answer; every
:class:`~nodepass.master.errors.MasterError` the domain raises becomes a
status through :data:`STATUS` and a ``{"error": message}`` body.  A request
body is validated *completely* before anything is applied, so a 400 never
leaves a change half made.

Routes accept every method and dispatch themselves, so a wrong method gets
NodePass's JSON ``405 Method not allowed`` (with CORS headers) rather than
werkzeug's HTML page, and the API key is checked before the method (a
request without the key is a 401 whatever its method).  Methods are
case-sensitive (RFC 9110 §9.1): ``get`` is an unknown method, not ``GET``.

The API key shows on the wire as the pseudo-instance ``********``; the
domain has no such instance, so the routes of ``/instances/{id}`` map that
ID to the master's identity here.

The app's routes are relative to ``{prefix}/v1``, which differs between
masters; :class:`MasterRoot` mounts the app there.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Mapping, Optional

from klein import Klein
from klein.resource import KleinResource
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import NotFound

from nodepass.base.logs import escape_controls
from nodepass.config.urls import text_problem
from nodepass.master.console import Console, where_things_are
from nodepass.master.domain import ACTIONS, Master
from nodepass.master.errors import (
    InstanceNotFound,
    InvalidRequest,
    InvalidTarget,
    KeyNotAnInstance,
    MasterError,
    StateNotSaved,
    Unauthorized,
    URLConflict,
)
from nodepass.master.identity import API_KEY_ID
from nodepass.master.metrics import CONTENT_TYPE, MasterMetrics
from nodepass.master.records import MAX_TEXT, PEER_FIELDS, json_utf8
from nodepass.master.site import CORS, MAX_BODY

MAX_MESSAGE = 300  # characters of an error message

#: The HTTP status of each kind of domain error (the nearest listed base
#: class decides; anything else is a 500).
STATUS: dict[type[MasterError], int] = {
    InvalidRequest: 400,
    Unauthorized: 401,
    KeyNotAnInstance: 403,
    InstanceNotFound: 404,
    URLConflict: 409,
    StateNotSaved: 500,
}

_log = Logger(namespace="nodepass.master.http")

Handler = Callable[..., Awaitable[Any]]


def status_of(error: MasterError) -> int:
    """The status answering ``error``."""
    for kind in type(error).__mro__:
        status = STATUS.get(kind)
        if status is not None:
            return status
    return 500


class HTTPRefusal(Exception):
    """A refusal only HTTP has words for: a method the route lacks (405), a
    path nothing serves (404), a body over the limit (413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------- request bodies


def _text(name: str, value: object) -> str:
    """A text field: a string of valid UTF-8 text with no control
    characters (it is logged, saved and served), at most ``MAX_TEXT``."""
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid {name}: must be a string")
    problem = text_problem(value)
    if problem:
        raise InvalidRequest(f"Invalid {name}: {problem}")
    if len(value) > MAX_TEXT:
        raise InvalidRequest(f"Invalid {name}: at most {MAX_TEXT} characters")
    return value


def _bool(name: str, value: object) -> bool:
    if type(value) is not bool:
        raise InvalidRequest(f"Invalid {name}: must be true or false")
    return value


def _action(value: object) -> str:
    if isinstance(value, str) and value in ACTIONS:
        return value
    if isinstance(value, str):
        shown = value[:100]
    else:
        try:
            shown = json.dumps(value)[:100]
        except (RecursionError, ValueError):  # too deep to show
            shown = type(value).__name__
    raise InvalidRequest(f"Invalid action: {shown}")


def _meta(value: object) -> Optional[dict]:
    """Validated ``meta``: ``{"peer": {...} | None, "tags": {...} | None}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("Invalid meta: must be an object")
    for name in value:
        if name not in ("peer", "tags"):
            raise InvalidRequest(f"Invalid meta: unknown field {name}")
    out: dict = {"peer": None, "tags": None}
    if "tags" in value and value["tags"] is None:
        # An explicit null empties the tag map; ``{}`` keeps it, as Go's
        # master does, so there would be no way to remove the last tag.
        out["clear_tags"] = True
    peer = value.get("peer")
    if peer is not None:
        if not isinstance(peer, dict):
            raise InvalidRequest("Invalid meta.peer: must be an object")
        for name in peer:
            if name not in PEER_FIELDS:
                raise InvalidRequest(f"Invalid meta.peer: unknown field {name}")
        out["peer"] = {k: _text(f"meta.peer.{k}", v) for k, v in peer.items()}
    tags = value.get("tags")
    if tags is not None:
        if not isinstance(tags, dict):
            raise InvalidRequest("Invalid meta.tags: must be an object of strings")
        clean = {}
        for k, v in tags.items():
            problem = text_problem(k)
            if problem:
                raise InvalidRequest(f"Invalid meta.tags: key {problem}")
            if len(k) > MAX_TEXT:
                raise InvalidRequest(f"Invalid meta.tags: key longer than {MAX_TEXT} characters")
            clean[k] = _text(f"meta.tags.{k[:40]}", v)
        out["tags"] = clean
    return out


def _not_json(name: str) -> None:
    """``json.loads`` takes ``NaN`` and ``Infinity``; JSON has neither."""
    raise ValueError(f"{name} is not JSON")


def read_body(request: Any, allowed: tuple[str, ...]) -> dict:
    """The JSON object body, refusing non-objects and unknown fields."""
    if request.too_large:
        raise HTTPRefusal(413, f"Request body too large (limit {MAX_BODY} bytes)")
    raw = request.content.read() if request.content is not None else b""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
    except UnicodeDecodeError:
        raise InvalidRequest("Invalid request body: not UTF-8") from None
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise InvalidRequest("Invalid request body") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Invalid request body")
    for name in body:
        if name not in allowed:
            raise InvalidRequest(f"Invalid request body: unknown field {name}")
    return body


def _url(body: dict) -> str:
    url = body.get("url")
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequest("Invalid request body")
    return url


def _patch_fields(body: dict) -> tuple[Optional[str], Optional[str], Optional[bool], Optional[dict]]:
    """``alias``, ``action``, ``restart`` and ``meta`` of a PATCH body, each
    None when absent."""
    alias = _text("alias", body["alias"]) if body.get("alias") is not None else None
    action = _action(body["action"]) if "action" in body else None
    restart = _bool("restart", body["restart"]) if body.get("restart") is not None else None
    return alias, action, restart, _meta(body.get("meta"))


# ---------------------------------------------------------------- answers


def _json(request: Request, status: int, obj: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json_utf8(obj)


def _error(request: Request, status: int, message: str) -> bytes:
    """``{"error": message}``; the message may quote what the client sent
    (an unknown field's name, an action), so it is escaped and cut short."""
    message = escape_controls(message)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "..."
    return _json(request, status, {"error": message})


def _cors(request: Request) -> None:
    for name, value in CORS.items():
        request.setHeader(name, value)


def _credential(request: Request, bearer: bool) -> Optional[bytes]:
    """The key a request presents: its ``X-API-Key``, or, where ``bearer``
    allows it and there is no ``X-API-Key``, the token of ``Authorization:
    Bearer <key>`` (what Prometheus's ``authorization`` block sends; it
    cannot send custom headers from a secret file).  Any other
    ``Authorization`` scheme presents nothing."""
    key = request.getHeader(b"x-api-key")
    if key or not bearer:
        return key
    scheme, _, token = (request.getHeader(b"authorization") or b"").strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


def _allow(handlers: Mapping[str, Handler]) -> bytes:
    """The ``Allow`` header of a route: its methods, HEAD with GET, OPTIONS."""
    methods = set(handlers) | {"OPTIONS"}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods)).encode("ascii")


def _nothing_here(request: Request) -> bytes:
    """The answer to a path no route serves, whatever the method (OPTIONS
    included: browsers preflight anything)."""
    _cors(request)
    if request.method == b"OPTIONS":
        request.setResponseCode(200)
        return b""
    return _error(request, 404, "Not found")


def _unmatched(request: Request) -> bytes:
    """Paths no rule can match at all (a decoded newline defeats even the
    catch-all): the same JSON 404, not werkzeug's HTML page."""
    _cors(request)
    return _error(request, 404, "Not found")


# ---------------------------------------------------------------- the app


class MasterAPI:
    """The routes of ``{prefix}/v1`` for one master."""

    app = Klein()
    # No 308 redirect (HTML, without CORS) for "//" in a path: such a path
    # simply matches nothing and gets the JSON 404.
    app.url_map.merge_slashes = False

    def __init__(self, master: Master) -> None:
        self.master = master
        self.metrics = MasterMetrics(master, self.app.url_map)

    def resource(self) -> IResource:
        """The resource to serve at the root of the master's Site."""
        base = self.master.config.prefix.rstrip("/") + "/v1"
        console = Console(self.master.config.prefix)
        return IResource(MasterRoot(self.app.resource(), _Elsewhere().app.resource(), base, self.metrics, console))

    async def _serve(
        self,
        request: Request,
        handlers: Mapping[str, Handler],
        public: bool = False,
        bearer: bool = False,
        fallback: Optional[Handler] = None,
        **kwargs: str,
    ) -> Any:
        """Answer with ``handlers`` by method (``fallback`` for any other,
        405 when there is none): CORS headers on everything, OPTIONS
        without a key, the key before anything else unless ``public``
        (also as a Bearer token if ``bearer``)."""
        _cors(request)
        method = request.method.decode("ascii", "replace")
        if method == "OPTIONS":
            request.setResponseCode(200)
            return b""
        try:
            if not public:
                self.master.authenticate(_credential(request, bearer))
            handler = handlers.get("GET" if method == "HEAD" else method, fallback)
            if handler is None:
                request.setHeader(b"allow", _allow(handlers))
                raise HTTPRefusal(405, "Method not allowed")
            return await handler(request, **kwargs)
        except MasterError as e:
            return _error(request, status_of(e), e.message)
        except HTTPRefusal as e:
            return _error(request, e.status, e.message)
        except defer.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - never a traceback page
            _log.failure("Master API request failed: {method} {path}", method=method, path=request.path)
            self.master.log.error("API request failed: %s %s", method, request.path.decode("utf-8", "replace"))
            return _error(request, 500, "Internal server error")

    # -- instances ---------------------------------------------------------

    @app.route("/instances", strict_slashes=False)
    async def instances(self, request: Request) -> Any:
        return await self._serve(request, {"GET": self.list_instances, "POST": self.create_instance})

    @app.route("/instances/<rid>", strict_slashes=False)
    async def instance(self, request: Request, rid: str) -> Any:
        handlers = {"GET": self.get_instance, "PATCH": self.patch_instance, "PUT": self.put_instance, "DELETE": self.delete_instance}
        return await self._serve(request, handlers, rid=rid)

    async def list_instances(self, request: Request) -> bytes:
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        return self.master.listing_bytes()

    async def create_instance(self, request: Request) -> bytes:
        body = read_body(request, ("url", "alias", "restart", "meta"))
        url = _url(body)
        alias = _text("alias", body["alias"]) if body.get("alias") is not None else None
        restart = _bool("restart", body["restart"]) if body.get("restart") is not None else None
        meta = _meta(body.get("meta"))
        rec = await self.master.create(url, alias, restart, meta)
        return _json(request, 201, rec.to_json())

    async def get_instance(self, request: Request, rid: str) -> bytes:
        if rid == API_KEY_ID:
            return _json(request, 200, self.master.identity.to_json())
        return _json(request, 200, self.master.get(rid).to_json())

    async def patch_instance(self, request: Request, rid: str) -> bytes:
        if rid != API_KEY_ID:
            self.master.get(rid)  # an unknown ID is a 404 whatever the body
        alias, action, restart, meta = _patch_fields(read_body(request, ("alias", "action", "restart", "meta")))
        if rid == API_KEY_ID:
            # Validated like any PATCH, but only {"action": "restart"} does
            # anything to the key's record: it rotates the key.
            if action == "restart":
                self.master.rotate_key()
            return _json(request, 200, self.master.identity.to_json())
        rec = await self.master.update(rid, alias=alias, restart=restart, meta=meta, action=action)
        return _json(request, 200, rec.to_json())

    async def put_instance(self, request: Request, rid: str) -> bytes:
        if rid == API_KEY_ID:
            raise KeyNotAnInstance()
        self.master.get(rid)
        body = read_body(request, ("url", "action"))
        if ("url" in body) == ("action" in body):
            raise InvalidRequest("Invalid request body")
        if "url" in body:
            rec = await self.master.replace_url(rid, _url(body))
        else:  # the older API generation's way of controlling an instance
            rec = await self.master.update(rid, action=_action(body["action"]))
        return _json(request, 200, rec.to_json())

    async def delete_instance(self, request: Request, rid: str) -> bytes:
        if rid == API_KEY_ID:
            raise KeyNotAnInstance()
        await self.master.delete(rid)
        request.setResponseCode(204)
        return b""

    # -- events, info, tcping ---------------------------------------------

    @app.route("/events", strict_slashes=False)
    async def events(self, request: Request) -> Any:
        return await self._serve(request, {"GET": self.subscribe})

    async def subscribe(self, request: Request) -> None:
        await self.master.hub.subscribe(request, self.master.listing())

    @app.route("/info", strict_slashes=False)
    async def info(self, request: Request) -> Any:
        return await self._serve(request, {"GET": self.get_info, "POST": self.post_info})

    async def get_info(self, request: Request) -> bytes:
        return _json(request, 200, self.master.info())

    async def post_info(self, request: Request) -> bytes:
        body = read_body(request, ("alias",))
        if "alias" not in body:
            raise InvalidRequest("Invalid request body")
        self.master.set_alias(_text("alias", body["alias"]))
        return _json(request, 200, self.master.info())

    @app.route("/tcping", strict_slashes=False)
    async def tcping(self, request: Request) -> Any:
        return await self._serve(request, {"GET": self.probe})

    async def probe(self, request: Request) -> bytes:
        args: dict[bytes, list[bytes]] = request.args or {}  # Twisted declares it None until parsed
        raw = args.get(b"target", [b""])[0].decode("utf-8", "replace")
        problem = text_problem(raw)  # before strip(), which would hide a newline
        if problem:
            raise InvalidTarget(f"Invalid target address: {problem}")
        raw = raw.strip()
        if not raw:
            raise InvalidTarget("Target address required")
        return _json(request, 200, await self.master.tcping(raw))

    # -- metrics -------------------------------------------------------------

    @app.route("/metrics", strict_slashes=False)
    async def metrics_route(self, request: Request) -> Any:
        return await self._serve(request, {"GET": self.scrape}, bearer=True)

    async def scrape(self, request: Request) -> bytes:
        request.setResponseCode(200)
        request.setHeader(b"content-type", CONTENT_TYPE)
        return self.metrics.exposition()

    # -- documentation (public) -------------------------------------------

    @app.route("/openapi.json", strict_slashes=False)
    async def openapi(self, request: Request) -> Any:
        return await self._serve(request, {"GET": self.openapi_document}, public=True)

    async def openapi_document(self, request: Request) -> bytes:
        from nodepass.master.openapi import openapi_document

        return _json(request, 200, openapi_document(self.master.config.prefix))

    @app.route("/docs", strict_slashes=False)
    async def docs(self, request: Request) -> Any:
        return await self._serve(request, {"GET": self.docs_page}, public=True)

    async def docs_page(self, request: Request) -> bytes:
        from nodepass.master.swagger import docs_page

        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return docs_page(self.master.config.prefix)

    @app.route("/docs/static/", branch=True, strict_slashes=False)
    async def docs_static(self, request: Request) -> Any:
        return await self._serve(request, {"GET": self.asset}, public=True)

    async def asset(self, request: Request) -> Resource:
        from nodepass.master.swagger import static_resource

        MasterRoot.unmount(request)
        return static_resource()

    # -- everything else: JSON 404 ------------------------------------------

    @app.route("/", branch=True, strict_slashes=False)
    def anything_else(self, request: Request) -> bytes:
        if request.postpath == [b""] and request.method != b"OPTIONS":
            # {prefix}/v1 itself: still no route, but say where things are.
            _cors(request)
            return _error(request, 404, where_things_are(self.master.config.prefix))
        return _nothing_here(request)

    @app.handle_errors(NotFound)
    def unmatched(self, request: Request, failure: Failure) -> bytes:
        return _unmatched(request)


class _Elsewhere:
    """Paths outside ``{prefix}/v1``: the JSON 404 (OPTIONS 200) for any
    method, no key needed -- matched as Klein matches the catch-all inside
    it, so a path that no rule can match gets its 404 the same way."""

    app = Klein()
    app.url_map.merge_slashes = False

    @app.route("/", branch=True, strict_slashes=False)
    def anything(self, request: Request) -> bytes:
        return _nothing_here(request)

    @app.handle_errors(NotFound)
    def unmatched(self, request: Request, failure: Failure) -> bytes:
        return _unmatched(request)


class MasterRoot(Resource):
    """The root of a master's Site: refuses paths that are not UTF-8, then
    hands paths under ``base`` (``{prefix}/v1``) to the API app, as if it
    were mounted there, the web console's paths to ``console``, and any
    other path to the catch-all.

    "Under ``base``" is decided on the path exactly as Klein and werkzeug
    match it from Twisted's decoded segments (``%2F`` is a slash there and
    leading slashes do not count, as it always was for the master's
    routes).  The app matches what follows ``base``; the
    static assets are looked up from the segments that follow
    ``{prefix}/v1/docs/static/`` in Twisted's own split (:meth:`unmount`),
    as when the routes were written out in full.
    """

    isLeaf = True

    def __init__(
        self,
        api: KleinResource,
        elsewhere: KleinResource,
        base: str,
        metrics: Optional[MasterMetrics] = None,
        console: Optional[Console] = None,
    ) -> None:
        super().__init__()
        self.api = api
        self.elsewhere = elsewhere
        self.base = base.encode("utf-8")
        self.metrics = metrics
        self.console = console

    def render(self, request: Any) -> Any:
        rest = self._under_base(request.postpath)
        if self.metrics is not None:  # every request, refused ones too
            self.metrics.track(request, rest)
        try:
            b"/".join(request.prepath + request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            _cors(request)
            return _error(request, 400, "Invalid request path: not UTF-8")
        if rest is None:
            page = self.console.render(request) if self.console is not None else None
            return page if page is not None else self.elsewhere.render(request)
        request.mount_origin = (list(request.prepath), list(request.postpath))
        request.prepath = request.prepath + self.base.split(b"/")[1:]
        request.postpath = rest[1:].split(b"/")
        return self.api.render(request)

    def _under_base(self, postpath: list[bytes]) -> Optional[bytes]:
        """The path after ``base`` (``b""`` or starting with one ``/``), or
        None when the path is elsewhere.  The path is the one werkzeug
        matches: Klein joins the segments, werkzeug drops leading slashes.
        A path continuing with ``//`` is elsewhere too: inside the app it
        would match as if the empty segment were not there."""
        path = b"/" + b"/".join(postpath).lstrip(b"/")
        if path == self.base:
            return b""
        if path.startswith(self.base + b"/") and not path.startswith(self.base + b"//"):
            return path[len(self.base) :]
        return None

    @staticmethod
    def unmount(request: Any) -> None:
        """Give ``request`` the segments a route written in full
        (``{prefix}/v1/...``) would have left for the resource it returns:
        as many as the route consumed (``base`` and its own), counted in
        the request's own split."""
        origin = getattr(request, "mount_origin", None)
        if origin is None:
            return
        prepath, postpath = origin
        consumed = len(request.prepath) - len(prepath)
        request.prepath = prepath + postpath[:consumed]
        request.postpath = postpath[consumed:]
