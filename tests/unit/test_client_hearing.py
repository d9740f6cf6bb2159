"""The client hears its run: alerts and stop steps from the sidecar's answers; urgent records go out at once."""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import pytest
from trainhealth.trainer.client import Telemetry
from trainhealth.trainer.transport import Result

from tests.unit.test_client import FakeStager, FakeTensor, make
from tests.unit.trainer_fakes import ENV, FakeSender


def view(version: int, stops: dict[str, int] | None = None, alerts: list[tuple[str, int, int]] = ()) -> dict:
    return {"runs": {"elastic-run": {
        "version": version,
        "stops": {name: {"step": step, "alert": name, "rank": 1, "first_step": step - 2, "severity": "critical"}
                  for name, step in (stops or {}).items()},
        "alerts": [{"alert": a, "rank": r, "step": s, "time": 1000.0 + s, "severity": "critical",
                    "summary": f"{a} on rank {r}", "fingerprint": f"elastic-run/{r}/{a}"} for a, r, s in alerts],
    }}}


def answered(*answers: dict[str, Any]) -> FakeSender:
    return FakeSender([Result("ok", answer=a) for a in answers])


@pytest.mark.parametrize(("stop_on", "message"), [
    ({"nan_divergance"}, "stop_on: unknown alert name 'nan_divergance'; known: "),
    ("nan_divergence", "stop_on: a set of alert names, got the string 'nan_divergence'"),
])
def test_stop_on_refuses_names_that_would_never_fire(stop_on, message):
    with pytest.raises(ValueError) as err:
        make(stop_on=stop_on)
    assert str(err.value).startswith(message)


def test_stop_on_is_empty_by_default_so_no_alert_stops_the_loop():
    tm, _, _ = make(answered(view(1, {"nan_divergence": 32}, [("nan_divergence", 1, 30)])))
    tm.record(30, loss=1.0)
    tm.pump()
    assert [a["alert"] for a in tm.alerts] == ["nan_divergence"]  # heard...
    assert not any(tm.should_stop(s) for s in range(100))  # ...but not asked to stop on it


def test_should_stop_turns_true_at_the_stop_step_of_an_alert_in_stop_on_only():
    tm, _, _ = make(answered(view(1, {"lr_scaling": 3, "nan_divergence": 32}, [("nan_divergence", 1, 30)])),
                    stop_on={"nan_divergence"})
    tm.record(30, loss=1.0)
    tm.pump()
    assert [tm.should_stop(s) for s in (30, 31, 32, 33)] == [False, False, True, True]
    assert tm.stop_reason == {"alert": "nan_divergence", "step": 32, "first_step": 30, "rank": 1,
                              "severity": "critical", "summary": "nan_divergence on rank 1"}
    assert tm.alerts[0]["stop_step"] == 32


def test_the_lowest_stop_of_the_alerts_in_stop_on_wins():
    tm, _, _ = make(answered(view(2, {"loss_spike": 40, "nan_divergence": 44})),
                    stop_on={"nan_divergence", "loss_spike"})
    tm.record(30, loss=1.0)
    tm.pump()
    assert tm.stop_reason is not None and (tm.stop_reason["alert"], tm.stop_reason["step"]) == ("loss_spike", 40)


def test_an_older_view_arriving_late_is_ignored_and_a_restart_clears_the_stop():
    tm, _, _ = make(stop_on={"nan_divergence"})
    tm._hearing.view(view(3, {"nan_divergence": 32})["runs"]["elastic-run"])
    tm._hearing.view(view(2)["runs"]["elastic-run"])  # older: the long poll's answer overtook it
    assert tm.should_stop(32)
    tm._hearing.view(view(4)["runs"]["elastic-run"])  # the run restarted: the sidecar forgot the stop
    assert not tm.should_stop(32) and tm.stop_reason is None


def test_on_alert_is_called_once_per_firing_alert_and_its_errors_are_logged(caplog):
    heard: list[tuple[str, int]] = []

    def on_alert(alert: dict[str, Any]) -> None:
        heard.append((alert["alert"], alert["rank"]))
        if alert["rank"] == 0:
            raise RuntimeError("the user's callback broke")

    tm, _, _ = make(on_alert=on_alert)
    hearing = tm._hearing
    hearing.view(view(1, alerts=[("nan_divergence", 1, 30)])["runs"]["elastic-run"])
    hearing.view(view(2, alerts=[("nan_divergence", 1, 30), ("nan_divergence", 0, 30)])["runs"]["elastic-run"])
    hearing.view(view(3, alerts=[("nan_divergence", 1, 30), ("nan_divergence", 0, 30)])["runs"]["elastic-run"])
    assert heard == [("nan_divergence", 1), ("nan_divergence", 0)]
    assert "on_alert(nan_divergence) raised RuntimeError" in caplog.text


def test_end_says_completed_and_goes_out_without_waiting_for_the_next_cycle():
    tm, sink, _ = make()
    tm.record(7, loss=1.0)
    tm.end()
    assert tm._outbox._flush_now  # the sender's next wake sends, backoff or not
    tm.pump()
    assert sink.records[-1] == {"type": "end", "run": "elastic-run", "rank": 3, "time": 1000.0, "step": 7,
                                "status": "completed"}


# -- urgent: a non-finite loss or grad norm leaves at once -------------------------------------------------

class Signalled(FakeSender):
    """Delivered batches, with an event set when a record matching ``want`` arrives."""

    def __init__(self, want) -> None:
        super().__init__()
        self.want = want
        self.got = threading.Event()

    def send(self, records, batch_id=None):
        result = super().send(records, batch_id)
        if any(self.want(r) for r in records):
            self.got.set()
        return result


def slow_client(sink: FakeSender, **kw: Any) -> Telemetry:
    """Threads on, a 60 s flush period: anything sent within seconds was sent because it was urgent."""
    return Telemetry(environ=ENV, sink=sink, probes=kw.pop("probes", []), flush_seconds=60.0,
                     heartbeat_seconds=60.0, **kw)


@pytest.mark.parametrize("field", ["loss", "grad_norm"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_float_is_sent_at_once(field, value):
    sink = Signalled(lambda r: r.get("step") == 2)
    tm = slow_client(sink)
    try:
        tm.record(1, loss=1.0, grad_norm=1.0)
        tm.record(2, **{"loss": 1.0, "grad_norm": 1.0, field: value})
        assert sink.got.wait(10)
        assert [r["step"] for r in sink.records] == [1, 2]  # the records before it go with it, in order
    finally:
        tm.close(timeout=0.5)


def test_a_non_finite_device_value_is_sent_once_its_copy_is_done():
    stager = FakeStager()
    sink = Signalled(lambda r: r.get("step") == 2)
    tm = slow_client(sink, probes=[stager], poll_seconds=0.002)
    try:
        tm.record(1, loss=FakeTensor(1.0))
        tm.record(2, loss=FakeTensor(math.nan))
        assert not sink.got.wait(0.3)  # the copies are not done: nothing to judge, nothing sent
        stager.staged[0].done = stager.staged[1].done = True
        assert sink.got.wait(10)
        assert math.isnan(sink.records[-1]["loss"])
    finally:
        tm.close(timeout=0.5)


def test_a_run_of_non_finite_steps_does_not_send_every_step(caplog):
    tm, sink, _ = make()
    tm.record(1, loss=math.nan)
    assert tm._outbox._flush_now
    tm.pump()
    tm.record(2, loss=math.nan)  # still NaN: the sidecar already knows, it waits for the next cycle
    assert not tm._outbox._flush_now
    tm.record(3, loss=1.0)
    tm.record(4, loss=math.inf)  # a new episode: at once again
    assert tm._outbox._flush_now


def test_grad_norm_helper_is_the_clipping_norm_left_on_the_device():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    assert Telemetry.grad_norm(model) is None  # no gradients yet
    model(torch.randn(8, 4)).pow(2).sum().backward()
    norm = Telemetry.grad_norm(model)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)


def test_hearing_logs_the_stop_once_in_one_line(caplog):
    caplog.set_level(logging.WARNING, "trainhealth.trainer.client")
    tm, _, _ = make(stop_on={"nan_divergence"})
    tm.record(31, loss=1.0)
    for version in (1, 2):
        tm._hearing.view(view(version, {"nan_divergence": 32}, [("nan_divergence", 1, 30)])["runs"]["elastic-run"])
    lines = [r.getMessage() for r in caplog.records if "stops after" in r.getMessage()]
    assert lines == ["trainhealth: nan_divergence fired for run elastic-run (rank 1, step 30): nan_divergence "
                     "on rank 1; every rank stops after step 32"]


def test_finished_device_values_that_are_finite_wait_for_the_regular_cycle():
    stager = FakeStager()
    sink = Signalled(lambda r: True)
    tm = slow_client(sink, probes=[stager], poll_seconds=0.002)
    try:
        for step in range(1, 21):
            tm.record(step, loss=FakeTensor(1.0))
            stager.staged[-1].done = True
            threading.Event().wait(0.01)
        assert not sink.got.wait(0.3)  # looked at every 2 ms, but nothing urgent: no send per step
        assert tm.flush(10) and [r["step"] for r in sink.records] == list(range(1, 21))
    finally:
        tm.close(timeout=0.5)


def test_a_stop_heard_after_the_loop_passed_it_is_not_taken_until_it_moves(caplog):
    tm, _, _ = make(stop_on={"nan_divergence"})
    hearing = tm._hearing
    assert not tm.should_stop(32)  # the loop asked about step 32 before the stop arrived
    hearing.view(view(1, {"nan_divergence": 32}, [("nan_divergence", 1, 30)])["runs"]["elastic-run"])
    assert not tm.should_stop(33)  # too late for 32: stopping at 33 alone would strand the other ranks
    assert "the stop at step 32 came after this rank had passed it (step 32)" in caplog.text
    hearing.view(view(2, {"nan_divergence": 35}, [("nan_divergence", 1, 30)])["runs"]["elastic-run"])
    assert [tm.should_stop(s) for s in (34, 35)] == [False, True]  # the moved stop, heard in time


def test_a_quiet_view_overtaken_by_the_stop_does_not_clear_it():
    tm, _, _ = make(stop_on={"nan_divergence"})
    tm._hearing.view({"version": 0, "stops": {}, "alerts": []})  # the long poll's first answer
    tm._hearing.view(view(1, {"nan_divergence": 32})["runs"]["elastic-run"])  # an ingest answer
    tm._hearing.view({"version": 0, "stops": {}, "alerts": []})  # a long poll answer computed before it
    assert tm.should_stop(32)
