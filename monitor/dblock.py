"""One sidecar per database: ``serve`` holds an exclusive lock on ``DB.lock`` while it runs.

Two sidecars on one ``--db`` would both restore the same state and both deliver the same alerts; the
second now refuses to start, in one line naming the first one's pid. The lock is ``flock``: the kernel
drops it when the process ends, however it ends (kill -9 included), so a stale lock file never blocks a
restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from .config import ConfigError


class DbLock:
    def __init__(self, db: str) -> None:
        self.path = f"{db}.lock"
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"server.db: cannot create the lock file {self.path!r}: {exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(f"server.db: {db!r} is in use by another sidecar (pid {holder}); stop it, or give "
                              "this one another --db") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
