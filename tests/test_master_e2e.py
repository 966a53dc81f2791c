"""End to end through the master: instances created over the API carry real
traffic, and their counters move in GET answers and SSE update events."""

from __future__ import annotations

from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from tests.master_helpers import Api, SSEClient, start_master, wait_for
from tests.test_master_state import echo_server, free_port, send_through


class EndToEndTests(unittest.TestCase):
    def test_single_end_client(self):
        async def go():
            master = await start_master(self)
            api = Api(master, self)
            sse = await SSEClient(api).connect()
            target = await echo_server(self)
            entry = free_port()
            code, inst, _ = await api.call("POST", "/instances", {"url": f"client://127.0.0.1:{entry}/127.0.0.1:{target}"})
            self.assertEqual(code, 201)
            rid = inst["id"]
            await wait_for(lambda: master.instances[rid].started.called)
            payload = b"hello through the master" * 200
            self.assertEqual(await send_through(entry, payload), payload)

            async def counters():
                code, got, _ = await api.call("GET", "/instances/" + rid)
                return got

            got = None
            for _ in range(100):
                got = await counters()
                if got["tcprx"] >= len(payload) and got["tcptx"] >= len(payload):
                    break
                await task.deferLater(reactor, 0.05, lambda: None)  # counters move on CHECK_POINT
            self.assertEqual(got["mode"], 1)
            self.assertEqual(got["status"], "running")
            self.assertGreaterEqual(got["tcprx"], len(payload))
            self.assertGreaterEqual(got["tcptx"], len(payload))
            ev = await sse.event(
                lambda d: d["type"] == "update" and d["instance"]["id"] == rid and d["instance"]["tcprx"] >= len(payload)
            )
            self.assertEqual(ev["instance"]["mode"], 1)

        return ensureDeferred(go())

    def test_server_and_client_pair(self):
        async def go():
            master = await start_master(self)
            api = Api(master, self)
            sse = await SSEClient(api).connect()
            target = await echo_server(self)
            tunnel, entry = free_port(), free_port()
            code, srv, _ = await api.call("POST", "/instances", {"url": f"server://127.0.0.1:{tunnel}/127.0.0.1:{entry}?mode=1"})
            self.assertEqual(code, 201, srv)
            code, cli, _ = await api.call(
                "POST", "/instances", {"url": f"client://127.0.0.1:{tunnel}/127.0.0.1:{target}?mode=2&min=4"}
            )
            self.assertEqual(code, 201, cli)
            # the pool fills and CHECK_POINTs report it
            await sse.event(
                lambda d: d["type"] == "update" and d["instance"]["id"] == cli["id"] and d["instance"]["pool"] > 0,
                timeout=10,
            )
            payload = b"p" * 20000
            self.assertEqual(await send_through(entry, payload), payload)
            ev = await sse.event(
                lambda d: d["type"] == "update"
                and d["instance"]["id"] == cli["id"]
                and d["instance"]["tcprx"] >= len(payload)
                and d["instance"]["tcptx"] >= len(payload),
                timeout=10,
            )
            self.assertEqual(ev["instance"]["mode"], 2)
            code, got, _ = await api.call("GET", "/instances/" + cli["id"])
            self.assertGreaterEqual(got["tcprx"], len(payload))
            self.assertGreater(got["pool"], 0)
            self.assertEqual(got["status"], "running")
            code, got, _ = await api.call("GET", "/instances/" + srv["id"])
            self.assertEqual(got["status"], "running")
            self.assertEqual(got["mode"], 1)
            # stopping the server: both end up consistent and nothing leaks
            code, got, _ = await api.call("PATCH", "/instances/" + srv["id"], {"action": "stop"})
            self.assertEqual(got["status"], "stopped")

        return ensureDeferred(go())
