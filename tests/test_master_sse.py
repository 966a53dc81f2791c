"""``GET /events``: framing, initial burst, live events, shutdown, and a
subscriber that stops reading."""

from __future__ import annotations

import datetime
import json

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from nodepass.master.identity import API_KEY_ID

from tests.master_helpers import Api, SSEClient, start_master, wait_for

SINGLE = "client://127.0.0.1:0/127.0.0.1:9?mode=1"


class SSETests(unittest.TestCase):
    async def _setup(self):
        self.master = await start_master(self)
        self.api = Api(self.master, self)

    def test_framing_and_initial_burst(self):
        async def go():
            await self._setup()
            code, inst, _ = await self.api.call("POST", "/instances", {"url": SINGLE, "alias": 'a"b\\c'})
            self.assertEqual(code, 201)
            sse = await SSEClient(self.api).connect()
            self.assertEqual(sse.response.code, 200)
            self.assertEqual(sse.response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
            self.assertEqual(sse.response.headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
            first = await sse.block()
            self.assertEqual(first, b"retry: 3000")
            self.assertTrue(sse.raw.startswith(b"retry: 3000\n\nevent: instance\ndata: {"))
            seen = []
            for _ in range(2):
                block = await sse.block()
                lines = block.split(b"\n")
                self.assertEqual(len(lines), 2, block)  # one event line, one one-line data line
                self.assertEqual(lines[0], b"event: instance")
                data = json.loads(lines[1][len(b"data: "):])
                self.assertEqual(set(data), {"type", "time", "instance", "logs"})
                self.assertEqual(data["type"], "initial")
                self.assertEqual(data["logs"], "")
                datetime.datetime.fromisoformat(data["time"])  # RFC 3339
                seen.append(data["instance"]["id"])
            self.assertEqual(sorted(seen), sorted([API_KEY_ID, inst["id"]]))
            alias = [b for b in sse.blocks if inst["id"].encode() in b][0]
            self.assertIn(b'"alias":"a\\"b\\\\c"', alias)  # escaped, still one line

        return ensureDeferred(go())

    def test_live_events(self):
        async def go():
            await self._setup()
            sse = await SSEClient(self.api).connect()
            await sse.event(lambda d: d["type"] == "initial")
            code, inst, _ = await self.api.call("POST", "/instances", {"url": SINGLE})
            rid = inst["id"]
            ev = await sse.event(lambda d: d["type"] == "create")
            self.assertEqual(ev["instance"]["id"], rid)
            self.assertEqual(set(ev["instance"]), set(inst))
            # instance log lines arrive as log events, CHECK_POINT as updates
            ev = await sse.event(lambda d: d["type"] == "log" and "Client started" in d["logs"])
            self.assertEqual(ev["instance"]["id"], rid)
            self.assertRegex(ev["logs"], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  INFO  Client started: ")
            ev = await sse.event(lambda d: d["type"] == "update" and d["instance"]["mode"] == 1)
            self.assertEqual(ev["instance"]["status"], "running")
            await self.api.call("PATCH", "/instances/" + rid, {"alias": "renamed"})
            ev = await sse.event(lambda d: d["type"] == "update" and d["instance"]["alias"] == "renamed")
            await self.api.call("DELETE", "/instances/" + rid)
            ev = await sse.event(lambda d: d["type"] == "delete")
            self.assertEqual(ev["instance"]["id"], rid)
            for block in sse.blocks:
                if b'"type":"log"' in block:
                    self.assertNotIn(b"CHECK_POINT", block)

        return ensureDeferred(go())

    def test_shutdown_on_key_rotation(self):
        async def go():
            await self._setup()
            streams = [await SSEClient(self.api).connect() for _ in range(2)]
            for sse in streams:
                await sse.event(lambda d: d["type"] == "initial")
            code, key, _ = await self.api.call("PATCH", "/instances/" + API_KEY_ID, {"action": "restart"})
            self.assertEqual(code, 200)
            for sse in streams:
                ev = await sse.event(lambda d: d["type"] == "shutdown")
                self.assertEqual(set(ev), {"type", "time", "instance", "logs"})
                self.assertEqual((ev["instance"], ev["logs"]), (None, ""))  # as Go: no instance
                await sse.closed()
                self.assertTrue(sse.raw.endswith(b"\n\n"))
            self.assertEqual(self.master.hub.streams, set())
            # the old key cannot open a new stream
            code, body, _ = await self.api.call("GET", "/events", key=streams[0].key)
            self.assertEqual(code, 401)

        return ensureDeferred(go())

    def test_shutdown_on_master_stop(self):
        async def go():
            await self._setup()
            sse = await SSEClient(self.api).connect()
            await sse.event(lambda d: d["type"] == "initial")
            await self.master.stopService()
            ev = await sse.event(lambda d: d["type"] == "shutdown")
            self.assertEqual((ev["type"], ev["instance"], ev["logs"]), ("shutdown", None, ""))
            await sse.closed()

        return ensureDeferred(go())

    def test_slow_subscriber_dropped(self):
        async def go():
            await self._setup()
            hub = self.master.hub
            hub.limit = 256 * 1024
            lost = defer.Deferred()

            class Stuck(protocol.Protocol):
                """Sends the request, then never reads again."""

                def connectionMade(self):
                    self.transport.write(
                        b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                        + self_key + b"\r\n\r\n"
                    )
                    self.transport.pauseProducing()

                def connectionLost(self, reason):
                    lost.callback(None)

            self_key = self.master.api_key.encode()
            ep = TCP4ClientEndpoint(reactor, "127.0.0.1", self.master.port)
            stuck = await ep.connect(protocol.Factory.forProtocol(Stuck))
            await wait_for(lambda: len(hub.streams) == 1)
            # a reader that keeps up sees every event meanwhile
            good = await SSEClient(self.api).connect()
            await good.event(lambda d: d["type"] == "initial")
            inst = self.master.domain.identity.to_json()  # the ******** record
            filler = "x" * 32768
            sent = 0
            while hub.dropped == 0 and sent < 4000:
                hub.publish("log", inst, filler)
                sent += 1
                await task.deferLater(reactor, 0, lambda: None)
            self.assertEqual(hub.dropped, 1, f"after {sent} events")
            self.assertEqual(len(hub.streams), 1)  # the good reader remains
            # the master closed the stuck connection: once the client reads
            # again it sees the end (a paused transport cannot notice it)
            stuck.transport.resumeProducing()
            await lost
            self.assertTrue(stuck.transport is None or not stuck.transport.connected)
            hub.publish("update", inst)
            ev = await good.event(lambda d: d["type"] == "update", timeout=20)
            self.assertEqual(ev["instance"]["id"], API_KEY_ID)

        return ensureDeferred(go())


class SSEOverHTTPSTests(unittest.TestCase):
    def test_stream_over_tls(self):
        async def go():
            master = await start_master(self, "tls=1")
            api = Api(master, self)
            sse = await SSEClient(api).connect()
            self.assertEqual(await sse.block(), b"retry: 3000")
            ev = await sse.event()
            self.assertEqual((ev["type"], ev["instance"]["id"]), ("initial", API_KEY_ID))
            code, inst, _ = await api.call("POST", "/instances", {"url": SINGLE})
            ev = await sse.event(lambda d: d["type"] == "create")
            self.assertEqual(ev["instance"]["id"], inst["id"])
            await master.stopService()
            await sse.event(lambda d: d["type"] == "shutdown")
            await sse.closed()

        return ensureDeferred(go())
