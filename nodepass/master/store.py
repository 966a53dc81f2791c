"""The master's durable state: one JSON file plus its ``.backup``.

Every write goes to a temporary file in the same directory, is fsynced,
renamed over the state file and the directory fsynced, so a crash at any
instant leaves either the old or the new file -- never a torn one.  The file
holds the API key, so it is created readable by its owner only.

Writes are synchronous on purpose: the API answers 2xx only after the change
is on disk, and a few milliseconds of fsync per change is cheap next to a
lost instance.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

STATE_NAME = "nodepass.json"
FORMAT_VERSION = 1


class StateError(Exception):
    """The state file exists but cannot be used."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably, mode 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


class StateStore:
    """Reads and writes ``STATE_DIR/nodepass.json`` and its backup."""

    def __init__(self, state_dir: str, name: str = STATE_NAME):
        self.dir = os.path.abspath(os.path.expanduser(state_dir))
        self.path = os.path.join(self.dir, name)
        self.backup_path = self.path + ".backup"

    def ensure_dir(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    @staticmethod
    def _read(path: str) -> dict:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise StateError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("instances", []), list):
            raise StateError(f"{path}: not a NodePass state file")
        if data.get("version", FORMAT_VERSION) > FORMAT_VERSION:
            raise StateError(f"{path}: written by a newer version (format {data.get('version')})")
        return data

    def load(self, log=None) -> Optional[dict]:
        """The saved state, or None on first start.  A main file that cannot
        be read is reported on ``log`` and the backup is used instead."""
        try:
            return self._read(self.path)
        except FileNotFoundError:
            main_error = None
            if not os.path.exists(self.backup_path):
                return None
        except (OSError, StateError) as e:
            main_error = e
        if main_error is not None and log is not None:
            log.error("State file unreadable, using backup %s: %s", self.backup_path, main_error)
        try:
            data = self._read(self.backup_path)
        except FileNotFoundError:
            if main_error is None:
                return None
            raise StateError(f"{main_error}; no backup at {self.backup_path}") from None
        except (OSError, StateError) as e:
            raise StateError(f"state file and backup both unreadable: {main_error}; {e}") from None
        if main_error is None and log is not None:
            log.warn("State file missing, restored from backup %s", self.backup_path)
        return data

    def save(self, state: dict) -> None:
        state = dict(state, version=FORMAT_VERSION)
        data = json.dumps(state, indent=1, sort_keys=False).encode("utf-8") + b"\n"
        self.ensure_dir()
        atomic_write(self.path, data)

    def backup(self) -> None:
        """Copy the current state file to ``.backup`` (atomically too)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        self._read(self.path)  # never back up a damaged file over a good backup
        atomic_write(self.backup_path, data)
