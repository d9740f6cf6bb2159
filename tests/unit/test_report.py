"""trainhealth report: the replay timeline, spikes and NaNs surviving downsampling, a bounded size, escaping."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from trainhealth.config import load
from trainhealth.page import report
from trainhealth.page.downsample import BUCKETS, RankBuckets
from trainhealth.pipeline import Pipeline
from trainhealth.record import Record
from trainhealth.replay import ReadStats

from tests.page_traces import HOSTILE, diverging_run, lines

ROOT = Path(__file__).resolve().parents[2]
WEEK = 7 * 86400


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainhealth", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def report_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_report_timeline_is_replays_and_names_the_first_nan_rank(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text(lines(diverging_run()))
    out = tmp_path / "report.html"
    done = cli("report", str(path), "-o", str(out))
    assert done.returncode == 0, done.stderr
    printed = [json.loads(x) for x in cli("replay", str(path)).stdout.splitlines()]
    replayed = [a for a in printed if "refreshed" not in a]  # the transitions (the report has a row for each)
    # the loss's rise joins lr_scaling's alert (the LR it called too high is its cause): no page of its own
    assert {a["alert"] for a in replayed} >= {"lr_scaling", "nan_divergence"} and all(
        a["alert"] != "loss_spike" for a in replayed)
    page = out.read_text()
    data = report_data(page)
    (run,) = data["runs"]
    shown = [(a["alert"], a["rank"], a["step"]) for a in run["chart"]["alerts"]]
    assert sorted(shown, key=str) == sorted([(a["alert"], a["rank"], a["step"]) for a in replayed
                                             if a["state"] == "firing"], key=str)
    rows = re.findall(r'<tr class="alert" data-alert="(\w+)">', page)
    assert sorted(rows) == sorted(a["alert"] for a in replayed if not a.get("refreshed"))  # a row per alert
    assert "First non-finite value: rank <b>1</b> at step <b>150</b>" in page
    # the LR against its linear-scaling value: 0.02 for a total batch of 4 where 16 was tuned at 0.02
    assert run["chart"]["lr_expected"][0][1] == 0.005
    assert "0.005 (4x)" in page


def test_report_shows_an_alert_as_it_was_refreshed_after_it_fired(tmp_path: Path) -> None:
    """Rank 1's loss is NaN at step 30; rank 0's NaN at the same step arrives in the next batch: the alert
    fired naming rank 1 is refreshed to both ranks together (the all-reduced gradients). The report, like
    the API and the console, says the refreshed text; replay's streamed lines say what was said when: the
    firing as it fired, then a refresh line with the picture it ended with."""
    path = tmp_path / "run.jsonl"
    rows = [{"run": "r", "rank": q, "time": 1000.0 + s, "step": s, "loss": 1.0, "grad_norm": 1.0}
            for s in range(1, 30) for q in (0, 1)]
    rows += [{"run": "r", "rank": 1, "time": 1030.0, "step": 30, "loss": math.nan},
             {"run": "r", "rank": 0, "time": 1031.5, "step": 30, "loss": math.nan}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page, _ = report.build([str(path)], load())
    assert "on ranks 0-1 (together: the all-reduced gradients)" in page
    assert "on rank 1 (its own loss)" not in page
    said, refreshed = [json.loads(x) for x in cli("replay", str(path)).stdout.splitlines()]
    assert "on rank 1 (its own loss)" in said["summary"] and "refreshed" not in said
    assert (refreshed["state"], refreshed["refreshed"], refreshed["started_at"]) == ("firing", True, 1030.0)
    assert "on ranks 0-1 (together: the all-reduced gradients)" in refreshed["summary"]


def test_report_escapes_what_records_carry(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text(lines(diverging_run()))
    out = tmp_path / "report.html"
    assert cli("report", str(path), "-o", str(out)).returncode == 0
    page = out.read_text()
    assert HOSTILE not in page and "&lt;script&gt;document.title" in page
    assert page.count("</script>") == page.count("<script")  # no record closed a script element early
    assert "<b>not bold</b>" not in page


def test_report_of_a_missing_file_says_so(tmp_path: Path) -> None:
    done = cli("report", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "r.html"))
    assert done.returncode == 2 and "no such file" in done.stderr
    assert not (tmp_path / "r.html").exists()


def test_downsampling_keeps_a_one_second_spike_and_a_nan_in_a_week() -> None:
    b = RankBuckets(0.0)
    spike_at, nan_at = 345_678, 500_001
    for t in range(WEEK):
        loss = 1000.0 if t == spike_at else (math.nan if t == nan_at else 1.0 + (t % 10) * 0.01)
        b.add(float(t), t, (loss, 0.1, None, None, None))
    rows = b.rows()
    assert len({round(t) for t, _, _ in rows}) <= 3 * BUCKETS
    losses = [v[0] for _, _, v in rows]
    assert max(x for x in losses if x is not None and not math.isnan(x)) == 1000.0
    assert min(x for x in losses if x is not None and not math.isnan(x)) == 1.0
    spike_row = next(r for r in rows if r[2][0] == 1000.0)
    assert abs(spike_row[0] - spike_at) <= WEEK / BUCKETS  # drawn where it happened, to a bucket's width
    nan_rows = [r for r in rows if r[2][0] is not None and math.isnan(r[2][0])]
    assert len(nan_rows) == 1 and abs(nan_rows[0][0] - nan_at) <= WEEK / BUCKETS
    assert all(v[1] == 0.1 for _, _, v in rows if v[1] is not None)


def test_a_week_of_64_ranks_stays_under_5_mb() -> None:
    """The output is bounded by buckets, not by records: a rank sampled every 2 minutes for a week already
    fills every bucket (5,040 samples > 2 x 300 buckets), so once per second (302,400 more per rank) gives
    the same number of rows; the one-rank week above checks that at full density."""
    recording = report.RunRecording("week")
    t0 = 1_790_000_000.0
    for t in range(0, WEEK, 120):
        for rank in range(64):
            loss = math.nan if t > WEEK - 600 and rank == 3 else 2.0 + math.sin(t / 5000 + rank)
            recording.add(Record(run="week", rank=rank, time=t0 + t + rank * 0.01, step=t,
                                 loss=loss, lr=0.1 * (0.5 ** (t // 200_000)), grad_norm=1.0 + (t % 7) / 7,
                                 gpu_mem_peak_bytes=7.1e10 + (t % 13) * 1e8, gpu_mem_total_bytes=8.1e10,
                                 host_mem_bytes=3.2e10 + t * 1e4))
    data = [{"run": "week", "chart": recording.chart()}]
    page = report.render([recording], Pipeline(load(None, {}, {}).detectors), data, ["week.jsonl"], ReadStats())
    size = len(page.encode())
    assert 1e6 < size < 5e6, size
    series = data[0]["chart"]["series"]
    assert len(series) == 64 and all(len(s["time"]) <= 3 * BUCKETS for s in series)
    assert "NaN" in series[3]["loss"] and "NaN" not in series[4]["loss"]


def test_report_merges_per_rank_files_gzipped_or_not_and_counts_corrupt_lines(tmp_path: Path) -> None:
    import gzip

    records = diverging_run()
    (tmp_path / "rank0.jsonl").write_text(lines([r for r in records if r["rank"] == 0]) + "{not json\n")
    with gzip.open(tmp_path / "rank1.jsonl.gz", "wt") as fh:
        fh.write(lines([r for r in records if r["rank"] == 1]) + '{"run": "x", "rank": -3}\n')
    out = tmp_path / "report.html"
    done = cli("report", str(tmp_path / "rank0.jsonl"), str(tmp_path / "rank1.jsonl.gz"), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "2 corrupt lines skipped" in done.stderr
    page = out.read_text()
    assert "2 corrupt lines skipped" in page
    (run,) = report_data(page)["runs"]
    assert [s["rank"] for s in run["chart"]["series"]] == [0, 1]
    assert "First non-finite value: rank <b>1</b> at step <b>150</b>" in page


def test_report_until_reports_a_rank_that_went_silent_at_the_end(tmp_path: Path) -> None:
    records = [r for r in diverging_run(nan_step=10_000) if not (r["rank"] == 1 and r.get("step", 0) > 150)]
    path = tmp_path / "run.jsonl"
    path.write_text(lines(records))
    out = tmp_path / "report.html"
    assert cli("report", str(path), "-o", str(out), "--until", "600").returncode == 0
    replayed = [json.loads(x) for x in cli("replay", str(path), "--until", "600").stdout.splitlines()]
    stalled = [a for a in replayed if a["alert"] == "rank_stalled"]
    assert stalled and stalled[0]["state"] == "firing"
    rows = re.findall(r'<tr class="alert" data-alert="(\w+)">', out.read_text())
    assert sorted(rows) == sorted(a["alert"] for a in replayed if not a.get("refreshed"))  # a row per alert
    assert cli("report", str(path), "-o", str(out), "--until", "-1").returncode == 2


def test_report_of_a_folder_takes_its_jsonl_files_and_nothing_read_is_an_error(tmp_path: Path, capsys) -> None:
    from trainhealth.cli import main

    records = diverging_run(steps=30, nan_step=10_000)
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "a.jsonl").write_text(lines([r for r in records if r["rank"] == 0]))
    (folder / "b.jsonl").write_text(lines([r for r in records if r["rank"] == 1]))
    (folder / "notes.txt").write_text("not records")
    out = tmp_path / "report.html"
    assert main(["report", str(folder), "-o", str(out)]) == 0
    assert f"{len(records)} records" in capsys.readouterr().err
    assert [s["rank"] for s in report_data(out.read_text())["runs"][0]["chart"]["series"]] == [0, 1]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "-o", str(tmp_path / "e.html")]) == 2
    assert capsys.readouterr().err == f"trainhealth report: no .jsonl or .jsonl.gz file in the folder {empty}\n"

    (empty / "junk.jsonl").write_text("{not json\n")  # a file, but no record in it
    assert main(["report", str(empty), "-o", str(tmp_path / "e.html")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trainhealth report: no record read from ") and "nothing written" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "e.html").exists()


def test_host_growth_over_a_short_span_is_told_with_its_span_not_as_a_rate_per_hour(tmp_path) -> None:
    # 45 MiB in the first 8 s of a run (its start) is not "20 GiB/h"; after 10 minutes a rate per hour means something
    def page(seconds: float) -> str:
        path = tmp_path / f"run{seconds}.jsonl"
        rows = [{"run": "r", "rank": 0, "time": 1000.0 + t, "step": i + 1, "loss": 1.0,
                 "host_mem_bytes": 281 * 2**20 + 45 * 2**20 * i} for i, t in enumerate((0.0, seconds))]
        path.write_text(lines(rows))
        return report.build([str(path)], load())[0]

    short = page(8.0)
    assert "281 MiB to 326 MiB (+45 MiB in 8 s)" in short and "/h on average" not in short
    assert "281 MiB to 326 MiB (270 MiB/h on average)" in page(600.0)
