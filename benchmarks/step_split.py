"""What issue 22 adds to a training step, and to the client's background thread.

    python benchmarks/step_split.py [--quick]

- ``record()`` as the reference trainer calls it (floats), without and with ``compute_seconds`` and
  ``comm_wait_seconds``: interleaved rounds, CPU time, best round (the rest of the call is unchanged);
- ``StepTimer`` per training step of an MLP (3 layers: 6 parameters) and of a 48-parameter model, after
  its first step (which hooks every parameter to learn which get their gradients last, then keeps 4):
  ``begin()``, a clock read in each hooked parameter's post-accumulate-grad hook, ``end()``;
  timed as the step with the hooks minus the step without them (interleaved, best round);
- one GPU health reading plus its heartbeat, on the background thread every 5 s, through the NVML fake of
  tests/unit/nvml_fake.py (the Python side only: a real driver's calls cost more, not measured here: no GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best_per_call(fns: dict[str, Callable[[], None]], n: int, rounds: int) -> dict[str, float]:
    """CPU microseconds per call of each function, interleaved rounds, best round."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.process_time()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.process_time() - t0) / n * 1e6)
    return best


def record_cost(n: int, rounds: int) -> dict[str, float]:
    from trainhealth.trainer.client import Telemetry

    from tests.unit.trainer_fakes import ENV, FakeSender

    tm = Telemetry(environ=ENV, sink=FakeSender(), probes=[], start_threads=False, capacity=1000)
    step = [0]

    def before() -> None:
        step[0] += 1
        tm.record(step[0], loss=0.5, lr=0.1, step_time_seconds=0.05, data_time_seconds=0.001,
                  batch_size=32, world_size=8)

    def after() -> None:
        step[0] += 1
        tm.record(step[0], loss=0.5, lr=0.1, step_time_seconds=0.05, data_time_seconds=0.001,
                  batch_size=32, world_size=8, compute_seconds=0.04, comm_wait_seconds=0.009)

    out = best_per_call({"record(), as before": before, "record() + compute/comm_wait": after}, n, rounds)
    tm.close(timeout=0.1)
    return out


def timer_cost(n: int, rounds: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    out: dict[str, float] = {}
    for layers in (3, 24):
        timed, bare = one_model(layers, n, rounds)
        out[f"StepTimer per step, {2 * layers} parameters"] = timed - bare
        out[f"  (the step itself, {2 * layers} parameters)"] = bare
    return out


def one_model(layers: int, n: int, rounds: int) -> tuple[float, float]:
    """CPU microseconds of a training step with the timer and without, interleaved, best round."""
    import torch
    from torch import nn
    from trainhealth.trainer.step_timing import StepTimer

    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)])
    x = torch.randn(4, 16)
    timer = StepTimer(clock=time.perf_counter)

    def bare() -> None:
        model(x).sum().backward()

    def timed() -> None:
        timer.begin()
        model(x).sum().backward()
        timer.end()

    best = {"bare": float("inf"), "timed": float("inf")}
    for _ in range(rounds):
        for name, fn in (("bare", bare), ("timed", timed)):
            if name == "timed":
                timer.attach(model)
                timed()  # the first step learns which parameters get their gradients last
            else:
                timer.detach()
            t0 = time.process_time()
            for _ in range(n // 10):
                fn()
            best[name] = min(best[name], (time.process_time() - t0) / (n // 10) * 1e6)
    timer.detach()
    return best["timed"], best["bare"]


def health_cost(n: int, rounds: int) -> dict[str, float]:
    from trainhealth.trainer.nvml import open_device

    from tests.unit.nvml_fake import FakeNvml

    device = open_device("0000:65:00.0", 0, FakeNvml())
    assert device is not None
    fn: Callable[[], Any] = device.health
    return {"GPU health reading (NVML fake), every 5 s": best_per_call({"h": fn}, n // 10, rounds)["h"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    n, rounds = (2000, 5) if quick else (5000, 9)
    figures = {**record_cost(n, rounds), **timer_cost(n, rounds), **health_cost(n, rounds)}
    for name, us in figures.items():
        print(f"{name:50s} {us:8.2f} us")


if __name__ == "__main__":
    main()
