"""The framework-free part of the callbacks (trainhealth.integrations._common): the Reporter with a real client
writing its records to a file, and the helpers."""

from __future__ import annotations

import json
import math

import pytest
from trainhealth.integrations._common import Reporter, combine_losses, first_lr, guarded, numbers, optimizer_name
from trainhealth.trainer.client import Telemetry


def file_client(tmp_path, **options) -> Telemetry:
    return Telemetry(run="unit", rank=0, world_size=1, offline_path=str(tmp_path / "r.jsonl"),
                     start_threads=False, **options)


def lines(tm: Telemetry, tmp_path) -> list[dict]:
    tm.flush()
    return [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]


def test_a_given_client_and_client_options_together_are_refused(tmp_path):
    tm = file_client(tmp_path)
    with pytest.raises(TypeError, match="either telemetry="):
        Reporter(tm, {"nan_divergence"}, {}, {})
    with pytest.raises(TypeError, match="either telemetry="):
        Reporter(tm, None, {}, {"url": "http://127.0.0.1:1"})


def test_bind_makes_the_client_with_the_framework_rank_and_rank_0s_run_name(tmp_path):
    seen = []

    def broadcast(obj):  # as a collective would: every rank gets rank 0's
        seen.append(obj)
        return "rank0-run"

    reporter = Reporter(None, None, {}, {"offline_path": str(tmp_path / "r{rank}.jsonl"), "start_threads": False})
    tm = reporter.bind(rank=1, world_size=2, broadcast=broadcast)
    assert (tm.run, tm.rank, tm.world_size, len(seen)) == ("rank0-run", 1, 2, 1)
    assert reporter.bind(rank=1, world_size=2, broadcast=broadcast) is tm  # once


def test_bind_keeps_a_run_name_given_and_does_not_broadcast_for_one_rank(tmp_path):
    def broadcast(obj):
        raise AssertionError("no collective needed")

    options = {"offline_path": str(tmp_path / "r.jsonl"), "start_threads": False}
    assert Reporter(None, None, {}, {**options, "run": "mine"}).bind(0, 2, broadcast).run == "mine"
    assert Reporter(None, None, {}, options).bind(0, 1, broadcast).rank == 0


def test_start_merges_the_framework_fields_with_the_users_which_win(tmp_path):
    tm = file_client(tmp_path)
    reporter = Reporter(tm, None, {"reference_lr": 0.1, "reference_batch_size": 256, "warmup_steps": 500,
                                   "config": {"model": "tiny"}}, {})
    reporter.start(world_size=8, batch_size=32, lr=0.1, warmup_steps=0, optimizer=None,
                   config={"framework": "x", "model": "from-framework"})
    start = lines(tm, tmp_path)[0]
    assert start["type"] == "start" and (start["batch_size"], start["lr"], start["warmup_steps"]) == (32, 0.1, 500)
    assert (start["reference_lr"], start["reference_batch_size"]) == (0.1, 256) and "optimizer" not in start
    assert start["config"] == {"framework": "x", "model": "tiny"}


def test_steps_carry_the_time_since_the_previous_step_and_end_is_sent(tmp_path):
    tm = file_client(tmp_path)
    reporter = Reporter(tm, None, {}, {})
    reporter.start(lr=0.1)
    reporter.step(1, loss=1.5, lr=0.1, grad_norm=None)
    reporter.step(2, loss=float("nan"), lr=0.1, grad_norm=2.0)
    reporter.end(2)
    recs = lines(tm, tmp_path)
    assert [r["type"] for r in recs] == ["start", "sample", "sample", "end"]
    assert "step_time_seconds" not in recs[1] and recs[2]["step_time_seconds"] >= 0
    assert "grad_norm" not in recs[1] and math.isnan(recs[2]["loss"]) and recs[3]["step"] == 2


def test_combine_losses_means_or_sums_floats_and_tensors():
    torch = pytest.importorskip("torch")
    assert combine_losses([], "mean") is None
    assert combine_losses([2.0], "sum") == 2.0
    assert combine_losses([1.0, 2.0], "mean") == 1.5 and combine_losses([1.0, 2.0], "sum") == 3.0
    a, b = torch.tensor(1.0), torch.tensor([3.0])
    assert combine_losses([a, b], "mean").item() == 2.0 and combine_losses([a, b], "sum").item() == 4.0
    assert math.isnan(combine_losses([a, torch.tensor(float("nan"))], "mean").item())


def test_optimizer_name_under_wrappers_and_first_lr():
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)

    class Wrapper:  # accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer keep the real one
        def __init__(self, inner):
            self.optimizer = inner
            self.param_groups = inner.param_groups

    assert optimizer_name(Wrapper(Wrapper(opt))) == "sgd" and optimizer_name(None) is None
    assert first_lr(Wrapper(opt)) == 0.5 and first_lr(opt, "initial_lr") is None and first_lr(None) is None


def test_numbers_keeps_numbers_and_nan_but_not_bools_strings_or_skipped():
    got = numbers({"loss": 1.0, "epoch": 0.5, "nan": float("nan"), "flag": True, "name": "x", "n": 3}, ["loss"])
    assert set(got) == {"epoch", "nan", "n"} and math.isnan(got["nan"]) and got["n"] == 3.0


def test_guarded_logs_and_returns_none(caplog):
    class Hooks:
        @guarded
        def on_thing(self, x):
            return 1 / x

    assert Hooks().on_thing(2) == 0.5
    assert Hooks().on_thing(0) is None
    assert "on_thing failed and was skipped: ZeroDivisionError" in caplog.text


def test_the_first_stop_is_logged_with_the_clients_reason(tmp_path, caplog):
    class Stopping(Telemetry):
        def should_stop(self, step: int) -> bool:
            return step >= 5

        @property
        def stop_reason(self):
            return {"alert": "nan_divergence", "summary": "loss became nan at step 4 on rank 1"}

    tm = Stopping(run="unit", rank=0, world_size=1, offline_path=str(tmp_path / "r.jsonl"), start_threads=False)
    reporter = Reporter(tm, None, {}, {})
    assert [reporter.should_stop(s) for s in (4, 5, 6)] == [False, True, True] and reporter.stop_step == 5
    assert caplog.text.count("stopping training after step 5 on rank 0: loss became nan at step 4 on rank 1") == 1
