"""Shared pieces of the master tests: a real master on port 0 with short
tunables, and a treq client for it over HTTP or HTTPS."""

from __future__ import annotations

import json
from typing import Optional

import treq
from twisted.internet import defer, reactor, ssl, task
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from nodepass.config import Tunables, parse_url
from nodepass.logs import NodeLog
from nodepass.master.service import MasterService

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


async def start_master(
    case,
    query: str = "",
    state_dir: Optional[str] = None,
    tunables: Tunables = FAST,
    prefix: str = "",
) -> MasterService:
    """A started master on 127.0.0.1:0, stopped at test cleanup."""
    url = f"master://127.0.0.1:0{prefix}" + (f"?{query}" if query else "")
    config = parse_url(url)
    svc = MasterService(config, state_dir or case.mktemp(), tunables=tunables, log=NodeLog(config.log))
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


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Poll ``predicate`` until true (there is no event to await for some
    conditions, e.g. counters moving); fails after ``timeout``."""
    waited = 0.0
    while True:
        value = predicate()
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await task.deferLater(reactor, interval, lambda: None)
        waited += interval


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

    async def block(self, timeout: float = 5.0) -> bytes:
        deadline = reactor.seconds() + timeout
        while self._taken >= len(self.blocks):
            if self.ended is not None and self.ended.called:
                raise AssertionError("SSE stream ended")
            if reactor.seconds() > deadline:
                raise AssertionError("no SSE block within timeout")
            self._waiter = defer.Deferred()
            timer = reactor.callLater(0.05, self._wake)
            await self._waiter
            if timer.active():
                timer.cancel()
        self._taken += 1
        return self.blocks[self._taken - 1]

    async def event(self, match=None, timeout: float = 5.0) -> dict:
        """The next ``instance`` event (decoded data) for which ``match``
        is true; earlier non-matching events are skipped."""
        deadline = reactor.seconds() + timeout
        while True:
            block = await self.block(max(deadline - reactor.seconds(), 0.01))
            lines = block.split(b"\n")
            if lines[0] != b"event: instance":
                continue
            assert len(lines) == 2 and lines[1].startswith(b"data: "), block
            data = json.loads(lines[1][6:])
            if match is None or match(data):
                return data

    async def closed(self, timeout: float = 5.0) -> None:
        await wait_for(lambda: self.ended is not None and self.ended.called, timeout)
