"""The treq client library (nodepass.ctl.client) and the ``nodepassctl``
command, against a real MasterService listening on an OS-chosen port."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from nodepass.base.logs import NodeLog
from tests.master_helpers import in_process
from nodepass.config.urls import Tunables, parse_url
from nodepass.ctl import cli
from nodepass.ctl.client import KEY_INSTANCE, MasterAPIError, MasterClient
from nodepass.master.service import MasterService
from tests import helpers, master_helpers
from tests.procs import child_env, spawn

TUNABLES = Tunables(report_interval=0.2, service_cooldown=0.2, shutdown_timeout=1.0)


async def start_master(test: unittest.TestCase, url: str = "master://127.0.0.1:0") -> MasterService:
    svc = MasterService(in_process(parse_url(url)), test.mktemp(), tunables=TUNABLES)
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




def columns(header: str, row: str, names) -> dict:
    """A table row cut at its header's column starts (cells may be empty)."""
    tokens = list(re.finditer(r"\S+", header))
    assert [t.group() for t in tokens] == list(names), header
    starts = [t.start() for t in tokens]
    ends: list = starts[1:] + [None]
    return {name: row[start:end].strip() for name, start, end in zip(names, starts, ends)}


class MasterStartLinesTests(unittest.TestCase):
    """The master names, at start, the URLs a person opens and the file it
    keeps its state in -- one INFO line each, after its start line."""

    async def _lines(self, query: str = "", prefix: str = "") -> tuple[MasterService, list[str]]:
        log = NodeLog("info")
        lines: list[str] = []
        log.listeners.append(lambda level, line: lines.append(f"{level} {line}"))
        master = await master_helpers.start_master(self, query, prefix=prefix, log=log)
        return master, lines

    @staticmethod
    def _message(lines: list[str], start: str) -> tuple[int, str]:
        found = [(i, line) for i, line in enumerate(lines) if re.search(r"  INFO  " + re.escape(start), line)]
        assert len(found) == 1, (start, lines)
        index, line = found[0]
        return index, line.split("  INFO  ", 1)[1]

    @defer.inlineCallbacks
    def test_console_docs_and_state_file(self):
        yield defer.ensureDeferred(self._plain())

    async def _plain(self):
        master, lines = await self._lines()
        port = master.port
        started, _ = self._message(lines, "Master started: ")
        console, text = self._message(lines, "Console: ")
        self.assertEqual(text, f"Console: http://127.0.0.1:{port}/api/")
        docs, text = self._message(lines, "API docs: ")
        self.assertEqual(text, f"API docs: http://127.0.0.1:{port}/api/v1/docs")
        state, text = self._message(lines, "State file: ")
        self.assertEqual(text, f"State file: {master.store.path}")
        self.assertTrue(os.path.isabs(master.store.path))
        self.assertLess(started, console)
        self.assertEqual([console, docs, state], [console, console + 1, console + 2])
        # The key is in its own start-up line and nowhere else.
        with_key = [line for line in lines if master.api_key in line]
        self.assertEqual(len(with_key), 1, with_key)
        self.assertIn("  INFO  API Key created: ", with_key[0])
        # And the docs URL it names is served.
        api = master_helpers.Api(master, self)
        response = await api.client.get(f"http://127.0.0.1:{port}/api/v1/docs")
        self.assertEqual(response.code, 200)
        await response.content()

    @defer.inlineCallbacks
    def test_tls_and_prefix(self):
        yield defer.ensureDeferred(self._tls_prefix())

    async def _tls_prefix(self):
        master, lines = await self._lines("tls=1", prefix="/np")
        self.assertEqual(self._message(lines, "Console: ")[1], f"Console: https://127.0.0.1:{master.port}/np/")
        self.assertEqual(self._message(lines, "API docs: ")[1], f"API docs: https://127.0.0.1:{master.port}/np/v1/docs")


class InProcessCommandTests(unittest.TestCase):
    """``nodepassctl`` run in this process through :func:`cli.execute`
    (parse, run, error line, exit status) against a real master."""

    async def _setup(self, url: str = "master://127.0.0.1:0"):
        self.master = await start_master(self, url)
        port, _ = helpers.listen_echo()
        self.addCleanup(port.stopListening)
        self.echo_port = port.getHost().port

    async def ctl(self, *argv: str, env: dict | None = None, out: io.StringIO | None = None) -> tuple[int, str, str]:
        """Exit status, stdout and stderr of one command."""
        environ = {"NODEPASS_MASTER": self.master.base_url, "NODEPASS_KEY": self.master.api_key}
        environ.update(env or {})
        out = io.StringIO() if out is None else out
        err = io.StringIO()
        code = await cli.execute(reactor, list(argv), environ, out, err)
        text = err.getvalue()
        self.assertNotIn(self.master.api_key, out.getvalue() if argv[:1] != ("--json",) else "")
        self.assertNotIn(self.master.api_key, text)
        self.assertNotIn("Traceback", text)
        if code:
            self.assertEqual(len(text.splitlines()), 1, text)
            self.assertTrue(text.startswith("nodepassctl: "), text)
        return code, out.getvalue(), text

    async def create(self, url: str, **fields) -> dict:
        async with MasterClient(self.master.base_url, self.master.api_key) as c:
            inst = await c.create_instance(url)
            if fields:
                inst = await c.patch_instance(inst["id"], **fields)
            return inst

    # -- errors -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_400_reason_passed_on(self):
        yield defer.ensureDeferred(self._reason_400())

    async def _reason_400(self):
        await self._setup()
        for url in ("server://nonsense", "ftp://1.2.3.4:5/6.7.8.9:10", "server://:99999/1.2.3.4:5"):
            async with MasterClient(self.master.base_url, self.master.api_key) as c:
                status, _, body = await c.raw_request("POST", "/instances", json.dumps({"url": url}).encode())
            self.assertEqual(status, 400, url)
            reason = json.loads(body)["error"]
            code, out, err = await self.ctl("create", url)
            self.assertEqual((code, out, err), (1, "", f"nodepassctl: HTTP 400: {reason}\n"))
        inst = await self.create(single_end_url(self.echo_port))
        code, _, err = await self.ctl("url", inst["id"], "server://")
        self.assertEqual(code, 1)
        self.assertRegex(err, r"^nodepassctl: HTTP 400: Invalid ")
        # The master's words for why, whatever they quote, on one line.
        code, _, err = await self.ctl("alias", inst["id"], "x" * 300)
        self.assertEqual((code, err), (1, "nodepassctl: HTTP 400: Invalid alias: at most 256 characters\n"))
        code, _, err = await self.ctl("alias", inst["id"], "two\nlines")
        self.assertEqual(code, 1)
        self.assertRegex(err, r"^nodepassctl: HTTP 400: Invalid alias: .+\n$")

    @defer.inlineCallbacks
    def test_404_at_wrong_prefix(self):
        yield defer.ensureDeferred(self._wrong_prefix())

    async def _wrong_prefix(self):
        await self._setup()
        bare = f"http://127.0.0.1:{self.master.port}"
        for base in (bare, bare + "/", bare + "/nodepass"):
            for argv in (["list"], ["info"], ["show", "abcdef01"], ["events", "--count", "1"], ["top", "--once"]):
                code, out, err = await self.ctl(*argv, env={"NODEPASS_MASTER": base})
                self.assertEqual((code, out), (1, ""), (base, argv))
                root = base.rstrip("/") + "/v1"
                self.assertIn(f"no NodePass API at {root}", err)
                self.assertIn(f"/api/v1 by default: {bare}/api", err)
                self.assertIn("set NODEPASS_MASTER (or --master) to the master URL with its prefix", err)
        # At the right prefix a 404 is still the master's own answer.
        code, _, err = await self.ctl("show", "abcdef01")
        self.assertEqual((code, err), (1, "nodepassctl: HTTP 404: Instance not found\n"))

    @defer.inlineCallbacks
    def test_https_against_plain_master(self):
        yield defer.ensureDeferred(self._https_to_http())

    async def _https_to_http(self):
        await self._setup()
        hostport = f"127.0.0.1:{self.master.port}"
        wrong = f"https://{hostport}/api"
        for argv in (["list"], ["events", "--count", "1"]):
            began = time.monotonic()
            code, out, err = await self.ctl("--timeout", "2", *argv, env={"NODEPASS_MASTER": wrong})
            self.assertEqual((code, out), (1, ""))
            self.assertIn(f"the master does not speak TLS at {hostport}: use http://{hostport}/api", err)
            self.assertLess(time.monotonic() - began, 5)  # handshake deadline (1 s) + probe, not the timeout

    @defer.inlineCallbacks
    def test_http_against_tls_master(self):
        yield defer.ensureDeferred(self._http_to_https())

    async def _http_to_https(self):
        await self._setup("master://127.0.0.1:0?tls=1")
        hostport = f"127.0.0.1:{self.master.port}"
        code, out, err = await self.ctl("list", env={"NODEPASS_MASTER": f"http://{hostport}/api"})
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"the master speaks TLS at {hostport}: use https://{hostport}/api", err)
        self.assertIn("--insecure", err)
        code, out, err = await self.ctl("--insecure", "list")
        self.assertEqual((code, err), (0, ""))

    @defer.inlineCallbacks
    def test_usage_errors_are_one_line(self):
        yield defer.ensureDeferred(self._usage())

    async def _usage(self):
        await self._setup()
        for argv in (["nonsense"], ["show"], ["policy", "abcdef01", "maybe"], ["top", "--interval", "0"], ["--timeout", "x", "list"]):
            code, out, err = await self.ctl(*argv)
            self.assertEqual((code, out), (2, ""), argv)
        code, _, err = await self.ctl("list", env={"NODEPASS_MASTER": "ftp://x"})
        self.assertEqual(code, 2)
        self.assertIn("must start with http:// or https://", err)

    # -- what is shown ------------------------------------------------------

    @defer.inlineCallbacks
    def test_show_error_line(self):
        yield defer.ensureDeferred(self._error_line())

    async def _error_line(self):
        await self._setup()
        # A dual-end client whose server is not there: each run ends in
        # "Client error: ..." and the instance is in error.
        url = f"client://127.0.0.1:{helpers.dead_port()}/127.0.0.1:{self.echo_port}?mode=2&log=error"
        inst = await self.create(url)
        iid = inst["id"]
        await helpers.wait_for(lambda: self.master.records[iid].status == "error", timeout=10, what="instance in error")
        code, out, err = await self.ctl("show", iid)
        self.assertEqual((code, err), (0, ""))
        fields = dict(line.split(None, 1) for line in out.splitlines() if " " in line.strip())
        self.assertEqual(fields["status"].strip(), "error")
        self.assertRegex(fields["error"], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  ERROR  Client error: ")
        lines = out.splitlines()
        self.assertEqual(lines.index(next(l for l in lines if l.startswith("error "))), 1 + lines.index(
            next(l for l in lines if l.startswith("status "))
        ))
        # --json stays the master's answer; --error-wait 0 does not listen.
        code, out, _ = await self.ctl("--json", "show", iid)
        self.assertNotIn("error_line", json.loads(out))
        code, out, _ = await self.ctl("show", iid, "--error-wait", "0")
        self.assertIn("keeps no error text", out)
        # A running instance has no error line.
        ok = await self.create(single_end_url(self.echo_port))
        code, out, _ = await self.ctl("show", ok["id"])
        self.assertNotRegex(out, r"(?m)^error ")

    @defer.inlineCallbacks
    def test_restart_and_tags_columns(self):
        yield defer.ensureDeferred(self._columns())

    async def _columns(self):
        await self._setup()
        a = await self.create(single_end_url(self.echo_port))
        b = await self.create(single_end_url(self.echo_port), restart=False)
        code, _, _ = await self.ctl("tags", a["id"], "env=prod", "team=net")
        self.assertEqual(code, 0)
        code, out, _ = await self.ctl("list")
        self.assertEqual(code, 0)
        header, *rows = out.splitlines()
        self.assertEqual(header.split(), list(cli.INSTANCE_COLUMNS))

        def cell(row: str, column: str) -> str:
            return columns(header, row, cli.INSTANCE_COLUMNS)[column]

        row_a = next(r for r in rows if r.startswith(a["id"]))
        row_b = next(r for r in rows if r.startswith(b["id"]))
        key_row = next(r for r in rows if r.startswith(KEY_INSTANCE))
        self.assertEqual((cell(row_a, "RESTART"), cell(row_b, "RESTART"), cell(key_row, "RESTART")), ("yes", "no", ""))
        self.assertEqual((cell(row_a, "TAGS"), cell(row_b, "TAGS")), ("env=prod,team=net", ""))
        code, out, _ = await self.ctl("show", b["id"])
        self.assertRegex(out, r"(?m)^restart\s+no$")
        code, out, _ = await self.ctl("policy", b["id"], "on")
        code, out, _ = await self.ctl("show", b["id"])
        self.assertRegex(out, r"(?m)^restart\s+yes$")

    @defer.inlineCallbacks
    def test_info_human_sizes(self):
        yield defer.ensureDeferred(self._info())

    async def _info(self):
        await self._setup()
        code, out, _ = await self.ctl("info")
        self.assertEqual(code, 0)
        fields = dict((line.split(None, 1) + [""])[:2] for line in out.splitlines())
        for name in cli.INFO_SIZES:
            self.assertRegex(fields[name], r"^\d+ \(\d+(\.\d)? (B|KiB|MiB|GiB|TiB)\)$", name)
        self.assertRegex(fields["mem_total"], r"(MiB|GiB|TiB)\)$")  # a machine has more than a few KiB
        self.assertEqual(fields["mid"], self.master.master_id)
        self.assertEqual(cli.human_bytes(1536), "1.5 KiB")
        self.assertEqual(cli.human_bytes(3 * 1024**3), "3.0 GiB")

    @defer.inlineCallbacks
    def test_tags_clear(self):
        yield defer.ensureDeferred(self._tags_clear())

    async def _tags_clear(self):
        await self._setup()
        inst = await self.create(single_end_url(self.echo_port))
        iid = inst["id"]
        # Neither pairs nor --clear (it used to send {}, a silent no-op), or both: usage.
        self.assertEqual((await self.ctl("tags", iid))[0], 2)
        self.assertEqual((await self.ctl("tags", iid, "a=b", "--clear"))[0], 2)
        # No tags: clearing is trivially done.
        code, out, err = await self.ctl("tags", iid, "--clear")
        self.assertEqual((code, out, err), (0, f"{iid}: no tags\n", ""))
        code, out, _ = await self.ctl("tags", iid, "env=prod")
        self.assertEqual((code, self.master.records[iid].meta["tags"]), (0, {"env": "prod"}))
        # An empty map means "no change" (as to Go's master); --clear sends
        # an explicit null, which empties the map.
        code, out, err = await self.ctl("tags", iid, "--clear")
        self.assertEqual((code, err), (0, ""), err)
        self.assertEqual(self.master.records[iid].meta["tags"], {})

    # -- top ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_top_once_with_rates(self):
        yield defer.ensureDeferred(self._top_once())

    async def _top_once(self):
        await self._setup()
        entry = helpers.free_port()
        inst = await self.create(f"client://127.0.0.1:{entry}/127.0.0.1:{self.echo_port}?mode=1&log=warn")
        iid = inst["id"]
        await helpers.wait_for(lambda: iid in self.master.instances and self.master.records[iid].last_report, timeout=10)
        user = await helpers.connect(entry)
        chunk = b"x" * 8192

        def pump() -> None:
            user.transport.write(chunk)

        loop = task.LoopingCall(pump)
        loop.start(0.02)
        try:
            code, out, err = await self.ctl("top", "--once", "--interval", "1.5")
        finally:
            loop.stop()
            await helpers.close(user)
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("\x1b", out)
        head, header, *rows = out.splitlines()
        self.assertRegex(head, r"^\d\d:\d\d:\d\d  http://127\.0\.0\.1:\d+/api/v1  1 instance$")
        self.assertEqual(header.split(), list(cli.TOP_COLUMNS))
        self.assertEqual(len(rows), 1)  # the API key's row is not a tunnel
        row = columns(header, rows[0], cli.TOP_COLUMNS)
        self.assertEqual((row["ID"], row["ALIAS"], row["TYPE"], row["STATUS"]), (iid, "", "client", "running"))
        for name in ("RX/s", "TX/s"):
            self.assertRegex(row[name], r"^\d+(\.\d)? (B|KiB|MiB|GiB)/s$", row)
        self.assertNotEqual(row["RX/s"], "0 B/s", row)  # bytes moved during the interval

    @defer.inlineCallbacks
    def test_top_tables_and_terminal(self):
        yield defer.ensureDeferred(self._top_tables())

    async def _top_tables(self):
        await self._setup()
        inst = await self.create(single_end_url(self.echo_port), alias="web")
        # Not a terminal: one table after another, a blank line between.
        code, out, err = await self.ctl("top", "--count", "2", "--interval", "0.3")
        self.assertEqual((code, err), (0, ""))
        tables = out.split("\n\n")
        self.assertEqual(len(tables), 2)
        for text in tables:
            lines = text.strip("\n").splitlines()
            self.assertEqual(lines[1].split(), list(cli.TOP_COLUMNS))
            self.assertTrue(lines[2].startswith(f"{inst['id']}  web"), lines)

        # A terminal: each table redrawn in place.
        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        screen = Terminal()
        code, _, _ = await self.ctl("top", "--count", "2", "--interval", "0.2", out=screen)
        self.assertEqual(code, 0)
        frames = screen.getvalue().split(cli.CLEAR_SCREEN)
        self.assertEqual(frames[0], "")
        self.assertEqual(len(frames), 3)
        self.assertIn("RX/s", frames[2])

    @defer.inlineCallbacks
    def test_top_follows_changes_and_stops_with_master(self):
        yield defer.ensureDeferred(self._top_follows())

    async def _top_follows(self):
        await self._setup()
        first = await self.create(single_end_url(self.echo_port))
        out, err = io.StringIO(), io.StringIO()
        environ = {"NODEPASS_MASTER": self.master.base_url, "NODEPASS_KEY": self.master.api_key}
        running = defer.ensureDeferred(cli.execute(reactor, ["top", "--interval", "0.2"], environ, out, err))
        await helpers.wait_for(lambda: first["id"] in out.getvalue(), timeout=5, what="first table")
        second = await self.create(single_end_url(self.echo_port))
        await helpers.wait_for(lambda: second["id"] in out.getvalue(), timeout=5, what="the new instance shown")
        async with MasterClient(self.master.base_url, self.master.api_key) as c:
            await c.delete_instance(first["id"])
        await helpers.wait_for(
            lambda: first["id"] not in out.getvalue().split("\n\n")[-1] and "1 instance\n" in out.getvalue().split("\n\n")[-1],
            timeout=5,
            what="the deleted instance gone",
        )
        await self.master.stopService()
        code = await running
        self.assertEqual(code, 1)
        self.assertEqual(err.getvalue(), "nodepassctl: the master closed the event stream (it stopped, or its API key was rotated)\n")


class TopInterruptTests(unittest.TestCase):
    """``nodepassctl top`` as a subprocess: Ctrl-C ends it cleanly."""

    @defer.inlineCallbacks
    def test_ctrl_c(self):
        yield defer.ensureDeferred(self._ctrl_c())

    async def _ctrl_c(self):
        master = await start_master(self)
        environment = child_env(NODEPASS_MASTER=master.base_url, NODEPASS_KEY=master.api_key)
        proc = spawn(self, ["-m", "nodepass.ctl.cli", "top", "--interval", "0.2"], env=environment)
        await proc.wait_for(r"RX/s[^\n]*\n(.|\n)*RX/s")  # at least two tables
        proc.signal(signal.SIGINT)
        status = await proc.ended
        self.assertEqual((status, proc.err), (0, b""))
        self.assertNotIn("\x1b", proc.out.decode())  # a pipe, not a terminal
