"""The open-files limit of a process nodepass owns.

Each relayed TCP connection holds two descriptors at each end of a tunnel
(the user's or the target's connection, and its pool connection), and idle
pool connections hold one each, so a tunnel needs a little over two
descriptors per concurrent connection.  Services often start with a soft
``RLIMIT_NOFILE`` of 1,024 (systemd's default, and many shells'), which
would stop a tunnel at about 450 concurrent connections with ``Too many
open files``.  Go (1.19 and later) raises the soft limit to the hard limit
when a program starts, so Go NodePass relays thousands of connections under
that same limit; processes nodepass owns do the same
(``nodepass.tap.own_process`` and the worker processes).  A program that
merely imports nodepass keeps its limits.
"""

from __future__ import annotations

from typing import Optional


def _nr_open() -> Optional[int]:
    """Linux's ceiling for a process's descriptors (``fs.nr_open``): an
    unlimited hard limit cannot be taken literally."""
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit; returns the soft
    limit ``(before, after)`` (``-1``: unlimited).  Where that is refused
    or there is no such limit (not POSIX), nothing changes."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinity = resource.RLIM_INFINITY
    if soft == infinity or soft == hard:
        return soft, soft
    target = hard
    if hard == infinity:
        target = _nr_open() or soft
    if target <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target
