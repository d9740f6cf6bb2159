"""The four kinds of run as a person sees them: a divergence (stopped by stop_on), a crash, a host memory
leak and a healthy run, on the live page and in the report (and a hang, reported), in one headless
Chromium for the module.

Each page is screenshotted under the test's temporary folder (TRAINHEALTH_SCREENSHOTS=docs/screenshots
copies them there: the docs' ones were made so) and its rendered DOM is read for what a reader relies
on: the incident's step inside every chart's x range with its marker drawn in the plot, no two marker
badges overlapping and each badge's text inside it, tick labels never repeated, the LR chart's
linear-scaling line drawn, memory axes from zero, the incident told before the evidence.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from trainhealth.cli import main as cli
from trainhealth.page.html import asset

from tests.browser import Browser
from tests.conftest import ROOT
from tests.page_traces import crashing_run, healthy_run, leaking_run, lines, stalled_run, stopped_run

pytestmark = pytest.mark.integration
PLOT = (62, 640 - 12)  # the charts' plot area, x (charts.js: L and W - R)
KINDS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "divergence": stopped_run, "crash": crashing_run, "leak": leaking_run, "healthy": healthy_run}
INCIDENT = {"divergence": ("nan_divergence", 150), "crash": ("rank_failed", 150), "leak": ("host_memory_leak", 38),
            "healthy": None, "hang": ("rank_stalled", 150)}
REPORTED = {**KINDS, "hang": stalled_run}  # a hang is reported with --until: the time a silence takes

READ = """(() => {
  const q = (root, s) => Array.from(root.querySelectorAll(s));
  const box = (e) => { const b = e.getBBox(); return [b.x, b.y, b.width, b.height]; };
  const inc = document.querySelector('.incident');
  return {
    charts: q(document, 'svg.chart').map(svg => ({
      key: svg.dataset.key, scale: svg.dataset.scale, steps: svg.dataset.steps.split('-').map(Number),
      focus: svg.dataset.focus === '' ? null : +svg.dataset.focus,
      focusX: svg.querySelector('line.focus') ? +svg.querySelector('line.focus').getAttribute('x1') : null,
      badges: q(svg, 'g.marker rect.badge').map(box),
      overflow: q(svg, 'g.marker').filter(g => g.querySelector('text').getBBox().width >
                                                 g.querySelector('rect.badge').getBBox().width).length,
      markers: q(svg, 'g.marker').map(g => ({alert: g.dataset.alert, n: g.dataset.n,
                                             x: q(g, 'line.fired').map(l => +l.getAttribute('x1'))})),
      ylabels: q(svg, 'text.ylabel').map(t => t.textContent),
      xlabels: q(svg, 'text.xlabel:not(.xname):not(.span)').map(t => t.textContent),
      ref: q(svg, 'path.ref').map(p => p.getTotalLength()),
    })),
    legend: q(document, 'ol.alert-legend li').map(li => li.innerText),
    incident: inc ? {alert: inc.dataset.alert || null, step: inc.dataset.step ? +inc.dataset.step : null,
                     text: inc.innerText} : null,
    text: document.body.innerText,
  };
})()"""


HOVER = """(() => {
  const svg = document.querySelector('svg.chart[data-key=loss]'), m = svg.getScreenCTM();
  svg.dispatchEvent(new MouseEvent('mousemove', {clientX: m.a * %s + m.e, clientY: m.f + 60 * m.d}));
  const g = svg.querySelector('g.hover');
  return g.getAttribute('visibility') === 'visible' && g.querySelector('text').textContent;
})()"""


def shoot(browser: Browser, path: Path) -> None:
    browser.screenshot(path)
    keep = os.environ.get("TRAINHEALTH_SCREENSHOTS")
    if keep:  # a relative DIR is the repository's (the report tests run in their own folder)
        folder = ROOT / keep
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)


def overlapping(boxes: list[list[float]]) -> list[tuple[list[float], list[float]]]:
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]]


def check_charts(dom: dict[str, Any], incident: tuple[str, int] | None) -> None:
    charts = {c["key"]: c for c in dom["charts"]}
    assert list(charts) == ["loss", "lr", "grad_norm", "gpu_mem_peak_bytes", "host_mem_bytes"]
    for c in dom["charts"]:
        assert overlapping(c["badges"]) == [], c["key"]
        assert c["overflow"] == 0, c["key"]  # each badge's text inside its box
        assert len(set(c["ylabels"])) == len(c["ylabels"]) >= 2, (c["key"], c["ylabels"])
        assert len(set(c["xlabels"])) == len(c["xlabels"]) >= 3, (c["key"], c["xlabels"])
        if c["key"].endswith("_bytes"):
            assert c["ylabels"][0].startswith("0 "), c["ylabels"]  # memory from zero
        if incident is not None:
            name, step = incident
            assert c["steps"][0] <= step <= c["steps"][1], (c["key"], c["steps"], step)
            xs = [x for m in c["markers"] if m["alert"] == name for x in m["x"]]
            assert xs and all(PLOT[0] <= x <= PLOT[1] for x in xs), (c["key"], c["markers"])
        else:
            assert c["markers"] == []
    assert len(charts["lr"]["ref"]) == 1 and charts["lr"]["ref"][0] > 100  # the linear-scaling line, drawn across


def open_report(browser: Browser, tmp_path: Path, kind: str) -> dict[str, Any]:
    """The report of ``kind``'s records, written as a user would from the folder that holds them."""
    (tmp_path / f"{kind}.jsonl").write_text(lines(REPORTED[kind]()))
    out = tmp_path / f"report-{kind}.html"
    assert cli(["report", f"{kind}.jsonl", "-o", str(out), *(["--until", "600"] if kind == "hang" else [])]) == 0
    browser.open(out.as_uri())
    dom: dict[str, Any] = browser.wait_for(f"(() => {{ const d = {READ}; return d.charts.length ? d : null; }})()")
    assert browser.errors() == [], browser.errors()
    shoot(browser, tmp_path / f"report-{kind}.png")
    return dom


@pytest.mark.parametrize("kind", list(REPORTED))
def test_report_reads_at_a_glance(browser: Browser, tmp_path: Path, kind: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    dom = open_report(browser, tmp_path, kind)
    check_charts(dom, INCIDENT[kind])
    text, incident = dom["text"], dom["incident"]
    assert text.index("What happened" if INCIDENT[kind] else "No incident") < text.index("Evidence")
    if INCIDENT[kind]:
        assert (incident["alert"], incident["step"]) == INCIDENT[kind]
    if kind == "divergence":
        charts = {c["key"]: c for c in dom["charts"]}
        assert charts["loss"]["scale"] == "log"  # the loss spans decades before the NaN
        # it diverged in the last steps of 151: framed from 15 steps before the NaN, which get 45% of the width
        assert all(c["focus"] == 135 for c in dom["charts"]), [c["focus"] for c in dom["charts"]]
        x = {m["alert"]: m["x"][0] for m in charts["loss"]["markers"]}
        assert x["nan_divergence"] - charts["loss"]["focusX"] > 0.4 * (PLOT[1] - PLOT[0])  # unframed: 0.1
        assert "every rank stopped at step 151 by stop_on: nan_divergence fired at step 150" in incident["text"]
        assert "lr_scaling (run, step 0)" in incident["text"]  # the cause, named under why
        assert [li.split(" ")[0] for li in dom["legend"]] == ["lr_scaling", "nan_divergence"]
        # hovering the incident's marker tells its step and time
        x = {m["alert"]: m["x"][0] for m in charts["loss"]["markers"]}["nan_divergence"]
        assert browser.eval(HOVER % x) == "step 150, 14:14:40 UTC: r0 6.8e+5  r1 NaN"
    elif kind == "crash":
        did = incident["text"].split("what the job did")[1]
        assert did.index("rank 1 failed at step 150: RuntimeError") < did.index("rank 0 then failed")
        assert "\U0001f3d6" not in text and "reporting an error. GLHF!\n" in text  # gloo's beach, dropped
    elif kind == "hang":  # marked at the step where rank 1 stopped, not where the silence was noticed
        assert "where\trank 1, host " in incident["text"] and "step 150," in incident["text"]
    elif kind == "leak":
        charts = {c["key"]: c for c in dom["charts"]}
        assert len(charts["host_mem_bytes"]["ref"]) == 1  # the 16 GB limit, dashed
        assert charts["host_mem_bytes"]["ylabels"][-1] == "15 GiB"  # the axis reaches it
        assert "where\trank 0, host node-0, step 38" in incident["text"]
        assert "ranks 0, 1 sent no end record" in incident["text"]
    else:
        assert "every rank ended at step 240" in incident["text"] and dom["legend"] == []


def test_live_page_shows_each_kind_of_run_at_a_glance(start_sidecar, browser: Browser, tmp_path: Path) -> None:
    sidecar = start_sidecar()
    for kind, make in KINDS.items():
        answer = sidecar.client.post("/v1/ingest", content=lines(make()),
                                     headers={"Content-Type": "application/x-ndjson"})
        assert answer.status_code == 200 and answer.json()["rejected"] == 0, (kind, answer.text)
    for kind in KINDS:
        run = KINDS[kind]()[0]["run"]
        browser.open(f"{sidecar.url}/?run={run}")
        dom = browser.wait_for(f"(() => {{ const d = {READ}; return d.charts.length ? d : null; }})()")
        check_charts(dom, INCIDENT[kind])
        incident = dom["incident"]
        if INCIDENT[kind] is None:
            assert incident["text"].startswith("No incident") and "every rank ended (last step 240)" in incident["text"]
        else:  # the same card as the report's, what the job did told from the sidecar's rank states
            assert (incident["alert"], incident["step"]) == INCIDENT[kind]
        if kind == "divergence":
            assert "every rank stopped at step 151 by stop_on: nan_divergence fired at step 150" in incident["text"]
        if kind == "leak":
            assert "ranks 0, 1 running (at step 150)" in incident["text"]
            assert [len(c["ref"]) for c in dom["charts"] if c["key"] == "host_mem_bytes"] == [1]  # the limit
        assert browser.errors() == [], browser.errors()
        shoot(browser, tmp_path / f"page-{kind}.png")


def test_crowded_alerts_keep_their_badges_apart_and_timed_ones_land_on_their_step(browser: Browser,
                                                                                   tmp_path: Path) -> None:
    """charts.js alone, on alerts no detector here makes: 16 within a few steps (names it never heard of),
    and one with a time but no step (placed at the step reached by then)."""
    t0, steps = 1_790_000_000.0, list(range(1, 301))
    series = [{"rank": r, "time": [t0 + s for s in steps], "step": steps, "loss": [2.0 / s ** 0.5 for s in steps],
               "lr": [1e-3] * 300, "grad_norm": [1.0] * 300, "gpu_mem_peak_bytes": [None] * 300,
               "host_mem_bytes": [4e9] * 300} for r in range(2)]
    alerts = [{"alert": f"gpu_fault_{k}", "severity": "critical" if k % 3 else "warning", "rank": k % 2,
               "root_ranks": None, "step": 270 + k // 2, "time": t0 + 270 + k // 2, "end": None,
               "summary": f"fault {k}"} for k in range(16)]
    alerts.append({"alert": "rank_failed", "severity": "critical", "rank": None, "root_ranks": [1], "step": None,
                   "time": t0 + 120.5, "end": None, "summary": "rank 1 failed"})
    data = {"series": series, "gpu_total": {}, "host_limit": {}, "alerts": alerts, "lr_expected": []}
    page = tmp_path / "crowded.html"
    page.write_text(f"<!doctype html><meta charset=utf-8><style>{asset('page.css')}</style><div class=charts id=c>"
                    f"</div><script>{asset('charts.js')}</script><script>TH.drawCharts(document.getElementById('c'),"
                    f"{json.dumps(data)})</script>")
    browser.open(page.as_uri())
    dom = browser.wait_for(f"(() => {{ const d = {READ}; return d.charts.length ? d : null; }})()")
    assert browser.errors() == [], browser.errors()
    browser.screenshot(tmp_path / "crowded.png")
    for c in dom["charts"]:
        assert overlapping(c["badges"]) == [] and c["overflow"] == 0, c["key"]
        shown = sorted(int(n) for m in c["markers"] for part in m["n"].split(",")
                       for n in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))
        assert shown == list(range(1, 18)), (c["key"], [m["n"] for m in c["markers"]])  # every alert, once
    assert [li.split(" ")[:2] for li in dom["legend"]][0] == ["rank_failed", "run"]  # step 120: the first
    assert "step 120," in dom["legend"][0]
