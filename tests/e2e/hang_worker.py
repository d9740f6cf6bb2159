"""One DDP rank for test_real_hang.py (run under torchrun, gloo, CPU).

Trains a tiny model with an all-reduce every step and sends telemetry to the
sidecar at TRAINHEALTH_URL the way the client does: samples after each step,
and heartbeats from a background thread that keeps beating while the training
thread is blocked. Rank STALL_RANK stalls at step STALL_AT after its optimizer
step and before it reports that step (a rank-local save or logging call that
hangs); the other rank reports the step and blocks in the next all-reduce.

    TRAINHEALTH_URL=http://127.0.0.1:9464 STALL_RANK=1 STALL_AT=30 \\
        python -m torch.distributed.run --standalone --nproc_per_node 2 tests/e2e/hang_worker.py
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

URL = os.environ["TRAINHEALTH_URL"].rstrip("/") + "/v1/ingest"
RUN = os.environ.get("TRAINHEALTH_RUN") or os.environ.get("TORCHELASTIC_RUN_ID", "hang")
STALL_RANK = int(os.environ.get("STALL_RANK", "1"))
STALL_AT = int(os.environ.get("STALL_AT", "30"))
HEARTBEAT_SECONDS = 0.5
FLUSH_SECONDS = 0.2


class Telemetry(threading.Thread):
    """Buffers records and posts them every FLUSH_SECONDS; adds a heartbeat every HEARTBEAT_SECONDS."""

    def __init__(self, rank: int) -> None:
        super().__init__(daemon=True)
        self.rank = rank
        self.step = 0
        self.buffer: list[dict] = []
        self.lock = threading.Lock()

    def record(self, **fields: object) -> None:
        rec = {"run": RUN, "rank": self.rank, "time": time.time(), **fields}
        with self.lock:
            self.buffer.append(rec)

    def run(self) -> None:
        next_beat = 0.0
        while True:
            now = time.time()
            if now >= next_beat:
                self.record(type="heartbeat", step=self.step)
                next_beat = now + HEARTBEAT_SECONDS
            with self.lock:
                batch, self.buffer = self.buffer, []
            if batch:
                try:
                    req = urllib.request.Request(URL, json.dumps(batch).encode(),
                                                 {"Content-Type": "application/json"})
                    urllib.request.urlopen(req, timeout=5).read()
                except OSError as exc:  # never break training for telemetry
                    print(f"rank {self.rank}: telemetry send failed: {exc}", flush=True)
            time.sleep(FLUSH_SECONDS)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pid_dir = os.environ.get("PID_DIR")
    if pid_dir:  # torchrun puts each rank in its own session: the test kills ranks by these pids
        with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as fh:
            fh.write(str(os.getpid()))
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry = Telemetry(rank)
    telemetry.record(type="start", world_size=world, batch_size=8, lr=0.01, pid=os.getpid())
    telemetry.start()
    step = 0
    while True:
        t0 = time.time()
        x = torch.randn(8, 32)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()  # DDP all-reduces the gradients here: blocks until every rank arrives
        opt.step()
        step += 1
        if rank == STALL_RANK and step == STALL_AT:
            print(f"rank {rank}: stalling after step {step}", flush=True)
            time.sleep(3600)
        telemetry.step = step
        telemetry.record(step=step, loss=loss.item(), step_time_seconds=time.time() - t0,
                         data_time_seconds=0.0)
        time.sleep(0.02)


if __name__ == "__main__":
    main()
