"""The report's first card for a run: the incident, told in order (what, where, why, what the job did),
before the evidence. Alerts are read by their common fields (alert, severity, summary, rank,
``root_ranks``, ``host``, step, time, and a ``cause`` where one is given), so an alert this
module has never heard of is told the same way.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..detectors.helpers.incident import OomFacts, death
from ..record import ErrorInfo
from . import html
from .html import ranks_text

# Settings found wrong when the run started: the reason for what followed, named under "why", never the
# incident itself while a later alert says what went wrong.
CONDITIONS = frozenset({"lr_scaling"})
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
CAUSE_FIELDS = ("cause", "reason", "signal", "exit_code", "detection")


def choose(firing: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The incident: the most severe alert that fired, the earliest of those; a condition only if alone."""
    events = [a for a in firing if a["alert"] not in CONDITIONS] or list(firing)
    if not events:
        return None
    return min(events, key=lambda a: (SEVERITY_ORDER.get(str(a.get("severity")), 3), a["time"]))


def roots(alert: Mapping[str, Any]) -> list[int]:
    """The ranks an alert is about: its rank, else the roots it names (a run-level incident's
    ``root_ranks``); none for a run-level alert that names no root (lr_scaling: the run's setting)."""
    if alert.get("rank") is not None:
        return [alert["rank"]]
    return [r for r in (alert.get("root_ranks") or ()) if isinstance(r, int)]


def where_html(alert: Mapping[str, Any], hosts: Mapping[int, str]) -> str:
    ranks = roots(alert)
    shown = [html.esc(ranks_text(ranks)) if ranks else "the whole run"]
    host = alert.get("host") or sorted({hosts[r] for r in ranks if hosts.get(r)})
    if host:
        shown.append(f"host {html.esc(host if isinstance(host, str) else ', '.join(host))}")
    if alert.get("step") is not None:
        shown.append(f"step <b>{html.fmt_num(alert['step'])}</b>")
    shown.append(html.fmt_time(alert.get("time")))
    return ", ".join(shown)


def why_html(incident: Mapping[str, Any], before: Sequence[Mapping[str, Any]]) -> str:
    facts = [f"{name}: {html.esc(incident[name])}" for name in CAUSE_FIELDS if incident.get(name) not in (None, "")]
    out = f'<p>{"; ".join(facts)}</p>' if facts else ""
    if before:
        items = "".join(f'<li>{html.severity(a["severity"])} <b>{html.esc(a["alert"])}</b> '
                        f'({html.esc(ranks_text(roots(a)) if roots(a) else "run")}, '
                        f'step {html.fmt_num(a.get("step"))}): '
                        f'{html.esc(a.get("summary", ""))}</li>' for a in before)
        out += f'<p>What came before it, oldest first:</p><ul class="before">{items}</ul>'
    return out or '<p class="muted">No earlier alert and no cause recorded: see the evidence below.</p>'


def outcome_html(ends: Mapping[int, Mapping[str, Any]], ranks: Sequence[int], starts: Sequence[Mapping[str, Any]],
                 fired: Sequence[Mapping[str, Any]], first: Sequence[int]) -> str:
    """What the job did: the failed ranks (the incident's roots first), the ranks that ended (at one step:
    stopped there, by ``stop_on`` when the run's config says so), the ranks that sent no end at all."""
    parts = []
    failed = [r for r in ends if ends[r].get("status") == "failed"]
    failed.sort(key=lambda r: (r not in first, ends[r].get("time", 0), r))
    for k, r in enumerate(failed):
        lead = "failed" if k == 0 else "then failed"
        step = ends[r].get("step")  # a launcher's end has none: it knows how the rank died, not where
        where = f' at step {html.fmt_num(step)}' if isinstance(step, int) else ""
        parts.append(f'<li class="bad">rank {r} {lead}{where}: '
                     f'<code>{html.esc(how_it_ended(ends[r]))}</code></li>')
    done = sorted(r for r in ends if r not in failed)
    if done:
        steps: list[int] = sorted({ends[r]["step"] for r in done if isinstance(ends[r].get("step"), int)})
        at = f" at step <b>{steps[0]}</b>" if len(steps) == 1 else ""
        who = "every rank" if len(done) == len(ranks) else ranks_text(done)
        stop = stopped_by(starts, fired, steps[0]) if len(steps) == 1 else None
        if stop is not None:
            parts.append(f'<li>{who} stopped{at} by <code>stop_on</code>: {html.esc(stop["alert"])} fired at step '
                         f'{html.fmt_num(stop.get("step"))}; the loop left after the same step on every rank</li>')
        else:
            parts.append(f'<li>{who} ended{at} (an end record with status "completed")</li>')
    silent = [r for r in ranks if r not in ends]
    if silent:
        parts.append(f'<li>{html.esc(ranks_text(silent))} sent no end record: killed (a signal, the OOM killer, '
                     'the scheduler) or still running when the recording ends</li>')
    return f'<ul class="outcome">{"".join(parts)}</ul>'


def stopped_by(starts: Sequence[Mapping[str, Any]], fired: Sequence[Mapping[str, Any]],
               step: int) -> Mapping[str, Any] | None:
    """The alert named in the run's ``stop_on`` (its start's config) that fired at or before ``step``."""
    names: set[str] = set()
    for s in starts:
        value = (s.get("config") or {}).get("stop_on") if isinstance(s.get("config"), dict) else None
        if isinstance(value, str):
            names |= {n.strip() for n in value.split(",") if n.strip()}
        elif isinstance(value, (list, tuple)):
            names |= {str(n) for n in value}
    hits = [a for a in fired if a["alert"] in names and (a.get("step") is None or a["step"] <= step)]
    return min(hits, key=lambda a: a["time"]) if hits else None


def live_outcome_html(rank_states: Sequence[Mapping[str, Any]], starts: Sequence[Mapping[str, Any]],
                      fired: Sequence[Mapping[str, Any]]) -> str:
    """What the job did so far, from the sidecar's rank states: the ranks that ended (stopped by
    ``stop_on`` when they all ended at one step and the run's config names an alert that fired), and
    the ranks still running."""
    ended = [r for r in rank_states if r.get("ended")]
    running = [r for r in rank_states if not r.get("ended")]
    parts = []
    if ended:
        steps = sorted({r["step"] for r in ended if isinstance(r.get("step"), int)})
        who = "every rank" if not running else ranks_text([r["rank"] for r in ended])
        stop = stopped_by(starts, fired, steps[0]) if len(steps) == 1 and not running else None
        if stop is not None:
            parts.append(f'<li>{who} stopped at step <b>{steps[0]}</b> by <code>stop_on</code>: '
                         f'{html.esc(stop["alert"])} fired at step {html.fmt_num(stop.get("step"))}</li>')
        else:
            last = f" (last step {steps[-1]})" if steps else ""
            parts.append(f"<li>{who} ended{last}</li>")
    if running:
        steps = [r["step"] for r in running if isinstance(r.get("step"), int)]
        at = f" (at step {max(steps)})" if steps else ""
        parts.append(f'<li>{html.esc(ranks_text([r["rank"] for r in running]))} running{at}</li>')
    return f'<ul class="outcome">{"".join(parts)}</ul>'


def incident_html(alerts: Sequence[Mapping[str, Any]], ends: Mapping[int, Mapping[str, Any]],
                  ranks: Sequence[int], starts: Sequence[Mapping[str, Any]], outcome: str | None = None,
                  quiet: str = "over the whole recording") -> str:
    """The card. ``outcome``: what the job did, when the caller tells it (the live page); else from ``ends``."""
    firing = sorted((a for a in alerts if a["state"] == "firing"), key=lambda a: a["time"])
    hosts = {s["rank"]: s["host"] for s in starts if isinstance(s.get("host"), str) and s.get("rank") is not None}
    incident = choose(firing)
    if incident is None:
        return (f'<div class="incident quiet-run"><h3>No incident</h3><p class="quiet">The detectors stayed quiet '
                f'{html.esc(quiet)}.</p><h4>What the job did</h4>'
                f'{outcome or outcome_html(ends, ranks, starts, [], [])}</div>')
    before = []
    seen: set[str] = set()
    for a in firing:  # one line per alert name: its first firing before the incident
        if a is incident or a["time"] > incident["time"] or a["alert"] in seen:
            continue
        seen.add(a["alert"])
        same = [b for b in firing if b["alert"] == a["alert"] and b.get("step") == a.get("step")]
        before.append({**a, "rank": None, "root_ranks": sorted({r for b in same for r in roots(b)})}
                      if len(same) > 1 else a)
    after = sum(1 for a in firing if a["time"] > incident["time"])
    sev = html.esc(incident.get("severity"))
    step = html.esc(incident.get("step")) if incident.get("step") is not None else ""
    return (f'<div class="incident sev-{sev}" data-alert="{html.esc(incident["alert"])}" data-step="{step}">'
            '<h3>What happened</h3>'
            f'<p class="what">{html.severity(incident.get("severity"))} <b>{html.esc(incident["alert"])}</b>: '
            f'{html.esc(incident.get("summary", ""))}</p>'
            f'<table class="facts"><tr><th>where</th><td>{where_html(incident, hosts)}</td></tr>'
            f'<tr><th>why</th><td>{why_html(incident, before)}</td></tr>'
            f'<tr><th>what the job did</th>'
            f'<td>{outcome or outcome_html(ends, ranks, starts, firing, roots(incident))}</td></tr>'
            '</table>'
            + (f'<p class="muted">{after} more alert{"s" if after != 1 else ""} after it: the timeline below.</p>'
               if after else "")
            + '</div>')


def how_it_ended(end: Mapping[str, Any]) -> str:
    """A failed end in words: the exception, or what its launcher saw (signal, exit code, last words)."""
    error = end.get("error")
    info = ErrorInfo(**{k: v for k, v in error.items() if k in ("type", "message")}) if error else None
    return death(info, signal=end.get("signal"), exit_code=end.get("exit_code"),
                 forwarded=bool(end.get("signal_forwarded")), oom_killed=bool(end.get("oom_killed")),
                 stderr_tail=end.get("stderr_tail"), memory=end.get("host_mem_bytes"),
                 limit=end.get("host_mem_limit_bytes"), oom=OomFacts.of(end)).quoted
