"""The client hears its run: alerts and stop steps from the sidecar's answers; urgent records go out at once."""

from __future__ import annotations

import json
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


# -- a confirmed stop: every rank takes it or none does (hearing.py, monitor/stop_steps.py) ----------------

def confirming(version: int, step: int, confirmed: bool) -> dict[str, Any]:
    """A view of a sidecar that confirms stops: the stop says whether every rank acked it in time."""
    out = view(version, {"nan_divergence": step}, [("nan_divergence", 1, 30)])["runs"]["elastic-run"]
    out["stops"]["nan_divergence"]["confirmed"] = confirmed
    return out


def acks(sink: FakeSender) -> list[dict[str, Any]]:
    return [r["stop_ack"] for r in sink.records if "stop_ack" in r]


def asking(tm: Telemetry, step: int) -> tuple[threading.Thread, list[bool]]:
    """The training thread asking ``should_stop(step)``, on a thread of its own (it may wait)."""
    said: list[bool] = []
    thread = threading.Thread(target=lambda: said.append(tm.should_stop(step)), daemon=True)
    thread.start()
    return thread, said


def test_a_heard_stop_is_acked_at_once_with_the_step_checked_and_said_again_until_confirmed():
    tm, sink, _ = make(stop_on={"nan_divergence"})
    tm.record(30, loss=1.0)
    assert not tm.should_stop(30)
    with tm.phase("step"):
        tm._hearing.view(confirming(1, 32, False))
        assert tm._outbox._flush_now  # urgent: the next cycle sends it, whatever the backoff
        tm.pump()
    beat = sink.records[-1]
    assert (beat["type"], beat["step"], beat["phase"], beat["stop_ack"]) == ("heartbeat", 30, "step",
                                                                             {"step": 32, "checked": 30})
    tm._hearing.view(confirming(2, 32, False))  # another change of the view, the stop still open: said again
    tm._hearing.view(confirming(3, 32, True))  # confirmed: nothing more to say
    tm.pump()
    assert acks(sink) == [{"step": 32, "checked": 30}] * 2
    assert [tm.should_stop(s) for s in (31, 32)] == [False, True]  # confirmed before the loop got there: no wait


def test_a_stop_heard_before_the_loop_asked_anything_is_acked_without_checked():
    tm, sink, _ = make(stop_on={"nan_divergence"})
    tm._hearing.view(confirming(1, 32, False))
    tm.pump()
    assert acks(sink) == [{"step": 32}]


def test_at_the_stop_step_should_stop_waits_for_the_confirmation_then_says_stop():
    tm, _, _ = make(stop_on={"nan_divergence"})
    tm._hearing.view(confirming(1, 32, False))
    assert not tm.should_stop(31)  # before the stop step: no wait
    thread, said = asking(tm, 32)
    thread.join(0.2)
    assert thread.is_alive() and said == []  # it cannot answer before the sidecar confirms (or 60 s pass)
    tm._hearing.view(confirming(2, 32, True))
    thread.join(10)
    assert said == [True] and tm.should_stop(33)


def test_a_stop_moved_while_waiting_ends_the_wait_with_go_on_and_the_moved_stop_is_taken():
    tm, sink, _ = make(stop_on={"nan_divergence"})
    tm._hearing.view(confirming(1, 32, False))
    thread, said = asking(tm, 32)
    thread.join(0.2)
    assert thread.is_alive()
    tm._hearing.view(confirming(2, 34, False))  # another rank heard 32 too late: the sidecar moved it
    thread.join(10)
    assert said == [False]
    tm.pump()
    assert acks(sink) == [{"step": 32}, {"step": 34, "checked": 32}]  # heard in time, waiting at 32
    assert not tm.should_stop(33)
    tm._hearing.view(confirming(3, 34, True))
    assert tm.should_stop(34)


def test_an_unconfirmed_stop_is_given_up_after_stop_confirm_seconds_and_acked_as_missed(caplog):
    tm, sink, _ = make(stop_on={"nan_divergence"}, stop_confirm_seconds=0.05)
    tm._hearing.view(confirming(1, 32, False))
    assert not tm.should_stop(32)  # a rank never acked: no stop, rather than a stop some rank does not take
    assert "the stop at step 32 was not confirmed by every rank of run elastic-run within 0.05s" in caplog.text
    tm.pump()
    assert acks(sink) == [{"step": 32}, {"step": 32, "checked": 32}]  # the second says: missed, move it
    assert not tm.should_stop(33)
    tm._hearing.view(confirming(2, 32, True))  # confirmed too late for this rank: it already went on
    assert not tm.should_stop(34)
    tm._hearing.view(confirming(3, 36, False))  # the sidecar moved it
    tm._hearing.view(confirming(4, 36, True))
    assert tm.should_stop(36)


def test_an_older_sidecar_without_confirmation_gets_no_ack_and_the_stop_is_taken_without_waiting():
    tm, sink, _ = make(stop_on={"nan_divergence"}, stop_confirm_seconds=30.0)
    tm._hearing.view(view(1, {"nan_divergence": 32})["runs"]["elastic-run"])
    tm.pump()
    assert acks(sink) == [] and tm.should_stop(32)


def test_the_partial_miss_of_the_deadlock_stops_neither_rank_at_the_stop_and_both_at_the_moved_one():
    """The lead's hang: rank 0 hears stop 32 before checking step 32, rank 1 just after. Before acks, rank 0 left
    after 32 while rank 1 waited in step 33's all-reduce forever. Now neither stops at 32, both at the moved
    stop. Two clients, the real sidecar logic (a Service fed by their sends), the views handed over by hand
    (the long poll) in the order of the race."""
    from trainhealth.config import Settings
    from trainhealth.service import Service

    service = Service(Settings(), clock=lambda: 1_000_000.0)

    class ToService(FakeSender):
        def send(self, records, batch_id=None):
            answer = service.ingest(json.dumps(records).encode(), "application/json")
            assert answer.status == 200, answer.body
            return super().send(records, batch_id)

    ranks = [make(ToService(), run="r", rank=r, world_size=2, stop_on={"nan_divergence"})[0] for r in (0, 1)]
    a, b = ranks

    def poll(tm: Telemetry) -> None:
        tm._hearing.view(service.stop_steps.view("r"))
        tm.pump()  # its ack, if it heard a new stop

    for tm in ranks:
        tm.start()
        for step in range(1, 31):
            tm.record(step, loss=math.nan if (tm.rank, step) == (1, 30) else 1.0)
            assert not tm.should_stop(step)
        tm.pump()
    stop = service.stop_steps.view("r")["stops"]["nan_divergence"]
    assert (stop["step"], stop["confirmed"]) == (32, False)
    a.record(31, loss=math.nan)
    assert not a.should_stop(31)
    poll(a)  # rank 0 hears 32 at step 31: in time
    for step in (31, 32):
        b.record(step, loss=math.nan)
        assert not b.should_stop(step)  # rank 1 has not heard yet: it passes 32
    b.pump()
    poll(b)  # rank 1 hears 32 after checking 32: its ack says so, and the stop moves at once
    stop = service.stop_steps.view("r")["stops"]["nan_divergence"]
    assert (stop["step"], stop["confirmed"], stop["moved"]) == (34, False, 1)
    a.record(32, loss=math.nan)
    thread, said = asking(a, 32)  # rank 0 at the stop it heard in time: it waits, it does not leave
    thread.join(0.2)
    assert thread.is_alive() and said == []
    poll(a)  # the moved stop
    thread.join(10)
    assert said == [False]  # rank 0 goes on into step 33 with rank 1
    poll(b)
    assert service.stop_steps.view("r")["stops"]["nan_divergence"]["confirmed"] is True
    for tm in ranks:
        tm._hearing.view(service.stop_steps.view("r"))
    stopped = {}
    for tm in ranks:
        for step in (33, 34):
            if tm.should_stop(step):
                stopped[tm.rank] = step
                break
    assert stopped == {0: 34, 1: 34}
    assert [r["stop_ack"] for r in a._sender.records if "stop_ack" in r] == [{"step": 32, "checked": 31},
                                                                             {"step": 34, "checked": 32}]
    assert [r["stop_ack"] for r in b._sender.records if "stop_ack" in r] == [{"step": 32, "checked": 32},
                                                                             {"step": 34, "checked": 32}]
