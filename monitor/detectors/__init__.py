"""The detectors, in the order they see each record.

Add a detector by writing a module with a ``Detector`` subclass and listing it
here; ``config.py`` finds its settings by ``name``.
"""

from __future__ import annotations

from .base import Detector
from .gpu_memory import GpuOom, GpuOomRisk
from .host_memory import HostMemoryLeak
from .nan_divergence import NanDivergence

ALL: list[type[Detector]] = [
    NanDivergence,
    GpuOomRisk,
    GpuOom,
    HostMemoryLeak,
]

__all__ = ["ALL", "Detector"]
