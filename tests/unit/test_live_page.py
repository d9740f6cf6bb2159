"""The live page's model and HTML, built in-process from a Service (no HTTP): what the routes serve."""

from __future__ import annotations

import json
import math
import re

from trainhealth import jsonout
from trainhealth.config import load
from trainhealth.page import html
from trainhealth.page.chart import MAX_CHARTED_RANKS, episodes
from trainhealth.page.live import finish, snapshot
from trainhealth.service import Service

from tests.page_traces import HOSTILE, RUN, diverging_run


def service_with(records: list[dict]) -> Service:
    service = Service(load(None, {}, {}))
    answer = service.ingest(jsonout.dumpb(records), "application/json")
    assert answer.status == 200 and answer.body["rejected"] == 0, answer.body
    return service


def model(service: Service, run: str | None = None) -> dict:
    recent = lambda name, limit: service.book.query(run=name, limit=limit)  # noqa: E731
    return finish(snapshot(service.pipeline, service.book, recent, run))


def chart_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="chart-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_page_charts_the_newest_run_with_its_nan_and_alerts() -> None:
    service = service_with(diverging_run(run="older", t0=1_700_000_000.0) + diverging_run())
    page = html.page(model(service))
    data = chart_data(page)
    assert data["chosen"] == RUN
    chart = data["chart"]
    assert [s["rank"] for s in chart["series"]] == [0, 1]
    loss = chart["series"][1]["loss"]  # rank 1: NaN from step 150 to 200
    assert loss.count("NaN") == 51 and None not in loss and all(isinstance(x, (float, str)) for x in loss)
    assert chart["gpu_total"] == {"0": 8e9, "1": 8e9}
    fired = {(a["alert"], a["rank"]) for a in chart["alerts"]}
    assert {("nan_divergence", None), ("lr_scaling", None)} <= fired  # one incident per run (rank: null)
    # the LR's linear-scaling value, dashed on the LR chart: 0.02 x 4 / 16, from the first start to the end
    assert [p[1] for p in chart["lr_expected"]] == [0.005, 0.005]
    assert chart["lr_expected"][-1][0] == chart["series"][1]["time"][-1]
    assert "First non-finite value: rank <b>1</b> at step <b>150</b>" in page and "diverged: ranks 0, 1</p>" in page
    assert html.page(model(service, "older")).count('class="chosen"') == 1
    assert chart_data(html.page(model(service, "older")))["chosen"] == "older"


def test_page_escapes_hostile_text_and_keeps_script_elements_closed() -> None:
    service = service_with(diverging_run())
    page = html.page(model(service))
    assert HOSTILE not in page and "&lt;script&gt;" in page
    assert page.count("<script") == page.count("</script>") == 3


def test_unknown_run_falls_back_and_an_empty_sidecar_says_what_to_do() -> None:
    service = service_with(diverging_run())
    fallback = model(service, "no-such-run")
    assert fallback["chosen"] == RUN and "Run no-such-run is not known" in html.live_fragment(fallback)
    assert "not known" not in html.live_fragment(model(service, RUN))
    empty = html.page(model(Service(load(None, {}, {}))))
    assert "No runs yet" in empty and chart_data(empty) == {"chosen": None, "chart": None}


def test_a_wide_run_charts_its_alerting_ranks_first_and_at_most_64() -> None:
    ranks = 100
    records = [{"run": "wide", "rank": r, "time": 1000.0 + s + r * 1e-3, "step": s,
                "loss": math.nan if (r == 97 and s == 30) else 1.0}
               for s in range(1, 31) for r in range(ranks)]
    service = service_with(records)
    chart = model(service)["chart"]
    charted = [s["rank"] for s in chart["series"]]
    assert len(charted) == MAX_CHARTED_RANKS and 97 in charted and chart["ranks_total"] == ranks
    assert charted == sorted(charted)


def test_an_alert_fired_at_the_start_keeps_its_step_and_summary_after_it_resolves() -> None:
    # lr_scaling fires on the start records, before the first charted sample; the end resolves it. The chart
    # marks it where it fired (step 0) with what it said, not at the resolution's step with "run ended".
    records = diverging_run()
    last = records[-1]["time"]
    records += [{"type": "end", "run": RUN, "rank": r, "time": last + 0.1, "step": 200, "status": "completed"}
                for r in (0, 1)]
    alerts = {a["alert"]: a for a in model(service_with(records))["chart"]["alerts"]}
    lr = alerts["lr_scaling"]
    assert lr["step"] == 0 and lr["summary"].startswith("LR 0.02 is 4.0x the linear-scaling value")
    assert lr["time"] < records[2]["time"] and lr["end"] == last + 0.1
    assert alerts["nan_divergence"]["step"] == 150 and alerts["nan_divergence"]["end"] == last + 0.1


def test_a_resolution_without_its_firing_is_placed_by_where_it_started_not_where_it_resolved() -> None:
    resolved = {"alert": "nan_divergence", "state": "resolved", "severity": "critical", "run": RUN, "rank": None,
                "step": 113, "time": 20.0, "started_at": 12.0, "first_step": 109, "fingerprint": f"{RUN}/-/nan",
                "summary": "run ended completed at step 113"}
    no_first = {**resolved, "alert": "lr_scaling", "fingerprint": f"{RUN}/-/lr"}
    del no_first["first_step"]
    ep = {e["alert"]: e for e in episodes([resolved, no_first])}
    nan = ep["nan_divergence"]
    assert (nan["step"], nan["time"], nan["end"]) == (109, 12.0, 20.0)
    assert ep["lr_scaling"]["step"] is None and ep["lr_scaling"]["time"] == 12.0  # the page places it by that time
