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

from typing import TYPE_CHECKING, Any

from .incident import ranks_phrase, where, whole_hosts

if TYPE_CHECKING:
    from .liveness import RankStalled

SAME_MOMENT_SECONDS = 5.0  # last records this close together: "at the same moment" (a heartbeat interval)


def describe(det: RankStalled, stalled: dict[int, tuple[str, float, float]],
             at: float) -> tuple[str, int, dict[str, Any]]:
    """(summary, step, fields) of the run's stall incident."""
    ranks = det.ranks
    live = [q for q, r in ranks.items() if not det.finished(r)]
    quiet = [q for q in live if at - ranks[q].seen > det.silence_limit(ranks[q]) / 2]
    failed = sorted(det.peer_failed)
    first = min(stalled, key=lambda q: (stalled[q][1], q))
    reason, _, limit = stalled[first]
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
    others = [q for q in live if q not in roots]
    moving = _moving(det, roots, others, quiet)
    summary = head + _others(det, roots, others, failed, quiet, moving)
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


def _silent(det: RankStalled, roots: list[int], live: list[int], at: float) -> tuple[str, int]:
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
        return (f"rank {q} went silent {after}: nothing from it for {at - ranks[q].seen:.0f} s (process "
                f"gone or frozen: killed by a signal or the OOM killer, or its node is down)"), steps[0]
    return (f"{ranks_phrase(roots)} went silent {after} {moment} (processes gone or frozen: killed, "
            f"or their node is down)"), steps[0]


def _stuck(det: RankStalled, live: list[int], at: float, limit: float,
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


def _moving(det: RankStalled, roots: list[int], others: list[int], quiet: list[int]) -> list[int]:
    """The other ranks that still finish steps: advanced after the root stopped, and past the step after the
    root's (in synchronous training a rank may finish the one step the root's collective let through, never
    more: that rank waits, it does not train on)."""
    if not roots:
        return []
    ranks = det.ranks
    stopped = max(ranks[q].seen for q in roots)
    top = max(ranks[q].shown for q in roots)
    return sorted(q for q in others if ranks[q].advance_time > stopped and ranks[q].shown > top + 1
                  and q not in quiet)


def _others(det: RankStalled, roots: list[int], others: list[int], failed: list[int],
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
    if failed:
        error = ranks[failed[0]].error
        out += (f"; {where(det.run, failed)} failed after {'it' if len(roots) == 1 else 'them'} with a "
                f"collective error ({error})")
    return out


def _basis(det: RankStalled, r: Any, reason: str, limit: float) -> str:
    s = det.settings
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
