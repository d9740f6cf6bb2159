"""Helpers shared by the benchmarks: realistic records, a sidecar subprocess, result output."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def python_path() -> str:
    """PYTHONPATH for a child process: the checkout (for ``tests.*``) ahead of what was already there."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
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


class Feed:
    """An endless healthy run: ``ranks`` ranks stepping in lockstep, records in (step, rank) order.

    ``body(n)`` returns the next ``n`` records as a JSON array; steps and times always advance, so
    detectors see a live run (windows fill, ranks progress) however long the benchmark runs. Values
    come from a pool of pre-drawn samples per rank (no random draw per record). Finite values only, so
    msgspec may encode them (it would turn NaN into null: never use it for telemetry that can be NaN).
    """

    POOL = 16

    def __init__(self, run: str = "bench", ranks: int = 64, t0: float = 1_700_000_000.0,
                 step_seconds: float = 0.5, first_rank: int = 0) -> None:
        import msgspec

        self.run, self.ranks, self.t0, self.step_seconds = run, ranks, t0, step_seconds
        rng = random.Random(zlib.crc32(run.encode()) + first_rank)
        self.pool = [[sample(run, first_rank + r, k, t0, rng) for k in range(self.POOL)] for r in range(ranks)]
        self.i = 0
        # each pooled sample pre-encoded, with %-placeholders where time and step go
        encode = msgspec.json.Encoder().encode
        self.templates = [[encode({**rec, "time": -1.25, "step": 987654321}).replace(b"%", b"%%")
                           .replace(b"-1.25", b"%.5f").replace(b"987654321", b"%d") for rec in row]
                          for row in self.pool]

    def records(self, n: int) -> list[dict]:
        out = []
        i, ranks, pool, t0, dt = self.i, self.ranks, self.pool, self.t0, self.step_seconds
        for j in range(i, i + n):
            step, rank = divmod(j, ranks)
            out.append({**pool[rank][step % self.POOL], "step": step, "time": t0 + step * dt + rank * 1e-5})
        self.i = i + n
        return out

    def body(self, n: int) -> bytes:
        """The same records as ``records(n)`` would give, encoded (~0.5 us per record)."""
        parts = []
        i, ranks, templates, t0, dt = self.i, self.ranks, self.templates, self.t0, self.step_seconds
        for j in range(i, i + n):
            step, rank = divmod(j, ranks)
            parts.append(templates[rank][step % self.POOL] % (t0 + step * dt + rank * 1e-5, step))
        self.i = i + n
        return b"[" + b",".join(parts) + b"]"

    def lines(self, n: int) -> bytes:
        """The next ``n`` records as NDJSON / .jsonl lines."""
        body = self.body(n)
        return body[1:-1].replace(b"},{", b"}\n{") + b"\n"


class Sidecar:
    """``python -m trainhealth serve`` in a subprocess: optionally pinned to a core, optionally under py-spy.

    Its stderr is drained by a thread (a full pipe would stall the server); the last lines are kept
    for error messages.
    """

    def __init__(self, *args: str, core: int | None = None) -> None:
        cmd = [sys.executable, "-m", "trainhealth", "serve", "--port", "0", *args]
        preexec = (lambda: pin(core)) if core is not None else None  # children inherit the affinity
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "PYTHONPATH": python_path()},
                                     stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("sidecar did not start:\n" + "".join(self.lines[-20:]))
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines = [*self.lines[-50:], line]

    def cpu_seconds(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def peak_rss(self) -> int | None:
        """The most RSS it has had (VmHWM, Linux); None where /proc does not say."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def profile(self, path: Path, seconds: float) -> subprocess.Popen | None:
        """py-spy (if installed) records the sidecar for ``seconds`` into a speedscope file."""
        if shutil.which("py-spy") is None:
            print("(py-spy not installed: pip install py-spy; no profile taken)", file=sys.stderr)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(["py-spy", "record", "-r", "250", "-f", "speedscope",
                                 "-d", str(max(1, round(seconds))), "-p", str(self.proc.pid), "-o", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > core:
        os.sched_setaffinity(0, {core})


@dataclass
class Figure:
    """One measured figure, with its goal when it has one."""

    section: str
    name: str
    value: float | None
    unit: str
    goal: float | None = None
    op: str = ">="  # the figure meets the goal when ``value op goal``
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.value is None:
            return None
        return self.value >= self.goal if self.op == ">=" else self.value < self.goal

    def as_dict(self) -> dict[str, Any]:
        return {"section": self.section, "name": self.name, "value": self.value, "unit": self.unit,
                "goal": None if self.goal is None else f"{self.op} {self.goal:g}", "met": self.met,
                "vs_goal": None if self.goal is None or self.value is None else self.value / self.goal,
                **self.detail}


def table(figures: list[Figure]) -> str:
    """The figures as a Markdown table (also what the terminal shows)."""
    lines = ["| section | figure | value | goal | vs goal | |", "| --- | --- | ---: | --- | ---: | --- |"]
    for f in figures:
        value = "n/a" if f.value is None else f"{fmt(f.value)} {f.unit}"
        goal = "" if f.goal is None else f"{f.op} {fmt(f.goal)} {f.unit}"
        ratio = "" if f.goal is None or f.value is None else f"{f.value / f.goal:.2f}x"
        mark = {True: "met", False: "MISSED", None: ""}[f.met]
        lines.append(f"| {f.section} | {f.name} | {value} | {goal} | {ratio} | {mark} |")
    return "\n".join(lines)


def write_results(name: str, figures: list[Figure], meta: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, **meta, "figures": [f.as_dict() for f in figures]},
                               indent=2))
    return path


def machine() -> dict[str, Any]:
    """What the figures were measured on (they vary between machines; ratios hold better)."""
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def fmt(v: float) -> str:
    if v == 0 or 0.01 <= abs(v) < 1000:
        return f"{v:.3g}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.2e}"
