"""Hostile input against a real master: text that is not text (lone
surrogates, control characters), ports that are not numbers, bodies that are
not JSON or nest 10,000 deep, methods in the wrong case, request heads too
big to parse.

Every test runs a real MasterService on 127.0.0.1 port 0 with its state in a
temporary directory, and talks to it over real sockets: the blocking
``http.client`` (or a raw socket) in a worker thread, so the reactor keeps
serving while the test waits.  The invariants checked throughout:

* no answer is a 5xx, every refusal is ``{"error": ...}`` JSON with CORS
  headers, and the master keeps answering;
* a refused request changes nothing: ``GET /instances`` and the state file's
  bytes are the same before and after;
* every log line written is one physical line in SPEC §7 form, with no
  control character in it, and the API key shows only in the start-up line.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import threads
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from nodepass.config.urls import Tunables, text_problem
from nodepass.master.site import MAX_HEADERS, MAX_LINE
from nodepass.master.identity import API_KEY_ID

from tests import examples, helpers
from tests.master_helpers import LOG_LINE, Api, LogCapture, SSEClient, Wire, assert_refusal, start_master

# Long report interval: no CHECK_POINT, watchdog or counter save moves the
# state while a test compares it before and after a request.
QUIET = Tunables(report_interval=30.0, service_cooldown=0.1, shutdown_timeout=2.0, tcp_dial_timeout=1.0)
SURROGATE_ESCAPES = (r"\ud800", r"\udfff", r"\udc00x", r"a\ud83d")  # as written inside JSON strings
CONTROLS = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029"]
DEEP = 10_000


def pct(text: str) -> str:
    """Percent-encoded, lone surrogates included (as the bytes a careless
    encoder would write for them)."""
    return quote(text, safe="", errors="surrogatepass")


def forged_lines(capture: LogCapture) -> list[str]:
    """Log lines an attacker wrote: a whole line whose message is theirs."""
    return [line for line in capture.lines() if (LOG_LINE.match(line) or [None] * 3)[2] == "forged"]


def deep_list(depth: int = DEEP) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int = DEEP) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def check_log(case: unittest.TestCase, capture: LogCapture, key: str) -> None:
    """Every line is one SPEC §7 line holding no control character, and the
    API key appears in the start-up announcement only."""
    for line in capture.lines():
        case.assertIsNotNone(LOG_LINE.match(line), line)
        case.assertIsNone(text_problem(line), line)
        if key in line:
            case.assertRegex(line, r"  INFO  API Key (created|loaded): [0-9a-f]{32}$")


async def hostile_master(case, **kw):
    """A master with one stopped single-end instance, its Wire and the log
    capture that was listening from before it started."""
    capture = LogCapture(case)
    master = await start_master(case, tunables=QUIET, **kw)
    api = Api(master, case)
    code, inst, _ = await api.call("POST", "/instances", {"url": f"client://127.0.0.1:0/127.0.0.1:{helpers.dead_port()}?mode=1"})
    case.assertEqual(code, 201, inst)
    code, inst, _ = await api.call("PATCH", f"/instances/{inst['id']}", {"action": "stop", "alias": "fixture"})
    case.assertEqual((code, inst["status"]), (200, "stopped"))
    return master, Wire(master), api, capture, inst["id"]


class RefusedTextTests(unittest.TestCase):
    """Issue items 1 and 3: text fields and URLs."""

    def _refused_unchanged(self, wire: Wire, requests):
        """Send each ``(method, path, body bytes)``; each must be a 400 and
        leave the snapshot as it was."""
        before = wire.snapshot()
        messages = []
        for method, path, body in requests:
            status, headers, data = wire.call(method, path, body, headers={"Content-Type": "application/json"})
            messages.append(assert_refusal(status, headers, data, f"{method} {path} {body[:120]!r}", 400))
            after = wire.snapshot()
            assert after == before, f"{method} {path} {body[:120]!r} changed the state"
        return messages

    def test_lone_surrogates_refused(self):
        async def go():
            master, wire, api, capture, rid = await hostile_master(self)
            dead = helpers.dead_port()
            requests = []
            for esc in SURROGATE_ESCAPES:
                text = f'"{esc}"'
                url = f'"client://127.0.0.1:0/127.0.0.1:{dead}?mode=1"'
                for path, method, extra in (
                    ("/instances", "POST", f'"url": {url}, '),
                    (f"/instances/{rid}", "PATCH", ""),
                    (f"/instances/{API_KEY_ID}", "PATCH", ""),
                ):
                    for field in (
                        f'"alias": {text}',
                        f'"meta": {{"tags": {{{text}: "v"}}}}',
                        f'"meta": {{"tags": {{"k": {text}}}}}',
                        f'"meta": {{"peer": {{"sid": {text}}}}}',
                        f'"meta": {{"peer": {{"type": "t", "alias": {text}}}}}',
                    ):
                        requests.append((method, path, ("{" + extra + field + "}").encode()))
                requests.append(("POST", "/info", ('{"alias": ' + text + "}").encode()))
                requests.append(("POST", "/instances", ('{"url": "client://127.0.0.1:0/127.0.0.1:1' + esc + '"}').encode()))
                requests.append(("PUT", f"/instances/{rid}", ('{"url": "client://127.0.0.1:0/' + esc + ':1"}').encode()))
                requests.append(("PATCH", f"/instances/{rid}", ('{"action": ' + text + "}").encode()))
                requests.append(("PATCH", f"/instances/{rid}", ('{"alias": "ok", ' + text + ": 1}").encode()))
            messages = await threads.deferToThread(self._refused_unchanged, wire, requests)
            self.assertIn("Invalid alias: not valid UTF-8 text (lone surrogate U+D800)", messages)
            # Nothing was stored, so every reader still works.
            for path in ("/instances", f"/instances/{rid}", "/info"):
                code, body, _ = await api.call("GET", path)
                self.assertEqual(code, 200, (path, body))
            sse = await SSEClient(api).connect()
            self.assertEqual(sse.response.code, 200)
            await sse.event(lambda d: d["type"] == "initial" and d["instance"]["id"] == rid, what="the fixture's initial event")
            check_log(self, capture, master.api_key)

        return ensureDeferred(go())

    def test_control_characters_refused(self):
        async def go():
            master, wire, api, capture, rid = await hostile_master(self)
            dead = helpers.dead_port()
            base = f"client://127.0.0.1:0/127.0.0.1:{dead}?mode=1"
            requests = []
            for char in CONTROLS:
                forged = f"{char}2026-01-01 00:00:00.000  ERROR  forged"
                enc = json.dumps(char)[1:-1]
                for url in (base + forged, base + "&log=" + forged, f"client://127.0.0.1:0{forged}/127.0.0.1:{dead}",
                            base + "&x=" + pct(char), f"client://127.0.0.1:0/127.0.0.1{pct(char)}:{dead}", char + base,
                            base + char):
                    requests.append(("POST", "/instances", json.dumps({"url": url}).encode()))
                    requests.append(("PUT", f"/instances/{rid}", json.dumps({"url": url}).encode()))
                for body in ({"alias": forged}, {"meta": {"tags": {"k" + char: "v"}}}, {"meta": {"tags": {"k": char}}},
                             {"meta": {"peer": {"sid": char}}}, {"meta": {"peer": {"alias": forged}}}):
                    requests.append(("PATCH", f"/instances/{rid}", json.dumps(body).encode()))
                    requests.append(("POST", "/instances", json.dumps(dict(body, url=base)).encode()))
                requests.append(("POST", "/info", json.dumps({"alias": forged}).encode()))
                requests.append(("PATCH", f"/instances/{rid}", ('{"action": "stop' + enc + '"}').encode()))
            messages = await threads.deferToThread(self._refused_unchanged, wire, requests)
            self.assertIn("Invalid URL format", messages)
            self.assertIn("Invalid alias: control character U+000A not allowed", messages)
            self.assertIn("Invalid meta.tags: key control character U+2028 not allowed", messages)
            self.assertTrue(any(m.startswith(r"Invalid action: stop\n") for m in messages), messages)
            self.assertNotIn("forged", capture.text())  # refusals log nothing
            check_log(self, capture, master.api_key)

        return ensureDeferred(go())

    def test_bad_ports_and_targets(self):
        """Issue item 2 through the API: 400s, never a 500."""

        async def go():
            master, wire, api, capture, rid = await hostile_master(self)
            dead = helpers.dead_port()
            ports = ["²", "٨٠", "9" * 5000, "+80", " 80", "8 0", "1_0", "0x50", "65536", "-1", "", "8" * 100]
            bad_urls = []
            for port in ports:
                bad_urls.append(f"client://127.0.0.1:{port}/127.0.0.1:{dead}")
                bad_urls.append(f"client://127.0.0.1:0/127.0.0.1:{port}")
            bad_urls.append(f"client://127.0.0.1:0/127.0.0.1:{dead}?mode=1&dns={'9' * 400}h")  # warns, not refused

            def run():
                for port in ports + ["0", "%0a80", "80%0a", "%ff", "%C2%B2"]:
                    path = "/tcping?target=" + quote(f"127.0.0.1:{port}", safe="%", errors="surrogatepass")
                    status, headers, data = wire.call("GET", path)
                    message = assert_refusal(status, headers, data, path, 400)
                    assert message.startswith("Invalid target address: "), message
                before = wire.snapshot()
                created = 0
                for url in bad_urls:
                    status, headers, data = wire.call("POST", "/instances", json.dumps({"url": url}).encode())
                    assert status < 500, (status, url[:100], data[:300])
                    if status == 201:
                        created += 1
                        config = json.loads(data)["config"]
                        assert "dns=5m0s" in config, config  # the default, not an overflow
                        continue
                    assert_refusal(status, headers, data, url[:100], 400)
                    status, headers, data = wire.call("PUT", f"/instances/{rid}", json.dumps({"url": url}).encode())
                    assert_refusal(status, headers, data, url[:100], 400)
                assert created == 1, created
                return before

            before = await threads.deferToThread(run)
            listed = json.loads(before[0])
            self.assertEqual(len(listed), 2)
            check_log(self, capture, master.api_key)

        return ensureDeferred(go())


class BodyTests(unittest.TestCase):
    """Non-UTF-8, malformed, non-standard and deeply nested JSON."""

    def test_bad_bodies_refused(self):
        async def go():
            master, wire, api, capture, rid = await hostile_master(self)
            bodies = [
                b"\xff\xfe{}", b'{"alias": "\xff"}', b'{"alias": "\xed\xa0\x80"}', b'{"alias": "\xc0\xaf"}',
                b"\xef\xbb\xbf{}", b"{", b"", b"[]", b"null", b'"text"', b"NaN", b'{"alias": NaN}',
                b'{"restart": Infinity}', b'{"restart": -Infinity}', b'{"alias": 1' + b"0" * 5000 + b"}",
                b'{"restart": 1e999999}', b'{"alias": "a"} trailing', b'{"alias" "a"}', b"{'alias': 'a'}",
                deep_list(), deep_object(), b'{"alias": ' + deep_list() + b"}", b'{"meta": ' + deep_object() + b"}",
                b'{"action": ' + deep_list(900) + b"}", b'{"meta": {"tags": ' + deep_list(900) + b"}}",
                b"{" * 5000, b'{"alias": "' + b"x" * 70_000 + b'"}',
            ]
            routes = [("POST", "/instances"), ("PATCH", f"/instances/{rid}"), ("PUT", f"/instances/{rid}"),
                      ("POST", "/info"), ("PATCH", f"/instances/{API_KEY_ID}")]

            def run():
                before = wire.snapshot()
                for body in bodies:
                    for method, path in routes:
                        status, headers, data = wire.call(method, path, body)
                        assert_refusal(status, headers, data, f"{method} {path} {body[:60]!r}")
                assert wire.snapshot() == before

            await threads.deferToThread(run)
            check_log(self, capture, master.api_key)

        return ensureDeferred(go())


class StateRepairTests(unittest.TestCase):
    """A state file already holding bad text loads, repaired and logged."""

    def test_bad_text_in_state_file_is_repaired(self):
        async def go():
            state_dir = self.mktemp()
            os.makedirs(state_dir)
            good_url = f"client://127.0.0.1:0/127.0.0.1:{helpers.dead_port()}?mode=1&log=info"
            items = [
                {"id": "0a0b0c0d", "url": good_url, "alias": "\ud800web", "restart": False,
                 "meta": {"peer": {"sid": "s\udfff", "type": "\n", "alias": "ok"},
                          "tags": {"k\u2028": "v", "fine": "x\x1by", "same": "1", "same\x00": "2"}}},
                {"id": "0e0e0e0e", "url": good_url + "\n2026-01-01 00:00:00.000  ERROR  forged", "restart": False},
                {"id": "0f0f0f0f", "url": "client://127.0.0.1:\ud800/127.0.0.1:1", "restart": False},
            ]
            path = os.path.join(state_dir, "nodepass.json")
            # json.dump writes the surrogates as \\udXXX escapes, as an older
            # version that accepted them did.
            with open(path, "w") as f:
                json.dump({"api_key": "ab" * 16, "master_id": "cd" * 8, "alias": "m\naster", "instances": items}, f)
            for round_ in range(2):  # and again from the state the first run wrote
                capture = LogCapture(self)
                master = await start_master(self, state_dir=state_dir, tunables=QUIET)
                api = Api(master, self)
                code, listed, resp = await api.call("GET", "/instances")
                self.assertEqual(code, 200, resp.body[:300])
                resp.body.decode("utf-8")  # strictly valid UTF-8
                by_id = {inst["id"]: inst for inst in listed}
                self.assertEqual(set(by_id), {API_KEY_ID, "0a0b0c0d"})
                inst = by_id["0a0b0c0d"]
                self.assertEqual(inst["alias"], "\\ud800web")
                self.assertEqual(inst["meta"]["peer"], {"sid": "s\\udfff", "type": "\\n", "alias": "ok"})
                self.assertEqual(inst["meta"]["tags"]["k\\u2028"], "v")
                self.assertEqual(inst["meta"]["tags"]["fine"], "x\\x1by")
                self.assertEqual(by_id[API_KEY_ID]["alias"], "m\\naster")
                for route in ("/info", "/instances/0a0b0c0d"):
                    code, _, _ = await api.call("GET", route)
                    self.assertEqual(code, 200, route)
                sse = await SSEClient(api).connect()
                await sse.event(
                    lambda d: d["type"] == "initial" and d["instance"]["id"] == "0a0b0c0d", what="the repaired instance's initial event"
                )
                errors = [line for line in capture.lines() if "  ERROR  " in line]
                if round_ == 0:
                    self.assertTrue(any("State: instance 0a0b0c0d: alias" in line for line in errors), errors)
                    self.assertTrue(any("State: instance 0a0b0c0d: meta.peer.sid" in line for line in errors), errors)
                    self.assertTrue(any("State: instance ********: alias" in line for line in errors), errors)
                    self.assertTrue(any("unreadable instance '0e0e0e0e'" in line for line in errors), errors)
                    self.assertTrue(any("unreadable instance '0f0f0f0f'" in line for line in errors), errors)
                else:  # repaired on disk by the first run: nothing left to report
                    self.assertFalse([line for line in errors if "State: instance" in line], errors)
                self.assertEqual(forged_lines(capture), [])
                check_log(self, capture, master.api_key)
                await master.stopService()
            with open(path, "rb") as f:
                saved = json.loads(f.read().decode("utf-8"))
            self.assertEqual([i["id"] for i in saved["unreadable"]], ["0e0e0e0e", "0f0f0f0f"])

        return ensureDeferred(go())

    def test_unusable_key_in_state_file_is_replaced(self):
        async def go():
            state_dir = self.mktemp()
            os.makedirs(state_dir)
            with open(os.path.join(state_dir, "nodepass.json"), "w") as f:
                json.dump({"api_key": "\ud800" + "a" * 31, "master_id": "\n" * 16, "instances": []}, f)
            capture = LogCapture(self)
            master = await start_master(self, state_dir=state_dir, tunables=QUIET)
            self.assertRegex(master.api_key, r"^[0-9a-f]{32}$")
            self.assertRegex(master.master_id, r"^[0-9a-f]{16}$")
            code, _, _ = await Api(master, self).call("GET", "/instances")
            self.assertEqual(code, 200)
            self.assertIn("State: API key unusable", capture.text())
            check_log(self, capture, master.api_key)

        return ensureDeferred(go())


class KeyLoggingTests(unittest.TestCase):
    def test_api_key_only_in_start_line(self):
        """The key is announced at start (SPEC §8) and never logged again:
        not on rotation, not by refused or failed requests carrying it."""

        async def go():
            master, wire, api, capture, rid = await hostile_master(self)
            old = master.api_key
            code, rec, _ = await api.call("PATCH", f"/instances/{API_KEY_ID}", {"action": "restart"})
            self.assertEqual(code, 200)
            new = rec["url"]
            self.assertNotEqual(new, old)

            def run():
                for key in (old, new, new + "x", new.upper()):
                    for method, path in (("GET", "/instances"), ("get", "/info"), ("GET", f"/nothing/{key}"),
                                         ("GET", f"/tcping?target=127.0.0.1:{key}"), ("PATCH", f"/instances/{key}")):
                        status, _, data = wire.call(method, path, b'{"alias": "' + key.encode() + b'\n"}', key=key)
                        assert status < 500, (status, data)

            await threads.deferToThread(run)
            await master.stopService()
            again = await start_master(self, state_dir=os.path.dirname(master.store.path), tunables=QUIET)
            self.assertEqual(again.api_key, new)
            for key in (old, new):
                check_log(self, capture, key)
            self.assertEqual(len([line for line in capture.lines() if old in line]), 1, capture.text())
            self.assertEqual(len([line for line in capture.lines() if new in line]), 1, capture.text())
            self.assertIn("API Key reset", capture.text())

        return ensureDeferred(go())


def raw_exchange(port: int, head: bytes, tls: bool = False) -> bytes:
    """Send ``head`` on a fresh connection and read the answer to the end
    (the master closes after refusing); bounded by the socket timeout."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(sock)
    try:
        sock.sendall(head)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ssl.SSLError:  # the TLS peer closed without close_notify
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer:
                head_end = answer.index(b"\r\n\r\n") + 4
                length = [line for line in answer[:head_end].split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if length and len(answer) >= head_end + int(length[0].split(b":")[1]):
                    break  # the whole answer: closing ourselves, as clients do
        return answer
    finally:
        sock.close()


def parse_raw(answer: bytes) -> tuple[int, dict, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode()
    return status, headers, body


class ProtocolTests(unittest.TestCase):
    """Issue item 4: methods and request heads."""

    def test_methods_are_case_sensitive(self):
        async def go():
            master, wire, api, capture, rid = await hostile_master(self)

            def run():
                before = wire.snapshot()
                for method, path, allow in (
                    ("get", "/instances", "GET, HEAD, OPTIONS, POST"),
                    ("Get", "/info", "GET, HEAD, OPTIONS, POST"),
                    ("post", "/instances", "GET, HEAD, OPTIONS, POST"),
                    ("delete", f"/instances/{rid}", "DELETE, GET, HEAD, OPTIONS, PATCH, PUT"),
                    ("options", "/instances", "GET, HEAD, OPTIONS, POST"),
                    ("head", "/tcping?target=127.0.0.1:1", "GET, HEAD, OPTIONS"),
                    ("FOO", "/events", "GET, HEAD, OPTIONS"),
                    ("get", "/openapi.json", "GET, HEAD, OPTIONS"),
                ):
                    status, headers, data = wire.call(method, path, b'{"alias": "x"}')
                    assert_refusal(status, headers, data, f"{method} {path}", 405)
                    assert headers.get("allow") == allow, (method, path, headers.get("allow"))
                assert wire.snapshot() == before
                # No key: the 401 comes first, as for any method.
                status, headers, data = wire.call("get", "/instances", key=None)
                assert_refusal(status, headers, data, "get without key", 401)
                # A path that does not exist is a 404 whatever the method.
                status, headers, data = wire.call("get", "/nothing")
                assert_refusal(status, headers, data, "get /nothing", 404)
                status, _, data = wire.call("GET", f"/instances/{rid}")
                assert status == 200, data

            await threads.deferToThread(run)

        return ensureDeferred(go())

    def _oversized(self, master, tls: bool = False):
        key = master.api_key.encode()
        start = b"GET /api/v1/instances HTTP/1.1\r\nHost: x\r\nX-API-Key: " + key + b"\r\n"
        cases = [
            # 100 KiB of ordinary headers
            (start + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(100)) + b"\r\n", 431),
            # one header line of 70 KiB
            (start + b"X-Big: " + b"b" * 70 * 1024 + b"\r\n\r\n", 431),
            # more header lines than allowed, each small
            (start + b"".join(b"X-N%d: 1\r\n" % i for i in range(300)) + b"\r\n", 431),
            # a request line of 20 KiB
            (b"GET /api/v1/instances?" + b"q" * 20 * 1024 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            # malformed heads Twisted refuses itself
            (start + b"no colon here\r\n\r\n", 400),
            (start + b"Bad Name: x\r\n\r\n", 400),
            (b"GET /api/v1/instances HTTP/9.9\r\nHost: x\r\n\r\n", 400),
            (b"GET\r\n\r\n", 400),
            (start + b"Content-Length: -5\r\n\r\n", 400),
            (start + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        ]
        for head, expected in cases:
            answer = raw_exchange(master.port, head, tls)
            assert answer, f"connection closed without an answer for {head[:60]!r}"
            status, headers, body = parse_raw(answer)
            assert_refusal(status, headers, body, repr(head[:60]), expected)
            assert headers.get("connection") == "close", headers
        # At the limits exactly: still served (the head below has Host,
        # X-API-Key, Connection and MAX_HEADERS - 3 more headers).
        pads = b"".join(b"X-N%d: 1\r\n" % i for i in range(MAX_HEADERS - 3))
        status, _, body = parse_raw(raw_exchange(master.port, start + pads + b"Connection: close\r\n\r\n", tls))
        assert status == 200, body[:200]
        line = b"X-Line: " + b"l" * (MAX_LINE - len(b"X-Line: ")) + b"\r\n"
        status, _, body = parse_raw(raw_exchange(master.port, start + line + b"Connection: close\r\n\r\n", tls))
        assert status == 200, body[:200]

    def test_oversized_and_malformed_heads_answered(self):
        async def go():
            master, wire, api, capture, rid = await hostile_master(self)
            before = await threads.deferToThread(wire.snapshot)
            await threads.deferToThread(self._oversized, master)
            self.assertEqual(await threads.deferToThread(wire.snapshot), before)
            check_log(self, capture, master.api_key)

        return ensureDeferred(go())

    def test_oversized_heads_answered_over_tls(self):
        async def go():
            master = await start_master(self, "tls=1", tunables=QUIET)
            await threads.deferToThread(self._oversized, master, True)
            status, headers, data = await threads.deferToThread(Wire(master, tls=True).call, "get", "/instances")
            assert_refusal(status, headers, data, "get over TLS", 405)

        return ensureDeferred(go())


# ---------------------------------------------------------------- property

SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
CONTROL = st.sampled_from([chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)] + ["\u2028", "\u2029"])


class Raw:
    """A piece of JSON text spliced into a generated body as is: numbers
    too big for ``json.dumps``, ``NaN``, invalid UTF-8, deep nesting."""

    def __init__(self, data: bytes):
        self.data = data

    def __repr__(self) -> str:
        return f"Raw({self.data[:40]!r}{'...' if len(self.data) > 40 else ''})"


RAW = st.sampled_from(
    [b"1" + b"0" * 5000, b"1e999999", b"-1e400", b"NaN", b"Infinity", b'"\\ud800"', b'"\\udfff\\ud800"',
     b'"\xff"', b'"\xed\xa0\x80"', deep_list(), deep_object(), deep_list(900), b"18446744073709551616"]
).map(Raw)


def encode(value) -> bytes:
    """JSON text for a generated value (surrogates as ``\\udXXX`` escapes,
    the way a hostile client sends them), with :class:`Raw` spliced in."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, dict):
        return b"{" + b",".join(encode(str(k)) + b":" + encode(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(encode(v) for v in value) + b"]"
    return json.dumps(value).encode("ascii")


def hostile_text():
    """Text with at least one lone surrogate or control character."""
    return st.builds(lambda a, bad, b: a + bad + b, st.text(max_size=4), SURROGATE | CONTROL, st.text(max_size=4))


def any_text():
    return hostile_text() | st.text(max_size=6) | st.text(min_size=255, max_size=258)


def wrong_types():
    scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | RAW
    return scalar | st.lists(scalar, max_size=3) | st.dictionaries(st.text(max_size=4), scalar, max_size=3)


def meta_values():
    peer = st.dictionaries(st.sampled_from(["sid", "type", "alias"]) | any_text(), any_text() | wrong_types(), max_size=3)
    tags = st.dictionaries(any_text(), any_text() | wrong_types(), max_size=3)
    return st.fixed_dictionaries({}, optional={"peer": peer | wrong_types(), "tags": tags | wrong_types()}) | wrong_types()


def url_values(dead: int):
    base = f"127.0.0.1:{dead}"
    port = st.sampled_from(["²", "٨٠", "9" * 5000, "+1", "65536", "0", str(dead), " 1"])
    return st.one_of(
        st.builds(lambda bad: f"client://127.0.0.1:0/{base}?mode=1{bad}", hostile_text()),
        st.builds(lambda bad: f"client://127.0.0.1:0/127.0.0.1{bad}:{dead}?mode=1", hostile_text().map(pct)),
        st.builds(lambda p: f"client://127.0.0.1:{p}/{base}?mode=1", port),
        st.builds(lambda p: f"server://127.0.0.1:0/127.0.0.1:{p}", port),
        st.just(f"client://127.0.0.1:0/{base}?mode=1&log=debug"),
        any_text(),
        wrong_types(),
    )


FIELDS = {
    "alias": lambda dead: any_text() | wrong_types(),
    "restart": lambda dead: st.booleans() | wrong_types(),
    "meta": lambda dead: meta_values(),
    "action": lambda dead: st.sampled_from(["start", "stop", "reset"]) | any_text() | wrong_types(),
    "url": url_values,
}


class PropertyTests(unittest.TestCase):
    """Issue item 5: every route, every JSON field, hostile values."""

    def test_hostile_requests_never_5xx_and_refusals_change_nothing(self):
        async def go():
            master, wire, api, capture, rid = await hostile_master(self)
            dead = helpers.dead_port()

            def body_for(fields):
                return st.one_of(
                    st.fixed_dictionaries({}, optional={name: FIELDS[name](dead) for name in fields}).map(encode),
                    st.dictionaries(any_text(), wrong_types(), min_size=1, max_size=2).map(encode),
                    RAW.map(lambda r: r.data),
                    st.binary(max_size=24),
                )

            ident = st.sampled_from([rid, API_KEY_ID, "00000000"]) | any_text().map(pct)
            # Never a host name that could be looked up in DNS: loopback with
            # any port text, or a host holding a control character.
            target = st.one_of(
                st.sampled_from(["127.0.0.1:²", "127.0.0.1:" + "9" * 5000, f"127.0.0.1:{dead}", "[::1:1", ":", ""]),
                any_text().map(lambda t: "127.0.0.1:" + t),
                st.builds(lambda t, c: f"{t}{c}:{dead}", st.text(max_size=4), CONTROL),
            )
            requests = st.one_of(
                st.tuples(st.just("POST"), st.just("/instances"), body_for(("url", "alias", "restart", "meta"))),
                st.tuples(st.just("PATCH"), ident.map("/instances/{}".format), body_for(("alias", "action", "restart", "meta"))),
                st.tuples(st.just("PUT"), ident.map("/instances/{}".format), body_for(("url", "action"))),
                st.tuples(st.just("POST"), st.just("/info"), body_for(("alias",))),
                st.tuples(st.sampled_from(["GET", "DELETE"]), ident.filter(lambda i: i != rid).map("/instances/{}".format), body_for(())),
                st.tuples(st.just("GET"), target.map(lambda t: "/tcping?target=" + pct(t)), st.none()),
                st.tuples(st.sampled_from(["GET", "HEAD", "OPTIONS", "get", "PATCH"]),
                          st.sampled_from(["/instances", "/info", "/openapi.json", "/docs", "/nothing%ff", "/instances/%0a"]),
                          st.none() | body_for(("alias",))),
            )
            keys = st.sampled_from(["good"] * 6 + [None, "0" * 32, "\xff" * 40, "k" * 5000])
            seen: dict[int, int] = {}

            @settings(max_examples=examples(250))
            @given(request=requests, key=keys)
            def prop(request, key):
                method, path, body = request
                before = wire.snapshot()
                status, headers, data = wire.call(method, path, body, key=key)
                seen[status] = seen.get(status, 0) + 1
                where = f"{method} {path[:80]} key={key[:8] if key else key} body={body[:120] if body else body!r}"
                assert status < 500, f"{status} for {where}: {data[:300]!r}"
                assert headers.get("access-control-allow-origin") == "*" or path.startswith("/docs"), where
                if status >= 400:
                    if method != "HEAD":
                        assert_refusal(status, headers, data, where)
                    assert wire.snapshot() == before, f"refused {where} changed the state"

            await threads.deferToThread(prop)
            # The property reached both sides of the API.
            self.assertTrue({200, 400, 401, 404, 405} <= set(seen), seen)
            # Still serving, in valid UTF-8 everywhere, SSE included.
            code, listed, resp = await api.call("GET", "/instances")
            self.assertEqual(code, 200)
            resp.body.decode("utf-8")
            for inst in listed:
                for text in (inst["alias"], inst["url"], *inst["meta"]["peer"].values(), *inst["meta"]["tags"], *inst["meta"]["tags"].values()):
                    self.assertIsNone(text_problem(text), inst)
            sse = await SSEClient(api).connect()
            await sse.event(lambda d: d["type"] == "initial" and d["instance"]["id"] == API_KEY_ID, what="the key's initial event")
            check_log(self, capture, master.api_key)

        return ensureDeferred(go())
