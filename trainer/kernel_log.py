"""What the kernel log says the OOM killer killed: the proof that a SIGKILL was the OOM killer's.

The OOM-kill counters (a cgroup's ``oom_kill``, the machine's ``/proc/vmstat``) count kills, not whom:
the machine's rises for any process on the machine. The kernel log names the victim, on every kernel
since 2.6 (v1 and v2 cgroups alike), after it sent the SIGKILL::

    Memory cgroup out of memory: Killed process 2966 (python) total-vm:317244kB, anon-rss:150096kB, ...
    Out of memory: Killed process 2966 (python) total-vm:...       (a machine-wide OOM)
    Killed process 2966 (python) total-vm:...                      (4.x kernels, after the
    Memory cgroup out of memory: Kill process 2966 (python) score 1000 or sacrifice child)

and, on kernels since 4.19, a summary before it sends the signal (rate-limited: a burst of kills may lack it)::

    oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/job,task_memcg=/job,task=python,pid=2966,uid=0

``/dev/kmsg`` (root, or CAP_SYSLOG where ``kernel.dmesg_restrict`` is 1) gives the records one per read,
``PRIORITY,SEQUENCE,MICROSECONDS,FLAGS;MESSAGE``. A :class:`KernelLog` opened when a rank starts seeks to
the end, so it returns only what is logged while the rank runs; it is read every second (a long run's
records would go round the ring buffer before the rank's death) and at the death, never blocking, at most
``MAX_RECORDS`` a look. ``oom_kills`` parses those lines (and ``dmesg``'s
``[  123.456] MESSAGE`` lines). Rules: docs/liveness.md ("Deaths").
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

KMSG = "/dev/kmsg"
MAX_RECORDS = 200_000  # the kernel's ring buffer holds far fewer (a few MiB at most): a bound, not a filter
RECORD_BYTES = 8192  # a kmsg record is at most 1 KiB of text plus its dictionary
MAX_KILLS = 1024  # OOM kills kept (the latest): the rank's own is logged at its death

_KMSG_PREFIX = re.compile(r"^(\d+),\d+,\d+,[^;]*;")
_DMESG_PREFIX = re.compile(r"^\[\s*\d+\.\d+\](?:\[\s*[TC]\d+\])?\s?")  # with the caller id (CONFIG_PRINTK_CALLER)
# "Killed process 2966 (python) total-vm:..." (a comm holds at most 15 characters, any of them)
_KILLED = re.compile(r"(?:^|: )Killed process (\d+) \((.{0,16}?)\)(?= total-vm| vsz|,|$)")
_SUMMARY = re.compile(r"^oom-kill:.*[,:]task=(.{0,16}?),pid=(\d+),uid=")
_TASK_MEMCG = re.compile(r"[,:]task_memcg=([^,]*),")
_OOM_MEMCG = re.compile(r"[,:]oom_memcg=([^,]*),")


@dataclass(frozen=True, slots=True)
class OomKill:
    """One process the OOM killer killed, as the kernel logged it."""

    pid: int
    comm: str  # the process's name (15 characters at most): "python", "pt_data_worker"
    memcg: str | None = None  # its memory cgroup, where the summary line says (``task_memcg``)
    oom_memcg: str | None = None  # the cgroup whose limit it was killed for (``oom_memcg``; None: the machine's)


def message(line: str) -> str | None:
    """A kmsg record's or a dmesg line's message, without the prefix and the dictionary lines after it; None
    for a kmsg record a process wrote (its facility is not the kernel's: it could say anything)."""
    line = line.split("\n", 1)[0]
    m = _KMSG_PREFIX.match(line)
    if m:
        return line[m.end():] if int(m.group(1)) < 8 else None  # PRIORITY = facility * 8 + level
    m = _DMESG_PREFIX.match(line)
    return line[m.end():] if m else line


def oom_kill(line: str) -> OomKill | None:
    """The OOM kill one kernel log line names, or None. "Kill process N ... or sacrifice child" is an
    intention (a child may be killed instead): only "Killed process" and the summary name a victim."""
    text = message(line)
    if text is None:
        return None
    m = _KILLED.search(text)
    if m:
        return OomKill(int(m.group(1)), m.group(2))
    m = _SUMMARY.search(text)
    if m:
        memcg, limited = _TASK_MEMCG.search(text), _OOM_MEMCG.search(text)
        return OomKill(int(m.group(2)), m.group(1), memcg.group(1) if memcg else None,
                       limited.group(1) if limited else None)
    return None


def oom_kills(lines: Iterable[str]) -> list[OomKill]:
    """The processes the OOM killer killed, once each, in the log's order (a kill's summary line and its
    "Killed process" line are one kill: the summary's cgroups are kept)."""
    out: dict[int, OomKill] = {}
    for line in lines:
        kill = oom_kill(line)
        if kill is None:
            continue
        had = out.get(kill.pid)
        if had is None or (had.memcg is None and kill.memcg is not None):
            out[kill.pid] = kill if had is None else OomKill(had.pid, had.comm, kill.memcg, kill.oom_memcg)
    return list(out.values())


class KernelLog:
    """``/dev/kmsg`` from the moment it was opened on. ``take()`` reads what was logged since the last look,
    without blocking, and keeps its OOM kills: ``kills`` (the latest MAX_KILLS, by pid) and ``logged`` (how
    many). ``error`` says why it cannot be read; ``lost``: the last look found records overwritten before
    they were read (the ring buffer went round)."""

    def __init__(self, path: str = KMSG) -> None:
        self.path = path
        self.error: str | None = None
        self.lost = False
        self.kills: dict[int, OomKill] = {}
        self.logged = 0
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self._fd, 0, os.SEEK_END)  # kmsg: the next read returns the next record logged
        except OSError as exc:
            self.error = f"{path}: {exc.strerror or exc}"
            self.close()

    def read(self, limit: int = MAX_RECORDS) -> list[str] | None:
        """The records logged since the last read (at most ``limit``); None if the log cannot be read."""
        if self._fd is None:
            return None
        self.lost = False
        out: list[str] = []
        while len(out) < limit:
            try:
                raw = os.read(self._fd, RECORD_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # the ring buffer overwrote records we had not read: go on
                    self.lost = True
                    continue
                self.error = f"{self.path}: {exc.strerror or exc}"
                self.close()
                return None
            if not raw:
                break
            out.append(raw.decode("utf-8", "replace"))
        return out

    def take(self) -> bool:
        """Read what was logged since the last look and keep its OOM kills; False if the log cannot be read."""
        lines = self.read()
        if lines is None:
            return False
        for kill in oom_kills(lines):
            had = self.kills.pop(kill.pid, None)
            if had is None:
                self.logged += 1
            elif kill.memcg is None:  # its summary came in the last look, its "Killed process" line now
                kill = had
            self.kills[kill.pid] = kill
            if len(self.kills) > MAX_KILLS:
                del self.kills[next(iter(self.kills))]
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
