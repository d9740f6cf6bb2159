"""Server-side HTML: the live page's fragments and the pieces the report shares with it.

Every value from a record or an alert goes through ``esc`` (run names are restricted, summaries and
host names are not). The script only draws charts and swaps in fresh fragments: the tables are rendered
here, once, for both the first load and each refresh.
"""

from __future__ import annotations

import math
import time as _time
from functools import cache
from html import escape
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

from .. import jsonout
from ..detectors.helpers.incident import span
from .chart import dumps
from .glyphs import plain

MAX_RANK_ROWS = 256  # a 4,096-rank run lists its first ranks and says how many more
RECENT_ALERTS = 20


@cache
def asset(name: str) -> str:
    """A file of assets/ (package data: pyproject's [tool.setuptools.package-data])."""
    return resources.files(__package__).joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def esc(value: Any) -> str:
    return escape(plain(str(value)), quote=True)


def dumps_pretty(obj: Any) -> str:
    return jsonout.dumps(obj, indent=1)


def fmt_bytes(v: Any) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-" if v is None else esc(v)
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(v) >= 1024 and i < len(units) - 1:
        v /= 1024
        i += 1
    return f"{v:.0f} {units[i]}" if abs(v) >= 100 else f"{v:.3g} {units[i]}"


def fmt_num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return esc(jsonout.clean(v))
    if isinstance(v, float):
        return f"{v:.4g}"
    return esc(v)


def fmt_time(t: Any) -> str:
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        return "-"
    return _time.strftime("%Y-%m-%d %H:%M:%S", _time.gmtime(t)) + f".{int(t % 1 * 10)} UTC"


def severity(sev: Any) -> str:
    return f'<span class="sev sev-{esc(sev)}">{esc(sev)}</span>'


def alert_row(a: Mapping[str, Any], with_state: bool = True) -> str:
    state = f'<td class="{"resolved" if a["state"] == "resolved" else ""}">{esc(a["state"])}</td>' if with_state else ""
    rank = "run" if a.get("rank") is None else esc(a["rank"])
    return (f'<tr class="alert" data-alert="{esc(a["alert"])}"><td>{fmt_time(a.get("time"))}</td>'
            f'<td>{severity(a.get("severity"))}</td><td>{esc(a["alert"])}</td>{state}'
            f'<td class="num">{rank}</td><td class="num">{fmt_num(a.get("step"))}</td>'
            f'<td>{esc(a.get("summary", ""))}</td></tr>')


def alerts_table(alerts: Iterable[Mapping[str, Any]], empty: str, with_state: bool = True) -> str:
    rows = [alert_row(a, with_state) for a in alerts]
    if not rows:
        return f'<p class="quiet">{esc(empty)}</p>'
    state = "<th>state</th>" if with_state else ""
    return (f'<table class="alerts"><tr><th>time</th><th>severity</th><th>alert</th>{state}'
            f'<th class="num">rank</th><th class="num">step</th><th>summary</th></tr>{"".join(rows)}</table>')


def ranks_text(ranks: Sequence[int]) -> str:
    """"rank 3", "ranks 0, 2", "ranks 0-63, 70": consecutive ranks as a range, every one named."""
    return ("rank " if len(ranks) == 1 else "ranks ") + span(ranks, groups_shown=None, pair=", ")


def findings_html(findings: dict[str, Any] | None) -> str:
    nan = (findings or {}).get("nan_divergence")
    if not nan:
        return ""
    diverged = nan.get("diverged_ranks") or []
    return (f'<p class="finding bad">First non-finite value: rank <b>{esc(nan.get("first_rank"))}</b> at step '
            f'<b>{esc(nan.get("first_step"))}</b> ({fmt_time(nan.get("first_time"))}; '
            f'{esc(nan.get("first_cause", ""))}); diverged: {esc(ranks_text(diverged)) if diverged else "none"}</p>')


def runs_table(runs: list[dict[str, Any]], chosen: str | None) -> str:
    if not runs:
        return ('<p class="muted">No runs yet: point a training job at this sidecar (TRAINHEALTH_URL) and its '
                'runs appear here.</p>')
    rows = []
    for r in runs:
        firing = "".join(f'<span class="sev sev-{esc(a["severity"])}" title="{esc(a["summary"])}">'
                         f'{esc(a["alert"])}</span> ' for a in r["firing"]) or '<span class="quiet">none</span>'
        steps = (f'{r["min_step"]}-{r["step"]}' if r["step"] is not None and r["min_step"] != r["step"]
                 else fmt_num(r["step"]))
        cls = ' class="chosen"' if r["run"] == chosen else ""
        rows.append(f'<tr{cls} data-run="{esc(r["run"])}"><td><a href="?run={esc(r["run"])}" '
                    f'data-run="{esc(r["run"])}">{esc(r["run"])}</a></td><td class="num">{r["ranks"]}</td>'
                    f'<td class="num">{steps}</td><td>{fmt_time(r["last_time"])}</td>'
                    f'<td>{"ended" if r["ended"] else "running"}</td><td>{firing}</td></tr>')
    return ('<table class="runs"><tr><th>run</th><th class="num">ranks</th><th class="num">step</th>'
            f'<th>newest record</th><th>state</th><th>firing</th></tr>{"".join(rows)}</table>')


def ranks_table(ranks: list[dict[str, Any]]) -> str:
    rows = []
    for r in ranks[:MAX_RANK_ROWS]:
        latest = r.get("latest", {})
        peak, total = latest.get("gpu_mem_peak_bytes"), latest.get("gpu_mem_total_bytes")
        gpu = fmt_bytes(peak) + (f" / {fmt_bytes(total)}" if total else "")
        state = "ended" if r["ended"] else (r.get("phase") or "")
        rows.append(f'<tr data-rank="{r["rank"]}"><td class="num">{r["rank"]}</td><td>{esc(r.get("host", ""))}</td>'
                    f'<td class="num">{fmt_num(r["step"])}</td>'
                    f'<td class="num">{fmt_num(latest.get("step_time_seconds"))}</td>'
                    f'<td class="num">{fmt_num(latest.get("loss"))}</td><td class="num">{gpu}</td>'
                    f'<td class="num">{fmt_bytes(latest.get("host_mem_bytes"))}</td>'
                    f'<td>{fmt_time(r["last_time"])}</td><td>{esc(state)}</td></tr>')
    more = len(ranks) - MAX_RANK_ROWS
    tail = f'<p class="muted">and {more} more ranks (GET /v1/runs/RUN lists them all)</p>' if more > 0 else ""
    return ('<table class="ranks"><tr><th class="num">rank</th><th>host</th><th class="num">last step</th>'
            '<th class="num">step time (s)</th><th class="num">loss</th><th class="num">GPU peak / capacity</th>'
            '<th class="num">host memory</th><th>newest record</th><th>state</th></tr>'
            f'{"".join(rows)}</table>{tail}')


def live_fragment(model: dict[str, Any]) -> str:
    """``<div id="live">``: everything that changes; the script swaps it in on each refresh."""
    note = (f'<p class="bad">Run {esc(model["missing"])} is not known to this sidecar (never seen, or expired); '
            'showing the newest run.</p>' if model.get("missing") else "")
    parts = ['<div id="live">', f'<section class="card"><h2>Runs</h2>{note}',
             runs_table(model["runs"], model["chosen"]), '</section>']
    detail = model.get("detail")
    if detail is not None:
        name = esc(detail["run"])
        parts += [f'<section class="card" id="run" data-run="{name}"><h2>Run {name}</h2>',
                  model.get("incident", ""),
                  findings_html(detail.get("findings")),
                  '<h3>Firing</h3>', alerts_table(sorted(detail["firing"], key=lambda a: a["time"]),
                                                  "Nothing is firing.", with_state=False),
                  '<h3>Ranks</h3>', ranks_table(detail["rank_states"]),
                  '<h3>Recent alerts</h3>', alerts_table(model["recent"][:RECENT_ALERTS], "No alerts yet."),
                  '</section>',
                  f'<section class="card"><h2>Charts: run {name}, the last samples of each rank</h2>'
                  '<div id="charts"></div></section>']
    parts.append(f'<script type="application/json" id="chart-data">'
                 f'{dumps({"chosen": model["chosen"], "chart": model.get("chart")})}</script></div>')
    return "".join(parts)


def page(model: dict[str, Any]) -> str:
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="referrer" content="no-referrer"><link rel="icon" href="data:,">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>trainhealth</title><style>{asset("page.css")}</style></head><body>'
            '<header><h1>trainhealth</h1><span class="sub">live: refreshes every 5 s</span>'
            '<span class="sub" id="refresh-status"></span></header><main>'
            f'{live_fragment(model)}</main>'
            f'<script>{asset("charts.js")}</script><script>{asset("page.js")}</script></body></html>')
