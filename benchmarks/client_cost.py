"""Client cost per training step: ``Telemetry.record()`` against no monitoring and ``.item()`` every step.

    python benchmarks/client_cost.py [--quick]

Uses the pieces of benchmarks/client_overhead.py (the trainer's own benchmark, which prints more
detail): an MLP training step on the CPU (1 torch thread, a few ms per step) run bare, with
``loss.item()`` + ``grad_norm.item()`` every step, and with ``tm.record(step, loss=<tensor>, ...)``
sending to a real HTTP receiver in another process; runs interleaved, per-step medians. Then the
cost of one ``record()`` call in a tight loop, with floats, with CPU tensors, and on the
deferred path a GPU takes (tensors staged, read once their CUDA event completes; driven here by
a stand-in event, so no device sync is possible by construction); the all-in CPU per record (the
call plus the background thread encoding and sending it, to a real receiver, timed until
flushed); and the background threads' CPU per second with no records (probes, heartbeats).
The goal, < 1% of a 50 ms step, is judged on: all-in per record + the staged-tensor call + one
twentieth of the idle background cost per second (the call is counted twice: conservative), all
of it CPU time of the whole process, background threads included (on a shared machine the
wall-clock step medians move by more than the client costs; they are printed for reference).
On a GPU the ``.item()`` line would also include a device sync per call, which a CPU cannot show.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, table  # noqa: E402

STEP_BUDGET_US = 50_000.0  # the reference step: 50 ms


def background_costs(url: str, telemetry: Any, torch: Any, n: int, idle_seconds: float) -> tuple[float, float]:
    """CPU seconds of the whole process per record (the call, then encoding and sending by the
    background thread: timed until flushed) and per second with no records (probes, heartbeats)."""
    tm = telemetry(url=url, run="bench-all-in", environ={}, capacity=n * 2)
    time.sleep(0.5)  # threads started, first probe done
    c0 = time.process_time()
    for i in range(n):
        tm.record(i, loss=0.5, lr=0.1, grad_norm=2.0, step_time_seconds=0.05, data_time_seconds=0.01,
                  batch_size=32, world_size=8)
    tm.flush(60)
    all_in = (time.process_time() - c0) / n
    c0 = time.process_time()
    time.sleep(idle_seconds)
    idle = (time.process_time() - c0) / idle_seconds
    tm.close()
    return all_in, idle


def run(quick: bool = False) -> list[Figure]:
    try:
        import torch
        from trainhealth.trainer.client import Telemetry
        from trainhealth.trainer.torch_helpers import TorchProbe

        from benchmarks import client_overhead as co
    except ImportError as exc:  # the trainer client not there (an older checkout)
        return [Figure("client", "record() per step", None, "us", None, "<", {"skipped": str(exc)})]
    torch.set_num_threads(1)
    steps, repeats = (60, 3) if quick else (150, 7)
    receiver = subprocess.Popen([sys.executable, "-c", co.RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        url = f"http://127.0.0.1:{int(receiver.stdout.readline())}"
        tm = Telemetry(url=url, run="bench", environ={}, capacity=1_000_000)
        hidden, batch = 1024, 256
        co.training_loop("bare", 20, None, hidden, batch)  # warm up
        times: dict[str, list[float]] = {"bare": [], "item": [], "record": []}
        cpu: dict[str, list[float]] = {mode: [] for mode in times}
        modes = list(times)
        for i in range(repeats):
            for mode in modes[i % 3:] + modes[:i % 3]:  # rotate the order
                c0 = time.process_time()  # the whole process: the client's background threads too
                times[mode] += co.training_loop(mode, steps, tm, hidden, batch)
                cpu[mode].append((time.process_time() - c0) / steps)
        tm.flush(30)
        stats = tm.stats()
        tm.close()
        all_in, idle = background_costs(url, Telemetry, torch, 5_000 if quick else 20_000, 2.0 if quick else 5.0)
    finally:
        receiver.terminate()
        receiver.wait()
    med = {mode: statistics.median(v) * 1e6 for mode, v in times.items()}
    med_cpu = {mode: statistics.median(v) * 1e6 for mode, v in cpu.items()}

    n = 5_000 if quick else 20_000
    loss, gn = torch.tensor(0.5), torch.tensor(2.0)
    floats = Telemetry(run="bench", environ={}, probes=[], start_threads=False, capacity=n * 4)
    cpu_t = Telemetry(run="bench", environ={}, probes=[TorchProbe()], start_threads=False, capacity=n * 4)
    deferred = Telemetry(run="bench", environ={}, probes=[TorchProbe(cuda=co.FakeCuda(), defer_all=True)],
                         start_threads=False, capacity=n * 4)
    per_call = {
        "floats": co.per_call(lambda i: floats.record(i, loss=0.5, lr=0.1, grad_norm=2.0, step_time_seconds=0.1,
                                                      data_time_seconds=0.01, batch_size=32, world_size=8), n),
        "cpu tensors": co.per_call(lambda i: cpu_t.record(i, loss=loss, lr=0.1, grad_norm=gn), n),
        "staged tensors (GPU path)": co.per_call(lambda i: deferred.record(i, loss=loss, lr=0.1, grad_norm=gn), n),
        ".item() x2 (CPU)": co.per_call(lambda i: loss.item() + gn.item(), n),
    }
    per_call["staged tensors, slots reused (GPU path)"] = staged_steady(Telemetry, TorchProbe, co.FakeCuda,
                                                                          loss, gn, n)
    detail = {"wall_step_us": med, "cpu_step_us": med_cpu, "steps_per_mode": steps * repeats,
              "client_stats": stats, "gpu": torch.cuda.is_available()}
    per_step = all_in * 1e6 + per_call["staged tensors (GPU path)"] * 1e6 + idle * 1e6 * STEP_BUDGET_US / 1e6
    model = {"record_all_in_us": all_in * 1e6, "staged_call_us": per_call["staged tensors (GPU path)"] * 1e6,
             "background_idle_us_per_s": idle * 1e6}
    figures = [
        Figure("client", "client CPU per 50 ms step (record + send + background share)", per_step, "us", None,
               "<", model),
        Figure("client", "  as a share of the 50 ms step", 100 * per_step / STEP_BUDGET_US, "%", 1.0, "<", model),
        Figure("client", "  record() all-in: call + encode + send, per record", all_in * 1e6, "us", None, "<"),
        Figure("client", "  background threads with no records (probes, heartbeats)", idle * 1e6, "us/s", None,
               "<"),
        Figure("client", f"MLP step {med['bare'] / 1e3:.1f} ms: with record(), wall (median, vs bare)",
               med["record"] - med["bare"], "us", None, "<", detail),
        Figure("client", f"MLP step {med['bare'] / 1e3:.1f} ms: with .item() x2, wall (median, vs bare)",
               med["item"] - med["bare"], "us", None, "<", detail),
    ]
    for name, seconds in per_call.items():
        goal = 5.0 if name.startswith("staged tensors, slots") else None
        figures.append(Figure("client", f"one record() call, {name}" if "item" not in name else f"one call, {name}",
                              seconds * 1e6, "us", goal, "<",
                              {"per": "CPU time; on a GPU the copies and the event record cost more: "
                                      "benchmarks/client_gpu.py"} if goal else {}))
    return figures


def staged_steady(telemetry: Any, probe: Any, fake_cuda: Any, loss: Any, gn: Any, n: int) -> float:
    """CPU seconds of one ``record()`` with two staged tensors once the pool of pinned slots is warm: the
    background thread's reads (``poll_staged``, which gives the slots back) run between batches of calls,
    outside the timed part, as they do on their own thread (the stand-in event is always done)."""

    tm = telemetry(run="bench", environ={}, probes=[probe(cuda=fake_cuda(), defer_all=True)],
                   start_threads=False, capacity=n * 4)
    spent, done = 0.0, 0
    while done < n:
        t0 = time.process_time()
        for i in range(done, done + 16):
            tm.record(i, loss=loss, lr=0.1, grad_norm=gn)
        spent += time.process_time() - t0
        done += 16
        tm._outbox.poll_staged()  # the background thread's read: the slots go back to the pool
    return spent / done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(table(run(args.quick)))


if __name__ == "__main__":
    main()
