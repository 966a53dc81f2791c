"""Shared pieces of the master tests: a real master on port 0 with short
tunables, a treq client for it over HTTP or HTTPS, a blocking client for
worker threads (:class:`Wire`), and a capture of every log line written."""

from __future__ import annotations

import http.client
import io
import json
import re
import ssl as stdlib_ssl
from typing import Optional

import attrs
import treq
from twisted.internet import defer, reactor, ssl, task
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from nodepass.config.urls import Tunables, parse_url, text_problem
from nodepass.base.logs import NodeLog, NodePassObserver
from nodepass.master.service import MasterService

#: One SPEC §7 log line.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  (DEBUG|INFO|WARN|ERROR|EVENT)  (.*)$")

FAST = Tunables(
    report_interval=0.2,
    service_cooldown=0.1,
    shutdown_timeout=2.0,
    reload_interval=3600.0,
    handshake_timeout=2.0,
    tcp_dial_timeout=2.0,
    udp_dial_timeout=2.0,
    pool_get_timeout=2.0,
)


@implementer(IPolicyForHTTPS)
class TrustOne:
    """Verify the master against its own (self-signed) certificate."""

    def __init__(self, pem: bytes):
        self.root = ssl.Certificate.loadPEM(pem)

    def creatorForNetloc(self, hostname: bytes, port: int):
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.root)


def in_process(config):
    """``config`` with its instances in the test's own reactor
    (``workers=0``): most master tests look at the running
    :class:`~nodepass.service.instance.TunnelService` objects; the worker
    processes have their own tests (``tests/test_workers.py``)."""
    return attrs.evolve(config, workers=0)


async def start_master(
    case,
    query: str = "",
    state_dir: Optional[str] = None,
    tunables: Tunables = FAST,
    prefix: str = "",
    log: Optional[NodeLog] = None,
) -> MasterService:
    """A started master on 127.0.0.1:0, stopped at test cleanup."""
    url = f"master://127.0.0.1:0{prefix}" + (f"?{query}" if query else "")
    config = parse_url(url)
    if "workers=" not in query:
        config = in_process(config)
    svc = MasterService(config, state_dir or case.mktemp(), tunables=tunables, log=log or NodeLog(config.log))
    svc.startService()
    await svc.ready

    async def stop():
        if svc.running:
            await svc.stopService()

    case.addCleanup(lambda: defer.ensureDeferred(stop()))
    return svc


class Api:
    """A tiny treq wrapper: ``await api.call("GET", "/instances")`` gives
    ``(status, decoded JSON or None, response)``; key sent unless told."""

    def __init__(self, master: MasterService, case):
        self.master = master
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        if master.scheme == "https":
            agent = Agent(reactor, contextFactory=TrustOne(master.credentials.cert_pem), pool=self.pool)
        else:
            agent = Agent(reactor, pool=self.pool)
        self.client = treq.client.HTTPClient(agent)
        self.root = f"{master.scheme}://127.0.0.1:{master.port}{master.config.prefix}/v1"
        case.addCleanup(self.pool.closeCachedConnections)

    async def call(self, method: str, path: str, body=None, key: Optional[str] = "default", raw: Optional[bytes] = None, headers=None):
        hdrs = dict(headers or {})
        if key == "default":
            key = self.master.api_key
        if key is not None:
            hdrs["X-API-Key"] = key
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        resp = await self.client.request(method, self.root + path, data=data, headers=hdrs)
        content = await resp.content()
        try:
            decoded = json.loads(content) if content else None
        except ValueError:
            decoded = None
        resp.body = content
        return resp.code, decoded, resp


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02, what: str = ""):
    """Poll ``predicate`` until true (there is no event to await for some
    conditions, e.g. counters moving); fails after ``timeout`` naming
    ``what`` it waited for."""
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or 'a condition'}")
        await task.deferLater(reactor, interval, lambda: None)


class SSEClient:
    """Reads ``/events`` through treq and splits the stream into blocks
    (one per ``\\n\\n``); ``raw`` keeps every byte for framing checks."""

    def __init__(self, api: Api, key: Optional[str] = None):
        self.api = api
        self.key = key or api.master.api_key
        self.raw = b""
        self._buffer = b""
        self.blocks: list[bytes] = []
        self._taken = 0
        self._waiter: Optional[defer.Deferred] = None
        self.ended: Optional[defer.Deferred] = None
        self.end_result = None

    async def connect(self) -> "SSEClient":
        resp = await self.api.client.get(
            self.api.root + "/events", headers={"X-API-Key": self.key, "Cache-Control": "no-cache"}, unbuffered=True
        )
        self.response = resp
        self.ended = treq.collect(resp, self._data)
        self.ended.addBoth(self._end)
        return self

    def _end(self, result):
        self.end_result = result
        self._wake()
        return None

    def _wake(self):
        if self._waiter is not None and not self._waiter.called:
            w, self._waiter = self._waiter, None
            w.callback(None)

    def _data(self, chunk: bytes) -> None:
        if len(self.raw) < 65536:  # enough for framing checks; avoids quadratic growth
            self.raw += chunk
        else:
            self.raw = self.raw[:32768] + chunk[-32768:]
        self._buffer += chunk
        if b"\n\n" in self._buffer:
            *done, self._buffer = self._buffer.split(b"\n\n")
            self.blocks.extend(done)
        self._wake()

    async def block(self, timeout: float = 5.0, what: str = "an SSE block") -> bytes:
        """The next block; woken by data or the stream's end, failing after
        ``timeout`` naming ``what`` it waited for."""
        deadline = reactor.seconds() + timeout
        while self._taken >= len(self.blocks):
            if self.ended is not None and self.ended.called:
                raise AssertionError(f"SSE stream ended while waiting for {what}")
            remaining = deadline - reactor.seconds()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self._waiter = defer.Deferred()
            timer = reactor.callLater(remaining, self._wake)
            await self._waiter
            if timer.active():
                timer.cancel()
        self._taken += 1
        return self.blocks[self._taken - 1]

    async def event(self, match=None, timeout: float = 5.0, what: str = "a matching SSE event") -> dict:
        """The next ``instance`` event (decoded data) for which ``match``
        is true; earlier non-matching events are skipped."""
        deadline = reactor.seconds() + timeout
        while True:
            block = await self.block(max(deadline - reactor.seconds(), 0.01), what)
            lines = block.split(b"\n")
            if lines[0] != b"event: instance":
                continue
            assert len(lines) == 2 and lines[1].startswith(b"data: "), block
            data = json.loads(lines[1][6:])
            if match is None or match(data):
                return data

    async def closed(self, timeout: float = 5.0, what: str = "the SSE stream to close") -> None:
        await wait_for(lambda: self.ended is not None and self.ended.called, timeout, what=what)


class LogCapture:
    """Every log line the process writes from now until the test ends (the
    master's, its instances' and Twisted's own, at debug level), exactly as
    the console would show them."""

    def __init__(self, case, level: str = "debug"):
        self.stream = io.StringIO()
        self.observer = NodePassObserver(self.stream, level, colour=False)
        globalLogPublisher.addObserver(self.observer)
        case.addCleanup(globalLogPublisher.removeObserver, self.observer)

    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[str]:
        return self.text().split("\n")[:-1]


class Wire:
    """Blocking HTTP to one master, for worker threads: a fresh connection
    per request, so a refusal that closes the connection costs nothing."""

    def __init__(self, master, tls: bool = False):
        self.master = master
        self.tls = tls
        self.root = master.config.prefix + "/v1"

    def connection(self) -> http.client.HTTPConnection:
        if self.tls:
            context = stdlib_ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = stdlib_ssl.CERT_NONE
            return http.client.HTTPSConnection("127.0.0.1", self.master.port, timeout=10, context=context)
        return http.client.HTTPConnection("127.0.0.1", self.master.port, timeout=10)

    def call(self, method: str, path: str, body: Optional[bytes] = None, key="good", headers=None, absolute: bool = False):
        """``(status, lower-cased headers, body bytes)``; ``path`` is below
        ``{prefix}/v1`` unless ``absolute``.  ``key``: ``"good"`` sends the
        master's current key, None none, anything else that value."""
        hdrs = dict(headers or {})
        if key == "good":
            hdrs["X-API-Key"] = self.master.api_key
        elif key is not None:
            hdrs["X-API-Key"] = key
        conn = self.connection()
        try:
            target = path if absolute else self.root + path
            conn.request(method, target, body=body, headers=hdrs)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def snapshot(self) -> tuple[bytes, bytes]:
        """What a refused request must not change: the API's view and the
        state file on disk."""
        status, _, listed = self.call("GET", "/instances")
        assert status == 200, (status, listed[:300])
        with open(self.master.store.path, "rb") as f:
            return listed, f.read()


def assert_refusal(status: int, headers: dict, data: bytes, where: str, expected: Optional[int] = None) -> str:
    """A clean 4xx: the status, CORS, ``{"error": "..."}`` and nothing else."""
    assert 400 <= status < 500, f"{status} for {where}: {data[:300]!r}"
    if expected is not None:
        assert status == expected, f"{status} != {expected} for {where}: {data[:300]!r}"
    assert headers.get("access-control-allow-origin") == "*", f"no CORS for {where}: {headers}"
    decoded = json.loads(data.decode("utf-8"))
    assert set(decoded) == {"error"} and isinstance(decoded["error"], str), f"{where}: {decoded!r}"
    assert text_problem(decoded["error"]) is None, f"{where}: {decoded!r}"
    return decoded["error"]
