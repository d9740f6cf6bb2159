"""/metrics reuses the text of ranks unchanged since the previous scrape (exposition.RankLines): the
text must be exactly what a render without the cache writes, scrape after scrape."""

from __future__ import annotations

import json
from typing import Any

from trainhealth.config import Settings
from trainhealth.http.metrics import state_collector
from trainhealth.metrics.collector import StateCollector, render
from trainhealth.service import Service

T0 = 1_700_000_000.0


class Clock:
    now = T0

    def __call__(self) -> float:
        return self.now


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
    service = Service(Settings(), clock=Clock())
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
    service = Service(Settings(), clock=Clock())
    collector = state_collector(service)
    send(service, sample(0, 1, loss=0.0, grad_norm=float("nan")))
    scrape(collector)
    send(service, sample(0, 2, loss=-0.0, grad_norm=float("nan")))  # -0.0 == 0.0; NaN != NaN
    text, _ = scrape(collector)
    assert b'trainhealth_loss{rank="0",run="job"} -0.0\n' in text
    assert b'trainhealth_grad_norm{rank="0",run="job"} NaN\n' in text


def test_a_run_forgotten_and_sent_again_is_never_shown_from_the_cache() -> None:
    service = Service(Settings(), clock=Clock())
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
