"""What rank_stalled's one alert per run says: the root of a stall, its host, and what the others do.

Judged at ``at`` (the moment the first limit was crossed, for a new alert), so the server and replay name
the same root. In order:

* silent: ranks quiet for half their silence limit (ranks stop within ms of each other, and the first to
  cross its limit must not be named alone) while other ranks still send records, or failed after them with
  a collective error. When they are all of one host's ranks, the host: "node-b went silent: ranks 4-7
  stopped after step 1500 at the same moment (node down or network partition); ranks 0-3 on node-a wait in
  a collective". Every rank quiet together: the job was killed, its node went down, or the recording ended.
* stuck: the ranks left behind at the lowest step (the others reached a later step and wait in its
  collectives); all at one step: those whose heartbeats say they wait for data (``phase`` "data", a hung
  DataLoader) while the others got their batch; else the blocker cannot be told from steps, and the
  summary says how to find it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from ...record import Record
from ...state import RunState
from .incident import ranks_phrase, where, whole_hosts


@dataclass(slots=True)
class RankClock:
    """What rank_stalled keeps of one rank: when it last advanced and last spoke, what it said it does."""

    advance_time: float  # when step last advanced (or the baseline: start / first record)
    seen: float  # newest record time
    step: int = -1  # -1: no step known since the last start
    kept: int = 0  # the last step it reported before its last start (``shown`` until it reports one again)
    sample_step: int = -1  # highest step of its samples (the training thread's own order)
    advanced: bool = False  # step advanced since the baseline
    beats: bool = False  # sends heartbeats
    ended: bool = False
    retired: bool = False  # a later start has a world_size that no longer includes it
    after_start: bool = True  # the previous record was a start (its gap is start-up, not learned)
    said: Record | None = None  # its newest heartbeat or sample, kept whole (None after a start): ``phase``
    phase_seen: float = -math.inf  # time of the record that said so
    error: str = ""  # its failed end's exception, quoted ("" for none)
    end_time: float = -math.inf  # time of its latest end (records measured before it may arrive after it)
    last_beat: float = -math.inf  # time of its newest heartbeat
    beat_gap: float = 0.0  # between its last two heartbeats (its client's period): 0 until two are seen

    # read when a story is told; kept as the record itself and the step, not copied on every record
    @property
    def shown(self) -> int:
        """The last step it reported (kept across a start), for alerts."""
        return self.step if self.step >= 0 else self.kept

    @property
    def phase(self) -> str | None:
        """What its training thread does ("data", "step", ...), as its newest heartbeat or sample says."""
        return None if self.said is None else self.said.phase

    @property
    def phase_time(self) -> float | None:
        """When that phase began."""
        said = self.said
        return None if said is None or said.phase is None else said.phase_time


class _Limits(Protocol):
    """The rank_stalled settings a basis names."""
    @property
    def factor(self) -> float: ...
    @property
    def floor_seconds(self) -> float: ...
    @property
    def silence_floor_seconds(self) -> float: ...


class Stalls(Protocol):
    """What the story reads of the rank_stalled detector (liveness.RankStalled): its per-rank clocks and
    limits. A protocol, so this module does not import the detector that imports it."""
    run: RunState
    ranks: dict[int, RankClock]
    peer_failed: dict[int, str]
    peer_times: dict[int, float]
    peer_stopped: set[int]
    peer_at_once: bool
    longest: float
    longest_gap: float

    @property
    def settings(self) -> _Limits: ...
    def finished(self, r: RankClock) -> bool: ...
    def silence_limit(self, r: RankClock) -> float: ...
    def typical(self) -> float | None: ...
    def suspect(self, r: RankClock) -> bool: ...


SAME_MOMENT_SECONDS = 5.0  # last records this close together: "at the same moment" (a heartbeat interval)


def describe(det: Stalls, stalled: dict[int, tuple[str, float, float]],
             at: float) -> tuple[str, int, dict[str, Any]]:
    """(summary, step, fields) of the run's stall incident."""
    ranks = det.ranks
    live = [q for q, r in ranks.items() if not det.finished(r)]
    quiet = [q for q in live if at - ranks[q].seen > det.silence_limit(ranks[q]) / 2]
    failed = sorted(det.peer_failed)
    first = min(stalled, key=lambda q: (stalled[q][1], q))
    reason, _, limit = stalled[first]
    stopped = _stopped_with_failed(det, quiet, failed)
    quiet = [q for q in quiet if q not in stopped]
    later = _quiet_later(det, stalled, live, quiet, at) if len(quiet) == len(live) and not failed else []
    if later:  # the root went silent while these still sent: it stays the root, they went quiet after it
        quiet = [q for q in quiet if q not in later]
    if quiet and (len(quiet) < len(live) or failed):
        roots = sorted(quiet)
        head, step = _silent(det, roots, live, at)
        reason = "silent"
    else:
        prefix = ""
        if quiet:  # every live rank went quiet together: say so, then look for the one behind
            seen = [ranks[q].seen for q in quiet]
            prefix = f"every rank went silent within {max(seen) - min(seen):.1f} s; "
        roots, head, step = _stuck(det, live, at, limit, bool(quiet))
        head = prefix + head
        if roots:
            reason = stalled[roots[0]][0] if roots[0] in stalled else reason
    others = [q for q in live if q not in roots and q not in stopped and q not in later]
    moving = _moving(det, roots, others, quiet, at)
    summary = head + _others(det, roots, others, failed, quiet, moving)
    if later:
        gap = min(ranks[q].seen for q in later) - max(ranks[q].seen for q in roots)
        summary += (f"; {where(det.run, later)} went quiet {gap:.0f} s after {'it' if len(roots) == 1 else 'them'} "
                    f"(stopped too, or the recording ends there)")
    if stopped and roots:
        its = "its" if len(stopped) == 1 else "their"
        summary += (f"; {where(det.run, stopped)} went silent after {'it' if len(failed) == 1 else 'them'} "
                    f"(stopped by {its} launcher when a rank of {its} node failed)")
    anchor = ranks[roots[0]] if roots else ranks[first]
    summary += "; " + _basis(det, anchor, reason, limit)
    hosts = whole_hosts(det.run, roots) if roots else []
    data: dict[str, Any] = {
        "reason": reason,
        "first_rank": roots[0] if roots else None,
        "root_ranks": roots,
        "host": hosts[0] if len(hosts) == 1 else None,
        "hosts": hosts,
        "silent_ranks": sorted(q for q, f in stalled.items() if f[0] == "silent"),
        "stuck_ranks": sorted(q for q, f in stalled.items() if f[0] == "stuck"),
        "waiting_ranks": sorted(q for q in others if q not in moving),
        "running_ranks": moving,
        "failed_ranks": failed,
        "stopped_ranks": sorted(stopped),
        "threshold_seconds": limit,
        "last_step_time": anchor.advance_time,
        "last_record_time": anchor.seen,
        "longest_step_interval_seconds": det.longest,
        "typical_step_interval_seconds": det.typical(),
        "heartbeats": anchor.beats,
        "phase": anchor.phase,
        "phase_time": anchor.phase_time,
    }
    return summary, step, data


def _quiet_later(det: Stalls, stalled: dict[int, tuple[str, float, float]], live: list[int], quiet: list[int],
                 at: float) -> list[int]:
    """Every live rank is quiet at ``at``, but when the first rank crossed its silence limit some still sent
    records: those went quiet after the root (returned), they are not a second root. Without this, a refresh
    after the others stopped too (killed behind the root, a job's scheduler, or just the end of a recording
    replayed with --until) would re-tell the incident as "every rank went silent" and lose the root: the
    others stopping later is no evidence about who stopped first. Judged at the first silent crossing, the
    moment the root was named; [] when that is ``at`` (a new alert) or every rank was quiet already then."""
    first = min((f[1] for f in stalled.values() if f[0] == "silent"), default=at)
    if first >= at:
        return []
    ranks = det.ranks
    later = [q for q in quiet if first - ranks[q].seen <= det.silence_limit(ranks[q]) / 2]
    return later if len(later) < len(live) else []


def _stopped_with_failed(det: Stalls, quiet: list[int], failed: list[int]) -> list[int]:
    """Quiet ranks on a host where a rank failed with a collective error, while ranks of another host went
    quiet: torchrun stops a node's other workers (SIGTERM: nothing sent by a client that does not report it)
    when one of them fails, so their silence is a consequence of the others', not the root. Without hosts
    (older clients): none."""
    if not failed:
        return []
    torn = {det.run.ranks[q].host for q in failed if q in det.run.ranks} - {None}
    stopped = [q for q in quiet if q in det.run.ranks and det.run.ranks[q].host in torn]
    return stopped if len(stopped) < len(quiet) else []


def _silent(det: Stalls, roots: list[int], live: list[int], at: float) -> tuple[str, int]:
    ranks = det.ranks
    seen = sorted(ranks[q].seen for q in roots)
    spread = seen[-1] - seen[0]
    moment = "at the same moment" if spread <= SAME_MOMENT_SECONDS else f"within {spread:.0f} s"
    steps = sorted({ranks[q].shown for q in roots})
    after = f"after step {steps[0]}" if len(steps) == 1 else f"after steps {steps[0]}-{steps[-1]}"
    hosts = whole_hosts(det.run, roots)
    if hosts:
        return (f"{_and(hosts)} went silent: {ranks_phrase(roots)} stopped {after} {moment} (node down or "
                f"network partition)"), steps[0]
    if len(roots) == 1:
        q = roots[0]
        if det.suspect(ranks[q]):  # a peer's collective broke (or the peer was stopped) after its last word
            broke = ("a peer was stopped" if set(det.peer_times) <= det.peer_stopped
                     else "a peer's collective broke")
            return (f"rank {q} exited without an end record {after}: nothing from it for {at - ranks[q].seen:.1f} s "
                    f"while {broke} (killed by a signal or the OOM killer, or its node is "
                    f"down; run the ranks under `python -m trainhealth.launch` to learn how)"), steps[0]
        return (f"rank {q} went silent {after}: nothing from it for {at - ranks[q].seen:.0f} s (process "
                f"gone or frozen: killed by a signal or the OOM killer, or its node is down)"), steps[0]
    return (f"{ranks_phrase(roots)} went silent {after} {moment} (processes gone or frozen: killed, "
            f"or their node is down)"), steps[0]


def _stuck(det: Stalls, live: list[int], at: float, limit: float,
           silent: bool) -> tuple[list[int], str, int]:
    """The blocker by step (and phase); ``silent``: every rank went quiet, only their steps tell."""
    ranks = det.ranks
    order = sorted((ranks[q].shown, q) for q in live)
    low, top = order[0][0], order[-1][0]
    behind = [q for s, q in order if s == low]
    if len(behind) < len(live):
        roots = behind
        one = len(roots) == 1
        its = "its" if one else "their"
        beat = f"while {its} heartbeats continue" if ranks[roots[0]].beats else "while records still come"
        hosts = whole_hosts(det.run, roots)
        who = f"{_and(hosts)}'s {ranks_phrase(roots)}" if hosts else ranks_phrase(roots)
        others = [q for q in live if q not in roots]
        n = len(others)
        if silent:
            return roots, (f"{who} stopped first (at step {low}; {where(det.run, others)} reached {top})"), low
        return roots, (f"{who} {'is' if one else 'are'} stuck after step {low}: no step finished for "
                       f"{limit:.0f} s {beat} (blocked in data loading, I/O or a call of {its} own); "
                       f"{who} stopped first (at step {low}; {where(det.run, others)} reached {top} and "
                       f"wait{'s' if n == 1 else ''} in a collective)"), low
    data = sorted((_or(ranks[q].phase_time, at), q) for q in live if ranks[q].phase == "data")
    if data and len(data) < len(live):
        roots = sorted(q for _, q in data)
        since, q = data[0]
        since = min(since, at)
        n = len(live) - len(roots)
        their = "its" if len(roots) == 1 else "their"
        verb = "has" if len(roots) == 1 else "have"
        return roots, (f"{where(det.run, roots)} {verb} been waiting for data since step {low} (rank {q} "
                       f"for {at - since:.0f} s) while {_n_others(n)} wait{'s' if n == 1 else ''} in the "
                       f"step's collectives: check {their} DataLoader/storage; py-spy dump {their} "
                       f"workers"), low
    if data:
        since, q = data[0]
        return [], (f"all {len(live)} ranks have been waiting for data since step {low} (rank {q} for "
                    f"{at - min(since, at):.0f} s): check the shared storage or input pipeline"), low
    return [], (f"all {len(live)} ranks stand at step {low}: no step finished for {limit:.0f} s; the rank "
                f"that blocks the others cannot be told from steps (dump their stacks, e.g. py-spy "
                f"dump)"), low


def _moving(det: Stalls, roots: list[int], others: list[int], quiet: list[int], at: float) -> list[int]:
    """The other ranks that still finish steps: advanced after the root stopped, past the step after the
    root's (in synchronous training a rank may finish the one step the root's collective let through, never
    more: that rank waits, it does not train on), and recently: within half the root's silence limit of
    ``at``. A killed client loses its unsent records (up to a flush interval of steps), so the root's last
    step seen may be a few behind the one it reached; the others' steps just after its last record are
    those they shared with it, not training on."""
    if not roots:
        return []
    ranks = det.ranks
    stopped = max(ranks[q].seen for q in roots)
    recent = at - det.silence_limit(ranks[roots[0]]) / 2
    top = max(ranks[q].shown for q in roots)
    return sorted(q for q in others if ranks[q].advance_time > max(stopped, recent) and ranks[q].shown > top + 1
                  and q not in quiet)


def _others(det: Stalls, roots: list[int], others: list[int], failed: list[int],
            quiet: list[int], moving: list[int]) -> str:
    """What the ranks that are not the root do: wait in a collective, train on, or failed after it."""
    if not roots:
        return ""
    ranks = det.ranks
    out = ""
    waiting = [q for q in others if q not in moving and q not in quiet]
    if waiting and quiet and set(quiet) == set(roots):
        n = len(waiting)
        out += f"; {where(det.run, waiting)} wait{'s' if n == 1 else ''} in a collective"
    if moving:
        out += f"; {where(det.run, moving)} still finish{'es' if len(moving) == 1 else ''} steps"
    it = "it" if len(roots) == 1 else "them"
    errors = [q for q in failed if q not in det.peer_stopped]
    if errors:
        out += f"; {where(det.run, errors)} failed after {it} with a collective error ({ranks[errors[0]].error})"
    stopped = [q for q in failed if q in det.peer_stopped]
    if stopped:
        out += (f"; {where(det.run, stopped)} {'was' if len(stopped) == 1 else 'were'} stopped after {it} "
                f"({ranks[stopped[0]].error})")
    return out


def _basis(det: Stalls, r: Any, reason: str, limit: float) -> str:
    s = det.settings
    if reason == "silent" and det.suspect(r):
        q = min(det.peer_times, key=lambda k: (det.peer_times[k], k))
        what = f"rank {q} was stopped" if q in det.peer_stopped else f"rank {q}'s collective error"
        return (f"limit {det.silence_limit(r):.1f} s: quiet since before {what} "
                f"({'every other rank had finished' if det.peer_at_once else 'its heartbeats stopped'})")
    if reason == "silent" and r.beats:
        return (f"limit {det.silence_limit(r):.0f} s = max(floor {s.silence_floor_seconds:.0f} s, "
                f"{s.factor:g}x the longest record gap seen, {det.longest_gap:.1f} s)")
    if r.advanced:
        return (f"limit {limit:.0f} s = max(floor {s.floor_seconds:.0f} s, {s.factor:g}x the longest step "
                f"interval seen, {det.longest:.1f} s)")
    return f"limit {limit:.0f} s: no step finished since it started"


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _n_others(n: int) -> str:
    return "the other rank" if n == 1 else f"the other {n} ranks"
