"""End to end through the master: instances created over the API carry real
traffic, and their counters move in GET answers and SSE update events."""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from tests.master_helpers import Api, SSEClient, start_master, wait_for
from tests.helpers import free_port, service_up
from tests.test_master_state import echo_server, send_through


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
            await service_up(master.instances[rid], "instance")
            payload = b"hello through the master" * 200
            self.assertEqual(await send_through(entry, payload), payload)
            # Counters move on CHECK_POINT, which the master announces as an
            # SSE update: wait for the one that carries them, then read REST.
            ev = await sse.event(
                lambda d: d["type"] == "update" and d["instance"]["id"] == rid
                and d["instance"]["tcprx"] >= len(payload) and d["instance"]["tcptx"] >= len(payload),
                what="an update event carrying the relayed bytes",
            )
            code, got, _ = await api.call("GET", "/instances/" + rid)
            self.assertEqual(got["mode"], 1)
            self.assertEqual(got["status"], "running")
            self.assertGreaterEqual(got["tcprx"], len(payload))
            self.assertGreaterEqual(got["tcptx"], len(payload))
            self.assertEqual(ev["instance"]["mode"], 1)

        return ensureDeferred(go())

    def test_server_and_client_pair(self):
        return self._pair("")

    def test_server_and_client_pair_quic(self):
        """The same with a QUIC pool: the config field carries quic=1."""
        return self._pair("&quic=1")

    def _pair(self, query: str):
        async def go():
            master = await start_master(self)
            api = Api(master, self)
            sse = await SSEClient(api).connect()
            target = await echo_server(self)
            tunnel, entry = free_port(), free_port()  # the tunnel takes UDP too with quic=1
            code, srv, _ = await api.call(
                "POST", "/instances", {"url": f"server://127.0.0.1:{tunnel}/127.0.0.1:{entry}?mode=1{query}"}
            )
            self.assertEqual(code, 201, srv)
            # SPEC-1.14 §8: type= in place of quic=; a URL's own quic= is kept.
            self.assertIn("&quic=1&" if query else "&type=0", srv["config"])
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


class StatusTests(unittest.TestCase):
    def test_silent_instance_goes_error_and_recovers(self):
        """Once a server has reported, 3 report intervals without a
        CHECK_POINT make it ``error``, and the next one brings it back
        (that it stays running before its first report is pinned in
        tests.test_dashboard_contract)."""

        async def go():
            master = await start_master(self)
            api = Api(master, self)
            sse = await SSEClient(api).connect()
            target = await echo_server(self)
            tunnel, entry = free_port(), free_port()
            code, srv, _ = await api.call("POST", "/instances", {"url": f"server://127.0.0.1:{tunnel}/127.0.0.1:{entry}?mode=1"})
            self.assertEqual(srv["status"], "running")
            rid = srv["id"]
            await api.call("POST", "/instances", {"url": f"client://127.0.0.1:{tunnel}/127.0.0.1:{target}?mode=2&min=2"})
            await sse.event(
                lambda d: d["type"] == "update" and d["instance"]["id"] == rid and d["instance"]["mode"] == 1,
                timeout=10, what="the server's first CHECK_POINT",
            )
            # The master stops hearing the server's reports: silent.
            svc = master.instances[rid]
            listeners = list(svc.checkpoint_listeners)
            svc.checkpoint_listeners.clear()
            ev = await sse.event(
                lambda d: d["type"] == "update" and d["instance"]["id"] == rid and d["instance"]["status"] == "error",
                what="the silent server's error update",
            )
            code, got, _ = await api.call("GET", "/instances/" + rid)
            self.assertEqual(got["status"], "error")
            svc.checkpoint_listeners.extend(listeners)
            ev = await sse.event(
                lambda d: d["type"] == "update" and d["instance"]["id"] == rid and d["instance"]["status"] == "running",
                what="the server's recovery at its next CHECK_POINT",
            )
            self.assertEqual(ev["instance"]["mode"], 1)

        return ensureDeferred(go())

    def test_client_error_and_periodic_restart(self):
        async def go():
            from nodepass.config.urls import Tunables

            from tests.master_helpers import FAST

            fields = ("report_interval", "service_cooldown", "shutdown_timeout", "handshake_timeout", "tcp_dial_timeout")
            tun = Tunables(**{k: getattr(FAST, k) for k in fields}, reload_interval=0.5, )
            master = await start_master(self, tunables=tun)
            api = Api(master, self)
            dead = free_port()
            code, cli, _ = await api.call("POST", "/instances", {"url": f"client://127.0.0.1:{dead}/127.0.0.1:9?mode=2"})
            rid = cli["id"]
            first = master.instances[rid]
            await wait_for(lambda: master.records[rid].status == "error")
            # every reload interval an instance in error is restarted
            await wait_for(lambda: master.instances.get(rid) not in (None, first), timeout=5)
            code, got, _ = await api.call("GET", "/instances/" + rid)
            self.assertIn(got["status"], ("running", "error"))
            code, got, _ = await api.call("PATCH", "/instances/" + rid, {"action": "stop"})
            self.assertEqual(got["status"], "stopped")
            self.assertNotIn(rid, master.instances)

        return ensureDeferred(go())


class InstanceLogTests(unittest.TestCase):
    def test_lines_tagged_and_filtered_per_instance(self):
        """Each instance logs at its own level; the master's output tags its
        lines with the instance ID."""

        async def go():
            import io

            from twisted.logger import globalLogPublisher

            from nodepass.base.logs import NodePassObserver

            out = io.StringIO()
            observer = NodePassObserver(out, "info", colour=False)
            globalLogPublisher.addObserver(observer)
            self.addCleanup(globalLogPublisher.removeObserver, observer)
            master = await start_master(self)
            api = Api(master, self)
            code, loud, _ = await api.call("POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1&log=info"})
            code, quiet, _ = await api.call("POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1&log=error"})
            await wait_for(lambda: master.instances[loud["id"]].started.called and master.instances[quiet["id"]].started.called)
            text = out.getvalue()
            self.assertRegex(text, r"\d\d:\d\d:\d\d\.\d{3}  INFO  \[%s\] Client started: " % loud["id"])
            self.assertNotIn(f"[{quiet['id']}] Client started", text)

        return ensureDeferred(go())
