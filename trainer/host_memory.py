"""Host memory of the training process and its children (DataLoader workers).

PSS counts pages shared between a forked parent and its workers once; summed RSS
counts them in every process and reads 2-2.5x too high for forked workers. PSS
is expensive (22 ms for a process + 4 workers, MEASURED.md), so this is sampled
every few seconds and only ever from the client's background thread.
"""

from __future__ import annotations

import time
from typing import Any, Callable

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency; degrade anyway
    psutil = None


def process_tree_bytes(proc: Any) -> int:
    """PSS of ``proc`` and its descendants where the OS reports it, else RSS."""
    procs = [proc]
    try:
        procs += proc.children(recursive=True)
    except psutil.Error:
        pass
    total = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            value = getattr(info, "pss", None)
            total += value if value is not None else info.rss
        except psutil.AccessDenied:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        except psutil.Error:  # the child exited meanwhile
            pass
    return total


class HostMemory:
    """A probe: ``sample()`` returns the host memory fields, re-read every ``interval`` seconds."""

    def __init__(self, interval: float = 5.0, proc: Any = None,
                 virtual_memory: Callable[[], Any] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._proc = proc if proc is not None else psutil.Process()
        self._virtual_memory = virtual_memory or psutil.virtual_memory
        self._monotonic = monotonic
        self._next = 0.0
        self._fields: dict[str, Any] = {}

    def sample(self) -> dict[str, Any]:
        now = self._monotonic()
        if now >= self._next:
            self._next = now + self.interval
            vm = self._virtual_memory()
            self._fields = {
                "host_mem_bytes": process_tree_bytes(self._proc),
                "host_mem_total_bytes": vm.total,
                "host_mem_available_bytes": vm.available,
            }
        return self._fields


def available() -> bool:
    return psutil is not None
