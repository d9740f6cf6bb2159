"""A GPU fault from the client's NVML reading to the sidecar's alert: a real client (its threads on) sending
to a real sidecar over HTTP. The GPU is ``FakeNvml`` (pynvml's own constants and errors; there is no GPU
here) behind a fake ``torch.cuda`` that says the rank runs on it."""

from __future__ import annotations

import json
from typing import Any

from trainhealth.record import from_obj
from trainhealth.trainer.client import Telemetry
from trainhealth.trainer.gpu_health import GpuHealthProbe

from tests.conftest import Sidecar
from tests.integration.alerting import until
from tests.live_traces import feed
from tests.unit.nvml_fake import FakeNvml
from tests.unit.test_gpu_health import FakeCuda


def alerts(sidecar: Sidecar, run: str) -> list[dict[str, Any]]:
    answer = sidecar.client.get("/v1/alerts", params={"run": run})
    assert answer.status_code == 200, answer.text
    return answer.json()["alerts"][::-1]


def test_xid_79_read_by_the_client_pages_gpu_fault_naming_host_gpu_and_bus(start_sidecar, tmp_path):
    sidecar: Sidecar = start_sidecar(record=True)
    nvml = FakeNvml()
    probe = GpuHealthProbe(FakeCuda(), nvml, sample_seconds=0.1)
    tm = Telemetry(url=sidecar.url, run="gpu-e2e", rank=2, world_size=4, probes=[probe], host="node-b",
                   flush_seconds=0.1, heartbeat_seconds=0.5)
    try:
        tm.start(batch_size=8)
        for step in range(1, 4):
            tm.record(step, loss=1.0)
        # a healthy GPU's readings arrive (a heartbeat each) and raise nothing
        until(lambda: sidecar.client.get("/v1/runs/gpu-e2e").status_code == 200, what="the run")
        # a few healthy readings taken (one event poll each) and sent
        until(lambda: nvml.counts.get("nvmlEventSetWait", 0) >= 4, what="a few healthy readings")
        tm.flush()
        assert alerts(sidecar, "gpu-e2e") == []
        nvml.xids.append(79)  # the GPU falls off the bus; the training thread is stuck: no more records
        until(lambda: any(a["alert"] == "gpu_fault" for a in alerts(sidecar, "gpu-e2e")), what="gpu_fault")
    finally:
        tm.close()
    (a,) = alerts(sidecar, "gpu-e2e")
    assert (a["alert"], a["state"], a["severity"], a["rank"], a["step"]) == ("gpu_fault", "firing", "critical", 2, 3)
    assert (a["host"], a["gpu_index"], a["pci_bus_id"], a["xids"]) == ("node-b", 3, "00000000:65:00.0", [79])
    assert a["summary"] == ("drain node-b GPU 3 (00000000:65:00.0): XID 79, GPU has fallen off the bus; "
                            "restart the job without it (rank 2, step 3)")
    # the flight recorder kept the readings as they came (a replay of the file raises the same alert)
    lines = [json.loads(line) for line in (tmp_path / "records" / "gpu-e2e.jsonl").read_text().splitlines()]
    readings = [r["gpu_health"] for r in lines if "gpu_health" in r]
    assert all(r["type"] == "heartbeat" for r in lines if "gpu_health" in r) and len(readings) >= 3
    assert readings[-1]["xids"][0]["xid"] == 79 and "xids" not in readings[0]
    replayed = feed([from_obj(r) for r in lines])
    assert [(x["alert"], x["rank"], x["summary"]) for x in replayed] == [("gpu_fault", 2, a["summary"])]
