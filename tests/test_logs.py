"""NodePass log lines (SPEC §7) through twisted.logger."""

from __future__ import annotations

import io
import re

from twisted.logger import LogLevel, Logger, globalLogPublisher
from twisted.trial import unittest

from nodepass.logs import NodeLog, NodePassObserver, format_line
from nodepass.stats import Checkpoint

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
