"""What the master refuses or fails to do, in its own words.

The domain (:mod:`nodepass.master.domain` and the modules it uses) raises
these and knows nothing of HTTP; :mod:`nodepass.master.api` is the one place
that turns each kind into a status code.  ``message`` is the text a client
sees (``{"error": message}``), so it is part of the API: dashboards match
some of these strings, and they are the Go master's words.
"""

from __future__ import annotations

from typing import ClassVar


class MasterError(Exception):
    """Base of every refusal; ``message`` is shown to the client as is."""

    default: ClassVar[str] = ""

    def __init__(self, message: str = "") -> None:
        self.message = message or self.default
        super().__init__(self.message)


class Unauthorized(MasterError):
    """The request does not carry the master's API key."""


class KeyMissing(Unauthorized):
    default = "Unauthorized: API key required"


class KeyInvalid(Unauthorized):
    default = "Unauthorized: Invalid API key"


class InvalidRequest(MasterError):
    """What was asked cannot be done as given (a bad field, URL or target);
    the message names the problem."""


class InvalidURL(InvalidRequest):
    """An instance URL that cannot be parsed or runs no tunnel."""

    default = "Invalid URL format"


class InvalidTarget(InvalidRequest):
    """A tcping target that is not ``host:port``."""


class InstanceNotFound(MasterError):
    default = "Instance not found"


class URLConflict(MasterError):
    """Replacing an instance's URL with the one it already has."""

    default = "Instance URL conflict"


class KeyNotAnInstance(MasterError):
    """Replacing or deleting the API key's ``********`` record: it only
    looks like an instance on the wire."""

    default = "Forbidden: API Key"


class StateNotSaved(MasterError):
    """The state file could not be written; the change was undone."""
