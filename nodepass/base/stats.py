"""Per-instance traffic counters, slot accounting and CHECK_POINT records.

One :class:`InstanceStats` lives as long as the master's record of an
instance, not as long as one run of it, so counters stay cumulative across
restarts; the master zeroes them only on ``reset``.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Checkpoint:
    """One health report (SPEC §7 ``CHECK_POINT``)."""

    mode: int
    ping: int
    pool: int
    tcps: int
    udps: int
    tcprx: int
    tcptx: int
    udprx: int
    udptx: int

    def line(self) -> str:
        return (
            f"CHECK_POINT|MODE={self.mode}|PING={self.ping}ms|POOL={self.pool}|TCPS={self.tcps}"
            f"|UDPS={self.udps}|TCPRX={self.tcprx}|TCPTX={self.tcptx}|UDPRX={self.udprx}|UDPTX={self.udptx}"
        )


class InstanceStats:
    """Counters are plain attributes: the relay hot path adds to them
    directly, which is the cheapest thing Python can do per chunk."""

    __slots__ = ("tcp_rx", "tcp_tx", "udp_rx", "udp_tx", "tcps", "udps", "slot_limit")

    def __init__(self, slot_limit: int = 65536):
        self.tcp_rx = 0
        self.tcp_tx = 0
        self.udp_rx = 0
        self.udp_tx = 0
        self.tcps = 0
        self.udps = 0
        self.slot_limit = slot_limit

    def _has_slot(self) -> bool:
        return not self.slot_limit or self.tcps + self.udps < self.slot_limit

    def acquire_tcp(self) -> bool:
        """Take a slot for a relayed TCP connection; False when ``slot`` is full."""
        if not self._has_slot():
            return False
        self.tcps += 1
        return True

    def release_tcp(self) -> None:
        self.tcps = max(0, self.tcps - 1)

    def acquire_udp(self) -> bool:
        if not self._has_slot():
            return False
        self.udps += 1
        return True

    def release_udp(self) -> None:
        self.udps = max(0, self.udps - 1)

    def reset_traffic(self) -> None:
        self.tcp_rx = self.tcp_tx = self.udp_rx = self.udp_tx = 0

    def checkpoint(self, mode: int, ping: int, pool: int) -> Checkpoint:
        return Checkpoint(
            mode=mode,
            ping=ping,
            pool=pool,
            tcps=self.tcps,
            udps=self.udps,
            tcprx=self.tcp_rx,
            tcptx=self.tcp_tx,
            udprx=self.udp_rx,
            udptx=self.udp_tx,
        )
