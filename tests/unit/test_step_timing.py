"""StepTimer: a step split into compute and collective wait, with real torch on the CPU (a fake clock
decides the times, so the test does not depend on this machine's speed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trainhealth.integrations._common import Reporter
from trainhealth.trainer.client import Telemetry
from trainhealth.trainer.step_timing import StepTimer

from .trainer_fakes import ENV, Clock, FakeSender


class Slow(nn.Module):
    """A linear layer whose forward takes ``seconds`` of the fake clock."""

    def __init__(self, clock: Clock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds
        self.layer = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.seconds
        return self.layer(x)


def test_compute_runs_to_the_last_gradient_and_the_wait_from_there_to_end():
    clock = Clock()
    model = Slow(clock, 0.25)
    timer = StepTimer(model, clock=clock)
    timer.begin()
    model(torch.ones(2, 4)).sum().backward()
    clock.now += 0.5  # DDP's backward waiting for its all-reduce, after the last gradient
    assert timer.end() == {"compute_seconds": 0.25, "comm_wait_seconds": 0.5}
    assert timer.end() == {}  # no step begun since


def test_gradient_accumulation_counts_from_the_first_micro_batch():
    clock = Clock()
    model = Slow(clock, 0.1)
    timer = StepTimer(model, clock=clock)
    for _ in range(3):
        timer.begin()
        model(torch.ones(2, 4)).sum().backward()
    assert timer.end() == {"compute_seconds": pytest.approx(0.3), "comm_wait_seconds": 0.0}


def test_a_step_without_gradients_is_not_measured():
    clock = Clock()
    timer = StepTimer(nn.Linear(4, 1), clock=clock)
    timer.begin()
    assert timer.end() == {}  # no backward


class FakeEvents:
    """Fake ``torch.cuda`` events (no GPU here): an event records the fake device clock when ``record()`` is
    called, and is done once the test moves ``done_until`` past it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.done_until = 0.0
        self.made = 0
        events = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing
                events.made += 1
                self.at: float | None = None

            def record(self) -> None:
                self.at = events.clock.now

            def query(self) -> bool:
                return self.at is not None and self.at <= events.done_until

            def elapsed_time(self, other: Event) -> float:
                assert self.query() and other.query(), "elapsed_time of an unfinished event would sync"
                return (other.at - self.at) * 1000.0

        self.Event = Event


def test_on_cuda_the_split_comes_from_events_read_once_the_device_passed_them():
    clock = Clock()
    events = FakeEvents(clock)
    model = Slow(clock, 0.25)
    timer = StepTimer(model, cuda=events, clock=lambda: 0.0)  # the host clock is never used on CUDA
    out = []
    for _ in range(3):
        timer.begin()
        model(torch.ones(2, 4)).sum().backward()
        clock.now += 0.5
        out.append(timer.end())
        clock.now += 0.01
    assert out == [{}, {}, {}]  # the device has finished none of them: nothing waited for
    events.done_until = clock.now
    got = timer.end()  # the oldest finished step, one per call
    assert got == {"compute_seconds": pytest.approx(0.25), "comm_wait_seconds": pytest.approx(0.5)}
    assert len(timer._pending) == 2


def test_detach_removes_the_hooks():
    clock = Clock()
    model = Slow(clock, 0.1)
    timer = StepTimer(model, clock=clock)
    timer.detach()
    timer.begin()
    model(torch.ones(2, 4)).sum().backward()
    assert timer.end() == {}


def test_the_callbacks_reporter_puts_the_split_into_the_steps_sample():
    clock, sink = Clock(), FakeSender()
    tm = Telemetry(environ=ENV, sink=sink, probes=[], start_threads=False)
    reporter = Reporter(tm, None, {}, {})
    model = Slow(clock, 0.2)
    reporter.time_steps(model)
    reporter.timer._clock = clock  # type: ignore[union-attr]  # the fake clock, for exact numbers
    reporter.compute_begins()
    model(torch.ones(2, 4)).sum().backward()
    clock.now += 0.05
    reporter.compute_ends()
    reporter.step(7, loss=1.0)
    tm.flush()
    sample = [r for r in sink.records if r["type"] == "sample"][0]
    assert sample["step"] == 7
    assert (sample["compute_seconds"], sample["comm_wait_seconds"]) == (pytest.approx(0.2), pytest.approx(0.05))
    reporter.end(7)
    assert reporter.timer is None
    tm.close()


def test_after_the_first_step_only_the_last_parameters_to_get_gradients_stay_hooked():
    clock = Clock()
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])  # 10 parameters
    timer = StepTimer(model, clock=clock)
    assert len(timer._handles) == 10
    for _ in range(3):
        timer.begin()
        clock.now += 0.1
        model(torch.ones(2, 4)).sum().backward()
        clock.now += 0.2
        assert timer.end() == {"compute_seconds": pytest.approx(0.1), "comm_wait_seconds": pytest.approx(0.2)}
    first = {id(p) for p in model[0].parameters()}  # backward reaches the first layer last
    assert first <= set(timer._handles) and len(timer._handles) == 4
