"""NodePass log lines (SPEC §7) through :mod:`twisted.logger`.

Operators and dashboards parse ``YYYY-MM-DD HH:MM:SS.mmm  LEVEL  message``, so
every line we print has exactly that shape, whether it comes from a tunnel, the
master, or Twisted itself.  Each instance filters by its own ``log=`` level
*before* emitting, so a quiet instance costs nothing on the global publisher;
the observer only formats.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Callable, Optional

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


def timestamp(when: float | None = None) -> str:
    """``2026-11-21 21:02:07.123`` in local time, as Go's logger prints it."""
    when = time.time() if when is None else when
    ms = int((when - int(when)) * 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) + f".{ms:03d}"


def format_line(level: str, message: str, when: float | None = None) -> str:
    """One NodePass log line, without the newline."""
    return f"{timestamp(when)}  {level.upper()}  {message}"


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

    def set_level(self, level: str) -> None:
        self.level = level if level in ORDER else "info"
        self._threshold = ORDER[self.level]

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
        now = time.time()
        self._logger.emit(
            _TW_LEVEL[level],
            "{np_text}",
            np_text=message,
            np_level=level.upper(),
            np_instance=self.instance_id,
            log_time=now,
        )
        if self.listeners:
            line = format_line(level, message, now)
            for listener in list(self.listeners):
                listener(level.upper(), line)

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
        if self._stream is None:
            return sys.stdout
        if callable(self._stream) and not hasattr(self._stream, "write"):
            return self._stream()
        return self._stream  # type: ignore[return-value]

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
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)
    return observer


__all__ = [
    "NodeLog",
    "NodePassObserver",
    "format_line",
    "start_console_logging",
    "globalLogPublisher",
    "FilteringLogObserver",
    "PredicateResult",
]
