"""Server-Sent Events for ``GET /events`` (SPEC §8).

Each subscriber is a :class:`SSEStream` registered as the *push producer* of
its HTTP request: when the connection's transport buffer fills (the reader
stopped reading), Twisted pauses it and further events queue here.  Once the
queue passes ``limit`` bytes the subscriber is disconnected, so a stuck
dashboard can neither slow the master down nor make it buffer without bound.
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from typing import Iterable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from nodepass.compat.twisted_internals import http_channel_paused
from nodepass.master.records import json_utf8

RETRY = b"retry: 3000\n\n"
DEFAULT_LIMIT = 1 << 20  # bytes queued for one paused subscriber before it is dropped


def rfc3339_nano(ns: Optional[int] = None) -> str:
    """``ns`` (nanoseconds since the epoch, default now) as Go's JSON
    encoding of a ``time.Time`` writes it: RFC 3339 with nanoseconds,
    trailing zeros trimmed (the fraction vanishes when it is zero), in the
    local zone, ``Z`` for a zero offset -- ``2025-11-25T08:00:00.123456789Z``,
    ``2025-11-25T16:00:00.5+08:00``."""
    if ns is None:
        ns = time.time_ns()
    seconds, fraction = divmod(ns, 1_000_000_000)
    local = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).astimezone()
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += ("." + f"{fraction:09d}").rstrip("0")
    offset = local.utcoffset() or datetime.timedelta(0)
    minutes = int(offset.total_seconds()) // 60  # Go's "Z07:00" drops seconds
    if minutes == 0:
        return text + "Z"
    sign = "+" if minutes > 0 else "-"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


def encode_event(kind: str, instance: Optional[dict], logs: str = "") -> bytes:
    """One SSE event: ``event: instance`` and a one-line ``data:`` JSON with
    Go's fields in Go's order (``type``, ``time``, ``instance``, ``logs``)."""
    payload = {"type": kind, "time": rfc3339_nano(), "instance": instance, "logs": logs}
    return b"event: instance\ndata: " + json_utf8(payload) + b"\n\n"


@implementer(IPushProducer)
class SSEStream:
    """One subscriber.  ``done`` fires when the stream ends for any reason."""

    def __init__(self, hub: "EventHub", request, limit: int):
        self.hub = hub
        self.request = request
        self.limit = limit
        self.paused = False
        self.closed = False
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.done: Deferred = Deferred()
        request.registerProducer(self, True)
        # the channel only tells producers about *later* buffer changes
        if http_channel_paused(request.channel):
            self.paused = True
        request.notifyFinish().addBoth(lambda _: self._gone())

    # IPushProducer, driven by the HTTP channel's transport
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.queue and not self.paused and not self.closed:
            chunk = self.queue.popleft()
            self.queued -= len(chunk)
            self.request.write(chunk)

    def stopProducing(self) -> None:
        self._gone()

    def send(self, chunk: bytes) -> None:
        if self.closed:
            return
        if self.paused or self.queue:
            self.queue.append(chunk)
            self.queued += len(chunk)
            if self.queued > self.limit:
                self.drop()
            return
        self.request.write(chunk)

    def drop(self) -> None:
        """Disconnect a subscriber that stopped reading."""
        if self.closed:
            return
        self.hub.dropped += 1
        self.hub.log.warn("SSE subscriber dropped: %d bytes of events unread", self.queued)
        transport = getattr(self.request.channel, "transport", None) if self.request.channel else None
        self._gone()
        if transport is not None:
            abort = getattr(transport, "abortConnection", None) or transport.loseConnection
            abort()

    def close(self, last: bytes = b"") -> None:
        """Send ``last`` (even past the bound) and end the response."""
        if self.closed:
            return
        if last:
            self.queue.append(last)
        chunks, self.queue = list(self.queue), deque()
        self.queued = 0
        for chunk in chunks:
            self.request.write(chunk)
        self._gone()

    def _gone(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        self.queued = 0
        self.hub.streams.discard(self)
        try:
            self.request.unregisterProducer()
        except Exception:  # noqa: BLE001 - the channel may be gone already
            pass
        if not self.done.called:
            self.done.callback(None)


class EventHub:
    """Fans instance events out to every live :class:`SSEStream`."""

    def __init__(self, log, limit: int = DEFAULT_LIMIT):
        self.log = log
        self.limit = limit
        self.streams: set[SSEStream] = set()
        self.dropped = 0

    def subscribe(self, request, initial: Iterable[dict]) -> Deferred:
        """Start a stream on ``request``: headers, ``retry``, one ``initial``
        event per instance, all flushed in one write.  Returns the Deferred
        that fires when the stream ends (the route handler returns it)."""
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"connection", b"keep-alive")
        request.setHeader(b"x-accel-buffering", b"no")
        stream = SSEStream(self, request, self.limit)
        self.streams.add(stream)
        burst = RETRY + b"".join(encode_event("initial", inst) for inst in initial)
        request.write(burst)
        return stream.done

    def publish(self, kind: str, instance: Optional[dict], logs: str = "") -> None:
        if not self.streams:
            return
        chunk = encode_event(kind, instance, logs)
        for stream in list(self.streams):
            stream.send(chunk)

    def shutdown(self) -> None:
        """Send ``shutdown`` to every stream and close them all.  As in Go,
        the event names no instance: ``{"type":"shutdown","time":...,
        "instance":null,"logs":""}`` (dashboards ignore events about
        ``********``, so naming it would hide the shutdown from them)."""
        chunk = encode_event("shutdown", None)
        for stream in list(self.streams):
            stream.close(chunk)
