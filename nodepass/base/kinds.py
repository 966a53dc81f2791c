"""The named kinds of the domain: roles, flows, modes, TLS codes, pool types
and instance statuses.

They are ``StrEnum``/``IntEnum`` members, so each one *is* its wire value:
``Flow.REVERSE == "-"``, ``TLSCode.RAM_CERT == 1`` and f-strings print the
wire text.  Code names the meaning; the bytes on the wire stay as SPEC says.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Role(StrEnum):
    """What an instance URL runs (its scheme)."""

    SERVER = "server"
    CLIENT = "client"
    MASTER = "master"


class Flow(StrEnum):
    """Which end accepts the users of a dual-end tunnel (SPEC §2)."""

    REVERSE = "-"  # the server listens on its target address; the client dials its targets
    FORWARD = "+"  # the client listens on its target address; the server dials its targets


class ServerMode(IntEnum):
    """A server's ``mode=`` (and the CHECK_POINT ``MODE`` it reports)."""

    AUTO = 0  # reverse if the target address binds here, else forward
    REVERSE = 1
    FORWARD = 2


class ClientMode(IntEnum):
    """A client's ``mode=`` (and the CHECK_POINT ``MODE`` it reports)."""

    AUTO = 0  # single-end if the tunnel address binds here, else dual-end
    SINGLE_END = 1
    DUAL_END = 2


class TLSCode(IntEnum):
    """``tls=`` of a server or master, and the code a server announces."""

    NONE = 0  # plain TCP
    RAM_CERT = 1  # TLS 1.3 with a self-signed certificate made in memory
    CERT_FILES = 2  # TLS 1.3 with the certificate and key from crt=/key=


class PoolType(IntEnum):
    """The pool transport a server announces in its handshake."""

    TCP = 0
    QUIC = 1


class Status(StrEnum):
    """An instance's status in the master's API."""

    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"
    NONE = ""  # the API key's record, as Go shows it
