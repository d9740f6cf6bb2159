"""The live page and the report in a real browser (headless Chromium over the DevTools protocol).

A real sidecar (with --token and the flight recorder) takes a diverging run over HTTP; the page is opened
as a person would (/?token=...), read from the rendered DOM, refreshed, and screenshotted; the report is
written by ``trainhealth report`` from what the recorder kept, opened from disk, and checked the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import Browser
from tests.conftest import ROOT
from tests.page_traces import HOSTILE, RUN, diverging_run, lines

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# What the page's DOM says, in one evaluation.
READ_DOM = """(() => {
  const q = (s) => Array.from(document.querySelectorAll(s));
  return {
    runs: q('table.runs a[data-run]').map(a => a.textContent),
    chosen: (document.getElementById('run') || {dataset: {}}).dataset.run || null,
    firing: q('#run table.alerts').length ? q('#run table.alerts')[0].innerText : '',
    alertRows: q('tr.alert').map(r => r.dataset.alert),
    ranks: q('table.ranks tr[data-rank]').map(r => r.innerText),
    charts: q('svg.chart').map(s => s.dataset.key),
    points: q('svg.chart path.line').map(p => +p.dataset.points),
    markers: q('svg.chart [data-alert]').map(g => g.dataset.alert),  // a line where it fired, a band while open
    nonfinite: q('svg.chart[data-key=loss] g.nonfinite').length,
    title: document.title,
    search: location.search,
    stored: sessionStorage.getItem('trainhealth-token'),
  };
})()"""


def post(sidecar, records: list[dict]) -> None:
    body = lines(records)  # bare NaN tokens, as Python's json writes them
    answer = sidecar.client.post("/v1/ingest", content=body, headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert answer.status_code == 200 and answer.json()["rejected"] == 0, answer.text


def test_live_page_shows_runs_alerts_and_charts_and_refreshes_with_the_token(start_sidecar, browser: Browser,
                                                                              tmp_path: Path) -> None:
    sidecar = start_sidecar("--token", TOKEN, "--record", str(tmp_path / "records"))
    records = diverging_run(steps=200, nan_step=150)
    post(sidecar, records[: len(records) - 100])  # up to step 150: rank 1 NaN, rank 0 spiking
    # the token rules: the page wants it like every route; ?token= is taken on the page only
    assert sidecar.client.get("/").status_code == 401
    assert sidecar.client.get("/?token=wrong").status_code == 401
    assert sidecar.client.get(f"/v1/runs?token={TOKEN}").status_code == 401
    assert sidecar.client.get("/", headers=AUTH).status_code == 200
    bad = sidecar.client.get("/?part=everything", headers=AUTH)
    assert bad.status_code == 400 and "part: must be 'live'" in bad.json()["error"]

    browser.open(f"{sidecar.url}/?token={TOKEN}")
    dom = browser.wait_for(f"(() => {{ const d = {READ_DOM}; return d.charts.length ? d : null; }})()")
    assert dom["runs"] == [RUN] and dom["chosen"] == RUN
    # the loss's rise joins lr_scaling's alert (the LR it called too high is its cause): no loss_spike row
    assert {"lr_scaling", "nan_divergence"} <= set(dom["alertRows"])
    assert "nan_divergence" in dom["firing"] and "lr_scaling" in dom["firing"]
    assert len(dom["ranks"]) == 2 and "NaN" in dom["ranks"][1]
    assert dom["charts"] == ["loss", "lr", "grad_norm", "gpu_mem_peak_bytes", "host_mem_bytes"]
    assert min(dom["points"]) > 50  # every rank's line holds its samples
    assert {"lr_scaling", "nan_divergence"} <= set(dom["markers"])
    assert dom["nonfinite"] >= 1  # rank 1's NaN loss is a red mark, not a gap
    assert browser.eval("document.querySelectorAll('svg.chart[data-key=lr] path.ref').length") == 1
    # the hostile host name is shown as text, never run: no script of its own, the title untouched
    assert dom["title"] == "trainhealth" and HOSTILE.split("&")[0] in dom["ranks"][1]
    assert browser.eval("document.scripts.length") == 3  # chart data, charts.js, page.js
    assert dom["search"] == "" and dom["stored"] == TOKEN  # the token left the address bar, kept for the tab
    browser.screenshot(tmp_path / "page.png")

    # it refreshes itself (sending the token as a header): the rest of the run shows up without a reload
    post(sidecar, records[len(records) - 100:])
    browser.wait_for("document.querySelector('table.runs tr[data-run] td:nth-child(3)').innerText === '200'",
                     timeout=30)
    assert browser.eval("document.querySelectorAll('svg.chart').length") == 5
    assert browser.errors() == [], browser.errors()
    browser.screenshot(tmp_path / "page-refreshed.png")
    assert (tmp_path / "page.png").stat().st_size > 20_000


def test_live_page_without_token_tells_the_user_and_has_no_data(start_sidecar, browser: Browser) -> None:
    sidecar = start_sidecar("--token", TOKEN)
    post(sidecar, diverging_run(steps=20))
    answer = sidecar.client.get("/")
    assert answer.status_code == 401 and "open /?token=TOKEN" in answer.json()["error"]
    assert RUN not in answer.text


def test_report_opens_from_disk_with_its_alerts_and_charts(start_sidecar, browser: Browser, tmp_path: Path) -> None:
    sidecar = start_sidecar("--record", str(tmp_path / "records"))
    post(sidecar, diverging_run(steps=200, nan_step=150))
    # without --token the page needs none, and its refresh works without one too
    browser.open(f"{sidecar.url}/?run={RUN}")
    browser.wait_for("document.querySelectorAll('svg.chart').length === 5")
    browser.wait_for("/updated/.test(document.getElementById('refresh-status').textContent)", timeout=20)
    assert browser.errors() == [], browser.errors()
    sidecar.stop()  # the recorder flushes and closes its file
    recorded = tmp_path / "records" / f"{RUN}.jsonl"
    assert recorded.exists()
    out = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "trainhealth", "report", str(recorded), "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    browser.open(out.as_uri())
    dom = browser.wait_for(f"(() => {{ const d = {READ_DOM}; return d.charts.length ? d : null; }})()")
    assert set(dom["alertRows"]) >= {"lr_scaling", "nan_divergence"}
    assert dom["charts"] == ["loss", "lr", "grad_norm", "gpu_mem_peak_bytes", "host_mem_bytes"]
    assert min(dom["points"]) > 50 and dom["nonfinite"] >= 1
    assert {"lr_scaling", "nan_divergence"} <= set(dom["markers"])
    text = browser.eval("document.body.innerText")
    assert f"Run {RUN}" in text and "First non-finite value: rank 1 at step 150" in text
    assert browser.eval("document.querySelectorAll('svg.chart[data-key=lr] path.ref').length") == 1
    assert browser.errors() == [], browser.errors()
    assert browser.requests() == [out.as_uri()]  # nothing fetched: script, styles and data are inline
    browser.screenshot(tmp_path / "report.png")
    assert json.loads(browser.eval("JSON.stringify(document.querySelectorAll('svg.chart').length)")) == 5


def test_a_value_with_no_finite_neighbour_is_drawn_as_a_dot(browser: Browser, tmp_path: Path) -> None:
    # The Hugging Face callback sends the grad norm on logging steps only: rank 1's step-10 value is followed by
    # a NaN, so no line passes through it. Before, the chart showed nothing of it; now it is a dot.
    records: list[dict] = [{"type": "start", "run": "hf", "rank": r, "time": 1000.0, "world_size": 2, "batch_size": 8,
                            "lr": 3e-4} for r in (0, 1)]
    for step in range(1, 26):
        for r in (0, 1):
            rec = {"run": "hf", "rank": r, "time": 1000.0 + step, "step": step, "loss": 6.0 - 0.01 * step}
            if step in (10, 20):
                rec["grad_norm"] = float("nan") if (r, step) == (1, 20) else 0.7
            records.append(rec)
    recorded = tmp_path / "hf.jsonl"
    recorded.write_text(lines(records))
    out = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "trainhealth", "report", str(recorded), "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    browser.open(out.as_uri())
    browser.wait_for("document.querySelectorAll('svg.chart').length > 0")
    dots = browser.eval("JSON.stringify(Array.from(document.querySelectorAll('svg.chart circle.dot'))"
                        ".map(c => [c.closest('svg.chart').dataset.key, +c.dataset.rank]))")
    assert json.loads(dots) == [["grad_norm", 1]]  # rank 0's two values make a line; every loss is on one
    assert browser.errors() == [], browser.errors()


def test_a_live_window_with_no_finite_value_says_so(start_sidecar, browser: Browser) -> None:
    # The job went on long after its NaN: the last 240 samples of the loss are all NaN. The loss chart says so
    # (it was an empty axis with a row of red marks); the grad norm, finite, draws as before.
    sidecar = start_sidecar()
    post(sidecar, diverging_run(steps=300, nan_step=20))
    browser.open(f"{sidecar.url}/?run={RUN}")
    browser.wait_for("document.querySelectorAll('svg.chart').length === 5")
    notes = json.loads(browser.eval("JSON.stringify(Array.from(document.querySelectorAll('svg.chart text.no-finite'))"
                                    ".map(t => [t.closest('svg.chart').dataset.key, t.textContent]))"))
    assert [key for key, _ in notes] == ["loss"]
    assert notes[0][1].startswith("every value here is NaN or infinite (steps ")
    assert browser.errors() == [], browser.errors()
