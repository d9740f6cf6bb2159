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
                        "loss": loss, "lr": 0.02, "grad_norm": 1.0 + 0.1 * (step % 3),
                        "gpu_mem_peak_bytes": 6e9 + 1e6 * step, "gpu_mem_total_bytes": 8e9,
                        "host_mem_bytes": 3e9 + 2e5 * step, "step_time_seconds": step_seconds,
                        "batch_size": 2, "world_size": ranks})
    return out


def lines(records: list[dict[str, Any]]) -> str:
    """As the flight recorder writes them: Python's json, NaN as the bare token."""
    return "".join(json.dumps(r) + "\n" for r in records)
