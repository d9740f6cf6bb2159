"""Compute time and collective wait of each optimizer step, for the straggler detector (docs/record.md).

In synchronous data-parallel training every rank's step takes as long as the slowest rank's: the
others wait in the gradient all-reduce. What tells the slow rank apart is how the step splits:

- ``compute_seconds``: from ``begin()`` (the batch in hand) to the last gradient accumulated by the
  backward pass (post-accumulate-grad hooks: on every parameter for the first measured step, which
  learns the order the gradients come in, then only on the last ``KEEP`` of them: a Python call costs
  ~0.8 us per hooked parameter, so a 300-tensor model keeps paying 3 us a step instead of 250);
- ``comm_wait_seconds``: from that last gradient to ``end()`` (called after ``backward()`` returned,
  before the optimizer step): the time DDP's backward spent waiting for its all-reduce, which is
  the time its peers made it wait.

    timer = StepTimer(model)                   # any module; DDP's wrapper or what it wraps
    timer.begin()
    loss = model(x).loss; loss.backward()
    tm.record(step, loss=loss, **timer.end())  # {"compute_seconds": ..., "comm_wait_seconds": ...}

On the CPU (gloo) the host does the work and waits for the all-reduce: wall clock. On CUDA the host
runs ahead of the device and NCCL's wait is the device's, so the three points are CUDA events
recorded on the current stream (``begin()``, the last gradient's hook, ``end()``: after DDP made the
stream wait for its all-reduce). Nothing waits for them: ``end()`` returns the oldest step whose last
event the device has passed (``event.query()``, then ``elapsed_time`` of finished events: no sync),
usually a step or two old, or {} while none is done. The straggler
compares medians over 20 samples, so a lag of a few steps changes nothing.

With gradient accumulation, ``begin()`` counts from the first micro-batch after the previous ``end()``.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

KEEP = 4  # hooked parameters after the first step: the last ones to get their gradient
MAX_PENDING = 64  # CUDA steps whose events the device has not passed yet; older ones are dropped


class StepTimer:
    def __init__(self, model: Any = None, *, clock: Callable[[], float] = time.perf_counter,
                 cuda: Any = None) -> None:
        """``cuda``: the ``torch.cuda`` module whose events time CUDA steps (taken when the parameters are
        on CUDA; tests pass a fake to drive that path on the CPU)."""
        self._clock = clock
        self._cuda = cuda
        self._events: Any = None  # the cuda module while timing with events, else None (wall clock)
        self._begun: float | None = None
        self._last_grad: float | None = None
        self._marks: list[Any] | None = None  # CUDA: [begin, last gradient] events of the step under way
        self._pending: deque[tuple[Any, Any, Any]] = deque()
        self._handles: dict[int, Any] = {}  # id(param) -> its hook's handle
        self._order: list[int] | None = None  # while learning: ids of the params in the order their grads came
        if model is not None:
            self.attach(model)

    def attach(self, model: Any) -> None:
        """Hook every parameter that takes a gradient (again: the old hooks are removed)."""
        self.detach()
        params = [p for p in model.parameters() if p.requires_grad]
        if self._cuda is not None or any(p.is_cuda for p in params):
            if self._cuda is None:
                import torch

                self._cuda = torch.cuda
            self._events = self._cuda
        self._order = []
        for p in params:
            self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._on_grad)

    def detach(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}
        self._order = None

    def _on_grad(self, param: Any) -> None:
        marks = self._marks
        if marks is not None:
            if marks[1] is None:
                marks[1] = self._events.Event(enable_timing=True)
            marks[1].record()  # re-recorded by each hooked gradient: the last one counts
        else:
            self._last_grad = self._clock()
        if self._order is not None:
            self._order.append(id(param))

    def _learned(self) -> None:
        """After the first step with gradients: keep the hooks of the last KEEP parameters to get theirs."""
        order, self._order = self._order, None
        keep = set(order[-KEEP:]) if order else set(self._handles)
        for key in [k for k in self._handles if k not in keep]:
            self._handles.pop(key).remove()

    def begin(self) -> None:
        """The step's compute starts (the batch is in hand); ignored until the step's ``end()``."""
        if self._events is not None:
            if self._marks is None:
                start = self._events.Event(enable_timing=True)
                start.record()
                self._marks = [start, None]
        elif self._begun is None:
            self._begun = self._clock()
            self._last_grad = None

    def end(self) -> dict[str, float]:
        """After backward (and DDP's all-reduce) returned: the step's two fields, or {} when not measured
        (no ``begin()``, no gradient this step; on CUDA, no step done on the device yet). Starts the next
        step's count."""
        if self._order:
            self._learned()
        if self._events is not None:
            return self._end_events()
        now = self._clock()
        begun, last = self._begun, self._last_grad
        self._begun = self._last_grad = None
        if begun is None or last is None or last < begun:
            return {}
        return {"compute_seconds": last - begun, "comm_wait_seconds": max(0.0, now - last)}

    def _end_events(self) -> dict[str, float]:
        marks, self._marks = self._marks, None
        if marks is not None and marks[1] is not None:
            stop = self._events.Event(enable_timing=True)
            stop.record()  # after backward returned: DDP made this stream wait for the all-reduce
            self._pending.append((marks[0], marks[1], stop))
            if len(self._pending) > MAX_PENDING:
                self._pending.popleft()
        pending = self._pending
        if not pending or not pending[0][2].query():  # cudaEventQuery: returns at once, never waits
            return {}
        start, ready, stop = pending.popleft()  # one step per call: the lag stays where it is
        # elapsed_time of two finished events: no sync (milliseconds)
        return {"compute_seconds": start.elapsed_time(ready) / 1000.0,
                "comm_wait_seconds": max(0.0, ready.elapsed_time(stop) / 1000.0)}
