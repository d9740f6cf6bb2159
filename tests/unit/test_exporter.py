"""The Prometheus collector, read through a fresh registry with get_sample_value."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from trainhealth.config import ConfigError, ExporterSettings, Limits, ServerSettings, Settings, load
from trainhealth.health import UNDELIVERED_NAMES, WRITE_ERROR_NAMES
from trainhealth.http import metrics
from trainhealth.http.app import create_app
from trainhealth.http.bodies import BodyBudget
from trainhealth.metrics.collector import LatencyHistogram, exported_names, families, render
from trainhealth.service import Service

from .trainer_fakes import Clock

T0 = 1_700_000_000.0


def make(settings: ExporterSettings | None = None, limits: Limits | None = None,
         latency: LatencyHistogram | None = None,
         bodies: BodyBudget | None = None) -> tuple[Service, CollectorRegistry, Clock]:
    clock = Clock(T0)
    service = Service(Settings(limits=limits or Limits()), clock=clock)
    registry = CollectorRegistry()
    registry.register(metrics.state_collector(service, settings, latency, bodies))
    return service, registry, clock


def send(service: Service, *records: dict[str, Any]) -> dict[str, Any]:
    answer = service.ingest(json.dumps(list(records)).encode(), "application/json")
    return answer.body


def sample(run: str = "job", rank: int = 0, step: int = 1, dt: float = 0.0, **fields: Any) -> dict[str, Any]:
    return {"run": run, "rank": rank, "time": T0 + dt, "step": step, **fields}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_rank_values_are_exported_with_run_and_rank_labels() -> None:
    service, reg, _ = make()
    send(service, sample(rank=0, loss=2.5, lr=0.1, grad_norm=3.0, gpu_mem_peak_bytes=7e9,
                         gpu_mem_total_bytes=8e9, host_mem_bytes=2e9, step_time_seconds=0.4,
                         data_time_seconds=0.05, grad_scale=65536.0, compute_seconds=0.3,
                         comm_wait_seconds=0.04),
         sample(rank=1, loss=2.7, lr=0.1, step=2))
    assert value(reg, "trainhealth_loss", run="job", rank="0") == 2.5
    assert value(reg, "trainhealth_loss", run="job", rank="1") == 2.7
    assert value(reg, "trainhealth_learning_rate", run="job", rank="0") == 0.1
    assert value(reg, "trainhealth_grad_norm", run="job", rank="0") == 3.0
    assert value(reg, "trainhealth_grad_scale", run="job", rank="0") == 65536.0
    assert value(reg, "trainhealth_gpu_memory_peak_bytes", run="job", rank="0") == 7e9
    assert value(reg, "trainhealth_gpu_memory_total_bytes", run="job", rank="0") == 8e9
    assert value(reg, "trainhealth_host_memory_bytes", run="job", rank="0") == 2e9
    assert value(reg, "trainhealth_step_time_seconds", run="job", rank="0") == 0.4
    assert value(reg, "trainhealth_data_time_seconds", run="job", rank="0") == 0.05
    assert value(reg, "trainhealth_compute_seconds", run="job", rank="0") == 0.3
    assert value(reg, "trainhealth_comm_wait_seconds", run="job", rank="0") == 0.04
    assert value(reg, "trainhealth_step", run="job", rank="1") == 2
    assert value(reg, "trainhealth_last_record_timestamp_seconds", run="job", rank="0") == T0


def test_values_follow_the_newest_sample_not_the_first() -> None:
    service, reg, _ = make()
    send(service, sample(step=1, loss=3.0), sample(step=2, dt=1, loss=2.0))
    send(service, sample(step=3, dt=2, loss=1.0))
    assert value(reg, "trainhealth_loss", run="job", rank="0") == 1.0
    assert value(reg, "trainhealth_step", run="job", rank="0") == 3


def test_nan_loss_is_exported_as_nan_not_dropped() -> None:
    service, reg, _ = make()
    send(service, sample(loss="NaN", grad_norm="inf"))
    loss = value(reg, "trainhealth_loss", run="job", rank="0")
    assert loss is not None and math.isnan(loss)
    assert value(reg, "trainhealth_grad_norm", run="job", rank="0") == math.inf
    text = generate_latest(reg).decode()
    assert 'trainhealth_loss{rank="0",run="job"} NaN' in text
    assert 'trainhealth_grad_norm{rank="0",run="job"} +Inf' in text


def test_unmeasured_field_has_no_series() -> None:
    service, reg, _ = make()
    send(service, sample(loss=1.0, lr=None))
    assert value(reg, "trainhealth_learning_rate", run="job", rank="0") is None
    assert value(reg, "trainhealth_gpu_memory_peak_bytes", run="job", rank="0") is None


def test_rank_that_sent_end_is_marked_ended() -> None:
    service, reg, _ = make()
    send(service, sample(rank=0, loss=1.0), sample(rank=1, loss=1.0),
         {"type": "end", "run": "job", "rank": 1, "time": T0 + 1, "step": 1})
    assert value(reg, "trainhealth_rank_ended", run="job", rank="0") == 0
    assert value(reg, "trainhealth_rank_ended", run="job", rank="1") == 1


def test_alerts_firing_counts_ranks_per_run_alert_and_severity() -> None:
    service, reg, _ = make()
    send(service, sample(rank=0, loss="nan"), sample(rank=1, loss="nan"), sample(rank=2, loss=1.0),
         sample(run="other", loss=1.0))
    assert value(reg, "trainhealth_alerts_firing", run="job", alert="nan_divergence",
                 severity="critical") == 1  # one incident for the run, however many ranks went NaN
    assert value(reg, "trainhealth_alerts_firing", run="other", alert="nan_divergence",
                 severity="critical") is None
    assert value(reg, "trainhealth_alerts_raised_total") == 1


def test_run_seen_once_stays_exported_across_timer_ticks() -> None:
    service, reg, clock = make(limits=Limits(run_ttl_seconds=60))
    send(service, sample(loss=1.0))
    clock.now += 30
    service.tick()
    assert value(reg, "trainhealth_loss", run="job", rank="0") == 1.0


def test_expired_run_and_its_alerts_drop_out() -> None:
    service, reg, clock = make(limits=Limits(run_ttl_seconds=60))
    send(service, sample(loss="nan"))
    clock.now += 61
    service.tick()
    assert value(reg, "trainhealth_loss", run="job", rank="0") is None
    assert value(reg, "trainhealth_alerts_firing", run="job", alert="nan_divergence",
                 severity="critical") is None
    assert value(reg, "trainhealth_runs_tracked") == 0


def test_ingested_and_rejected_counters_follow_service_stats() -> None:
    service, reg, _ = make(limits=Limits(max_runs=1))
    send(service, sample(loss=1.0), {"run": "job", "rank": -1, "time": T0, "step": 1},
         sample(run="second", loss=1.0))
    assert value(reg, "trainhealth_records_ingested_total") == 1
    assert value(reg, "trainhealth_records_rejected_total", reason="invalid") == 1
    assert value(reg, "trainhealth_records_rejected_total", reason="capped") == 1
    assert value(reg, "trainhealth_ingest_batches_total") == 1
    service.ingest(b"[", "application/json")  # not JSON: the whole body is refused
    assert value(reg, "trainhealth_ingest_bodies_refused_total", status="400") == 1


def test_ended_run_is_exported_until_ended_run_seconds_then_omitted() -> None:
    service, reg, clock = make(ExporterSettings(ended_run_seconds=300))
    send(service, sample(loss=1.0), {"type": "end", "run": "job", "rank": 0, "time": T0 + 1, "step": 1})
    clock.now += 299
    assert value(reg, "trainhealth_loss", run="job", rank="0") == 1.0
    clock.now += 2
    assert value(reg, "trainhealth_loss", run="job", rank="0") is None
    assert value(reg, "trainhealth_runs_omitted", reason="ended") == 1
    assert value(reg, "trainhealth_runs_tracked") == 1
    assert value(reg, "trainhealth_runs_exported") == 0


def test_series_cap_keeps_live_runs_newest_first_and_counts_omitted() -> None:
    # each rank here costs 3 state series + 1 value (loss; batch_size is not exported) = 4; a 2-rank run 8
    service, reg, clock = make(ExporterSettings(max_series=16))
    send(service, sample(run="old", rank=0, loss=1.0, batch_size=2), sample(run="old", rank=1, loss=1.0))
    send(service, sample(run="ended", rank=0, dt=5, loss=1.0),
         {"type": "end", "run": "ended", "rank": 0, "time": T0 + 6, "step": 1})
    send(service, sample(run="new", rank=0, dt=10, loss=1.0), sample(run="new", rank=1, dt=10, loss=1.0))
    assert value(reg, "trainhealth_loss", run="new", rank="1") == 1.0
    assert value(reg, "trainhealth_loss", run="old", rank="1") == 1.0
    assert value(reg, "trainhealth_loss", run="ended", rank="0") is None  # ended runs come last
    assert value(reg, "trainhealth_runs_omitted", reason="series_cap") == 1
    assert value(reg, "trainhealth_runs_exported") == 2
    assert value(reg, "trainhealth_ranks_tracked") == 5


class Deliveries:
    def __init__(self, stats: Any) -> None:
        self.stats = stats

    def delivery_stats(self) -> Any:
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats

    def __call__(self, alerts: list[Any]) -> None:
        pass


def test_webhook_delivery_stats_are_read_from_a_sink_when_present() -> None:
    service, reg, _ = make()
    assert value(reg, "trainhealth_webhook_deliveries_total", result="delivered") is None
    # the shape of alerts-out's Deliverer.delivery_stats(), and a flat one
    service.alert_sinks.append(Deliveries({"deliveries": {"ok": 5, "retry": 1, "failed": 2}, "outbox_depth": 3,
                                     "targets": [{"name": "hook", "kind": "webhook", "ok": 5, "pending": 3}]}))
    service.alert_sinks.append(Deliveries({"ok": 1, "outbox": 1}))
    assert value(reg, "trainhealth_webhook_deliveries_total", result="ok") == 6
    assert value(reg, "trainhealth_webhook_deliveries_total", result="retry") == 1
    assert value(reg, "trainhealth_webhook_deliveries_total", result="failed") == 2
    assert value(reg, "trainhealth_webhook_deliveries_total", result="targets") is None
    assert value(reg, "trainhealth_webhook_outbox_depth") == 4


def test_failing_delivery_stats_is_logged_and_the_scrape_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    service, reg, _ = make()
    send(service, sample(loss=1.0))
    service.alert_sinks.append(Deliveries(RuntimeError("outbox locked")))
    with caplog.at_level(logging.ERROR):
        assert value(reg, "trainhealth_loss", run="job", rank="0") == 1.0
    assert "delivery_stats()" in caplog.text
    assert value(reg, "trainhealth_webhook_outbox_depth") is None


def test_ingest_latency_histogram_buckets_are_cumulative() -> None:
    latency = LatencyHistogram()
    _, reg, _ = make(latency=latency)
    for seconds in (0.0002, 0.003, 0.003, 7.0):
        latency.observe(seconds)
    name = "trainhealth_ingest_duration_seconds"
    assert value(reg, f"{name}_bucket", le="0.0005") == 1
    assert value(reg, f"{name}_bucket", le="0.0025") == 1
    assert value(reg, f"{name}_bucket", le="0.005") == 3
    assert value(reg, f"{name}_bucket", le="2.5") == 3
    assert value(reg, f"{name}_bucket", le="+Inf") == 4
    assert value(reg, f"{name}_count") == 4
    assert value(reg, f"{name}_sum") == pytest.approx(7.0062)


def test_every_sample_name_is_declared_in_exported_names() -> None:
    latency = LatencyHistogram()
    service, reg, _ = make(latency=latency, bodies=BodyBudget(1 << 20))
    service.alert_sinks.append(Deliveries({"delivered": 1, "outbox": 0}))
    fields = {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "grad_scale": 1.0, "gpu_mem_peak_bytes": 1.0,
              "gpu_mem_total_bytes": 2.0, "gpu_mem_allocated_bytes": 1.0, "gpu_mem_reserved_bytes": 1.0,
              "host_mem_bytes": 1.0, "host_mem_available_bytes": 1.0, "host_mem_total_bytes": 2.0,
              "step_time_seconds": 1.0, "data_time_seconds": 0.1, "compute_seconds": 0.5, "comm_wait_seconds": 0.4}
    send(service, sample(**fields), sample(rank=1, loss="nan"))
    service.ingest(b"[", "application/json")
    latency.observe(0.001)
    names = {s.name for fam in reg.collect() for s in fam.samples}
    beside = set(WRITE_ERROR_NAMES) | set(UNDELIVERED_NAMES)  # health.HealthCollector's, registered beside it
    assert names | beside == exported_names()


def test_render_shows_the_pinned_snapshot_not_later_state() -> None:
    service, reg, _ = make()
    collector = metrics.state_collector(service)
    registry = CollectorRegistry()
    registry.register(collector)
    send(service, sample(step=1, loss=1.0))
    snap = collector.snapshot()
    send(service, sample(step=2, dt=1, loss=0.5))
    text = render(snap).decode()
    assert 'trainhealth_loss{rank="0",run="job"} 1.0' in text
    assert value(registry, "trainhealth_loss", run="job", rank="0") == 0.5


def test_render_writes_exactly_what_prometheus_client_writes() -> None:
    service, _, clock = make()
    latency = LatencyHistogram()
    collector = metrics.state_collector(service, latency=latency)
    registry = CollectorRegistry()
    registry.register(collector)
    send(service, sample(rank=0, loss="nan", lr=0.1, grad_norm="inf", gpu_mem_total_bytes=8.0e10,
                         host_mem_bytes=123456789012.0, step_time_seconds=1e-7),
         sample(rank=1, loss="-inf", lr=3, step=7), sample(run="other.job:2", rank=12, step=0, loss=0.5),
         {"run": "other.job:2", "rank": 3, "time": T0, "type": "start"},
         {"run": "job", "rank": 2, "time": T0, "step": 9, "type": "end"})
    service.ingest(b"[", "application/json")
    latency.observe(0.003)
    clock.now += 5
    snap = collector.snapshot()

    class Families:  # the same snapshot through prometheus-client alone
        def collect(self) -> Any:
            return families(snap)

    plain = CollectorRegistry()
    plain.register(Families())  # type: ignore[arg-type]
    text = render(snap)
    assert text == generate_latest(registry)  # nothing changed since the snapshot: collect() shows the same
    assert text == generate_latest(plain)
    assert b'trainhealth_loss{rank="0",run="job"} NaN\n' in text
    assert b'trainhealth_step{rank="3",run="other.job:2"}' not in text  # a start has no step yet


def test_exporter_settings_come_from_the_toml_table_and_name_bad_values(tmp_path: Path) -> None:
    config = tmp_path / "trainhealth.toml"
    config.write_text("[exporter]\nmax_series = 10\n")
    assert load(str(config)).exporter.max_series == 10
    assert load(None).exporter == ExporterSettings()
    with pytest.raises(ConfigError, match=r"exporter.max_series: must be an integer >= 1, got 0"):
        ExporterSettings(max_series=0)
    with pytest.raises(ConfigError, match=r"exporter.ended_run_seconds: .* got -1"):
        ExporterSettings(ended_run_seconds=-1)
    config.write_text("[exporter]\nseries = 1\n")
    with pytest.raises(ConfigError, match=r"exporter.series: unknown setting"):
        load(str(config))


def test_metrics_route_requires_the_token_and_times_ingest() -> None:
    service = Service(Settings(server=ServerSettings(token="s3cret")))
    latency = LatencyHistogram()
    app = create_app(service, [metrics.router(service, latency)], latency=latency)
    auth = {"Authorization": "Bearer s3cret"}

    async def scenario() -> tuple[int, int, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as client:
            denied = (await client.get("/metrics")).status_code
            posted = await client.post("/v1/ingest", content=json.dumps([sample(loss="NaN")]),
                                       headers={**auth, "content-type": "application/json"})
            return denied, posted.status_code, await client.get("/metrics", headers=auth)

    denied, posted, response = asyncio.run(scenario())
    assert (denied, posted, response.status_code) == (401, 200, 200)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'trainhealth_loss{rank="0",run="job"} NaN' in response.text
    assert "trainhealth_ingest_duration_seconds_count 1.0" in response.text


def test_collector_needs_only_a_pipeline_and_a_clock() -> None:
    """No Service: the collector reads what it is given (optional sources absent: their families too)."""
    from trainhealth.config import default_detector_settings
    from trainhealth.metrics.collector import StateCollector
    from trainhealth.pipeline import Pipeline
    from trainhealth.record import from_obj

    pipeline = Pipeline(default_detector_settings())
    pipeline.process([from_obj(sample(loss="nan"))])
    registry = CollectorRegistry()
    registry.register(StateCollector(pipeline, lambda: T0))
    assert math.isnan(value(registry, "trainhealth_loss", run="job", rank="0") or 0.0)
    assert value(registry, "trainhealth_alerts_firing", run="job", alert="nan_divergence", severity="critical") == 1
    assert value(registry, "trainhealth_records_ingested_total") == 0  # no ingest counters given
    assert value(registry, "trainhealth_ingest_duration_seconds_count") is None  # no latency histogram
