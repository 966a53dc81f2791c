"""Scripted control of a NodePass master: an async client library
(:class:`MasterClient`) and the ``nodepassctl`` command built on it."""

from nodepass.ctl.client import EventStream, MasterAPIError, MasterClient

__all__ = ["MasterClient", "MasterAPIError", "EventStream"]
