"""Host figures for ``GET /info`` (SPEC §8), read through psutil.

Network counters leave out loopback and virtual interfaces (bridges, veth,
tunnels: everything under ``/sys/devices/virtual/net`` on Linux) and disk
counters count whole physical disks only (``/sys/block/*`` entries backed by
a device), so partitions and device-mapper layers are not counted twice.
Anything the host does not offer reads as 0 (``cpu``: -1).
"""

from __future__ import annotations

import os
import platform
import time

import psutil

_VIRTUAL_NET = "/sys/devices/virtual/net"
_BLOCK = "/sys/block"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i386": "386", "i686": "386"}


def go_os() -> str:
    return platform.system().lower() or "unknown"


def go_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH.get(machine, machine or "unknown")


def prime_cpu() -> None:
    """The first ``cpu_percent(None)`` has no baseline; call once at start."""
    try:
        psutil.cpu_percent(interval=None)
    except Exception:  # noqa: BLE001
        pass


def _cpu() -> int:
    try:
        return int(round(psutil.cpu_percent(interval=None)))
    except Exception:  # noqa: BLE001
        return -1


def _virtual_nics() -> set[str]:
    try:
        return set(os.listdir(_VIRTUAL_NET))
    except OSError:
        return set()


def _net() -> tuple[int, int]:
    try:
        per = psutil.net_io_counters(pernic=True)
    except Exception:  # noqa: BLE001
        return 0, 0
    virtual = _virtual_nics()
    rx = tx = 0
    for name, c in per.items():
        if name == "lo" or name.startswith("lo") and name[2:].isdigit() or name in virtual:
            continue
        rx += c.bytes_recv
        tx += c.bytes_sent
    return rx, tx


def _whole_disks() -> set[str] | None:
    try:
        names = os.listdir(_BLOCK)
    except OSError:
        return None
    return {n for n in names if os.path.exists(os.path.join(_BLOCK, n, "device"))}


def _disk() -> tuple[int, int]:
    try:
        per = psutil.disk_io_counters(perdisk=True)
    except Exception:  # noqa: BLE001
        return 0, 0
    if not per:
        return 0, 0
    whole = _whole_disks()
    r = w = 0
    for name, c in per.items():
        if whole is not None and name not in whole:
            continue
        r += c.read_bytes
        w += c.write_bytes
    return r, w


def host_info() -> dict:
    """The host part of ``/info`` (the master adds its own fields)."""
    try:
        vm = psutil.virtual_memory()
        mem_total, mem_used = int(vm.total), int(vm.total - vm.available)
    except Exception:  # noqa: BLE001
        mem_total = mem_used = 0
    try:
        sw = psutil.swap_memory()
        swap_total, swap_used = int(sw.total), int(sw.total - sw.free)
    except Exception:  # noqa: BLE001
        swap_total = swap_used = 0
    netrx, nettx = _net()
    diskr, diskw = _disk()
    try:
        sysup = int(time.time() - psutil.boot_time())
    except Exception:  # noqa: BLE001
        sysup = 0
    return {
        "os": go_os(),
        "arch": go_arch(),
        "cpu": _cpu(),
        "mem_total": mem_total,
        "mem_used": mem_used,
        "swap_total": swap_total,
        "swap_used": swap_used,
        "netrx": netrx,
        "nettx": nettx,
        "diskr": diskr,
        "diskw": diskw,
        "sysup": max(sysup, 0),
    }
