"""A fake of ``pynvml`` for one GPU. It is a fake because this machine has no GPU and no NVIDIA driver:
its constants, bitmasks and error classes are nvidia-ml-py's own (``pynvml.NVMLError_Timeout`` when no
event waits, ``NVMLError_NotSupported`` for what a device lacks, ``NVMLError_GpuIsLost`` once it fell
off the bus), and its functions take and return what the real ones do. Only the device is simulated:
tests set its counters, queue XID events and decide what it does not support."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace
from typing import Any

import pynvml


class FakeNvml:
    """An H100-like device at NVML index 3, PCI bus 00000000:65:00.0: healthy until a test says otherwise."""

    def __init__(self, *, unsupported: tuple[str, ...] = (), nvlinks: int = 18) -> None:
        self.unsupported = set(unsupported)  # function names that raise NVMLError_NotSupported
        self.nvlinks = nvlinks
        self.lost = False  # every call raises NVMLError_GpuIsLost
        self.xids: deque[int] = deque()  # events waiting in the event set
        self.registered: list[int] = []  # event types registered
        self.ecc = {pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: 0, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: 0}
        self.remapped = [0, 0, 0, 0]  # correctable rows, uncorrectable rows, pending, failure
        self.retired = {pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS: [],
                        pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR: []}
        self.retired_pending = 0
        self.reasons = pynvml.nvmlClocksEventReasonNone  # busy at full clock: no reason at all
        self.sm_clock = 1980
        self.sm_clock_max = 1980
        self.power_mw = 450_000
        self.power_limit_mw = 700_000
        self.nvlink_errors = {pynvml.NVML_NVLINK_ERROR_DL_REPLAY: 0, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY: 0,
                              pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT: 0, pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA: 0}
        self.pcie_replays = 0
        self.calls = 0
        self.counts: dict[str, int] = {}  # calls per function name

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML", "nvmlClocks", "nvmlEventType")):
            return getattr(pynvml, name)  # constants, bitmasks and error classes: the real ones
        raise AttributeError(name)

    def _call(self, name: str) -> None:
        self.calls += 1
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in self.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    # -- init and handles --------------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self._call("nvmlInit")

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str) -> str:
        self._call("nvmlDeviceGetHandleByPciBusId")
        if bus_id != "0000:65:00.0":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return "handle-3"

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self._call("nvmlDeviceGetHandleByIndex")
        return "handle-3"

    def nvmlDeviceGetIndex(self, handle: str) -> int:
        self._call("nvmlDeviceGetIndex")
        return 3

    def nvmlDeviceGetPciInfo(self, handle: str) -> Any:
        self._call("nvmlDeviceGetPciInfo")
        return SimpleNamespace(busId=b"00000000:65:00.0")  # bytes, as nvml's c_char array reads

    # -- utilisation (the existing metrics) ---------------------------------------------------------------
    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        self._call("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        self._call("nvmlDeviceGetTemperature")
        return 71

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        self._call("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(used=900, total=80 * 2**30, free=80 * 2**30 - 900)

    # -- XID events --------------------------------------------------------------------------------------
    def nvmlEventSetCreate(self) -> str:
        self._call("nvmlEventSetCreate")
        return "event-set"

    def nvmlDeviceRegisterEvents(self, handle: str, event_types: int, event_set: str) -> None:
        self._call("nvmlDeviceRegisterEvents")
        self.registered.append(event_types)

    def nvmlEventSetWait(self, event_set: str, timeout_ms: int) -> Any:
        self._call("nvmlEventSetWait")
        assert timeout_ms == 0, "the client must never wait for an event"
        if not self.xids:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        return SimpleNamespace(device="handle-3", eventType=pynvml.nvmlEventTypeXidCriticalError,
                               eventData=self.xids.popleft(), gpuInstanceId=0xFFFFFFFF,
                               computeInstanceId=0xFFFFFFFF)

    # -- memory errors -----------------------------------------------------------------------------------
    def nvmlDeviceGetTotalEccErrors(self, handle: str, error_type: int, counter_type: int) -> int:
        self._call("nvmlDeviceGetTotalEccErrors")
        assert counter_type == pynvml.NVML_VOLATILE_ECC
        return self.ecc[error_type]

    def nvmlDeviceGetRemappedRows(self, handle: str) -> tuple[int, int, int, int]:
        self._call("nvmlDeviceGetRemappedRows")
        corr, unc, pending, failure = self.remapped
        return corr, unc, pending, failure

    def nvmlDeviceGetRetiredPages(self, handle: str, cause: int) -> list[int]:
        self._call("nvmlDeviceGetRetiredPages")
        return list(self.retired[cause])

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: str) -> int:
        self._call("nvmlDeviceGetRetiredPagesPendingStatus")
        return self.retired_pending

    # -- clocks and power --------------------------------------------------------------------------------
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: str) -> int:
        self._call("nvmlDeviceGetCurrentClocksEventReasons")
        return self.reasons

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        self._call("nvmlDeviceGetClockInfo")
        assert clock == pynvml.NVML_CLOCK_SM
        return self.sm_clock

    def nvmlDeviceGetMaxClockInfo(self, handle: str, clock: int) -> int:
        self._call("nvmlDeviceGetMaxClockInfo")
        return self.sm_clock_max

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        self._call("nvmlDeviceGetPowerUsage")
        return self.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        self._call("nvmlDeviceGetEnforcedPowerLimit")
        return self.power_limit_mw

    # -- links -------------------------------------------------------------------------------------------
    def nvmlDeviceGetNvLinkState(self, handle: str, link: int) -> int:
        self._call("nvmlDeviceGetNvLinkState")
        if link >= self.nvlinks:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: str, link: int, counter: int) -> int:
        self._call("nvmlDeviceGetNvLinkErrorCounter")
        return self.nvlink_errors[counter] if link == 0 else 0  # the errors on link 0

    def nvmlDeviceGetPcieReplayCounter(self, handle: str) -> int:
        self._call("nvmlDeviceGetPcieReplayCounter")
        return self.pcie_replays
