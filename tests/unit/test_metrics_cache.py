"""/metrics reuses the text of ranks unchanged since the previous scrape (exposition.RankLines): the
text must be exactly what a render without the cache writes, scrape after scrape."""

from __future__ import annotations

import gc
import json
import math
import random
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from trainhealth.config import Settings
from trainhealth.http.metrics import state_collector
from trainhealth.metrics.collector import PER_RANK_VALUES, StateCollector, families, render
from trainhealth.metrics.exposition import RankLines
from trainhealth.metrics.snapshot import RankRow, Snapshot
from trainhealth.service import Service

from .trainer_fakes import Clock

T0 = 1_700_000_000.0


def send(service: Service, *records: dict[str, Any]) -> None:
    answer = service.ingest(json.dumps(list(records)).encode(), "application/json")
    assert answer.status == 200 and answer.body["rejected"] == 0, answer.body


def sample(rank: int, step: int, run: str = "job", **fields: Any) -> dict[str, Any]:
    return {"run": run, "rank": rank, "time": T0 + step, "step": step, "lr": 0.1,
            "gpu_mem_total_bytes": 8e10, **fields}


def scrape(collector: StateCollector) -> tuple[bytes, int]:
    """The cached render, checked against an uncached render of the same snapshot; and the ranks reused."""
    snap = collector.snapshot()
    text = render(snap, collector.lines)
    assert text == render(snap)
    return text, collector.lines.reused


def test_unchanged_ranks_are_reused_and_changed_ones_written_again() -> None:
    service = Service(Settings(), clock=Clock(T0))
    collector = state_collector(service)
    send(service, *[sample(r, 1, loss=2.0) for r in range(4)])
    text, reused = scrape(collector)
    assert reused == 0 and b'trainhealth_loss{rank="3",run="job"} 2.0\n' in text
    assert scrape(collector)[1] == 4  # nothing arrived: every rank reused
    send(service, sample(1, 2, loss=1.5), sample(2, 2, loss=float("nan")))  # NaN through json's bare token
    text, reused = scrape(collector)
    assert reused == 2
    assert b'trainhealth_loss{rank="1",run="job"} 1.5\n' in text
    assert b'trainhealth_step{rank="1",run="job"} 2.0\n' in text
    assert b'trainhealth_loss{rank="2",run="job"} NaN\n' in text
    assert b'trainhealth_loss{rank="0",run="job"} 2.0\n' in text


def test_values_equal_but_written_apart_are_written_again() -> None:
    service = Service(Settings(), clock=Clock(T0))
    collector = state_collector(service)
    send(service, sample(0, 1, loss=0.0, grad_norm=float("nan")))
    scrape(collector)
    send(service, sample(0, 2, loss=-0.0, grad_norm=float("nan")))  # -0.0 == 0.0; NaN != NaN
    text, _ = scrape(collector)
    assert b'trainhealth_loss{rank="0",run="job"} -0.0\n' in text
    assert b'trainhealth_grad_norm{rank="0",run="job"} NaN\n' in text


def test_a_run_forgotten_and_sent_again_is_never_shown_from_the_cache() -> None:
    service = Service(Settings(), clock=Clock(T0))
    collector = state_collector(service)
    send(service, sample(0, 1, loss=2.0), sample(1, 1, loss=2.0))
    scrape(collector)
    service.pipeline.forget("job", "test")
    text, _ = scrape(collector)
    assert b'run="job"' not in text
    send(service, sample(0, 1, loss=3.0))  # a new RankState with the same record count as the cached one
    text, reused = scrape(collector)
    assert reused == 0 and b'trainhealth_loss{rank="0",run="job"} 3.0\n' in text
    assert b'rank="1",run="job"' not in text


# -- scrape after scrape against prometheus-client, on hand-built snapshots ----------------------------------

ODD_VALUES: list[Any] = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e300, -1e300, 5e-324, -5e-324, 1e-7, 1e6,
                         999999.9999999999, 1e16, 9999999999999998.0, -1.5e7, 1_796_534_443.2693543,
                         1_796_534_440.0, 61_000_000_000.0, 123456789012.0, 3, 0, -7, 10**6, 10**20, True, 2.31]
ODD_LABELS = ['job', 'we"ird\\run\nname', 'per%cent %s %%d', 'caf\u00e9-\u4e2d']


def _plain(snap: Snapshot) -> bytes:
    """The same snapshot through prometheus-client alone (its own formatting and escaping)."""
    class Families:
        def collect(self) -> Any:
            return families(snap)

    registry = CollectorRegistry()
    registry.register(Families())  # type: ignore[arg-type]
    return generate_latest(registry)


def test_every_scrape_of_a_changing_fleet_is_what_prometheus_client_writes() -> None:
    """Most ranks or a few take a record between scrapes, and change some values, all or none; keys appear;
    zeros change sign; runs change order, gain a rank, go and come back; labels need escaping (and a % stays
    a %): each scrape's text, through the cache, is byte for byte what generate_latest writes for the same
    snapshot."""
    rnd = random.Random(26)
    keys = [key for _, key, _ in PER_RANK_VALUES]
    fleet: dict[str, list[RankRow]] = {}
    for run in ODD_LABELS:
        fleet[run] = [RankRow(rank, 1, T0, False, {k: rnd.choice(ODD_VALUES) for k in keys[:5]}, None, object(), 1)
                      for rank in ("0", "1", "12", ODD_LABELS[rnd.randrange(1, 4)], *map(str, range(20, 28)))]
    lines = RankLines()
    for scrape in range(60):
        quiet = rnd.choice((0.3, 0.95))  # most ranks took a record since, or a few (their values alone read)
        for rows in fleet.values():
            for i, row in enumerate(rows):
                how = rnd.random()
                if how < quiet:
                    continue  # no record since: the same row, as the collector keeps it
                how = rnd.random()
                latest = dict(row.latest)
                for key in rnd.sample(keys, rnd.choice((1, 3, len(keys)))):  # a new key now and then
                    latest[key] = rnd.choice(ODD_VALUES) if how < 0.8 else -latest.get(key, 0.0)
                nan_step = row.loss_nonfinite_step if row.loss_nonfinite_step is not None or how < 0.9 else scrape
                rows[i] = RankRow(row.rank, rnd.choice((-1, scrape, 10**7)), rnd.choice(ODD_VALUES[:-5]),
                                  how > 0.95, latest, nan_step, row.source, row.version + 1)
        if scrape % 7 == 3:
            fleet["job"].append(RankRow(str(100 + len(fleet["job"])), 1, T0, False, {}, None, object(), 1))
        runs = list(fleet.items())
        rnd.shuffle(runs)
        snap = Snapshot(runs=runs[:-1] if scrape % 5 == 4 else runs)  # a run left out now and then
        assert render(snap, lines) == _plain(snap), scrape
        assert render(snap) == _plain(snap)


def test_a_rank_whose_values_are_unchanged_keeps_the_text_of_its_run() -> None:
    row = RankRow("0", 3, T0, False, {"loss": -0.0, "lr": 0.1}, None, object(), 1)
    lines = RankLines()
    first = render(Snapshot(runs=[("job", [row])]), lines)
    assert lines.reused == 0 and b'trainhealth_loss{rank="0",run="job"} -0.0\n' in first
    assert render(Snapshot(runs=[("job", [row])]), lines) == first and lines.reused == 1
    same = RankRow("0", 3, T0, False, {"loss": -0.0, "lr": 0.1}, None, row.source, 2)  # a record, equal values
    assert render(Snapshot(runs=[("job", [same])]), lines) == first and lines.reused == 0
    flipped = RankRow("0", 3, T0, False, {"loss": 0.0, "lr": 0.1}, None, row.source, 3)  # equal, written apart
    assert b'trainhealth_loss{rank="0",run="job"} 0.0\n' in render(Snapshot(runs=[("job", [flipped])]), lines)
    built = RankRow("0", 3, T0, False, {"loss": 1.0}, None)  # no RankState: written, never kept
    assert b'trainhealth_loss{rank="0",run="job"} 1.0\n' in render(Snapshot(runs=[("job", [built])]), lines)
    assert lines.runs == {}


def test_a_snapshot_of_changed_ranks_frees_their_old_rows_as_it_goes() -> None:
    """Each new row (and its copy of ``latest``) replaces one that is freed then: the garbage collector's
    count of allocations net of frees barely moves, so a scrape sets off no collection of the whole heap."""
    service = Service(Settings(), clock=Clock(T0))
    collector = state_collector(service)
    send(service, *[sample(r, 1, loss=2.0) for r in range(500)])
    collector.snapshot()
    send(service, *[sample(r, 2, loss=1.5) for r in range(500)])
    threshold = gc.get_threshold()
    gc.set_threshold(700, *threshold[1:])  # a collection when the count reaches 700 (the default)
    try:
        gc.collect()  # the count of allocations net of frees starts at 0
        collections = gc.get_stats()[0]["collections"]
        snap = collector.snapshot()
        assert gc.get_stats()[0]["collections"] == collections  # (one when the old rows outlived the new)
    finally:
        gc.set_threshold(*threshold)
    assert sum(len(rows) for _, rows in snap.runs) == 500 and snap.runs[0][1][0].step == 2
