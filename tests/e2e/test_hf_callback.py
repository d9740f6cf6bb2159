"""The Hugging Face Trainer with trainhealth's callback: 2 CPU processes under torchrun (gloo), a 1-layer GPT-2
built from a config, a real sidecar (its flight recorder shows exactly what it accepted)."""

from __future__ import annotations

import math

import pytest

from tests.e2e.framework_runs import (
    alerts,
    first_nan,
    is_nan,
    need_module,
    recorded,
    results,
    run_script,
    samples_by_rank,
    torchrun_argv,
    wait_for_alert,
    worker_env,
)

need_module("transformers")
pytestmark = pytest.mark.e2e


def run_hf(start_sidecar, tmp_path, run: str, timeout: float = 240, **spec):
    record_dir = tmp_path / "flight"
    sidecar = start_sidecar("--record", str(record_dir))
    proc = run_script(torchrun_argv("hf_worker.py", {"out": str(tmp_path), **spec}),
                      worker_env(sidecar.url, run), timeout)
    return sidecar, proc, record_dir


def test_start_every_step_and_end_reach_the_sidecar_with_what_the_trainer_logged(start_sidecar, tmp_path):
    run = "hf-healthy"
    sidecar, proc, record_dir = run_hf(start_sidecar, tmp_path, run, steps=6, batch=4, accumulation=2, warmup=3,
                                       lr=1e-3, reference_lr=1e-3, reference_batch_size=16)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = results(tmp_path)
    recs = recorded(record_dir, run)
    for rank in (0, 1):
        assert (done[rank]["run"], done[rank]["global_step"], done[rank]["stop_step"]) == (run, 6, None)
        mine = [r for r in recs if r.rank == rank]
        start = mine[0]
        assert start.type == "start" and mine[-1].type == "end" and mine[-1].step == 6
        # per-device 4 x accumulation 2 = 8 per rank and optimizer step; x 2 ranks = the reference's 16
        assert (start.world_size, start.batch_size, start.lr, start.warmup_steps) == (2, 8, 1e-3, 3)
        assert (start.reference_lr, start.reference_batch_size, start.optimizer) == (1e-3, 16, "adamw")
        assert start.config["gradient_accumulation_steps"] == 2 and start.config["framework"] == "transformers"
    by_rank = samples_by_rank(recs)
    assert sorted(by_rank[0]) == sorted(by_rank[1]) == [1, 2, 3, 4, 5, 6]
    logged = {e["step"]: e for e in done[0]["log_history"] if "loss" in e and "grad_norm" in e}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, entry in logged.items():
        mine = [by_rank[rank][step] for rank in (0, 1)]
        # the Trainer logs the mean over ranks of each rank's step loss: ours are those per-rank losses
        assert (mine[0].loss + mine[1].loss) / 2 == pytest.approx(entry["loss"], rel=1e-5)
        for sample in mine:
            assert sample.lr == pytest.approx(entry["learning_rate"], rel=1e-9)
            assert sample.grad_norm == pytest.approx(entry["grad_norm"], rel=1e-6)
            assert sample.metrics["epoch"] == pytest.approx(entry["epoch"])
            assert math.isfinite(sample.loss)
            # DDP over gloo: the step split into compute and the wait in its all-reduce (and clipping)
            assert sample.compute_seconds is not None and sample.compute_seconds > 0
            assert sample.comm_wait_seconds is not None and sample.comm_wait_seconds >= 0
    # the Trainer's linear warmup from 0 over 3 steps, then linear decay: the LR each step used
    assert [by_rank[0][s].lr for s in range(1, 7)] == pytest.approx([0, 1e-3 / 3, 2e-3 / 3, 1e-3, 2e-3 / 3, 1e-3 / 3])
    assert by_rank[0][6].step_time_seconds > 0
    assert [a for a in alerts(sidecar, run) if a["state"] == "firing"] == []  # a healthy run stays quiet


def test_a_nan_batch_is_seen_at_its_step_between_sparse_logs_and_without_stop_on_training_goes_on(
        start_sidecar, tmp_path):
    """logging_steps=10 and the Trainer's NaN filter on (its default): the per-step loss from the model's
    output still shows the NaN at step 7 on rank 1, and with no stop_on the run is not stopped."""
    run = "hf-nan-nostop"
    sidecar, proc, record_dir = run_hf(start_sidecar, tmp_path, run, steps=20, logging_steps=10,
                                       nan_rank=1, nan_step=7)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = results(tmp_path)
    assert [done[r]["global_step"] for r in (0, 1)] == [20, 20]
    assert [done[r]["stop_step"] for r in (0, 1)] == [None, None]
    fired = wait_for_alert(sidecar, run, "nan_divergence")
    assert first_nan(fired) == (1, 7)  # rank 1 at step 7; rank 0 received the NaN in the all-reduce
    by_rank = samples_by_rank(recorded(record_dir, run))
    assert sorted(by_rank[1]) == list(range(1, 21))
    assert all(math.isfinite(by_rank[1][s].loss) for s in range(1, 7)) and is_nan(by_rank[1][7].loss)
    assert math.isfinite(by_rank[0][7].loss) and is_nan(by_rank[0][8].loss)  # the all-reduce spread it
    assert by_rank[1][6].grad_norm is None and by_rank[1][10].grad_norm is not None  # logged every 10
    # the LR each step used, logged or not: the Trainer's linear decay from 1e-3 over 20 steps
    assert [by_rank[0][s].lr for s in range(1, 21)] == pytest.approx([1e-3 * (21 - s) / 20 for s in range(1, 21)])


def test_stop_on_nan_stops_every_rank_at_the_same_step_through_the_trainer(start_sidecar, tmp_path):
    """Needs the client's stop protocol (Telemetry(stop_on=...), tm.should_stop): 50 ms steps, NaN on rank 1
    at step 15; the Trainer leaves its loop after the same step on both ranks, a few steps later."""
    run = "hf-nan-stop"
    sidecar, proc, record_dir = run_hf(start_sidecar, tmp_path, run, steps=300, step_sleep=0.05,
                                       nan_rank=1, nan_step=15, stop_on=["nan_divergence"])
    # every rank exits 3 after the others are done, as docs/huggingface.md does on a stop; torchrun reports
    # the first and ends the rest
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-4000:]
    done = results(tmp_path)
    stop = done[0]["stop_step"]
    assert stop is not None and [done[r]["stop_step"] for r in (0, 1)] == [stop, stop]
    assert [done[r]["global_step"] for r in (0, 1)] == [stop, stop]
    assert 15 <= stop <= 15 + 10  # the client's goal is 3 steps at 50 ms; a loaded CI machine gets margin
    assert done[1]["stop_reason"]["alert"] == "nan_divergence"
    fired = wait_for_alert(sidecar, run, "nan_divergence")
    assert first_nan(fired) == (1, 15)
    by_rank = samples_by_rank(recorded(record_dir, run))
    assert max(by_rank[0]) == max(by_rank[1]) == stop  # no rank went on past the stop step
