"""What the slot limit turns away (SPEC §5: refused "with an error log"),
reported without flooding the log: UDP datagrams and sessions at either
end, TCP connections at the entry and in single-end mode, launches at the
exit."""

from __future__ import annotations

from nodepass.base.logs import NodeLog
from nodepass.config.durations import format_duration


class DropReport:
    """Counts what the slot limit turns away and logs one summary line per
    report interval instead of one line per item.

    A full instance drops every datagram of every new source, or refuses
    every new connection; one ERROR line each would flood the log
    (thousands a second) and hide everything else -- and a log written
    faster than its reader takes it stalls the reactor that writes it.
    :meth:`drop` is one counter increment; the first drop of a quiet
    period arms a single timer that logs ``UDP slot limit reached (N),
    dropped M datagrams in the last 5s`` and re-arms while drops go on.
    With ``first_alone`` the first drop of a quiet period is left to the
    caller to log as a line of its own (:meth:`drop` says so), so a lone
    refusal reads as it always did, and the summary counts the ones after
    it: ``TCP slot limit reached (N), refused M more connections in the
    last 5s``.  :meth:`close` logs what is still counted and cancels the
    timer.
    """

    __slots__ = (
        "clock", "log", "interval", "what", "kind", "verb", "first_alone", "count", "limit", "last_from", "_since", "_call",
    )

    def __init__(
        self,
        clock,
        log: NodeLog,
        interval: float,
        what: str = "datagrams",
        kind: str = "UDP",
        verb: str = "dropped",
        first_alone: bool = False,
    ):
        self.clock = clock
        self.log = log
        self.interval = interval if interval > 0 else 5.0
        self.what = what
        self.kind = kind
        self.verb = verb
        self.first_alone = first_alone
        self.count = 0
        self.limit = 0
        self.last_from = ""
        self._since = 0.0
        self._call = None

    def drop(self, limit: int, source: str = "") -> bool:
        """One item from ``source`` turned away at the slot limit ``limit``.
        True when the caller is to log this one itself (``first_alone``,
        and the first of a quiet period)."""
        self.limit = limit
        self.last_from = source
        if self._call is None:
            self._since = self.clock.seconds()
            self._call = self.clock.callLater(self.interval, self._tick)
            if self.first_alone:
                return True
        self.count += 1
        return False

    def _tick(self) -> None:
        self._call = None
        if self.count:  # drops go on: report them and keep watching
            self._summary()
            self._call = self.clock.callLater(self.interval, self._tick)

    def _summary(self) -> None:
        now = self.clock.seconds()
        count, self.count = self.count, 0
        last = f" (the last from {self.last_from})" if self.last_from else ""
        more = " more" if self.first_alone else ""
        self.log.error(
            "%s slot limit reached (%d), %s %d%s %s in the last %s%s",
            self.kind, self.limit, self.verb, count, more, self.what, format_duration(round(now - self._since, 3)), last,
        )
        self._since = now

    def close(self) -> None:
        """Log what is still counted (shutdown) and cancel the timer."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if self.count:
            self._summary()


__all__ = ["DropReport"]
