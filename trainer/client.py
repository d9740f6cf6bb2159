"""The telemetry client: two lines in any training loop.

    tm = Telemetry()                      # run, rank, world size from torchrun's environment
    tm.record(step, loss=loss, lr=lr)     # every step; returns in about a microsecond

The end of the rank is reported without a third line: ``end`` (status "completed") at a normal
interpreter exit (atexit), or ``end`` with status "failed" and the exception quoted when an uncaught
exception ends the main thread or another thread (sys.excepthook, threading.excepthook, chained to
the hooks installed before), or ``end`` with status "failed" and ``signal`` "SIGTERM" when a SIGTERM
would have killed the process silently (torchrun's agent stopping the survivors of a dead rank, a
scheduler; sigterm.py: sent even while the training thread is blocked in a collective, then the process
dies by SIGTERM as before; ``report_sigterm=False`` turns it off). A process killed otherwise (SIGKILL,
the OOM killer, ``os._exit``) sends nothing: that is silence, for the sidecar's stall detector. A
non-finite loss or grad norm, an OOM, a crash and the end are sent at once.

The loop hears its run's alerts: ``tm.alerts`` (firing now), ``on_alert=`` (called once per new firing
alert), and with ``stop_on={"nan_divergence", ...}`` ``tm.should_stop(step)``, true on every rank from
the same step on (the sidecar fixes it when the alert first fires; see monitor/stop_steps.py).

``record()`` builds a dict and appends it to a bounded buffer; it never blocks on the network and never
raises into training. The rest runs on the client's threads, each part in a module of its own:

- outbox.py: the bounded buffer and the sending cycle: batches, retries with exponential backoff, the
  oldest records dropped and counted when the buffer is full;
- background.py: the threads: the sending loop (about once a second; at once when ``batch_records`` are
  waiting, on a flush, or when a device value read is a NaN), the heartbeats (sent while the training
  thread is busy or blocked; with ``tm.phase("data")`` / ``tm.phase("step")`` around the loop's parts
  each says what it is doing, so the sidecar can tell a rank stuck in data loading from the ranks it
  keeps waiting), and the long poll of the run's alerts;
- probes.py: what each sample carries besides the loop's values (host and GPU memory, NVML), measured
  every cycle; a GPU health reading goes out once, in a heartbeat of its own (gpu_health.py); torch
  tensors are copied off the device without a sync (torch_helpers.py);
- hearing.py: what the sidecar says back (the run's alerts, the stop step);
- lifecycle.py, crash.py and sigterm.py: the process's exit, its uncaught exceptions, a SIGTERM, its forks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import time
from typing import Any, Callable, Iterable

from . import lifecycle
from .background import Background
from .crash import error_info, is_cuda_oom
from .fields import ALERT_NAMES, DETAIL_CHARS, FLOAT_FIELDS, INT_FIELDS, MESSAGE_CHARS, SAMPLE_FIELDS, STAGED, assign
from .hearing import Hearing
from .outbox import LimitedLog, Outbox
from .probes import Probes, default_probes
from .settings import ClientSettings, from_environ, launch_header
from .transport import FileSender, HttpSender, ViewPoller

__all__ = ["STAGED", "Telemetry"]

log = logging.getLogger("trainhealth.trainer.client")
_INT_SAMPLE_FIELDS = INT_FIELDS & SAMPLE_FIELDS  # counts a sample carries top level (batch_size, ...)
_PHASE_NAME = re.compile(r"[a-z0-9_-]{1,32}\Z")  # the record contract's rule for ``phase``


class Telemetry:
    """One per rank. ``url``, ``run``, ``rank``, ``world_size``, ``token``, ``offline_path`` default from
    ``environ`` (os.environ; see settings.py); further keywords are ``ClientSettings`` fields
    (``capacity``, ``batch_records``, ``flush_seconds``, ``heartbeat_seconds``, ...). ``probes``: what to
    measure on the background thread (default: host memory, and torch's when torch is imported).
    ``sink``, ``clock``, ``monotonic``, ``start_threads=False`` (then call ``pump()``) are for tests.

    ``stop_on``: alert names (docs/alerts.md) that end the loop: ``should_stop(step)`` turns true on
    every rank at the step the sidecar fixed when one of them first fired for this run, once every rank
    acked it in time (``stop_confirm_seconds``, 60 s: how long it waits there for that; hearing.py).
    Empty by default.
    ``on_alert(alert)``: called once for each alert of this run that starts firing (on a client thread:
    keep it short; an exception in it is logged)."""

    def __init__(self, url: str | None = None, run: str | None = None, rank: int | None = None,
                 world_size: int | None = None, environ: dict[str, str] | None = None, *,
                 token: str | None = None, offline_path: str | None = None,
                 stop_on: Iterable[str] = (), on_alert: Callable[[dict[str, Any]], Any] | None = None,
                 probes: Iterable[Any] | None = None, sink: Any = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 start_threads: bool = True,
                 **settings: Any) -> None:
        if isinstance(stop_on, str):
            raise ValueError(f"stop_on: a set of alert names, got the string {stop_on!r}")
        unknown = sorted(set(stop_on) - ALERT_NAMES)
        if unknown:
            raise ValueError(f"stop_on: unknown alert name {unknown[0]!r}; known: {', '.join(sorted(ALERT_NAMES))}")
        self.settings: ClientSettings = from_environ(
            environ, url=url, run=run, rank=rank, world_size=world_size, token=token,
            offline_path=offline_path, **settings)
        s = self.settings
        self.run, self.rank, self.world_size = s.run, s.rank, s.world_size
        # under trainhealth.launch (it hands its launch id to its child): the launcher reports the death itself
        self._launched = bool((os.environ if environ is None else environ).get("TRAINHEALTH_LAUNCH_ID"))
        self._clock = clock
        self._monotonic = monotonic
        self._warn = LimitedLog()
        self._sender = sink if sink is not None else _make_sender(s)
        self._outbox = Outbox(self._sender, s, monotonic, self._warn)
        self._push = self._outbox.push
        self._probes = Probes(list(probes) if probes is not None else default_probes(s), s.sample_seconds, self._warn)
        self._hearing = Hearing(s.run, frozenset(stop_on), on_alert, self._ack_stop)
        self._outbox.on_answer = self._hearing.answer
        self._nonfinite = False  # the last sample's loss or grad norm was NaN/Inf (float path)
        self._closed = False
        self._active = False  # started (start() or a record) and not ended: heartbeats go out
        self.last_step: int | None = None
        self._phase: tuple[str, float] | None = None  # (name, start time): one reference, swapped whole
        self._phase_names: set[str] = set()  # names already checked against the contract
        self._refresh()  # once here, so that the first samples carry host memory too
        self._background: Background | None = None
        if start_threads:
            poller = None
            if (stop_on or on_alert is not None) and isinstance(self._sender, HttpSender):
                poller = ViewPoller(s.url, s.run, s.token, launch=lambda: launch_header(s, os.getpid()))
            self._background = Background(self._outbox, s, self.pump, self._beat, self._hearing, poller, self._warn)
            self._background.start()
            lifecycle.register(self)

    # -- the training thread's API -----------------------------------------------------------------
    def record(self, step: int, loss: Any = None, lr: Any = None, grad_norm: Any = None,
               **fields: Any) -> None:
        """One sample. Tensors are read later without a device sync; never raises."""
        try:
            probes = self._probes
            measured, metrics = probes.measured  # host/GPU memory, NVML: refreshed by the background thread
            rec: dict[str, Any] = {"type": "sample", "run": self.run, "rank": self.rank, "time": self._clock(),
                                   "step": step if type(step) is int else int(step), **measured}
            if metrics:
                rec["metrics"] = metrics.copy()
            tensors: dict[str, Any] = {}
            tensor = probes.tensor_type  # torch.Tensor once torch is in use
            # the fast paths (a float, a tensor) inline: this runs every step
            if loss is not None:
                if type(loss) is float:
                    rec["loss"] = loss
                elif type(loss) is tensor:
                    tensors["loss"] = loss
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
                elif type(grad_norm) is tensor:
                    tensors["grad_norm"] = grad_norm
                else:
                    self._put(rec, "grad_norm", grad_norm, tensors)
            if fields:
                for name, value in fields.items():
                    if value is not None:
                        if type(value) is float and name in FLOAT_FIELDS:
                            rec[name] = value
                        elif type(value) is int and name in _INT_SAMPLE_FIELDS:
                            rec[name] = value
                        else:
                            self._put(rec, name, value, tensors)
            if tensors:
                stager = probes.stager if probes.stager is not None else probes.make_stager()
                now, staged = stager.stage(tensors)
                if now:
                    for name, value in now.items():
                        assign(rec, name, value)
                if staged is not None:
                    rec[STAGED] = staged
            if not probes.bound:
                probes.bind()
            self.last_step = rec["step"]
            self._phase = None  # the step is over: no phase until the loop names the next one
            self._active = True
            self._push(rec)
            # a NaN/Inf loss or grad norm goes out at once (the first of a run of them); x - x is 0.0
            # for every finite number. Tensors are judged on the background thread, once copied.
            value = rec.get("loss")
            bad = value is not None and value - value != 0.0
            if not bad:
                value = rec.get("grad_norm")
                bad = value is not None and value - value != 0.0
            if bad is not self._nonfinite:
                self._nonfinite = bad
                if bad:
                    self._outbox.request_flush()
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

    def set_phase(self, name: str | None) -> None:
        """What the training thread does from now on: "data" (waiting for the next batch), "step"
        (forward, backward, optimizer, their collectives), or another name of 1-32 characters of
        [a-z0-9_-]; None: nothing. Heartbeats carry it and its start time until the next ``set_phase``
        or ``record()``. An attribute write and a clock read; never raises (a bad name is logged and
        the phase cleared)."""
        try:
            if name is None:
                self._phase = None
            elif type(name) is str and name in self._phase_names:
                self._phase = (name, self._clock())
            elif type(name) is str and _PHASE_NAME.match(name):
                self._phase_names.add(name)
                self._phase = (name, self._clock())
            else:
                raise ValueError("must be 1-32 characters of [a-z0-9_-]")
        except Exception as exc:  # never break training because of telemetry
            self._phase = None
            self._warn("phase", "phase name %r skipped: %s", name, exc)

    def phase(self, name: str) -> _PhaseScope:
        """``with tm.phase("data"): batch = next(it)``: ``set_phase(name)`` for the block, then the
        phase that was current before (with its own start time). Errors in the block go through."""
        return _PhaseScope(self, name)

    def start(self, **fields: Any) -> None:
        """The run's start: world_size, batch_size, lr, reference_lr, reference_batch_size, warmup_steps,
        optimizer, config... host and pid are filled in, and ``stop_on`` in ``config`` (a dict, or one made)
        when the client has one and the config does not name it. Sent at once, ahead of the first samples."""
        if dataclasses.is_dataclass(fields.get("config")):
            fields["config"] = dataclasses.asdict(fields["config"])
        config = fields.get("config")
        if self._hearing.stop_on and (config is None or isinstance(config, dict) and "stop_on" not in config):
            # the pages say "stopped by stop_on" from the start's config (docs/page.md)
            fields["config"] = {**(config or {}), "stop_on": sorted(self._hearing.stop_on)}
        host = self.settings.host or socket.gethostname()  # TRAINHEALTH_HOST, else the machine's
        self._send_kind("start", None, {"world_size": self.world_size, "host": host, "pid": os.getpid(), **fields})
        self._active = True
        self._outbox.request_flush()

    def heartbeat(self, step: int | None = None, *, gpu_health: dict[str, Any] | None = None) -> None:
        self._heartbeat(step, "gpu_health", gpu_health)

    def _heartbeat(self, step: int | None, name: str, value: Any) -> None:
        """A heartbeat with the loop's phase and one more field (left out when None)."""
        phase = self._phase  # one read: name and start time stay together
        fields: dict[str, Any] = {} if phase is None else {"phase": phase[0], "phase_time": phase[1]}
        if value is not None:
            fields[name] = value
        self._send_kind("heartbeat", step, fields)

    def _ack_stop(self, stop: int, checked: int | None) -> None:
        """Tell the sidecar at once that this rank heard the stop at ``stop`` when its loop had last asked
        about step ``checked``: an urgent heartbeat's ``stop_ack`` (hearing.py, monitor/stop_steps.py)."""
        self._heartbeat(None, "stop_ack", {"step": stop} if checked is None else {"step": stop, "checked": checked})
        self._outbox.request_flush()

    def end(self, step: int | None = None) -> None:
        """The rank is done (status "completed"); sent at once. Not needed: a normal exit sends it."""
        self._send_kind("end", step, {"status": "completed"})
        self._active = False
        self._outbox.request_flush()

    def oom(self, message: str, step: int | None = None, detail: str | None = None, **fields: Any) -> None:
        """A caught out-of-memory error; sent at once (the process may be about to die)."""
        extra = {"message": str(message)[:MESSAGE_CHARS], **fields}
        if detail is not None:
            extra["detail"] = str(detail)[:DETAIL_CHARS]
        self._send_kind("oom", step, extra)
        self._outbox.request_flush()

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

    @staticmethod
    def grad_norm(parameters: Any) -> Any:
        """The gradients' global L2 norm as a device tensor, no host sync: ``grad_norm=tm.grad_norm(model)``
        in a loop that does not clip (torch_helpers.grad_norm)."""
        from .torch_helpers import grad_norm

        return grad_norm(parameters)

    def oom_guard(self, step: int | None = None) -> Any:
        """``with tm.oom_guard(): ...``: report a CUDA out-of-memory error, then re-raise it."""
        from .torch_helpers import oom_guard

        return oom_guard(self, step=step)

    # -- what the sidecar says back (hearing.py) ---------------------------------------------------
    def should_stop(self, step: int) -> bool:
        """True once ``step`` reaches the stop step of an alert in ``stop_on`` that fired for this run: the
        same step on every rank (call it after each step, on every rank, and leave the loop). An
        attribute read and a comparison, except at the stop step itself: there it waits (up to
        ``stop_confirm_seconds``) until the sidecar confirms that every rank takes the stop, or moves it
        (then False: the loop meets the moved stop later). Never raises."""
        hearing = self._hearing
        hearing.checked = step  # first the step, then the stop (hearing.py: a late stop is not taken)
        stop = hearing.stop_at
        if stop is None or step < stop:
            return False
        if hearing.confirmed_at == stop:
            return True
        try:
            return hearing.await_confirmed(step, self.settings.stop_confirm_seconds)
        except Exception as exc:  # never break training because of telemetry
            self._warn("stop", "waiting for the stop at step %d failed: %r", stop, exc)
            return False

    @property
    def stop_reason(self) -> dict[str, Any] | None:
        """Why ``should_stop`` turns true: {alert, step (the stop step), first_step, rank, severity,
        summary}; None while no alert in ``stop_on`` fired."""
        return self._hearing.stop_reason

    @property
    def alerts(self) -> list[dict[str, Any]]:
        """This run's firing alerts, as the sidecar last said (alert, rank, severity, step, time, summary,
        and stop_step). Fresh within milliseconds with ``stop_on`` or ``on_alert``, else as of the last send."""
        return list(self._hearing.alerts)

    # -- flushing and closing ----------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything recorded so far is delivered; False if that failed or took longer than
        ``timeout`` (the records stay queued)."""
        if self._background is None:  # driven by hand (tests, benchmarks): one synchronous attempt
            self._outbox.request_flush()
            self.pump()
            return self._outbox.stats()["queued"] == 0
        return self._outbox.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds), stop the threads; idempotent."""
        if self._closed:
            return
        self._closed = True
        lifecycle.unregister(self)
        deadline = self._monotonic() + timeout
        self.flush(timeout)
        if self._background is not None and not self._background.end(deadline, self._monotonic):
            return  # stuck in a slow request: leave the daemon thread and its connection be
        left = self._outbox.discard()
        if left:
            log.warning("trainhealth: %d records not delivered at close (%s)", left,
                        "sidecar unreachable" if self._outbox.last_failed else "timeout")
        try:
            self._sender.close()
        except Exception as exc:  # pragma: no cover - closing a socket or file
            log.debug("trainhealth: closing sender: %r", exc)

    def stats(self) -> dict[str, int]:
        """Records sent, dropped (buffer full, or undelivered at close), rejected by the sidecar, failed
        sends, and queued now."""
        return self._outbox.stats()

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.end()
        self.close()

    # -- the process ends, crashes or forks (lifecycle.py) -----------------------------------------
    def _at_exit(self) -> None:
        """A normal interpreter exit: the rank completed (unless ``end()`` or a crash said so already)."""
        if self._closed:
            return
        if self._active:
            self.end()
        self.close()

    def _crashed(self, exc_type: type[BaseException], exc: BaseException, tb: Any,
                 thread: str | None = None) -> None:
        """An uncaught exception (exception hooks): ``end`` with status "failed" quoting it, sent before
        the process goes on dying; a CUDA OOM also gets its ``oom`` record with the allocator summary."""
        if self._closed:
            return
        try:
            if is_cuda_oom(exc) and not getattr(exc, "_trainhealth_reported", False):
                from .torch_helpers import report_oom

                report_oom(self, exc)
            self._gpu_health_now()  # a crash may be the GPU's (XID 79): its reading goes out before the end
            self._send_kind("end", None, {"status": "failed", "error": error_info(exc_type, exc, tb, thread)})
            self._active = False  # a thread's crash: the rank is failed until it records again
            self.flush(self.settings.crash_flush_seconds)
        except Exception as inner:  # the report must not hide the crash
            log.warning("trainhealth: could not report %s: %r", exc_type.__name__, inner)

    def _signalled(self, name: str) -> bool:
        """A signal is about to end the process (sigterm.py, on a thread of its own): ``end`` with status "failed"
        and ``signal``, sent at once (sigterm.py then waits for it, up to ``crash_flush_seconds``). Records after
        it are dropped: the end stays the rank's last word. False when closed (nothing to wait for)."""
        if self._closed:
            return False
        self._send_kind("end", None, {"status": "failed", "signal": name})
        self._active = False
        self._push = lifecycle.drop
        self._outbox.request_flush()
        return True

    def _gpu_health_now(self) -> None:
        """A GPU health reading now, in a heartbeat, from the probes that read one (gpu_health.py)."""
        for reading in self._probes.gpu_health_now():
            self.heartbeat(gpu_health=reading)

    def _after_fork_in_child(self) -> None:
        """A forked child (a DataLoader worker) has this object but not its threads, and one of them
        may have held the buffer's lock at the fork. This copy goes quiet: records are dropped, nothing
        is sent on the parent's connection, close() returns at once."""
        self._closed = True
        self._background = None
        self._active = False
        self._sender = lifecycle.Forked()
        self._outbox = Outbox(self._sender, self.settings, self._monotonic, self._warn)
        self._push = lifecycle.drop

    # -- what the background thread calls (background.py) ------------------------------------------
    def pump(self) -> None:
        """One background cycle: measure, then send what is ready (unless backing off)."""
        self._refresh()
        if self._outbox.poll_staged():
            self._outbox.request_flush()
        self._outbox.cycle()

    def _refresh(self) -> None:
        """Measure for the samples recorded from now on (probes.py). Runs every cycle, also while sends are
        failing, so samples recorded during an outage keep their values."""
        self._probes.refresh(self._health_heartbeat, self._outbox.counts)

    def _health_heartbeat(self, reading: dict[str, Any]) -> None:
        if self._active:
            self.heartbeat(gpu_health=reading)  # each reading once, in its own heartbeat: record() pays nothing

    def _beat(self) -> None:
        """A heartbeat, once the run started (start() or a record) and until it ended."""
        if self._active:
            self.heartbeat()


class _PhaseScope:
    __slots__ = ("tm", "name", "outer")

    def __init__(self, tm: Telemetry, name: str) -> None:
        self.tm, self.name = tm, name
        self.outer: tuple[str, float] | None = None

    def __enter__(self) -> None:
        self.outer = self.tm._phase
        self.tm.set_phase(self.name)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.tm._phase = self.outer


def _make_sender(s: ClientSettings) -> Any:
    if s.offline_path:
        return FileSender(s.offline_path.format(rank=s.rank, run=s.run))
    return HttpSender(s.url, s.token, s.timeout_seconds, launch=lambda: launch_header(s, os.getpid()))
