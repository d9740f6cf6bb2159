"""rank_failed: a rank ended with ``status: "failed"``; one critical alert for the run quotes its exception.

The client sends ``end`` with ``status: "failed"`` and ``error: {type, message, traceback}`` from its
exception hooks before the process dies (a CUDA error, a bug, a bad checkpoint). The alert (``rank`` null:
one incident per run, however many ranks fail) names the root and what the others do:

    rank 1 failed at step 20: RuntimeError: CUDA error: unspecified launch failure; rank 0 waits in the
    all-reduce

* The root is the earliest failure whose error is the rank's own. A crash whose error says a peer went
  away or broke the collective first ("Connection closed by peer", an NCCL watchdog timeout) is a
  consequence: listed in ``failed_ranks``, never the root while another explanation exists. When such
  consequences are all there is and other ranks are still live (they went silent: a node down, a rank
  killed by a signal), rank_stalled names the root; when every rank of the run ended, the first of them is
  named, saying the rank that broke the collective is not among those seen.
* The others' stall is part of this incident: ranks that have not gone past the failed rank's step wait in
  its collective (``waiting_ranks``); rank_stalled does not page them (see liveness.py).
* A GPU out-of-memory crash whose rank sent an ``oom`` record (since its last start) is gpu_oom's incident:
  not paged again here.
* An ``end`` with status "completed", or without a status (an older client), is a clean end: never an
  alert. A rank killed by another signal sends nothing: that silence is rank_stalled's, unless its launcher
  (trainhealth.launch) sends the ``end`` for it: ``signal`` or ``exit_code``, ``stderr_tail``,
  ``oom_killed`` ("rank 1 died at step 4: killed by SIGSEGV (segmentation fault): Fatal Python error: ...").
  The launcher's word on a death the client reported is added to that failure; an exit code after the
  rank's own clean end is no failure; a SIGTERM (passed on by the launcher, or reported by the rank's
  client before it died of it: the job being stopped, torchrun stopping the survivors of a death) is a
  consequence, and stops alone are no failure; a consequence alone while the other ranks train on is
  named. A sample measured after a death the launcher saw is a new process: the incident resolves.

The alert is refreshed in place (same fingerprint, no second page) as more ranks fail or stop; it resolves
when a failed rank starts again (a restart), which forgets every failure of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config.rules import flag
from ..events import Event, firing, resolved
from ..record import ErrorInfo, Record
from ..state import RankState, RunState
from .base import Detector
from .helpers.incident import OomFacts, death, oom_error, ranks_phrase, where


@dataclass(kw_only=True, slots=True)
class RankFailedSettings:
    enabled: bool = True

    def __post_init__(self) -> None:
        flag(self, "rank_failed", "enabled")


@dataclass(slots=True)
class _Failure:
    rank: int
    step: int
    time: float
    error: ErrorInfo | None
    quoted: str
    peer: bool  # a consequence of another rank going away
    cause: str = "exception"
    signal: str | None = None  # what the launcher saw (trainhealth.launch): killed by this signal,
    exit_code: int | None = None  # or exited with this code,
    oom_killed: bool = False  # killed by the kernel's OOM killer,
    oom: OomFacts | None = None  # how the launcher decided that (a child it killed, a doubt)
    stderr_tail: str | None = None  # and its last words on stderr
    forwarded: bool = False  # its signal came from its launcher (the job being stopped from above)
    memory: float | None = None  # its cgroup's peak usage and limit (an OOM kill)
    limit: float | None = None
    steps_then: dict[int, int] | None = None  # the other ranks' steps when it failed


def _trains_after(state: RankState, f: _Failure) -> bool:
    """A step finished and measured after the failure (a late sample from before it does not count)."""
    return (state.last_step > (f.steps_then or {}).get(state.rank, -1)
            and (state.last_sample_time or -math.inf) > f.time)


def _dead(f: _Failure) -> bool:
    return f.signal is not None or f.exit_code is not None


def _launcher_says(record: Record) -> bool:
    return record.signal is not None or record.exit_code is not None


class RankFailed(Detector[RankFailedSettings]):
    name = "rank_failed"
    Settings = RankFailedSettings

    def __init__(self, settings: RankFailedSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.failures: dict[int, _Failure] = {}
        self.oom: set[int] = set()  # ranks that sent an oom record since their last start
        self.clean: set[int] = set()  # ranks whose last word was a clean end (a later exit code is deliberate)
        self.open = False
        self.signature: tuple[Any, ...] | None = None
        self.picture: dict[str, Any] = {}

    def update(self, record: Record) -> list[Event]:
        kind = record.type
        if kind == "sample" or kind == "heartbeat":
            if self.clean:
                self.clean.discard(record.rank)
            if self.failures:
                f = self.failures.get(record.rank)
                if f is not None and _dead(f) and kind == "sample" and record.time > f.time:
                    # its process died (the launcher saw it): a sample measured later is a new process
                    return self._restart(record, f"rank {record.rank} trains again after its death")
            return []
        if kind == "oom":
            self.oom.add(record.rank)
            return []
        if kind == "start":
            self.oom.discard(record.rank)
            self.clean.discard(record.rank)
            if record.rank not in self.failures:
                return []
            return self._restart(record, f"run restarted (start from rank {record.rank}) after the failure")
        if kind != "end":
            return []
        if record.status == "failed" and self.settings.enabled:
            error = record.error
            if oom_error(error) and record.rank in self.oom:
                return []  # gpu_oom's incident, with the allocator summary
            if _launcher_says(record) and error is None and record.rank in self.clean:
                return []  # it ended cleanly, then exited with a code of its own choosing (a stop: exit 3)
            had = self.failures.get(record.rank)
            if had is not None and _dead(had) and _launcher_says(record):  # a process dies once: a new one died
                out = self._restart(record, f"rank {record.rank} ran again and died again: a new incident")
                self._fail(record)
                return out + self._judge(record.time)
            self._fail(record)
        else:
            self.clean.add(record.rank)
            if not self.open:
                return []  # a clean end: never an alert
        return self._judge(record.time)

    def _fail(self, record: Record) -> None:
        """A failed end: a new failure, or the launcher's word on one the client reported (or the reverse)."""
        had = self.failures.get(record.rank)
        f = had if had is not None else _Failure(record.rank, record.step or 0, record.time, None, "", False)
        if record.error is not None:
            f.error = record.error
        if _launcher_says(record):
            f.signal, f.exit_code = record.signal, record.exit_code
            f.forwarded = bool(record.signal_forwarded)
            f.oom_killed = bool(record.oom_killed)
            f.oom = OomFacts.of(record)
            f.stderr_tail = record.stderr_tail
            f.memory, f.limit = record.host_mem_bytes, record.host_mem_limit_bytes
        state = self.run.ranks.get(record.rank)
        oom = f.oom_killed or (f.oom is not None and f.oom.child)
        if oom and state is not None:  # the cgroup's figures, else the rank's last sample's
            f.memory = f.memory if f.memory is not None else state.latest.get("host_mem_bytes")
            f.limit = f.limit if f.limit is not None else state.latest.get("host_mem_limit_bytes")
        said = death(f.error, signal=f.signal, exit_code=f.exit_code, forwarded=bool(record.signal_forwarded),
                     oom_killed=f.oom_killed, stderr_tail=f.stderr_tail, memory=f.memory, limit=f.limit,
                     oom=f.oom)
        f.quoted, f.cause, f.peer = said.quoted, said.cause, said.peer
        if had is None:
            f.steps_then = {q: s.last_step for q, s in self.run.ranks.items() if q != record.rank}
            self.failures[record.rank] = f

    def tick(self, now: float) -> list[Event]:
        return self._judge(now) if self.failures else []

    def _judge(self, now: float) -> list[Event]:
        if not self.failures:
            return []
        own = [f for f in self.failures.values() if not f.peer]
        states = self.run.ranks
        everyone_ended = all(r.ended or q in self.failures for q, r in states.items())
        others = [q for q in states if q not in self.failures and not states[q].ended]
        first = min(self.failures.values(), key=lambda f: (f.time, f.rank))
        moving_on = bool(others) and all(_trains_after(states[q], first) for q in others)
        if not own and not everyone_ended and not moving_on:
            return []  # consequences only, while other ranks live and wait: rank_stalled names the silent root
        if not own and all(f.cause == "stopped" for f in self.failures.values()):
            return []  # the job was stopped from outside (scancel, a time limit): no failure of its own
        root = min(own or self.failures.values(), key=lambda f: (f.time, f.rank))
        waiting = sorted(q for q in others if states[q].last_step <= root.step)
        moving = sorted(q for q in others if states[q].last_step > root.step)
        signature = (frozenset(self.failures), root.rank, root.quoted, root.signal, root.exit_code, tuple(waiting),
                     tuple(moving))
        if self.open and signature == self.signature:
            return []
        self.signature = signature
        if root.cause == "exception":
            summary = f"rank {root.rank} failed at step {root.step}: {root.quoted}"
        else:
            summary = f"rank {root.rank} died at step {root.step}: {root.quoted}"
        if not own and everyone_ended:
            summary += ("; every rank of the run ended, each with a collective error: the rank that broke "
                        "the collective is not among those this sidecar sees, or it ended without a word")
        elif not own:
            summary += "; the other ranks train on: nothing here explains its collective error"
        if waiting:
            n = len(waiting)
            where_ = ("the all-reduce" if all(states[q].phase == "step" for q in waiting) else "a collective")
            summary += f"; {where(self.run, waiting)} wait{'s' if n == 1 else ''} in {where_}"
        later = sorted(q for q, f in self.failures.items() if q != root.rank and not f.peer)
        if later:
            summary += f"; {ranks_phrase(later)} failed too ({self.failures[later[0]].quoted})"
        consequences = sorted(q for q, f in self.failures.items()
                              if q != root.rank and f.peer and f.cause != "stopped")
        if consequences:
            summary += (f"; {where(self.run, consequences)} failed after it with a collective error "
                        f"({self.failures[consequences[0]].quoted})")
        stopped = sorted(q for q, f in self.failures.items() if q != root.rank and f.cause == "stopped")
        if stopped:
            by = (f"by {'its' if len(stopped) == 1 else 'their'} launcher"
                  if all(self.failures[q].forwarded for q in stopped) else "by SIGTERM")
            summary += f"; {where(self.run, stopped)} {'was' if len(stopped) == 1 else 'were'} stopped after it {by}"
        if moving:
            summary += f"; {where(self.run, moving)} still finish{'es' if len(moving) == 1 else ''} steps"
        error = root.error
        host = states[root.rank].host if root.rank in states else None
        data: dict[str, Any] = {
            "first_rank": root.rank, "root_ranks": [root.rank], "host": host,
            "failed_ranks": sorted(self.failures), "waiting_ranks": waiting, "running_ranks": moving,
            "error_type": error.type if error else None, "error_message": error.message if error else None,
            "traceback": error.traceback if error else None, "failed_at": root.time,
            "cause": root.cause, "signal": root.signal, "exit_code": root.exit_code,
            "oom_killed": root.oom_killed, "stderr_tail": root.stderr_tail,
        }
        self.picture = {"summary": summary, "step": root.step, **data}
        event = firing(self.name, None, root.step, now if self.open else root.time, summary, "critical",
                       **data)
        event.refresh = self.open
        self.open = True
        return [event]

    def _restart(self, record: Record, why: str) -> list[Event]:
        was_open = self.open
        step = self.picture.get("step", 0)
        self.failures.clear()
        self.clean.clear()
        self.open = False
        self.signature = None
        self.picture = {}
        if not was_open:
            return []
        return [resolved(self.name, None, step, record.time, why)]

    def facts(self) -> dict[str, Any]:
        """The open incident: the failed rank, its exception, and the ranks that wait (GET /v1/runs/{run})."""
        return dict(self.picture) if self.open else {}
