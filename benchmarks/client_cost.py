"""Client cost per training step: ``Telemetry.record()`` against no monitoring and ``.item()`` every step.

    python benchmarks/client_cost.py [--quick]

Uses the pieces of benchmarks/client_overhead.py (the trainer's own benchmark, which prints more
detail): an MLP training step on the CPU (1 torch thread, a few ms per step) run bare, with
``loss.item()`` + ``grad_norm.item()`` every step, and with ``tm.record(step, loss=<tensor>, ...)``
sending to a real HTTP receiver in another process; runs interleaved, per-step medians. Then
the cost of one ``record()`` call in a tight loop, with floats, with CPU tensors, and on the
deferred path a GPU takes (tensors staged, read once their CUDA event completes; driven here by
a stand-in event, so no device sync is possible by construction). The goal is < 1% of a 50 ms
step; on a GPU the ``.item()`` line would also include a device sync per call, which a CPU cannot
show.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, table  # noqa: E402

STEP_BUDGET_US = 50_000.0  # the reference step: 50 ms


def run(quick: bool = False) -> list[Figure]:
    try:
        import torch

        from benchmarks import client_overhead as co
        from trainer.client import Telemetry
        from trainer.torch_helpers import TorchProbe
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
        modes = list(times)
        for i in range(repeats):
            for mode in modes[i % 3:] + modes[:i % 3]:  # rotate the order
                times[mode] += co.training_loop(mode, steps, tm, hidden, batch)
        tm.flush(30)
        stats = tm.stats()
        tm.close()
    finally:
        receiver.terminate()
        receiver.wait()
    med = {mode: statistics.median(v) * 1e6 for mode, v in times.items()}

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
    detail = {"step_us_bare": med["bare"], "step_us_item": med["item"], "step_us_record": med["record"],
              "steps_per_mode": steps * repeats, "client_stats": stats, "gpu": torch.cuda.is_available()}
    over = med["record"] - med["bare"]
    figures = [
        Figure("client", f"record() per step, MLP step of {med['bare'] / 1e3:.1f} ms (median, vs bare)", over, "us",
               None, "<", detail),
        Figure("client", "record() per step, share of a 50 ms step", 100 * max(over, 0.0) / STEP_BUDGET_US, "%",
               1.0, "<", detail),
        Figure("client", ".item() every step (median, vs bare)", med["item"] - med["bare"], "us", None, "<", detail),
    ]
    for name, seconds in per_call.items():
        figures.append(Figure("client", f"one record() call, {name}" if "item" not in name else f"one call, {name}",
                              seconds * 1e6, "us", None, "<"))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(table(run(args.quick)))


if __name__ == "__main__":
    main()
