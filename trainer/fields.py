"""Record field names as the client sorts them (docs/record.md; the client does not import the sidecar:
tests/unit/test_contract_names.py checks these equal the sidecar's)."""

from __future__ import annotations

from typing import Any

STAGED = "_staged"  # key of a record whose tensor values the device has not finished yet
SAMPLE_FIELDS = frozenset((
    "loss", "lr", "grad_norm", "grad_scale", "gpu_mem_allocated_bytes", "gpu_mem_reserved_bytes",
    "gpu_mem_peak_bytes", "gpu_mem_total_bytes", "host_mem_bytes", "host_mem_total_bytes",
    "host_mem_available_bytes", "host_mem_limit_bytes", "step_time_seconds", "data_time_seconds", "batch_size",
    "world_size",
))
INT_FIELDS = frozenset(("batch_size", "world_size", "reference_batch_size", "warmup_steps", "pid"))
FLOAT_FIELDS = SAMPLE_FIELDS - INT_FIELDS
MESSAGE_CHARS = 4000  # the sidecar's limits on oom records
DETAIL_CHARS = 1_000_000


def assign(rec: dict[str, Any], name: str, value: Any) -> None:
    """Known sample fields go top level, anything else into ``metrics``."""
    if name in SAMPLE_FIELDS:
        rec[name] = value
    else:
        rec.setdefault("metrics", {})[name] = value

# The alert names of docs/alerts.md: what ``Telemetry(stop_on=...)`` may name (a misspelled name would never stop)
ALERT_NAMES = frozenset((
    "nan_divergence", "loss_spike", "grad_explosion", "gpu_oom_risk", "gpu_oom", "host_memory_leak",
    "rank_stalled", "rank_failed", "straggler", "lr_scaling",
))
ERROR_TEXT_CHARS = 4000  # an end record's error type and message (the sidecar takes 4096)
TRACEBACK_FRAMES = 20  # the last frames of a crash's traceback
TRACEBACK_CHARS = 16_000
