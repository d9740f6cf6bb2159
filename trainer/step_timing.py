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

Wall clock, so only where the host waits for the work: the CPU (gloo). On CUDA the host runs
ahead of the device and the all-reduce waits on the device's streams, so host times say nothing:
there ``end()`` returns {} (not measured). With gradient accumulation, ``begin()`` counts from
the first micro-batch after the previous ``end()``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

KEEP = 4  # hooked parameters after the first step: the last ones to get their gradient


class StepTimer:
    def __init__(self, model: Any = None, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._begun: float | None = None
        self._last_grad: float | None = None
        self._handles: dict[int, Any] = {}  # id(param) -> its hook's handle
        self._order: list[int] | None = None  # while learning: ids of the params in the order their grads came
        self.measured = True  # False on CUDA parameters: host times would not be the device's
        if model is not None:
            self.attach(model)

    def attach(self, model: Any) -> None:
        """Hook every parameter that takes a gradient (again: the old hooks are removed)."""
        self.detach()
        params = [p for p in model.parameters() if p.requires_grad]
        self.measured = not any(p.is_cuda for p in params)
        if not self.measured:
            return
        self._order = []
        for p in params:
            self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._on_grad)

    def detach(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}
        self._order = None

    def _on_grad(self, param: Any) -> None:
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
        if self._begun is None:
            self._begun = self._clock()
            self._last_grad = None

    def end(self) -> dict[str, float]:
        """After backward (and DDP's all-reduce) returned: the step's two fields, or {} when not measured
        (CUDA, no ``begin()``, no gradient this step). Starts the next step's count."""
        now = self._clock()
        begun, last = self._begun, self._last_grad
        self._begun = self._last_grad = None
        if self._order:
            self._learned()
        if not self.measured or begun is None or last is None or last < begun:
            return {}
        return {"compute_seconds": last - begun, "comm_wait_seconds": max(0.0, now - last)}
