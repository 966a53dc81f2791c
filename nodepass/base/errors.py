"""One way to turn an exception into the words of a log line or an error
answer.

Twisted wraps the error that matters: a ``Failure`` holds it in ``value``,
``ConnectError`` subclasses carry the ``socketError`` the kernel gave,
``ResponseFailed`` and friends list ``reasons``.  Log lines should show the
cause, in the words an operator would search for (``connection refused``),
not a wrapper's repr."""

from __future__ import annotations

from typing import Union

from twisted.python.failure import Failure


def error_text(error: Union[BaseException, Failure]) -> str:
    """The cause of ``error`` in plain words."""
    if isinstance(error, Failure):
        return error_text(error.value)
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(error_text(r) for r in reasons)
    socket_error = getattr(error, "socketError", None)
    if isinstance(socket_error, OSError) and socket_error.strerror:
        return socket_error.strerror.lower()
    value = getattr(error, "value", None)
    if isinstance(value, BaseException) and value is not error:
        return error_text(value)
    return str(error) or type(error).__name__
