"""Room for a clean stop on a full disk: ``DB.reserve``, 16 MiB taken at start and given back first at a
clean stop, so that the alerts held in memory while the disk was full, the journal and the final state
snapshot can still be written (docs/operations.md, "Full disk").

Without it, a SIGTERM on a full disk lost every alert raised since the disk filled (only a kill -9 was
supposed to). With it, they are lost only if they need more than the reserve (about 16,000 alert
transitions), if the disk was already full when the sidecar started (no reserve could be taken: said at
start), or on a kill -9 (no clean stop).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

RESERVE_BYTES = 16 << 20


class Reserve:
    def __init__(self, db: str, size: int = RESERVE_BYTES) -> None:
        self.path = f"{db}.reserve"
        self.held = False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, size)  # blocks allocated, not written: fast
            finally:
                os.close(fd)
            self.held = True
        except OSError as exc:
            log.warning("cannot reserve %d MiB beside the database (%s): %s; on a full disk a clean stop may "
                        "lose the alerts it holds in memory", size >> 20, self.path, exc.strerror)
            self.release()

    def release(self) -> None:
        """Give the room back (first thing at a clean stop: the last writes may need it)."""
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.held = False
