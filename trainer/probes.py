"""What the client measures for its samples, and the stager that reads tensors without a sync.

A probe is any object with ``sample() -> dict``: fields for the samples recorded from now on (``metrics``
go under the record's metrics; ``gpu_health`` goes out once, in a heartbeat of its own). It may also
have ``bind()`` (called on the training thread at its first record: which CUDA device it uses),
``stage(tensors)`` (it copies tensors off the device without a sync: torch_helpers.TorchProbe) and
``read_now()`` (a GPU health reading at a crash: gpu_health.py). ``Probes`` holds them: the background
thread calls ``refresh()`` every cycle, the training thread reads ``measured`` (one reference, swapped
whole) in every ``record()``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from . import host_memory
from .settings import ClientSettings

log = logging.getLogger("trainhealth.trainer.client")


class NoTensor:
    """The tensor type ``record()`` checks for before torch is in use: nothing is of this type."""


class Probes:
    def __init__(self, probes: list[Any], sample_seconds: float, warn: Callable[..., None]) -> None:
        self.all = probes
        self.sample_seconds = sample_seconds
        self._warn = warn
        self.measured: tuple[dict[str, Any], dict[str, Any] | None] = ({}, None)  # top-level fields, metrics
        self.stager: Any = next((p for p in probes if hasattr(p, "stage")), None)
        self.tensor_type: type = getattr(self.stager, "tensor_type", NoTensor)  # torch.Tensor with a stager
        self.bound = False

    def make_stager(self) -> Any:
        """The torch probe, made when the loop hands ``record()`` its first tensor (torch is imported then)."""
        from .torch_helpers import TorchProbe

        self.stager = stager = TorchProbe(sample_seconds=self.sample_seconds)
        self.all.append(stager)
        self.tensor_type = stager.tensor_type
        return stager

    def bind(self) -> None:
        """On the training thread, at its first record."""
        self.bound = True
        for probe in self.all:
            if hasattr(probe, "bind"):
                probe.bind()

    def refresh(self, send_health: Callable[[dict[str, Any]], None], counts: dict[str, int]) -> None:
        """Measure (each probe keeps its own interval) for the samples recorded from now on. A new GPU health
        reading goes to ``send_health`` (a heartbeat of its own: ``record()`` pays nothing for it); the
        client's ``counts`` give the samples its dropped records."""
        top: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        health = None
        for probe in self.all:
            try:
                fields = dict(probe.sample())
            except Exception as exc:
                self._warn(f"probe-{type(probe).__name__}", "%s failed: %r", type(probe).__name__, exc)
                continue
            metrics.update(fields.pop("metrics", None) or {})
            health = fields.pop("gpu_health", None) or health
            top.update(fields)
        if health is not None:
            send_health(health)
        dropped = counts["dropped"]
        if dropped:
            metrics["client_dropped_records"] = dropped
        self.measured = (top, metrics or None)  # one reference swap: the training thread reads either

    def gpu_health_now(self) -> list[dict[str, Any]]:
        """A GPU health reading now from each probe that reads one (at a crash: gpu_health.py)."""
        readings = []
        for probe in self.all:
            if hasattr(probe, "read_now"):
                try:
                    reading = probe.read_now()
                except Exception as exc:  # the report must not hide the crash
                    log.debug("trainhealth: GPU health at the crash: %r", exc)
                    continue
                if reading:
                    readings.append(reading)
        return readings


def default_probes(s: ClientSettings) -> list[Any]:
    """Host memory, and when the program uses torch, its allocator and the GPU's health."""
    probes: list[Any] = []
    if host_memory.available():
        probes.append(host_memory.HostMemory(interval=s.sample_seconds))
    if "torch" in sys.modules:  # only when the program uses torch: importing it costs seconds
        try:
            from .torch_helpers import TorchProbe

            probes.append(TorchProbe(sample_seconds=s.sample_seconds))
            import torch

            if torch.cuda.is_available():
                from .gpu_health import GpuHealthProbe

                probes.append(GpuHealthProbe(sample_seconds=s.sample_seconds))
        except Exception as exc:  # pragma: no cover - a broken torch install
            log.warning("trainhealth: torch helpers unavailable: %r", exc)
    return probes
