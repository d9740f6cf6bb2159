"""The rank's GPU from NVML (nvidia-ml-py): utilisation, temperature, memory, and its health.

Read every few seconds on the client's background thread. Everything here is
optional: without the library, a driver or a GPU, ``open_device`` returns None,
and a reading the device does not support (row remapping before Ampere, page
retirement after it, NVLink on a PCIe card) is left out, not an error.

``health()`` is the record's ``gpu_health`` object (docs/record.md, docs/gpu-health.md):
XID events (an NVML event set polled with a zero timeout: never blocks), volatile ECC
counts, row remapping, retired pages, clocks event (throttle) reasons, SM clock against
its maximum, power, NVLink and PCIe error counters.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

log = logging.getLogger("trainhealth.trainer.nvml")

MAX_XIDS = 32  # XID events kept (and sent on every reading): the oldest go first
MAX_EVENTS_PER_READ = 64  # a storm of events is read over several cycles, not in one


class NvmlDevice:
    def __init__(self, nvml: Any, handle: Any, clock: Callable[[], float] = time.time) -> None:
        self._nvml = nvml
        self._handle = handle
        self._clock = clock
        self._events: Any = None  # the XID event set, made at the first health reading
        self._events_tried = False
        self._events_failed = False
        self._xids: list[dict[str, Any]] = []
        self._unsupported: set[str] = set()  # readings this device said it does not support
        self._links: int | None = None  # NVLink links that exist (learned at the first reading)
        self.index: int | None = None
        self.pci_bus_id: str | None = None

    def sample(self) -> dict[str, float]:
        nv, h = self._nvml, self._handle
        return {
            "gpu_util_percent": float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
            "gpu_temperature_celsius": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            # all processes and contexts on the device, not only PyTorch's caching allocator
            "gpu_device_used_bytes": float(nv.nvmlDeviceGetMemoryInfo(h).used),
        }

    # -- health ---------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """One reading for the record's ``gpu_health`` (the fields the device supports)."""
        nv, h = self._nvml, self._handle
        if self.index is None:
            self.index = self._read("index", lambda: int(nv.nvmlDeviceGetIndex(h)))
            self.pci_bus_id = self._read("pci", lambda: _text(nv.nvmlDeviceGetPciInfo(h).busId))
        self._poll_xids()
        out: dict[str, Any] = {"index": self.index, "pci_bus_id": self.pci_bus_id}
        if self._xids:
            out["xids"] = [dict(x) for x in self._xids]
        out["ecc_uncorrected"] = self._read("ecc", lambda: int(nv.nvmlDeviceGetTotalEccErrors(
            h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)))
        out["ecc_corrected"] = self._read("ecc", lambda: int(nv.nvmlDeviceGetTotalEccErrors(
            h, nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_VOLATILE_ECC)))
        rows = self._read("remap", lambda: nv.nvmlDeviceGetRemappedRows(h))  # Ampere and later
        if rows is not None:
            out["remapped_rows_pending"] = bool(rows[2])
            out["remapped_rows_failed"] = bool(rows[3])
        else:  # page retirement: before Ampere
            pages = self._read("retired", lambda: sum(len(nv.nvmlDeviceGetRetiredPages(h, cause)) for cause in (
                nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
                nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)))
            out["retired_pages"] = pages
            pending = self._read("retired", lambda: nv.nvmlDeviceGetRetiredPagesPendingStatus(h))
            out["retired_pages_pending"] = None if pending is None else bool(pending)
        out["throttle_reasons"] = self._read("throttle", lambda: int(_reasons(nv, h)))
        out["sm_clock_mhz"] = self._read("clock", lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))
        out["sm_clock_max_mhz"] = self._read("clock", lambda: float(
            nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)))
        out["power_watts"] = self._read("power", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)  # mW
        out["power_limit_watts"] = self._read("power", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0)
        out.update(self._nvlink())
        out["pcie_replay_errors"] = self._read("pcie", lambda: int(nv.nvmlDeviceGetPcieReplayCounter(h)))
        return {k: v for k, v in out.items() if v is not None}

    def _read(self, what: str, read: Callable[[], Any]) -> Any:
        """``read()``, or None when this device does not support it (then never asked again). Other NVML
        errors (GPU lost, ...) go up: the reading as a whole failed."""
        if what in self._unsupported:
            return None
        try:
            return read()
        except self._nvml.NVMLError as exc:
            if _code(exc) in (self._nvml.NVML_ERROR_NOT_SUPPORTED, self._nvml.NVML_ERROR_FUNCTION_NOT_FOUND,
                              self._nvml.NVML_ERROR_NO_PERMISSION):
                self._unsupported.add(what)
                return None
            raise

    def _poll_xids(self) -> None:
        """XID events since the last poll: ``nvmlEventSetWait`` with a 0 ms timeout returns an event or
        raises NVMLError_Timeout at once."""
        nv = self._nvml
        if not self._events_tried:
            self._events_tried = True
            try:
                events = nv.nvmlEventSetCreate()
                nv.nvmlDeviceRegisterEvents(self._handle, nv.nvmlEventTypeXidCriticalError, events)
                self._events = events
            except nv.NVMLError as exc:
                log.info("trainhealth: NVML XID events unavailable on this GPU: %s", exc)
        if self._events is None:
            return
        for _ in range(MAX_EVENTS_PER_READ):
            try:
                data = nv.nvmlEventSetWait(self._events, 0)
            except nv.NVMLError as exc:
                if _code(exc) != nv.NVML_ERROR_TIMEOUT:  # said once, then quietly tried every reading
                    (log.debug if self._events_failed else log.info)("trainhealth: NVML XID event read failed: %s", exc)
                    self._events_failed = True
                return
            self._events_failed = False
            if data.eventType & nv.nvmlEventTypeXidCriticalError:
                self._xids.append({"xid": int(data.eventData), "time": self._clock()})
                del self._xids[:-MAX_XIDS]

    def _nvlink(self) -> dict[str, int]:
        """Error counters summed over the device's active NVLink links; {} without NVLink."""
        nv, h = self._nvml, self._handle
        if self._links is None:
            self._links = 0
            for link in range(int(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18))):
                try:
                    if nv.nvmlDeviceGetNvLinkState(h, link) == nv.NVML_FEATURE_ENABLED:
                        self._links = link + 1
                except nv.NVMLError:
                    break  # past the last link (or no NVLink at all)
        if not self._links:
            return {}
        totals = {"nvlink_replay_errors": 0, "nvlink_crc_errors": 0, "nvlink_recovery_errors": 0}
        counters = (("nvlink_replay_errors", nv.NVML_NVLINK_ERROR_DL_REPLAY),
                    ("nvlink_crc_errors", nv.NVML_NVLINK_ERROR_DL_CRC_FLIT),
                    ("nvlink_crc_errors", nv.NVML_NVLINK_ERROR_DL_CRC_DATA),
                    ("nvlink_recovery_errors", nv.NVML_NVLINK_ERROR_DL_RECOVERY))
        for link in range(self._links):
            for name, counter in counters:
                try:
                    totals[name] += int(nv.nvmlDeviceGetNvLinkErrorCounter(h, link, counter))
                except nv.NVMLError:
                    continue  # an inactive link, or a counter this link lacks
        return totals


def _reasons(nv: Any, handle: Any) -> int:
    """The clocks event reasons bitmask (the newer name of the throttle reasons, same bits)."""
    read = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(read(handle))


def _code(exc: BaseException) -> Any:
    return getattr(exc, "value", None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_device(pci_bus_id: str | None, index: int, nvml: Any = None,
                clock: Callable[[], float] = time.time) -> NvmlDevice | None:
    """The NVML device with this PCI bus id (CUDA_VISIBLE_DEVICES renumbers devices, PCI ids don't),
    else by index; None when NVML is unavailable."""
    try:
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
        if pci_bus_id:
            try:
                return NvmlDevice(nvml, nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id), clock)
            except Exception as exc:
                log.debug("NVML: no device at PCI bus id %s (%r); using index %d", pci_bus_id, exc, index)
        return NvmlDevice(nvml, nvml.nvmlDeviceGetHandleByIndex(index), clock)
    except Exception as exc:  # ImportError, NVMLError (no driver), ...
        log.info("trainhealth: NVML unavailable, no GPU utilisation/temperature/health: %r", exc)
        return None
