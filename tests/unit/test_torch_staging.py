"""The staged (GPU) path of ``record()`` as the per-call cost cuts left it: one copy call for every value, autograd
off only when a value requires grad, a tensor subclass still staged. No GPU here: ``FakeCuda`` of
test_torch_helpers.py stands in for ``torch.cuda`` (its events complete when the test says so)."""

from __future__ import annotations

import math

import torch
from trainhealth.trainer.client import Telemetry
from trainhealth.trainer.torch_helpers import TorchProbe

from .test_torch_helpers import FakeCuda, FakeEvent
from .trainer_fakes import ENV, Clock, FakeSender


def _client() -> tuple[Telemetry, FakeSender]:
    clock = Clock()
    sink = FakeSender()
    probe = TorchProbe(cuda=FakeCuda(), defer_all=True, monotonic=clock)
    tm = Telemetry(environ=ENV, sink=sink, probes=[probe], start_threads=False, clock=clock, monotonic=clock)
    return tm, sink


def _finish_and_send(tm: Telemetry) -> None:
    for event in FakeEvent.instances:
        event.done = True
    tm.flush()


def test_a_loss_that_requires_grad_is_copied_without_a_graph_and_grad_mode_is_restored():
    tm, sink = _client()
    weight = torch.tensor(3.0, requires_grad=True)
    loss = weight * 2  # requires grad, has a grad_fn: the loop passed the loss itself, not loss.detach()
    tm.record(1, loss=loss, grad_norm=torch.tensor([0.25], dtype=torch.float64), lr=0.1)
    assert torch.is_grad_enabled()  # the training thread's autograd is as it was
    assert not tm._probes.stager.slots.free  # in flight: the slot is not back in the pool yet
    _finish_and_send(tm)
    (rec,) = sink.records
    assert (rec["loss"], rec["grad_norm"], rec["lr"], rec["step"]) == (6.0, 0.25, 0.1, 1)
    (slot,) = tm._probes.stager.slots.free  # read, so given back
    assert not slot.buf.requires_grad and slot.buf.grad_fn is None  # the buffer holds no graph
    loss.backward()  # the loop's own graph is untouched
    assert weight.grad == 2.0


def test_a_parameter_and_a_half_precision_value_are_staged_like_any_tensor():
    tm, sink = _client()
    scale = torch.nn.Parameter(torch.tensor(4.0))  # a Tensor subclass: found by isinstance, not by type
    tm.record(2, loss=torch.tensor(float("nan"), dtype=torch.float16), grad_norm=scale, batch_size=8)
    _finish_and_send(tm)
    (rec,) = sink.records
    assert math.isnan(rec["loss"]) and rec["grad_norm"] == 4.0 and rec["batch_size"] == 8


def test_one_element_tensors_of_any_shape_are_read_and_others_skipped_in_the_same_call():
    tm, sink = _client()
    tm.record(3, loss=torch.tensor([[1.5]]), grad_norm=torch.ones(2), lr=torch.tensor([0.5]))
    _finish_and_send(tm)
    (rec,) = sink.records
    assert rec["loss"] == 1.5 and rec["lr"] == 0.5 and "grad_norm" not in rec


def test_pooled_slots_are_reused_across_many_records_with_values_intact():
    tm, sink = _client()
    for step in range(1, 201):
        tm.record(step, loss=torch.tensor(float(step)), grad_norm=torch.tensor(step / 2))
        if step % 10 == 0:
            _finish_and_send(tm)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in sink.records] == [
        (s, float(s), s / 2) for s in range(1, 201)]
    assert tm._probes.stager.slots.made <= 10  # at most the records in flight between two reads
