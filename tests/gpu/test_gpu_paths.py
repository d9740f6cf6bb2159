"""The GPU paths for real, on a CUDA machine: the caching allocator's stats, NVML, staged tensors read without a
sync, OOM capture with the allocator summary, and a GPU leak raising gpu_oom_risk before gpu_oom at a real sidecar.

On a machine without CUDA (CI, laptops) every test here skips: these paths are unit-tested there through the
``cuda=`` / ``nvml=`` seams (tests/unit/test_torch_helpers.py). Run them on a GPU machine with
``python -m pytest tests/gpu``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, python_path

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only paths)")]


def test_gpu_memory_fields_read_the_real_allocator() -> None:
    from trainhealth.trainer.torch_helpers import gpu_memory_fields

    block = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    fields = gpu_memory_fields(torch.cuda)
    assert fields["gpu_mem_allocated_bytes"] >= 512 * 2**20
    assert fields["gpu_mem_reserved_bytes"] >= fields["gpu_mem_allocated_bytes"]
    assert fields["gpu_mem_peak_bytes"] >= fields["gpu_mem_allocated_bytes"]
    assert fields["gpu_mem_total_bytes"] == torch.cuda.get_device_properties(0).total_memory
    del block


def test_nvml_reads_the_device_the_rank_uses() -> None:
    from trainhealth.trainer import nvml as nvml_mod
    from trainhealth.trainer.torch_helpers import pci_bus_id

    device = nvml_mod.open_device(pci_bus_id(torch.cuda.get_device_properties(0)), 0)
    assert device is not None
    metrics = device.sample()
    assert 0 <= metrics["gpu_util_percent"] <= 100
    assert 0 < metrics["gpu_temperature_celsius"] < 120
    assert metrics["gpu_device_used_bytes"] > 0


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_staged_gpu_tensors_arrive_as_numbers_nan_included(tmp_path: Path) -> None:
    from trainhealth import Telemetry

    out = tmp_path / "rank{rank}.jsonl"
    tm = Telemetry(run="gpu-staged", rank=0, world_size=1, offline_path=str(out))
    for step in range(1, 6):
        loss = torch.tensor(float(step), device="cuda") * 2
        if step == 5:
            loss = loss * float("nan")
        grad_norm = torch.tensor(0.5, device="cuda")
        tm.record(step, loss=loss, lr=0.1, grad_norm=grad_norm)
    tm.close()
    samples = [r for r in _records(tmp_path / "rank0.jsonl") if r.get("type", "sample") == "sample"]
    losses = {r["step"]: r.get("loss") for r in samples if "loss" in r}
    assert [losses[s] for s in range(1, 5)] == [2.0, 4.0, 6.0, 8.0]
    assert isinstance(losses[5], float) and math.isnan(losses[5])  # NaN, never null
    assert [r["grad_norm"] for r in samples if "grad_norm" in r] == [0.5] * 5


def test_the_probe_samples_the_real_allocator_once_cuda_is_in_use() -> None:
    from trainhealth.trainer.torch_helpers import TorchProbe

    probe = TorchProbe()
    block = torch.ones(2**20, device="cuda")
    probe.bind()
    fields = probe.sample()
    del block
    assert fields["gpu_mem_total_bytes"] == torch.cuda.get_device_properties(0).total_memory
    assert fields["gpu_mem_peak_bytes"] >= fields["gpu_mem_allocated_bytes"] > 0


def test_oom_guard_sends_an_oom_record_with_the_allocator_summary(tmp_path: Path) -> None:
    from trainhealth import Telemetry

    out = tmp_path / "rank{rank}.jsonl"
    tm = Telemetry(run="gpu-oom", rank=0, world_size=1, offline_path=str(out))
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(torch.cuda.OutOfMemoryError), tm.oom_guard(step=7):
        torch.empty(2 * total, dtype=torch.uint8, device="cuda")
    tm.close()
    ooms = [r for r in _records(tmp_path / "rank0.jsonl") if r.get("type") == "oom"]
    assert len(ooms) == 1 and ooms[0]["step"] == 7
    assert "out of memory" in ooms[0]["message"].lower()
    assert ooms[0]["gpu_mem_total_bytes"] == total and "Allocated memory" in ooms[0]["detail"]


# gpu_oom_risk's windows scaled from minutes to seconds (as the CPU e2e tests scale theirs): one-second buckets,
# judged after 6 of them; the default needs 100 steps and 12 buckets of 10 s before its first judgement.
GPU_CONFIG = """
[detectors.gpu_oom_risk]
warmup_steps = 10
bucket_steps = 2
bucket_seconds = 1.0
min_buckets = 6
window_buckets = 24
horizon_seconds = 120.0
"""


def test_gpu_leak_raises_gpu_oom_risk_before_gpu_oom_at_the_sidecar(start_sidecar, tmp_path: Path) -> None:
    sidecar = start_sidecar(config=GPU_CONFIG)
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    leak_mb = max(64, int(total_gb * 1024 / 400))  # ~400 steps (~40 s at 0.1 s) from empty to full
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
    env.update({"PYTHONPATH": python_path(), "TRAINHEALTH_URL": sidecar.url, "TRAINHEALTH_RUN": "gpu-leak",
                "TRAINHEALTH_FLUSH_SECONDS": "0.2", "TRAINHEALTH_SAMPLE_SECONDS": "0.2",
                "TRAINHEALTH_HEARTBEAT_SECONDS": "0.2"})
    log = tmp_path / "trainer.log"
    started = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "trainhealth.trainer", "--inject", "gpu-leak",
                               "--inject-rank", "0", "--inject-step", "1", "--leak-mb", str(leak_mb),
                               "--steps", "100000", "--step-sleep", "0.1", "--log-every", "1000"],
                              cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=240)
    assert done.returncode != 0, log.read_text()[-3000:]  # it died of the OOM
    deadline = time.monotonic() + 20
    while True:
        alerts = sidecar.client.get("/v1/alerts", params={"run": "gpu-leak"}).json()["alerts"][::-1]
        names = [(a["alert"], a["state"]) for a in alerts]
        if ("gpu_oom", "firing") in names or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    risk = [a for a in alerts if a["alert"] == "gpu_oom_risk" and a["state"] == "firing"]
    oom = [a for a in alerts if a["alert"] == "gpu_oom" and a["state"] == "firing"]
    print(f"GPU {total_gb:.0f} GiB, leak {leak_mb} MB/step, trainer ran {time.monotonic() - started:.1f} s; "
          f"alerts: {names}")
    for a in risk + oom:
        print(f"  {a['alert']} step {a['step']}: {a['summary']}")
    assert risk and oom, (names, log.read_text()[-3000:])
    assert risk[0]["rank"] == 0 and oom[0]["rank"] == 0
    assert risk[0]["time"] <= oom[0]["time"] and risk[0]["step"] < oom[0]["step"]
