"""Lightning with trainhealth's callback: ``Trainer(accelerator="cpu", devices=2, strategy="ddp")`` starting its
second process itself (gloo), a small MLP, a real sidecar (its flight recorder shows what it accepted)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.e2e.framework_runs import (
    HERE,
    alerts,
    first_nan,
    is_nan,
    need_module,
    recorded,
    results,
    run_script,
    samples_by_rank,
    wait_for_alert,
    worker_env,
)

need_module("lightning.pytorch")
pytestmark = pytest.mark.e2e


def run_lightning(start_sidecar, tmp_path, run: str | None, timeout: float = 240, **spec):
    record_dir = tmp_path / "flight"
    sidecar = start_sidecar("--record", str(record_dir))
    argv = [sys.executable, str(HERE / "lightning_worker.py"), json.dumps({"out": str(tmp_path), **spec})]
    proc = run_script(argv, worker_env(sidecar.url, run), timeout)
    return sidecar, proc, record_dir


def test_start_every_step_and_end_reach_the_sidecar_under_one_run_name(start_sidecar, tmp_path):
    """No run name from the environment (Lightning started the second process, not torchrun): the ranks take
    rank 0's."""
    sidecar, proc, record_dir = run_lightning(start_sidecar, tmp_path, None, steps=6, batch=4, accumulation=2,
                                              warmup=3, lr=0.01, reference_lr=0.01, reference_batch_size=16)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = results(tmp_path)
    run = done[0]["run"]
    assert done[1]["run"] == run and [done[r]["client_rank"] for r in (0, 1)] == [0, 1]
    recs = recorded(record_dir, run)
    for rank in (0, 1):
        assert (done[rank]["global_step"], done[rank]["stop_step"]) == (6, None)
        mine = [r for r in recs if r.rank == rank]
        start = mine[0]
        assert start.type == "start" and mine[-1].type == "end" and mine[-1].step == 6
        # per-device 4 x accumulate_grad_batches 2 = 8 per rank and optimizer step; x 2 ranks = 16
        assert (start.world_size, start.batch_size, start.lr, start.warmup_steps) == (2, 8, 0.01, 3)
        assert (start.reference_lr, start.reference_batch_size, start.optimizer) == (0.01, 16, "sgd")
        assert start.config["accumulate_grad_batches"] == 2 and start.config["strategy"] == "DDPStrategy"
    by_rank = samples_by_rank(recs)
    assert sorted(by_rank[0]) == sorted(by_rank[1]) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        mine = [by_rank[rank][step] for rank in (0, 1)]
        # the LR each step used: warmup (s/3) then flat; the gradients are all-reduced: one norm for both
        assert [s.lr for s in mine] == pytest.approx([0.01 * min(1.0, step / 3)] * 2)
        assert mine[0].grad_norm == pytest.approx(mine[1].grad_norm, rel=1e-5) and mine[0].grad_norm > 0
        assert all(math.isfinite(s.loss) and s.loss > 0 for s in mine)
        # DDP over gloo: each step split into compute and the wait in its all-reduce
        assert all(s.compute_seconds is not None and s.compute_seconds > 0 and s.comm_wait_seconds is not None
                   and s.comm_wait_seconds >= 0 for s in mine)
    assert by_rank[0][6].step_time_seconds > 0
    assert [a for a in alerts(sidecar, run) if a["state"] == "firing"] == []  # a healthy run stays quiet


def test_a_nan_batch_is_seen_at_its_step_and_without_stop_on_training_goes_on(start_sidecar, tmp_path):
    run = "pl-nan-nostop"
    sidecar, proc, record_dir = run_lightning(start_sidecar, tmp_path, run, steps=20, nan_rank=1, nan_step=7)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = results(tmp_path)
    assert [done[r]["global_step"] for r in (0, 1)] == [20, 20]
    assert [done[r]["stop_step"] for r in (0, 1)] == [None, None]
    assert first_nan(wait_for_alert(sidecar, run, "nan_divergence")) == (1, 7)
    by_rank = samples_by_rank(recorded(record_dir, run))
    assert sorted(by_rank[1]) == list(range(1, 21))
    assert all(math.isfinite(by_rank[1][s].loss) for s in range(1, 7)) and is_nan(by_rank[1][7].loss)
    # rank 0's batch was fine, but the all-reduce brought rank 1's NaN into its gradients, then its weights
    assert math.isfinite(by_rank[0][7].loss) and is_nan(by_rank[0][7].grad_norm) and is_nan(by_rank[0][8].loss)


def test_stop_on_nan_stops_every_rank_at_the_same_step_through_the_trainer(start_sidecar, tmp_path):
    """Needs the client's stop protocol (Telemetry(stop_on=...), tm.should_stop): 50 ms steps, NaN on rank 1
    at step 15; ``trainer.should_stop`` ends the fit after the same step on both ranks, a few steps later."""
    run = "pl-nan-stop"
    sidecar, proc, record_dir = run_lightning(start_sidecar, tmp_path, run, steps=300, step_sleep=0.05,
                                              nan_rank=1, nan_step=15, stop_on=["nan_divergence"])
    assert proc.returncode == 3, proc.stderr[-4000:]  # docs/lightning.md's ending on a stop
    done = results(tmp_path)
    stop = done[0]["stop_step"]
    assert stop is not None and [done[r]["stop_step"] for r in (0, 1)] == [stop, stop]
    assert [done[r]["global_step"] for r in (0, 1)] == [stop, stop]
    assert 15 <= stop <= 15 + 10  # the client's goal is 3 steps at 50 ms; a loaded CI machine gets margin
    assert done[1]["stop_reason"]["alert"] == "nan_divergence"
    assert first_nan(wait_for_alert(sidecar, run, "nan_divergence")) == (1, 15)
    by_rank = samples_by_rank(recorded(record_dir, run))
    assert max(by_rank[0]) == max(by_rank[1]) == stop  # no rank went on past the stop step
