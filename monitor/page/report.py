"""``trainhealth report FILE.jsonl... -o report.html``: one self-contained post-mortem page.

The records are read as ``trainhealth replay`` reads them and run through the same detectors by the same
loop (``pipeline.replay``), so the alert timeline is the one replay prints. Alongside, each
rank's charted values are downsampled (downsample.py: min/max per bucket, so spikes and NaNs survive and
a week of 64 ranks stays a few MB). The file inlines its data, script and styles: it opens from disk,
offline, and can be attached to a ticket.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Sequence

from ..alerts import Alert
from ..config import Settings
from ..pipeline import Pipeline, replay
from ..record import Record, to_obj
from ..replay import ReadStats, read_files
from . import html, story
from .chart import dumps, episodes, lr_expected, spell_nonfinite
from .downsample import BUCKETS, VALUES, RankBuckets

MAX_STARTS = 64  # per run: the first ones and the latest ones
ROW_BUDGET = 64 * BUCKETS  # buckets per run across its ranks: a wider run gets coarser buckets


class RunRecording:
    """What the report keeps of one run while the records stream past (bounded)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.first_time = math.inf
        self.last_time = -math.inf
        self.records = 0
        self.starts: list[dict[str, Any]] = []
        self.ends: dict[int, dict[str, Any]] = {}
        self.ranks: dict[int, RankBuckets] = {}
        self.gpu_total: dict[int, float] = {}
        self.host_limit: dict[int, float] = {}
        self.first_host: dict[int, tuple[float, float]] = {}  # rank -> (time, bytes) of its first host sample
        self.last_host: dict[int, tuple[float, float]] = {}
        self.gpu_peak: dict[int, float] = {}
        self.alerts: list[Alert] = []

    def add(self, rec: Record) -> None:
        self.records += 1
        self.first_time = min(self.first_time, rec.time)
        self.last_time = max(self.last_time, rec.time)
        kind = rec.type
        if kind == "sample":
            buckets = self.ranks.get(rec.rank)
            if buckets is None:
                buckets = self.ranks[rec.rank] = RankBuckets(rec.time)
            buckets.add(rec.time, rec.step or 0, tuple(getattr(rec, v) for v in VALUES))
            if rec.gpu_mem_total_bytes is not None:
                self.gpu_total[rec.rank] = rec.gpu_mem_total_bytes
            peak = rec.gpu_mem_peak_bytes
            if peak is not None and math.isfinite(peak) and peak > self.gpu_peak.get(rec.rank, -1.0):
                self.gpu_peak[rec.rank] = peak
            if rec.host_mem_limit_bytes is not None and math.isfinite(rec.host_mem_limit_bytes):
                self.host_limit[rec.rank] = rec.host_mem_limit_bytes
            host = rec.host_mem_bytes
            if host is not None and math.isfinite(host):
                self.first_host.setdefault(rec.rank, (rec.time, host))
                self.last_host[rec.rank] = (rec.time, host)
        elif kind == "start":
            if len(self.starts) >= MAX_STARTS:
                del self.starts[MAX_STARTS // 2]  # keep the first half and the newest
            self.starts.append(to_obj(rec))
        elif kind == "end":
            self.ends[rec.rank] = to_obj(rec)

    def rank_list(self) -> list[int]:
        """Every rank the recording heard of: by its samples, its start or its end."""
        started = {s["rank"] for s in self.starts if isinstance(s.get("rank"), int)}
        return sorted(set(self.ranks) | set(self.ends) | started)

    # -- what the page shows ------------------------------------------------
    def chart(self) -> dict[str, Any]:
        per_rank = max(8, min(BUCKETS, ROW_BUDGET // max(1, len(self.ranks))))
        series = []
        for rank in sorted(self.ranks):
            rows = self.ranks[rank].rows(per_rank)
            cols: dict[str, Any] = {"rank": rank, "time": [round(t, 1) for t, _, _ in rows],
                                    "step": [s for _, s, _ in rows]}
            for k, name in enumerate(VALUES):
                cols[name] = spell_nonfinite([_short(r[2][k]) for r in rows])
            series.append(cols)
        return {"run": self.name, "series": series, "gpu_total": {str(r): v for r, v in self.gpu_total.items()},
                "host_limit": {str(r): v for r, v in self.host_limit.items()},
                "alerts": episodes(self.alerts), "lr_expected": self.lr_expected()}

    def lr_expected(self) -> list[list[float]]:
        return lr_expected(self.starts, self.last_time)


def _short(v: float | None) -> float | None:
    """4 significant digits: what a chart can show, and half the bytes of a full repr."""
    if v is None or not math.isfinite(v) or v == 0:
        return v
    return float(f"{v:.4g}")


def build(paths: Sequence[str], settings: Settings, until: float | None = None) -> tuple[str, ReadStats]:
    """The report's HTML. ``until``: seconds to let pass after the last record (replay's --until)."""
    stats = ReadStats()
    pipeline = Pipeline(settings.detectors, settings.limits, settings.server.tick_seconds)
    runs: dict[str, RunRecording] = {}

    def recorded(records: Iterable[Record]) -> Iterator[Record]:
        """Each record into its run's recording as it passes on to the replay loop."""
        for rec in records:
            run = runs.get(rec.run)
            if run is None:
                run = runs[rec.run] = RunRecording(rec.run)
            run.add(rec)
            yield rec

    fired = list(replay(recorded(read_files(paths, stats)), pipeline, until=until))  # replay's own loop
    for alert in pipeline.book.latest(fired):  # each firing as its alert ended up (refreshed since it fired)
        runs[alert["run"]].alerts.append(alert)
    ordered = sorted(runs.values(), key=lambda r: r.first_time)
    data = [{"run": r.name, "chart": r.chart()} for r in ordered]
    return render(ordered, pipeline, data, paths, stats), stats


CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "base-uri 'none'; form-action 'none'")


def render(runs: list[RunRecording], pipeline: Pipeline, data: list[dict[str, Any]], paths: Sequence[str],
           stats: ReadStats) -> str:
    files = ", ".join(html.esc(p) for p in paths)
    skipped = f"; {stats.skipped} corrupt lines skipped" if stats.skipped else ""
    index = "".join(f'<li><a href="#run-{i}">{html.esc(r.name)}</a>: {len(r.ranks)} ranks, '
                    f'{sum(a["state"] == "firing" for a in r.alerts)} alerts fired</li>' for i, r in enumerate(runs))
    sections = "".join(run_section(i, r, pipeline.findings(r.name)) for i, r in enumerate(runs))
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>trainhealth report: {html.esc(", ".join(r.name for r in runs))}</title>'
            f'<style>{html.asset("page.css")}</style></head><body>'
            '<header><h1>trainhealth report</h1>'
            f'<span class="sub">{stats.records} records from {files}{skipped}</span></header><main>'
            f'<section class="card"><h2>Runs</h2><ul>{index or "<li>no records</li>"}</ul></section>'
            f'{sections}</main>'
            f'<script type="application/json" id="report-data">{dumps({"runs": data})}</script>'
            f'<script>{html.asset("charts.js")}</script><script>{html.asset("report.js")}</script></body></html>')


def run_section(i: int, run: RunRecording, findings: dict[str, Any]) -> str:
    fired = sorted(run.alerts, key=lambda a: a["time"])
    return (f'<section class="card run" id="run-{i}" data-run="{html.esc(run.name)}">'
            f'<h2>Run {html.esc(run.name)}</h2>'
            f'<p class="muted">{html.fmt_time(run.first_time)} to {html.fmt_time(run.last_time)} '
            f'({_duration(run.last_time - run.first_time)}), {len(run.ranks)} ranks, {run.records} records</p>'
            f'{story.incident_html(run.alerts, run.ends, run.rank_list(), run.starts)}'
            f'<h3>Evidence</h3>{html.findings_html(findings)}'
            f'<h3>Starts and configuration</h3>{starts_html(run)}'
            f'<h3>Alert timeline</h3>{html.alerts_table(fired, "No alerts: the detectors stayed quiet.")}'
            f'<h3>Memory</h3>{memory_html(run)}'
            f'<h3>Charts</h3><div class="charts" id="charts-{i}"></div></section>')


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def starts_html(run: RunRecording) -> str:
    if not run.starts:
        return '<p class="muted">No start records: the LR cannot be checked against the linear scaling rule.</p>'
    rows = []
    for s in run.starts:
        expected = s.get("expected_lr")
        ratio = (s["lr"] / expected) if expected and isinstance(s.get("lr"), (int, float)) else None
        off = ' class="bad"' if ratio is not None and not 1 / 1.5 < ratio < 1.5 else ""
        config = s.get("config")
        cfg = (f'<details><summary>config</summary><pre>{html.esc(html.dumps_pretty(config))}</pre></details>'
               if config else "")
        rows.append(f'<tr><td>{html.fmt_time(s.get("time"))}</td><td class="num">{s.get("rank")}</td>'
                    f'<td>{html.esc(s.get("host", ""))}</td><td class="num">{html.fmt_num(s.get("world_size"))}</td>'
                    f'<td class="num">{html.fmt_num(s.get("batch_size"))}</td>'
                    f'<td class="num">{html.fmt_num(s.get("total_batch"))}</td>'
                    f'<td class="num">{html.fmt_num(s.get("lr"))}</td>'
                    f'<td class="num"{off}>{html.fmt_num(expected)}'
                    f'{f" ({ratio:.3g}x)" if ratio is not None else ""}</td>'
                    f'<td class="num">{html.fmt_num(s.get("warmup_steps"))}</td>'
                    f'<td>{html.esc(s.get("optimizer", ""))}</td><td>{cfg}</td></tr>')
    return ('<table class="starts"><tr><th>time</th><th class="num">rank</th><th>host</th>'
            '<th class="num">world size</th><th class="num">batch/rank</th><th class="num">total batch</th>'
            '<th class="num">LR</th><th class="num">linear-scaling LR (LR / it)</th><th class="num">warmup</th>'
            f'<th>optimizer</th><th></th></tr>{"".join(rows)}</table>')


RATE_MIN_SECONDS = 600  # a shorter span's growth is not told as a rate per hour


def memory_html(run: RunRecording) -> str:
    """The detectors' own forecasts (the latest of each memory alert), then each rank's peak and growth."""
    latest: dict[tuple[str, Any], Alert] = {}
    for a in run.alerts:
        if a["state"] == "firing" and a["alert"] in ("host_memory_leak", "gpu_oom_risk", "gpu_oom"):
            latest[(a["alert"], a.get("rank"))] = a
    forecasts = "".join(
        f'<li>{html.severity(a["severity"])} {html.esc(a["alert"])} '
        f'{"rank " + str(a["rank"]) if a.get("rank") is not None else html.esc(a.get("host") or "the machine")}: '
        f'{html.esc(a["summary"])}</li>' for a in latest.values())
    out = (f'<ul class="forecasts">{forecasts}</ul>' if forecasts
           else '<p class="quiet">No memory forecast: neither GPU nor host memory was heading for its limit.</p>')
    rows = []
    for rank in sorted(set(run.gpu_peak) | set(run.last_host)):
        peak, total = run.gpu_peak.get(rank), run.gpu_total.get(rank)
        frac = f" ({peak / total:.0%})" if peak is not None and total else ""
        growth = ""
        if rank in run.first_host:
            (t0, h0), (t1, h1) = run.first_host[rank], run.last_host[rank]
            growth = f"{html.fmt_bytes(h0)} to {html.fmt_bytes(h1)}"
            if t1 - t0 >= RATE_MIN_SECONDS:
                growth += f" ({html.fmt_bytes((h1 - h0) / (t1 - t0) * 3600)}/h on average)"
            elif t1 > t0:  # a start's growth over seconds, told per hour, reads as a leak: say the span instead
                growth += f" ({'+' if h1 >= h0 else ''}{html.fmt_bytes(h1 - h0)} in {_duration(t1 - t0)})"
        rows.append(f'<tr><td class="num">{rank}</td><td class="num">{html.fmt_bytes(peak)}{frac}</td>'
                    f'<td class="num">{html.fmt_bytes(total)}</td><td>{growth}</td></tr>')
    if rows:
        out += ('<table class="memory"><tr><th class="num">rank</th><th class="num">GPU peak</th>'
                '<th class="num">GPU capacity</th><th>host memory, first to last sample</th></tr>'
                f'{"".join(rows)}</table>')
    return out
