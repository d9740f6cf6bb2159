"""A small diverging run for the page and report tests: the seed's failure (an LR tuned for 8x the batch),
a loss that spikes and turns NaN on rank 1 first, GPU and host memory, and a hostile host name."""

from __future__ import annotations

import json
import math
from typing import Any

RUN = "diverge-8x"
HOSTILE = "<script>document.title='pwned'</script>&"


def diverging_run(ranks: int = 2, steps: int = 200, nan_step: int = 150, t0: float = 1_790_000_000.0,
                  run: str = RUN, step_seconds: float = 0.5) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in range(ranks):
        out.append({"type": "start", "run": run, "rank": r, "time": t0 + 0.01 * r, "world_size": ranks,
                    "batch_size": 2, "lr": 0.02, "reference_lr": 0.02, "reference_batch_size": 16,
                    "warmup_steps": 0, "optimizer": "sgd", "host": HOSTILE if r == 1 else "node-a",
                    "config": {"model": "mlp", "note": "</script><b>not bold</b>"}})
    for step in range(1, steps + 1):
        for r in range(ranks):
            loss: float = 2.5 * math.exp(-step / 80) + 0.3 + 0.01 * ((step * 7 + r) % 5)
            if step >= nan_step - 5:
                loss *= 10 ** (step - nan_step + 6)
            if step > nan_step or (step == nan_step and r == 1):
                loss = math.nan
            out.append({"run": run, "rank": r, "time": t0 + 5 + step * step_seconds + 0.001 * r, "step": step,
                        "loss": loss, "lr": 0.02,
                        "grad_norm": 1.0 + 0.3 * math.exp(-step / 60) + 0.01 * ((step * 7 + r) % 5),
                        "gpu_mem_peak_bytes": 6e9 + 1e6 * step, "gpu_mem_total_bytes": 8e9,
                        "host_mem_bytes": 3e9 + 2e5 * step, "step_time_seconds": step_seconds,
                        "batch_size": 2, "world_size": ranks})
    return out


def lines(records: list[dict[str, Any]]) -> str:
    """As the flight recorder writes them: Python's json, NaN as the bare token."""
    return "".join(json.dumps(r) + "\n" for r in records)


def _start(run: str, rank: int, world: int, t0: float, **extra: Any) -> dict[str, Any]:
    return {"type": "start", "run": run, "rank": rank, "time": t0 + 0.01 * rank, "world_size": world,
            "batch_size": 8, "lr": 3e-4, "warmup_steps": 0, "optimizer": "adamw", "host": f"node-{rank // 2}",
            **extra}


def _sample(run: str, rank: int, t: float, step: int, **values: Any) -> dict[str, Any]:
    loss = 2.5 * math.exp(-step / 60) + 0.4 + 0.02 * ((step * 7 + rank) % 5)
    return {"run": run, "rank": rank, "time": t, "step": step, "loss": loss, "lr": 3e-4,
            "grad_norm": 0.6 + 0.4 * math.exp(-step / 50) + 0.01 * ((step * 7 + rank) % 3),
            "gpu_mem_peak_bytes": 30e9 + 1e6 * (step % 9),
            "gpu_mem_total_bytes": 80e9, "host_mem_bytes": 6e9 + 1e6 * ((step * 3 + rank) % 7),
            "step_time_seconds": 1.0, "batch_size": 8, "world_size": 2, **values}


def healthy_run(steps: int = 240, t0: float = 1_790_000_000.0, run: str = "healthy") -> list[dict[str, Any]]:
    """Two ranks that train well: the loss falls, memory holds; each sends its end at the last step."""
    out = [_start(run, r, 2, t0) for r in range(2)]
    out += [_sample(run, r, t0 + step + 0.01 * r, step) for step in range(1, steps + 1) for r in range(2)]
    out += [{"type": "end", "run": run, "rank": r, "time": t0 + steps + 0.5, "step": steps, "status": "completed"}
            for r in range(2)]
    return out


GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
              "[10.0.0.3]:29500: Connection reset by peer. This is typically caused by a remote worker hanging or "
              "bugs in the application. Check the logs of the remote worker before reporting an error. "
              "GLHF! \U0001f3d6\ufe0f")  # torch 2.13's gloo, word for word: its beach is in no font here


def crashing_run(steps: int = 240, crash_step: int = 150, t0: float = 1_790_000_000.0,
                 run: str = "crash") -> list[dict[str, Any]]:
    """Rank 1 dies of its own CUDA error at ``crash_step``; rank 0's all-reduce then fails (gloo's connection
    reset): the root cause on rank 1, the consequence on rank 0 (which ends a second later)."""
    out = [_start(run, r, 2, t0) for r in range(2)]
    out += [_sample(run, r, t0 + step + 0.01 * r, step) for step in range(1, crash_step + 1) for r in range(2)]
    t = t0 + crash_step + 0.6
    out.append({"type": "end", "run": run, "rank": 1, "time": t, "step": crash_step, "status": "failed",
                "error": {"type": "RuntimeError", "message": "CUDA error: an illegal memory access was encountered",
                          "traceback": "  File \"train.py\", line 88, in step\n    loss.backward()"}})
    out.append({"type": "end", "run": run, "rank": 0, "time": t + 1.0, "step": crash_step, "status": "failed",
                "error": {"type": "DistBackendError", "message": GLOO_RESET,
                          "traceback": "  File \"train.py\", line 91, in step\n    dist.all_reduce(g)"}})
    return out


def leaking_run(steps: int = 150, t0: float = 1_790_000_000.0, run: str = "leak") -> list[dict[str, Any]]:
    """Rank 0's host memory grows 60 MB a step (a second) on a 24 GB machine, under a 16 GB limit (the job's
    cgroup): out of memory in minutes."""
    out = [_start(run, r, 2, t0) for r in range(2)]
    for step in range(1, steps + 1):
        leaked = 60e6 * step
        for r in range(2):
            host = 3e9 + (leaked if r == 0 else 0) + 1e6 * ((step * 3 + r) % 7)
            out.append(_sample(run, r, t0 + step + 0.01 * r, step, host_mem_bytes=host,
                               host_mem_total_bytes=24e9, host_mem_available_bytes=24e9 - 9e9 - leaked,
                               host_mem_limit_bytes=16e9))
    return out


def stopped_run(nan_step: int = 150, stop_after: int = 151) -> list[dict[str, Any]]:
    """The diverging run of a job with ``stop_on = "nan_divergence"``: every rank leaves after step
    ``stop_after`` and sends its end (status "completed") there."""
    out = [r for r in diverging_run(steps=stop_after, nan_step=nan_step, run="stopped")]
    for r in out:
        if r.get("type") == "start":
            r["config"] = {**r["config"], "stop_on": "nan_divergence", "steps": 300}
    last = max(r["time"] for r in out)
    out += [{"type": "end", "run": "stopped", "rank": k, "time": last + 0.2, "step": stop_after,
             "status": "completed"} for k in range(2)]
    return out


def stalled_run() -> list[dict[str, Any]]:
    """Rank 1 goes silent after step 150 while rank 0 reaches 200 (a hang: report it with ``--until``)."""
    return [r for r in diverging_run(nan_step=10_000, run="hang") if not (r["rank"] == 1 and r.get("step", 0) > 150)]
