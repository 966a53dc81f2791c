"""Declares ``twistd nodepass URL``; everything else lives in nodepass.tap."""

from twisted.application.service import ServiceMaker

nodepass = ServiceMaker(
    "NodePass",
    "nodepass.tap",
    "NodePass TCP/UDP tunnel: server://, client:// or master:// instance",
    "nodepass",
)
