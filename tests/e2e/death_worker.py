"""A rank that trains with the two lines (``Telemetry()``, ``tm.record``) and then dies the way it is told,
for tests/e2e/test_deaths.py. No torch: the deaths are the process's, not the model's.

``--die``: ``abort`` (writes the text a PyTorch rank's C++ runtime prints when the NCCL watchdog gives up,
then ``abort()``), ``segv`` (reads address 0), ``exit13`` (``os._exit(13)``: no exception, no atexit),
``oom`` (allocates until the kernel's OOM killer kills it: run it in a small memory cgroup), ``wait``
(trains on until killed from outside), ``none`` (ends cleanly after ``--steps``). Writes ``OUT/pid`` at
start and ``OUT/dying`` (the unix time) just before it dies by its own hand.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

from trainhealth import Telemetry

WATCHDOG = """[rank1]:[E ProcessGroupNCCL.cpp:563] [Rank 1] Watchdog caught collective operation timeout: \
WorkNCCL(SeqNum=1234, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600045 milliseconds \
before timing out.
terminate called after throwing an instance of 'c10::DistBackendError'
  what():  [PG 0 Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1234, OpType=ALLREDUCE, \
NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600045 milliseconds before timing out.
Exception raised from checkTimeout at ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:565 (most recent call \
first):
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--die", default="none", choices=["abort", "segv", "exit13", "oom", "wait", "none"])
    ap.add_argument("--after", type=int, default=5, help="die after this many steps")
    ap.add_argument("--steps", type=int, default=10**9)
    ap.add_argument("--step-sleep", type=float, default=0.05)
    ap.add_argument("--loss", type=float, default=1.0, help="the loss curve's scale (two jobs, two curves)")
    args = ap.parse_args()
    with open(os.path.join(args.out, "pid"), "w") as f:
        f.write(str(os.getpid()))
    tm = Telemetry()
    hoard = []
    for step in range(1, args.steps + 1):
        time.sleep(args.step_sleep)
        tm.record(step, loss=args.loss * (1.0 + 1.0 / step), lr=0.01)
        if step == args.after and args.die not in ("wait", "none"):
            tm.flush(5.0)  # what it measured is in: the death is the only thing left to learn
            with open(os.path.join(args.out, "dying"), "w") as f:
                f.write(repr(time.time()))
            if args.die == "abort":
                sys.stderr.write(WATCHDOG)
                sys.stderr.flush()
                os.abort()
            elif args.die == "segv":
                ctypes.string_at(0)
            elif args.die == "exit13":
                os._exit(13)
            elif args.die == "oom":
                while True:
                    hoard.append(b"x" * (8 << 20))  # written pages: charged to the cgroup
    return 0


if __name__ == "__main__":
    sys.exit(main())
