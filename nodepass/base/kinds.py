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
    """The pool transport a server announces in its handshake: 1.12 knows
    TCP and QUIC (``quic=``), 1.14 all four (``type=``, SPEC-1.14 §4)."""

    TCP = 0
    QUIC = 1
    WEBSOCKET = 2
    HTTP2 = 3


class Wire(StrEnum):
    """Which NodePass wire generation a peer speaks (``wire=``).

    The two cannot negotiate: a 1.12 and a 1.14 peer fail each other's
    handshake (SPEC-1.14 §3.2.5).  ``AUTO`` lets a server serve whichever
    arrives and a client try 1.14 first, then 1.12."""

    AUTO = "auto"
    V112 = "1.12"
    V114 = "1.14"


class BlockedProtocol(IntEnum):
    """What ``block=`` can refuse on the entry side (SPEC-1.14 §5.1); each
    member is the digit that names it in the parameter."""

    SOCKS = 1
    HTTP = 2
    TLS = 3


class Status(StrEnum):
    """An instance's status in the master's API."""

    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"
    NONE = ""  # the API key's record, as Go shows it
