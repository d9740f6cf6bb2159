"""trainhealth.launch: run a rank under a small watcher that sees how it ends.

    torchrun --nproc_per_node 8 -m trainhealth.launch python train.py --lr 3e-4
    python -m trainhealth.launch -- python train.py          # one process

The watcher starts the command as its child and stays beside it: the child's stdout is its own, its
stderr passes through the watcher (written on at once, the last lines kept), the signals the watcher
gets (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2) are passed on (the child has a process group of its
own, so a signal to the watcher's group reaches it once; it should not read the terminal), and the
child dies with the watcher (PR_SET_PDEATHSIG). When the child exits non-zero or is killed by a
signal, the watcher sends the rank's ``end`` on its behalf within milliseconds: status "failed",
``exit_code`` or ``signal``, ``stderr_tail`` (the runtime's last words: "terminate called after
throwing an instance of 'c10::DistBackendError'", faulthandler's Python stack after a segfault),
``oom_killed`` only when the kernel log names its pid as the OOM killer's victim (or, where the log
cannot be read, the OOM-kill count of its own memory cgroup rose, a limit applying to it), with the
cgroup's peak usage and limit;
``oom_check`` says how that was decided and ``oom_doubt`` why a SIGKILL could be neither proven nor ruled
out an OOM kill; a child of the rank (a DataLoader worker) the OOM killer killed is named
(``oom_killed_pid``, ``oom_child``). A clean exit (code 0) sends nothing: the client's own ``end``
says it. Then the watcher exits as the child did (the same code, or the same signal), so torchrun sees
what it would have seen.

Run name, rank, sidecar URL and token come from the environment as for the client (settings.py); the
child gets ``TRAINHEALTH_LAUNCH_ID`` (its batches carry the watcher's launch id, so the sidecar knows both
for one rank), ``TRAINHEALTH_RUN`` (the name the watcher reports under) and ``PYTHONFAULTHANDLER=1``.
Rules and fields: docs/liveness.md ("Deaths"), docs/record.md.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import host_memory
from .kernel_log import KMSG, KernelLog, OomKill
from .settings import ClientSettings, from_environ, launch_header
from .transport import FileSender, HttpSender, Result

log = logging.getLogger("trainhealth.launch")

TAIL_BYTES = 64 * 1024  # stderr kept (the record takes the last TAIL_CHARS of it)
TAIL_CHARS = 8192
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
SEND_SECONDS = 3.0  # the end record is retried this long (the sidecar may be restarting)
DRAIN_SECONDS = 0.5  # after the child's exit, wait this long for the rest of its stderr (a grandchild may hold it)
PR_SET_PDEATHSIG = 1
CHILDREN_SECONDS = 1.0  # how often the rank's descendants are listed (an OOM-killed DataLoader worker is named)
MAX_CHILDREN = 4096  # descendants remembered (pids of the rank's whole life: a bound, not a filter)
KILL_LOG_SECONDS = 0.25  # the kernel logs "Killed process" just after its SIGKILL: wait this long for the line


@dataclass(slots=True)
class Tail:
    """The last ``limit`` bytes written, whole lines where the cut allows."""

    limit: int = TAIL_BYTES
    data: bytearray = field(default_factory=bytearray)

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 2 * self.limit:
            del self.data[:-self.limit]

    def text(self, chars: int = TAIL_CHARS) -> str:
        text = bytes(self.data[-self.limit:]).decode("utf-8", "replace")
        if len(text) > chars:
            text = text[-chars:]
            cut = text.find("\n")
            if 0 <= cut < len(text) - 1:
                text = text[cut + 1:]
        return text


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


@dataclass(frozen=True, slots=True)
class OomWitness:
    """What the watcher can read about OOM kills while the rank ran: the kernel log's kills (None where it
    cannot be read, ``log_error`` says why) and the OOM-kill counts before and after, of its own memory
    cgroup where a limit applies to it (None otherwise) and of the machine."""

    kills: list[OomKill] | None = None
    log_error: str | None = None
    cgroup: tuple[int | None, int | None] = (None, None)
    machine: tuple[int | None, int | None] = (None, None)


def _rose(counts: tuple[int | None, int | None]) -> int | None:
    before, after = counts
    return None if before is None or after is None else after - before


def oom_verdict(returncode: int, pid: int, children: Collection[int], seen: OomWitness) -> dict[str, Any]:
    """The ``end`` record's OOM fields for a child that ended with ``returncode`` (docs/liveness.md, "Deaths").
    Only the kernel log names whom the OOM killer killed: it decides wherever it can be read (the rank's
    pid, else one of its ``children``). Without it, the count of the rank's own memory cgroup, where a limit
    applies to it (the job's own: a container, a pod, a Slurm step), decides a SIGKILL; the machine's count
    can only clear one (it did not rise: nothing on the machine was OOM-killed). Else ``oom_check`` is
    "unproven" and ``oom_doubt`` says why. Pure."""
    killed = returncode == -signal.SIGKILL
    if seen.kills is not None:
        mine = next((k for k in seen.kills if k.pid == pid), None)
        child = next((k for k in seen.kills if k.pid in children), None) if mine is None else None
        if mine is not None:
            return {"oom_killed": True, "oom_check": "kernel_log", "oom_killed_pid": pid,
                    "oom_killed_comm": mine.comm}
        if child is not None:
            return {"oom_check": "kernel_log", "oom_killed_pid": child.pid, "oom_killed_comm": child.comm,
                    "oom_child": True}
        return {"oom_check": "kernel_log"} if killed else {}
    if not killed:
        return {}
    cgroup, machine = _rose(seen.cgroup), _rose(seen.machine)
    if cgroup is not None:
        return {"oom_killed": True, "oom_check": "cgroup_count"} if cgroup > 0 else {"oom_check": "cgroup_count"}
    if machine == 0:
        return {"oom_check": "machine_count"}
    unread = f"the kernel log cannot be read ({seen.log_error or 'unknown error'})"
    if machine is None:
        doubt = f"{unread} and no OOM-kill count either"
    else:
        doubt = (f"{unread} and the only OOM-kill count is the machine's, which rose by {machine} while it ran: "
                 f"any process on the machine")
    return {"oom_check": "unproven", "oom_doubt": doubt}


def end_record(s: ClientSettings, returncode: int, tail: str, *, forwarded: int | None, now: float,
               oom: Mapping[str, Any], pid: int | None = None, peak: float | None = None,
               limit: float | None = None) -> dict[str, Any] | None:
    """The rank's ``end`` for a child ``pid`` that ended with ``returncode`` (Popen's: -N for signal N); None
    for a clean exit. ``forwarded``: the signal the watcher passed on, if any; ``oom``: ``oom_verdict``'s
    fields (the cgroup's ``peak`` usage and ``limit`` are added to an OOM kill). Pure."""
    if returncode == 0:
        return None
    rec: dict[str, Any] = {"type": "end", "run": s.run, "rank": s.rank, "time": now, "status": "failed"}
    if pid is not None:
        rec["pid"] = pid
    if returncode < 0:
        rec["signal"] = signal_name(-returncode)
        if forwarded == -returncode:
            rec["signal_forwarded"] = True
    else:
        rec["exit_code"] = returncode
    rec.update(oom)
    if oom.get("oom_killed") or oom.get("oom_child"):
        if peak is not None:
            rec["host_mem_bytes"] = peak
        if limit is not None:
            rec["host_mem_limit_bytes"] = limit
    if tail:
        rec["stderr_tail"] = tail
    return rec


def descendants(pid: int, proc: str = "/proc") -> set[int]:
    """The live descendants of ``pid`` (``/proc/PID/task/TID/children``, Linux 3.5+); empty where unreadable."""
    out: set[int] = set()
    todo = [pid]
    while todo and len(out) < MAX_CHILDREN:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"{proc}/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"{proc}/{parent}/task/{tid}/children") as f:
                    found = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            todo += [c for c in found if c not in out]
            out.update(found)
    return out


class RankWatcher:
    """One rank's watcher: start the child, pass stderr and signals through, report its death."""

    def __init__(self, argv: list[str], environ: Mapping[str, str] | None = None, *,
                 sender: Any = None, clock: Callable[[], float] = time.time, kmsg: str = KMSG) -> None:
        env = dict(os.environ if environ is None else environ)
        self.settings: ClientSettings | None = None
        try:
            self.settings = from_environ(env)
        except (ValueError, TypeError) as exc:  # the rank runs anyway: the watcher must never stop training
            log.warning("trainhealth.launch: cannot report this rank's death (%s); running it anyway", exc)
        if self.settings is not None:
            env.setdefault("TRAINHEALTH_RUN", self.settings.run)
            env["TRAINHEALTH_LAUNCH_ID"] = self.settings.launch_id
        env.setdefault("PYTHONFAULTHANDLER", "1")
        self.argv, self.env = argv, env
        self.clock = clock
        self._kmsg = kmsg  # the kernel log's device (a test names one that cannot be read)
        self.tail = Tail()
        self.forwarded: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._sender = sender
        self._reader: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self.cgroup: host_memory.Cgroup | None = None  # the memory cgroup whose limit applies to the child
        self.kernel_log: KernelLog | None = None  # the kernel log from the child's start on
        self.children: set[int] = set()  # every descendant of the child seen while it ran
        self.seen: OomWitness | None = None  # what the kernel said of OOM kills, read at its death
        self._own: host_memory.Cgroup | None = None  # the memory cgroup the child is in
        self._done = threading.Event()
        self._cgroup_before: int | None = None  # OOM-kill counts at the start: its limiting cgroup's
        self._machine_before: int | None = None  # and the machine's

    def start(self) -> subprocess.Popen[bytes]:
        # the count, then the log, then the child: none of its kills is missed, and no kill is in the log
        # that the count's rise leaves out (witness() compares the two)
        self._machine_before = host_memory.machine_oom_kills()
        self.kernel_log = KernelLog(self._kmsg)
        self.proc = subprocess.Popen(self.argv, env=self.env, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent)
        for sig in FORWARDED:
            signal.signal(sig, self._forward)
        self._reader = threading.Thread(target=self._read_stderr, name="trainhealth-stderr", daemon=True)
        self._reader.start()
        self._watcher = threading.Thread(target=self._watch, name="trainhealth-children", daemon=True)
        self._watcher.start()
        self.cgroup = host_memory.limiting_cgroup(self_cgroup=f"/proc/{self.proc.pid}/cgroup")
        self._own = host_memory.own_cgroup(self_cgroup=f"/proc/{self.proc.pid}/cgroup")
        self._cgroup_before = self._cgroup_kills()
        return self.proc

    def _cgroup_kills(self) -> int | None:
        """The OOM-kill count of the child's own memory cgroup where a limit applies to it (the job's own
        cgroup: a container, a pod, a Slurm step), else None."""
        own = self._own
        return host_memory.oom_kills(own.path, own.version) if own is not None and self.cgroup is not None else None

    def _watch(self) -> None:
        """While the child runs, every CHILDREN_SECONDS: remember its descendants (a DataLoader worker the OOM
        killer kills is named) and take the OOM kills logged since the last look (a long run's records would
        go round the kernel's ring buffer before its death)."""
        assert self.proc is not None and self.kernel_log is not None
        while True:
            if len(self.children) < MAX_CHILDREN:
                self.children |= descendants(self.proc.pid)
            self.kernel_log.take()
            if self._done.wait(CHILDREN_SECONDS):
                return

    def witness(self, returncode: int) -> OomWitness:
        """What the kernel says about OOM kills while the child ran, read at its death (after ``_watch`` is
        done). The kernel counts a kill before its SIGKILL and logs "Killed process" after it: a SIGKILL not
        found in the log while the machine's count rose by more kills than the log shows waits up to
        KILL_LOG_SECONDS for the rest."""
        assert self.proc is not None and self.kernel_log is not None
        machine = (self._machine_before, host_memory.machine_oom_kills())
        cgroup = (self._cgroup_before, self._cgroup_kills())
        log = self.kernel_log
        ours = {self.proc.pid} | self.children
        found = log.take()
        lost = log.lost
        counted = _rose(machine) or 0
        if found and returncode == -signal.SIGKILL and log.logged < counted:
            deadline = time.monotonic() + KILL_LOG_SECONDS
            while found and not ours & log.kills.keys() and log.logged < counted and time.monotonic() < deadline:
                time.sleep(0.01)
                found = log.take()
                lost = lost or log.lost
        if not found:
            return OomWitness(None, log.error, cgroup, machine)
        if lost and not ours & log.kills.keys():
            return OomWitness(None, "records logged as it died were overwritten before they were read", cgroup,
                              machine)
        return OomWitness(list(log.kills.values()), None, cgroup, machine)

    def _forward(self, sig: int, frame: Any) -> None:
        self.forwarded = sig
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        out = sys.stderr.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.tail.add(chunk)
            try:
                while chunk:
                    chunk = chunk[os.write(out, chunk):]
            except OSError:  # our own stderr is gone: keep the tail anyway
                pass

    def wait(self) -> int:
        """Wait for the child, report its death, and return its Popen return code."""
        assert self.proc is not None
        code = self.proc.wait()
        self._done.set()
        if self._watcher is not None:
            self._watcher.join()  # at most one look more: the children and the kernel log are ours now
        if self._reader is not None:
            self._reader.join(DRAIN_SECONDS)
        oom: dict[str, Any] = {}
        self.seen = None
        if code != 0:
            self.seen = self.witness(code)
            oom = oom_verdict(code, self.proc.pid, self.children, self.seen)
        if self.kernel_log is not None:
            self.kernel_log.close()
        peak = limit = None
        cgroup = self._killed_in(oom)
        if cgroup is not None:
            peak, limit = host_memory.peak_bytes(cgroup.path, cgroup.version), cgroup.limit
        if self.settings is None:
            return code
        rec = end_record(self.settings, code, self.tail.text(), forwarded=self.forwarded, now=self.clock(),
                         oom=oom, pid=self.proc.pid, peak=peak, limit=limit)
        if rec is not None:
            self.report(rec)
        return code

    def _killed_in(self, oom: Mapping[str, Any]) -> host_memory.Cgroup | None:
        """The cgroup whose limit an OOM kill of the rank (or its child) was for: the one the kernel log names
        (the rank may have moved into it after it started), else its limiting cgroup; None without a kill."""
        if not (oom.get("oom_killed") or oom.get("oom_child")):
            return None
        kills = self.seen.kills if self.seen is not None else None
        named = next((k.oom_memcg for k in kills or () if k.pid == oom.get("oom_killed_pid") and k.oom_memcg), None)
        found = host_memory.named_cgroup(named) if named else None
        return found if found is not None else self.cgroup

    def report(self, rec: dict[str, Any]) -> Result:
        s = self.settings
        assert s is not None
        pid = self.proc.pid if self.proc is not None else os.getpid()
        sender = self._sender
        if sender is None:
            sender = (FileSender(s.offline_path.format(rank=s.rank, run=s.run)) if s.offline_path
                    else HttpSender(s.url, s.token, s.timeout_seconds, launch=lambda: launch_header(s, pid)))
        deadline = time.monotonic() + SEND_SECONDS
        batch_id = f"{s.launch_id}-end/1"
        delay = 0.1
        while True:
            result: Result = sender.send([rec], batch_id)
            if result.outcome != "retry" or time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        if result.outcome != "ok":
            log.warning("trainhealth.launch: could not report rank %d's end (%s)", s.rank, result.reason)
        sender.close()
        return result


def _die_with_parent() -> None:
    """In the child, before exec: its own process group (a signal sent to the watcher's group, torchrun's
    killpg or Ctrl-C, reaches it once: passed on by the watcher), and SIGKILL when the watcher dies (Linux),
    so no rank outlives its watcher."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        pass


def exit_like(code: int) -> None:
    """Exit as the child did: the same code, or killed by the same signal (no core file of our own)."""
    if code >= 0:
        sys.exit(code)
    sig = -code
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    try:
        signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset (EINVAL): their default stands
        pass
    os.kill(os.getpid(), sig)
    sys.exit(128 + sig)  # a signal that does not end a process by default


USAGE = "usage: python -m trainhealth.launch [--] COMMAND [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or "").split("\n\n")[2], file=sys.stderr)
        sys.exit(0 if args else 2)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    watcher = RankWatcher(args)
    try:
        watcher.start()
    except OSError as exc:
        print(f"trainhealth.launch: cannot start {args[0]!r}: {exc}", file=sys.stderr)
        sys.exit(127)
    exit_like(watcher.wait())


if __name__ == "__main__":
    main()
