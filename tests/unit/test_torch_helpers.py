"""torch helpers. There is no GPU on this machine: the GPU paths run against ``FakeCuda``, a fake of the
``torch.cuda`` module object passed in through the ``cuda=`` seam, and a fake ``pynvml``. CPU paths use
real torch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from trainhealth.record import from_obj
from trainhealth.trainer.client import Telemetry
from trainhealth.trainer.nvml import open_device
from trainhealth.trainer.torch_helpers import TorchProbe, oom_guard, pci_bus_id

from .trainer_fakes import ENV, Clock, FakeSender


class FakeEvent:
    """A fake CUDA event: the test decides when the device has finished."""

    instances: list[FakeEvent] = []

    def __init__(self):
        self.recorded = False
        self.done = False
        FakeEvent.instances.append(self)

    def record(self):
        self.recorded = True

    def query(self):
        return self.done


class FakeOutOfMemoryError(RuntimeError):
    pass


class FakeCuda:
    """Fake ``torch.cuda``: no GPU here, so the allocator, events and OOM are simulated."""

    OutOfMemoryError = FakeOutOfMemoryError
    Event = FakeEvent

    def __init__(self, available=True):
        self.available = available
        self.stats = {"allocated_bytes.all.current": 100, "reserved_bytes.all.current": 200,
                      "allocated_bytes.all.peak": 150}
        self.resets = 0
        FakeEvent.instances = []

    def is_available(self):
        return self.available

    def is_initialized(self):
        return True

    def current_device(self):
        return 1

    def memory_stats(self, device=None):
        assert device == 1
        return dict(self.stats)

    def reset_peak_memory_stats(self, device=None):
        self.resets += 1
        self.stats["allocated_bytes.all.peak"] = self.stats["allocated_bytes.all.current"]

    def get_device_properties(self, device):
        return SimpleNamespace(total_memory=1000, pci_bus_id=0x65, pci_device_id=0, pci_domain_id=0)

    def memory_summary(self, device=None, abbreviated=False):
        return "|  PyTorch CUDA memory summary  |"


class FakeNvml:
    """Fake ``pynvml``: a device at PCI bus 0000:65:00.0."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail_init=False):
        self.fail_init = fail_init
        self.reads = 0

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        assert bus_id == "0000:65:00.0"
        return "handle"

    def nvmlDeviceGetHandleByIndex(self, index):  # pragma: no cover - the PCI id is found
        return "by-index"

    def nvmlDeviceGetUtilizationRates(self, handle):
        self.reads += 1
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 71

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=900)


def gpu_probe(**kw):
    cuda = FakeCuda()
    clock = Clock()
    probe = TorchProbe(cuda=cuda, defer_all=True, nvml=kw.pop("nvml", FakeNvml()), monotonic=clock, **kw)
    return probe, cuda, clock


# -- reading tensor values ------------------------------------------------------------------------------

def test_cpu_tensors_are_read_at_once_on_a_cpu_machine():
    probe = TorchProbe()  # the real torch.cuda: no GPU here
    now, later = probe.stage({"loss": torch.tensor(float("nan"), requires_grad=True) * 1, "x": torch.ones(1)})
    assert later is None and math.isnan(now["loss"]) and now["x"] == 1.0
    assert probe.sample() == {}  # no GPU fields on the CPU


def test_device_values_are_copied_without_waiting_and_read_once_the_event_completes():
    probe, cuda, _ = gpu_probe()
    now, staged = probe.stage({"loss": torch.tensor(float("inf")), "grad_norm": torch.tensor([2.5])})
    assert now == {} and staged is not None
    (event,) = FakeEvent.instances
    assert event.recorded and not staged.ready()
    event.done = True
    assert staged.ready() and staged.values() == {"loss": math.inf, "grad_norm": 2.5}


def test_a_tensor_that_is_not_one_value_is_skipped_and_the_rest_kept():
    probe, _, _ = gpu_probe()
    now, staged = probe.stage({"loss": torch.ones(3), "lr": torch.tensor(0.1)})
    FakeEvent.instances[0].done = True
    assert staged.names == ["lr"]


def test_grad_scaler_scale_is_read_from_its_tensor_not_get_scale():
    probe = TorchProbe()
    scaler = torch.amp.GradScaler("cpu")
    assert probe.stage({"grad_scale": scaler}) == ({}, None)  # before the first step it has no scale yet
    scaler.scale(torch.tensor(1.0, requires_grad=True))
    assert probe.stage({"grad_scale": scaler})[0] == {"grad_scale": 65536.0}
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert probe.stage({"grad_scale": off}) == ({}, None)


def test_client_holds_a_gpu_loss_until_the_copy_is_done_and_nan_arrives_as_nan():
    probe, _, clock = gpu_probe()
    sink = FakeSender()
    tm = Telemetry(environ=ENV, sink=sink, probes=[probe], start_threads=False, clock=clock, monotonic=clock)
    tm.record(11, loss=1.0)  # the first record tells the probe the training thread's device
    FakeEvent.instances.clear()
    tm.pump()  # sends step 11 and measures the allocator
    tm.record(12, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(1.0), lr=0.1, grad_scale=None)
    tm.pump()
    assert [r["step"] for r in sink.records] == [11]
    FakeEvent.instances[0].done = True
    tm.pump()
    rec = sink.records[-1]
    assert math.isnan(rec["loss"]) and rec["grad_norm"] == 1.0 and rec["step"] == 12
    assert (rec["gpu_mem_allocated_bytes"], rec["gpu_mem_total_bytes"]) == (100, 1000.0)
    assert math.isnan(from_obj(rec).loss)


# -- allocator and NVML ---------------------------------------------------------------------------------

def test_gpu_memory_peak_is_per_interval():
    probe, cuda, _ = gpu_probe(sample_seconds=5.0)
    probe.bind()  # learns the training thread's device: 1
    first = probe.sample()
    assert {k: v for k, v in first.items() if k != "metrics"} == {
        "gpu_mem_allocated_bytes": 100, "gpu_mem_reserved_bytes": 200, "gpu_mem_peak_bytes": 150,
        "gpu_mem_total_bytes": 1000.0}
    assert probe.sample()["gpu_mem_peak_bytes"] == 100  # reset after the previous sample
    cuda.stats["allocated_bytes.all.peak"] = 400
    assert probe.sample()["gpu_mem_peak_bytes"] == 400 and cuda.resets == 3


def test_nvml_utilisation_and_temperature_go_into_metrics_every_few_seconds():
    nvml = FakeNvml()
    probe, _, clock = gpu_probe(nvml=nvml, sample_seconds=5.0)
    probe.bind()
    assert probe.sample()["metrics"] == {"gpu_util_percent": 87.0, "gpu_temperature_celsius": 71.0,
                                         "gpu_device_used_bytes": 900.0}
    clock.now += 4.0
    probe.sample()
    assert nvml.reads == 1
    clock.now += 1.0
    probe.sample()
    assert nvml.reads == 2


def test_without_nvml_the_gpu_fields_still_come():
    probe, _, _ = gpu_probe(nvml=FakeNvml(fail_init=True))
    probe.bind()
    fields = probe.sample()
    assert "metrics" not in fields and fields["gpu_mem_peak_bytes"] == 150
    assert open_device(None, 0, FakeNvml(fail_init=True)) is None


def test_pci_bus_id_is_formatted_for_nvml():
    assert pci_bus_id(SimpleNamespace(pci_bus_id=0x65, pci_device_id=0, pci_domain_id=0)) == "0000:65:00.0"
    assert pci_bus_id(SimpleNamespace()) is None


# -- OOM ------------------------------------------------------------------------------------------------

def test_oom_guard_sends_an_oom_record_with_the_allocator_summary_and_reraises():
    cuda = FakeCuda()
    sink = FakeSender()
    tm = Telemetry(environ=ENV, sink=sink, probes=[], start_threads=False)
    tm.record(99, loss=1.0)
    with pytest.raises(FakeOutOfMemoryError):
        with oom_guard(tm, cuda=cuda, flush_seconds=0.0):
            raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    tm.pump()
    oom = sink.records[-1]
    assert oom["type"] == "oom" and oom["step"] == 99 and oom["message"].startswith("CUDA out of memory")
    assert oom["detail"] == "|  PyTorch CUDA memory summary  |" and oom["gpu_mem_peak_bytes"] == 150
    assert oom["gpu_mem_total_bytes"] == 1000.0
    from_obj(oom)


def test_oom_guard_ignores_other_errors():
    sink = FakeSender()
    tm = Telemetry(environ=ENV, sink=sink, probes=[], start_threads=False)
    with pytest.raises(ValueError), oom_guard(tm, cuda=FakeCuda()):
        raise ValueError("not an OOM")
    tm.pump()
    assert sink.records == []


def test_pinned_buffers_and_events_are_reused_once_read_never_while_in_flight():
    probe, _, _ = gpu_probe()
    _, first = probe.stage({"loss": torch.tensor(1.0), "grad_norm": torch.tensor([2.0], dtype=torch.float16)})
    _, second = probe.stage({"loss": torch.tensor(3.0)})  # the first is still on its way: a slot of its own
    assert first.slot is not second.slot and len(FakeEvent.instances) == 2
    for event in FakeEvent.instances:
        event.done = True
    assert first.values() == {"loss": 1.0, "grad_norm": 2.0} and second.values() == {"loss": 3.0}
    _, third = probe.stage({"loss": torch.tensor(5.0), "lr": torch.tensor(0.5, dtype=torch.float64)})
    assert third.slot in (first.slot, second.slot) and len(FakeEvent.instances) == 2  # reused: no new event
    assert third.values() == {"loss": 5.0, "lr": 0.5}  # the reused buffer holds the new values
    assert probe.slots.made == 2
    many = {f"m{i}": torch.tensor(float(i)) for i in range(12)}  # more than a pooled slot holds
    _, big = probe.stage(many)
    FakeEvent.instances[-1].done = True
    assert big.values() == {f"m{i}": float(i) for i in range(12)}
    assert len(probe.slots.free) == 2  # the big slot is not kept
