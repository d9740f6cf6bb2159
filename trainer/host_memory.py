"""Host memory of the training process and its children (DataLoader workers).

PSS counts pages shared between a forked parent and its workers once; summed RSS
counts them in every process and reads 2-2.5x too high for forked workers. PSS
is expensive (22 ms for a process + 4 workers, docs/measured.md), so this is sampled
every few seconds and only ever from the client's background thread.

The process's own memory limit goes out as ``host_mem_limit_bytes`` so the sidecar can
forecast exhaustion against it (a container or a job cgroup is killed at its limit, long
before the machine runs out): ``TRAINHEALTH_MEMORY_LIMIT`` when set (bytes, or a size such
as ``2G``, ``512MiB``, ``1.5GB``; for tests and for containers whose cgroup files are not
visible), else the smallest ``memory.max`` (cgroup v2) or ``memory.limit_in_bytes`` (v1) of
this process's cgroup and its ancestors. No limit (none set, "max", unreadable files, a
limit at or above the machine's memory) sends no field: the sidecar then forecasts against
the machine's available memory alone.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency; degrade anyway
    psutil = None

log = logging.getLogger("trainhealth.trainer")

LIMIT_ENV = "TRAINHEALTH_MEMORY_LIMIT"
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)
LIMIT_SECONDS = 60.0  # the limit is re-read this often (it may be raised or lowered live)
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*(?:([kmgt])(i?)(b?))?\s*$", re.IGNORECASE)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}


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


def parse_size(text: str) -> float:
    """Bytes from ``"2147483648"``, ``"2G"``/``"2GiB"`` (binary, as cgroups and Docker read them) or
    ``"2GB"`` (decimal). ValueError naming the value otherwise."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{LIMIT_ENV}: must be bytes or a size like 2G, 512MiB, 1.5GB, got {text!r}")
    number, unit, binary, byte = m.groups()
    if unit is None:
        value = float(number)
    else:
        base = 1000 if (byte and not binary) else 1024  # 2GB: decimal; 2G, 2GiB: binary
        value = float(number) * base ** _POWER[unit.lower()]
    if not value > 0:
        raise ValueError(f"{LIMIT_ENV}: must be > 0, got {text!r}")
    return value


def cgroup_limit(root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The smallest memory limit of this process's cgroup and its ancestors (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), or None: no limit, no cgroup, or nothing readable."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    found: list[float] = []
    for line in lines:
        ident, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if ident == "0" and controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # the cgroup itself, then each ancestor
            try:
                raw = (base.joinpath(*parts[:depth]) / name).read_text().strip()
            except OSError:
                continue
            if raw.isdigit() and 0 < int(raw) < UNLIMITED:
                found.append(float(raw))
    return min(found, default=None)


def memory_limit(environ: Mapping[str, str] | None = None, root: str | Path = "/sys/fs/cgroup",
                 self_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """``TRAINHEALTH_MEMORY_LIMIT`` when set and valid (a bad value is logged and ignored), else the
    cgroup limit, else None."""
    env = os.environ if environ is None else environ
    raw = env.get(LIMIT_ENV)
    if raw:
        try:
            return parse_size(raw)
        except ValueError as exc:
            log.warning("trainhealth: ignoring %s", exc)
    return cgroup_limit(root, self_cgroup)


class HostMemory:
    """A probe: ``sample()`` returns the host memory fields, re-read every ``interval`` seconds;
    the memory limit (``limit()``, by default ``memory_limit``) every ``LIMIT_SECONDS``."""

    def __init__(self, interval: float = 5.0, proc: Any = None,
                 virtual_memory: Callable[[], Any] | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 limit: Callable[[], float | None] | None = None) -> None:
        self.interval = interval
        self._proc = proc if proc is not None else psutil.Process()
        self._virtual_memory = virtual_memory or psutil.virtual_memory
        self._monotonic = monotonic
        self._limit_of = limit or memory_limit
        self._limit: float | None = None
        self._next = 0.0
        self._next_limit = 0.0
        self._fields: dict[str, Any] = {}

    def sample(self) -> dict[str, Any]:
        now = self._monotonic()
        if now >= self._next:
            self._next = now + self.interval
            if now >= self._next_limit:
                self._next_limit = now + LIMIT_SECONDS
                try:
                    self._limit = self._limit_of()
                except Exception as exc:  # never break training over a limit we cannot read
                    log.warning("trainhealth: memory limit unreadable: %r", exc)
                    self._limit = None
            vm = self._virtual_memory()
            self._fields = {
                "host_mem_bytes": process_tree_bytes(self._proc),
                "host_mem_total_bytes": vm.total,
                "host_mem_available_bytes": vm.available,
            }
            if self._limit is not None and self._limit < vm.total:  # a limit above the machine is none
                self._fields["host_mem_limit_bytes"] = self._limit
        return self._fields


def available() -> bool:
    return psutil is not None
