"""Helpers shared by the benchmarks: realistic records, a sidecar subprocess, result output."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def sample(run: str, rank: int, step: int, t0: float = 1_700_000_000.0, rng: random.Random | None = None) -> dict:
    rng = rng or random.Random(rank * 100_003 + step)
    return {
        "run": run, "rank": rank, "time": t0 + step * 0.5 + rank * 1e-3, "step": step,
        "loss": 2.0 * 0.999 ** step + rng.random() * 0.05, "lr": 0.02, "grad_norm": 1.0 + rng.random() * 0.1,
        "gpu_mem_allocated_bytes": 6.1e9, "gpu_mem_reserved_bytes": 7.0e9, "gpu_mem_peak_bytes": 6.5e9,
        "gpu_mem_total_bytes": 8.0e10, "host_mem_bytes": 3.2e9 + rng.random() * 1e7,
        "host_mem_available_bytes": 1.0e11, "host_mem_total_bytes": 2.5e11,
        "step_time_seconds": 0.5 + rng.random() * 0.01, "data_time_seconds": 0.01 + rng.random() * 0.002,
        "batch_size": 32, "world_size": 64,
    }


def batches(n_batches: int, size: int, ranks: int = 64, run: str = "bench") -> list[bytes]:
    out, step = [], 0
    for _ in range(n_batches):
        recs = []
        for _ in range(size):
            recs.append(sample(run, step % ranks, step // ranks))
            step += 1
        out.append(json.dumps(recs).encode())
    return out


def start_sidecar(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "serve", "--port", "0", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("sidecar did not start")
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return proc, m.group(1)


def pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > core:
        os.sched_setaffinity(0, {core})


def report(name: str, rows: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"benchmark": name, "time": time.time(), "rows": rows},
                                                     indent=2))
    if rows:
        keys = list(rows[0])
        widths = [max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys]
        print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
        for r in rows:
            print("  ".join(_fmt(r.get(k)).ljust(w) for k, w in zip(keys, widths)))
    print(f"(written to {RESULTS / (name + '.json')})")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
