"""Instance URLs, parameters, Go durations and tunables (SPEC §1, §7)."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from nodepass import cli
from nodepass.config.urls import (
    Address,
    MasterConfig,
    Tunables,
    TunnelConfig,
    URLError,
    default_key,
    parse_url,
    split_host_port,
    text_problem,
)
from nodepass.config.durations import DurationError, format_duration, parse_duration
from nodepass.base.kinds import BlockedProtocol, Wire

from tests import examples

# Ports that are not ASCII decimal numbers in range: "²" and "٨٠" pass
# str.isdigit() (and int() takes "٨٠"), 5,000 digits pass isdigit() but
# int() refuses them.
BAD_PORTS = ["²", "٨٠", "9" * 5000, "+80", "-1", " 80", "8 0", "1_0", "0x50", "65536", "99999", "", "8" * 100, "٣"]
# Characters that must never reach a log line from a URL.
CONTROLS = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029"]


class DurationTests(unittest.TestCase):
    def test_parse(self) -> None:
        cases = {
            "0": 0.0,
            "1h30m": 5400.0,
            "250ms": 0.25,
            "5m": 300.0,
            "1.5s": 1.5,
            "2h45m30.5s": 9930.5,
            "100us": 0.0001,
            "100\u00b5s": 0.0001,
            "10ns": 1e-8,
        }
        for text, seconds in cases.items():
            self.assertAlmostEqual(parse_duration(text), seconds, places=9, msg=text)

    def test_format_like_go(self) -> None:
        cases = {
            0: "0s",
            300: "5m0s",
            3600: "1h0m0s",
            0.25: "250ms",
            90: "1m30s",
            1.5: "1.5s",
            5400: "1h30m0s",
            0.0001: "100\u00b5s",
            1e-8: "10ns",
        }
        for seconds, text in cases.items():
            self.assertEqual(format_duration(seconds), text)

    def test_rejects(self) -> None:
        for bad in ("", "5", "1x", "h", "-1s", "1h-2m", "abc", "1.2.3s"):
            self.assertRaises(DurationError, parse_duration, bad)


class KeyTests(unittest.TestCase):
    def test_default_key_vectors(self) -> None:
        # SPEC §1 / issue 2 vector, and the real client on port 41003 of SPEC §7.
        self.assertEqual(default_key(10101), "e68be2b4")
        self.assertEqual(default_key(41003), "61741aaf")

    def test_url_without_key_uses_default(self) -> None:
        cfg = parse_url("client://127.0.0.1:10101/127.0.0.1:80")
        self.assertEqual(cfg.tunnel_key, "e68be2b4")
        self.assertFalse(cfg.key_given)

    def test_url_with_key(self) -> None:
        cfg = parse_url("server://s3cr%40t@0.0.0.0:10101/127.0.0.1:80")
        self.assertEqual(cfg.tunnel_key, "s3cr@t")
        self.assertTrue(cfg.key_given)


class TunnelURLTests(unittest.TestCase):
    def test_defaults(self) -> None:
        cfg = parse_url("server://0.0.0.0:10101/127.0.0.1:8080")
        self.assertIsInstance(cfg, TunnelConfig)
        self.assertEqual(cfg.role, "server")
        self.assertEqual(cfg.tunnel, Address("0.0.0.0", 10101))
        self.assertEqual(cfg.targets, (Address("127.0.0.1", 8080),))
        expected = dict(
            log="info", tls=0, crt="", key="", dns=300.0, max=1024, mode=0, quic=0,
            dial="auto", read=0.0, rate=0, slot=65536, proxy=0, notcp=0, noudp=0,
        )
        for name, value in expected.items():
            self.assertEqual(getattr(cfg, name), value, name)
        self.assertEqual(parse_url("client://h:1/t:2").min, 64)
        self.assertEqual(cfg.warnings, ())

    def test_every_parameter(self) -> None:
        cfg = parse_url(
            "server://k@[::]:10101/[::1]:80,example.com:81?log=debug&tls=2&crt=/c.pem&key=/k.pem"
            "&dns=30s&max=10&mode=1&quic=0&dial=127.0.0.2&read=1h30m&rate=8&slot=7&proxy=1&notcp=1&noudp=1"
        )
        self.assertEqual(cfg.tunnel, Address("::", 10101))
        self.assertEqual(cfg.targets, (Address("::1", 80), Address("example.com", 81)))
        self.assertEqual(
            (cfg.log, cfg.tls, cfg.crt, cfg.key, cfg.dns, cfg.max, cfg.mode, cfg.dial, cfg.read),
            ("debug", 2, "/c.pem", "/k.pem", 30.0, 10, 1, "127.0.0.2", 5400.0),
        )
        self.assertEqual((cfg.rate, cfg.slot, cfg.proxy, cfg.notcp, cfg.noudp), (8, 7, 1, 1, 1))
        self.assertEqual(cfg.targets_text(), "[::1]:80,example.com:81")
        client = parse_url("client://h:1/t:2?min=3&mode=2")
        self.assertEqual((client.min, client.mode), (3, 2))

    def test_bad_values_fall_back_with_warning(self) -> None:
        cfg = parse_url(
            "client://h:1/t:2?log=loud&min=abc&mode=7&dns=soon&read=-1s&rate=-3&slot=x&proxy=2&dial=nowhere"
        )
        self.assertEqual(
            (cfg.log, cfg.min, cfg.mode, cfg.dns, cfg.read, cfg.rate, cfg.slot, cfg.proxy, cfg.dial),
            ("info", 64, 0, 300.0, 0.0, 0, 65536, 0, "auto"),
        )
        self.assertEqual(len(cfg.warnings), 9)
        self.assertIn("Invalid min='abc'", " ".join(cfg.warnings))

    def test_quic_forces_tls(self) -> None:
        cfg = parse_url("server://:10101/127.0.0.1:80?quic=1")
        self.assertEqual((cfg.quic, cfg.tls), (1, 1))

    def test_start_url_matches_spec_example(self) -> None:
        """1.12 form (SPEC §7) for instances pinned to 1.12 or using quic=."""
        cfg = parse_url("client://127.0.0.1:41003/127.0.0.1:41001?mode=2&wire=1.12")
        self.assertEqual(
            "Client started: " + cfg.start_url(),
            "Client started: client://61741aaf@127.0.0.1:41003/127.0.0.1:41001?dns=5m0s&min=64&mode=2"
            "&quic=0&dial=auto&read=0s&rate=0&slot=65536&proxy=0&notcp=0&noudp=0",
        )
        server = parse_url("server://:10101/127.0.0.1:80?dns=1h&quic=0")
        self.assertEqual(
            server.start_url(mode=1),
            "server://e68be2b4@:10101/127.0.0.1:80?dns=1h0m0s&max=1024&mode=1&quic=0&dial=auto"
            "&read=0s&rate=0&slot=65536&proxy=0&notcp=0&noudp=0",
        )

    def test_start_url_matches_spec_114_example(self) -> None:
        """SPEC-1.14 §7: type= in place of quic=, block= after proxy=, and
        the client's sni= after dns=."""
        server = parse_url("server://127.0.0.1:10101/127.0.0.1:8080?mode=1")
        self.assertEqual(
            "Server started: " + server.start_url(),
            "Server started: server://e68be2b4@127.0.0.1:10101/127.0.0.1:8080?dns=5m0s&max=1024&mode=1&type=0"
            "&dial=auto&read=0s&rate=0&slot=65536&proxy=0&block=0&notcp=0&noudp=0",
        )
        client = parse_url("client://127.0.0.1:41003/127.0.0.1:41001?mode=2")
        self.assertEqual(
            client.start_url(),
            "client://61741aaf@127.0.0.1:41003/127.0.0.1:41001?dns=5m0s&sni=none&min=64&mode=2&dial=auto"
            "&read=0s&rate=0&slot=65536&proxy=0&block=0&notcp=0&noudp=0",
        )
        named = parse_url("client://tunnel.example:41003/127.0.0.1:41001?block=31")
        self.assertIn("&sni=tunnel.example&", named.start_url())
        self.assertIn("&block=31&", named.start_url())
        self.assertEqual(named.blocked, {BlockedProtocol.SOCKS, BlockedProtocol.TLS})
        self.assertIn("&sni=cdn.example&", parse_url("client://[::1]:1/t:2?sni=cdn.example").start_url())

    def test_config_url_matches_spec_example(self) -> None:
        cfg = parse_url("client://127.0.0.1:7011/127.0.0.1:8088?log=warn&wire=1.12")
        self.assertEqual(
            cfg.config_url(),
            "client://127.0.0.1:7011/127.0.0.1:8088?dial=auto&dns=5m0s&log=warn&min=64&mode=0"
            "&notcp=0&noudp=0&proxy=0&rate=0&read=0s&slot=65536&wire=1.12",
        )
        server = parse_url("server://key@:10101/127.0.0.1:80?tls=1&log=info&quic=0")
        self.assertEqual(
            server.config_url(),
            "server://key@:10101/127.0.0.1:80?dial=auto&dns=5m0s&log=info&max=1024&mode=0"
            "&notcp=0&noudp=0&proxy=0&quic=0&rate=0&read=0s&slot=65536&tls=1",
        )

    def test_config_url_matches_spec_114_example(self) -> None:
        """SPEC-1.14 §8: the client gains sni= and block=, the server
        type= (in place of quic=) and block=."""
        cfg = parse_url("client://127.0.0.1:39233/127.0.0.1:52055?log=info")
        self.assertEqual(
            cfg.config_url(),
            "client://127.0.0.1:39233/127.0.0.1:52055?block=0&dial=auto&dns=5m0s&log=info&min=64&mode=0"
            "&notcp=0&noudp=0&proxy=0&rate=0&read=0s&slot=65536&sni=none",
        )
        server = parse_url("server://127.0.0.1:39233/127.0.0.1:56575?log=info")
        self.assertEqual(
            server.config_url(),
            "server://127.0.0.1:39233/127.0.0.1:56575?block=0&dial=auto&dns=5m0s&log=info&max=1024&mode=0"
            "&notcp=0&noudp=0&proxy=0&rate=0&read=0s&slot=65536&type=0",
        )

    def test_114_parameters_checked(self) -> None:
        cfg = parse_url("client://h:1/t:2?sni=a%20b&block=x&wire=2.0")
        self.assertEqual((cfg.sni, cfg.block, cfg.wire), ("", "0", Wire.AUTO))
        self.assertEqual(len(cfg.warnings), 3)
        self.assertIn("wire must be auto, 1.12 or 1.14", " ".join(cfg.warnings))
        self.assertEqual(parse_url("server://:10101/127.0.0.1:80?type=2").type, 2)
        h2 = parse_url("server://:10101/127.0.0.1:80?type=3")
        self.assertEqual((h2.type, h2.tls), (3, 1))  # HTTP/2 pools always encrypt
        self.assertEqual(parse_url("server://:10101/127.0.0.1:80?type=4").type, 0)  # out of range: default
        # Pinned to 1.12, type= means nothing (as quic= means nothing to 1.14).
        self.assertEqual(parse_url("server://:10101/127.0.0.1:80?type=2&wire=1.12").quic, 0)
        # QUIC (and HTTP/2) pools always encrypt (SPEC-1.14 §1).
        quic = parse_url("server://:10101/127.0.0.1:80?type=1")
        self.assertEqual((quic.type, quic.tls), (1, 1))
        self.assertIn("type=1 requires TLS, using tls=1", quic.warnings)
        # A client learns the pool type from the server.
        self.assertNotIn("type", parse_url("client://h:1/t:2?type=1").given)


class BadURLTests(unittest.TestCase):
    def test_refused(self) -> None:
        bad = [
            "",
            "nothing",
            "http://h:1/t:2",
            "server://",
            "server://h/t:2",
            "server://h:99999/t:2",
            "server://h:1",
            "server://h:1/",
            "client://h:1/t",
            "client://h:1/t:0",
            "client://h:1/::1:80",
            "client://[::1:1/t:2",
            "master://",
        ]
        for text in bad:
            self.assertRaises(URLError, parse_url, text)

    def test_loop_check(self) -> None:
        self.assertRaises(URLError, parse_url, "server://0.0.0.0:8080/127.0.0.1:8080")
        self.assertRaises(URLError, parse_url, "client://10.0.0.1:8080/localhost:8080")
        self.assertRaises(URLError, parse_url, "server://:8080/10.0.0.2:8080")
        self.assertRaises(URLError, parse_url, "server://[::]:8080/[::1]:8080")
        # A remote target on the same port through a specific tunnel host is fine.
        parse_url("client://10.0.0.1:8080/10.0.0.2:8080")


class MasterURLTests(unittest.TestCase):
    def test_master(self) -> None:
        cfg = parse_url("master://127.0.0.1:9090")
        self.assertIsInstance(cfg, MasterConfig)
        self.assertEqual((cfg.api, cfg.prefix, cfg.log, cfg.tls), (Address("127.0.0.1", 9090), "/api", "info", 0))
        cfg = parse_url("master://0.0.0.0:9090/admin/?log=debug&tls=2&crt=a&key=b")
        self.assertEqual((cfg.prefix, cfg.log, cfg.tls, cfg.crt, cfg.key), ("/admin", "debug", 2, "a", "b"))


class TunablesTests(unittest.TestCase):
    def test_defaults(self) -> None:
        t = Tunables.from_environ({})
        self.assertEqual(
            (t.semaphore_limit, t.tcp_data_buf_size, t.udp_data_buf_size, t.handshake_timeout, t.tcp_dial_timeout),
            (65536, 16384, 16384, 5.0, 5.0),
        )
        self.assertEqual(
            (t.udp_dial_timeout, t.udp_read_timeout, t.pool_get_timeout, t.min_pool_interval, t.max_pool_interval),
            (5.0, 30.0, 5.0, 0.1, 1.0),
        )
        self.assertEqual(
            (t.report_interval, t.service_cooldown, t.shutdown_timeout, t.reload_interval), (5.0, 3.0, 5.0, 3600.0)
        )

    def test_environment(self) -> None:
        t = Tunables.from_environ(
            {"NP_REPORT_INTERVAL": "250ms", "NP_UDP_DATA_BUF_SIZE": "2048", "NP_RELOAD_INTERVAL": "2h", "NP_TCP_DIAL_TIMEOUT": "x"}
        )
        self.assertEqual((t.report_interval, t.udp_data_buf_size, t.reload_interval), (0.25, 2048, 7200.0))
        self.assertEqual(t.tcp_dial_timeout, 5.0)
        self.assertEqual(len(t.warnings), 1)


class StrictPortTests(unittest.TestCase):
    """Ports are ASCII digits, 1-65535 (0 where we listen), everywhere."""

    def test_split_host_port(self) -> None:
        self.assertEqual(split_host_port("127.0.0.1:80"), ("127.0.0.1", 80))
        self.assertEqual(split_host_port("[::1]:65535"), ("::1", 65535))
        self.assertEqual(split_host_port("h:00080"), ("h", 80))
        self.assertEqual(split_host_port("h:0", allow_zero=True), ("h", 0))
        self.assertRaises(URLError, split_host_port, "h:0")
        for port in BAD_PORTS:
            for text in (f"127.0.0.1:{port}", f"[::1]:{port}"):
                with self.assertRaises(URLError, msg=text) as cm:
                    split_host_port(text, allow_zero=True)
                self.assertLess(len(str(cm.exception)), 400)  # a 5,000-digit port is not echoed whole

    def test_urls(self) -> None:
        for port in BAD_PORTS:
            for url in (f"client://127.0.0.1:{port}/127.0.0.1:80", f"server://[::1]:{port}/127.0.0.1:80",
                        f"client://127.0.0.1:1/127.0.0.1:{port}", f"client://127.0.0.1:1/127.0.0.1:80,127.0.0.1:{port}",
                        f"master://127.0.0.1:{port}/api"):
                with self.assertRaises(URLError, msg=url) as cm:
                    parse_url(url)
                self.assertNotIn("\n", str(cm.exception))
        # Listen addresses may ask the OS for a port; targets may not.
        self.assertEqual(parse_url("client://127.0.0.1:0/127.0.0.1:9?mode=1").tunnel.port, 0)
        self.assertEqual(parse_url("master://127.0.0.1:0").api.port, 0)
        self.assertRaises(URLError, parse_url, "client://127.0.0.1:1/127.0.0.1:0")

    def test_numeric_parameters_are_ascii(self) -> None:
        for name, value in (("min", "٣"), ("slot", "9" * 5000), ("rate", "1_000"), ("mode", " 1"), ("dns", "٣s"),
                            ("read", "9" * 400 + "h"), ("dns", "9223372037s")):
            cfg = parse_url(f"client://127.0.0.1:1/127.0.0.1:2?{name}={value}")
            self.assertNotIn(name, cfg.given, (name, value))
            self.assertEqual(len(cfg.warnings), 1, (name, value))
            cfg.config_url()  # the default is written back, not an overflow
        self.assertEqual(parse_url("client://127.0.0.1:1/127.0.0.1:2?min=%2B8").min, 8)  # "+" alone is a space in a query
        t = Tunables.from_environ({"NP_SEMAPHORE_LIMIT": "٣", "NP_REPORT_INTERVAL": "9" * 400 + "h", "NP_TCP_DATA_BUF_SIZE": "1" + "0" * 5000})
        self.assertEqual((t.semaphore_limit, t.report_interval, t.tcp_data_buf_size), (65536, 5.0, 16384))
        self.assertEqual(len(t.warnings), 3)

    @settings(max_examples=examples(300))
    @given(host=st.text(max_size=12), port=st.text(max_size=8) | st.integers(-10, 70000).map(str))
    def test_any_text_is_parsed_or_refused(self, host: str, port: str) -> None:
        """Whatever the text, URLError or a valid address: never another
        exception, never a port out of range, never a control character."""
        for text in (f"{host}:{port}", f"[{host}]:{port}"):
            try:
                h, p = split_host_port(text, allow_zero=True)
            except URLError:
                continue
            self.assertTrue(0 <= p <= 65535 and port.strip().isascii() and port.strip().isdigit(), (text, p))
            self.assertIsNone(text_problem(h), text)
        for url in (f"client://{host}:{port}/127.0.0.1:80", f"server://127.0.0.1:1/{host}:{port}?log={host}"):
            try:
                cfg = parse_url(url)
            except URLError as e:
                self.assertIsNone(text_problem(str(e)), url)
                continue
            for shown in (cfg.start_url(), cfg.config_url(), cfg.raw, *cfg.warnings):
                self.assertIsNone(text_problem(shown), url)


class ControlCharacterTests(unittest.TestCase):
    """Text that would reach log lines raw is refused with a clear error."""

    def test_control_characters_refused(self) -> None:
        for char in CONTROLS:
            enc = "%{:02X}".format(ord(char)) if ord(char) < 0x80 else "".join(f"%{b:02X}" for b in char.encode())
            for url in (f"client://127.0.0.1:1/127.0.0.1:80?log=info{char}", f"client://127.0.0.1:1/127.0.0.1{char}:80",
                        f"client://127.0.0.1{char}:1/127.0.0.1:80", f"client://k{char}@127.0.0.1:1/127.0.0.1:80",
                        f"{char}client://127.0.0.1:1/127.0.0.1:80", f"client://127.0.0.1:1/127.0.0.1:80{char}",
                        f"client://127.0.0.1:1/127.0.0.1{enc}:80", f"client://k{enc}@127.0.0.1:1/127.0.0.1:80",
                        f"server://127.0.0.1:1/127.0.0.1:80?crt={enc}", f"master://127.0.0.1:1/api{enc}"):
                with self.assertRaises(URLError, msg=repr(url)) as cm:
                    parse_url(url)
                message = str(cm.exception)
                self.assertIn(f"control character U+{ord(char):04X} not allowed", message)
                self.assertIsNone(text_problem(message))

    def test_lone_surrogates_refused(self) -> None:
        # Undecodable bytes in argv reach Python as lone surrogates.
        for url in ("client://127.0.0.1:1/\udcff:80", "client://\ud800@127.0.0.1:1/127.0.0.1:80"):
            with self.assertRaises(URLError) as cm:
                parse_url(url)
            self.assertIn("not valid UTF-8 text", str(cm.exception))

    def test_text_problem(self) -> None:
        self.assertIsNone(text_problem("plain text, ünïcödé, 😀, \u00a0 and \u200b"))
        self.assertEqual(text_problem("a\u2029"), "control character U+2029 not allowed")
        self.assertEqual(text_problem("\ud83d"), "not valid UTF-8 text (lone surrogate U+D83D)")


class CLITests(unittest.TestCase):
    """A URL the CLI cannot run: one line on stderr, exit status 2."""

    def run_cli(self, url: str) -> tuple[int, str]:
        err = io.StringIO()
        with redirect_stderr(err):
            status = cli.main([url])
        return status, err.getvalue()

    def test_bad_urls_one_line(self) -> None:
        for url in ("client://127.0.0.1:²/127.0.0.1:80", "client://127.0.0.1:" + "9" * 5000 + "/127.0.0.1:80",
                    "client://127.0.0.1:1/127.0.0.1:80\n2026-01-01 00:00:00.000  ERROR  forged",
                    "client://127.0.0.1:1/\udcff:80", "client://127.0.0.1:1/127.0.0.1:٨٠"):
            status, err = self.run_cli(url)
            self.assertEqual(status, 2, url)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertTrue(err.startswith("nodepass: invalid URL "), err)
            self.assertLess(len(err), 800)

    def test_real_process(self) -> None:
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from nodepass.cli import main; sys.exit(main())", "client://127.0.0.1:²/127.0.0.1:80"],
            capture_output=True,
            timeout=30,
        )
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertEqual(proc.stdout, b"")
        self.assertEqual(proc.stderr.count(b"\n"), 1, proc.stderr)
        self.assertNotIn(b"Traceback", proc.stderr)
