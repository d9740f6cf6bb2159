"""Real training loops for the host-memory end-to-end tests; each prints its records as JSON lines.

    python -m tests.e2e.memory_loops leak --steps 4800
    python -m tests.e2e.memory_loops dataloader --steps 3600

Each loop runs in its own fresh process, so the memory measured is that of a training
process (and its DataLoader workers), not of pytest. Memory is real: PSS of the process
and its children via psutil, as the client measures it. Time is compressed: step k is
stamped ``T0 + k * --seconds-per-step`` while it really takes about a millisecond. The
machine's available memory is the real reading at the start minus this process tree's
growth since then (a real reading at compressed time would mix in whatever else the
shared machine does meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import psutil
import torch
from trainhealth.trainer.host_memory import process_tree_bytes as tree_memory

T0 = 1_700_000_000.0


class Recorder:
    def __init__(self, run: str, seconds_per_step: float) -> None:
        self.run, self.sps = run, seconds_per_step
        self.proc = psutil.Process()
        self.mem0 = tree_memory(self.proc)
        self.avail0 = psutil.virtual_memory().available
        self.emit({"type": "start", "run": run, "rank": 0, "time": T0, "host": "test-host",
                   "pid": os.getpid()})

    def emit(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")

    def sample(self, step: int) -> None:
        mem = tree_memory(self.proc)
        self.emit({"run": self.run, "rank": 0, "time": T0 + step * self.sps, "step": step,
                   "host_mem_bytes": mem, "host_mem_available_bytes": self.avail0 - (mem - self.mem0)})


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def leak(args: argparse.Namespace) -> None:
    """The bug: something keeps a tensor every step (here: ``kept.append``)."""
    model, opt = model_and_optimizer()
    x, y = torch.randn(32, 64), torch.randn(32, 1)
    rec = Recorder("leaky", args.seconds_per_step)
    kept = []
    for step in range(1, args.steps + 1):
        train_step(model, opt, x, y)
        kept.append(torch.ones(args.leak_bytes // 4))  # float32, pages touched
        if step % args.every == 0:
            rec.sample(step)


class Samples(torch.utils.data.Dataset):
    """A dataset held in the parent, shared with the forked workers (copy-on-write).

    Each worker caches ``cache_bytes`` per item it serves (a decoded-sample cache, a common
    pattern): worker memory grows through the epoch and is freed when the workers exit at
    its end. That is the healthy sawtooth of DataLoader workers, not a leak.
    """

    def __init__(self, n: int, cache_bytes: int) -> None:
        self.x = torch.randn(n, 64)
        self.y = torch.randn(n, 1)
        self.cache_bytes = cache_bytes
        self.cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache_bytes and torch.utils.data.get_worker_info() is not None:
            self.cache[i] = torch.ones(self.cache_bytes // 4)
        return self.x[i], self.y[i]


def dataloader(args: argparse.Namespace) -> None:
    """No leak; workers restart every epoch (persistent_workers=False): a sawtooth."""
    data = torch.utils.data.DataLoader(Samples(32 * args.epoch_steps, args.cache_bytes), batch_size=32,
                                       shuffle=True, num_workers=args.workers, persistent_workers=False)
    model, opt = model_and_optimizer()
    rec = Recorder("healthy", args.seconds_per_step)
    step = 0
    while step < args.steps:
        for x, y in data:
            train_step(model, opt, x, y)
            step += 1
            if step % args.every == 0:
                rec.sample(step)
            if step >= args.steps:
                break


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("loop", choices=["leak", "dataloader"])
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seconds-per-step", type=float, default=1.0)
    ap.add_argument("--every", type=int, default=10, help="sample memory every N steps")
    ap.add_argument("--leak-bytes", type=int, default=256 * 1024)
    ap.add_argument("--epoch-steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-bytes", type=int, default=0, help="per item, kept by the worker until it exits")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"leak": leak, "dataloader": dataloader}[args.loop](args)


if __name__ == "__main__":
    main()
