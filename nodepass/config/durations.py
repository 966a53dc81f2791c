"""Go ``time.Duration`` syntax, because NodePass URLs and environment
tunables are written in it and operators copy them between the Go binary and
ours.  Values are carried as float seconds inside the project."""

from __future__ import annotations

import re

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


class DurationError(ValueError):
    """A duration string that Go's ``time.ParseDuration`` would reject."""


def parse_duration(text: str) -> float:
    """Parse Go duration text (``1h30m``, ``250ms``, ``0``) into seconds.

    Negative durations are rejected: every duration NodePass accepts is a
    timeout or an interval, where a negative value has no meaning.
    """
    s = text.strip()
    if s in ("0", "+0", ""):
        if s == "":
            raise DurationError("empty duration")
        return 0.0
    if s.startswith("+"):
        s = s[1:]
    if s.startswith("-"):
        raise DurationError(f"negative duration {text!r}")
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise DurationError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS_NS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise DurationError(f"invalid duration {text!r}")
    return total / 1e9


def _fmt_frac(value: int, scale: int) -> str:
    """``value / scale`` as Go prints it: trailing zeros of the fraction dropped."""
    whole, frac = divmod(value, scale)
    if not frac:
        return str(whole)
    digits = len(str(scale)) - 1
    return f"{whole}.{frac:0{digits}d}".rstrip("0")


def format_duration(seconds: float) -> str:
    """Render seconds the way Go's ``Duration.String`` does (``5m0s``, ``0s``,
    ``1h0m0s``, ``250ms``), so our start lines and config URLs read the same as
    a Go peer's."""
    ns = int(round(seconds * 1e9))
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_fmt_frac(ns, 1_000)}\u00b5s"
    if ns < 1_000_000_000:
        return f"{sign}{_fmt_frac(ns, 1_000_000)}ms"
    hours, rem = divmod(ns, 3_600_000_000_000)
    minutes, rem = divmod(rem, 60_000_000_000)
    secs = _fmt_frac(rem, 1_000_000_000) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    if minutes:
        return f"{sign}{minutes}m{secs}"
    return f"{sign}{secs}"
