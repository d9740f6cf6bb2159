"""The record: the contract between client, server, replay and recorded runs.

One msgspec Struct carries every field of docs/record.md. Decoding is strict (no
string-to-number coercion); the only strings a number field accepts are the
non-finite spellings Python's ``float()`` reads ("nan", "-Infinity", "+inf"),
and those are turned into floats *before* validation by ``normalize``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

import msgspec

# \Z, not $: "$" also matches before a final newline; ".", ".." and "..." would be (hidden) recorder files
RUN_PATTERN = r"\A(?!\.+\Z)[A-Za-z0-9._:-]{1,128}\Z"
RUN_RULE = "must be 1-128 characters of [A-Za-z0-9._:-]"
DOTS_RULE = "must not be only dots ('.', '..' name no file of their own)"

# The run name's pattern is checked in check(), not here: a regex per record was 40% of decoding a body,
# and a batch carries the same few names over and over (a RunNames, held by ingest.Decoder, remembers them).
Run = str
_run_ok = re.compile(RUN_PATTERN).match
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Rank = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Detail = Annotated[str, msgspec.Meta(max_length=1 << 20)]
MetricName = Annotated[str, msgspec.Meta(max_length=128)]
PHASE_PATTERN = r"\A[a-z0-9_-]{1,32}\Z"
PHASE_RULE = "must be 1-32 characters of [a-z0-9_-]"
Phase = Annotated[str, msgspec.Meta(pattern=PHASE_PATTERN)]

RecordType = Literal["sample", "start", "heartbeat", "oom", "end"]
RECORD_TYPES = ("sample", "start", "heartbeat", "oom", "end")
NUMBER_RULE = 'must be a number or null; the only strings taken are non-finite spellings ("nan", "-inf", "+Infinity")'

# Fields holding a number (or null = not measured); non-finite spellings are accepted here.
NUMBER_FIELDS = (
    "loss",
    "lr",
    "grad_norm",
    "grad_scale",
    "gpu_mem_allocated_bytes",
    "gpu_mem_reserved_bytes",
    "gpu_mem_peak_bytes",
    "gpu_mem_total_bytes",
    "host_mem_bytes",
    "host_mem_total_bytes",
    "host_mem_available_bytes",
    "host_mem_limit_bytes",
    "host_mem_cgroup_bytes",
    "host_mem_pressure",
    "step_time_seconds",
    "data_time_seconds",
    "compute_seconds",
    "comm_wait_seconds",
    "reference_lr",
)


EndStatus = Literal["completed", "failed"]
Traceback = Annotated[str, msgspec.Meta(max_length=65536)]
OomCheck = Literal["kernel_log", "cgroup_count", "machine_count", "unproven"]
StderrTail = Annotated[str, msgspec.Meta(max_length=16384)]
SIGNAL_PATTERN = r"\ASIG[A-Z0-9+]{1,14}\Z"
Signal = Annotated[str, msgspec.Meta(pattern=SIGNAL_PATTERN)]
ExitCode = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class ErrorInfo(msgspec.Struct, omit_defaults=True, gc=False):
    """An ``end`` record's exception (``status: "failed"``): its type, message and last frames (bounded)."""

    type: Text = ""
    message: Text = ""
    traceback: Traceback = ""


class XidEvent(msgspec.Struct, gc=False):
    """One XID event NVML reported for the rank's GPU: its number and when the client read it."""

    xid: NonNegInt
    time: float


Count = Annotated[int, msgspec.Meta(ge=0)]


class GpuHealth(msgspec.Struct, omit_defaults=True, gc=False):
    """The rank's GPU as NVML reports it (docs/gpu-health.md); None: not read (not supported, no NVML).

    Counters are the device's own (volatile: since the driver loaded); ``xids`` are the XID events the
    client read since it started, oldest first, at most 32 (sent again on every reading, so a lost
    record loses none)."""

    index: NonNegInt | None = None  # NVML's device index (nvidia-smi's), not CUDA_VISIBLE_DEVICES' number
    pci_bus_id: Text | None = None
    xids: list[XidEvent] | None = None
    ecc_uncorrected: Count | None = None
    ecc_corrected: Count | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failed: bool | None = None
    retired_pages: Count | None = None
    retired_pages_pending: bool | None = None
    throttle_reasons: Count | None = None  # NVML's clocks event reasons bitmask
    sm_clock_mhz: float | None = None
    sm_clock_max_mhz: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    nvlink_replay_errors: Count | None = None
    nvlink_crc_errors: Count | None = None
    nvlink_recovery_errors: Count | None = None
    pcie_replay_errors: Count | None = None


class StopAck(msgspec.Struct, omit_defaults=True, gc=False):
    """A client's word on a stop step it just heard (docs/record.md, ``stop_ack``): the stop step, and the last
    step its loop had asked ``should_stop`` about when it heard it (None: none yet). ``checked < step``: heard
    in time, the rank waits there for the stop to be confirmed; else it passed the stop (monitor/stop_steps.py)."""

    step: NonNegInt
    checked: NonNegInt | None = None


class Record(msgspec.Struct, omit_defaults=True, gc=False):
    """One telemetry record. ``None`` means "not measured", never NaN.

    ``gc=False``: records are not tracked by the cyclic garbage collector (a record holds only
    strings, numbers and JSON dicts, so it cannot be part of a cycle); decoding thousands of them
    per batch no longer triggers collections (~1-2 us per record saved on ingest).
    """

    run: Run
    rank: Rank
    time: float
    type: RecordType = "sample"
    step: NonNegInt | None = None
    # heartbeat and sample: what the training thread is doing ("data", "step", ...) and since when
    phase: Phase | None = None
    phase_time: float | None = None
    # sample
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    grad_scale: float | None = None
    gpu_mem_allocated_bytes: float | None = None
    gpu_mem_reserved_bytes: float | None = None
    gpu_mem_peak_bytes: float | None = None
    gpu_mem_total_bytes: float | None = None
    host_mem_bytes: float | None = None
    host_mem_total_bytes: float | None = None
    host_mem_available_bytes: float | None = None
    # the process's own memory limit where the client can read it (cgroup v2 memory.max, v1 limit_in_bytes)
    host_mem_limit_bytes: float | None = None
    # what the kernel says (docs/record.md): the limiting cgroup's working set and memory event counts, PSI
    host_mem_cgroup: Text | None = None
    host_mem_cgroup_bytes: float | None = None
    host_mem_oom_kills: NonNegInt | None = None
    host_mem_max_events: NonNegInt | None = None
    host_mem_high_events: NonNegInt | None = None
    host_mem_pressure: float | None = None
    step_time_seconds: float | None = None
    data_time_seconds: float | None = None
    # of the step: time computing (forward, backward) and time blocked in its collectives after that
    compute_seconds: float | None = None
    comm_wait_seconds: float | None = None
    batch_size: NonNegInt | None = None
    world_size: NonNegInt | None = None
    metrics: dict[MetricName, float | None] | None = None
    # heartbeat (and sample): the rank's GPU health from NVML, every few seconds
    gpu_health: GpuHealth | None = None
    # heartbeat: a stop step the client just heard, and whether it heard it in time (monitor/stop_steps.py)
    stop_ack: StopAck | None = None
    # start
    reference_lr: float | None = None
    reference_batch_size: NonNegInt | None = None
    warmup_steps: NonNegInt | None = None
    optimizer: Text | None = None
    host: Text | None = None
    pid: NonNegInt | None = None
    config: dict[str, Any] | None = None
    # oom
    message: Text | None = None
    detail: Detail | None = None
    # end: "completed" (a normal exit) or "failed" (an uncaught exception, quoted in ``error``)
    status: EndStatus | None = None
    error: ErrorInfo | None = None
    # end sent by the launcher (trainhealth.launch) on behalf of a rank that died without its own `end`
    exit_code: ExitCode | None = None  # it exited with this code
    signal: Signal | None = None  # it was killed by this signal ("SIGKILL")
    signal_forwarded: bool | None = None  # that signal came from the launcher's own parent (the job was stopped)
    oom_killed: bool | None = None  # the kernel's OOM killer killed it (the kernel log names it; docs/record.md)
    oom_check: OomCheck | None = None  # how the launcher decided whether the OOM killer killed it
    oom_doubt: Text | None = None  # with oom_check "unproven": why neither proven nor ruled out
    oom_killed_pid: NonNegInt | None = None  # the process the kernel log names as the OOM killer's victim
    oom_killed_comm: Text | None = None  # and its name ("python", "pt_data_worker")
    oom_child: bool | None = None  # that process is a child of the rank (a DataLoader worker), not the rank
    stderr_tail: StderrTail | None = None  # its last lines on stderr


class RecordError(ValueError):
    """A record that cannot be used; names the field and the value."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


_NONFINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def nonfinite_from_str(value: str) -> float | None:
    """The float for a non-finite spelling ("NaN", "-Infinity", "+inf"), else None."""
    if len(value) <= 9 and value.lower() in _NONFINITE:
        return float(value)
    return None


def normalize(obj: dict[str, Any]) -> dict[str, Any]:
    """Turn non-finite string spellings in number fields into floats (in place); ``"type": null`` is the default."""
    if "type" in obj and obj["type"] is None:  # a client that writes every field, unset ones as null
        del obj["type"]
    for name in NUMBER_FIELDS:
        value = obj.get(name)
        if isinstance(value, str):
            number = nonfinite_from_str(value)
            if number is not None:
                obj[name] = number
    metrics = obj.get("metrics")
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            if isinstance(value, str):
                number = nonfinite_from_str(value)
                if number is not None:
                    metrics[key] = number
    return obj


class RunNames:
    """Run names that passed ``check_run``, bounded: a name seen before costs a set lookup, not a regex.

    Owned by whoever decodes (ingest.Decoder: one per Service, one per replay), never module-global."""

    __slots__ = ("good", "limit")

    def __init__(self, limit: int = 10_000) -> None:
        self.good: set[str] = set()
        self.limit = limit

    def check(self, run: str) -> None:
        """check_run, remembering the names that pass; raises RecordError."""
        if run in self.good:
            return
        check_run(run)
        if len(self.good) >= self.limit:
            self.good.clear()
        self.good.add(run)


def check(record: Record, runs: RunNames | None = None) -> Record:
    """The run name's pattern (remembered in ``runs`` when given), and cross-field rules msgspec cannot
    express; raises RecordError."""
    if runs is None:
        check_run(record.run)
    elif record.run not in runs.good:
        runs.check(record.run)
    if not math.isfinite(record.time) or record.time < 0:
        raise RecordError("time", f"must be finite unix seconds, got {record.time!r}")
    if record.step is None and record.type not in ("start", "end"):
        raise RecordError("step", f"required for a {record.type!r} record, got null")
    if record.phase_time is not None and (not math.isfinite(record.phase_time) or record.phase_time < 0):
        raise RecordError("phase_time", f"must be finite unix seconds, got {record.phase_time!r}")
    if record.gpu_health is not None and record.gpu_health.xids:
        for i, x in enumerate(record.gpu_health.xids):
            if not math.isfinite(x.time) or x.time < 0:
                raise RecordError(f"gpu_health.xids[{i}].time", f"must be finite unix seconds, got {x.time!r}")
    return record


def check_run(run: str) -> None:
    """Raises RecordError unless ``run`` is a valid run name (remembers nothing: see RunNames)."""
    if not _run_ok(run):
        reason = RUN_RULE if 1 <= len(run) <= 128 else f"{RUN_RULE}, got {len(run)} characters"
        if run and not run.strip("."):
            reason = DOTS_RULE
        raise RecordError("run", f"{reason} (value: {_shown(run)})")


def from_obj(obj: Any, runs: RunNames | None = None) -> Record:
    """Validate one decoded JSON value into a Record; raises RecordError."""
    if not isinstance(obj, dict):
        raise RecordError("$", f"a record must be a JSON object, got {type(obj).__name__}")
    known: dict[str, Any] = {}
    for name in Record.__struct_fields__:  # unknown fields are ignored, bytes and all (names too: msgspec
        if name in obj:                     # cannot even look at a name holding a lone surrogate)
            found = bad_text(obj[name], name)
            if found:
                raise RecordError(*found)
            known[name] = obj[name]
    try:
        record = msgspec.convert(normalize(known), Record, strict=True)
    except msgspec.ValidationError as exc:
        raise RecordError(*_split_msgspec_error(str(exc), obj)) from None
    return check(record, runs)


def _split_msgspec_error(message: str, obj: dict[str, Any]) -> tuple[str, str]:
    """'Expected `int`, got `str` - at `$.rank`' -> ('rank', "Expected `int`, got `str` (value: 'x')")."""
    reason, sep, where = message.rpartition(" - at `$")
    if not sep:
        if message.startswith("Object missing required field"):
            field = message.split("`")[1]
            return field, "required"
        if message.endswith("in `$.metrics`"):  # a bad metric name
            return _metric_error(obj.get("metrics"), message.split(" - at ")[0])
        return "$", message
    path = where.rstrip("`").lstrip(".")
    top = path.split(".")[0].split("[")[0]
    if top == "metrics" and path != "metrics":  # msgspec says `$.metrics[...]`: name the metric
        return _metric_error(obj.get("metrics"), reason)
    value = obj.get(top) if top else None
    if path == "run" and "regex" in reason and isinstance(value, str):
        reason = RUN_RULE if 1 <= len(value) <= 128 else f"{RUN_RULE}, got {len(value)} characters"
    elif path == "phase" and "regex" in reason and isinstance(value, str):
        reason = PHASE_RULE
    elif path == "signal" and "regex" in reason:
        reason = "must be a signal name such as 'SIGKILL'"
    elif path == "type" and reason.startswith("Invalid enum value"):
        reason = f"must be one of {', '.join(RECORD_TYPES)}"
    elif path in NUMBER_FIELDS and isinstance(value, str):
        reason = NUMBER_RULE
    return path or "$", f"{reason} (value: {_shown(value)})"


def _metric_error(metrics: Any, reason: str) -> tuple[str, str]:
    """The first bad entry of ``metrics``, as ('metrics.NAME', reason with the value)."""
    for key, value in (metrics or {}).items():
        if not isinstance(key, str) or len(key) > 128:
            return "metrics", f"metric names are at most 128 characters (name: {_shown(key)})"
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return f"metrics.{key}", f"{NUMBER_RULE} (value: {_shown(value)})"
        if isinstance(value, int) and abs(value) >= 2**1024:
            return f"metrics.{key}", f"number out of range (value: {_shown(value)})"
    return "metrics", reason


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def big_int(text: str) -> int | float:
    return int(text) if len(text) <= 4300 else float(text)  # past the digit limit: +-inf


def loads(data: bytes | str) -> Any:
    """Python's json (it reads the bare NaN/Infinity tokens), also for integers of any length.

    Past Python's int digit limit (4300) ``json.loads`` refuses the whole text; such a number is out
    of range for every field, so it is read as +-inf and the field it is in judges it.

    Bytes that are not UTF-8 do not fail the whole text: they are kept as lone surrogates
    (``surrogateescape``), so that ``bad_text`` can name the one field that holds them and the rest
    of a batch is taken.
    """
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode("utf-8", "surrogateescape")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:  # an integer past the digit limit
        return json.loads(data, parse_int=big_int)


_SURROGATE = re.compile("[\ud800-\udfff]")


def bad_text(value: Any, path: str) -> tuple[str, str] | None:
    """The first string under ``value`` (a value or a key) that is not valid text, as (path, reason).

    Invalid UTF-8 (``\\xff\\xfe``, overlong ``\\xc0\\xaf``, a CESU-8 surrogate, a cut multibyte
    sequence), kept by ``loads`` as lone surrogates, and escaped lone surrogates (``"\\ud800"``): no
    store, page or webhook can encode them, so the field is refused here, by name.
    """
    if isinstance(value, str):
        return (path, f"not valid UTF-8 text (bytes: {_raw(value)})") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _SURROGATE.search(key):
                return path, f"a name in it is not valid UTF-8 text (bytes: {_raw(key)})"
            found = bad_text(item, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = bad_text(item, f"{path}[{i}]")
            if found:
                return found
    return None


def _raw(text: str) -> str:
    """The bytes as sent: invalid UTF-8 kept by ``loads`` (U+DC80-U+DCFF) as those bytes, an escaped lone
    surrogate (``"\\udfff"``, any of U+D800-U+DFFF) as its CESU-8 bytes."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate surrogateescape cannot map back to one byte
        raw = text.encode("utf-8", "surrogatepass")
    shown = repr(raw)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def to_obj(record: Record) -> dict[str, Any]:
    """The record as a plain dict with only the fields that were set."""
    obj = {f: v for f in record.__struct_fields__ if (v := getattr(record, f)) is not None}
    if record.error is not None:
        obj["error"] = msgspec.structs.asdict(record.error)
    if record.gpu_health is not None:
        obj["gpu_health"] = msgspec.to_builtins(record.gpu_health)
    if record.stop_ack is not None:
        obj["stop_ack"] = msgspec.to_builtins(record.stop_ack)
    return obj
