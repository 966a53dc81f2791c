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
