"""NodePass log lines (SPEC §7) through :mod:`twisted.logger`.

Operators and dashboards parse ``YYYY-MM-DD HH:MM:SS.mmm  LEVEL  message``, so
every line we print has exactly that shape, whether it comes from a tunnel, the
master, or Twisted itself.  Each instance filters by its own ``log=`` level
*before* emitting, so a quiet instance costs nothing on the global publisher;
the observer only formats.
"""

from __future__ import annotations

import re
import sys
import time
from typing import IO, Callable, Optional, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    Logger,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
    globalLogPublisher,
)
from zope.interface import implementer

#: Go's start-up line for ``tls=0`` (a server's or a master's), as
#: ``(level, text)``.
UNENCRYPTED_LINE = ("warn", "TLS code-0: unencrypted")

ORDER = {"debug": 0, "info": 1, "warn": 2, "error": 3, "event": 4, "none": 5}
_TW_LEVEL = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "event": LogLevel.info,
}
# Twisted's own info events ("Starting factory ...", "(TCP Port 9090 Closed)")
# describe plumbing, not the tunnel: they show at log=debug only, so an
# operator's info-level output holds NodePass lines alone.
_FROM_TW = {
    LogLevel.debug: "debug",
    LogLevel.info: "debug",
    LogLevel.warn: "warn",
    LogLevel.error: "error",
    LogLevel.critical: "error",
}
_COLOURS = {"DEBUG": "\x1b[36m", "INFO": "\x1b[32m", "WARN": "\x1b[33m", "ERROR": "\x1b[31m", "EVENT": "\x1b[35m"}

LineListener = Callable[[str, str], None]

#: Characters that end, rewrite or hide a line on a terminal or in a log
#: parser: C0 controls (newline, carriage return, escape...), DEL, C1
#: controls (NEL among them) and the Unicode line and paragraph
#: separators.  Used to refuse such text at the API and in URLs and to
#: escape it in log lines.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What escape_controls() rewrites: the above plus lone surrogates, which
# cannot be written as UTF-8 at all (the line would be lost).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: "re.Match[str]") -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character, line separator and lone
    surrogate replaced by a visible escape (``\\n``, ``\\x1b``,
    ``\\u2028``, ``\\ud800``).

    One log call must give exactly one physical line: a message carrying a
    newline (a URL, an alias, a peer's error text) would otherwise let
    whoever wrote that text forge lines that dashboards parse as ours.
    Backslashes are left alone, so the escape is for eyes, not reversible.
    """
    if text.isprintable():  # the common case, checked in C
        return text
    return _UNSAFE.sub(_visible, text)


def timestamp(when: float | None = None) -> str:
    """``2026-11-21 21:02:07.123`` in local time, as Go's logger prints it."""
    when = time.time() if when is None else when
    ms = int((when - int(when)) * 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) + f".{ms:03d}"


def format_line(level: str, message: str, when: float | None = None) -> str:
    """One NodePass log line, without the newline: control characters in
    ``message`` are escaped (:func:`escape_controls`), so it is always
    exactly one physical line."""
    text = message if isinstance(message, str) else str(message)
    return f"{timestamp(when)}  {level.upper()}  {escape_controls(text)}"


class NodeLog:
    """The logger of one instance (or of the master itself).

    ``level`` is the instance's ``log=`` value.  ``instance_id`` tags lines in
    a master's output.  ``listeners`` get ``(LEVEL, formatted line)`` for every
    line that passes the filter -- the master turns them into SSE ``log``
    events without re-parsing text.
    """

    def __init__(self, level: str = "info", instance_id: Optional[str] = None, namespace: str = "nodepass"):
        self.level = level if level in ORDER else "info"
        self._threshold = ORDER[self.level]
        self.instance_id = instance_id
        self.listeners: list[LineListener] = []
        self._logger = Logger(namespace=namespace)

    def enabled(self, level: str) -> bool:
        return ORDER[level] >= self._threshold and self._threshold < ORDER["none"]

    def _emit(self, level: str, message: str, args: tuple) -> None:
        if ORDER[level] < self._threshold or self._threshold == ORDER["none"]:
            return
        if args:
            try:
                message = message % args
            except (TypeError, ValueError):
                message = f"{message} {args!r}"
        self._publish(level, message, time.time())

    def _publish(self, level: str, message: str, when: float) -> None:
        """Emit one line that passed the filter, at time ``when``."""
        # Escaped here too (not only in format_line) because other observers
        # of the global publisher (twistd's log file) print np_text as is.
        message = escape_controls(message if isinstance(message, str) else str(message))
        self._logger.emit(
            _TW_LEVEL[level],
            "{np_text}",
            np_text=message,
            np_level=level.upper(),
            np_instance=self.instance_id,
            log_time=when,
        )
        if self.listeners:
            line = format_line(level, message, when)
            for listener in list(self.listeners):
                listener(level.upper(), line)

    def replay(self, level: str, message: str, when: float) -> None:
        """A line another process wrote (an instance in a worker process):
        it passed that instance's filter there, so it is emitted as is,
        with its own time, to the same observers and listeners as a line
        of this process."""
        word = level.lower()
        self._publish(word if word in _TW_LEVEL else "info", message, when)

    def debug(self, message: str, *args) -> None:
        self._emit("debug", message, args)

    def info(self, message: str, *args) -> None:
        self._emit("info", message, args)

    def warn(self, message: str, *args) -> None:
        self._emit("warn", message, args)

    def error(self, message: str, *args) -> None:
        self._emit("error", message, args)

    def event(self, message: str, *args) -> None:
        self._emit("event", message, args)


@implementer(ILogObserver)
class NodePassObserver:
    """Writes NodePass lines for our events and for Twisted's own.

    Twisted's events are shown at or above ``level`` (the process's level),
    with tracebacks for failures so nothing unexpected is hidden.
    """

    def __init__(self, stream: IO[str] | Callable[[], IO[str]] | None = None, level: str = "info", colour: Optional[bool] = None):
        self._stream = stream
        self._threshold = ORDER.get(level, 1)
        self._colour = colour

    def _out(self) -> IO[str]:
        stream = self._stream
        if stream is None:
            return sys.stdout
        if callable(stream) and not hasattr(stream, "write"):
            return stream()
        # A stream (one with ``write`` may be callable too).
        return cast(IO[str], stream)

    def __call__(self, event: dict) -> None:
        level = event.get("np_level")
        if level is not None:
            text = event.get("np_text", "")
            inst = event.get("np_instance")
            if inst:
                text = f"[{inst}] {text}"
        else:
            word = _FROM_TW.get(event.get("log_level"), "info")
            if ORDER[word] < self._threshold or self._threshold == ORDER["none"]:
                return
            level = word.upper()
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                try:
                    text = f"{text}\n{failure.getTraceback()}"
                except Exception:  # pragma: no cover - defensive
                    text = f"{text} {failure!r}"
            if not text:
                return
        out = self._out()
        colour = self._colour
        if colour is None:
            isatty = getattr(out, "isatty", None)
            colour = bool(isatty and isatty())
        line = format_line(level, text, event.get("log_time"))
        if colour:
            c = _COLOURS.get(level, "")
            line = line.replace(f"  {level}  ", f"  {c}{level}\x1b[0m  ", 1)
        try:
            out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):
            pass


def start_console_logging(level: str = "info", stream: IO[str] | None = None) -> NodePassObserver:
    """Begin global logging to stdout in NodePass format (console script)."""
    observer = NodePassObserver(stream, level)
    # (``NodePassObserver`` provides ``ILogObserver``; mypy cannot see zope's
    # declarations.)
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, observer)], redirectStandardIO=False, discardBuffer=True)
    return observer


__all__ = [
    "NodeLog",
    "NodePassObserver",
    "escape_controls",
    "format_line",
    "start_console_logging",
    "globalLogPublisher",
    "FilteringLogObserver",
    "PredicateResult",
]
