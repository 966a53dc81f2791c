"""NodePass log lines (SPEC §7) through twisted.logger."""

from __future__ import annotations

import io
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, Logger, globalLogPublisher
from twisted.trial import unittest

from nodepass.base.logs import NodeLog, NodePassObserver, escape_controls, format_line
from nodepass.base.stats import Checkpoint

from tests import examples

FORGED = "\n2026-01-01 00:00:00.000  ERROR  forged"
# Every character that ends or rewrites a line somewhere: C0, DEL, C1, the
# Unicode line and paragraph separators, and lone surrogates (unwritable).
HOSTILE = [chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)] + ["\u2028", "\u2029", "\ud800", "\udfff"]

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  (DEBUG|INFO|WARN|ERROR|EVENT)  (.*)$")


class Capture:
    """Routes the global publisher into a NodePassObserver on a StringIO."""

    def __init__(self, test: unittest.TestCase, level: str = "info", colour: bool | None = None, stream=None):
        self.stream = stream if stream is not None else io.StringIO()
        self.observer = NodePassObserver(self.stream, level, colour=colour)
        globalLogPublisher.addObserver(self.observer)
        test.addCleanup(globalLogPublisher.removeObserver, self.observer)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()


class FormatTests(unittest.TestCase):
    def test_line_shape(self) -> None:
        line = format_line("warn", "hello", 0.5)
        m = LINE.match(line)
        self.assertIsNotNone(m)
        self.assertEqual(m.group(1), "WARN")
        self.assertTrue(line.split("  ")[0].endswith(".500"))

    def test_levels_filter(self) -> None:
        cap = Capture(self)
        log = NodeLog("warn")
        log.debug("d")
        log.info("i")
        log.warn("w %s", 1)
        log.error("e")
        log.event("ev")
        self.assertEqual([LINE.match(x).groups() for x in cap.lines()], [("WARN", "w 1"), ("ERROR", "e"), ("EVENT", "ev")])

    def test_event_level_shows_only_events(self) -> None:
        cap = Capture(self)
        log = NodeLog("event")
        log.error("e")
        log.event("CHECK_POINT|x")
        self.assertEqual([LINE.match(x).group(1) for x in cap.lines()], ["EVENT"])

    def test_none_is_silent(self) -> None:
        cap = Capture(self)
        log = NodeLog("none")
        for m in (log.debug, log.info, log.warn, log.error, log.event):
            m("x")
        self.assertEqual(cap.lines(), [])

    def test_debug_shows_all(self) -> None:
        cap = Capture(self)
        log = NodeLog("debug")
        log.debug("d")
        log.info("i")
        self.assertEqual([LINE.match(x).group(1) for x in cap.lines()], ["DEBUG", "INFO"])

    def test_instance_tag_and_listeners(self) -> None:
        cap = Capture(self)
        log = NodeLog("info", instance_id="abcd1234")
        seen = []
        log.listeners.append(lambda level, line: seen.append((level, line)))
        log.info("Client started: x")
        self.assertEqual(LINE.match(cap.lines()[0]).group(2), "[abcd1234] Client started: x")
        self.assertEqual(seen[0][0], "INFO")
        self.assertEqual(LINE.match(seen[0][1]).group(2), "Client started: x")

    def test_braces_and_bad_format_args_are_safe(self) -> None:
        cap = Capture(self)
        log = NodeLog("info")
        log.info("json {x} %d", "notanumber")
        self.assertIn("json {x}", cap.lines()[0])

    def test_twisted_events_formatted(self) -> None:
        cap = Capture(self, level="warn")
        logger = Logger(namespace="tests")
        logger.info("hidden {x}", x=1)
        logger.warn("shown {x}", x=2)
        self.assertEqual([LINE.match(x).groups() for x in cap.lines()], [("WARN", "shown 2")])

    def test_twisted_plumbing_only_at_debug(self) -> None:
        info = Capture(self, level="info")
        debug = Capture(self, level="debug")
        Logger(namespace="tests").info("Starting factory {f}", f="x")
        self.assertEqual(info.lines(), [])
        self.assertEqual([LINE.match(x).groups() for x in debug.lines()], [("DEBUG", "Starting factory x")])

    def test_twisted_failure_has_traceback(self) -> None:
        cap = Capture(self)
        try:
            1 / 0
        except ZeroDivisionError:
            Logger(namespace="tests").failure("boom")
        self.flushLoggedErrors(ZeroDivisionError)
        text = cap.stream.getvalue()
        self.assertIn("ERROR  boom", text)
        self.assertIn("ZeroDivisionError", text)

    def test_colour_only_on_tty(self) -> None:
        class TTY(io.StringIO):
            def isatty(self) -> bool:
                return True

        plain = Capture(self)
        tty = Capture(self, stream=TTY())
        NodeLog("info").warn("careful")
        self.assertNotIn("\x1b[", plain.stream.getvalue())
        self.assertIn("\x1b[33mWARN\x1b[0m", tty.stream.getvalue())

    def test_checkpoint_line(self) -> None:
        cp = Checkpoint(mode=1, ping=3, pool=0, tcps=2, udps=1, tcprx=10, tcptx=20, udprx=30, udptx=40)
        self.assertEqual(
            cp.line(), "CHECK_POINT|MODE=1|PING=3ms|POOL=0|TCPS=2|UDPS=1|TCPRX=10|TCPTX=20|UDPRX=30|UDPTX=40"
        )

    def test_levels_map_to_twisted(self) -> None:
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        NodeLog("debug").error("bad")
        mine = [e for e in events if e.get("np_level")]
        self.assertEqual(mine[-1]["log_level"], LogLevel.error)


class EscapeTests(unittest.TestCase):
    """One log call is always exactly one physical line (issue: forged log
    lines through URLs and aliases)."""

    def assertOneLine(self, text: str) -> str:
        self.assertEqual(text.count("\n"), 1, text)
        line = text[:-1]
        self.assertEqual(line.splitlines(), [line])  # no \r, \x1c-\x1e, \x85, \u2028...
        self.assertIsNotNone(LINE.match(line), line)
        line.encode("utf-8")  # no lone surrogate
        return LINE.match(line).group(2)

    def test_escapes(self) -> None:
        self.assertEqual(escape_controls("a\nb\r\tc"), "a\\nb\\r\\tc")
        self.assertEqual(escape_controls("\x00\x1b[2K\x7f\x85\x9b"), "\\x00\\x1b[2K\\x7f\\x85\\x9b")
        self.assertEqual(escape_controls("\u2028\u2029\ud800"), "\\u2028\\u2029\\ud800")
        plain = "Client started: client://k@127.0.0.1:1/h:2 ünï 😀 \\n as typed"
        self.assertIs(escape_controls(plain), plain)

    def test_message_and_args_escaped(self) -> None:
        for char in HOSTILE:
            stream = io.StringIO()
            observer = NodePassObserver(stream, "debug", colour=False)
            globalLogPublisher.addObserver(observer)
            try:
                log = NodeLog("info", instance_id="abcd1234")
                seen = []
                log.listeners.append(lambda level, line: seen.append(line))
                log.info("Instance created: %s" + char, "url" + char + FORGED)
            finally:
                globalLogPublisher.removeObserver(observer)
            message = self.assertOneLine(stream.getvalue())
            self.assertTrue(message.startswith("[abcd1234] Instance created: url"), message)
            self.assertTrue(message.endswith("  ERROR  forged" + escape_controls(char)), message)
            self.assertEqual(len(seen), 1)
            self.assertEqual(self.assertOneLine(seen[0] + "\n"), message[len("[abcd1234] "):])

    def test_format_line(self) -> None:
        self.assertOneLine(format_line("info", "a" + FORGED + "\r\u2028") + "\n")

    def test_twisted_events_and_tracebacks_one_line(self) -> None:
        cap = Capture(self, level="debug")
        Logger(namespace="tests").warn("peer said {what}", what="bye" + FORGED)
        try:
            raise ValueError("multi\nline")
        except ValueError:
            Logger(namespace="tests").failure("boom")
        self.flushLoggedErrors(ValueError)
        text = cap.stream.getvalue()
        self.assertEqual(len(cap.lines()), 2, text)
        for line in cap.lines():
            self.assertOneLine(line + "\n")
        self.assertIn("Traceback (most recent call last):\\n", cap.lines()[1])
        self.assertIn("ValueError: multi\\nline", cap.lines()[1])

    def test_emitted_event_text_is_escaped(self) -> None:
        """Other observers (twistd's log file) print np_text as it is."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        NodeLog("info").warn("x%s", FORGED)
        self.assertEqual([e["np_text"] for e in events if e.get("np_level")], ["x" + escape_controls(FORGED)])

    @settings(max_examples=examples(200))
    @given(message=st.text(max_size=30), args=st.lists(st.text(max_size=10) | st.integers(), max_size=3))
    def test_any_text_is_one_line(self, message: str, args: list) -> None:
        stream = io.StringIO()
        observer = NodePassObserver(stream, "debug", colour=False)
        globalLogPublisher.addObserver(observer)
        try:
            NodeLog("debug").error(message, *args)
        finally:
            globalLogPublisher.removeObserver(observer)
        self.assertOneLine(stream.getvalue())
