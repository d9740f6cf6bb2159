"""The client on a real GPU: no host sync on the training thread, and a NaN that is still on the device sent at once.

    python benchmarks/client_gpu.py [--steps 400]        # needs torch with CUDA; prints JSON

Runs without the trainhealth install (the package is mapped from this checkout), so it works on a bare
GPU machine. A receiver thread (http.server on 127.0.0.1) notes when each record arrives. The loop
trains an MLP on the GPU with ``torch.cuda.set_sync_debug_mode("error")`` on: any CPU-GPU sync in
``record()`` (CUDA tensors for loss and grad norm, a GradScaler-free loop) or in ``tm.grad_norm(model)``
raises. Every 40 steps one input holds a NaN; measured: ``record()`` of that step -> the record at the
receiver (it includes the device finishing the step: the host runs ahead of the GPU), and -> the copy
event done as the client's thread sees it. Also ``record()`` per call with CUDA tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def map_package() -> None:
    """``trainhealth.trainer`` from this checkout's folders, without installing anything."""
    if "trainhealth" in sys.modules:
        return
    try:
        import trainhealth.trainer.client  # noqa: F401 - installed
        return
    except ImportError:
        pass
    pkg = types.ModuleType("trainhealth")
    pkg.__path__ = [str(ROOT / "monitor")]
    sub = types.ModuleType("trainhealth.trainer")
    sub.__path__ = [str(ROOT / "trainer")]
    sys.modules["trainhealth"], sys.modules["trainhealth.trainer"] = pkg, sub


def receiver() -> tuple[str, dict[int, float], ThreadingHTTPServer]:
    arrivals: dict[int, float] = {}

    class Hook(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            now = time.monotonic()
            for rec in json.loads(body):
                loss = rec.get("loss")
                if isinstance(loss, float) and math.isnan(loss):
                    arrivals.setdefault(rec["step"], now)
            reply = b'{"accepted": 1, "rejected": 0, "alerts": 0}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def do_GET(self) -> None:  # noqa: N802 - the long poll: nothing to say
            time.sleep(1.0)
            reply = b'{"version": 0, "stops": {}, "alerts": []}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", arrivals, server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        print(json.dumps(out))
        return
    out["device"] = torch.cuda.get_device_name(0)
    map_package()
    from trainhealth.trainer.client import Telemetry

    url, arrivals, server = receiver()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    tm = Telemetry(url=url, run="gpu", environ={}, stop_on={"nan_divergence"})
    x_all = torch.randn(64, 4096, device=dev)
    nan_at_0 = torch.zeros_like(x_all)
    nan_at_0[0, 0] = float("nan")  # made before the sync check: setting one element from Python syncs
    y = torch.randn(64, 1, device=dev)
    for _ in range(5):  # warm up (kernels, allocator, the first pinned blocks)
        loss = torch.nn.functional.mse_loss(model(x_all), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    recorded: dict[int, float] = {}
    done_seen: dict[int, float] = {}
    torch.cuda.set_sync_debug_mode("error")  # any sync from here on raises
    syncs = None
    try:
        for step in range(1, args.steps + 1):
            x = x_all
            if step % 40 == 0:
                x = x_all + nan_at_0  # one NaN input, on the device
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            grad_norm = tm.grad_norm(model)
            if step % 40:  # the injected step is skipped, as a GradScaler skips an overflow: weights stay finite
                opt.step()
            t0 = time.monotonic()
            tm.record(step, loss=loss.detach(), grad_norm=grad_norm, lr=1e-4)
            if step % 40 == 0:
                recorded[step] = t0
                marker = torch.cuda.Event()
                marker.record()
                done_seen[step] = 0.0
                threading.Thread(target=_note_done, args=(marker, step, done_seen), daemon=True).start()
    except RuntimeError as exc:
        syncs = str(exc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    out["sync_in_record_or_grad_norm"] = syncs
    # record() per call with CUDA tensors (host time; no sync)
    loss_t, gn_t = torch.tensor(0.5, device=dev), torch.tensor(2.0, device=dev)
    probe = Telemetry(run="gpu-cost", environ={}, start_threads=False, capacity=100_000)
    n = 5000
    for i in range(200):
        probe.record(i, loss=loss_t, grad_norm=gn_t, lr=0.1)
    t = time.perf_counter()
    for i in range(n):
        probe.record(i, loss=loss_t, grad_norm=gn_t, lr=0.1)
    out["record_cuda_tensors_us"] = (time.perf_counter() - t) / n * 1e6
    floats = Telemetry(run="gpu-floats", environ={}, probes=[], start_threads=False, capacity=100_000)
    t = time.perf_counter()
    for i in range(n):
        floats.record(i, loss=0.5, lr=0.1, grad_norm=2.0, step_time_seconds=0.1, data_time_seconds=0.01,
                      batch_size=32, world_size=8)
    out["record_floats_us"] = (time.perf_counter() - t) / n * 1e6
    deadline = time.monotonic() + 10
    while len(arrivals) < len(recorded) and time.monotonic() < deadline:
        time.sleep(0.01)
    lat = [(arrivals[s] - recorded[s]) * 1e3 for s in recorded if s in arrivals]
    after_gpu = [(arrivals[s] - done_seen[s]) * 1e3 for s in recorded if s in arrivals and done_seen.get(s)]
    out["nan_trials"] = len(recorded)
    out["nan_arrived"] = len(lat)
    if lat:
        out["nan_record_to_arrival_ms"] = {"p50": statistics.median(lat), "max": max(lat)}
    if after_gpu:
        out["nan_gpu_done_to_arrival_ms"] = {"p50": statistics.median(after_gpu), "max": max(after_gpu)}
    tm.close(timeout=2)
    server.shutdown()
    print(json.dumps(out, indent=1))


def _note_done(event: Any, step: int, seen: dict[int, float]) -> None:
    while not event.query():
        time.sleep(0.0002)
    seen[step] = time.monotonic()


if __name__ == "__main__":
    main()
