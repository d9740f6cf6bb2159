"""GPU health: NVML read by the client (against ``FakeNvml``, a fake of pynvml with its real constants and
error classes: there is no GPU here), sent in heartbeats, and judged by gpu_fault and gpu_degraded."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from trainhealth.config import ConfigError, detector_settings
from trainhealth.record import from_obj
from trainhealth.trainer.client import Telemetry
from trainhealth.trainer.gpu_health import GpuHealthProbe
from trainhealth.trainer.nvml import open_device

from tests.live_traces import RUN, T0, feed, settings

from .nvml_fake import FakeNvml
from .trainer_fakes import ENV, Clock, FakeSender


class FakeCuda:
    """``torch.cuda`` of a process on CUDA device 0, which is the machine's GPU 3 (CUDA_VISIBLE_DEVICES=3)."""

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def get_device_properties(self, device: int) -> Any:
        return SimpleNamespace(pci_bus_id=0x65, pci_device_id=0, pci_domain_id=0, total_memory=80 * 2**30)


def read(nvml: FakeNvml) -> dict[str, Any]:
    device = open_device("0000:65:00.0", 0, nvml, clock=lambda: T0 + 7.0)
    assert device is not None
    return device.health()


# -- what the client reads --------------------------------------------------------------------------------

def test_a_healthy_gpu_reads_as_healthy_with_every_field():
    assert read(FakeNvml()) == {
        "index": 3, "pci_bus_id": "00000000:65:00.0", "ecc_uncorrected": 0, "ecc_corrected": 0,
        "remapped_rows_pending": False, "remapped_rows_failed": False, "throttle_reasons": 0,
        "sm_clock_mhz": 1980.0, "sm_clock_max_mhz": 1980.0, "power_watts": 450.0, "power_limit_watts": 700.0,
        "nvlink_replay_errors": 0, "nvlink_crc_errors": 0, "nvlink_recovery_errors": 0, "pcie_replay_errors": 0}


def test_xid_events_are_polled_without_waiting_and_kept_across_readings():
    nvml = FakeNvml()
    device = open_device("0000:65:00.0", 0, nvml, clock=lambda: T0)
    assert device is not None
    assert "xids" not in device.health()
    assert nvml.registered == [pynvml.nvmlEventTypeXidCriticalError]
    nvml.xids.extend([79, 45])
    assert device.health()["xids"] == [{"xid": 79, "time": T0}, {"xid": 45, "time": T0}]
    assert device.health()["xids"] == [{"xid": 79, "time": T0}, {"xid": 45, "time": T0}]  # sent again


def test_what_a_device_does_not_support_is_left_out_and_not_asked_again():
    # a pre-Ampere PCIe card: no row remapper (page retirement instead), no NVLink, no clocks event reasons
    nvml = FakeNvml(unsupported=("nvmlDeviceGetRemappedRows", "nvmlDeviceGetNvLinkState",
                                 "nvmlDeviceGetCurrentClocksEventReasons"))
    nvml.retired[pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR] = [0x1000, 0x2000]
    device = open_device(None, 0, nvml)
    assert device is not None
    first = device.health()
    assert first["retired_pages"] == 2 and first["retired_pages_pending"] is False
    assert not {"remapped_rows_pending", "throttle_reasons", "nvlink_replay_errors"} & set(first)
    calls = nvml.calls
    device.health()
    assert nvml.calls - calls < calls  # the unsupported calls are not made again


def test_client_sends_each_reading_once_in_a_heartbeat_and_record_carries_none():
    nvml, sink, clock = FakeNvml(), FakeSender(), Clock()
    probe = GpuHealthProbe(FakeCuda(), nvml, sample_seconds=5.0, monotonic=clock, clock=clock)
    tm = Telemetry(environ=ENV, sink=sink, probes=[probe], start_threads=False, clock=clock)
    tm.record(1, loss=2.0)  # binds: the training thread's CUDA device
    nvml.xids.append(79)
    with tm.phase("step"):
        tm.pump()
        clock.now += 1.0
        tm.record(2, loss=2.0)
        tm.pump()  # within sample_seconds: no new reading
    beats = [r for r in sink.records if r["type"] == "heartbeat"]
    assert len(beats) == 1 and beats[0]["phase"] == "step" and beats[0]["step"] == 1
    health = beats[0]["gpu_health"]
    assert (health["index"], health["pci_bus_id"], health["xids"]) == (3, "00000000:65:00.0",
                                                                         [{"xid": 79, "time": 1000.0}])
    assert all("gpu_health" not in r for r in sink.records if r["type"] == "sample")
    from_obj(beats[0])  # the sidecar takes it as it is
    tm.close()


def test_a_gpu_that_fell_off_the_bus_is_said_once_and_the_client_goes_on(caplog):
    nvml, clock = FakeNvml(), Clock()
    probe = GpuHealthProbe(FakeCuda(), nvml, sample_seconds=5.0, monotonic=clock)
    probe.bind()
    assert "gpu_health" in probe.sample()
    nvml.lost = True
    with caplog.at_level(logging.WARNING, "trainhealth.trainer.gpu_health"):
        for _ in range(3):
            clock.now += 5.0
            assert probe.sample() == {}
    assert len(caplog.records) == 1 and "NVMLError_GpuIsLost" in caplog.records[0].getMessage()
    nvml.lost = False  # back (a driver reload): read again
    clock.now += 5.0
    assert "gpu_health" in probe.sample()


# -- what the sidecar makes of it -------------------------------------------------------------------------

HEALTHY = {"index": 3, "pci_bus_id": "00000000:65:00.0", "ecc_uncorrected": 0, "ecc_corrected": 0,
           "remapped_rows_pending": False, "remapped_rows_failed": False, "throttle_reasons": 0,
           "sm_clock_mhz": 1980.0, "sm_clock_max_mhz": 1980.0, "power_watts": 450.0, "power_limit_watts": 700.0,
           "nvlink_replay_errors": 0, "nvlink_crc_errors": 0, "nvlink_recovery_errors": 0, "pcie_replay_errors": 0}


def job(readings: dict[int, Any], ranks: int = 2, every: float = 5.0, steps: int = 60) -> list[Any]:
    """Two ranks on node-a and node-b; rank r's heartbeat k carries readings[r](k) (None: none)."""
    out: list[dict[str, Any]] = []
    for r in range(ranks):
        out.append({"type": "start", "run": RUN, "rank": r, "time": T0 + 0.01 * r, "world_size": ranks,
                    "host": f"node-{'ab'[r]}"})
    for k in range(1, steps + 1):
        for r in range(ranks):
            t = T0 + k * every + 0.01 * r
            out.append({"run": RUN, "rank": r, "time": t, "step": k, "loss": 1.0, "step_time_seconds": every})
            reading = readings.get(r, lambda k: dict(HEALTHY))(k)
            if reading is not None:
                out.append({"type": "heartbeat", "run": RUN, "rank": r, "time": t + 0.001, "step": k,
                            "gpu_health": reading})
    return [from_obj(o) for o in sorted(out, key=lambda o: o["time"])]


def gpu_alerts(records: list[Any], **kw: Any) -> list[dict[str, Any]]:
    return [a for a in feed(records, **kw) if a["alert"] in ("gpu_fault", "gpu_degraded")]


def test_healthy_gpus_at_work_raise_nothing():
    def busy(k: int) -> dict[str, Any]:
        # the ordinary life of a busy GPU: held at its power cap (a software limit), clocks a little down,
        # a few corrected errors over an hour, idle between epochs
        return {**HEALTHY, "throttle_reasons": pynvml.nvmlClocksEventReasonSwPowerCap if k % 3 else 0,
                "sm_clock_mhz": 1755.0 if k % 3 else 1980.0, "ecc_corrected": k // 10,
                "nvlink_replay_errors": k // 20, **({"throttle_reasons": 1, "sm_clock_mhz": 345.0} if k % 25 == 0
                                                     else {})}
    assert gpu_alerts(job({0: busy, 1: busy})) == []


def test_xid_79_pages_to_drain_the_host_gpu_and_restart_without_it():
    def falls(k: int) -> dict[str, Any]:
        return {**HEALTHY, "xids": [{"xid": 79, "time": T0 + 100.0}]} if k >= 20 else dict(HEALTHY)
    alerts = gpu_alerts(job({1: falls}))
    assert [(a["alert"], a["state"], a["rank"], a["step"], a["severity"]) for a in alerts] == [
        ("gpu_fault", "firing", 1, 20, "critical")]
    a = alerts[0]
    assert a["summary"] == ("drain node-b GPU 3 (00000000:65:00.0): XID 79, GPU has fallen off the bus; "
                            "restart the job without it (rank 1, step 20)")
    assert (a["host"], a["gpu_index"], a["pci_bus_id"], a["xids"]) == ("node-b", 3, "00000000:65:00.0", [79])


def test_xids_of_the_application_and_of_cleanup_do_not_page():
    def app_error(k: int) -> dict[str, Any]:  # an illegal address in a kernel, then the driver's cleanup
        return {**HEALTHY, "xids": [{"xid": 31, "time": T0 + 50.0}, {"xid": 45, "time": T0 + 50.0}]}
    assert gpu_alerts(job({0: app_error})) == []


def test_uncorrectable_ecc_rising_pages_and_a_count_from_before_the_run_does_not():
    def before(k: int) -> dict[str, Any]:
        return {**HEALTHY, "ecc_uncorrected": 2}

    def rising(k: int) -> dict[str, Any]:
        return {**HEALTHY, "ecc_uncorrected": 2 if k < 30 else 3, "remapped_rows_pending": k >= 30}
    alerts = gpu_alerts(job({0: before, 1: rising}))
    faults = [a for a in alerts if a["alert"] == "gpu_fault"]
    assert [(a["rank"], a["step"]) for a in faults] == [(1, 30)]
    assert "1 uncorrectable ECC errors (volatile count 2 -> 3)" in faults[0]["summary"]
    degraded = [a for a in alerts if a["alert"] == "gpu_degraded"]
    assert [(a["state"], a["rank"], a["step"]) for a in degraded] == [("firing", 1, 30)]
    assert "row remapping pending" in degraded[0]["summary"]


def test_row_remapping_failure_pages_once():
    def failed(k: int) -> dict[str, Any]:
        return {**HEALTHY, "remapped_rows_failed": k >= 10}
    alerts = gpu_alerts(job({0: failed}))
    assert [(a["alert"], a["rank"], a["step"]) for a in alerts] == [("gpu_fault", 0, 10)]
    assert "row remapping failed" in alerts[0]["summary"]


def test_hw_slowdown_held_a_minute_is_degraded_and_resolves_when_it_ends():
    def slow(k: int) -> dict[str, Any]:
        if 20 <= k < 40:
            return {**HEALTHY, "throttle_reasons": pynvml.nvmlClocksEventReasonHwSlowdown, "sm_clock_mhz": 705.0}
        return dict(HEALTHY)
    alerts = gpu_alerts(job({1: slow}))
    assert [(a["alert"], a["state"], a["rank"], a["step"]) for a in alerts] == [
        ("gpu_degraded", "firing", 1, 32), ("gpu_degraded", "resolved", 1, 40)]  # 60 s after step 20
    assert alerts[0]["summary"] == ("node-b GPU 3 (00000000:65:00.0) is degraded: HW slowdown, "
                                    "SM clock 705/1980 MHz for 60 s (rank 1)")
    assert alerts[0]["severity"] == "warning"


def test_a_short_thermal_spike_stays_quiet():
    def spike(k: int) -> dict[str, Any]:
        hot = 20 <= k < 30  # 50 s: under throttle_seconds
        return {**HEALTHY, "throttle_reasons": pynvml.nvmlClocksEventReasonHwThermalSlowdown if hot else 0}
    assert gpu_alerts(job({0: spike})) == []


def test_corrected_errors_and_link_replays_climbing_are_degraded():
    def wearing(k: int) -> dict[str, Any]:
        return {**HEALTHY, "ecc_corrected": 10 * max(0, k - 10), "pcie_replay_errors": 0}

    def link(k: int) -> dict[str, Any]:
        return {**HEALTHY, "nvlink_crc_errors": 50 * max(0, k - 30)}
    alerts = gpu_alerts(job({0: wearing, 1: link}))
    firings = [(a["rank"], a["step"]) for a in alerts if a["state"] == "firing"]
    assert firings == [(0, 20), (1, 32)]
    assert "100 corrected ECC errors in " in alerts[0]["summary"]
    assert "100 NVLink CRC errors in 155 s" in alerts[1]["summary"]  # since the window began


def test_a_counter_the_gpu_stops_reporting_leaves_the_others_judged_over_their_whole_window():
    def wearing(k: int) -> dict[str, Any]:  # NVLink CRC counts no longer read from the fifth reading on
        reading = {**HEALTHY, "ecc_corrected": 10 * max(0, k - 10)}
        return {f: v for f, v in reading.items() if f != "nvlink_crc_errors" or k < 5}

    def flaky(k: int) -> dict[str, Any]:  # PCIe replays read every other time, never rising: healthy
        return {f: v for f, v in HEALTHY.items() if f != "pcie_replay_errors" or k % 2}
    alerts = gpu_alerts(job({0: wearing, 1: flaky}))
    assert [(a["rank"], a["state"], a["step"]) for a in alerts] == [(0, "firing", 20)]
    assert "100 corrected ECC errors in 95 s" in alerts[0]["summary"]  # since the first reading


def test_gpu_fault_stays_open_past_the_end_and_resolves_when_the_rank_starts_again():
    recs = job({0: lambda k: {**HEALTHY, "xids": [{"xid": 48, "time": T0 + 1.0}]}}, steps=10)
    end = from_obj({"type": "end", "run": RUN, "rank": 0, "time": T0 + 60.0, "step": 10, "status": "failed"})
    again = from_obj({"type": "start", "run": RUN, "rank": 0, "time": T0 + 70.0, "world_size": 2, "host": "node-c"})
    alerts = gpu_alerts(recs + [end, again])
    assert [(a["alert"], a["state"], a["rank"]) for a in alerts] == [("gpu_fault", "firing", 0),
                                                                     ("gpu_fault", "resolved", 0)]
    assert "XID 48, double-bit ECC error" in alerts[0]["summary"]


def test_disabled_detectors_stay_quiet():
    recs = job({0: lambda k: {**HEALTHY, "xids": [{"xid": 79, "time": T0}], "remapped_rows_pending": True}})
    off = settings(gpu_fault={"enabled": False}, gpu_degraded={"enabled": False})
    assert gpu_alerts(recs, detector_settings=off) == []


@pytest.mark.parametrize("section, values, message", [
    ("gpu_fault", {"xids": [79, "48"]}, "detectors.gpu_fault.xids: must be a list of XID numbers"),
    ("gpu_fault", {"xids": 79}, "detectors.gpu_fault.xids: must be a list of XID numbers"),
    ("gpu_degraded", {"clock_ratio": 1.5}, "detectors.gpu_degraded.clock_ratio: must be a fraction in (0, 1]"),
    ("gpu_degraded", {"throttle_seconds": 0}, "detectors.gpu_degraded.throttle_seconds"),
    ("gpu_degraded", {"ecc_corrected_increase": 2.5}, "detectors.gpu_degraded.ecc_corrected_increase"),
])
def test_bad_settings_are_refused_naming_key_and_value(section, values, message):
    with pytest.raises(ConfigError) as err:
        detector_settings({section: values})
    assert str(err.value).startswith(message)


def test_xid_lists_from_toml_are_taken():
    built = detector_settings({"gpu_fault": {"xids": [79, 48]}, "gpu_degraded": {"xids": []}})
    assert built["gpu_fault"].xids == (79, 48) and built["gpu_degraded"].xids == ()


def test_a_crash_reads_the_gpu_at_once_and_sends_it_before_the_end_record():
    nvml, sink, clock = FakeNvml(), FakeSender(), Clock()
    probe = GpuHealthProbe(FakeCuda(), nvml, sample_seconds=5.0, monotonic=clock, clock=clock)
    tm = Telemetry(environ=ENV, sink=sink, probes=[probe], start_threads=False, clock=clock)
    tm.record(1, loss=2.0)
    tm.pump()  # a healthy reading
    nvml.xids.append(79)  # then the GPU falls off the bus, and the next CUDA call raises
    clock.now += 1.0  # within sample_seconds: the background thread would not read it for 4 s more
    try:
        raise RuntimeError("CUDA error: unspecified launch failure")
    except RuntimeError as exc:
        tm._crashed(RuntimeError, exc, exc.__traceback__)
    kinds = [(r["type"], r.get("gpu_health", {}).get("xids")) for r in sink.records if r["type"] != "sample"]
    assert kinds == [("heartbeat", None), ("heartbeat", [{"xid": 79, "time": 1001.0}]), ("end", None)]
    tm.close()


def test_an_open_gpu_degraded_is_refreshed_when_its_reasons_change_not_when_the_numbers_move():
    def worse(k: int) -> dict[str, Any]:
        hot = {"throttle_reasons": pynvml.nvmlClocksEventReasonHwThermalSlowdown} if k >= 10 else {}
        return {**HEALTHY, "remapped_rows_pending": k >= 5, "ecc_corrected": k // 2, **hot}
    feed(job({0: worse}, steps=40))
    from tests import live_traces
    assert live_traces.last_pipeline is not None
    (open_alert,) = [a for a in live_traces.last_pipeline.book.open.values() if a["alert"] == "gpu_degraded"]
    assert open_alert["step"] == 5  # fired at step 5, refreshed once at step 22 (thermal held 60 s)
    assert open_alert["reasons"] == ["HW thermal slowdown, SM clock 1980/1980 MHz for 60 s",
                                     "row remapping pending (reset the GPU when the job allows)"]


@pytest.mark.parametrize("health, message", [
    ({"xids": [{"xid": 79, "time": float("nan")}]}, "gpu_health.xids[0].time: must be finite unix seconds, got nan"),
    ({"xids": [{"xid": "79", "time": 1.0}]}, "gpu_health.xids[0].xid: Expected `int`, got `str`"),
    ({"ecc_uncorrected": -1}, "gpu_health.ecc_uncorrected: Expected `int` >= 0"),
    ({"remapped_rows_pending": 1}, "gpu_health.remapped_rows_pending: Expected `bool | null`, got `int`"),
    ([], "gpu_health: Expected `object | null`, got `array`"),
])
def test_a_bad_gpu_health_is_rejected_naming_the_member(health, message):
    from trainhealth.record import RecordError

    with pytest.raises(RecordError) as err:
        from_obj({"type": "heartbeat", "run": RUN, "rank": 0, "time": T0, "step": 1, "gpu_health": health})
    assert str(err.value).startswith(message)


def test_the_status_api_shows_each_ranks_newest_reading():
    from trainhealth.status import run_view

    from tests import live_traces

    feed(job({1: lambda k: {**HEALTHY, "sm_clock_mhz": 1000.0 + k}}, steps=3))
    p = live_traces.last_pipeline
    assert p is not None
    ranks = run_view(p.runs[RUN], p.book, detail=True)["rank_states"]
    assert ranks[1]["gpu_health"] == {**HEALTHY, "sm_clock_mhz": 1003.0, "time": T0 + 15.011}
    assert ranks[0]["gpu_health"]["index"] == 3 and "gpu_health" not in run_view(p.runs[RUN], p.book)
