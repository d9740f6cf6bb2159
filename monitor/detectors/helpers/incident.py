"""One incident, one page: helpers the run-level alerts share (rank_stalled, nan_divergence, rank_failed).

When several ranks of a run fail together (a node down, NaN spreading through the all-reduce, the others
blocked behind a crashed rank), one alert for the run names the root. These helpers say it the same way
everywhere: rank sets as ranges ("ranks 4-7"), the host when a set is all of one host's ranks (start records
carry ``host``), and whether a crash is a consequence of another rank going away (a collective error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ...record import ErrorInfo, Record
from ...state import RunState

GROUPS_SHOWN = 8  # runs of consecutive ranks named in a summary; the rest are counted

# What a rank raises when a peer of its collective went away or broke it first: the rank is a consequence,
# not the root (gloo: "Connection closed by peer", "Connection reset by peer"; NCCL: the watchdog's timeout,
# "NCCL communicator was aborted", "remote process exited or there was a network error"; torch's
# DistBackendError / DistNetworkError; the store "Broken pipe" when the master's node is gone).
_PEER_ERROR = re.compile(
    r"closed by peer|reset by peer|broken pipe|connection refused|communicator was aborted|"
    r"remote process exited|watchdog caught collective|collective operation timeout|"
    r"nccl.{0,200}(timeout|timed out|abort)|gloo.{0,200}(timeout|timed out|closed|connection)",
    re.IGNORECASE)
_PEER_TYPES = ("DistBackendError", "DistNetworkError", "DistStoreError")


def peer_error(error: ErrorInfo | None) -> bool:
    """Whether a crash says another rank went away or broke the collective first (then it is not the root)."""
    if error is None:
        return False
    if error.type.rsplit(".", 1)[-1] in _PEER_TYPES:
        return True
    return bool(_PEER_ERROR.search(error.message[:2000]))


def oom_error(error: ErrorInfo | None) -> bool:
    """A GPU out-of-memory crash (torch.cuda.OutOfMemoryError, or a RuntimeError saying so)."""
    if error is None:
        return False
    return error.type.endswith("OutOfMemoryError") or "out of memory" in error.message[:2000].lower()


def quote(error: ErrorInfo | None) -> str:
    """ "RuntimeError: CUDA error: unspecified launch failure" (the message's first line, bounded)."""
    if error is None:
        return "no error given"
    message = error.message.strip().split("\n", 1)[0][:300]
    kind = error.type or "an exception"
    return f"{kind}: {message}" if message else kind


def span(ranks: Iterable[int], groups_shown: int | None = GROUPS_SHOWN, pair: str = "-") -> str:
    """Sorted ranks as ranges: [0, 1, 2, 3, 6] -> "0-3, 6"; past ``groups_shown`` runs (None: never) the
    rest end as "and N more"; a run of two reads ``0-1``, or ``0, 1`` with ``pair=", "`` (the report's)."""
    groups: list[list[int]] = []
    for q in sorted(set(ranks)):
        if groups and q == groups[-1][1] + 1:
            groups[-1][1] = q
        else:
            groups.append([q, q])
    shown = [f"{a}" if a == b else f"{a}{pair}{b}" if b == a + 1 else f"{a}-{b}" for a, b in groups[:groups_shown]]
    rest = sum(b - a + 1 for a, b in groups[len(shown):])
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


def ranks_phrase(ranks: Iterable[int]) -> str:
    """ "rank 3" or "ranks 4-7"."""
    ranks = sorted(set(ranks))
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {span(ranks)}"


def whole_hosts(run: RunState, ranks: Iterable[int]) -> list[str]:
    """The hosts whose every rank is in ``ranks``, when ``ranks`` are exactly those hosts' ranks; else []."""
    group = set(ranks)
    hosts: set[str] = set()
    for q in group:
        state = run.ranks.get(q)
        if state is None or state.host is None:
            return []
        hosts.add(state.host)
    if any(s.host in hosts and q not in group for q, s in run.ranks.items()):
        return []
    return sorted(hosts)


def where(run: RunState, ranks: Iterable[int]) -> str:
    """ "ranks 0-3 on node-a", "ranks 0-3" (hosts unknown or mixed), "ranks 0-1 on node-a, 4-5 on node-b"."""
    ranks = sorted(set(ranks))
    if len({s.host for s in run.ranks.values()}) < 2:
        return ranks_phrase(ranks)  # one host (or none known): naming it adds nothing
    by_host: dict[str | None, list[int]] = {}
    for q in ranks:
        state = run.ranks.get(q)
        by_host.setdefault(state.host if state is not None else None, []).append(q)
    if None in by_host or len(by_host) > 3:
        return ranks_phrase(ranks)
    if len(by_host) == 1:
        ((host, qs),) = by_host.items()
        return f"{ranks_phrase(qs)} on {host}"
    parts = [f"{span(qs)} on {host}" for host, qs in sorted(by_host.items(), key=lambda kv: kv[1][0])]
    return "ranks " + ", ".join(parts)


def hosts_of(run: RunState, ranks: Iterable[int]) -> list[str]:
    """The distinct known hosts of ``ranks``, in rank order."""
    out: list[str] = []
    for q in sorted(set(ranks)):
        state = run.ranks.get(q)
        if state is not None and state.host is not None and state.host not in out:
            out.append(state.host)
    return out


# -- deaths: an end the launcher sent for a rank that died without its own (trainhealth.launch) ------------

SIGNAL_WORDS = {"SIGSEGV": "segmentation fault", "SIGBUS": "bus error", "SIGFPE": "arithmetic error",
                "SIGILL": "illegal instruction", "SIGKILL": "cannot be caught: the OOM killer, the scheduler or "
                "a user",
                "SIGTERM": "asked to stop: torchrun stopping the workers after a rank died, the scheduler or a user"}
_TERMINATE = re.compile(r"terminate called (after throwing an instance of '[^']*'|recursively|without an active "
                        r"exception)")
_FATAL = re.compile(r"Fatal Python error: .*")
_FRAME = re.compile(r'File "[^"]*", line \d+ in \S+')
WORDS_CHARS = 400  # the runtime's last words quoted in a summary


@dataclass(frozen=True, slots=True)
class Death:
    """How a rank ended, said once for every alert that names it."""

    quoted: str  # "killed by SIGSEGV (segmentation fault): Fatal Python error: Segmentation fault ..."
    cause: str  # "exception", "oom_killer", "signal", "exit", "stopped" (docs/alerts.md)
    peer: bool  # a consequence of another rank going away (a collective error, the job being stopped: SIGTERM)


def last_words(tail: str | None) -> str:
    """The runtime's last words in a stderr tail: C++'s ``terminate called ...`` with its ``what():``, a
    ``Fatal Python error`` with the innermost Python frame, else the last line that is not blank."""
    if not tail:
        return ""
    lines = [line.strip() for line in tail.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if _TERMINATE.search(lines[i]):
            words = lines[i][_TERMINATE.search(lines[i]).start():]  # type: ignore[union-attr]
            what = next((x for x in lines[i + 1:i + 4] if x.startswith("what():")), "")
            if what:
                words += ": " + what.removeprefix("what():").strip()
            return words[:WORDS_CHARS]
    for i in range(len(lines) - 1, -1, -1):
        m = _FATAL.search(lines[i])
        if m:
            after = lines[i + 1:]
            current = next((j for j, x in enumerate(after) if x.startswith("Current thread")), 0)
            frame = next((f.group(0) for x in after[current:] if (f := _FRAME.search(x))), "")
            return (m.group(0) + (f" ({frame})" if frame else ""))[:WORDS_CHARS]
    last = next((x for x in reversed(lines) if x), "")
    return last[:WORDS_CHARS]


def size(value: float) -> str:
    """ "1.5 GiB", "96 MiB"."""
    return f"{value / 2**30:.1f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


@dataclass(frozen=True, slots=True)
class OomFacts:
    """What the launcher learnt about the OOM killer at a death (docs/record.md, "A death the launcher saw")."""

    check: str | None = None  # "kernel_log", "cgroup_count", "machine_count", "unproven"; None: not said
    doubt: str | None = None  # with "unproven": why
    pid: int | None = None  # the rank's process
    killed_pid: int | None = None  # whom the kernel log names: the rank, or with ``child`` one of its children
    killed_comm: str | None = None
    child: bool = False

    @classmethod
    def of(cls, end: Record | Mapping[str, Any]) -> OomFacts | None:
        """An ``end`` record's (or its stored fields'), None where the launcher said nothing of it."""
        got = end if isinstance(end, Mapping) else {k: getattr(end, k) for k in _OOM_FIELDS}
        if got.get("oom_check") is None:
            return None
        return cls(got["oom_check"], got.get("oom_doubt"), got.get("pid"), got.get("oom_killed_pid"),
                   got.get("oom_killed_comm"), bool(got.get("oom_child")))


_OOM_FIELDS = ("oom_check", "oom_doubt", "pid", "oom_killed_pid", "oom_killed_comm", "oom_child")


# how a SIGKILL that was not the OOM killer's is said, by what ruled the OOM killer out
NOT_OOM = {"kernel_log": "not the OOM killer, per the kernel log",
           "machine_count": "not the OOM killer: it killed nothing on the machine while the rank ran",
           "cgroup_count": "not the OOM killer, per its cgroup's OOM-kill count"}
OOM_BY = {"kernel_log": "per the kernel log", "cgroup_count": "per its cgroup's OOM-kill count: the kernel log "
          "could not be read"}


def _at(memory: float | None, limit: float | None) -> str:
    if memory is not None and limit is not None:
        return f" at {size(memory)} of its {size(limit)} limit"
    if limit is not None:
        return f" at its {size(limit)} limit"
    return ""


def _sigkill(oom: OomFacts | None, after: str) -> str:
    """A SIGKILL the OOM killer is not proven to have sent: what ruled it out, or why it may still have."""
    if oom is None:
        return f"killed by SIGKILL ({SIGNAL_WORDS['SIGKILL']}){after}"
    if oom.check == "unproven":
        which = f"pid {oom.pid}" if oom.pid is not None else "its pid"
        return (f"killed by SIGKILL (possibly the OOM killer: {oom.doubt or 'nothing could prove it'}; "
                f"`dmesg` on its host says whether it killed {which}){after}")
    return f"killed by SIGKILL ({NOT_OOM.get(oom.check or '', 'not the OOM killer')}: a user, the scheduler or a " \
           f"watchdog){after}"


def death(error: ErrorInfo | None, *, signal: str | None = None, exit_code: int | None = None,
          forwarded: bool = False, oom_killed: bool = False, stderr_tail: str | None = None,
          memory: float | None = None, limit: float | None = None, oom: OomFacts | None = None) -> Death:
    """A failed ``end``'s words: the exception the client quoted, else what the launcher saw. The OOM killer
    is named only where the launcher proved it (``oom_killed``; ``oom``: how, and a child it killed)."""
    words = last_words(stderr_tail)
    after = f": {words}" if words else ""
    if oom is not None and oom.child:
        child = (f"its child process {oom.killed_pid} ({oom.killed_comm}) was killed by the kernel's OOM killer"
                 f"{_at(memory, limit)} ({OOM_BY.get(oom.check or '', 'per the kernel log')})")
        if error is not None and (error.type or error.message):
            return Death(f"{quote(error)} ({child})", "oom_killer", False)
        how = (f"was killed by {signal}" if signal is not None
               else f"exited with code {exit_code}" if exit_code is not None else "ended")
        return Death(f"{child}, then it {how}{after}", "oom_killer", False)
    if error is not None and error.type == "KeyboardInterrupt":  # Ctrl-C (SIGINT): the job was being stopped
        return Death("stopped by Ctrl-C (KeyboardInterrupt: SIGINT)", "stopped", True)
    if error is not None and (error.type or error.message):
        return Death(quote(error), "exception", peer_error(error))
    if oom_killed:
        by = f", {OOM_BY[oom.check]}" if oom is not None and oom.check in OOM_BY else ""
        return Death(f"killed by the kernel's OOM killer{_at(memory, limit)} (SIGKILL{by})", "oom_killer", False)
    peer = bool(words) and bool(_PEER_ERROR.search(words))
    if signal is not None:
        if forwarded:
            return Death(f"stopped by {signal} from its launcher (the job was being stopped)", "stopped", True)
        if signal == "SIGTERM":  # asked to stop (the client's own end, or its launcher's): the job was being stopped
            return Death(f"stopped by SIGTERM ({SIGNAL_WORDS['SIGTERM']}){after}", "stopped", True)
        if signal == "SIGABRT":
            return Death(f"aborted (SIGABRT){after}", "signal", peer)
        if signal == "SIGKILL":
            return Death(_sigkill(oom, after), "signal", peer)
        meaning = SIGNAL_WORDS.get(signal)
        return Death(f"killed by {signal}{f' ({meaning})' if meaning else ''}{after}", "signal", peer)
    if exit_code is not None:
        return Death(f"exited with code {exit_code} without reporting an exception{after}", "exit", peer)
    return Death("no error given", "exception", False)
