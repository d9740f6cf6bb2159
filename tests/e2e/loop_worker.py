"""A user's DDP loop with the two lines (``Telemetry(...)``, ``tm.record(...)``) and no ``tm.end()``, for the
end-to-end tests of how ranks end: a clean end, a crash, a NaN with ``stop_on``. Run under torchrun (gloo).

Each rank writes ``OUT/rank{R}.json``: the step it stopped after (or null), the first step at which it knew
of the stop, and its last step. ``--late-rank K --late-url URL``: rank K talks to the sidecar through URL
(a proxy that delays every answer), so it hears of alerts later than the others. ``--miss-rank K``: rank K
hears the first stop step only after its loop has checked it (tests/late_hearing.py): a partial miss.
``--hold-rank K --hold-step N``: rank K, after recording step N, writes ``OUT/held`` and blocks for good in a
C call that signals do not end (as a rank waiting in an NCCL collective does), until it is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from trainhealth import Telemetry


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--step-sleep", type=float, default=0.05)
    ap.add_argument("--stop-on", default="")
    ap.add_argument("--nan-rank", type=int, default=-1)
    ap.add_argument("--nan-step", type=int, default=0)
    ap.add_argument("--crash-rank", type=int, default=-1)
    ap.add_argument("--crash-step", type=int, default=0)
    ap.add_argument("--late-rank", type=int, default=-1)
    ap.add_argument("--late-url", default="")
    ap.add_argument("--miss-rank", type=int, default=-1)
    ap.add_argument("--lr-step", type=int, default=0)  # from this step on the LR is --lr-factor times higher
    ap.add_argument("--lr-factor", type=float, default=1.0)
    ap.add_argument("--hold-rank", type=int, default=-1)
    ap.add_argument("--hold-step", type=int, default=0)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    url = args.late_url if rank == args.late_rank else None
    stop_on = {name for name in args.stop_on.split(",") if name}
    tm = Telemetry(url=url, stop_on=stop_on)  # the first line (run, rank, world size from torchrun)
    if rank == args.miss_rank:
        from tests.late_hearing import hold_the_first_stop_until_checked

        hold_the_first_stop_until_checked(tm)

    stopped_at = heard_at = heard_time = None
    step = 0
    lr = 0.01
    for step in range(1, args.steps + 1):
        if step == args.lr_step:  # a resume or a schedule bug that raises the LR
            lr *= args.lr_factor
            for group in opt.param_groups:
                group["lr"] = lr
        x, y = torch.randn(4, 8), torch.randn(4, 1)
        if rank == args.nan_rank and step == args.nan_step:
            x[0, 0] = float("nan")
        if rank == args.crash_rank and step == args.crash_step:
            raise RuntimeError("CUDA error: unspecified launch failure")
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()  # DDP all-reduces the gradients: a NaN on one rank reaches every rank's grad norm
        grad_norm = tm.grad_norm(model)
        opt.step()
        time.sleep(args.step_sleep)
        tm.record(step, loss=loss.detach(), grad_norm=grad_norm, lr=lr)  # the second line
        if heard_at is None and tm.stop_reason is not None:
            heard_at, heard_time = step, time.time()
        if rank == args.hold_rank and step == args.hold_step:
            hold_in_c(os.path.join(args.out, "held"))
        if tm.should_stop(step):
            stopped_at = step
            break
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "stopped_at": stopped_at, "heard_at": heard_at, "last_step": step,
                   "heard_time": heard_time, "stop_reason": tm.stop_reason}, f)
    if stopped_at is None:
        dist.destroy_process_group()
        return 0  # the end is sent at exit
    # the documented reaction (docs/trainer.md): no checkpoint of these weights, the end delivered before
    # torchrun stops the other ranks (it does once one exits non-zero), then exit non-zero
    tm.end()
    tm.close()
    return 3


def hold_in_c(marker: str) -> None:
    """Block for good in a second lock of a default pthread mutex: the futex wait resumes after a signal handler,
    so Python's own handlers never run here (the client's SIGTERM report must come from its thread)."""
    import ctypes

    mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER
    libc = ctypes.CDLL(None)
    libc.pthread_mutex_lock(mutex)
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    libc.pthread_mutex_lock(mutex)


if __name__ == "__main__":
    sys.exit(main())
