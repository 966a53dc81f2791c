"""The treq client library (nodepass.ctl.client) and the ``nodepassctl``
command, against a real MasterService listening on an OS-chosen port."""

from __future__ import annotations

import json
import os
import signal

from twisted.internet import defer
from twisted.trial import unittest

from nodepass.config.urls import Tunables, parse_url
from nodepass.ctl.client import KEY_INSTANCE, MasterAPIError, MasterClient
from nodepass.master.service import MasterService
from tests import helpers
from tests.procs import child_env, spawn

TUNABLES = Tunables(report_interval=0.2, service_cooldown=0.2, shutdown_timeout=1.0)


async def start_master(test: unittest.TestCase, url: str = "master://127.0.0.1:0") -> MasterService:
    svc = MasterService(parse_url(url), test.mktemp(), tunables=TUNABLES)
    svc.startService()
    await svc.ready
    test.addCleanup(svc.stopService)
    return svc


def single_end_url(target_port: int) -> str:
    """A client instance that needs no peer: single-end forwarding from an
    OS-chosen port to ``target_port``."""
    return f"client://127.0.0.1:0/127.0.0.1:{target_port}?mode=1&log=warn"


class ClientLibraryTests(unittest.TestCase):
    async def _setup(self, url: str = "master://127.0.0.1:0", **client_options):
        self.master = await start_master(self, url)
        self.client = MasterClient(self.master.base_url, self.master.api_key, **client_options)
        self.addCleanup(lambda: defer.ensureDeferred(self.client.close()))
        port, _ = helpers.listen_echo()
        self.addCleanup(port.stopListening)
        self.echo_port = port.getHost().port
        return self.client

    @defer.inlineCallbacks
    def test_instance_methods(self):
        yield defer.ensureDeferred(self._instance_methods())

    async def _instance_methods(self):
        c = await self._setup()
        listed = await c.list_instances()
        self.assertEqual([i["id"] for i in listed], [KEY_INSTANCE])

        inst = await c.create_instance(single_end_url(self.echo_port), alias="first")
        iid = inst["id"]
        self.assertRegex(iid, "^[0-9a-f]{8}$")
        self.assertEqual((inst["type"], inst["alias"], inst["restart"]), ("client", "first", True))
        self.assertEqual(inst["status"], "running")
        self.assertEqual((await c.get_instance(iid))["url"], inst["url"])
        self.assertEqual({i["id"] for i in await c.list_instances()}, {KEY_INSTANCE, iid})

        self.assertEqual((await c.set_alias(iid, "renamed"))["alias"], "renamed")
        self.assertIs((await c.set_restart_policy(iid, False))["restart"], False)
        self.assertEqual((await c.set_tags(iid, {"env": "test", "x": ""}))["meta"]["tags"], {"env": "test", "x": ""})
        peer = {"sid": "s1", "type": "dash", "alias": "peer"}
        self.assertEqual((await c.set_meta(iid, peer=peer))["meta"]["peer"], peer)

        self.assertEqual((await c.stop(iid))["status"], "stopped")
        self.assertEqual((await c.start(iid))["status"], "running")
        self.assertEqual((await c.restart(iid))["status"], "running")
        reset = await c.reset(iid)
        self.assertEqual([reset[k] for k in ("tcprx", "tcptx", "udprx", "udptx")], [0, 0, 0, 0])
        self.assertEqual((await c.put_action(iid, "stop"))["status"], "stopped")

        new_url = single_end_url(self.echo_port).replace("log=warn", "log=error")
        replaced = await c.put_url(iid, new_url)
        # stored as Go's master stores it: query keys sorted
        self.assertEqual(replaced["url"], f"client://127.0.0.1:0/127.0.0.1:{self.echo_port}?log=error&mode=1")
        self.assertIn("log=error", replaced["config"])
        with self.assertRaises(MasterAPIError) as cm:
            await c.put_url(iid, new_url)
        self.assertEqual((cm.exception.status, cm.exception.message), (409, "Instance URL conflict"))

        # Clients sharing one connection pool leave it to its owner.
        from twisted.internet import reactor
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor)
        a = MasterClient(self.master.base_url, self.master.api_key, pool=pool)
        b = MasterClient(self.master.base_url, self.master.api_key, pool=pool)
        self.assertEqual((await a.get_instance(iid))["id"], (await b.get_instance(iid))["id"])
        await a.close()
        await b.close()
        self.assertTrue(pool._connections)  # still cached: not theirs to close
        await pool.closeCachedConnections()

        self.assertIsNone(await c.delete_instance(iid))
        with self.assertRaises(MasterAPIError) as cm:
            await c.get_instance(iid)
        self.assertEqual((cm.exception.status, cm.exception.message), (404, "Instance not found"))
        self.assertEqual(str(cm.exception), "HTTP 404: Instance not found")

    @defer.inlineCallbacks
    def test_errors_are_raised_with_status_and_message(self):
        yield defer.ensureDeferred(self._errors())

    async def _errors(self):
        c = await self._setup()
        cases = [
            (c.create_instance("ftp://1.2.3.4:5/6.7.8.9:10"), 400, "Invalid URL scheme"),
            (c.create_instance("server://nonsense"), 400, "Invalid URL format"),
            (c.action("abcdef01", "start"), 404, "Instance not found"),
            (c.delete_instance(KEY_INSTANCE), 403, "Forbidden: API Key"),
            (c.put_url(KEY_INSTANCE, "server://:1/1.2.3.4:5"), 403, "Forbidden: API Key"),
        ]
        for coro, status, message in cases:
            with self.assertRaises(MasterAPIError) as cm:
                await coro
            self.assertEqual((cm.exception.status, cm.exception.message), (status, message))
        inst = await c.create_instance(single_end_url(self.echo_port))
        with self.assertRaises(MasterAPIError) as cm:
            await c.action(inst["id"], "explode")
        self.assertEqual((cm.exception.status, cm.exception.message), (400, "Invalid action: explode"))

        wrong = MasterClient(self.master.base_url, "0" * 32)
        self.addCleanup(lambda: defer.ensureDeferred(wrong.close()))
        with self.assertRaises(MasterAPIError) as cm:
            await wrong.list_instances()
        self.assertEqual((cm.exception.status, cm.exception.message), (401, "Unauthorized: Invalid API key"))

        port = helpers.dead_port()
        gone = MasterClient(f"http://127.0.0.1:{port}/api/v1", "k")
        with self.assertRaises(MasterAPIError) as cm:
            await gone.info()
        self.assertEqual(cm.exception.status, 0)
        self.assertIn("cannot reach master", cm.exception.message)
        await gone.close()

    @defer.inlineCallbacks
    def test_master_methods(self):
        yield defer.ensureDeferred(self._master_methods())

    async def _master_methods(self):
        c = await self._setup()
        info = await c.info()
        self.assertRegex(info["mid"], "^[0-9a-f]{16}$")
        self.assertEqual((await c.set_master_alias("hq"))["alias"], "hq")
        self.assertEqual((await c.info())["alias"], "hq")

        ok = await c.tcping(f"127.0.0.1:{self.echo_port}")
        self.assertEqual((ok["target"], ok["connected"], ok["error"]), (f"127.0.0.1:{self.echo_port}", True, None))
        bad = await c.tcping(f"127.0.0.1:{helpers.dead_port()}")
        self.assertIs(bad["connected"], False)
        self.assertIsInstance(bad["error"], str)

        doc = await c.openapi()
        self.assertEqual(doc["openapi"], "3.1.0")
        self.assertIn("/instances/{id}", doc["paths"])

        old_key = c.api_key
        new_key = await c.rotate_key()
        self.assertRegex(new_key, "^[0-9a-f]{32}$")
        self.assertNotEqual(new_key, old_key)
        self.assertEqual(new_key, self.master.api_key)
        self.assertEqual((await c.get_instance(KEY_INSTANCE))["url"], new_key)
        stale = MasterClient(self.master.base_url, old_key)
        with self.assertRaises(MasterAPIError) as cm:
            await stale.info()
        self.assertEqual(cm.exception.status, 401)
        await stale.close()

    @defer.inlineCallbacks
    def test_event_stream(self):
        yield defer.ensureDeferred(self._event_stream())

    async def _event_stream(self):
        c = await self._setup()
        first = await c.create_instance(single_end_url(self.echo_port), alias="before")
        stream = c.events()
        await stream.open()
        initial = [await stream.next(5), await stream.next(5)]
        self.assertEqual(stream.retry_ms, 3000)
        self.assertEqual([e["type"] for e in initial], ["initial", "initial"])
        self.assertEqual({e["instance"]["id"] for e in initial}, {KEY_INSTANCE, first["id"]})

        async def next_of(kind: str, iid: str, **fields) -> dict:
            """Skip events until one of ``kind`` about ``iid`` (whose instance
            has ``fields``) arrives; status updates may come in between."""
            while True:
                event = await stream.next(5)
                inst = event.get("instance") or {}
                if event["type"] == kind and inst.get("id") == iid:
                    if all(inst.get(k) == v for k, v in fields.items()):
                        return event

        second = await c.create_instance(single_end_url(self.echo_port))
        created = await next_of("create", second["id"])
        self.assertEqual(created["instance"]["url"], second["url"])
        self.assertRegex(created["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
        await c.set_alias(second["id"], "after")
        await next_of("update", second["id"], alias="after")
        await c.delete_instance(second["id"])
        await next_of("delete", second["id"])

        # Rotating the key ends every stream with a shutdown event.
        await c.rotate_key()
        while True:
            event = await stream.next(5)
            if event["type"] == "shutdown":
                self.assertEqual((event["instance"], event["logs"]), (None, ""))  # Go's shape
                break
        with self.assertRaises(StopAsyncIteration):
            await stream.next(5)
        await stream.close()

    @defer.inlineCallbacks
    def test_event_stream_async_for_and_close(self):
        yield defer.ensureDeferred(self._async_for())

    async def _async_for(self):
        c = await self._setup()
        seen = []
        async with c.events() as stream:
            async for event in stream:
                seen.append(event)
                break
            # Only the key instance exists, so nothing else is sent: a next()
            # with a deadline times out and leaves the stream usable.
            with self.assertRaises(MasterAPIError) as cm:
                await stream.next(0.1)
            self.assertEqual(cm.exception.status, 0)
            inst = await c.create_instance(single_end_url(self.echo_port))
            event = await stream.next(5)
            self.assertEqual((event["type"], event["instance"]["id"]), ("create", inst["id"]))
        self.assertEqual(seen[0]["type"], "initial")
        # Closed from our side: the master forgets the subscriber.
        await helpers.wait_for(lambda: not self.master.hub.streams, what="master drops the closed stream")
        # A refused stream raises at open.
        bad = MasterClient(self.master.base_url, "nope")
        with self.assertRaises(MasterAPIError) as cm:
            await bad.events().open()
        self.assertEqual(cm.exception.status, 401)
        await bad.close()

    @defer.inlineCallbacks
    def test_event_stream_backpressure(self):
        yield defer.ensureDeferred(self._backpressure())

    async def _backpressure(self):
        """A consumer that falls behind pauses the socket (at high_water
        queued events) instead of queueing without bound, and still gets
        every event, in order, once it catches up."""
        c = await self._setup()
        inst = await c.create_instance(single_end_url(self.echo_port))
        async with c.events(high_water=4) as stream:
            for i in range(30):
                await c.set_alias(inst["id"], f"n{i}")
            await helpers.wait_for(lambda: stream._paused, what="stream paused")
            self.assertLess(len(stream._queue), 15)  # high_water + what one read held
            aliases = []
            while len(aliases) < 30:
                event = await stream.next(5)
                if event["type"] == "update" and event["instance"]["alias"].startswith("n"):
                    if not aliases or aliases[-1] != event["instance"]["alias"]:
                        aliases.append(event["instance"]["alias"])
            self.assertEqual(aliases, [f"n{i}" for i in range(30)])
            self.assertFalse(stream._paused)

    @defer.inlineCallbacks
    def test_event_stream_ends_on_master_stop(self):
        yield defer.ensureDeferred(self._master_stop())

    async def _master_stop(self):
        c = await self._setup()
        stream = c.events()
        await stream.open()
        await stream.next(5)
        await self.master.stopService()
        kinds = []
        async for event in stream:
            kinds.append(event["type"])
        self.assertEqual(kinds[-1], "shutdown")
        self.assertTrue(stream.saw_shutdown)

    @defer.inlineCallbacks
    def test_https_self_signed(self):
        yield defer.ensureDeferred(self._https())

    async def _https(self):
        c = await self._setup("master://127.0.0.1:0?tls=1", verify=False)
        self.assertTrue(c.root.startswith("https://"))
        self.assertEqual((await c.list_instances())[0]["id"], KEY_INSTANCE)
        async with c.events() as stream:
            self.assertEqual((await stream.next(5))["type"], "initial")
        strict = MasterClient(self.master.base_url, self.master.api_key)
        with self.assertRaises(MasterAPIError) as cm:
            await strict.info()
        self.assertEqual(cm.exception.status, 0)
        await strict.close()

    @defer.inlineCallbacks
    def test_https_ca_file(self):
        yield defer.ensureDeferred(self._https_ca_file())

    async def _https_ca_file(self):
        """A tls=2 master with certificate files: verified against the
        certificate given as ca_file (and refused without it)."""
        from nodepass.net.tls import generate_self_signed

        cert, key = generate_self_signed("127.0.0.1")
        base = self.mktemp()
        os.makedirs(base)
        crt_path, key_path = os.path.join(base, "m.crt"), os.path.join(base, "m.key")
        for path, data in ((crt_path, cert), (key_path, key)):
            with open(path, "wb") as f:
                f.write(data)
        c = await self._setup(f"master://127.0.0.1:0?tls=2&crt={crt_path}&key={key_path}", ca_file=crt_path)
        self.assertEqual((await c.info())["tls"], "2")
        strict = MasterClient(self.master.base_url, self.master.api_key)
        with self.assertRaises(MasterAPIError) as cm:
            await strict.info()
        self.assertIn("verify failed", cm.exception.message)
        await strict.close()


class CommandTests(unittest.TestCase):
    """``nodepassctl`` as a subprocess against a master in this reactor."""

    async def _setup(self, url: str = "master://127.0.0.1:0"):
        self.master = await start_master(self, url)
        port, _ = helpers.listen_echo()
        self.addCleanup(port.stopListening)
        self.echo_port = port.getHost().port

    async def ctl(self, *args: str, key: str | None = None, env: dict | None = None) -> tuple[int, str, str]:
        environment = child_env(NODEPASS_MASTER=self.master.base_url, NODEPASS_KEY=key or self.master.api_key)
        environment.update(env or {})
        proc = spawn(self, ["-m", "nodepass.ctl.cli", *args], env=environment)
        status = await proc.ended
        return status, proc.out.decode(), proc.err.decode()

    @defer.inlineCallbacks
    def test_commands(self):
        yield defer.ensureDeferred(self._commands())

    async def _commands(self):
        await self._setup()
        status, out, err = await self.ctl("--json", "create", single_end_url(self.echo_port), "--alias", "cli")
        self.assertEqual((status, err), (0, ""))
        inst = json.loads(out)
        iid = inst["id"]
        self.assertEqual(inst["alias"], "cli")

        status, out, _ = await self.ctl("list")
        self.assertEqual(status, 0)
        header, *rows = out.splitlines()
        self.assertTrue(header.startswith("ID"))
        self.assertIn("STATUS", header)
        row = next(r for r in rows if r.startswith(iid))
        self.assertIn("running", row)
        self.assertIn("cli", row)
        self.assertNotIn(self.master.api_key, out)

        status, out, _ = await self.ctl("tags", iid, "env=prod", "team=net")
        self.assertEqual(status, 0)
        self.assertEqual(self.master.records[iid].meta["tags"], {"env": "prod", "team": "net"})
        status, out, _ = await self.ctl("alias", iid, "renamed")
        self.assertEqual((status, self.master.records[iid].alias), (0, "renamed"))
        status, out, _ = await self.ctl("stop", iid)
        self.assertEqual((status, self.master.records[iid].status), (0, "stopped"))
        status, out, _ = await self.ctl("--json", "show", iid)
        self.assertEqual(json.loads(out)["status"], "stopped")

        status, out, _ = await self.ctl("info")
        self.assertEqual(status, 0)
        self.assertIn(self.master.master_id, out)
        status, out, _ = await self.ctl("tcping", f"127.0.0.1:{self.echo_port}")
        self.assertEqual(status, 0)
        self.assertIn("connected in", out)

        status, out, _ = await self.ctl("--json", "events", "--count", "2")
        self.assertEqual(status, 0)
        events = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([e["type"] for e in events], ["initial", "initial"])

        status, out, _ = await self.ctl("delete", iid)
        self.assertEqual(status, 0)
        self.assertNotIn(iid, self.master.records)

    @defer.inlineCallbacks
    def test_https_insecure(self):
        yield defer.ensureDeferred(self._https_insecure())

    async def _https_insecure(self):
        await self._setup("master://127.0.0.1:0?tls=1")
        self.assertTrue(self.master.base_url.startswith("https://"))
        status, out, err = await self.ctl("--insecure", "--json", "list")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(json.loads(out)[0]["id"], KEY_INSTANCE)
        status, out, err = await self.ctl("list")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("cannot reach master", err)
        self.assertIn("--insecure", err)

    @defer.inlineCallbacks
    def test_events_until_interrupted(self):
        yield defer.ensureDeferred(self._events_interrupted())

    async def _events_interrupted(self):
        await self._setup()
        environment = child_env(NODEPASS_MASTER=self.master.base_url, NODEPASS_KEY=self.master.api_key)
        proc = spawn(self, ["-m", "nodepass.ctl.cli", "events"], env=environment)
        await proc.wait_for(r"initial\s+\*{8}")
        inst = await MasterClient(self.master.base_url, self.master.api_key, persistent=False).create_instance(
            single_end_url(self.echo_port)
        )
        await proc.wait_for(rf"create\s+{inst['id']}")
        proc.signal(signal.SIGINT)
        status = await proc.ended
        self.assertEqual((status, proc.err), (0, b""))

    @defer.inlineCallbacks
    def test_command_errors(self):
        yield defer.ensureDeferred(self._command_errors())

    async def _command_errors(self):
        await self._setup()
        status, out, err = await self.ctl("show", "abcdef01")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "nodepassctl: HTTP 404: Instance not found\n")

        status, _, err = await self.ctl("list", key="f" * 32)
        self.assertEqual((status, err), (1, "nodepassctl: HTTP 401: Unauthorized: Invalid API key\n"))

        status, _, err = await self.ctl("tags", KEY_INSTANCE, "novalue")
        self.assertEqual(status, 2)
        self.assertEqual(len(err.splitlines()), 1)

        # Aliases of the environment variables, and no key at all.
        env = {"NODEPASS_MASTER": "", "NODEPASS_KEY": "", "NP_MASTER_URL": self.master.base_url}
        status, _, err = await self.ctl("list", env=dict(env, NP_API_KEY=self.master.api_key))
        self.assertEqual((status, err), (0, ""))
        status, _, err = await self.ctl("list", env=env)
        self.assertEqual(status, 2)
        self.assertIn("no API key", err)


