"""An async client for the NodePass master API (SPEC §8), built on treq.

Every route has a method; every method is ``async`` and returns the decoded
JSON the master answered (``None`` for 204).  A non-2xx answer raises
:class:`MasterAPIError` carrying the status and the master's ``error``
message; an unreachable master raises it too, with status 0, so scripts need
one ``except``.

Errors are diagnosed where a bare status or socket error would mislead: a
404 from a route every master has means the URL's prefix is wrong (or it is
no master), and a connection that fails the way a wrong scheme makes it fail
(a TLS handshake a plain-HTTP master never answers, a TLS master closing on
plain HTTP) is checked with one key-less request in the other scheme, so the
message can say "use http://..." (``MasterAPIError.kind`` names these).

``events()`` returns an :class:`EventStream`: an async iterator over the
Server-Sent Events of ``/events``, decoded to dicts ``{"type", "time",
"instance", "logs"}`` (``instance`` is ``None`` in the final ``shutdown``
event, as the Go master sends it).  It applies back-pressure: when the script stops
consuming, the socket is paused instead of queueing without bound.

Usage::

    async with MasterClient("http://127.0.0.1:9090/api", key) as master:
        inst = await master.create_instance("server://:10101/127.0.0.1:8080")
        async with master.events() as stream:
            async for event in stream:
                if event["type"] != "shutdown":  # shutdown: instance is None
                    print(event["type"], event["instance"]["id"])
"""

from __future__ import annotations

import collections
import json
from typing import Any, Optional, cast
from urllib.parse import quote

import treq
from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
)
from twisted.web.iweb import IAgent, IPolicyForHTTPS
from zope.interface import implementer

from nodepass.base.errors import error_text

KEY_INSTANCE = "********"

__all__ = ["MasterClient", "MasterAPIError", "EventStream", "KEY_INSTANCE"]


class MasterAPIError(Exception):
    """The master answered with an error status (or could not be reached:
    ``status`` 0).

    ``kind`` names the diagnoses a program may want to act on without
    parsing ``message``: ``"no_api"`` (a 404 where a route must exist: the
    URL's prefix is wrong, or it is not a master at all), ``"tls_mismatch"``
    (``https://`` to a plain-HTTP master or the reverse), ``"timeout"``;
    ``""`` otherwise.
    """

    def __init__(self, status: int, message: str, kind: str = ""):
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.kind = kind

    def __str__(self) -> str:
        if self.status:
            return f"HTTP {self.status}: {self.message}"
        return self.message


@implementer(IPolicyForHTTPS)
class _NoVerifyPolicy:
    """TLS without certificate checks, for a master running ``tls=1`` (an
    in-memory self-signed certificate nobody can verify)."""

    def creatorForNetloc(self, hostname: bytes, port: int):
        return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


@implementer(IPolicyForHTTPS)
class _CAFilePolicy:
    """Verify the master against one PEM CA (or self-signed) certificate."""

    def __init__(self, pem: bytes):
        self._root = ssl.Certificate.loadPEM(pem)

    def creatorForNetloc(self, hostname: bytes, port: int):
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


@implementer(IPolicyForHTTPS)
class _HandshakeDeadline:
    """Wraps a TLS policy so a handshake that has not finished after
    ``seconds`` is given up: an ``https://`` URL aimed at a plain-HTTP
    master otherwise waits for the whole request timeout, because the
    master's HTTP parser keeps reading the ClientHello as the start of a
    request line and never answers.  ``client`` is told (``_tls_stalled``)
    so the error can say what happened, and keeps the timers so ``close()``
    can cancel those still pending."""

    def __init__(self, policy: Any, client: "MasterClient", seconds: float):
        self._policy = policy
        self._client = client
        self._seconds = seconds

    def creatorForNetloc(self, hostname: bytes, port: int) -> "_DeadlineCreator":
        return _DeadlineCreator(self._policy.creatorForNetloc(hostname, port), self._client, self._seconds)


@implementer(IOpenSSLClientConnectionCreator)
class _DeadlineCreator:
    """The connection creator of :class:`_HandshakeDeadline`."""

    def __init__(self, creator: Any, client: "MasterClient", seconds: float):
        self._creator = creator
        self._client = client
        self._seconds = seconds

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        client = self._client
        calls = client._deadlines

        def check() -> None:
            calls.discard(call)
            # ``get_peer_finished`` is None until the server's Finished
            # message arrived: the handshake is not done.
            if tlsProtocol.connected and connection.get_peer_finished() is None:
                client._tls_stalled = True
                transport = tlsProtocol.transport
                if transport is not None:
                    transport.abortConnection()

        call = client._reactor.callLater(self._seconds, check)
        calls.add(call)
        return connection


def _api_root(base_url: str) -> str:
    """``http://h:p/api`` and ``http://h:p/api/v1`` both mean the same
    master; callers may pass either."""
    base = base_url.strip().rstrip("/")
    if "://" not in base:
        raise ValueError(f"master URL {base_url!r} must start with http:// or https://")
    scheme = base.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"master URL {base_url!r} must start with http:// or https://")
    if not base.endswith("/v1"):
        base += "/v1"
    return base


#: The master's 404 for an ID it does not know; any other 404 means no route.
INSTANCE_NOT_FOUND = "Instance not found"

#: Longest handshake wait before a TLS connection is given up as stalled.
HANDSHAKE_DEADLINE = 10.0
#: Longest wait of the one request that diagnoses a failed connection.
PROBE_TIMEOUT = 5.0


def _split_root(root: str) -> tuple[str, str, str]:
    """``(scheme, netloc, path)`` of an API root made by :func:`_api_root`."""
    scheme, rest = root.split("://", 1)
    netloc, slash, path = rest.partition("/")
    return scheme.lower(), netloc, slash + path


def _no_api(root: str) -> MasterAPIError:
    """The 404 of a route every master has: nothing NodePass-like answers at
    this prefix.  The usual cause is a URL without the master's prefix
    (``http://h:9090`` for ``http://h:9090/api``), so the message says where
    the API normally lives."""
    scheme, netloc, _ = _split_root(root)
    return MasterAPIError(
        404,
        f"no NodePass API at {root}: is the prefix right? The API lives under PREFIX/v1 "
        f"(/api/v1 by default: {scheme}://{netloc}/api)",
        kind="no_api",
    )


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and everything it wraps (``reasons`` of Twisted's
    ``ResponseNeverReceived``/``ResponseFailed``, a failure's ``value``),
    so a cause can be recognised however deep treq buried it."""
    found: list[BaseException] = []
    stack: list[Any] = [error]
    while stack:
        item = stack.pop()
        if isinstance(item, Failure):
            item = item.value
        if not isinstance(item, BaseException) or any(item is seen for seen in found):
            continue
        found.append(item)
        stack.extend(getattr(item, "reasons", None) or [])
        value = getattr(item, "value", None)
        if isinstance(value, BaseException):
            stack.append(value)
    return found


def _error_message(body: bytes) -> str:
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        return decoded["error"]
    text = body.decode("utf-8", "replace").strip()
    return text[:200] or "(empty answer)"


def _instance_path(instance_id: str) -> str:
    if not isinstance(instance_id, str) or not instance_id:
        raise ValueError("instance ID must be a non-empty string")
    return "/instances/" + quote(instance_id, safe="*")


class MasterClient:
    """A connection (pool) to one master.

    ``base_url`` is the API root, e.g. ``http://127.0.0.1:9090/api`` (the
    ``/v1`` may be included or not).  ``verify=False`` accepts any server
    certificate (a ``tls=1`` master); ``ca_file`` verifies against a given
    PEM certificate instead of the system roots.  ``timeout`` bounds each
    request until its answer's headers arrive (not the event stream).
    ``pool`` shares a Twisted ``HTTPConnectionPool`` between clients (the
    caller then closes it); by default each client has its own.
    Call :meth:`close` (or use ``async with``) when done.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        verify: bool = True,
        ca_file: Optional[str] = None,
        timeout: Optional[float] = 30.0,
        persistent: bool = True,
        pool: Optional[HTTPConnectionPool] = None,
        reactor: Any = None,
    ):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.root = _api_root(base_url)
        self.api_key = api_key
        self.timeout = timeout
        self._reactor = reactor
        if not verify:
            policy: Any = _NoVerifyPolicy()
        elif ca_file:
            with open(ca_file, "rb") as f:
                policy = _CAFilePolicy(f.read())
        else:
            policy = BrowserLikePolicyForHTTPS()
        self._deadlines: set[Any] = set()  # IDelayedCall of _HandshakeDeadline
        self._tls_stalled = False
        # Half the request timeout at most, so that a stalled handshake is
        # recognised as such before the request itself times out.
        self._handshake_deadline = min(HANDSHAKE_DEADLINE, timeout / 2) if timeout else HANDSHAKE_DEADLINE
        policy = _HandshakeDeadline(policy, self, self._handshake_deadline)
        self._own_pool = pool is None
        if pool is None:
            pool = HTTPConnectionPool(reactor, persistent=persistent)
            pool.retryAutomatically = False  # a PATCH/POST must not be replayed
        self._pool = pool
        # (``Agent`` provides ``IAgent``; mypy cannot see zope's declarations.)
        self._http = HTTPClient(cast(IAgent, Agent(reactor, contextFactory=policy, pool=self._pool)))
        self._streams: set[EventStream] = set()

    async def __aenter__(self) -> "MasterClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close event streams and idle keep-alive connections."""
        for stream in list(self._streams):
            await stream.close()
        if self._own_pool:
            await self._pool.closeCachedConnections()
        for call in list(self._deadlines):
            if call.active():
                call.cancel()
        self._deadlines.clear()

    # -- plumbing ---------------------------------------------------------

    def _headers(self, accept: str = "application/json") -> dict:
        return {"X-API-Key": [self.api_key], "Accept": [accept]}

    async def raw_request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        headers: Optional[dict] = None,
        params: Optional[dict] = None,
    ) -> tuple[int, Any, bytes]:
        """Send any request under the API root; answer ``(status, headers,
        body)`` without interpreting them (for tests and odd scripts)."""
        all_headers = self._headers()
        if body is not None:
            all_headers["Content-Type"] = ["application/json"]
        all_headers.update(headers or {})
        try:
            response = await self._http.request(
                method,
                self.root + path,
                data=body,
                params=params,
                headers=all_headers,
                allow_redirects=False,
                timeout=self.timeout,
                reactor=self._reactor,
            )
            content = await treq.content(response)
        except Exception as e:
            raise await self._unreachable(e) from None
        return response.code, response.headers, content

    async def _unreachable(self, error: BaseException) -> MasterAPIError:
        """The status-0 error for a request that got no answer, diagnosed.

        A wrong scheme is the usual mistake and fails in ways that say
        nothing by themselves (a stalled or failed TLS handshake, a
        connection closed without a word), so in those cases one request
        without the API key goes out in the other scheme: if that one is
        answered, the message says which scheme the master speaks.  A
        refused connection, an unknown host or a certificate that failed
        verification (the master does speak TLS) need no such probe."""
        causes = _causes(error)
        scheme, netloc, _ = _split_root(self.root)
        stalled, self._tls_stalled = self._tls_stalled, False
        timed_out = any(isinstance(c, (defer.CancelledError, defer.TimeoutError)) for c in causes)
        if stalled and scheme == "https":
            reason = f"TLS handshake not finished within {self._handshake_deadline:g}s"
        elif timed_out:
            reason = f"no answer within {self.timeout:g}s"
        else:
            reason = _reason(error)
        message = f"cannot reach master at {self.root}: {reason}"
        hopeless = any(isinstance(c, (net_error.ConnectionRefusedError, net_error.DNSLookupError)) for c in causes)
        verify_failed = "certificate verify failed" in error_text(error)
        if hopeless or verify_failed or (timed_out and scheme == "http" and not stalled):
            return MasterAPIError(0, message, kind="timeout" if timed_out else "")
        other = "http" if scheme == "https" else "https"
        if await self._answers_in(other):
            other_base = other + self.root[len(scheme) : -len("/v1")]
            if scheme == "https":
                hint = f"the master does not speak TLS at {netloc}: use {other_base}"
            else:
                hint = (
                    f"the master speaks TLS at {netloc}: use {other_base} (a tls=1 master's "
                    "self-signed certificate also needs verify=False / --insecure)"
                )
            return MasterAPIError(0, f"{hint}; {scheme}:// got: {reason}", kind="tls_mismatch")
        return MasterAPIError(0, message, kind="timeout" if timed_out or stalled else "")

    async def _answers_in(self, scheme: str) -> bool:
        """Whether an HTTP answer -- any status -- comes back from the
        master's host and port in ``scheme``.  Sent without the API key (over
        plain HTTP it would travel in clear text) and without certificate
        checks: only the scheme is in question."""
        _, netloc, path = _split_root(self.root)
        pool = HTTPConnectionPool(self._reactor, persistent=False)
        agent = Agent(self._reactor, contextFactory=_NoVerifyPolicy(), pool=pool)
        wait = min(self.timeout or PROBE_TIMEOUT, PROBE_TIMEOUT)
        try:
            response = await HTTPClient(cast(IAgent, agent)).request(
                "GET", f"{scheme}://{netloc}{path}/info", allow_redirects=False, timeout=wait, reactor=self._reactor
            )
            await treq.content(response)
            return True
        except Exception:  # noqa: BLE001 - no answer is the answer
            return False
        finally:
            await pool.closeCachedConnections()

    def _refusal(self, code: int, content: bytes, path: str) -> MasterAPIError:
        """The error for a non-2xx answer: the master's own ``error`` text,
        except for a 404 of a route every master has (anything but an
        instance it does not know), which means no API at this URL."""
        message = _error_message(content)
        if code == 404 and message != INSTANCE_NOT_FOUND:
            unknown_id = path.startswith("/instances/") and "/" in path[len("/instances/"):]
            if not unknown_id:
                return _no_api(self.root)
        return MasterAPIError(code, message)

    async def _call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        params: Optional[dict] = None,
        expect: tuple[int, ...] = (200,),
    ) -> Any:
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        code, _headers, content = await self.raw_request(method, path, body, params=params)
        if code not in expect:
            raise self._refusal(code, content, path)
        if code == 204 or not content:
            return None
        try:
            return json.loads(content)
        except ValueError:
            raise MasterAPIError(code, "answer is not JSON") from None

    # -- instances --------------------------------------------------------

    async def list_instances(self) -> list[dict]:
        """Every instance, the ``********`` key instance included."""
        return await self._call("GET", "/instances")

    async def get_instance(self, instance_id: str) -> dict:
        return await self._call("GET", _instance_path(instance_id))

    async def create_instance(self, url: str, alias: Optional[str] = None) -> dict:
        """Create and start an instance; answers the new instance."""
        payload: dict[str, Any] = {"url": url}
        if alias is not None:
            payload["alias"] = alias
        return await self._call("POST", "/instances", payload, expect=(201,))

    async def patch_instance(self, instance_id: str, **fields: Any) -> dict:
        """PATCH any of ``alias``, ``action``, ``restart``, ``meta``."""
        return await self._call("PATCH", _instance_path(instance_id), fields)

    async def action(self, instance_id: str, action: str) -> dict:
        return await self.patch_instance(instance_id, action=action)

    async def start(self, instance_id: str) -> dict:
        return await self.action(instance_id, "start")

    async def stop(self, instance_id: str) -> dict:
        return await self.action(instance_id, "stop")

    async def restart(self, instance_id: str) -> dict:
        return await self.action(instance_id, "restart")

    async def reset(self, instance_id: str) -> dict:
        """Zero the instance's traffic counters."""
        return await self.action(instance_id, "reset")

    async def set_alias(self, instance_id: str, alias: str) -> dict:
        return await self.patch_instance(instance_id, alias=alias)

    async def set_restart_policy(self, instance_id: str, restart: bool) -> dict:
        """Whether the master starts this instance when it starts."""
        return await self.patch_instance(instance_id, restart=bool(restart))

    async def set_meta(
        self,
        instance_id: str,
        *,
        peer: Optional[dict] = None,
        tags: Optional[dict] = None,
    ) -> dict:
        meta: dict[str, Any] = {}
        if peer is not None:
            meta["peer"] = peer
        if tags is not None:
            meta["tags"] = tags
        return await self.patch_instance(instance_id, meta=meta)

    async def set_tags(self, instance_id: str, tags: dict) -> dict:
        return await self.set_meta(instance_id, tags=tags)

    async def clear_tags(self, instance_id: str) -> dict:
        """Remove every tag: ``"tags": null`` (an empty map means "no
        change" to this master, as to Go's)."""
        return await self.patch_instance(instance_id, meta={"tags": None})

    async def put_url(self, instance_id: str, url: str) -> dict:
        """Replace the instance's URL and restart it."""
        return await self._call("PUT", _instance_path(instance_id), {"url": url})

    async def put_action(self, instance_id: str, action: str) -> dict:
        """The older API generation's ``PUT {"action": ...}``."""
        return await self._call("PUT", _instance_path(instance_id), {"action": action})

    async def delete_instance(self, instance_id: str) -> None:
        await self._call("DELETE", _instance_path(instance_id), expect=(204,))

    async def rotate_key(self) -> str:
        """Make the master generate a new API key; this client switches to it.
        Every open event stream is closed by the master."""
        inst = await self.action(KEY_INSTANCE, "restart")
        self.api_key = inst["url"]
        return self.api_key

    # -- master -----------------------------------------------------------

    async def info(self) -> dict:
        return await self._call("GET", "/info")

    async def set_master_alias(self, alias: str) -> dict:
        return await self._call("POST", "/info", {"alias": alias})

    async def tcping(self, target: str) -> dict:
        """``{"target", "connected", "latency", "error"}`` of a TCP connect
        from the master to ``host:port``."""
        return await self._call("GET", "/tcping", params={"target": target})

    async def openapi(self) -> dict:
        return await self._call("GET", "/openapi.json")

    def events(self, *, high_water: int = 256) -> "EventStream":
        """The ``/events`` stream; iterate it with ``async for``."""
        return EventStream(self, high_water=high_water)


def _reason(error: BaseException) -> str:
    """:func:`error_text`, with a hint for the usual TLS mistake."""
    text = error_text(error)
    if "certificate verify failed" in text:
        return (
            "TLS certificate verify failed (a tls=1 master's self-signed certificate "
            "needs verify=False / --insecure; a private CA needs ca_file / --ca-file)"
        )
    return text


class EventStream:
    """Server-Sent Events from ``/events`` as an async iterator of dicts.

    The stream connects on first iteration (or ``await stream.open()``, which
    returns once the master has accepted it, so nothing created afterwards is
    missed).  It ends when the master closes it (after a ``shutdown`` event)
    and raises :class:`MasterAPIError` if the connection breaks otherwise.
    ``close()`` ends it from this side.
    """

    MAX_LINE = 1 << 22

    def __init__(self, client: MasterClient, *, high_water: int = 256):
        self._client = client
        self._high_water = high_water
        self._queue: collections.deque = collections.deque()
        self._waiter: Optional[Deferred] = None
        self._opening: Optional[Deferred] = None
        self._transport: Any = None
        self._paused = False
        self._done = False
        self._closing = False
        self._error: Optional[MasterAPIError] = None
        self._open_error: Optional[MasterAPIError] = None
        self._lost: Deferred = Deferred()
        self.retry_ms: Optional[int] = None
        self.saw_shutdown = False

    async def __aenter__(self) -> "EventStream":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __aiter__(self) -> "EventStream":
        return self

    async def open(self) -> None:
        """Connect (once); raises :class:`MasterAPIError` on refusal."""
        if self._opening is None:
            self._opening = defer.ensureDeferred(self._open_safely())
        await _shield(self._opening)
        if self._open_error is not None:
            raise self._open_error

    async def _open_safely(self) -> None:
        try:
            await self._open()
        except Exception as e:
            if not isinstance(e, MasterAPIError):
                e = MasterAPIError(0, f"event stream not opened: {_reason(e)}")
            self._open_error = e
            self._done = True
            if not self._lost.called:
                self._lost.callback(None)

    async def _open(self) -> None:
        client = self._client
        headers = client._headers("text/event-stream")
        headers["Cache-Control"] = ["no-cache"]
        try:
            response = await client._http.request(
                "GET",
                client.root + "/events",
                headers=headers,
                unbuffered=True,
                allow_redirects=False,
                timeout=client.timeout,
                reactor=client._reactor,
            )
        except Exception as e:
            self._done = True
            self._lost.callback(None)
            if self._closing:  # closed while connecting: nothing to diagnose
                raise MasterAPIError(0, "event stream closed before it opened") from None
            raise await client._unreachable(e) from None
        if response.code != 200:
            body = await treq.content(response)
            self._done = True
            self._lost.callback(None)
            raise client._refusal(response.code, body, "/events")
        client._streams.add(self)
        response.deliverBody(_SSEProtocol(self))
        if self._closing and self._transport is not None:
            self._transport.stopProducing()

    async def __anext__(self) -> dict:
        await self.open()
        if self._queue:
            return self._take()
        if self._done:
            return self._finished()
        waiter = self._waiter = Deferred()
        try:
            await waiter
        finally:
            if self._waiter is waiter:  # cancelled (next() timed out)
                self._waiter = None
        if self._queue:
            return self._take()
        return self._finished()

    async def next(self, timeout: Optional[float] = None) -> dict:
        """The next event, or :class:`MasterAPIError` (status 0) when none
        arrives within ``timeout`` seconds; ``StopAsyncIteration`` at end."""
        d = defer.ensureDeferred(self.__anext__())
        if timeout is not None:
            d.addTimeout(timeout, self._client._reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise MasterAPIError(0, f"no event within {timeout}s", kind="timeout") from None

    def _take(self) -> dict:
        event = self._queue.popleft()
        if self._paused and len(self._queue) <= self._high_water // 2 and self._transport:
            self._paused = False
            self._transport.resumeProducing()
        return event

    def _finished(self) -> dict:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopAsyncIteration

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    # called by the protocol
    def _push(self, event: dict) -> None:
        if event.get("type") == "shutdown":
            self.saw_shutdown = True
        self._queue.append(event)
        if len(self._queue) >= self._high_water and not self._paused and self._transport:
            self._paused = True
            self._transport.pauseProducing()
        self._wake()

    def _lost_connection(self, reason: Failure) -> None:
        self._done = True
        self._client._streams.discard(self)
        clean = reason.check(ResponseDone, PotentialDataLoss) or self._closing or self.saw_shutdown
        if not clean:
            self._error = MasterAPIError(0, f"event stream broken: {_reason(reason.value)}")
        self._wake()
        if not self._lost.called:
            self._lost.callback(None)

    def _protocol_error(self, message: str) -> None:
        self._error = MasterAPIError(0, message)
        self._closing = True
        if self._transport is not None:
            self._transport.stopProducing()

    async def close(self) -> None:
        """Disconnect and wait until the connection is really gone."""
        self._closing = True
        if self._opening is None:
            return
        if not self._opening.called:
            self._opening.cancel()
        if self._transport is not None and not self._done:
            if self._paused:
                self._paused = False
                self._transport.resumeProducing()
            self._transport.stopProducing()
        if self._lost.called or self._done and self._transport is None:
            return
        await _shield(self._lost)


async def _shield(d: Deferred) -> Any:
    """Await ``d`` (which never fails) without consuming its result, so
    several coroutines may wait for the same event."""
    inner: Deferred = Deferred()

    def relay(result):
        inner.callback(None)
        return result

    d.addBoth(relay)
    await inner


class _SSEProtocol(Protocol):
    """Splits the byte stream into SSE events (``text/event-stream``)."""

    def __init__(self, stream: EventStream):
        self._stream = stream
        self._buffer = b""
        self._event_name = ""
        self._data: list[str] = []

    def makeConnection(self, transport) -> None:
        self._stream._transport = transport
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            self._line(line.rstrip(b"\r").decode("utf-8", "replace"))
        if len(self._buffer) > EventStream.MAX_LINE:
            self._buffer = b""
            self._stream._protocol_error("event stream line too long")

    def _line(self, line: str) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(":"):
            return  # comment / keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event_name = value
        elif field == "retry" and value.isdigit():
            self._stream.retry_ms = int(value)

    def _dispatch(self) -> None:
        data, self._data = self._data, []
        self._event_name = ""
        if not data:
            return
        try:
            event = json.loads("\n".join(data))
        except ValueError:
            self._stream._protocol_error("event data is not JSON")
            return
        if not isinstance(event, dict):
            self._stream._protocol_error("event data is not a JSON object")
            return
        self._stream._push(event)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stream._lost_connection(reason)
