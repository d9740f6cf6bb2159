"""``python -m trainhealth.trainer`` under torchrun: 2 CPU ranks with gloo, records written by the client's offline mode
(TRAINHEALTH_OFFLINE) and checked against the record contract."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainhealth.record import Record, from_obj

from tests.conftest import ROOT, python_path

pytestmark = pytest.mark.e2e



def torchrun_process(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
    environ.update({"PYTHONPATH": python_path(), "TRAINHEALTH_RUN": "e2e", **env})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainhealth.trainer", "--log-every", "1000", *args]
    return subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)


def torchrun(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
             timeout: float = 180) -> tuple[subprocess.CompletedProcess, dict[int, list[Record]]]:
    """Run with the client's offline mode; returns the process and each rank's records."""
    env = {"TRAINHEALTH_OFFLINE": str(tmp_path / "rank{rank}.jsonl"), **(env or {})}
    proc = torchrun_process(*args, env=env, timeout=timeout)
    records = {}
    for rank in (0, 1):
        path = tmp_path / f"rank{rank}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        records[rank] = [from_obj(json.loads(line)) for line in lines]  # every line meets the contract
    return proc, records


def samples(recs: list[Record]) -> dict[int, Record]:
    return {r.step: r for r in recs if r.type == "sample"}


def test_healthy_run_sends_start_every_step_and_end(tmp_path):
    proc, records = torchrun(tmp_path, "--steps", "12", "--warmup-steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank, recs in records.items():
        assert recs[0].type == "start" and recs[-1].type == "end" and recs[-1].step == 12
        start = recs[0]
        assert (start.run, start.rank, start.world_size, start.batch_size) == ("e2e", rank, 2, 2)
        # the config's 0.02 was for 8 GPUs x 2; on 2 x 2 the linear scaling rule gives 0.02 * 4 / 16
        assert start.lr == pytest.approx(0.005) and start.reference_lr == 0.02
        assert (start.reference_batch_size, start.warmup_steps, start.optimizer) == (16, 4, "sgd")
        assert start.pid and start.host and start.config["gpus_reference"] == 8
        by_step = samples(recs)
        assert sorted(by_step) == list(range(1, 13))
        assert all(math.isfinite(r.loss) and math.isfinite(r.grad_norm) for r in by_step.values())
        # warmup from 1/3 of the LR, linear over 4 steps; step s used iteration s-1's LR
        assert [by_step[s].lr for s in (1, 3, 5, 12)] == pytest.approx([0.005 / 3, 0.005 * 2 / 3, 0.005, 0.005])
        s = by_step[5]
        assert (s.batch_size, s.world_size) == (2, 2)
        assert s.step_time_seconds > 0 and 0 <= s.data_time_seconds <= s.step_time_seconds
        assert s.host_mem_bytes > 0 and s.host_mem_total_bytes > 0 and s.gpu_mem_peak_bytes is None


def test_lr_unscaled_keeps_the_8_gpu_lr_on_2_ranks_and_diverges(tmp_path):
    proc, records = torchrun(tmp_path, "--inject", "lr-unscaled", "--steps", "400", "--warmup-steps", "10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for recs in records.values():
        start = recs[0]
        assert (start.lr, start.reference_lr, start.reference_batch_size, start.world_size, start.batch_size) == (
            0.02, 0.02, 16, 2, 2)  # 4x what the linear scaling rule gives for total batch 4
        assert start.config["max_iter"] == 800  # the schedule unscaled too: the config run as written
        losses = [r.loss for r in samples(recs).values()]
        assert any(not math.isfinite(x) for x in losses)  # the seed's first failure


def test_nan_data_makes_the_injected_rank_nan_first_at_the_injected_step(tmp_path):
    proc, records = torchrun(tmp_path, "--inject", "nan-data", "--inject-rank", "1", "--inject-step", "6",
                             "--steps", "9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = samples(records[0]), samples(records[1])
    assert all(math.isfinite(r0[s].loss) and math.isfinite(r1[s].loss) for s in range(1, 6))
    assert math.isnan(r1[6].loss) and math.isfinite(r0[6].loss)  # only rank 1 saw the bad sample
    assert math.isnan(r0[6].grad_norm) and math.isnan(r1[6].grad_norm)  # all-reduced gradients
    assert math.isnan(r0[7].loss) and math.isnan(r1[7].loss)  # the weights are NaN everywhere now


def test_hang_stalls_the_step_while_heartbeats_keep_coming(tmp_path):
    proc, records = torchrun(tmp_path, "--inject", "hang", "--inject-rank", "1", "--inject-step", "4",
                             "--hang-seconds", "2", "--steps", "5",
                             env={"TRAINHEALTH_HEARTBEAT_SECONDS": "0.2", "TRAINHEALTH_FLUSH_SECONDS": "0.2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for recs in records.values():
        beats = [r for r in recs if r.type == "heartbeat" and r.step == 3]
        assert len(beats) >= 3  # both ranks stuck after step 3 for 2 s: rank 1 asleep, rank 0 in all-reduce
        assert max(samples(recs)) == 5


def test_die_leaves_no_end_record_on_the_dead_rank(tmp_path):
    proc, records = torchrun(tmp_path, "--inject", "die", "--inject-rank", "1", "--inject-step", "3",
                             "--steps", "50", "--step-sleep", "0.01",
                             env={"TRAINHEALTH_FLUSH_SECONDS": "0.05"})
    assert proc.returncode != 0
    assert not any(r.type == "end" for r in records[1])
    assert all(r.step < 3 for r in records[1] if r.type == "sample")


def test_nan_data_against_the_real_sidecar_fires_nan_divergence_naming_the_rank(sidecar):
    proc = torchrun_process("--inject", "nan-data", "--inject-rank", "1", "--inject-step", "8", "--steps", "12",
                            "--step-sleep", "0.05", env={"TRAINHEALTH_URL": sidecar.url, "TRAINHEALTH_RUN": "e2e-nan"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one incident for the run (rank null): rank 1's loss went NaN on its own bad batch, rank 0 only through
    # the all-reduced gradients, so rank 1 is the first rank whichever rank's batch arrived first (the open
    # alert is refreshed in place once the picture is complete)
    # the job then ended cleanly: its alert resolved ("run ended completed at step 12"), and its firing
    # transition in the history holds the picture it was refreshed to
    deadline = time.monotonic() + 10
    while True:
        alerts = sidecar.client.get("/v1/alerts", params={"run": "e2e-nan"}).json()["alerts"]
        nan = [a for a in alerts if a["alert"] == "nan_divergence" and a["state"] == "firing"]
        if (nan and nan[0].get("first_rank") == 1 and nan[0].get("received_ranks")) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(a["rank"], a["step"], a["first_rank"], a["cause"]) for a in nan] == [(None, 8, 1, "nonfinite_loss")]
    assert nan[0]["own_loss_ranks"] == [1] and nan[0]["received_ranks"] == [0]
    run = sidecar.client.get("/v1/runs/e2e-nan").json()
    assert run["step"] == 12 and len(run["rank_states"]) == 2
