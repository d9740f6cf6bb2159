"""The detectors, in the order they see each record.

Add a detector by writing a module with a ``Detector`` subclass and listing it
here; the config (``config/load.py``) finds its settings by ``name``.
"""

from __future__ import annotations

from typing import Any

from .base import Detector
from .gpu_health import GpuDegraded, GpuFault
from .gpu_memory import GpuOom, GpuOomRisk
from .host_memory import HostMemoryLeak
from .liveness import RankStalled
from .lr_scaling import LrScaling
from .nan_divergence import NanDivergence
from .rank_failed import RankFailed
from .spikes import GradExplosion, LossSpike
from .straggler import Straggler

ALL: list[type[Detector[Any]]] = [
    LrScaling,
    LossSpike,
    GradExplosion,
    NanDivergence,
    GpuOomRisk,
    GpuOom,
    HostMemoryLeak,
    RankFailed,
    RankStalled,
    Straggler,
    GpuFault,
    GpuDegraded,
]

__all__ = ["ALL", "Detector"]
