"""The AMP vocabulary between a master and its worker processes.

Master to worker: :class:`Start`, :class:`Stop`, :class:`ResetTraffic`.
Worker to master, without answers (they are reports, sent in the order
they happen, on the one pipe): :class:`Log`, :class:`Report`,
:class:`Status`.

An instance's configuration crosses as a pickle of the master's own parsed
:class:`~nodepass.config.urls.TunnelConfig` and
:class:`~nodepass.config.urls.Tunables`: the worker is our own child running
our own code, and sending the parsed objects means the worker runs exactly
what the master validated, with the master's defaults applied (re-parsing
the URL there could drift).  Nothing the worker sends is unpickled: its
reports are typed AMP fields.
"""

from __future__ import annotations

from twisted.protocols import amp

#: AMP values are at most 65,535 bytes; log text is cut below that.
MAX_TEXT = 60000


def fitting(text: str) -> str:
    """``text`` as AMP can carry it: valid UTF-8 (a lone surrogate becomes
    ``?``) of at most :data:`MAX_TEXT` bytes, longer text cut and marked.
    A value AMP refuses would raise in the log observer and lose the line."""
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_TEXT:
        return data.decode("utf-8")
    return data[:MAX_TEXT].decode("utf-8", "ignore") + " [cut]"

COUNTERS: list[tuple[bytes, amp.Argument]] = [
    (b"tcp_rx", amp.Integer()),
    (b"tcp_tx", amp.Integer()),
    (b"udp_rx", amp.Integer()),
    (b"udp_tx", amp.Integer()),
]


class Start(amp.Command):
    """Run an instance.  ``config`` and ``tunables`` are pickles (see the
    module docstring); the counters continue the record's."""

    arguments = [
        (b"instance", amp.Unicode()),
        (b"config", amp.String()),
        (b"tunables", amp.String()),
        (b"slot_limit", amp.Integer()),
        *COUNTERS,
    ]


class Stop(amp.Command):
    """Stop an instance and answer with its final counters (nothing to stop
    answers zeros with ``known`` false)."""

    arguments = [(b"instance", amp.Unicode())]
    response = [(b"known", amp.Boolean()), *COUNTERS]


class ResetTraffic(amp.Command):
    """Zero an instance's byte counters (the API's ``reset``)."""

    arguments = [(b"instance", amp.Unicode())]


class Log(amp.Command):
    """One log line: an instance's (``instance`` set; ``level`` is the
    NodePass level, ``text`` already escaped) or the worker process's own
    Twisted events (``instance`` empty)."""

    arguments = [
        (b"instance", amp.Unicode()),
        (b"level", amp.Unicode()),
        (b"text", amp.Unicode()),
        (b"when", amp.Float()),
    ]
    requiresAnswer = False


class Report(amp.Command):
    """One CHECK_POINT of an instance (its line came as a :class:`Log`)."""

    arguments = [
        (b"instance", amp.Unicode()),
        (b"mode", amp.Integer()),
        (b"ping", amp.Integer()),
        (b"pool", amp.Integer()),
        (b"tcps", amp.Integer()),
        (b"udps", amp.Integer()),
        (b"tcprx", amp.Integer()),
        (b"tcptx", amp.Integer()),
        (b"udprx", amp.Integer()),
        (b"udptx", amp.Integer()),
    ]
    requiresAnswer = False


class Status(amp.Command):
    """An instance's own lifecycle (``running``, ``error``, ``stopped``)."""

    arguments = [
        (b"instance", amp.Unicode()),
        (b"status", amp.Unicode()),
        (b"message", amp.Unicode()),
    ]
    requiresAnswer = False
