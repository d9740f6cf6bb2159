"""Each detector's ``record_types`` is honest: a record it does not declare changes nothing.

The pipeline calls a detector's ``update`` only for the records it declares (their types, and any record with
a GPU reading for those that declare ``gpu_health``: a heartbeat without one reaches 2 of the 12 detectors),
which is exactly the same as calling it for every record only if, for every other record, ``update`` returns
``[]`` and leaves the detector as it was. Here every detector is brought into several states by the real
pipeline (healthy fp16 ranks with every memory field, an OOM, a NaN, a failed rank, GPU health readings), then
handed records of each type it does not declare, carrying every field that could tempt it (a heartbeat with a
NaN loss and an XID, an oom, failed and clean ends, a rank never seen; without a GPU reading for a detector
that reads every record with one): its pickled state must not change by a byte and it must return no event.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
from trainhealth.config import default_detector_settings
from trainhealth.detectors import ALL
from trainhealth.detectors.base import GPU_HEALTH
from trainhealth.pipeline import Pipeline
from trainhealth.record import RECORD_TYPES, Record, from_obj

GiB = float(1 << 30)
RUN = "types"

EVERY_FIELD: dict[str, Any] = {
    "step": 40, "phase": "step", "phase_time": 1039.0, "loss": math.nan, "lr": 9.0, "grad_norm": math.inf,
    "grad_scale": 1.0, "gpu_mem_allocated_bytes": 79 * GiB, "gpu_mem_reserved_bytes": 79.5 * GiB,
    "gpu_mem_peak_bytes": 79.9 * GiB, "gpu_mem_total_bytes": 80 * GiB, "host_mem_bytes": 500 * GiB,
    "host_mem_total_bytes": 512 * GiB, "host_mem_available_bytes": 1.0, "host_mem_limit_bytes": 501 * GiB,
    "host_mem_cgroup": "/job", "host_mem_cgroup_bytes": 500 * GiB, "host_mem_oom_kills": 3,
    "step_time_seconds": 60.0, "data_time_seconds": 50.0, "compute_seconds": 9.0, "comm_wait_seconds": 1.0,
    "batch_size": 64, "world_size": 2, "reference_lr": 1e-3, "reference_batch_size": 8,
    "gpu_health": {"index": 0, "pci_bus_id": "0000:3b:00.0", "xids": [{"xid": 79, "time": 1039.0}],
                   "ecc_uncorrected": 9, "remapped_rows_failed": True, "throttle_reasons": 8,
                   "sm_clock_mhz": 300.0, "sm_clock_max_mhz": 1980.0, "power_watts": 80.0,
                   "power_limit_watts": 700.0},
}


def probes(kind: str) -> list[Record]:
    """Records of one type that could move any detector: with every field, on a known rank and a new one."""
    variants: list[dict[str, Any]] = [{}, EVERY_FIELD]
    if kind == "end":
        variants += [{**EVERY_FIELD, "status": "failed", "error": {"type": "RuntimeError", "message": "boom"}},
                     {"status": "completed", "step": 40},
                     {"status": "failed", "exit_code": 137, "signal": "SIGKILL", "oom_killed": True}]
    if kind == "oom":
        variants += [{**EVERY_FIELD, "message": "CUDA out of memory", "detail": "allocator summary"}]
    out = []
    for rank in (0, 1, 7):
        for i, fields in enumerate(variants):
            obj = {"run": RUN, "rank": rank, "time": 1040.0 + i, "type": kind, "step": 40, **fields}
            if kind != "sample" and obj.get("step") is None:
                obj.pop("step", None)
            out.append(from_obj(obj))
    return out


def sample(rank: int, step: int, **fields: Any) -> Record:
    t = 1000.0 + step + 0.01 * rank
    return from_obj({"run": RUN, "rank": rank, "time": t, "step": step, "phase": "step", "phase_time": t - 0.5,
                     "loss": 2.0 - 0.01 * step, "lr": 1e-3, "grad_norm": 1.0, "grad_scale": 65536.0,
                     "gpu_mem_allocated_bytes": 30 * GiB + step * 1e8, "gpu_mem_reserved_bytes": 34 * GiB,
                     "gpu_mem_peak_bytes": 32 * GiB + step * 1e8, "gpu_mem_total_bytes": 80 * GiB,
                     "host_mem_bytes": 6 * GiB + step * 1e7, "host_mem_available_bytes": 400 * GiB,
                     "host_mem_total_bytes": 512 * GiB, "host_mem_limit_bytes": 16 * GiB,
                     "host_mem_cgroup": "/job", "step_time_seconds": 1.0, "data_time_seconds": 0.1,
                     "compute_seconds": 0.8, "comm_wait_seconds": 0.1, "batch_size": 8, "world_size": 2,
                     **fields})


def scenario(name: str) -> list[Record]:
    """Two ranks' run, left in a state worth probing."""
    starts = [from_obj({"type": "start", "run": RUN, "rank": r, "time": 999.0, "world_size": 2, "batch_size": 8,
                        "lr": 1e-3, "warmup_steps": 5, "host": "node-0", "pid": 100 + r}) for r in (0, 1)]
    steps = range(1, 31)
    if name == "healthy":
        return starts + [sample(r, s) for s in steps for r in (0, 1)]
    if name == "troubled":  # an OOM, a NaN, a spike, a GPU fault, a failed end, a heartbeating rank
        recs = starts + [sample(r, s, **({"loss": 50.0} if (r, s) == (1, 25) else {})) for s in steps for r in (0, 1)]
        recs += [from_obj({"type": "heartbeat", "run": RUN, "rank": 1, "time": 1000.0 + s + 0.5, "step": s,
                           "gpu_health": {"index": 1, "xids": [{"xid": 48, "time": 1000.0 + s}],
                                          "ecc_uncorrected": s, "sm_clock_mhz": 500.0, "sm_clock_max_mhz": 1980.0,
                                          "throttle_reasons": 8}}) for s in (10, 20)]
        recs += [from_obj({"type": "oom", "run": RUN, "rank": 1, "time": 1031.0, "step": 31,
                           "message": "CUDA out of memory", "gpu_mem_total_bytes": 80 * GiB}),
                 sample(0, 31, loss=math.nan),
                 from_obj({"type": "end", "run": RUN, "rank": 1, "time": 1032.0, "step": 31, "status": "failed",
                           "exit_code": 1})]
        return sorted(recs, key=lambda r: r.time)
    raise AssertionError(name)


def test_every_declared_type_is_a_record_type_or_a_gpu_reading() -> None:
    for cls in ALL:
        assert cls.record_types and set(cls.record_types) <= {*RECORD_TYPES, GPU_HEALTH}, cls.name


def test_heartbeats_skip_the_detectors_that_do_not_read_them() -> None:
    """The dispatch is in force (else this file would prove nothing about what the pipeline does)."""
    p = Pipeline(default_detector_settings())
    p.process(scenario("healthy"))
    plain, health = p._bound_methods(RUN)[1]

    def names(updates: list[Any]) -> list[str]:
        return [u.__self__.name for u in updates]

    assert names(plain["heartbeat"]) == ["rank_failed", "rank_stalled"]
    assert names(health["heartbeat"]) == ["rank_failed", "rank_stalled", "straggler", "gpu_fault", "gpu_degraded"]
    assert names(plain["sample"]) == [c.name for c in ALL if c.name not in ("gpu_fault", "gpu_degraded")]
    assert names(health["sample"]) == [c.name for c in ALL]


@pytest.mark.parametrize("name", ["healthy", "troubled"])
def test_a_record_of_an_undeclared_type_changes_no_detector(name: str) -> None:
    p = Pipeline(default_detector_settings())
    p.process(scenario(name))
    checked = 0
    for det in p.detectors[RUN]:
        for kind in RECORD_TYPES:
            if kind in det.record_types:
                continue
            for rec in probes(kind):
                if rec.gpu_health is not None and GPU_HEALTH in det.record_types:
                    continue  # it reads every record with a GPU reading
                before = pickle.dumps(det)
                assert det.update(rec) == [], (det.name, rec)
                assert pickle.dumps(det) == before, (det.name, rec)
                checked += 1
    assert checked > 100  # every detector that leaves a type out was probed with it
