"""The telemetry client without a network: a fake sink, the sender driven by hand (``pump``), a fake clock."""

from __future__ import annotations

import json
import math
import socket
import threading
from dataclasses import dataclass

import pytest
from trainhealth.record import from_obj
from trainhealth.trainer.client import STAGED, Telemetry
from trainhealth.trainer.settings import ClientSettings, from_environ
from trainhealth.trainer.transport import HttpSender, Result, classify, encode_json, encode_jsonl

from .trainer_fakes import ENV, Clock, FakeSender


def make(sink=None, probes=(), **kw) -> tuple[Telemetry, FakeSender, Clock]:
    sink = sink or FakeSender()
    clock = Clock()
    tm = Telemetry(environ=ENV, sink=sink, probes=list(probes), start_threads=False, clock=clock,
                   monotonic=clock, **kw)
    return tm, sink, clock


# -- settings -------------------------------------------------------------------------------------------

def test_settings_follow_torchrun_environment():
    s = from_environ(ENV)
    assert (s.run, s.rank, s.world_size, s.url) == ("elastic-run", 3, 4, "http://127.0.0.1:9464")


def test_trainhealth_run_overrides_the_torchelastic_run_id_and_url_token_offline_are_read():
    env = {**ENV, "TRAINHEALTH_RUN": "my-run", "TRAINHEALTH_URL": "http://10.0.0.5:9000/",
           "TRAINHEALTH_TOKEN": "s3", "TRAINHEALTH_OFFLINE": "/tmp/x-{rank}.jsonl",
           "TRAINHEALTH_HEARTBEAT_SECONDS": "0.5", "TRAINHEALTH_SAMPLE_SECONDS": "0.25"}
    s = from_environ(env)
    assert (s.run, s.url, s.token, s.offline_path, s.heartbeat_seconds, s.sample_seconds) == (
        "my-run", "http://10.0.0.5:9000", "s3", "/tmp/x-{rank}.jsonl", 0.5, 0.25)


def test_explicit_arguments_win_over_the_environment():
    s = from_environ(ENV, run="explicit", rank=0, world_size=1)
    assert (s.run, s.rank, s.world_size) == ("explicit", 0, 1)


def test_garbage_in_the_environment_is_ignored_or_sanitized():
    s = from_environ({"RANK": "x", "TRAINHEALTH_RUN": "my run/1", "TRAINHEALTH_FLUSH_SECONDS": "-1"})
    assert (s.rank, s.run, s.flush_seconds) == (0, "my-run-1", 1.0)


def test_bad_explicit_settings_name_the_field_and_value():
    with pytest.raises(ValueError, match=r"run: .* got 'bad run'"):
        ClientSettings(run="bad run")
    with pytest.raises(ValueError, match="capacity: must be >= 1, got 0"):
        ClientSettings(capacity=0)


# -- records --------------------------------------------------------------------------------------------

def test_known_fields_go_top_level_and_the_rest_into_metrics():
    np = pytest.importorskip("numpy")
    tm, sink, clock = make()
    tm.record(7, loss=0.5, lr=np.float32(0.25), grad_norm=2, step_time_seconds=0.1, batch_size=8.0,
              tokens_per_second=1234.5, world_size=4)
    tm.pump()
    (rec,) = sink.records
    assert rec == {"type": "sample", "run": "elastic-run", "rank": 3, "time": 1000.0, "step": 7, "loss": 0.5,
                   "lr": 0.25, "grad_norm": 2, "step_time_seconds": 0.1, "batch_size": 8, "world_size": 4,
                   "metrics": {"tokens_per_second": 1234.5}}
    assert type(rec["batch_size"]) is int
    from_obj(rec)  # the sidecar's contract accepts it


def test_record_never_raises_and_skips_what_it_cannot_read():
    tm, sink, _ = make()
    tm.record(1, loss="not a number")
    tm.record("x")  # a step that is not a number
    tm.record(2, loss=1.0)
    tm.pump()
    assert [r["step"] for r in sink.records] == [2]


def test_nan_and_infinity_are_written_as_bare_tokens_and_survive_the_contract():
    rec = {"type": "sample", "run": "r", "rank": 0, "time": 1.0, "step": 1, "loss": math.nan,
           "grad_norm": math.inf, "metrics": {"x": -math.inf}}
    body = encode_json([rec])
    assert b'"loss":NaN' in body and b'"grad_norm":Infinity' in body and b'"x":-Infinity' in body
    back = from_obj(json.loads(body)[0])
    assert math.isnan(back.loss) and back.grad_norm == math.inf and back.metrics == {"x": -math.inf}
    assert encode_jsonl([rec, rec]).count(b"\n") == 2


def test_start_carries_host_pid_world_size_and_the_config_as_an_object():
    @dataclass
    class Cfg:
        lr: float = 0.1

    tm, sink, _ = make()
    tm.start(batch_size=2, lr=0.1, reference_lr=0.8, reference_batch_size=16, warmup_steps=5, config=Cfg())
    tm.pump()
    (rec,) = sink.records
    assert rec["type"] == "start" and "step" not in rec
    assert rec["world_size"] == 4 and rec["config"] == {"lr": 0.1} and rec["pid"] > 0 and rec["host"]
    assert from_obj(rec).reference_batch_size == 16


def test_start_config_names_the_clients_stop_on_unless_it_already_does():
    def config(stop_on, **start):
        tm, sink, _ = make(stop_on=stop_on)
        tm.start(batch_size=2, **start)
        tm.pump()
        return sink.records[0].get("config")

    assert config({"rank_stalled", "nan_divergence"}) == {"stop_on": ["nan_divergence", "rank_stalled"]}
    assert config({"nan_divergence"}, config={"lr": 0.1}) == {"lr": 0.1, "stop_on": ["nan_divergence"]}
    assert config({"nan_divergence"}, config={"stop_on": "loss_spike"}) == {"stop_on": "loss_spike"}
    assert config((), config={"lr": 0.1}) == {"lr": 0.1} and config(()) is None


def test_heartbeat_end_and_oom_carry_the_last_completed_step():
    tm, sink, _ = make()
    tm.heartbeat()
    tm.record(41, loss=1.0)
    tm.heartbeat()
    tm.oom("CUDA out of memory" * 1000, detail="x" * 2_000_000, gpu_mem_peak_bytes=5e9)
    tm.end()
    tm.pump()
    kinds = [(r["type"], r["step"]) for r in sink.records]
    assert kinds == [("heartbeat", 0), ("sample", 41), ("heartbeat", 41), ("oom", 41), ("end", 41)]
    oom = sink.records[3]
    assert len(oom["message"]) == 4000 and len(oom["detail"]) == 1_000_000
    assert oom["gpu_mem_peak_bytes"] == 5e9
    from_obj(oom)


def test_context_manager_sends_end_on_success_only_and_lets_errors_through():
    tm, sink, _ = make()
    with tm:
        tm.record(1, loss=1.0)
    assert [r["type"] for r in sink.records] == ["sample", "end"]

    tm, sink, _ = make()
    with pytest.raises(KeyError), tm:
        tm.record(1, loss=1.0)
        raise KeyError("boom")
    assert [r["type"] for r in sink.records] == ["sample"]  # a crash is not an end


# -- buffer, batching, retries --------------------------------------------------------------------------

def test_full_buffer_drops_the_oldest_and_counts_them():
    tm, sink, _ = make(capacity=3)
    for step in range(1, 6):
        tm.record(step, loss=1.0)
    tm.pump()
    assert [r["step"] for r in sink.records] == [3, 4, 5]
    assert tm.stats()["dropped"] == 2
    tm.record(6, loss=1.0)  # samples after the loss say how many were lost
    tm.pump()
    assert sink.records[-1]["metrics"] == {"client_dropped_records": 2}


def test_batches_hold_at_most_batch_records_and_a_cycle_sends_them_all():
    tm, sink, _ = make(batch_records=4)
    for step in range(10):
        tm.record(step, loss=1.0)
    tm.pump()
    assert [len(b) for b in sink.batches] == [4, 4, 2]


def test_failed_send_keeps_records_in_order_and_backs_off_exponentially():
    sink = FakeSender([Result("retry", "down")] * 3)
    tm, sink, clock = make(sink, backoff_seconds=1.0, max_backoff_seconds=3.0)
    tm.record(1, loss=1.0)
    tm.pump()
    assert sink.attempts == 1 and tm.stats()["queued"] == 1
    tm.record(2, loss=2.0)
    clock.now += 0.9
    tm.pump()
    assert sink.attempts == 1  # still backing off: no attempt
    clock.now += 0.1
    tm.pump()  # second failure: next delay 2 s
    clock.now += 1.9
    tm.pump()
    assert sink.attempts == 2
    clock.now += 0.1
    tm.pump()  # third failure: delay capped at 3 s
    clock.now += 3.0
    tm.pump()
    # the failed batch is resent as it was, under its id (it may have landed); the later record follows
    assert [len(set(sink.ids[:4])), len(set(sink.ids))] == [1, 2]
    assert sink.attempts == 5
    assert [[r["step"] for r in b] for b in sink.batches] == [[1], [2]]
    assert tm.stats() == {"sent": 2, "dropped": 0, "rejected": 0, "failures": 3, "duplicates": 0, "queued": 0}


def test_retry_after_from_the_sidecar_is_honoured():
    tm, sink, clock = make(FakeSender([Result("retry", "busy", retry_after=7.0)]), backoff_seconds=0.5)
    tm.record(1, loss=1.0)
    tm.pump()
    clock.now += 6.9
    tm.pump()
    assert sink.attempts == 1
    clock.now += 0.1
    tm.pump()
    assert sink.attempts == 2 and len(sink.records) == 1


def test_refused_records_are_dropped_not_retried():
    tm, sink, _ = make(FakeSender([Result("drop", "HTTP 400: bad")]))
    tm.record(1, loss=1.0)
    tm.pump()
    tm.record(2, loss=1.0)
    tm.pump()
    assert [r["step"] for r in sink.records] == [2]
    assert tm.stats()["rejected"] == 1


def test_too_large_batches_are_split_and_a_single_too_large_record_dropped():
    tm, sink, _ = make(FakeSender([Result("split"), Result("split"), Result("split")]), batch_records=8)
    for step in range(8):
        tm.record(step, loss=1.0)
    tm.pump()  # 8 -> split, 4 -> split, 2 -> split, then 1-record batches go through
    assert [len(b) for b in sink.batches] == [1] * 8

    tm, sink, _ = make(FakeSender([Result("split")]), batch_records=1)
    tm.record(1, loss=1.0)
    tm.record(2, loss=1.0)
    tm.pump()
    assert [r["step"] for r in sink.records] == [2] and tm.stats()["rejected"] == 1


@pytest.mark.parametrize("status,outcome", [(200, "ok"), (202, "ok"), (400, "drop"), (422, "drop"),
                                            (413, "split"), (429, "retry"), (500, "retry"), (503, "retry"),
                                            (401, "retry")])
def test_http_status_classification(status, outcome):
    assert classify(status, "").outcome == outcome


def test_a_failed_send_names_the_url_it_tried_but_never_the_token_or_a_password():
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        sink = HttpSender(f"http://user:hunter2@127.0.0.1:{port}/th/", token="s3cret")
        result = sink.send([{"type": "sample"}])
    assert result.outcome == "retry"
    assert result.reason.endswith(f"(POST http://127.0.0.1:{port}/th/v1/ingest)"), result.reason
    assert "Connection refused" in result.reason
    assert "s3cret" not in result.reason and "hunter2" not in result.reason


# -- values the device has not finished (a fake stager: the client side of the deferred path) -----------

class FakeStaged:
    def __init__(self, values):
        self._values = values
        self.done = False

    def ready(self):
        return self.done

    def values(self):
        return self._values


class FakeStager:
    def __init__(self):
        self.staged: list[FakeStaged] = []

    def stage(self, tensors):
        staged = FakeStaged({k: v.value for k, v in tensors.items()})
        self.staged.append(staged)
        return {}, staged


class FakeTensor:
    def __init__(self, value):
        self.value = value

    def detach(self):  # pragma: no cover - marks it as a tensor
        return self


def test_unfinished_device_values_wait_while_later_heartbeats_go_out():
    stager = FakeStager()
    tm, sink, _ = make(probes=[stager])
    tm.record(5, loss=FakeTensor(math.nan), lr=0.1, my_metric=FakeTensor(3.0))
    tm.heartbeat()
    tm.pump()
    assert [r["type"] for r in sink.records] == ["heartbeat"]
    stager.staged[0].done = True
    tm.pump()
    sample = sink.records[1]
    assert sample["step"] == 5 and math.isnan(sample["loss"]) and sample["metrics"] == {"my_metric": 3.0}
    assert STAGED not in sample


# -- probes ---------------------------------------------------------------------------------------------

class FixedProbe:
    def __init__(self):
        self.value = 123

    def sample(self):
        return {"host_mem_bytes": self.value, "metrics": {"gpu_util_percent": 50.0}}


class BrokenProbe:
    def sample(self):
        raise RuntimeError("no /proc here")


def test_samples_carry_the_latest_measurement_without_overriding_what_the_loop_gave():
    probe = FixedProbe()
    probe.value = 100
    tm, sink, _ = make(probes=[BrokenProbe(), probe])  # measures once when built
    probe.value = 123
    tm.record(1, loss=1.0)
    tm.pump()  # the background thread measures every cycle
    tm.record(2, loss=1.0, host_mem_bytes=7, gpu_util_percent=99.0)
    tm.record(3, loss=1.0)
    tm.heartbeat()
    probe.value = 456
    tm.pump()  # sends 2, 3 and the heartbeat, measures again
    tm.record(4, loss=1.0)
    tm.pump()
    s1, s2, s3, hb, s4 = sink.records
    assert s1["host_mem_bytes"] == 100
    assert (s2["host_mem_bytes"], s2["metrics"]) == (7, {"gpu_util_percent": 99.0})
    assert (s3["host_mem_bytes"], s3["metrics"]) == (123, {"gpu_util_percent": 50.0})
    assert "host_mem_bytes" not in hb and s4["host_mem_bytes"] == 456


def test_measurements_go_on_while_the_sidecar_is_down():
    probe = FixedProbe()
    tm, sink, clock = make(FakeSender([Result("retry", "down")]), probes=[probe], backoff_seconds=10.0)
    tm.pump()
    tm.record(1, loss=1.0)
    tm.pump()  # fails: backing off for 10 s
    probe.value = 999
    clock.now += 1.0
    tm.pump()  # no send, but a new measurement
    tm.record(2, loss=1.0)
    clock.now += 10.0
    tm.pump()
    tm.pump()
    assert [(r["step"], r["host_mem_bytes"]) for r in sink.records] == [(1, 123), (2, 999)]


# -- threads --------------------------------------------------------------------------------------------

class SignallingSender(FakeSender):
    def __init__(self):
        super().__init__()
        self.heartbeat = threading.Event()

    def send(self, records, batch_id=None):
        result = super().send(records, batch_id)
        if any(r["type"] == "heartbeat" for r in records):
            self.heartbeat.set()
        return result


def test_heartbeats_keep_coming_while_the_training_thread_is_blocked():
    sink = SignallingSender()
    tm = Telemetry(environ=ENV, sink=sink, probes=[], heartbeat_seconds=0.05, flush_seconds=0.05)
    try:
        tm.record(9, loss=1.0)
        assert sink.heartbeat.wait(30)  # the training thread blocks here, as in a hung all-reduce
        assert tm.flush(10)
        beats = [r for r in sink.records if r["type"] == "heartbeat"]
        assert beats and all(r["step"] == 9 for r in beats)
    finally:
        tm.close()


def test_heartbeats_only_between_the_start_of_the_run_and_its_end():
    tm, sink, _ = make()
    tm._beat()  # what the heartbeat thread does every heartbeat_seconds
    tm.start(batch_size=1)
    tm._beat()
    tm.record(3, loss=1.0)
    tm._beat()
    tm.end()
    tm._beat()
    tm.pump()
    assert [(r["type"], r.get("step")) for r in sink.records] == [
        ("start", None), ("heartbeat", 0), ("sample", 3), ("heartbeat", 3), ("end", 3)]


def test_offline_mode_writes_jsonl_per_rank_that_the_contract_reads(tmp_path):
    path = tmp_path / "run-{rank}.jsonl"
    with Telemetry(environ=ENV, offline_path=str(path), probes=[]) as tm:
        tm.start(batch_size=2, lr=0.1)
        tm.record(1, loss=math.nan, lr=0.1)
    lines = (tmp_path / "run-3.jsonl").read_text().splitlines()
    records = [from_obj(json.loads(line)) for line in lines]
    assert [r.type for r in records] == ["start", "sample", "end"]
    assert math.isnan(records[1].loss) and '"loss":NaN' in lines[1]


# -- phases ---------------------------------------------------------------------------------------------

def beats(sink) -> list[tuple]:
    return [(r["step"], r.get("phase"), r.get("phase_time")) for r in sink.records if r["type"] == "heartbeat"]


def test_heartbeats_carry_the_phase_of_the_with_block_and_when_it_began():
    tm, sink, clock = make()
    tm.record(4, loss=1.0)
    tm._beat()
    with tm.phase("data"):
        clock.now = 1002.0
        tm._beat()  # the training thread waits for its batch
        with tm.phase("h2d-copy"):
            clock.now = 1003.0
            tm._beat()
        tm._beat()  # back in the outer phase, which began at 1000
    clock.now = 1004.0
    with tm.phase("step"):
        tm._beat()
    tm._beat()
    tm.set_phase("step")
    tm.record(5, loss=1.0)  # ends the step: no phase until the loop names the next one
    tm._beat()
    tm.pump()
    assert beats(sink) == [(4, None, None), (4, "data", 1000.0), (4, "h2d-copy", 1002.0), (4, "data", 1000.0),
                           (4, "step", 1004.0), (4, None, None), (5, None, None)]
    assert all(from_obj(r).phase == r.get("phase") for r in sink.records)  # the contract takes them
    assert "phase" not in [r for r in sink.records if r["type"] == "sample"][0]


def test_phase_block_lets_errors_through_and_restores_the_phase():
    tm, sink, _ = make()
    tm.start(batch_size=1)
    tm.set_phase("step")
    with pytest.raises(KeyError):
        with tm.phase("data"):
            raise KeyError("loader")
    tm._beat()
    tm.pump()
    assert beats(sink) == [(0, "step", 1000.0)]


@pytest.mark.parametrize("name", ["Data", "", "x" * 33, "data loading", 3, ["data"]])
def test_bad_phase_name_is_logged_never_raised_and_clears_the_phase(name, caplog):
    tm, sink, _ = make()
    tm.record(1, loss=1.0)
    tm.set_phase("step")
    with tm.phase(name):
        tm._beat()
    tm.set_phase(name)
    tm._beat()
    tm.pump()
    assert beats(sink) == [(1, None, None), (1, None, None)]  # the heartbeats are not lost to a rejection
    assert "must be 1-32 characters of [a-z0-9_-]" in caplog.text
