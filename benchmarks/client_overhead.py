"""What the telemetry client costs the training thread, on the CPU.

    python benchmarks/client_overhead.py [--steps 400] [--repeats 9]

Part 1: an MLP training step (the reference trainer's model; a tiny one, ~0.3 ms/step, the worst case
for per-step overhead, and a wider one, a few ms/step) run as
  - bare: no monitoring
  - item: ``loss.item()`` and ``grad_norm.item()`` every step (the naive way; on a GPU each is a
          device sync, which this CPU figure cannot show)
  - record: ``tm.record(step, loss=<tensor>, grad_norm=<tensor>, lr=..., step/data time, batch, world)``
          with the background thread batching to a real HTTP receiver in another process, and host
          PSS sampled every 5 s (the default probes)
Part 2: the cost of one call, in a tight loop: ``record()`` with floats, with CPU tensors, and with the
deferred (GPU) path driven on CPU tensors with a fake event; the background thread's PSS sample.
Runs are interleaved; per-step medians resist other load on a shared machine. Prints figures and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainhealth.trainer.client import Telemetry  # noqa: E402
from trainhealth.trainer.host_memory import HostMemory  # noqa: E402
from trainhealth.trainer.torch_helpers import TorchProbe  # noqa: E402
from trainhealth.trainer.train import Config, make_model  # noqa: E402

RECEIVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *a): pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


class FakeEvent:  # no GPU here: stands in for torch.cuda.Event in the deferred path
    def record(self):
        pass

    def query(self):
        return True


class FakeCuda:
    Event = FakeEvent

    def is_available(self):
        return False


def training_loop(mode: str, steps: int, tm: Telemetry | None, hidden: int, batch: int) -> list[float]:
    """Seconds of each step (monitoring included)."""
    torch.manual_seed(0)
    cfg = Config(batch_size=batch, hidden=hidden, input_dim=hidden // 2)
    model = make_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.input_dim, generator=gen) * cfg.input_scale
    y = torch.randn(batch, 1, generator=gen)
    sink = 0.0
    durations = []
    for step in range(1, steps + 1):
        ts = time.perf_counter()
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        opt.step()
        if mode == "item":
            sink += loss.item() + grad_norm.item()
        elif mode == "record":
            assert tm is not None
            tm.record(step, loss=loss.detach(), lr=0.001, grad_norm=grad_norm,
                      step_time_seconds=time.perf_counter() - ts, data_time_seconds=0.0, batch_size=batch,
                      world_size=1)
        durations.append(time.perf_counter() - ts)
    return durations


def per_call(fn, n: int) -> float:
    """CPU seconds per call (process_time: on a shared machine wall time counts other work too)."""
    t0 = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - t0) / n


def part1(url: str, steps: int, repeats: int, hidden: int, batch: int) -> None:
    tm = Telemetry(url=url, run="bench", environ={}, capacity=1_000_000)
    training_loop("bare", 50, None, hidden, batch)  # warm up
    times: dict[str, list[float]] = {"bare": [], "item": [], "record": []}
    modes = list(times)
    for i in range(repeats):
        for mode in modes[i % 3:] + modes[:i % 3]:  # rotate the order
            times[mode] += training_loop(mode, steps, tm, hidden, batch)
    tm.flush(30)
    stats = tm.stats()
    tm.close()
    med = {mode: statistics.median(v) for mode, v in times.items()}
    mean = {mode: statistics.fmean(v) for mode, v in times.items()}
    print(f"  MLP hidden {hidden}, batch {batch}: {repeats} interleaved runs of {steps} steps per mode")
    for mode in ("bare", "item", "record"):
        print(f"    {mode:7s} median {med[mode] * 1e6:8.1f} us/step {med[mode] / med['bare']:.3f}x bare "
              f"{(med[mode] - med['bare']) * 1e6:+6.1f} us | mean {mean[mode] * 1e6:8.1f} us/step "
              f"{mean[mode] / mean['bare']:.3f}x bare {(mean[mode] - mean['bare']) * 1e6:+6.1f} us")
    print(f"    record vs item: median {med['record'] / med['item']:.3f}x, "
          f"mean {mean['record'] / mean['item']:.3f}x; client {stats}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print("Part 1: a training step on the CPU, 1 torch thread; per-step median (robust to other load on a "
          "shared machine) and mean (includes the background thread's share of the GIL)")
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(receiver.stdout.readline())}"
        part1(url, args.steps, args.repeats, hidden=64, batch=32)  # ~0.3 ms: thousands of records/s
        part1(url, args.steps // 4, args.repeats, hidden=1024, batch=256)  # a few ms per step
    finally:
        receiver.terminate()
        receiver.wait()

    n = 20_000
    quiet = Telemetry(run="bench", environ={}, probes=[], start_threads=False, capacity=n * 4)
    cpu_probe = TorchProbe()
    quiet_t = Telemetry(run="bench", environ={}, probes=[cpu_probe], start_threads=False, capacity=n * 4)
    deferred = Telemetry(run="bench", environ={}, probes=[TorchProbe(cuda=FakeCuda(), defer_all=True)],
                         start_threads=False, capacity=n * 4)
    loss, gn = torch.tensor(0.5), torch.tensor(2.0)

    def floats(i):
        quiet.record(i, loss=0.5, lr=0.1, grad_norm=2.0, step_time_seconds=0.1, data_time_seconds=0.01,
                     batch_size=32, world_size=8)

    rows = [
        ("record(), 3 floats + 4 fields", per_call(floats, n)),
        ("record(), 2 CPU tensors read at once",
         per_call(lambda i: quiet_t.record(i, loss=loss, lr=0.1, grad_norm=gn), n)),
        ("record(), 2 tensors staged (deferred path)",
         per_call(lambda i: deferred.record(i, loss=loss, lr=0.1, grad_norm=gn), n)),
        ("loss.item() + grad_norm.item() (CPU)", per_call(lambda i: loss.item() + gn.item(), n)),
    ]
    host = HostMemory(interval=0.0)
    rows.append(("background: host PSS sample (this process)", per_call(lambda i: host.sample(), 50)))
    print("Part 2: per call")
    for name, sec in rows:
        print(f"  {name:45s} {sec * 1e6:8.2f} us")


if __name__ == "__main__":
    main()
