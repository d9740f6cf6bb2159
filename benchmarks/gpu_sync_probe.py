"""Which call syncs the host with the GPU: each piece of a training step, alone, under
``torch.cuda.set_sync_debug_mode("error")`` (prints JSON; needs a CUDA GPU).

    python benchmarks/gpu_sync_probe.py
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import torch


def probe(name: str, fn: Callable[[], Any], out: dict[str, Any]) -> Any:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value = fn()
        out[name] = "no sync"
        return value
    except RuntimeError as exc:
        out[name] = f"SYNC: {str(exc).splitlines()[0][:200]}"
        return None
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    from trainhealth import Telemetry
    from trainhealth.trainer.torch_helpers import TorchProbe, grad_norm

    out: dict[str, Any] = {"torch": torch.__version__}
    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).to(dev)
    x, y = torch.randn(64, 256, device=dev), torch.randn(64, 1, device=dev)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    probe("clone_and_set_nan", lambda: x.clone().index_fill_(1, torch.tensor([0], device=dev), float("nan")), out)
    probe("get_total_norm", lambda: torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], 2.0), out)
    gn = probe("grad_norm_helper", lambda: grad_norm(model), out)
    probe("sgd_step", lambda: torch.optim.SGD(model.parameters(), lr=1e-4).step(), out)
    tp = TorchProbe()
    tp.bind()
    probe("stage_one", lambda: tp.stage({"loss": loss.detach()}), out)
    probe("stage_two", lambda: tp.stage({"loss": loss.detach(), "grad_norm": gn}), out)
    probe("pinned_empty", lambda: torch.empty(2, dtype=torch.float32, pin_memory=True), out)
    buf = torch.empty(2, dtype=torch.float32, pin_memory=True)
    probe("copy_to_pinned_view", lambda: buf[0].copy_(loss.detach().float().reshape(()), non_blocking=True), out)
    probe("event_record", lambda: torch.cuda.Event().record(), out)
    tm = Telemetry(run="probe", environ={}, start_threads=False, capacity=100_000)
    probe("record_cuda", lambda: tm.record(1, loss=loss.detach(), grad_norm=gn, lr=0.1), out)
    probe("record_floats", lambda: tm.record(2, loss=0.5, grad_norm=1.0, lr=0.1), out)
    for label, kw in (("record_cuda_us", {"loss": loss.detach(), "grad_norm": gn, "lr": 0.1}),
                      ("record_floats_us", {"loss": 0.5, "grad_norm": 1.0, "lr": 0.1})):
        for i in range(200):
            tm.record(i, **kw)
        t = time.perf_counter()
        for i in range(3000):
            tm.record(i, **kw)
        out[label] = round((time.perf_counter() - t) / 3000 * 1e6, 2)
    t = time.perf_counter()
    for _ in range(3000):
        tp.stage({"loss": loss.detach(), "grad_norm": gn})
    out["stage_two_us"] = round((time.perf_counter() - t) / 3000 * 1e6, 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
