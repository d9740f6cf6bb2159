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

With every sample go the kernel's facts about that limit (``KernelMemory.facts``, fields in
docs/record.md): the limiting cgroup's directory and working set (usage less inactive page
cache), its OOM-kill and max/high event counts, and memory pressure (PSI); with no cgroup
limit, the machine's OOM-kill count and pressure. The readers are small functions with the
paths passed in (``limiting_cgroup``, ``cgroup_usage``, ``cgroup_events``, ``oom_kills``,
``machine_oom_kills``, ``memory_pressure``) for whoever else needs them (the rank-death watcher).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Cgroup:
    """The memory cgroup whose limit applies to this process: its directory, version (1 or 2) and limit."""

    path: Path
    version: int
    limit: float


def limiting_cgroup(root: str | Path = "/sys/fs/cgroup",
                    self_cgroup: str | Path = "/proc/self/cgroup") -> Cgroup | None:
    """The cgroup with the smallest memory limit among this process's cgroup and its ancestors (v2
    ``memory.max``, v1 ``memory.limit_in_bytes``), or None: no limit, no cgroup, or nothing readable."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    best: Cgroup | None = None
    for line in lines:
        ident, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if ident == "0" and controllers == "":
            base, name, version = root, "memory.max", 2
        elif "memory" in controllers.split(","):
            base, name, version = root / "memory", "memory.limit_in_bytes", 1
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # the cgroup itself, then each ancestor
            folder = base.joinpath(*parts[:depth])
            try:
                raw = (folder / name).read_text().strip()
            except OSError:
                continue
            if raw.isdigit() and 0 < int(raw) < UNLIMITED and (best is None or int(raw) < best.limit):
                best = Cgroup(folder, version, float(raw))
    return best


def own_cgroup(root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup") -> Cgroup | None:
    """The memory cgroup the process itself is in (``limit`` 0: not read), or None. Its OOM-kill count is the
    one that counts the process's own kill: v1 counts a kill in the victim's cgroup alone, not its ancestors'."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    v2: Cgroup | None = None
    for line in lines:
        ident, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        parts = [p for p in path.split("/") if p and p != ".."]
        if "memory" in controllers.split(","):
            folder = (root / "memory").joinpath(*parts)
            if (folder / "memory.oom_control").exists():
                return Cgroup(folder, 1, 0.0)
        elif ident == "0" and controllers == "" and (root.joinpath(*parts) / "memory.events").exists():
            v2 = Cgroup(root.joinpath(*parts), 2, 0.0)
    return v2


def cgroup_limit(root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The smallest memory limit of this process's cgroup and its ancestors, or None (see limiting_cgroup)."""
    found = limiting_cgroup(root, self_cgroup)
    return None if found is None else found.limit


def _keyed(path: Path) -> dict[str, int]:
    """``name value`` lines (memory.events, memory.stat, memory.oom_control, /proc/vmstat) as a dict;
    empty when unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


def _number(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None


def cgroup_usage(folder: str | Path, version: int) -> float | None:
    """The memory charged to the cgroup less its inactive page cache (the kernel reclaims that before it
    kills; kubelet and ``docker stats`` call the rest the working set): v2 ``memory.current`` less
    ``memory.stat`` inactive_file, v1 ``memory.usage_in_bytes`` less total_inactive_file. None if unreadable."""
    folder = Path(folder)
    if version == 2:
        usage, inactive = _number(folder / "memory.current"), _keyed(folder / "memory.stat").get("inactive_file", 0)
    else:
        usage = _number(folder / "memory.usage_in_bytes")
        inactive = _keyed(folder / "memory.stat").get("total_inactive_file", 0)
    return None if usage is None else float(max(0, usage - inactive))


def cgroup_events(folder: str | Path, version: int) -> dict[str, int]:
    """The cgroup's memory event counts: ``oom_kill`` (processes the OOM killer ended in it), ``max``
    (times its usage hit the limit) and, v2 only, ``high`` (times it went over ``memory.high`` and was
    throttled). v2 ``memory.events``; v1 ``memory.oom_control`` (oom_kill, kernel >= 4.13) and
    ``memory.failcnt`` (max). Only the counts that could be read."""
    folder = Path(folder)
    if version == 2:
        events = _keyed(folder / "memory.events")
        return {k: events[k] for k in ("oom_kill", "max", "high") if k in events}
    out = {}
    kills = _keyed(folder / "memory.oom_control").get("oom_kill")
    if kills is not None:
        out["oom_kill"] = kills
    failcnt = _number(folder / "memory.failcnt")
    if failcnt is not None:
        out["max"] = failcnt
    return out


def oom_kills(folder: str | Path, version: int) -> int | None:
    """How many processes the kernel's OOM killer has ended in the cgroup (None if not readable)."""
    return cgroup_events(folder, version).get("oom_kill")


def machine_oom_kills(vmstat: str | Path = "/proc/vmstat") -> int | None:
    """How many processes the OOM killer has ended on the machine since boot (``oom_kill`` of /proc/vmstat)."""
    return _keyed(Path(vmstat)).get("oom_kill")


def memory_pressure(path: str | Path) -> float | None:
    """PSI: the share (percent) of the last 10 s in which some task waited for memory (``some avg10`` of
    a cgroup's ``memory.pressure`` or of /proc/pressure/memory); None where the kernel has no PSI."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            for item in line.split()[1:]:
                name, _, value = item.partition("=")
                if name == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


def kernel_facts(cgroup: Cgroup | None, proc: str | Path = "/proc") -> dict[str, Any]:
    """The record fields the kernel states about memory (docs/record.md): the limiting cgroup's usage and
    event counts where a cgroup limit applies (else the machine's OOM-kill count), and memory pressure (the
    cgroup's on v2, else the machine's)."""
    proc = Path(proc)
    out: dict[str, Any] = {}
    pressure = None
    if cgroup is not None:
        out["host_mem_cgroup"] = str(cgroup.path)
        usage = cgroup_usage(cgroup.path, cgroup.version)
        if usage is not None:
            out["host_mem_cgroup_bytes"] = usage
        events = cgroup_events(cgroup.path, cgroup.version)
        for key, field in (("oom_kill", "host_mem_oom_kills"), ("max", "host_mem_max_events"),
                           ("high", "host_mem_high_events")):
            if key in events:
                out[field] = events[key]
        if cgroup.version == 2:
            pressure = memory_pressure(cgroup.path / "memory.pressure")
    else:
        kills = machine_oom_kills(proc / "vmstat")
        if kills is not None:
            out["host_mem_oom_kills"] = kills
    if pressure is None:
        pressure = memory_pressure(proc / "pressure" / "memory")
    if pressure is not None:
        out["host_mem_pressure"] = pressure
    return out


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


class KernelMemory:
    """What the kernel says: ``limit()`` (the environment's or the limiting cgroup's; it also finds that
    cgroup, so call it now and then) and ``facts()`` (that cgroup's usage, events and pressure, read each time)."""

    def __init__(self, environ: Mapping[str, str] | None = None, root: str | Path = "/sys/fs/cgroup",
                 self_cgroup: str | Path = "/proc/self/cgroup", proc: str | Path = "/proc") -> None:
        self.environ, self.root, self.self_cgroup, self.proc = environ, root, self_cgroup, proc
        self.cgroup: Cgroup | None = None

    def limit(self) -> float | None:
        env = os.environ if self.environ is None else self.environ
        self.cgroup = limiting_cgroup(self.root, self.self_cgroup)
        if env.get(LIMIT_ENV):
            limit = memory_limit(env, self.root, self.self_cgroup)
            if self.cgroup is not None and limit != self.cgroup.limit:
                self.cgroup = None  # the limit is not this cgroup's: its usage is not what counts against it
            return limit
        return None if self.cgroup is None else self.cgroup.limit

    def facts(self) -> dict[str, Any]:
        return kernel_facts(self.cgroup, self.proc)


class HostMemory:
    """A probe: ``sample()`` returns the host memory fields, re-read every ``interval`` seconds;
    the memory limit (``limit()``, by default ``KernelMemory().limit``) every ``LIMIT_SECONDS``, and
    the kernel's facts (``kernel()``, by default ``KernelMemory().facts``; none when only ``limit`` is
    given) with every sample."""

    def __init__(self, interval: float = 5.0, proc: Any = None,
                 virtual_memory: Callable[[], Any] | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 limit: Callable[[], float | None] | None = None,
                 kernel: Callable[[], dict[str, Any]] | None = None) -> None:
        self.interval = interval
        self._proc = proc if proc is not None else psutil.Process()
        self._virtual_memory = virtual_memory or psutil.virtual_memory
        self._monotonic = monotonic
        if limit is None:
            reader = KernelMemory()
            limit, kernel = reader.limit, kernel or reader.facts
        self._limit_of = limit
        self._kernel = kernel
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
            limited = self._limit is not None and self._limit < vm.total  # a limit above the machine is none
            if limited:
                self._fields["host_mem_limit_bytes"] = self._limit
            if self._kernel is not None:
                try:
                    facts = self._kernel()
                except Exception as exc:  # never break training over a file we cannot read
                    log.warning("trainhealth: kernel memory facts unreadable: %r", exc)
                    facts = {}
                if not limited:
                    facts.pop("host_mem_cgroup", None)
                    facts.pop("host_mem_cgroup_bytes", None)
                self._fields.update(facts)
        return self._fields


def available() -> bool:
    return psutil is not None


# -- the launcher's view of its rank's cgroup (trainhealth.launch): its peak usage ------------------------------

def named_cgroup(memcg: str, root: str | Path = "/sys/fs/cgroup") -> Cgroup | None:
    """The memory cgroup the kernel log names (``oom_memcg=/job``, from the memory hierarchy's root) with its
    limit, or None: not found here (another cgroup namespace) or no limit."""
    root = Path(root)
    v1 = root / "memory"
    version, base, name = (1, v1, "memory.limit_in_bytes") if v1.is_dir() else (2, root, "memory.max")
    folder = base.joinpath(*[p for p in memcg.split("/") if p and p != ".."])
    limit = _number(folder / name)
    return Cgroup(folder, version, float(limit)) if limit is not None and 0 < limit < UNLIMITED else None


def peak_bytes(folder: str | Path, version: int) -> float | None:
    """The cgroup's peak memory usage (v2 ``memory.peak``, kernel 5.19+; v1 ``memory.max_usage_in_bytes``)."""
    name = "memory.peak" if version == 2 else "memory.max_usage_in_bytes"
    value = _number(Path(folder) / name)
    return None if value is None else float(value)
