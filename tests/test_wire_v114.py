"""The 1.14 handshake and signals (SPEC-1.14 §3.2-§3.6), sans I/O: every
test vector and the real capture of §3, round trips, the error answers,
generation sniffing, and garbage that must raise nothing but V114Error."""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Callable

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from nodepass.base.kinds import Flow, TLSCode
from nodepass.wire import codec, v114
from nodepass.wire.codec import MAX_LINE
from nodepass.wire.v114 import NEED_MORE, Generation, Signal, TunnelConfig, V114Error
from tests import examples

DATE = "Mon, 30 Nov 2026 02:41:40 GMT"
TOKEN_SECRET = "f9e66e179b6747ae54108f82f8ade8b3c25d76fd30afde6c395822c530196169"

#: §3.6 conn#1 C>S (173 bytes), the token written out.
CAPTURE_REQUEST = (
    b"GET / HTTP/1.1\r\nHost: none\r\nUser-Agent: Go-http-client/1.1\r\n"
    b"Authorization: Bearer " + TOKEN_SECRET.encode() + b"\r\nAccept-Encoding: gzip\r\n\r\n"
)
#: §3.6 conn#1 S>C, with the Date of the §3.2.3 example.
CAPTURE_ANSWER = (
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
    b"Date: " + DATE.encode() + b"\r\nContent-Length: 42\r\n\r\n"
    b'{"flow":"-","max":4,"tls":"0","type":"0"}\n'
)
FP = "sha256:49:F4:1F:3A:03:23:AD:A8:80:D0:4C:9C:91:D6:1A:11:9E:A7:A5:44:BC:C9:A2:1B:55:EF:BA:45:84:6F:1C:3E"
#: §3.4 vectors for the key ``secret``: (signal, JSON, line without "\n").
SIGNALS = [
    (v114.PING, b'{"action":"ping"}', b"CEcCEREdHAtBSEcEGgsEUBg="),
    (v114.PONG, b'{"action":"pong"}', b"CEcCEREdHAtBSEcEHAsEUBg="),
    (
        v114.tcp_launch("127.0.0.1:57426", "ecce5d2c"),
        b'{"action":"tcp","remote":"127.0.0.1:57426","id":"ecce5d2c"}',
        b"CEcCEREdHAtBSEcAEBVBXkcGFggMBgBWSUdSQFJaQ0tTXFRORlJXQFNWX0cKFkdOUQAAEQBBF1cAUBg=",
    ),
    (
        v114.verify("cb177d35", FP),
        b'{"action":"verify","id":"cb177d35","fp":"' + FP.encode() + b'"}',
        b"CEcCEREdHAtBSEcCFhcKFBxWX0cKFkdOUQYBQ1JDF1ZWUElWFRVBSEcHGwRRR1NOR1xZNFFOQiNZQSROQ1ZZQFZOMiFZM11O"
        b"S1VZNlVORyZZSyZOSlRZNlNOQiRZQ1ROSiBZM1JOMlBZRlFOMSZZMVxOMldZQydORlBZNyNOMSRZRlBOS1FZRCNOQiZZQSBWDg==",
    ),
    (v114.FLUSH, b'{"action":"flush"}', b"CEcCEREdHAtBSEcSHxAQGkcJ"),
    (
        v114.udp_launch("127.0.0.1:5353", "0a1b2c3d"),
        b'{"action":"udp","remote":"127.0.0.1:5353","id":"0a1b2c3d"}',
        b"CEcCEREdHAtBSEcBFxVBXkcGFggMBgBWSUdSQFJaQ0tTXFRORlZWQUdYUQwHUF9WQwRSEFcXQAFBDw==",
    ),
]


def _request(method: bytes = b"GET", target: bytes = b"/", auth: bytes = b"Bearer " + TOKEN_SECRET.encode(),
             host: bool = True, proto: bytes = b"HTTP/1.1") -> bytes:
    head = method + b" " + target + b" " + proto + b"\r\n"
    if host:
        head += b"Host: none\r\n"
    if auth:
        head += b"Authorization: " + auth + b"\r\n"
    return head + b"\r\n"


class TokenTests(unittest.TestCase):
    def test_vectors(self) -> None:
        # §3.2.2: sent by the Go client, accepted by the Go server, computed.
        self.assertEqual(v114.token("secret"), TOKEN_SECRET)
        self.assertEqual(v114.token("e68be2b4"), "8940572756af096447802f92b4c843ac61de93b80af9d37a85ed994508656d7e")
        self.assertEqual(v114.token("61741aaf"), "666da7220bdab15c8d82f6efa45d89e093086cea807f0499e0949bfcbe91faf8")
        self.assertEqual(v114.token(b"secret"), TOKEN_SECRET)

    def test_spelled_out_formula(self) -> None:
        # SHA256((K' ^ 0x5c..) || SHA256(K' ^ 0x36..)), K' padded (or hashed if > 64 bytes).
        for key in (b"secret", b"k" * 64, b"x" * 100):
            k = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
            inner = hashlib.sha256(bytes(b ^ 0x36 for b in k)).digest()
            outer = hashlib.sha256(bytes(b ^ 0x5C for b in k) + inner).hexdigest()
            self.assertEqual(v114.token(key), outer)


class RequestTests(unittest.TestCase):
    def test_capture_bytes(self) -> None:
        request = v114.build_request("secret")
        self.assertEqual(request, CAPTURE_REQUEST)
        self.assertEqual(len(request), 173)

    def test_host(self) -> None:
        self.assertIn(b"\r\nHost: tunnel.example\r\n", v114.build_request("k", "tunnel.example"))
        for bad in ("", "a b", "a\r\nX: y"):
            self.assertRaises(V114Error, v114.build_request, "k", bad)

    def test_accepted(self) -> None:
        self.assertEqual(v114.parse_request(CAPTURE_REQUEST, "secret"), v114.HandshakeRequest("none", 173))
        # The default key of port 10101, accepted by the Go server.
        self.assertIsInstance(v114.parse_request(v114.build_request("e68be2b4"), "e68be2b4"), v114.HandshakeRequest)

    def test_need_more_on_every_prefix(self) -> None:
        for n in range(len(CAPTURE_REQUEST)):
            self.assertIs(v114.parse_request(CAPTURE_REQUEST[:n], "secret"), NEED_MORE)

    def test_accepted_variants(self) -> None:
        ok = [
            _request(target=b"/?a=b"),  # a query is ignored
            _request(host=False, proto=b"HTTP/1.0"),  # HTTP/1.0 needs no Host
            _request(target=b"http://x/"),  # absolute form, path /
            CAPTURE_REQUEST.replace(b"\r\n", b"\n"),  # bare LF lines
            CAPTURE_REQUEST.replace(b"Authorization:", b"AUTHORIZATION:"),  # header names: any case
            CAPTURE_REQUEST + b"trailing bytes",  # a body is not read
        ]
        for data in ok:
            self.assertIsInstance(v114.parse_request(data, "secret"), v114.HandshakeRequest, data)

    def test_error_statuses(self) -> None:
        cases = [
            (_request(method=b"POST"), v114.METHOD_NOT_ALLOWED),
            (_request(method=b"HEAD"), v114.METHOD_NOT_ALLOWED),
            (_request(method=b"get"), v114.METHOD_NOT_ALLOWED),
            (_request(target=b"/x"), v114.NOT_FOUND),
            (_request(target=b"//"), v114.NOT_FOUND),
            (_request(target=b"*"), v114.NOT_FOUND),
            (_request(auth=b""), v114.UNAUTHORIZED),
            (_request(auth=b"bearer " + TOKEN_SECRET.encode()), v114.UNAUTHORIZED),
            (_request(auth=b"Bearer  " + TOKEN_SECRET.encode()), v114.UNAUTHORIZED),
            (_request(auth=b"Bearer " + TOKEN_SECRET.upper().encode()), v114.UNAUTHORIZED),
            (_request(auth=b"Bearer " + v114.token("other").encode()), v114.UNAUTHORIZED),
            (_request(auth=b"Basic x"), v114.UNAUTHORIZED),
            (_request(host=False), v114.MISSING_HOST),
            (_request(method=b"POST", host=False), v114.MISSING_HOST),  # the library checks first
            (_request() .replace(b"\r\n\r\n", b"\r\nHost: b\r\n\r\n"), v114.TOO_MANY_HOSTS),
            (b"AAAAAAAAAAA=\n", v114.BAD_REQUEST),  # a 1.12 key line, refused at once
            (b"GET /\r\n\r\n", v114.BAD_REQUEST),
            (_request(proto=b"HTTP/2.0"), v114.BAD_REQUEST),
            (_request(target=b"/%zz"), v114.BAD_REQUEST),
            (_request(target=b"x"), v114.BAD_REQUEST),
            (b"GET / HTTP/1.1\r\nHost none\r\n\r\n", v114.BAD_REQUEST),
            (b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n", v114.BAD_REQUEST),
            (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * v114.MAX_REQUEST_HEAD, v114.BAD_REQUEST),  # oversize
        ]
        for data, refusal in cases:
            self.assertEqual(v114.parse_request(data, "secret"), refusal, data[:60])

    def test_order_method_path_token(self) -> None:
        # The handler checks method, then path, then token.
        self.assertEqual(v114.parse_request(_request(method=b"PUT", target=b"/x", auth=b""), "k"), v114.METHOD_NOT_ALLOWED)
        self.assertEqual(v114.parse_request(_request(target=b"/x", auth=b""), "k"), v114.NOT_FOUND)

    def test_error_answers(self) -> None:
        # §3.2.3: the full 401 example, byte for byte.
        self.assertEqual(
            v114.UNAUTHORIZED.answer(DATE),
            b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"X-Content-Type-Options: nosniff\r\nDate: Mon, 30 Nov 2026 02:41:40 GMT\r\nContent-Length: 13\r\n"
            b"\r\nUnauthorized\n",
        )
        self.assertTrue(v114.METHOD_NOT_ALLOWED.answer(DATE).startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"))
        self.assertTrue(v114.METHOD_NOT_ALLOWED.answer(DATE).endswith(b"Content-Length: 19\r\n\r\nMethod Not Allowed\n"))
        self.assertTrue(v114.METHOD_NOT_ALLOWED.answer(DATE, with_body=False).endswith(b"\r\n\r\n"))
        self.assertTrue(v114.NOT_FOUND.answer(DATE).endswith(b"Content-Length: 10\r\n\r\nNot Found\n"))
        self.assertEqual(
            v114.BAD_REQUEST.answer(DATE),
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
            b"400 Bad Request",
        )
        self.assertEqual(
            v114.MISSING_HOST.answer(DATE),
            b"HTTP/1.1 400 Bad Request: missing required Host header\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\n\r\n400 Bad Request: missing required Host header",
        )

    def test_http_date(self) -> None:
        self.assertEqual(v114.http_date(1796006500), DATE)


class AnswerTests(unittest.TestCase):
    def test_capture_bytes(self) -> None:
        config = TunnelConfig(Flow.REVERSE, 4, TLSCode.NONE, "0")
        self.assertEqual(v114.build_answer(config, DATE), CAPTURE_ANSWER)
        self.assertEqual(v114.parse_answer(CAPTURE_ANSWER), config)
        self.assertEqual(config.log_fields(), "FLOW=-|MAX=4|TLS=0|TYPE=0")

    def test_spec_body_and_sizes(self) -> None:
        config = TunnelConfig("-", 1024, 1, "0")
        self.assertEqual(config.body(), b'{"flow":"-","max":1024,"tls":"1","type":"0"}\n')
        self.assertEqual(len(config.body()), 45)
        self.assertEqual(len(TunnelConfig("-", 4, 0, "0").body()), 42)

    def test_round_trips(self) -> None:
        for flow in Flow:
            for tls in TLSCode:
                for pool_type in ("0", "1", "2", "3", "17"):
                    config = TunnelConfig(flow, 65536, tls, pool_type)
                    self.assertEqual(v114.parse_answer(v114.build_answer(config, DATE)), config)

    def test_need_more_on_every_prefix(self) -> None:
        for n in range(len(CAPTURE_ANSWER)):
            self.assertIs(v114.parse_answer(CAPTURE_ANSWER[:n]), NEED_MORE)
        self.assertRaises(V114Error, v114.parse_answer, CAPTURE_ANSWER[:-3], eof=True)

    def test_body_read_as_go_reads_it(self) -> None:
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
        config = v114.parse_answer(head + b' {"TYPE":"2","max":8,"Flow":"+","tls":"2","extra":[1]} junk', eof=True)
        self.assertEqual(config, TunnelConfig("+", 8, 2, "2"))
        self.assertIs(v114.parse_answer(head + b"{}"), NEED_MORE)  # no Content-Length: until EOF

    def test_refused_answers(self) -> None:
        head = b"HTTP/1.1 200 OK\r\n\r\n"
        bad = [
            b"HTTP/1.1 401 Unauthorized\r\n",  # the status decides at once
            b"SSH-2.0-x\r\n",
            # A 1.12 server's IP probe answer (§3.2.5): a number, not an object.
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n127.0.0.1\n",
            head + b'{"flow":"-","max":"4","tls":"0","type":"0"}',  # max as a string
            head + b'{"flow":"-","max":4.5,"tls":"0","type":"0"}',
            head + b'{"flow":"-","max":4,"tls":0,"type":"0"}',  # tls as a number
            head + b'{"flow":"x","max":4,"tls":"0","type":"0"}',
            head + b'{"flow":"-","max":0,"tls":"0","type":"0"}',
            head + b'{"flow":"-","max":4,"tls":"3","type":"0"}',
            head + b'{"flow":"-","max":4,"tls":"0","type":"a"}',
            head + b'{"flow":"-","max":99999999999999999999,"tls":"0","type":"0"}',
            head + b'{"flow":"-","max":NaN,"tls":"0","type":"0"}',
            head + b"[" * 5000,
            head + b"1" * 5000,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 2000,
        ]
        for data in bad:
            self.assertRaises(V114Error, v114.parse_answer, data, eof=True)
        self.assertEqual(str(self.assertRaises(V114Error, v114.parse_answer, bad[0])), "status 401")


class SignalTests(unittest.TestCase):
    def test_vectors(self) -> None:
        for signal, payload, line in SIGNALS:
            self.assertEqual(signal.payload(), payload)
            self.assertEqual(signal.line("secret"), line + b"\n")
            self.assertEqual(v114.decode_line(line + b"\n", "secret"), signal)
            self.assertEqual(v114.parse_payload(payload), signal)

    def test_byte_level_of_ping(self) -> None:
        payload = bytes.fromhex("7b 22 61 63 74 69 6f 6e 22 3a 22 70 69 6e 67 22 7d")
        xored = bytes.fromhex("08 47 02 11 11 1d 1c 0b 41 48 47 04 1a 0b 04 50 18")
        self.assertEqual(v114.PING.payload(), payload)
        self.assertEqual(base64.b64encode(xored), b"CEcCEREdHAtBSEcEGgsEUBg=")

    def test_capture_control_stream(self) -> None:
        # §3.6 conn#2: the client's "ping + pong" write, line by line.
        stream = b"CEcCEREdHAtBSEcEGgsEUBg=\nCEcCEREdHAtBSEcEHAsEUBg=\n"
        lines = [line + b"\n" for line in stream.split(b"\n")[:-1]]
        self.assertEqual([v114.decode_line(line, "secret") for line in lines], [v114.PING, v114.PONG])

    def test_read_as_go_reads_it(self) -> None:
        read = v114.parse_payload
        self.assertEqual(read(b' {"ID":"ab", "Action":"tcp","remote":"1.2.3.4:5","x":{"y":1}} '), Signal("tcp", "1.2.3.4:5", "ab"))
        self.assertEqual(read(b'{"action":"ping","action":"pong"}'), v114.PONG)  # the last one wins
        self.assertEqual(read(b'{"action":"reboot"}').action, "reboot")  # unknown: the caller ignores it
        self.assertEqual(read(b'{"action":"verify","id":"cb177d35"}'), Signal("verify", id="cb177d35"))  # Go tls=2 server
        self.assertEqual(read(b'{"action":"ping","fp":null}'), v114.PING)
        self.assertEqual(read(b"{}"), Signal(""))  # no action: ignored like an unknown one
        self.assertEqual(read(b"null"), Signal(""))  # Go's Unmarshal of null sets nothing

    def test_refused_lines(self) -> None:
        ping = SIGNALS[0][2]
        self.assertRaises(v114.SignalDecodeError, v114.decode_line, ping + b"\r\n", "secret")
        self.assertRaises(v114.SignalDecodeError, v114.decode_line, b"not base64!\n", "secret")
        self.assertRaises(v114.SignalDecodeError, v114.decode_line, b"A" * 5000 + b"\n", "secret")
        self.assertRaises(v114.SignalUnmarshalError, v114.decode_line, ping, "wrong-key")
        for payload in (b'{"action":"ping"} {}', b'{"action":1}', b"[]", b'{"action":"tcp","remote":"a\\nb"}', b"NaN"):
            self.assertRaises(v114.SignalUnmarshalError, v114.parse_payload, payload)

    def test_encoding_as_go(self) -> None:
        self.assertEqual(Signal("tcp", "<a&b>", "\u2028é").payload(), '{"action":"tcp","remote":"\\u003ca\\u0026b\\u003e","id":"\\u2028é"}'.encode())
        self.assertEqual(Signal("ping", id="").payload(), b'{"action":"ping"}')

    def test_verify_never_empty(self) -> None:
        self.assertRaises(V114Error, v114.verify, "cb177d35", "")
        self.assertRaises(V114Error, v114.verify, "cb177d35", FP.lower())
        self.assertRaises(V114Error, Signal("verify", id="x").payload)
        self.assertEqual(v114.fingerprint(b"der"), "sha256:" + ":".join(f"{b:02X}" for b in hashlib.sha256(b"der").digest()))
        self.assertEqual(v114.verify("ab", v114.fingerprint(b"der")).fp, v114.fingerprint(b"der"))

    @settings(max_examples=examples(200))
    @given(st.sampled_from(list(v114.Action)), st.text(max_size=40), st.text(alphabet="0123456789abcdef", max_size=8),
           st.binary(min_size=1, max_size=16))
    def test_round_trip(self, action: str, remote: str, pool_id: str, key: bytes) -> None:
        fp = v114.fingerprint(remote.encode("utf-8", "surrogatepass")) if action == v114.Action.VERIFY else ""
        signal = Signal(action, remote, pool_id, fp)
        if any("\ud800" <= c <= "\udfff" for c in remote) or not remote.isprintable():
            return
        self.assertEqual(v114.decode_line(signal.line(key), key), signal)


class SniffTests(unittest.TestCase):
    def test_generations(self) -> None:
        self.assertIs(v114.sniff(CAPTURE_REQUEST), Generation.V114)
        self.assertIs(v114.sniff(b"AAAAAAAAAAA=\n"), Generation.V112)  # encode("61741aaf")
        self.assertIs(v114.sniff(b"AAAAAAAAAAA=\r\n"), Generation.V112)
        self.assertIs(v114.sniff(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Generation.V112_PROBE)
        self.assertIs(v114.sniff(b"GET / HTTP/1.1\nauthorization:Bearer x\n"), Generation.V114)
        self.assertIs(v114.sniff(b"GET / HTTP/1.1\r\nAuthorization: Basic x\r\n\r\n"), Generation.V112_PROBE)
        self.assertIs(v114.sniff(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000), Generation.V112_PROBE)
        for other in (b"POST / HTTP/1.1\r\n", b"\x16\x03\x01", b"AAA\n", b"\n", b"A" * 5000):
            self.assertIs(v114.sniff(other), Generation.UNKNOWN, other[:20])

    def test_prefixes_need_more(self) -> None:
        # Every prefix of each opening is undecided, then decided once.
        for data, generation in ((CAPTURE_REQUEST, Generation.V114), (b"AAAAAAAAAAA=\n", Generation.V112)):
            decided = [v114.sniff(data[:n]) for n in range(len(data) + 1)]
            first = decided.index(generation)
            self.assertEqual(set(decided[:first]), {Generation.NEED_MORE})
            self.assertEqual(set(decided[first:]), {generation})
        self.assertIs(v114.sniff(b"GE"), Generation.NEED_MORE)


class GarbageTests(unittest.TestCase):
    """Arbitrary bytes: only V114Error, never a hang (inputs are bounded)."""

    def _all(self, data: bytes) -> None:
        result = v114.parse_request(data, "secret")
        self.assertIsInstance(result, (v114.HandshakeRequest, v114.Refusal, v114.Incomplete))
        self.assertIsInstance(v114.sniff(data), Generation)
        for call in (
            lambda: v114.parse_answer(data),
            lambda: v114.parse_answer(data, eof=True),
            lambda: v114.decode_line(data, "secret"),
            lambda: v114.parse_payload(data),
            lambda: v114.parse_config(data),
        ):
            try:
                call()
            except V114Error:
                pass

    @settings(max_examples=examples(200))
    @given(st.one_of(
        st.binary(max_size=600),
        st.builds(lambda a, b: a + b, st.sampled_from([CAPTURE_REQUEST, CAPTURE_ANSWER, b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n\r\n", b"{"]), st.binary(max_size=300)),
        st.builds(lambda b: base64.b64encode(bytes(x ^ y for x, y in zip(b, b"secret" * 100))) + b"\n", st.binary(max_size=200)),
    ))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        self._all(data)
        for cut in (1, len(data) // 2):
            self._all(data[:cut])

    def test_huge_inputs_are_bounded(self) -> None:
        for data in (b"GET / HTTP/1.1\r\n" + b"a" * 1_000_000, b"A" * 1_000_000, b"[" * 100_000):
            self._all(data)



class DialectTests(unittest.TestCase):
    """The control channel's 1.14 dialect writes every §3.4 vector and
    reads it back into the runner's signal kinds; the 1.12 dialect is
    unchanged."""

    def setUp(self) -> None:
        from nodepass.wire.codec import Codec

        self.key = Codec("secret")

    def test_every_vector_both_ways(self) -> None:
        from nodepass.wire import codec
        from nodepass.wire.dialect import V114Dialect

        dialect = V114Dialect(self.key)
        kinds = {"ping": codec.PING, "pong": codec.PONG, "tcp": codec.TCP_LAUNCH, "udp": codec.UDP_LAUNCH,
                 "verify": codec.VERIFY, "flush": codec.FLUSH}
        for sig, _payload, line in SIGNALS:
            ours = codec.Signal(kinds[str(sig.action)], sig.remote, sig.id, sig.fp)
            self.assertEqual(dialect.line(ours), line + b"\n")
            self.assertEqual(dialect.read(line), ours)

    def test_unknown_action_and_errors(self) -> None:
        from nodepass.wire.dialect import UNKNOWN_ACTION, SignalError, V114Dialect

        dialect = V114Dialect(self.key)
        self.assertEqual(dialect.read(Signal("later").line("secret").rstrip(b"\n")).kind, UNKNOWN_ACTION)
        with self.assertRaises(SignalError) as e:
            dialect.read(b"not base64!")
        self.assertTrue(e.exception.line.startswith("commonQueue: decode signal failed: "))
        bad_json = base64.b64encode(bytes(b ^ k for b, k in zip(b"{nope", b"secretsecret")))
        with self.assertRaises(SignalError) as e:
            dialect.read(bad_json)
        self.assertTrue(e.exception.line.startswith("commonQueue: unmarshal signal failed: "))

    def test_control_channel_pings_at_once_and_answers_in_json(self) -> None:
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from nodepass.base.logs import NodeLog
        from nodepass.wire.control import ControlChannel
        from nodepass.wire.dialect import V114Dialect

        clock, transport = Clock(), StringTransport()
        lines: list[str] = []
        log = NodeLog("debug")
        log.listeners.append(lambda level, line: lines.append(line))
        pongs: list[int] = []
        channel = ControlChannel(
            transport, V114Dialect(self.key), clock, 5.0, log,
            handler=lambda s: None, on_pong=pongs.append, on_broken=lambda r: None, ping_at_once=True,
        )
        channel.start()
        # SPEC-1.14 §3.3: the first ping as soon as the channel exists.
        self.assertEqual(transport.value(), b"CEcCEREdHAtBSEcEGgsEUBg=\n")
        transport.clear()
        clock.advance(0.004)
        channel.data_received(b"CEcCEREdHAtBSEcEGgsEUBg=\nCEcCEREdHAtBSEcEHAsEUBg=\n")  # §3.6: ping + pong
        self.assertEqual(transport.value(), b"CEcCEREdHAtBSEcEHAsEUBg=\n")
        self.assertEqual(pongs, [4])
        channel.data_received(b"%%%\n")
        self.assertTrue(any("commonQueue: decode signal failed" in ln for ln in lines))
        self.assertFalse(channel.broken)
        channel.stop()


# ---------------------------------------------------------------------------
# The fast paths of the signal codec against the general code they replace.
#
# These references are the 1.14 signal encoder and decoder as they were
# before :class:`v114.SignalKey` (its fast paths and cached key stream),
# kept here verbatim apart from a byte-by-byte XOR: the package's fast
# paths must give the same bytes and the same verdicts for every input.


def _reference_xor(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % len(key)] for i, b in enumerate(data)) if key else bytes(data)


def _reference_payload(action: str, remote: str, pool_id: str, fp: str) -> bytes:
    if action == v114.Action.VERIFY and not v114._FINGERPRINT.match(fp):
        raise V114Error("verify signal without a well-formed fingerprint")
    parts = []
    for name, value in zip(("action", "remote", "id", "fp"), (action, remote, pool_id, fp)):
        if value:
            if any("\ud800" <= c <= "\udfff" for c in value):
                raise V114Error(f"signal {name} is not valid Unicode")
            parts.append(f'"{name}":{v114._go_json_string(value)}')
    return ("{" + ",".join(parts) + "}").encode("utf-8")


def _reference_line(action: str, remote: str, pool_id: str, fp: str, key: bytes) -> bytes:
    return base64.b64encode(_reference_xor(_reference_payload(action, remote, pool_id, fp), key)) + b"\n"


def _reference_parse_payload(payload: bytes) -> Signal:
    try:
        members = v114._members(v114._json_value(bytes(payload).decode("utf-8", "replace"), whole=True), v114._FIELDS)
    except V114Error as e:
        raise v114.SignalUnmarshalError(str(e)) from None
    if not all(isinstance(v, str) for v in members.values()):
        raise v114.SignalUnmarshalError("signal members must be JSON strings")
    if not all(len(v) <= v114.MAX_FIELD and v.isprintable() for v in members.values()):
        raise v114.SignalUnmarshalError("signal with a malformed member")
    return Signal(members.get("action", ""), members.get("remote", ""), members.get("id", ""), members.get("fp", ""))


def _reference_decode_line(line: bytes, key: bytes) -> Signal:
    line = bytes(line)
    if len(line) > MAX_LINE:
        raise v114.SignalDecodeError(f"signal line longer than {MAX_LINE} bytes")
    try:
        raw = base64.b64decode(line.removesuffix(b"\n"), validate=True)
    except (binascii.Error, ValueError):
        raise v114.SignalDecodeError("signal line is not base64") from None
    return _reference_parse_payload(_reference_xor(raw, key))


def _verdict(call: Callable[[], object]) -> tuple[str, object]:
    """What a call gives: ``("ok", value)`` or ``(exception type, message)``."""
    try:
        return "ok", call()
    except Exception as e:  # noqa: BLE001 - the verdict is what is compared
        return type(e).__name__, str(e)


#: Text a fast path must notice: JSON escapes, Go's extra escapes, lone
#: surrogates, controls, DEL, and the characters that end a plain member.
_AWKWARD = ['"', "\\", "<", ">", "&", "\u2028", "\u2029", "\ud800", "\udfff", "\x00", "\x1f", "\x7f", "\n", "é", "\ufffd", "😀", " "]
_TEXT = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),  # mostly plain
    st.text(alphabet=st.one_of(st.characters(), st.sampled_from(_AWKWARD)), max_size=40),
    st.text(alphabet=st.sampled_from(_AWKWARD + ["a", "1", ":", "[", "]"]), max_size=12),
    st.builds(lambda a, b, c, d, p: f"{a}.{b}.{c}.{d}:{p}", *(st.integers(0, 255),) * 4, st.integers(0, 65535)),
    st.just(""),
)
_ACTION = st.one_of(st.sampled_from([str(a) for a in v114.Action]), _TEXT)
_KEY = st.one_of(st.binary(max_size=40), st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass")))


def _plain_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Members the decoder's fast path takes (printable ASCII, no ``"`` or
    ``\\``), and now and then one that it must leave to the general parser."""
    plain = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\')
    near = st.sampled_from(['"', "\\", "\x7f", "\x1f", "\x00", "é", "\u2028", "<"])
    return st.one_of(
        st.text(alphabet=plain, max_size=max_size),
        st.text(alphabet=st.one_of(plain, near), max_size=max_size),
    )


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """``data`` with each ``(kind, position, byte)`` edit applied: replace,
    insert, delete or cut at ``position`` (modulo the length)."""
    out = bytearray(data)
    for kind, pos, byte in edits:
        pos = pos % (len(out) + 1)
        if kind == 0 and pos < len(out):
            out[pos] = byte
        elif kind == 1:
            out.insert(pos, byte)
        elif kind == 2 and pos < len(out):
            del out[pos]
        elif kind == 3:
            del out[pos:]
    return bytes(out)


_EDITS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 400), st.integers(0, 255)), max_size=3)


class FastPathEncodeTests(unittest.TestCase):
    """Every signal: the same bytes as the general encoder, or the same
    exception -- through every entry point (``Signal.payload``/``line``,
    :class:`v114.SignalKey`, the control channel's dialect)."""

    def _same(self, action: str, remote: str, pool_id: str, fp: str, key: bytes) -> None:
        expected_payload = _verdict(lambda: _reference_payload(action, remote, pool_id, fp))
        expected_line = _verdict(lambda: _reference_line(action, remote, pool_id, fp, key))
        signal = Signal(action, remote, pool_id, fp)
        self.assertEqual(_verdict(signal.payload), expected_payload)
        self.assertEqual(_verdict(lambda: signal.line(key)), expected_line)
        keyed = v114.SignalKey(key)
        for _ in range(2):  # the second time with the key stream cached
            self.assertEqual(_verdict(lambda: keyed.payload(action, remote, pool_id, fp)), expected_payload)
            self.assertEqual(_verdict(lambda: keyed.line(action, remote, pool_id, fp)), expected_line)
        kinds = {v: k for k, v in _DIALECT_KINDS.items()}
        if action in kinds:
            from nodepass.wire.dialect import V114Dialect

            ours = codec.Signal(kinds[action], remote, pool_id, fp)
            self.assertEqual(_verdict(lambda: V114Dialect(codec.Codec(key)).line(ours)), expected_line)

    @settings(max_examples=examples(600))
    @given(_ACTION, _TEXT, _TEXT, st.one_of(st.just(""), st.just(FP), _TEXT), _KEY)
    def test_arbitrary_text(self, action: str, remote: str, pool_id: str, fp: str, key: bytes) -> None:
        self._same(action, remote, pool_id, fp, key)

    @settings(max_examples=examples(300))
    @given(st.sampled_from(["tcp", "udp", v114.Action.TCP, v114.Action.UDP]), _TEXT, _TEXT, _KEY)
    def test_launch_signals(self, action: str, remote: str, pool_id: str, key: bytes) -> None:
        self._same(action, remote, pool_id, "", key)

    def test_chosen_cases(self) -> None:
        cases = [
            ("tcp", "127.0.0.1:57426", "ecce5d2c", ""),
            ("udp", "[2001:db8::1%eth0]:53", "0a1b2c3d", ""),
            ("tcp", "<a&b>", "\u2028é", ""),
            ("tcp", 'a"b', "c\\d", ""),
            ("tcp", "a\x7fb", "\x00", ""),
            ("tcp", "\ud800", "ab", ""),
            ("tcp", "", "ab", ""),
            ("tcp", "1.2.3.4:5", "", ""),
            ("tcp", "1.2.3.4:5", "ab", "x"),
            ("verify", "", "ab", ""),
            ("verify", "", "ab", FP),
            ("ping", "", "", ""),
            ("ping", "x", "", ""),
            ("flush", "", "", "x"),
            ("", "", "", ""),
            ("a<b", "", "", ""),
            ("tcp", "x" * 300, "ab", ""),
        ]
        for key in (b"", b"k", b"secret", "schlüssel".encode(), bytes(range(256)) * 2):
            for case in cases:
                self._same(*case, key)

    def test_launch_lines_skip_the_general_encoder(self) -> None:
        # The point of the fast path: a launch (and ping, pong, flush) never
        # reaches _payload.  Only a regression test, the bytes are above.
        def general(*args: object) -> bytes:
            raise AssertionError("general encoder used")

        self.patch(v114, "_payload", general)
        keyed = v114.SignalKey(b"secret")
        self.assertEqual(keyed.line("tcp", "127.0.0.1:57426", "ecce5d2c", ""), SIGNALS[2][2] + b"\n")
        self.assertEqual(keyed.line(v114.Action.UDP, "127.0.0.1:5353", "0a1b2c3d", ""), SIGNALS[5][2] + b"\n")
        self.assertEqual(keyed.line(v114.Action.PING, "", "", ""), SIGNALS[0][2] + b"\n")


_DIALECT_KINDS = {"1": "tcp", "2": "udp", "v": "verify", "f": "flush", "i": "ping", "o": "pong"}


class FastPathDecodeTests(unittest.TestCase):
    """Every line: the same signal, or the same exception with the same
    message, as the general decoder -- valid lines, lines of mutated
    payloads (which pass base64 and test the JSON reading), mutated lines
    and arbitrary bytes."""

    def _same(self, line: bytes, key: bytes) -> None:
        expected = _verdict(lambda: _reference_decode_line(line, key))
        keyed = v114.SignalKey(key)
        self.assertEqual(_verdict(lambda: v114.decode_line(line, key)), expected)
        self.assertEqual(_verdict(lambda: Signal(*keyed.fields(line))), expected)
        from nodepass.wire.dialect import UNKNOWN_ACTION, SignalError, V114Dialect

        read = _verdict(lambda: V114Dialect(codec.Codec(key)).read(line))
        if expected[0] == "ok":
            got = expected[1]
            assert isinstance(got, Signal)
            kinds = {v: k for k, v in _DIALECT_KINDS.items()}
            self.assertEqual(read, ("ok", codec.Signal(kinds.get(got.action, UNKNOWN_ACTION), got.remote, got.id, got.fp)))
        else:
            self.assertEqual(read, (SignalError.__name__, expected[1]))

    def _payload_line(self, payload: bytes, key: bytes) -> bytes:
        return base64.b64encode(_reference_xor(payload, key)) + b"\n"

    @settings(max_examples=examples(400))
    @given(st.sampled_from(["tcp", "udp", "ping", "verify", "flush", "later", ""]), _plain_text(), _plain_text(),
           st.one_of(st.just(""), st.just(FP), _plain_text(300)), _KEY, _EDITS, st.booleans())
    def test_written_lines_and_their_mutations(self, action: str, remote: str, pool_id: str, fp: str, key: bytes,
                                               edits: list[tuple[int, int, int]], on_line: bool) -> None:
        payload = _reference_payload(action, remote, pool_id, fp) if action != "verify" or fp == FP else b'{"action":"verify"}'
        line = self._payload_line(payload, key)
        self._same(line, key)
        self._same(line.rstrip(b"\n"), key)
        self._same(_mutate(line, edits) if on_line else self._payload_line(_mutate(payload, edits), key), key)

    @settings(max_examples=examples(400))
    @given(st.one_of(
        st.binary(max_size=300),
        st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.builds(lambda parts: b"".join(parts), st.lists(st.sampled_from([
            b"{", b"}", b'"action"', b'"Action"', b'"remote"', b'"ID"', b'"id"', b'"fp"', b'"x"', b":", b",", b" ",
            b'"tcp"', b'"udp"', b'"ping"', b'"1.2.3.4:5"', b'"a\\u0041"', b'"\\/"', b'"\\n"', b"null", b"1", b"[]",
            b'"\xc3\xa9"', b'"\xff"', b'"\x7f"', b'"\x01"', b'"' + b"a" * 255 + b'"', b'"' + b"a" * 256 + b'"', b"\n",
        ]), max_size=14)),
    ), _KEY, st.booleans())
    def test_arbitrary_payloads(self, payload: bytes, key: bytes, raw: bool) -> None:
        # ``raw``: the bytes as the line itself (mostly bad base64), else as
        # the payload of a well-formed line (the JSON reading decides).
        self._same(payload if raw else self._payload_line(payload, key), key)

    def test_chosen_lines(self) -> None:
        key = b"secret"
        payloads = [
            b'{"action":"tcp","remote":"127.0.0.1:57426","id":"ecce5d2c"}',
            b'{"action":"tcp","remote":"' + b"a" * 255 + b'","id":"x"}',
            b'{"action":"tcp","remote":"' + b"a" * 256 + b'","id":"x"}',
            b'{"action":"tcp","remote":"a\\u003cb","id":"x"}',
            b'{"action":"tcp","remote":"a\x7fb","id":"x"}',
            b'{"action":"tcp","remote":"\xc3\xa9","id":"x"}',
            b'{"action":"tcp","remote":"\xe9","id":"x"}',
            b'{"action":"tcp","id":"x","remote":"a"}',
            b'{"action":"tcp","remote":"a","id":"x"} ',
            b'{"action":"tcp","remote":"a","id":"x"}{}',
            b'{"action":"tcp","remote":"a","remote":"b"}',
            b'{"action":"tcp","remote":"","id":""}',
            b'{"action":"verify","id":"cb177d35","fp":"' + FP.encode() + b'"}',
            b'{"action":"verify","fp":""}',
            b'{"action":"ping"}',
            b'{"action":""}',
            b'{"action":1}',
            b"{}",
            b"null",
            b"",
        ]
        for payload in payloads:
            self._same(self._payload_line(payload, key), key)
        for line in (b"", b"\n", b"\r\n", b"A", b"AA==\n", b"AA==AA==", b"A" * 5000, SIGNALS[0][2] + b"\r\n", b"\xff\n"):
            self._same(line, key)

    def test_launch_lines_skip_the_general_parser(self) -> None:
        def general(payload: bytes) -> v114.Fields:
            raise AssertionError("general parser used")

        self.patch(v114, "_parse_fields", general)
        for signal, _payload, line in SIGNALS:
            self.assertEqual(v114.decode_line(line, "secret"), signal)
