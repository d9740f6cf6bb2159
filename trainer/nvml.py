"""GPU utilisation, temperature and device memory in use from NVML (nvidia-ml-py).

Read every few seconds on the client's background thread. Everything here is
optional: without the library, a driver or a GPU, ``open_device`` returns None.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("trainhealth.trainer.nvml")


class NvmlDevice:
    def __init__(self, nvml: Any, handle: Any) -> None:
        self._nvml = nvml
        self._handle = handle

    def sample(self) -> dict[str, float]:
        nv, h = self._nvml, self._handle
        return {
            "gpu_util_percent": float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
            "gpu_temperature_celsius": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            # all processes and contexts on the device, not only PyTorch's caching allocator
            "gpu_device_used_bytes": float(nv.nvmlDeviceGetMemoryInfo(h).used),
        }


def open_device(pci_bus_id: str | None, index: int, nvml: Any = None) -> NvmlDevice | None:
    """The NVML device with this PCI bus id (CUDA_VISIBLE_DEVICES renumbers devices, PCI ids don't),
    else by index; None when NVML is unavailable."""
    try:
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
        if pci_bus_id:
            try:
                return NvmlDevice(nvml, nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id))
            except Exception as exc:
                log.debug("NVML: no device at PCI bus id %s (%r); using index %d", pci_bus_id, exc, index)
        return NvmlDevice(nvml, nvml.nvmlDeviceGetHandleByIndex(index))
    except Exception as exc:  # ImportError, NVMLError (no driver), ...
        log.info("trainhealth: NVML unavailable, no GPU utilisation/temperature: %r", exc)
        return None
