"""Helpers for the framework-callback tests: run a worker script, read what the sidecar recorded and alerted."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from trainhealth.record import Record, from_obj

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def need_module(name: str) -> Any:
    """The framework module; skip without it on a laptop, fail in CI (CI installs the dev extra)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (CI=true): pip install -e '.[dev]'")
        pytest.skip(f"{name} not installed", allow_module_level=True)


def worker_env(sidecar_url: str, run: str | None) -> dict[str, str]:
    """The workers' environment: the sidecar's URL, the run name (None: none, the callback agrees on one)."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("TRAINHEALTH_") and k != "TORCHELASTIC_RUN_ID"}
    environ.update({"PYTHONPATH": str(ROOT), "TRAINHEALTH_URL": sidecar_url, "TRAINHEALTH_FLUSH_SECONDS": "0.2",
                    "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    if run is not None:
        environ["TRAINHEALTH_RUN"] = run
    return environ


def run_script(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` (torchrun, a script) in a session of its own and wait for it. Its whole process group is killed
    when it exits or runs past ``timeout`` (then the test fails with the tail of its stderr): ``subprocess.run``'s
    timeout killed torchrun only, and its hung workers went on loading the machine for minutes. The output goes
    to files, not pipes: a worker left behind holding a pipe would keep the reading waiting."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        hung = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung = True
        finally:
            _kill_group(proc.pid)  # the workers of a launcher that hung or exited (or of an interrupted test)
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if hung:
        pytest.fail(f"{' '.join(argv[:5])} ... ran past {timeout:g}s; its process group was killed. The tail of "
                    f"its stderr:\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # nobody left in it
        pass


def torchrun_argv(script: str, spec: dict[str, Any], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(HERE / script), json.dumps(spec)]


def results(out: Path, ranks: int = 2) -> dict[int, dict[str, Any]]:
    """Each rank's result file (written by the worker after training)."""
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)}


def recorded(record_dir: Path, run: str, ends: int = 2, timeout: float = 15.0) -> list[Record]:
    """The records the sidecar accepted for ``run`` (its flight recorder), once ``ends`` end records are in."""
    path = record_dir / f"{run}.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        recs = [from_obj(json.loads(line)) for line in lines]
        if sum(r.type == "end" for r in recs) >= ends or time.monotonic() > deadline:
            return recs
        time.sleep(0.1)


def samples_by_rank(recs: list[Record]) -> dict[int, dict[int, Record]]:
    """rank -> step -> the rank's one sample for that step (a second sample for a step fails the test)."""
    out: dict[int, dict[int, Record]] = {}
    for r in recs:
        if r.type == "sample":
            steps = out.setdefault(r.rank, {})
            assert r.step not in steps, f"rank {r.rank} sent two samples for step {r.step}"
            steps[r.step] = r
    return out


def alerts(sidecar: Any, run: str, name: str | None = None) -> list[dict[str, Any]]:
    params = {"run": run, **({"alert": name} if name else {})}
    return sidecar.client.get("/v1/alerts", params=params).json()["alerts"]


def wait_for_alert(sidecar: Any, run: str, name: str, timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [a for a in alerts(sidecar, run, name) if a["state"] == "firing"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def is_nan(value: float | None) -> bool:
    return value is not None and math.isnan(value)


def first_nan(fired: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(rank, step) of the earliest firing nan_divergence for a non-finite loss: the rank whose batch was NaN.
    (The ranks that received the NaN through the all-reduce show it in their grad norm at that step and in
    their loss from the next; the detector may page them too, or fold them into one alert.)"""
    losses = [a for a in fired if a.get("cause") == "nonfinite_loss"]
    if not losses:
        return None
    # one incident per run (rank null) names its first rank; a per-rank alert names its rank
    first = min(losses, key=lambda a: (a["step"], a.get("first_rank", a["rank"])))
    rank = first["rank"] if first["rank"] is not None else first["first_rank"]
    return rank, first.get("first_step", first["step"])
