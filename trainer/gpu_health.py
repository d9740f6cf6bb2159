"""The client's GPU health probe: NVML's view of the rank's GPU every few seconds, for heartbeats.

Used by the client when torch is imported and CUDA is available. ``bind()`` (the training thread, at
its first record) learns the rank's CUDA device; ``sample()`` (the background thread) opens that device
in NVML by its PCI bus id and, every ``sample_seconds``, returns ``{"gpu_health": {...}}``: the client
sends each reading once, in a heartbeat (docs/record.md), so a GPU fault is heard while the training
thread is stuck in a collective or dead, and ``record()`` costs nothing more.

Why each rank reads its own GPU (not one reader per node): the sample's rank then is the GPU's, no
rank has to be elected, and a GPU that no rank of the job uses is not the job's problem.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from . import nvml as nvml_mod

log = logging.getLogger("trainhealth.trainer.gpu_health")


class GpuHealthProbe:
    def __init__(self, cuda: Any = None, nvml: Any = None, *, sample_seconds: float = 5.0,
                 device: int | None = None, monotonic: Callable[[], float] = time.monotonic,
                 clock: Callable[[], float] = time.time) -> None:
        """``cuda``: the ``torch.cuda`` module, ``nvml``: the ``pynvml`` module (tests pass fakes)."""
        if cuda is None:
            import torch

            cuda = torch.cuda
        self.cuda = cuda
        self.nvml = nvml
        self.sample_seconds = sample_seconds
        self.device = device
        self._monotonic = monotonic
        self._clock = clock
        self._next = 0.0
        self._opened = False
        self._dev: nvml_mod.NvmlDevice | None = None
        self._failing = False
        self._lock = threading.Lock()  # the background thread's reading and a crash's read_now()

    def bind(self) -> None:
        """On the training thread: its CUDA device (the background thread's current device is not it)."""
        if self.device is None and self.cuda.is_available() and self.cuda.is_initialized():
            self.device = self.cuda.current_device()

    def read_now(self) -> dict[str, Any] | None:
        """A reading at once, whatever the interval (the client's crash report); None without one."""
        with self._lock:
            self._next = 0.0
            return self._sample().get("gpu_health")

    def sample(self) -> dict[str, Any]:
        with self._lock:
            return self._sample()

    def _sample(self) -> dict[str, Any]:
        if self.device is None:
            return {}
        now = self._monotonic()
        if now < self._next:
            return {}
        self._next = now + self.sample_seconds
        if not self._opened:
            self._opened = True
            from .torch_helpers import pci_bus_id

            props = self.cuda.get_device_properties(self.device)
            self._dev = nvml_mod.open_device(pci_bus_id(props), self.device, self.nvml, self._clock)
        if self._dev is None:
            return {}
        try:
            reading = self._dev.health()
        except Exception as exc:  # GPU lost, driver gone: said once, and tried again (it may be back)
            if not self._failing:
                log.warning("trainhealth: NVML health read failed: %r", exc)
            self._failing = True
            return {}
        self._failing = False
        return {"gpu_health": reading}
