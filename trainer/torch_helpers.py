"""torch-side telemetry: tensor values without a GPU sync, allocator stats, NVML, OOM capture.

The client uses ``TorchProbe`` automatically when torch is imported. Its two halves run on
different threads:

- ``stage()`` on the training thread, inside ``record()``: a CUDA loss or grad norm is copied
  into pinned host memory with ``non_blocking=True`` and a CUDA event is recorded after the
  copy. Nothing waits for the GPU. (``loss.item()`` here would be a CPU-GPU sync point on
  every step.) A CPU tensor is just read: that is not a device sync. The pinned buffer and the
  event come from a pool (``Slots``): made once, given back when the background thread has read
  the values, so a call costs the copies (one ``torch._foreach_copy_`` for all of them) and one event
  record, not an allocation and a new event.
- ``sample()`` on the background thread, every client cycle (about a second): the caching
  allocator's counters (host-side bookkeeping, no device sync), the peak since the previous
  cycle, and every few seconds NVML utilisation and temperature. Samples recorded after it
  carry these values.

The background thread reads a staged value only once ``event.query()`` says the copy is done.

Everything degrades on a CPU-only machine: no GPU fields, CPU tensors read at once. The GPU
paths are unit-tested with a fake ``cuda`` module object passed in (``cuda=``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from typing import Any, Callable, Iterator

import torch

from . import nvml as nvml_mod

log = logging.getLogger("trainhealth.trainer.torch_helpers")

DEFAULT_OOM_FLUSH_SECONDS = 2.0


_copy: Any = getattr(torch, "_foreach_copy_", None) or (  # one dispatch for every copy (torch >= 2.1)
    lambda dst, src, non_blocking: [d.copy_(t, non_blocking=non_blocking) for d, t in zip(dst, src)])
_set_grad_enabled: Callable[[bool], None] = torch._C._set_grad_enabled  # (torch.no_grad() costs ~1 us a call)
SLOT_VALUES = 8  # values one pooled slot holds (loss, grad norm, grad scale, ...); more get a slot of their own
MAX_FREE_SLOTS = 64  # slots kept for reuse (one per record in flight; the client holds a few at a time)


class Slot:
    """A pinned host buffer, a view per element of it (each made once: indexing per copy costs a dispatch),
    and the CUDA event recorded after the copies into it."""

    __slots__ = ("size", "buf", "views", "event")

    def __init__(self, size: int, pinned: bool, cuda: Any) -> None:
        self.size = size  # (len() of a tensor goes through Python)
        self.buf = torch.empty(size, dtype=torch.float32, pin_memory=pinned)
        self.views: list[torch.Tensor] = []  # made as first needed: a slot that is never reused makes few
        self.event = cuda.Event()


class Slots:
    """Free slots, taken on the training thread and given back on the background thread once read (a deque:
    append and pop are atomic). A slot is reused only after its values were read, so after its copies."""

    def __init__(self, pinned: bool, cuda: Any) -> None:
        self.pinned = pinned
        self.cuda = cuda
        self.free: deque[Slot] = deque()
        self.made = 0  # slots ever made (tests, benchmarks)

    def take(self, n: int) -> Slot:
        if n <= SLOT_VALUES:
            try:
                return self.free.pop()
            except IndexError:
                pass
        self.made += 1
        return Slot(max(n, SLOT_VALUES), self.pinned, self.cuda)

    def give(self, slot: Slot) -> None:
        if slot.size == SLOT_VALUES and len(self.free) < MAX_FREE_SLOTS:
            self.free.append(slot)


class Staged:
    """Values on their way from the device to pinned host memory."""

    __slots__ = ("names", "slot", "pool")

    def __init__(self, names: list[str], slot: Slot, pool: Slots | None = None) -> None:
        self.names = names
        self.slot = slot
        self.pool = pool

    def ready(self) -> bool:
        return bool(self.slot.event.query())  # cudaEventQuery: returns at once, never waits

    def values(self) -> dict[str, float]:
        """The values (pinned host memory, the copy is done: no sync); the slot goes back to the pool,
        so call this once."""
        values = dict(zip(self.names, self.slot.buf.tolist()))  # (a slice first would cost a dispatch)
        if self.pool is not None:
            self.pool.give(self.slot)
            self.pool = None
        return values


class TorchProbe:
    tensor_type = torch.Tensor  # what record() hands to stage() without a look (its subclasses go by _put)

    def __init__(self, cuda: Any = None, *, sample_seconds: float = 5.0, reset_peak: bool = True,
                 defer_all: bool = False, nvml: Any = None, device: int | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """``cuda``: the ``torch.cuda`` module (tests pass a fake). ``reset_peak``: reset the allocator's
        peak statistics at each sample so the peak is per interval (this also resets them for anyone else
        reading ``max_memory_allocated``). ``defer_all``: stage CPU tensors too (tests drive the deferred
        path without a GPU). ``nvml``: the pynvml module (tests pass a fake)."""
        self.cuda = torch.cuda if cuda is None else cuda
        self.on_gpu = bool(self.cuda.is_available())
        self.sample_seconds = sample_seconds
        self.reset_peak = reset_peak
        self.defer_all = defer_all
        self.device = device
        self._nvml_module = nvml
        self._nvml: Any = None
        self._nvml_tried = False
        self._next_nvml = 0.0
        self._nvml_fields: dict[str, float] = {}
        self._monotonic = monotonic
        self._warned: set[str] = set()
        self.slots = Slots(self.on_gpu and not defer_all, self.cuda)

    # -- training thread -----------------------------------------------------------------------------
    def bind(self) -> None:
        """Called on the training thread at its first record: learn its CUDA device if it has one.
        (The background thread's current device is not the training thread's.)"""
        if self.device is None and self.on_gpu and self.cuda.is_initialized():
            self.device = self.cuda.current_device()

    def stage(self, tensors: dict[str, Any]) -> tuple[dict[str, float], Staged | None]:
        """Values readable now (CPU tensors), and the device values staged for later. Runs on every
        ``record()`` with a tensor: the checks are ordered for the common case, a 0-dim tensor."""
        now: dict[str, float] = {}
        names: list[str] = []
        values: list[torch.Tensor] = []
        grads = False  # a value requires grad: copied with autograd off (no detach, no graph)
        for name, value in tensors.items():
            if type(value) is not torch.Tensor and not isinstance(value, torch.Tensor):
                if not hasattr(value, "_get_scale_async") or not value.is_enabled():
                    continue
                value = value._get_scale_async()  # a GradScaler's scale tensor (get_scale() would sync)
                if value is None:  # before its first step
                    continue
            if value.dim():  # not 0-dim: one element of any shape is reshaped (a copy into a 0-dim view)
                if value.numel() != 1:
                    self._warn_once(name, f"{name}: expected a one-element tensor, got shape "
                                          f"{tuple(value.shape)}; not recorded")
                    continue
                value = value.reshape(())
            if value.is_cpu and not self.defer_all:
                now[name] = value.item()  # a CPU tensor: reading it does not touch a device
            else:
                names.append(name)
                values.append(value)
                grads = grads or value.requires_grad
        if not names:
            return now, None
        if self.device is None and self.on_gpu and values[0].device.type == "cuda":
            self.device = values[0].device.index
        n = len(names)
        free = self.slots.free
        slot = free.pop() if free and n <= SLOT_VALUES else self.slots.take(n)  # (a deque's pop is atomic)
        views = slot.views
        while len(views) < n:
            views.append(slot.buf[len(views)])
        # into pinned memory, asynchronous (no sync); one call for all of them, converted to float32 on the
        # device (a non-blocking copy converts on the source's device)
        if len(views) > n:
            views = views[:n]
        if grads and torch.is_grad_enabled():
            _set_grad_enabled(False)
            try:
                _copy(views, values, non_blocking=True)
            finally:
                _set_grad_enabled(True)
        else:
            _copy(views, values, non_blocking=True)
        slot.event.record()  # on the current stream, after the copies
        return now, Staged(names, slot, self.slots)

    # -- background thread ---------------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """GPU memory fields (and NVML metrics every few seconds) for the next samples."""
        if not self.on_gpu or self.device is None:
            return {}
        dev = self.device
        fields: dict[str, Any] = gpu_memory_fields(self.cuda, dev)
        if self.reset_peak:
            self.cuda.reset_peak_memory_stats(dev)
        metrics = self._sample_nvml(dev)
        if metrics:
            fields["metrics"] = metrics
        return fields

    def _sample_nvml(self, dev: int) -> dict[str, float]:
        now = self._monotonic()
        if now < self._next_nvml:
            return self._nvml_fields
        self._next_nvml = now + self.sample_seconds
        if not self._nvml_tried:
            self._nvml_tried = True
            self._nvml = nvml_mod.open_device(pci_bus_id(self.cuda.get_device_properties(dev)), dev,
                                              self._nvml_module)
        if self._nvml is not None:
            try:
                self._nvml_fields = self._nvml.sample()
            except Exception as exc:
                self._warn_once("nvml", f"NVML read failed, no more GPU utilisation: {exc!r}")
                self._nvml = None
                self._nvml_fields = {}
        return self._nvml_fields

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("trainhealth: %s", message)


def pci_bus_id(props: Any) -> str | None:
    """'0000:65:00.0' from torch's device properties (attributes of CUDA builds of torch >= 2.2)."""
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return None
    return f"{getattr(props, 'pci_domain_id', 0):04x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"


def gpu_memory_fields(cuda: Any, device: int | None = None) -> dict[str, float]:
    """The caching allocator's state now, peak since its last reset (host-side counters: no device sync)."""
    if device is None:
        device = cuda.current_device()
    stats = cuda.memory_stats(device)
    return {
        "gpu_mem_allocated_bytes": stats.get("allocated_bytes.all.current", 0),
        "gpu_mem_reserved_bytes": stats.get("reserved_bytes.all.current", 0),
        "gpu_mem_peak_bytes": stats.get("allocated_bytes.all.peak", 0),
        "gpu_mem_total_bytes": float(cuda.get_device_properties(device).total_memory),
    }


def report_oom(telemetry: Any, exc: BaseException, cuda: Any = None, step: int | None = None) -> None:
    """Send an ``oom`` record for a CUDA out-of-memory error, with the allocator's summary as ``detail``,
    once per exception (marked, so an ``oom_guard`` and the crash hook do not both send it)."""
    cuda = torch.cuda if cuda is None else cuda
    fields: dict[str, Any] = {}
    detail = None
    try:
        detail = cuda.memory_summary()
        fields = gpu_memory_fields(cuda)
    except Exception as inner:  # the report must not hide the OOM
        log.warning("trainhealth: could not read the allocator after an OOM: %r", inner)
    telemetry.oom(str(exc), step=step, detail=detail, **fields)
    try:
        exc._trainhealth_reported = True  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - an exception type with __slots__
        pass


@contextlib.contextmanager
def oom_guard(telemetry: Any, cuda: Any = None, step: int | None = None,
              flush_seconds: float = DEFAULT_OOM_FLUSH_SECONDS) -> Iterator[None]:
    """Catch ``torch.cuda.OutOfMemoryError``, send an ``oom`` record with the allocator's summary as
    ``detail`` (waiting up to ``flush_seconds`` for it to leave), and re-raise."""
    cuda = torch.cuda if cuda is None else cuda
    try:
        yield
    except cuda.OutOfMemoryError as exc:
        report_oom(telemetry, exc, cuda, step)
        telemetry.flush(flush_seconds)
        raise


def grad_norm(parameters: Any) -> torch.Tensor | None:
    """The global L2 norm of the gradients, for loops that do not clip (``clip_grad_norm_`` returns it):

        tm.record(step, loss=loss, grad_norm=grad_norm(model.parameters()))

    One fused norm over every gradient, left on the device as a 0-dim tensor: no host sync (the client
    reads it once its copy is done). ``parameters``: a module, tensors, or an iterable of them; None when
    no parameter has a gradient. Under AMP call it after ``scaler.unscale_(optimizer)``, as you would
    clip, or it is the scaled norm. Sharded parameters (FSDP, tensor parallel) give this rank's shard."""
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    elif isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.get_total_norm(grads, 2.0)
