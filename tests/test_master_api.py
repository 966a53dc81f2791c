"""The master's REST API (SPEC §8) against a real listening master, through
treq, over HTTP and HTTPS."""

from __future__ import annotations

import re
import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from nodepass.master.identity import API_KEY_ID

from tests.master_helpers import in_process, Api, start_master, wait_for

FIELDS = {
    "id", "alias", "type", "status", "url", "config", "restart", "meta",
    "mode", "ping", "pool", "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx",
}
INFO_FIELDS = {
    "mid", "alias", "os", "arch", "cpu", "mem_total", "mem_used", "swap_total", "swap_used",
    "netrx", "nettx", "diskr", "diskw", "sysup", "ver", "nodepass_py", "name", "uptime", "log", "tls", "crt", "key",
}
CORS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Allow-Methods": b"GET, PATCH, POST, PUT, DELETE, OPTIONS",
    b"Access-Control-Allow-Headers": b"Content-Type, Authorization, X-API-Key, Cache-Control",
}


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_end_url(target_port: int = 9) -> str:
    """A single-end client listening on an OS-chosen port: starts with no peer."""
    return f"client://127.0.0.1:0/127.0.0.1:{target_port}?mode=1"


class _Api:
    """The route tests, run once per scheme by the subclasses below."""

    query = ""

    async def _master(self, **kw):
        self.master = await start_master(self, self.query, **kw)
        self.api = Api(self.master, self)
        return self.master

    def assertCors(self, resp):
        for name, value in CORS.items():
            self.assertEqual(resp.headers.getRawHeaders(name), [value])

    async def _create(self, url=None, **extra):
        body = {"url": url or single_end_url()}
        body.update(extra)
        code, inst, _ = await self.api.call("POST", "/instances", body)
        self.assertEqual(code, 201, inst)
        return inst

    def test_auth_required_everywhere(self):
        async def go():
            await self._master()
            routes = [
                ("GET", "/instances"), ("POST", "/instances"), ("GET", "/instances/abcd1234"),
                ("PATCH", "/instances/abcd1234"), ("PUT", "/instances/abcd1234"),
                ("DELETE", "/instances/abcd1234"), ("GET", "/events"), ("GET", "/info"),
                ("POST", "/info"), ("GET", "/tcping?target=127.0.0.1:1"),
            ]
            for method, path in routes:
                code, body, resp = await self.api.call(method, path, key=None)
                self.assertEqual((code, body), (401, {"error": "Unauthorized: API key required"}), path)
                self.assertCors(resp)
                code, body, _ = await self.api.call(method, path, key="0" * 32)
                self.assertEqual((code, body), (401, {"error": "Unauthorized: Invalid API key"}), path)
            # public documents need no key
            code, doc, resp = await self.api.call("GET", "/openapi.json", key=None)
            self.assertEqual(code, 200)
            self.assertTrue(doc["openapi"].startswith("3.1"))
            self.assertCors(resp)
            code, _, resp = await self.api.call("GET", "/docs", key=None)
            self.assertEqual(code, 200)
            self.assertIn(b"swagger", resp.body.lower())
            m = re.search(rb'src="([^"]*swagger-ui-bundle\.js)"', resp.body)
            self.assertIsNotNone(m)
            code, _, resp = await self.api.call("GET", "/docs/static/swagger-ui-bundle.js", key=None)
            self.assertEqual(code, 200)
            self.assertGreater(len(resp.body), 10000)

        return ensureDeferred(go())

    def test_options_cors_405_404(self):
        async def go():
            await self._master()
            for path in ("/instances", "/instances/whatever", "/info", "/events", "/tcping"):
                code, _, resp = await self.api.call("OPTIONS", path, key=None)
                self.assertEqual(code, 200, path)
                self.assertCors(resp)
            for method, path in (("DELETE", "/instances"), ("POST", "/instances/" + API_KEY_ID),
                                 ("PUT", "/info"), ("POST", "/events"), ("DELETE", "/tcping")):
                code, body, resp = await self.api.call(method, path)
                self.assertEqual((code, body), (405, {"error": "Method not allowed"}), path)
                self.assertCors(resp)
            code, body, resp = await self.api.call("GET", "/nothing/here")
            self.assertEqual(code, 404)
            self.assertIn("error", body)
            self.assertCors(resp)

        return ensureDeferred(go())

    def test_create_get_list(self):
        async def go():
            master = await self._master()
            inst = await self._create(alias="first")
            self.assertEqual(set(inst), FIELDS)
            self.assertRegex(inst["id"], r"^[0-9a-f]{8}$")
            self.assertEqual(inst["type"], "client")
            self.assertEqual(inst["alias"], "first")
            self.assertIs(inst["restart"], True)
            self.assertEqual(inst["status"], "running")
            self.assertEqual(inst["meta"], {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {}})
            # Go's enhanceURL: the master's log added, the query re-encoded
            # with its keys sorted
            self.assertEqual(inst["url"], f"client://127.0.0.1:0/127.0.0.1:9?log={master.config.log}&mode=1")
            self.assertEqual(
                inst["config"],
                "client://127.0.0.1:0/127.0.0.1:9?block=0&dial=auto&dns=5m0s&log=info&min=64&mode=1"
                "&notcp=0&noudp=0&proxy=0&rate=0&read=0s&slot=65536&sni=none",
            )
            code, got, _ = await self.api.call("GET", "/instances/" + inst["id"])
            self.assertEqual(code, 200)
            self.assertEqual(got["id"], inst["id"])
            code, items, resp = await self.api.call("GET", "/instances")
            self.assertEqual(code, 200)
            self.assertEqual(resp.headers.getRawHeaders(b"content-type"), [b"application/json"])
            self.assertEqual({i["id"] for i in items}, {API_KEY_ID, inst["id"]})
            for item in items:
                self.assertEqual(set(item), FIELDS)
            key = [i for i in items if i["id"] == API_KEY_ID][0]
            self.assertEqual(key["url"], master.api_key)
            self.assertEqual((key["status"], key["restart"], key["type"]), ("", False, ""))
            self.assertRegex(key["config"], r"^[0-9a-f]{16}$")
            code, body, _ = await self.api.call("GET", "/instances/ffffffff")
            self.assertEqual((code, body), (404, {"error": "Instance not found"}))

        return ensureDeferred(go())

    def test_server_url_inherits_master_log_and_tls(self):
        async def go():
            await self._master()
            port = free_tcp_port()
            inst = await self._create(f"server://127.0.0.1:{port}/127.0.0.1:9?mode=2&log=warn")
            self.assertIn("log=warn", inst["url"])
            self.assertEqual(inst["url"].count("log="), 1)
            tls = self.master.config.tls
            if tls:
                self.assertTrue(inst["url"].endswith(f"&mode=2&tls={tls}"))
                self.assertIn(f"tls={tls}", inst["config"])
            else:
                self.assertNotIn("tls=", inst["url"])
            await self.api.call("DELETE", "/instances/" + inst["id"])

        return ensureDeferred(go())

    def test_create_errors(self):
        async def go():
            await self._master()
            cases = [
                (b"not json", 400, "Invalid request body"),
                (b"[1, 2]", 400, "Invalid request body"),
                (b"{}", 400, "Invalid request body"),
                (b'{"url": 5}', 400, "Invalid request body"),
                (b"", 400, "Invalid request body"),
                (b'{"url": "no scheme here"}', 400, "Invalid URL format"),
                (b'{"url": "client://127.0.0.1:80"}', 400, "Invalid URL format"),
                (b'{"url": "client://127.0.0.1:99999/1.2.3.4:5"}', 400, "Invalid URL format"),
                (b'{"url": "master://127.0.0.1:9090"}', 400, "Invalid URL scheme"),
                (b'{"url": "http://127.0.0.1:9090/x:1"}', 400, "Invalid URL scheme"),
            ]
            for raw, status, message in cases:
                code, body, resp = await self.api.call("POST", "/instances", raw=raw)
                self.assertEqual((code, body), (status, {"error": message}), raw)
                self.assertCors(resp)
            url = single_end_url()
            for body, needle in (
                ({"url": url, "colour": "red"}, "unknown field colour"),
                ({"url": url, "alias": 5}, "alias"),
                ({"url": url, "alias": "x" * 257}, "256"),
                ({"url": url, "restart": "yes"}, "restart"),
                ({"url": url, "meta": {"tags": {"a": 1}}}, "meta.tags"),
                ({"url": url, "meta": {"peer": {"sid": "x" * 300}}}, "256"),
                ({"url": url, "meta": {"other": {}}}, "meta"),
            ):
                code, answer, _ = await self.api.call("POST", "/instances", body)
                self.assertEqual(code, 400, body)
                self.assertIn(needle, answer["error"])
            code, _, _ = await self.api.call("POST", "/instances", raw=b'{"url": "' + b"a" * 70000 + b'"}')
            self.assertEqual(code, 413)
            code, items, _ = await self.api.call("GET", "/instances")
            self.assertEqual([i["id"] for i in items], [API_KEY_ID])  # nothing was created

        return ensureDeferred(go())

    def test_patch(self):
        async def go():
            await self._master()
            inst = await self._create()
            path = "/instances/" + inst["id"]
            code, got, _ = await self.api.call(
                "PATCH", path,
                {"alias": "web", "restart": False, "meta": {"peer": {"sid": "s-1", "type": "1"}, "tags": {"env": "prod"}}},
            )
            self.assertEqual(code, 200)
            self.assertEqual(got["alias"], "web")
            self.assertIs(got["restart"], False)
            self.assertEqual(got["meta"], {"peer": {"sid": "s-1", "type": "1", "alias": ""}, "tags": {"env": "prod"}})
            # peer {} keeps peer, tags replaces the map
            code, got, _ = await self.api.call("PATCH", path, {"meta": {"peer": {}, "tags": {"a": "b"}}})
            self.assertEqual(got["meta"], {"peer": {"sid": "s-1", "type": "1", "alias": ""}, "tags": {"a": "b"}})
            # tags {} keeps the tags; peer fields given replace theirs
            code, got, _ = await self.api.call("PATCH", path, {"meta": {"peer": {"alias": "far", "sid": ""}, "tags": {}}})
            self.assertEqual(got["meta"], {"peer": {"sid": "", "type": "1", "alias": "far"}, "tags": {"a": "b"}})
            # an explicit null empties the tags (beyond Go); the peer stays
            code, got, _ = await self.api.call("PATCH", path, {"meta": {"tags": None}})
            self.assertEqual((code, got["meta"]), (200, {"peer": {"sid": "", "type": "1", "alias": "far"}, "tags": {}}))
            code, got, _ = await self.api.call("PATCH", path, {"meta": {"tags": {"a": "b"}}})
            # a 400 applies nothing, even the valid parts
            for body in (
                {"alias": "changed", "meta": {"tags": {"k": "v" * 257}}},
                {"alias": "changed", "action": "explode"},
                {"alias": "changed", "restart": 1},
                {"alias": "changed", "bogus": True},
                {"alias": ["changed"]},
            ):
                code, answer, _ = await self.api.call("PATCH", path, body)
                self.assertEqual(code, 400, body)
            code, answer, _ = await self.api.call("PATCH", path, {"action": "explode"})
            self.assertEqual(answer, {"error": "Invalid action: explode"})
            code, answer, _ = await self.api.call("PATCH", path, raw=b"{bad")
            self.assertEqual((code, answer), (400, {"error": "Invalid request body"}))
            code, got, _ = await self.api.call("GET", path)
            self.assertEqual(got["alias"], "web")
            # actions
            code, got, _ = await self.api.call("PATCH", path, {"action": "stop"})
            self.assertEqual((code, got["status"]), (200, "stopped"))
            code, got, _ = await self.api.call("PATCH", path, {"action": "start"})
            self.assertEqual(got["status"], "running")
            code, got, _ = await self.api.call("PATCH", path, {"action": "restart"})
            self.assertEqual(got["status"], "running")
            self.master.records[inst["id"]].stats.tcp_rx = 99
            self.master.records[inst["id"]].tcprx = 99
            code, got, _ = await self.api.call("PATCH", path, {"action": "reset"})
            self.assertEqual((got["tcprx"], got["tcptx"], got["udprx"], got["udptx"]), (0, 0, 0, 0))
            code, body, _ = await self.api.call("PATCH", "/instances/00000000", {"alias": "x"})
            self.assertEqual((code, body), (404, {"error": "Instance not found"}))

        return ensureDeferred(go())

    def test_put(self):
        async def go():
            await self._master()
            inst = await self._create()
            path = "/instances/" + inst["id"]
            new_url = single_end_url(10)
            code, got, _ = await self.api.call("PUT", path, {"url": new_url})
            self.assertEqual(code, 200, got)
            self.assertEqual(got["url"], "client://127.0.0.1:0/127.0.0.1:10?log=info&mode=1")
            self.assertEqual(got["status"], "running")
            self.assertEqual(got["id"], inst["id"])
            code, body, _ = await self.api.call("PUT", path, {"url": new_url})
            self.assertEqual((code, body), (409, {"error": "Instance URL conflict"}))
            code, body, _ = await self.api.call("PUT", path, {"url": "master://1.2.3.4:5"})
            self.assertEqual((code, body), (400, {"error": "Invalid URL scheme"}))
            code, body, _ = await self.api.call("PUT", path, {"url": "client://nothing"})
            self.assertEqual((code, body), (400, {"error": "Invalid URL format"}))
            code, body, _ = await self.api.call("PUT", path, {"colour": 1})
            self.assertEqual(code, 400)
            code, got, _ = await self.api.call("PUT", path, {"action": "stop"})
            self.assertEqual((code, got["status"]), (200, "stopped"))
            code, body, _ = await self.api.call("PUT", path, {"action": "jump"})
            self.assertEqual((code, body), (400, {"error": "Invalid action: jump"}))
            code, body, _ = await self.api.call("PUT", "/instances/" + API_KEY_ID, {"url": new_url})
            self.assertEqual(code, 403)
            code, body, _ = await self.api.call("PUT", "/instances/00000000", {"url": new_url})
            self.assertEqual((code, body), (404, {"error": "Instance not found"}))

        return ensureDeferred(go())

    def test_delete(self):
        async def go():
            await self._master()
            inst = await self._create()
            path = "/instances/" + inst["id"]
            code, body, resp = await self.api.call("DELETE", path)
            self.assertEqual((code, resp.body), (204, b""))
            self.assertCors(resp)
            self.assertNotIn(inst["id"], self.master.instances)
            code, body, _ = await self.api.call("DELETE", path)
            self.assertEqual((code, body), (404, {"error": "Instance not found"}))
            code, body, _ = await self.api.call("DELETE", "/instances/" + API_KEY_ID)
            self.assertEqual((code, body), (403, {"error": "Forbidden: API Key"}))

        return ensureDeferred(go())

    def test_key_rotation(self):
        async def go():
            master = await self._master()
            old = master.api_key
            mid = master.master_id
            # only {"action": "restart"} does anything on the key instance
            code, got, _ = await self.api.call("PATCH", "/instances/" + API_KEY_ID, {"alias": "ignored"})
            self.assertEqual((code, got["url"], got["alias"]), (200, old, ""))
            code, got, _ = await self.api.call("PATCH", "/instances/" + API_KEY_ID, {"action": "restart"})
            self.assertEqual(code, 200)
            self.assertRegex(got["url"], r"^[0-9a-f]{32}$")
            self.assertNotEqual(got["url"], old)
            self.assertEqual(got["config"], mid)
            code, body, _ = await self.api.call("GET", "/instances", key=old)
            self.assertEqual((code, body), (401, {"error": "Unauthorized: Invalid API key"}))
            code, _, _ = await self.api.call("GET", "/instances", key=got["url"])
            self.assertEqual(code, 200)
            self.assertEqual(master.api_key, got["url"])

        return ensureDeferred(go())

    def test_info(self):
        async def go():
            master = await self._master()
            code, info, _ = await self.api.call("GET", "/info")
            self.assertEqual(code, 200)
            self.assertEqual(set(info), INFO_FIELDS)
            self.assertEqual(info["mid"], master.master_id)
            self.assertRegex(info["mid"], r"^[0-9a-f]{16}$")
            self.assertEqual(info["name"], "127.0.0.1")
            self.assertEqual(info["tls"], str(master.tls_code))
            self.assertEqual(info["log"], "info")
            for name in ("mem_total", "mem_used", "netrx", "nettx", "diskr", "diskw", "sysup", "uptime"):
                self.assertIsInstance(info[name], int, name)
                self.assertGreaterEqual(info[name], 0, name)
            self.assertGreater(info["mem_total"], 0)
            self.assertGreaterEqual(info["cpu"], -1)
            code, info, _ = await self.api.call("POST", "/info", {"alias": "edge-1"})
            self.assertEqual((code, info["alias"]), (200, "edge-1"))
            self.assertEqual(set(info), INFO_FIELDS)
            code, info, _ = await self.api.call("GET", "/info")
            self.assertEqual(info["alias"], "edge-1")
            code, items, _ = await self.api.call("GET", "/instances/" + API_KEY_ID)
            self.assertEqual(items["alias"], "edge-1")
            for body in ({"alias": "x" * 257}, {"alias": 3}, {}, {"alias": "a", "b": 1}):
                code, _, _ = await self.api.call("POST", "/info", body)
                self.assertEqual(code, 400, body)
            code, info, _ = await self.api.call("GET", "/info")
            self.assertEqual(info["alias"], "edge-1")

        return ensureDeferred(go())

    def test_tcping(self):
        async def go():
            master = await self._master()
            code, res, _ = await self.api.call("GET", f"/tcping?target=127.0.0.1:{master.port}")
            self.assertEqual(code, 200)
            self.assertEqual(set(res), {"target", "connected", "latency", "error"})
            self.assertEqual((res["connected"], res["error"]), (True, None))
            self.assertIsInstance(res["latency"], int)
            closed = free_tcp_port()
            code, res, _ = await self.api.call("GET", f"/tcping?target=127.0.0.1:{closed}")
            self.assertEqual((code, res["connected"]), (200, False))
            self.assertIsInstance(res["error"], str)
            code, res, _ = await self.api.call("GET", "/tcping")
            self.assertEqual((code, res), (400, {"error": "Target address required"}))
            code, res, _ = await self.api.call("GET", "/tcping?target=nonsense")
            self.assertEqual(code, 400)

        return ensureDeferred(go())

    def test_tcping_limit(self):
        async def go():
            master = await self._master()
            prober = master.domain.prober
            prober.queue_wait = 0.3
            # ten probes in flight: hold every slot of the limiter
            for _ in range(10):
                await prober.slots.acquire()
            code, res, _ = await self.api.call("GET", f"/tcping?target=127.0.0.1:{master.port}")
            self.assertEqual((code, res["connected"], res["error"]), (200, False, "too many requests"))
            # a queued probe proceeds as soon as a slot frees within the wait
            d = ensureDeferred(self.api.call("GET", f"/tcping?target=127.0.0.1:{master.port}"))
            await wait_for(lambda: prober.slots.waiting)
            prober.slots.release()
            code, res, _ = await d
            self.assertEqual((res["connected"], res["error"]), (True, None))
            for _ in range(9):
                prober.slots.release()

        return ensureDeferred(go())


class HTTPApiTests(_Api, unittest.TestCase):
    query = ""


class HTTPSApiTests(_Api, unittest.TestCase):
    """Same routes over HTTPS with the self-signed certificate (tls=1),
    verified by treq against that very certificate."""

    query = "tls=1"

    def test_https_only(self):
        async def go():
            master = await self._master()
            self.assertEqual((master.scheme, master.tls_code), ("https", 1))
            self.assertTrue(master.base_url.startswith("https://127.0.0.1:"))
            # plain HTTP to the TLS port gets no HTTP answer
            done = defer.Deferred()

            class Plain(protocol.Protocol):
                data = b""

                def connectionMade(self):
                    self.transport.write(b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\n\r\n")

                def dataReceived(self, data):
                    self.data += data

                def connectionLost(self, reason):
                    done.callback(self.data)

            from twisted.internet.endpoints import TCP4ClientEndpoint

            await TCP4ClientEndpoint(reactor, "127.0.0.1", master.port).connect(protocol.Factory.forProtocol(Plain))
            data = await done
            self.assertNotIn(b"HTTP/1.1 200", data)

        return ensureDeferred(go())

    def test_tls2_files(self):
        async def go():
            import os

            from nodepass.net.tls import generate_self_signed

            cert, key = generate_self_signed("127.0.0.1")
            d = self.mktemp()
            os.makedirs(d)
            crt_path, key_path = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
            with open(crt_path, "wb") as f:
                f.write(cert)
            with open(key_path, "wb") as f:
                f.write(key)
            self.query = f"tls=2&crt={crt_path}&key={key_path}"
            master = await self._master()
            self.assertEqual(master.tls_code, 2)
            self.assertEqual(master.credentials.cert_pem, cert)
            code, info, _ = await self.api.call("GET", "/info")
            self.assertEqual((code, info["tls"], info["crt"], info["key"]), (200, "2", crt_path, key_path))
            port = free_tcp_port()
            inst = await self._create(f"server://127.0.0.1:{port}/127.0.0.1:9?mode=2")
            # crt/key from the master, query-escaped and sorted as Go's
            # url.Values.Encode writes them
            esc = lambda p: p.replace("/", "%2F")  # noqa: E731 - mktemp paths: [A-Za-z0-9_./]
            self.assertTrue(
                inst["url"].endswith(f"?crt={esc(crt_path)}&key={esc(key_path)}&log=info&mode=2&tls=2"), inst["url"]
            )
            await self.api.call("DELETE", "/instances/" + inst["id"])

        return ensureDeferred(go())


class StartTests(unittest.TestCase):
    def test_chunked_body_over_limit(self):
        """A body without Content-Length (chunked) is capped as well."""

        async def go():
            master = await start_master(self)
            done = defer.Deferred()
            key = master.api_key.encode()

            class Chunked(protocol.Protocol):
                data = b""

                def connectionMade(self):
                    self.transport.write(
                        b"POST /api/v1/instances HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                        b"Transfer-Encoding: chunked\r\nX-API-Key: " + key + b"\r\n\r\n"
                    )
                    chunk = b"a" * 8192
                    for _ in range(10):
                        self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.transport.write(b"0\r\n\r\n")

                def dataReceived(self, data):
                    self.data += data

                def connectionLost(self, reason):
                    done.callback(self.data)

            from twisted.internet.endpoints import TCP4ClientEndpoint

            await TCP4ClientEndpoint(reactor, "127.0.0.1", master.port).connect(protocol.Factory.forProtocol(Chunked))
            data = await done
            self.assertTrue(data.startswith(b"HTTP/1.1 413 "), data[:100])
            self.assertIn(b"Request body too large", data)
            self.assertEqual(list(master.records), [])  # nothing was created

        return ensureDeferred(go())


    def test_port_in_use_fails_ready(self):
        async def go():
            from twisted.internet.endpoints import TCP4ServerEndpoint
            from twisted.internet.error import CannotListenError

            from nodepass.config.urls import parse_url
            from nodepass.base.logs import NodeLog
            from nodepass.master.service import MasterService

            from tests.master_helpers import FAST

            held = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(protocol.Factory())
            self.addCleanup(held.stopListening)
            lines = []
            log = NodeLog("info")
            log.listeners.append(lambda level, line: lines.append((level, line)))
            url = f"master://127.0.0.1:{held.getHost().port}"
            svc = MasterService(in_process(parse_url(url)), self.mktemp(), tunables=FAST, log=log)
            svc.startService()
            with self.assertRaises(CannotListenError):
                await svc.ready
            self.assertTrue(any(level == "ERROR" and "Master error" in line for level, line in lines), lines)
            await svc.stopService()

        return ensureDeferred(go())


class ErrorStatusTests(unittest.TestCase):
    """The one table of HTTP statuses: each domain error's status."""

    def test_each_domain_error_has_its_status(self):
        from nodepass.master import errors
        from nodepass.master.api import status_of

        expected = {
            errors.KeyMissing(): 401,
            errors.KeyInvalid(): 401,
            errors.InvalidRequest("Invalid request body"): 400,
            errors.InvalidURL(): 400,
            errors.InvalidURL("Invalid URL scheme"): 400,
            errors.InvalidTarget("Target address required"): 400,
            errors.KeyNotAnInstance(): 403,
            errors.InstanceNotFound(): 404,
            errors.URLConflict(): 409,
            errors.StateNotSaved("Failed to save state: disk full"): 500,
        }
        for error, status in expected.items():
            self.assertEqual(status_of(error), status, type(error).__name__)

    def test_messages_are_the_apis(self):
        from nodepass.master import errors

        self.assertEqual(errors.KeyMissing().message, "Unauthorized: API key required")
        self.assertEqual(errors.KeyInvalid().message, "Unauthorized: Invalid API key")
        self.assertEqual(errors.InvalidURL().message, "Invalid URL format")
        self.assertEqual(errors.InstanceNotFound().message, "Instance not found")
        self.assertEqual(errors.URLConflict().message, "Instance URL conflict")
        self.assertEqual(errors.KeyNotAnInstance().message, "Forbidden: API Key")
        self.assertEqual(str(errors.URLConflict()), "Instance URL conflict")

    def test_an_unlisted_error_is_a_500(self):
        from nodepass.master.api import status_of
        from nodepass.master.errors import InvalidRequest, MasterError

        class Unforeseen(MasterError):
            pass

        class Narrower(InvalidRequest):
            pass

        self.assertEqual(status_of(Unforeseen("?")), 500)
        self.assertEqual(status_of(Narrower("?")), 400)  # the nearest listed base class decides


class MappingTests(unittest.TestCase):
    """Domain errors through real HTTP, and the mount at ``{prefix}/v1``."""

    def test_failed_save_is_a_500_and_changes_nothing(self):
        async def go():
            master = await start_master(self)
            api = Api(master, self)
            code, inst, _ = await api.call("POST", "/instances", {"url": single_end_url(), "alias": "kept"})
            self.assertEqual(code, 201, inst)

            def full(state):
                raise OSError(28, "No space left on device")

            self.patch(master.store, "save", full)
            for method, path, body in (
                ("PATCH", "/instances/" + inst["id"], {"alias": "lost"}),
                ("POST", "/instances", {"url": single_end_url()}),
                ("POST", "/info", {"alias": "lost"}),
                ("PATCH", "/instances/" + API_KEY_ID, {"action": "restart"}),
            ):
                code, body, resp = await api.call(method, path, body)
                self.assertEqual((code, body), (500, {"error": "Failed to save state: No space left on device"}), path)
                self.assertEqual(resp.headers.getRawHeaders(b"Access-Control-Allow-Origin"), [b"*"])
            code, items, _ = await api.call("GET", "/instances")
            self.assertEqual([(i["id"], i["alias"]) for i in items], [(API_KEY_ID, ""), (inst["id"], "kept")])

        return ensureDeferred(go())

    def test_paths_match_as_routes_written_in_full(self):
        """The app is mounted at ``{prefix}/v1``; a path is matched there as
        the routes written out in full matched it (``%2F`` is a slash,
        leading slashes do not count, ``//`` inside is no route), and a
        static asset is looked up from Twisted's own split of the path.
        The statuses are the ones the master answered before the mount."""
        from twisted.internet import threads

        from tests.master_helpers import Wire

        async def go():
            master = await start_master(self)
            wire = Wire(master)
            cases = [
                ("/api/v1/instances", 200),
                ("/api%2Fv1/instances", 200),
                ("//api/v1/instances", 200),
                ("///api/v1/instances", 200),
                ("/api/v1%2Finstances", 200),
                ("/api/v1/instances/", 200),
                ("/api/v1//instances", 404),
                ("/api//v1/instances", 404),
                ("/API/v1/instances", 404),
                ("/api/v1x/instances", 404),
                ("/instances", 404),
                ("/api/v1", 404),
                ("/api/v1/", 404),
                ("/api/v1/docs/static/swagger-ui.css", 200),
                ("/api/v1/docs/static%2Fswagger-ui.css", 404),
                ("//api/v1/docs/static/swagger-ui.css", 404),
                ("/api%2Fv1/docs/static/swagger-ui.css", 404),
                ("/api%2Fv1/docs/static/a/swagger-ui.css", 200),
            ]

            def run():
                return [(path, wire.call("GET", path, absolute=True)[0]) for path, _ in cases]

            self.assertEqual(await threads.deferToThread(run), cases)
            status, headers, data = await threads.deferToThread(wire.call, "OPTIONS", "/api/v1//instances", None, None, None, True)
            self.assertEqual((status, headers.get("access-control-allow-origin")), (200, "*"))
            status, _, data = await threads.deferToThread(wire.call, "OPTIONS", "/api/v1/a%0Ab", None, None, None, True)
            self.assertEqual((status, data), (404, b'{"error":"Not found"}'))  # no rule matches a newline

        return ensureDeferred(go())
