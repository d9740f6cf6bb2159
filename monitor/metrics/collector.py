"""Prometheus export: a collector that reads the sidecar's current state at scrape time.

Nothing is set per record: ``RankState.latest`` already holds each rank's newest
values, so ingest pays nothing for the export. A scrape works in two parts:

- ``StateCollector.snapshot()`` copies what it needs (plain dict and list copies,
  about a microsecond per rank) and picks which runs to export under the series
  cap. It runs on the event loop, the only thread that mutates the state.
- ``render(snapshot)`` writes the text: the per-rank families (nearly every
  series) directly through exposition.py (~0.6 us per series, 10 ms at 1,000
  ranks the first time; then only what changed since the previous scrape, ~4 ms
  when every rank sent a record), the service-wide ones through prometheus-client (whose own formatter
  costs ~5 us per series). The route runs it in a worker thread from the
  snapshot, off the event loop. ``families(snapshot)`` yields the same families
  as prometheus-client objects (``collect()``, tests).

The collector depends only on what it is given (like prometheus-client's
``ProcessCollector(pid=, proc=)``): the pipeline whose state it reads, a clock,
and optionally the ingest counters, the latency histogram, the request body budget and the objects
that report webhook delivery stats, and ``[exporter]``'s ExporterSettings as the config built them.
``http/metrics.py`` wires a Service's parts in.

Names are fixed by docs/grafana.md and the dashboards; per-rank series carry ``run`` and ``rank`` labels.
Label values are bounded: run names are validated on ingest and runs, ranks and
exported series are capped.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..config import ExporterSettings
from ..health import UNDELIVERED_NAMES, WRITE_ERROR_NAMES
from .exposition import RankLines, per_rank_parts
from .snapshot import RankRow, Snapshot

if TYPE_CHECKING:
    from ..http.bodies import BodyBudget
    from ..pipeline import Pipeline
    from ..service import IngestStats
    from ..state import RankState, RunState

log = logging.getLogger(__name__)

# metric name, RankState.latest key, help
PER_RANK_VALUES: tuple[tuple[str, str, str], ...] = (
    ("trainhealth_loss", "loss", "Loss of the rank's newest sample (NaN stays NaN)."),
    ("trainhealth_learning_rate", "lr", "Learning rate of the rank's newest sample."),
    ("trainhealth_grad_norm", "grad_norm", "Global L2 gradient norm before clipping."),
    ("trainhealth_grad_scale", "grad_scale", "AMP dynamic loss scale."),
    ("trainhealth_gpu_memory_peak_bytes", "gpu_mem_peak_bytes", "Peak GPU memory allocated since the "
                                                                "rank's previous sample."),
    ("trainhealth_gpu_memory_total_bytes", "gpu_mem_total_bytes", "Capacity of the rank's GPU."),
    ("trainhealth_gpu_memory_allocated_bytes", "gpu_mem_allocated_bytes", "GPU memory allocated now."),
    ("trainhealth_gpu_memory_reserved_bytes", "gpu_mem_reserved_bytes", "GPU memory reserved by the "
                                                                        "caching allocator now."),
    ("trainhealth_host_memory_bytes", "host_mem_bytes", "Host memory of the rank's process and its "
                                                        "children (PSS where available, else RSS)."),
    ("trainhealth_host_memory_available_bytes", "host_mem_available_bytes", "The machine's available "
                                                                            "memory, as the rank saw it."),
    ("trainhealth_host_memory_total_bytes", "host_mem_total_bytes", "The machine's total memory."),
    ("trainhealth_step_time_seconds", "step_time_seconds", "Wall time of the rank's last step."),
    ("trainhealth_data_time_seconds", "data_time_seconds", "Time of the last step spent waiting for data."),
    ("trainhealth_compute_seconds", "compute_seconds", "Time of the last step spent computing (forward, "
                                                       "backward)."),
    ("trainhealth_comm_wait_seconds", "comm_wait_seconds", "Time of the last step spent waiting in its "
                                                           "collectives after computing."),
)
EXPORTED_KEYS = frozenset(key for _, key, _ in PER_RANK_VALUES)  # latest also holds batch/world size
PER_RANK_STATE = ("trainhealth_step", "trainhealth_last_record_timestamp_seconds", "trainhealth_rank_ended",
                  "trainhealth_loss_nonfinite_first_step")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WEBHOOK_NAMES = ("trainhealth_webhook_deliveries_total", "trainhealth_webhook_outbox_depth", *UNDELIVERED_NAMES)
OUTBOX_KEYS = ("outbox_depth", "outbox")
BODY_NAMES = ("trainhealth_request_bodies_held_bytes", "trainhealth_request_bodies_limit_bytes",
              "trainhealth_request_bodies_refused_total")  # with the app's body budget (http/bodies.py)


def exported_names() -> set[str]:
    """Every sample name /metrics can carry (histogram and counter suffixes included)."""
    names = {n for n, _, _ in PER_RANK_VALUES} | set(PER_RANK_STATE) | set(WEBHOOK_NAMES) | set(BODY_NAMES)
    names |= {"trainhealth_alerts_firing", "trainhealth_runs_tracked", "trainhealth_ranks_tracked",
              "trainhealth_runs_exported", "trainhealth_runs_omitted",
              "trainhealth_records_ingested_total", "trainhealth_records_rejected_total",
              "trainhealth_ingest_batches_total", "trainhealth_ingest_bodies_refused_total",
              "trainhealth_alerts_raised_total", *WRITE_ERROR_NAMES}
    names |= {f"trainhealth_ingest_duration_seconds{s}" for s in ("_bucket", "_sum", "_count")}
    return names


class LatencyHistogram:
    """Ingest request durations; observed and read on the event loop only."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


class StateCollector(Collector):
    """Reads the pipeline's runs and open alerts, and the optional sources it is given, at scrape time.

    ``delivery_sources`` is read at every scrape (a live list, such as a Service's alert sinks, so a
    sink added later is seen); each one with a ``delivery_stats()`` method is merged in, the others are
    skipped."""

    def __init__(self, pipeline: Pipeline, clock: Callable[[], float], *,
                 stats: IngestStats | None = None, latency: LatencyHistogram | None = None,
                 bodies: BodyBudget | None = None, delivery_sources: Iterable[object] = (),
                 settings: ExporterSettings | None = None) -> None:
        self.pipeline = pipeline
        self.clock = clock
        self.stats = stats
        self.latency = latency
        self.bodies = bodies
        self.delivery_sources = delivery_sources
        self.settings = settings or ExporterSettings()
        self.lines = RankLines()  # each rank's text from the previous scrape (render(snap, collector.lines))
        self._rows: dict[int, RankRow] = {}  # each rank's row of the previous snapshot, by id of its RankState

    def describe(self) -> list[Metric]:
        return []  # nothing up front: registering then neither collects nor checks name clashes

    def collect(self) -> Iterator[Metric]:
        return families(self.snapshot())

    def snapshot(self) -> Snapshot:
        pipeline = self.pipeline
        snap = Snapshot()
        self._select_runs(pipeline.runs.values(), self.clock(), snap)
        for (run, _rank, name), alert in pipeline.book.open.items():
            key = (run, name, alert.get("severity", "warning"))
            snap.firing[key] = snap.firing.get(key, 0) + 1
        stats = self.stats
        if stats is not None:
            snap.accepted, snap.batches = stats.accepted, stats.batches
            snap.alerts_raised = stats.alerts_raised
            snap.rejected, snap.refused = dict(stats.rejected), dict(stats.bodies_refused)
        if self.latency is not None:
            snap.latency = (self.latency.bounds, list(self.latency.counts), self.latency.sum)
        if self.bodies is not None:
            snap.bodies = (self.bodies.held, self.bodies.limit, self.bodies.refused)
        self._read_deliveries(snap)
        return snap

    def _select_runs(self, runs: Iterable[RunState], wall: float, snap: Snapshot) -> None:
        """Live runs newest first, then ended runs; stop adding runs at the series cap."""
        budget = self.settings.max_series
        keep_ended = self.settings.ended_run_seconds
        seen: dict[int, RankRow] = {}
        for run in sorted(runs, key=lambda r: (r.ended, -r.clock)):
            snap.runs_tracked += 1
            snap.ranks_tracked += len(run.ranks)
            if run.ended and wall - run.clock_wall > keep_ended:
                snap.omitted["ended"] += 1
                continue
            rows = [self._row(r, seen) for r in run.ranks.values()]
            cost = sum(row.series for row in rows)
            if cost > budget:
                snap.omitted["series_cap"] += 1
                continue
            budget -= cost
            snap.runs.append((run.run, rows))
        self._rows = seen  # ranks gone since are dropped

    def _row(self, r: RankState, seen: dict[int, RankRow]) -> RankRow:
        """The rank's row: the previous snapshot's while the rank took no record since (a row is a copy,
        never changed once made), else a new copy. The previous row leaves ``_rows`` here, so that a
        replaced one is freed at once with its copy of ``latest``: the garbage collector counts allocations
        net of frees, and a thousand new rows made before a thousand old ones went would set off two or three
        collections over a heap that holds every rank's history (~2.5 ms of a scrape at 1,000 ranks)."""
        was = self._rows.pop(id(r), None)
        if was is not None and was.source is r and was.version == r.records:
            seen[id(r)] = was
            return was
        same = was is not None and was.source is r
        row = RankRow(was.rank if was is not None and same else str(r.rank), r.last_step, r.last_time, r.ended,
                      r.latest.copy(), r.loss_nonfinite_step, r, r.records)  # (positional: half the cost)
        nan_step = r.loss_nonfinite_step is not None  # its first-NaN step is a series once there is one
        if was is not None and same and len(was.latest) == len(row.latest):
            row.series = was.series + nan_step - (was.loss_nonfinite_step is not None)  # (keys are only added)
        else:
            row.series = len(PER_RANK_STATE) - 1 + nan_step + len(EXPORTED_KEYS & row.latest.keys())
        seen[id(r)] = row
        return row

    def _read_deliveries(self, snap: Snapshot) -> None:
        """Duck-typed: ``delivery_stats()`` on any of the delivery sources."""
        for source in self.delivery_sources:
            hook = getattr(source, "delivery_stats", None)
            if not callable(hook):
                continue
            try:
                merge_delivery_stats(hook(), snap)
            except Exception:  # an optional source must not break the scrape
                log.exception("delivery_stats() of %r failed; webhook metrics skipped", source)


def merge_delivery_stats(stats: Mapping[str, Any], snap: Snapshot) -> None:
    """Accepts ``{"deliveries": {result: n}, "outbox_depth": n}`` or flat ``{result: n, "outbox": n}``."""
    results = snap.deliveries if snap.deliveries is not None else {}
    for key, value in stats.items():
        if key in OUTBOX_KEYS:
            snap.outbox = (snap.outbox or 0.0) + float(value)
        elif isinstance(value, Mapping) and key in ("deliveries", "results"):
            for result, n in value.items():
                results[str(result)] = results.get(str(result), 0.0) + float(n)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            results[str(key)] = results.get(str(key), 0.0) + float(value)
    snap.deliveries = results


# (the text writer reads a family's values of every rank at once: an attrgetter where it can, read in C)
PER_RANK_STATE_FAMILIES: tuple[tuple[str, str, Callable[[RankRow], float | None]], ...] = (
    ("trainhealth_step", "Highest completed optimizer step the rank reported.",
     lambda row: row.step if row.step >= 0 else None),
    ("trainhealth_last_record_timestamp_seconds",
     "Record time (unix seconds) of the rank's newest record of any type.", attrgetter("last_time")),
    ("trainhealth_rank_ended", "1 once the rank sent an end record.", lambda row: 1.0 if row.ended else 0.0),
    ("trainhealth_loss_nonfinite_first_step", "Step of the rank's first NaN/Inf loss since its start (absent "
     "while its loss is finite): over every sidecar, the lowest is the run's first NaN rank.",
     attrgetter("loss_nonfinite_step")),
)


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of one snapshot (pure; runs in a worker thread for the route)."""
    yield from per_rank_families(snap)
    yield from service_families(snap)


def per_rank_families(snap: Snapshot) -> Iterator[Metric]:
    """As prometheus-client objects; ``render`` writes the same text through exposition.py, faster."""
    labels = ["run", "rank"]
    for name, key, help_text in PER_RANK_VALUES:
        fam = GaugeMetricFamily(name, help_text, labels=labels)
        for run, rows in snap.runs:
            for row in rows:
                value = row.latest.get(key)
                if value is not None:
                    fam.add_metric([run, row.rank], value)
        yield fam
    for name, help_text, get in PER_RANK_STATE_FAMILIES:
        fam = GaugeMetricFamily(name, help_text, labels=labels)
        for run, rows in snap.runs:
            for row in rows:
                value = get(row)
                if value is not None:
                    fam.add_metric([run, row.rank], value)
        yield fam


def service_families(snap: Snapshot) -> Iterator[Metric]:
    firing = GaugeMetricFamily("trainhealth_alerts_firing", "Open alerts (one per rank) by run, alert "
                               "and severity.", labels=["run", "alert", "severity"])
    for (run, name, severity), n in sorted(snap.firing.items()):
        firing.add_metric([run, name, severity], n)
    yield firing
    yield GaugeMetricFamily("trainhealth_runs_tracked", "Runs this sidecar holds state for.",
                            value=snap.runs_tracked)
    yield GaugeMetricFamily("trainhealth_ranks_tracked", "Ranks this sidecar holds state for.",
                            value=snap.ranks_tracked)
    yield GaugeMetricFamily("trainhealth_runs_exported", "Runs whose per-rank series this scrape shows.",
                            value=len(snap.runs))
    omitted = GaugeMetricFamily("trainhealth_runs_omitted", "Tracked runs left out of this scrape: ended "
                                "longer than exporter.ended_run_seconds, or over exporter.max_series.",
                                labels=["reason"])
    for reason, n in sorted(snap.omitted.items()):
        omitted.add_metric([reason], n)
    yield omitted
    yield CounterMetricFamily("trainhealth_records_ingested", "Records accepted.", value=snap.accepted)
    rejected = CounterMetricFamily("trainhealth_records_rejected", "Records rejected: invalid, over a cap "
                                   "(runs, ranks per run), or their run name taken by another job (run_name_taken).",
                                   labels=["reason"])
    for reason in sorted({"invalid", "capped", *snap.rejected}):
        rejected.add_metric([reason], snap.rejected.get(reason, 0))
    yield rejected
    yield CounterMetricFamily("trainhealth_ingest_batches", "Ingest bodies decoded.", value=snap.batches)
    refused = CounterMetricFamily("trainhealth_ingest_bodies_refused", "Ingest bodies refused whole, by "
                                  "HTTP status.", labels=["status"])
    for status, n in sorted(snap.refused.items()):
        refused.add_metric([str(status)], n)
    yield refused
    yield CounterMetricFamily("trainhealth_alerts_raised", "Alert firing transitions.",
                              value=snap.alerts_raised)
    if snap.bodies is not None:
        held, limit, busy = snap.bodies
        yield GaugeMetricFamily("trainhealth_request_bodies_held_bytes", "Bytes of request bodies held now, "
                                "by every request together, from their first byte until they are answered.",
                                value=held)
        yield GaugeMetricFamily("trainhealth_request_bodies_limit_bytes", "The most bytes of request bodies "
                                "held at once (limits.max_buffered_bytes).", value=limit)
        yield CounterMetricFamily("trainhealth_request_bodies_refused", "Request bodies refused (503, "
                                  "Retry-After) while the bodies being received held limits.max_buffered_bytes, "
                                  "on every route.", value=busy)
    if snap.latency is not None:
        bounds, counts, total = snap.latency
        buckets, cumulative = [], 0
        for bound, n in zip((*bounds, math.inf), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
        yield HistogramMetricFamily("trainhealth_ingest_duration_seconds", "Server-side time of POST "
                                    "/v1/ingest requests.", buckets=buckets, sum_value=total)
    if snap.deliveries is not None:
        deliveries = CounterMetricFamily("trainhealth_webhook_deliveries", "Alert webhook delivery "
                                         "attempts by result.", labels=["result"])
        for result, count in sorted(snap.deliveries.items()):
            deliveries.add_metric([result], count)
        yield deliveries
    if snap.outbox is not None:
        yield GaugeMetricFamily("trainhealth_webhook_outbox_depth", "Alerts waiting for delivery.",
                                value=snap.outbox)


class _ServiceFamilies(Collector):
    """The service-wide families of one snapshot, for ``generate_latest`` (render writes the rest)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        return service_families(self.snap)


def render(snap: Snapshot, cache: RankLines | None = None, after: bytes = b"") -> bytes:
    """Text exposition of ``snap`` (pure; callable from any thread).

    The per-rank families (nearly every series) are written by exposition.py, first; prometheus-client
    writes the service-wide families. Same text as ``generate_latest`` over ``families(snap)``, and as
    ``generate_latest`` of a registry holding only a StateCollector whose snapshot is ``snap``.
    ``cache`` (the collector's ``lines``): the ranks unchanged since the previous scrape are not formatted
    again (exposition.RankLines). ``after``: text that ends the scrape (another registry's), joined in the
    same copy."""
    rest = generate_latest(_ServiceFamilies(snap))
    return b"".join([*per_rank_parts(snap.runs, PER_RANK_VALUES, PER_RANK_STATE_FAMILIES, cache), rest, after])
