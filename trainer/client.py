"""The telemetry client: two lines in any training loop.

    tm = Telemetry()                      # run, rank, world size from torchrun's environment
    tm.record(step, loss=loss, lr=lr)     # every step; returns in about a microsecond

``record()`` builds a dict and appends it to a bounded buffer; it never blocks on
the network and never raises into training. A background thread drains the
buffer about once a second (at once when ``batch_records`` are waiting), reads
values that the GPU has finished computing (torch tensors are copied without a
sync, see ``torch_helpers``) and sends the batch; failed sends are retried with
exponential backoff, and when the buffer is full the oldest records are dropped
and counted. Every cycle it also measures host/GPU memory (the probes); each
sample carries the latest measurement. A second thread sends heartbeats while
the training thread is busy or blocked.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

from . import host_memory
from .settings import ClientSettings, from_environ
from .transport import FileSink, HttpSink, Result

log = logging.getLogger("trainer.client")

STAGED = "_staged"  # key of a record whose tensor values the device has not finished yet
SAMPLE_FIELDS = frozenset((
    "loss", "lr", "grad_norm", "grad_scale", "gpu_mem_allocated_bytes", "gpu_mem_reserved_bytes",
    "gpu_mem_peak_bytes", "gpu_mem_total_bytes", "host_mem_bytes", "host_mem_total_bytes",
    "host_mem_available_bytes", "step_time_seconds", "data_time_seconds", "batch_size", "world_size",
))
INT_FIELDS = frozenset(("batch_size", "world_size", "reference_batch_size", "warmup_steps", "pid"))
FLOAT_FIELDS = SAMPLE_FIELDS - INT_FIELDS
MESSAGE_CHARS = 4000
DETAIL_CHARS = 1_000_000


def assign(rec: dict[str, Any], name: str, value: Any) -> None:
    """Known sample fields go top level, anything else into ``metrics``."""
    if name in SAMPLE_FIELDS:
        rec[name] = value
    else:
        rec.setdefault("metrics", {})[name] = value


class _LimitedLog:
    """Logs the first occurrence of each kind of trouble, then at most once a minute with a count."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._seen: dict[str, tuple[float, int]] = {}

    def __call__(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last, count = self._seen.get(key, (-1e18, 0))
        if now - last >= self.every:
            suffix = f" ({count} more since last report)" if count else ""
            log.warning("trainhealth: " + msg + suffix, *args)
            self._seen[key] = (now, 0)
        else:
            self._seen[key] = (last, count + 1)


class Telemetry:
    def __init__(self, url: str | None = None, run: str | None = None, rank: int | None = None,
                 world_size: int | None = None, environ: dict[str, str] | None = None, *,
                 token: str | None = None, offline_path: str | None = None,
                 probes: Iterable[Any] | None = None, sink: Any = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 start_threads: bool = True,
                 **settings: Any) -> None:
        self.settings: ClientSettings = from_environ(
            environ, url=url, run=run, rank=rank, world_size=world_size, token=token,
            offline_path=offline_path, **settings)
        s = self.settings
        self.run, self.rank, self.world_size = s.run, s.rank, s.world_size
        self._clock = clock
        self._monotonic = monotonic
        self._sink = sink if sink is not None else _make_sink(s)
        self._probes = list(probes) if probes is not None else _default_probes(s)
        self._measured: tuple[dict[str, Any], dict[str, Any] | None] = ({}, None)
        self._stager = next((p for p in self._probes if hasattr(p, "stage")), None)
        self._warn = _LimitedLog()
        self._lock = threading.Lock()  # the training thread takes it only to append
        self._cond = threading.Condition(self._lock)
        self._capacity = s.capacity
        self._queue: deque[dict[str, Any]] = deque()
        self._batch_limit = s.batch_records
        self._backoff = 0.0
        self._next_send = 0.0
        self._cycles = 0
        self._last_failed = False
        self._flush_now = False
        self._closed = False
        self._active = False
        self._bound = False
        self.last_step: int | None = None
        self.counts = {"sent": 0, "dropped": 0, "rejected": 0, "failures": 0}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._refresh()  # once here, so that the first samples carry host memory too
        if start_threads:
            for target, name in ((self._send_loop, "trainhealth-sender"),
                                 (self._heartbeat_loop, "trainhealth-heartbeat")):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
            atexit.register(self.close)

    # -- the training thread's API -------------------------------------------------------------------
    def record(self, step: int, loss: Any = None, lr: Any = None, grad_norm: Any = None,
               **fields: Any) -> None:
        """One sample. Tensors are read later without a device sync; never raises."""
        try:
            measured, metrics = self._measured  # host/GPU memory, NVML: refreshed by the background thread
            rec: dict[str, Any] = {"type": "sample", "run": self.run, "rank": self.rank,
                                   "time": self._clock(), "step": int(step), **measured}
            if metrics:
                rec["metrics"] = metrics.copy()
            tensors: dict[str, Any] = {}
            # the fast path (a float) inline: this runs every step
            if loss is not None:
                if type(loss) is float:
                    rec["loss"] = loss
                else:
                    self._put(rec, "loss", loss, tensors)
            if lr is not None:
                if type(lr) is float:
                    rec["lr"] = lr
                else:
                    self._put(rec, "lr", lr, tensors)
            if grad_norm is not None:
                if type(grad_norm) is float:
                    rec["grad_norm"] = grad_norm
                else:
                    self._put(rec, "grad_norm", grad_norm, tensors)
            for name, value in fields.items():
                if value is not None:
                    if type(value) is float and name in FLOAT_FIELDS:
                        rec[name] = value
                    else:
                        self._put(rec, name, value, tensors)
            if tensors:
                self._stage(rec, tensors)
            if not self._bound:
                self._bind()
            self.last_step = rec["step"]
            self._active = True
            with self._lock:
                if len(self._queue) >= self._capacity:
                    self._queue.popleft()
                    self.counts["dropped"] += 1
                self._queue.append(rec)
                full = len(self._queue) == self._batch_limit  # crossing it: wake the sender once, not per record
            if full:
                self._wake.set()
        except Exception as exc:  # never break training because of telemetry
            self._warn("record", "record(step=%r) failed and was skipped: %r", step, exc)

    @staticmethod
    def _put(rec: dict[str, Any], name: str, value: Any, tensors: dict[str, Any]) -> None:
        if name in INT_FIELDS:
            assign(rec, name, int(value))  # counts: a number (a CUDA tensor here would sync)
        elif type(value) is float or type(value) is int:
            assign(rec, name, value)
        elif hasattr(value, "detach") or hasattr(value, "_get_scale_async"):  # a tensor, a GradScaler
            tensors[name] = value
        else:
            assign(rec, name, float(value))  # numpy scalars and friends

    def start(self, **fields: Any) -> None:
        """The run's start: world_size, batch_size, lr, reference_lr, reference_batch_size, warmup_steps,
        optimizer, config... host and pid are filled in. Sent at once, ahead of the first samples."""
        if dataclasses.is_dataclass(fields.get("config")):
            fields["config"] = dataclasses.asdict(fields["config"])
        self._send_kind("start", None, {"world_size": self.world_size, "host": socket.gethostname(),
                                        "pid": os.getpid(), **fields})
        self._active = True
        self._flush_now = True
        self._wake.set()

    def heartbeat(self, step: int | None = None) -> None:
        self._send_kind("heartbeat", step, {})

    def end(self, step: int | None = None) -> None:
        self._send_kind("end", step, {})
        self._active = False

    def oom(self, message: str, step: int | None = None, detail: str | None = None, **fields: Any) -> None:
        """A caught out-of-memory error; sent at once (the process may be about to die)."""
        extra = {"message": str(message)[:MESSAGE_CHARS], **fields}
        if detail is not None:
            extra["detail"] = str(detail)[:DETAIL_CHARS]
        self._send_kind("oom", step, extra)
        self._flush_now = True
        self._wake.set()

    def _send_kind(self, kind: str, step: int | None, fields: dict[str, Any]) -> None:
        try:
            rec: dict[str, Any] = {"type": kind, "run": self.run, "rank": self.rank, "time": self._clock()}
            if step is None and kind != "start":
                step = self.last_step if self.last_step is not None else 0
            if step is not None:
                rec["step"] = int(step)
            for name, value in fields.items():
                if value is not None:
                    rec[name] = int(value) if name in INT_FIELDS else value
            self._push(rec)
        except Exception as exc:
            self._warn(kind, "%s record failed and was skipped: %r", kind, exc)

    def _stage(self, rec: dict[str, Any], tensors: dict[str, Any]) -> None:
        if self._stager is None:
            from .torch_helpers import TorchProbe  # torch is imported: the user gave us a tensor

            self._stager = TorchProbe(sample_seconds=self.settings.sample_seconds)
            self._probes.append(self._stager)
        now, later = self._stager.stage(tensors)
        for name, value in now.items():
            assign(rec, name, value)
        if later is not None:
            rec[STAGED] = later

    def _bind(self) -> None:
        self._bound = True
        for probe in self._probes:
            if hasattr(probe, "bind"):
                probe.bind()

    def oom_guard(self, step: int | None = None) -> Any:
        """``with tm.oom_guard(): ...``: report a CUDA out-of-memory error, then re-raise it."""
        from .torch_helpers import oom_guard

        return oom_guard(self, step=step)

    def _push(self, rec: dict[str, Any]) -> None:
        with self._lock:
            if len(self._queue) >= self._capacity:
                self._queue.popleft()
                self.counts["dropped"] += 1
            self._queue.append(rec)
            full = len(self._queue) == self._batch_limit  # crossing it: wake the sender once, not per record
        if full:
            self._wake.set()

    # -- flushing and closing ------------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything recorded so far is delivered; False if that failed or took longer than
        ``timeout`` (the records stay queued)."""
        deadline = self._monotonic() + timeout
        while True:
            with self._cond:
                if not self._queue:
                    return True
                seen = self._cycles
                self._flush_now = True
                self._wake.set()
                if not self._threads:
                    return False
                left = deadline - self._monotonic()
                if left <= 0 or not self._cond.wait_for(self._cycle_after(seen), left):
                    return False
                if self._last_failed:
                    return not self._queue

    def _cycle_after(self, seen: int) -> Callable[[], bool]:
        return lambda: self._cycles > seen

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds), stop the threads; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        deadline = self._monotonic() + timeout
        if self._threads:
            ok = self.flush(timeout)
        else:  # driven by hand: one last synchronous attempt
            self._flush_now = True
            self.pump()
            ok = not self._last_failed
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - self._monotonic()))
        if any(t.is_alive() for t in self._threads):
            return  # stuck in a slow request: leave the daemon thread and its connection be
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
        if left:
            self.counts["dropped"] += left
            log.warning("trainhealth: %d records not delivered at close (%s)", left,
                        "sidecar unreachable" if not ok else "timeout")
        try:
            self._sink.close()
        except Exception as exc:  # pragma: no cover - closing a socket or file
            log.debug("trainhealth: closing sink: %r", exc)

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.end()
        self.close()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {**self.counts, "queued": len(self._queue)}

    # -- the background threads ----------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            self._beat()

    def _beat(self) -> None:
        """A heartbeat, once the run started (start() or a record) and until it ended."""
        if self._active:
            self.heartbeat()

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.flush_seconds)
            self._wake.clear()
            try:
                self.pump()
            except Exception as exc:  # pragma: no cover - a bug here must not kill the thread
                self._warn("sender", "sender cycle failed: %r", exc)

    def pump(self) -> None:
        """One sender cycle: resolve finished device values, send what is ready (unless backing off)."""
        with self._cond:
            force, self._flush_now = self._flush_now, False
        self._refresh()
        failed = False
        if force or self._monotonic() >= self._next_send:
            while True:
                batch = self._take()
                if not batch:
                    break
                result = self._sink.send(batch)
                failed = not self._settle(batch, result)
                if failed or len(batch) < self._batch_limit:
                    break
        else:
            self._take(resolve_only=True)
            failed = True
        with self._cond:
            self._cycles += 1
            self._last_failed = failed
            self._cond.notify_all()

    def _take(self, resolve_only: bool = False) -> list[dict[str, Any]]:
        """Pop up to a batch of ready records (oldest first); records the device has not finished stay."""
        batch: list[dict[str, Any]] = []
        held: list[dict[str, Any]] = []
        with self._cond:
            queue = self._queue
            if resolve_only:
                for rec in queue:
                    staged = rec.get(STAGED)
                    if staged is not None and staged.ready():
                        self._fill(rec)
                return batch
            while queue and len(batch) < self._batch_limit:
                rec = queue.popleft()
                staged = rec.get(STAGED)
                if staged is not None:
                    if not staged.ready():  # cudaEventQuery: never blocks
                        held.append(rec)
                        continue
                    self._fill(rec)
                batch.append(rec)
            queue.extendleft(reversed(held))
        return batch

    def _fill(self, rec: dict[str, Any]) -> None:
        for name, value in rec.pop(STAGED).values().items():
            assign(rec, name, value)

    def _refresh(self) -> None:
        """Measure (each probe keeps its own interval) for the samples recorded from now on. Runs every
        cycle, also while sends are failing, so samples recorded during an outage keep their values."""
        top: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        for probe in self._probes:
            try:
                fields = dict(probe.sample())
            except Exception as exc:
                self._warn(f"probe-{type(probe).__name__}", "%s failed: %r", type(probe).__name__, exc)
                continue
            metrics.update(fields.pop("metrics", None) or {})
            top.update(fields)
        if self.counts["dropped"]:
            metrics["client_dropped_records"] = self.counts["dropped"]
        self._measured = (top, metrics or None)  # one reference swap: the training thread reads either

    def _settle(self, batch: list[dict[str, Any]], result: Result) -> bool:
        """Account for a send; put the batch back for a retry. True when the sink took a decision."""
        s = self.settings
        if result.outcome == "ok":
            self.counts["sent"] += len(batch)
            self._backoff = 0.0
            return True
        if result.outcome == "drop":
            self.counts["rejected"] += len(batch)
            self._warn("rejected", "sidecar refused %d records, dropped them: %s", len(batch), result.reason)
            self._backoff = 0.0
            return True
        if result.outcome == "split" and len(batch) == 1:
            self.counts["rejected"] += 1
            self._warn("too-large", "a record too large for the sidecar was dropped: %s", result.reason)
            return True
        self.counts["failures"] += 1
        if result.outcome == "split":
            self._batch_limit = max(1, len(batch) // 2)
            self._warn("split", "batch too large (%s); now at most %d records per batch",
                       result.reason, self._batch_limit)
        else:
            self._backoff = min(max(self._backoff * 2, s.backoff_seconds), s.max_backoff_seconds)
            delay = max(self._backoff, result.retry_after or 0.0)
            self._next_send = self._monotonic() + delay
            self._warn("retry", "could not send %d records (%s); retrying in %.1fs",
                       len(batch), result.reason, delay)
        with self._cond:
            self._queue.extendleft(reversed(batch))
            while len(self._queue) > s.capacity:
                self._queue.popleft()
                self.counts["dropped"] += 1
        return result.outcome == "split"


def _make_sink(s: ClientSettings) -> Any:
    if s.offline_path:
        return FileSink(s.offline_path.format(rank=s.rank, run=s.run))
    return HttpSink(s.url, s.token, s.timeout_seconds)


def _default_probes(s: ClientSettings) -> list[Any]:
    probes: list[Any] = []
    if host_memory.available():
        probes.append(host_memory.HostMemory(interval=s.sample_seconds))
    if "torch" in sys.modules:  # only when the program uses torch: importing it costs seconds
        try:
            from .torch_helpers import TorchProbe

            probes.append(TorchProbe(sample_seconds=s.sample_seconds))
        except Exception as exc:  # pragma: no cover - a broken torch install
            log.warning("trainhealth: torch helpers unavailable: %r", exc)
    return probes
