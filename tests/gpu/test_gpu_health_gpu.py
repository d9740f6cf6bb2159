"""GPU health and the step split on a real CUDA GPU: NVML's reading of a healthy GPU at work raises nothing, and
StepTimer's CUDA events give the split of a step without a sync.

On a machine without CUDA (CI, laptops, where this was written) every test here skips: these paths are
unit-tested there against tests/unit/nvml_fake.py and fake events. Run them on a GPU machine with
``python -m pytest tests/gpu/test_gpu_health_gpu.py``.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only paths)")]


def test_a_healthy_gpu_at_work_reads_as_healthy_and_raises_nothing() -> None:
    from trainhealth.record import from_obj
    from trainhealth.trainer import nvml as nvml_mod
    from trainhealth.trainer.torch_helpers import pci_bus_id

    from tests.live_traces import RUN, T0, feed

    device = nvml_mod.open_device(pci_bus_id(torch.cuda.get_device_properties(0)), 0)
    assert device is not None
    a = torch.randn(4096, 4096, device="cuda")
    records = [from_obj({"type": "start", "run": RUN, "rank": 0, "time": T0, "world_size": 1, "host": "gpu-box"})]
    readings = []
    for k in range(1, 13):  # a minute of readings while the GPU multiplies matrices
        for _ in range(50):
            a = (a @ a).clamp_(-1, 1)
        reading = device.health()
        readings.append(reading)
        records.append(from_obj({"type": "heartbeat", "run": RUN, "rank": 0, "time": T0 + 5.0 * k, "step": k,
                                 "gpu_health": reading}))
    torch.cuda.synchronize()
    first = readings[0]
    assert first["pci_bus_id"] and isinstance(first["index"], int)
    assert 0 < first["sm_clock_mhz"] <= first["sm_clock_max_mhz"] and first["power_watts"] > 0
    assert [x for x in feed(records) if x["alert"] in ("gpu_fault", "gpu_degraded")] == []


def test_step_timer_splits_a_cuda_step_from_events_without_a_sync() -> None:
    from trainhealth.trainer.step_timing import StepTimer

    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)]).cuda()
    x = torch.randn(256, 2048, device="cuda")
    timer = StepTimer(model)
    got = []
    for _ in range(30):
        timer.begin()
        model(x).sum().backward()
        got.append(timer.end())
    torch.cuda.synchronize()
    time.sleep(0.1)
    got.append(timer.end())  # a step already done on the device: read now
    measured = [g for g in got if g]
    assert measured and all(g["compute_seconds"] > 0 and g["comm_wait_seconds"] >= 0 for g in measured)
