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
  alert. A rank killed by a signal sends nothing: that silence is rank_stalled's.

The alert is refreshed in place (same fingerprint, no second page) as more ranks fail or stop; it resolves
when a failed rank starts again (a restart), which forgets every failure of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..events import Event, firing, resolved
from ..record import ErrorInfo, Record
from ..state import RunState
from .base import Detector
from .incident import oom_error, peer_error, quote, ranks_phrase, where
from .validate import flag


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


class RankFailed(Detector[RankFailedSettings]):
    name = "rank_failed"
    Settings = RankFailedSettings

    def __init__(self, settings: RankFailedSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.failures: dict[int, _Failure] = {}
        self.oom: set[int] = set()  # ranks that sent an oom record since their last start
        self.open = False
        self.signature: tuple[Any, ...] | None = None
        self.picture: dict[str, Any] = {}

    def update(self, record: Record) -> list[Event]:
        kind = record.type
        if kind == "oom":
            self.oom.add(record.rank)
            return []
        if kind == "start":
            self.oom.discard(record.rank)
            if record.rank not in self.failures:
                return []
            return self._restart(record)
        if kind != "end":
            return []
        if record.status == "failed" and self.settings.enabled:
            error = record.error
            if oom_error(error) and record.rank in self.oom:
                return []  # gpu_oom's incident, with the allocator summary
            self.failures[record.rank] = _Failure(record.rank, record.step or 0, record.time, error,
                                                  quote(error), peer_error(error))
        elif not self.open:
            return []  # a clean end: never an alert
        return self._judge(record.time)

    def tick(self, now: float) -> list[Event]:
        return self._judge(now) if self.open else []

    def _judge(self, now: float) -> list[Event]:
        if not self.failures:
            return []
        own = [f for f in self.failures.values() if not f.peer]
        everyone_ended = all(r.ended or q in self.failures for q, r in self.run.ranks.items())
        if not own and not everyone_ended:
            return []  # consequences only, while other ranks live: rank_stalled names the silent root
        root = min(own or self.failures.values(), key=lambda f: (f.time, f.rank))
        states = self.run.ranks
        others = [q for q in states if q not in self.failures and not states[q].ended]
        waiting = sorted(q for q in others if states[q].last_step <= root.step)
        moving = sorted(q for q in others if states[q].last_step > root.step)
        signature = (frozenset(self.failures), root.rank, tuple(waiting), tuple(moving))
        if self.open and signature == self.signature:
            return []
        self.signature = signature
        summary = f"rank {root.rank} failed at step {root.step}: {root.quoted}"
        if not own:
            summary += ("; every rank of the run ended, each with a collective error: the rank that broke "
                        "the collective is not among those this sidecar sees, or it ended without a word")
        if waiting:
            n = len(waiting)
            where_ = ("the all-reduce" if all(states[q].phase == "step" for q in waiting) else "a collective")
            summary += f"; {where(self.run, waiting)} wait{'s' if n == 1 else ''} in {where_}"
        later = sorted(q for q, f in self.failures.items() if q != root.rank and not f.peer)
        if later:
            summary += f"; {ranks_phrase(later)} failed too ({self.failures[later[0]].quoted})"
        consequences = sorted(q for q, f in self.failures.items() if q != root.rank and f.peer)
        if consequences:
            summary += (f"; {where(self.run, consequences)} failed after it with a collective error "
                        f"({self.failures[consequences[0]].quoted})")
        if moving:
            summary += f"; {where(self.run, moving)} still finish{'es' if len(moving) == 1 else ''} steps"
        error = root.error
        host = states[root.rank].host if root.rank in states else None
        data: dict[str, Any] = {
            "first_rank": root.rank, "root_ranks": [root.rank], "host": host,
            "failed_ranks": sorted(self.failures), "waiting_ranks": waiting, "running_ranks": moving,
            "error_type": error.type if error else None, "error_message": error.message if error else None,
            "traceback": error.traceback if error else None, "failed_at": root.time,
        }
        self.picture = {"summary": summary, "step": root.step, **data}
        event = firing(self.name, None, root.step, now if self.open else root.time, summary, "critical",
                       **data)
        event.refresh = self.open
        self.open = True
        return [event]

    def _restart(self, record: Record) -> list[Event]:
        was_open = self.open
        step = self.picture.get("step", 0)
        self.failures.clear()
        self.open = False
        self.signature = None
        self.picture = {}
        if not was_open:
            return []
        return [resolved(self.name, None, step, record.time,
                         f"run restarted (start from rank {record.rank}) after the failure")]

    def facts(self) -> dict[str, Any]:
        """The open incident: the failed rank, its exception, and the ranks that wait (GET /v1/runs/{run})."""
        return dict(self.picture) if self.open else {}
