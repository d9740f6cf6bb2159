"""What the Hugging Face and Lightning callbacks share; imports neither framework.

``Reporter`` owns the rank's ``Telemetry`` (or uses the one it was given) and turns the framework's
events into records: one ``start``, one ``sample`` per optimizer step, ``end``. It also asks the client
at every optimizer step whether to stop (``tm.should_stop(step)``): the client's stop protocol makes
that answer the same on every rank at the same step, so the framework's own stop flag, set from it,
stops every rank after the same step and none is left waiting in a collective.

Imports are absolute (``trainhealth.trainer...``): this folder installs as ``trainhealth.integrations``,
beside ``trainhealth.trainer``, not inside it.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any, Callable, Iterable, TypeVar

from trainhealth.trainer.client import Telemetry
from trainhealth.trainer.outbox import LimitedLog
from trainhealth.trainer.settings import from_environ
from trainhealth.trainer.step_timing import StepTimer

log = logging.getLogger("trainhealth.integrations")
_warn = LimitedLog()

F = TypeVar("F", bound=Callable[..., Any])


def guarded(hook: F) -> F:
    """A callback method that never breaks training: an error in it is logged (rate-limited) and the
    hook returns None (for Hugging Face: the control object unchanged)."""

    @functools.wraps(hook)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return hook(self, *args, **kwargs)
        except Exception as exc:
            warn = getattr(self, "_warn", None) or _warn  # the callback's own limiter: one per callback
            warn(f"hook-{hook.__name__}", "%s failed and was skipped: %r", hook.__name__, exc)
            return None

    return wrapper  # type: ignore[return-value]


def optimizer_name(optimizer: Any) -> str | None:
    """The optimizer's class name, under the wrappers frameworks put around it (accelerate's
    AcceleratedOptimizer, Lightning's LightningOptimizer) and lower-cased like the record's examples."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return type(optimizer).__name__.lower() if optimizer is not None else None


def first_lr(optimizer: Any, key: str = "lr") -> float | None:
    """``param_groups[0][key]`` as a float, or None (no optimizer, no such key, a tensor LR)."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    value = groups[0].get(key)
    return float(value) if isinstance(value, (int, float)) else None


def numbers(values: dict[str, Any], skip: Iterable[str]) -> dict[str, float]:
    """The plain-number entries of a framework's log dict, but those in ``skip`` (bools are not numbers).
    Non-finite ones are kept: a NaN metric is news."""
    skipped = set(skip)
    out: dict[str, float] = {}
    for name, value in values.items():
        if name in skipped or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[name] = float(value)
    return out


class Reporting:
    """What either callback shows of its ``Reporter`` (``self.reporter``), and asks it each step."""

    reporter: Reporter

    @property
    def telemetry(self) -> Telemetry | None:
        """The rank's client (None until the framework gives the rank, when none was given: the Trainer's
        ``on_train_begin``, Lightning's ``setup``)."""
        return self.reporter.telemetry

    @property
    def stop_step(self) -> int | None:
        """The optimizer step after which training stopped for an alert in ``stop_on``; None if it did not."""
        return self.reporter.stop_step

    @guarded
    def _should_stop(self, step: int) -> bool:
        return self.reporter.should_stop(step)


class Reporter:
    """One rank's reporting, behind either callback.

    ``telemetry``: a client the user made (then ``telemetry_options`` must be empty: it is used as is).
    Otherwise one is made at ``bind()``, when the framework knows the rank and world size, with
    ``stop_on`` and ``telemetry_options`` (``url``, ``run``, ``token``, ``on_alert``, ...). Fields given
    here (``reference_lr``, ``reference_batch_size``, ``warmup_steps``, ``config``...) go into ``start``
    and win over what the callback reads from the framework."""

    def __init__(self, telemetry: Telemetry | None, stop_on: Iterable[str] | None,
                 start_fields: dict[str, Any], telemetry_options: dict[str, Any]) -> None:
        if telemetry is not None and (stop_on is not None or telemetry_options):
            raise TypeError("pass either telemetry= (a Telemetry you made, with its own stop_on) or "
                            "stop_on= and Telemetry options, not both")
        self.telemetry = telemetry
        self.owned = telemetry is None
        self.stop_on = None if stop_on is None else set(stop_on)
        self.start_fields = {k: v for k, v in start_fields.items() if v is not None}
        self.telemetry_options = telemetry_options
        self.stop_step: int | None = None  # the step the run stopped after, on trainhealth's word
        self._last_step_end: float | None = None
        self.timer: StepTimer | None = None  # compute and collective wait per step (step_timing.py)
        self._timing: dict[str, float] = {}

    # -- setup ----------------------------------------------------------------------------------------
    def bind(self, rank: int, world_size: int, broadcast: Callable[[Any], Any] | None) -> Telemetry:
        """The rank's client, made now if the user gave none. ``broadcast(obj)`` returns rank 0's ``obj``
        on every rank (a collective: every rank calls ``bind`` at the same point of setup); it makes the
        ranks agree on the run name when the launcher gave none (Lightning starts its own processes,
        without torchrun's ``TORCHELASTIC_RUN_ID``, so each would otherwise name the run after its pid)."""
        if self.telemetry is not None:
            return self.telemetry
        options = dict(self.telemetry_options)
        if options.get("run") is None and world_size > 1 and broadcast is not None:
            environ = options.get("environ")
            options["run"] = broadcast(from_environ(environ).run)
        if self.stop_on is not None:
            options["stop_on"] = self.stop_on
        options.setdefault("rank", rank)
        options.setdefault("world_size", world_size)
        self.telemetry = Telemetry(**options)
        return self.telemetry

    def time_steps(self, model: Any) -> None:
        """Split each step into compute and collective wait (``compute_seconds``, ``comm_wait_seconds``):
        hooks on ``model``'s parameters; ``compute_begins()`` and ``compute_ends()`` mark the step."""
        if self.timer is not None:
            self.timer.detach()
        self.timer = StepTimer(model) if model is not None and hasattr(model, "parameters") else None
        self._timing = {}

    def compute_begins(self) -> None:
        """The step's batch is in hand (the first micro-batch's, with gradient accumulation)."""
        if self.timer is not None:
            self.timer.begin()

    def compute_ends(self) -> None:
        """Backward and its all-reduce returned, the optimizer has not stepped: the split is kept for the
        step's sample."""
        if self.timer is not None:
            self._timing = self.timer.end()

    # -- events ---------------------------------------------------------------------------------------
    def start(self, **framework_fields: Any) -> None:
        """``start`` with what the framework says, overridden by what the user said."""
        tm = self.telemetry
        if tm is None:
            return
        fields = {k: v for k, v in framework_fields.items() if v is not None}
        config = {**fields.pop("config", {}), **self.start_fields.get("config", {})}
        fields.update({k: v for k, v in self.start_fields.items() if k != "config"})
        if config:
            fields["config"] = config
        self._last_step_end = None
        self.stop_step = None
        tm.start(**fields)

    def step(self, step: int, **values: Any) -> None:
        """One optimizer step's sample (values that are None are left out by the client)."""
        tm = self.telemetry
        if tm is None:
            return
        now = time.perf_counter()
        if self._last_step_end is not None:
            values.setdefault("step_time_seconds", now - self._last_step_end)
        self._last_step_end = now
        if self._timing:
            for name, value in self._timing.items():
                values.setdefault(name, value)
            self._timing = {}
        tm.record(step, **values)

    def should_stop(self, step: int) -> bool:
        """The client's answer for this optimizer step (the same on every rank); logs the first yes."""
        tm = self.telemetry
        if tm is None or not tm.should_stop(step):
            return False
        if self.stop_step is None:
            self.stop_step = step
            log.warning("trainhealth: stopping training after step %d on rank %d: %s", step, tm.rank,
                        _describe(getattr(tm, "stop_reason", None) or getattr(tm, "alerts", None)))
        return True

    def end(self, step: int) -> None:
        """``end`` at the framework's train end, and (for a client this callback made) wait briefly until
        everything is delivered, so the last steps are at the sidecar before the process moves on."""
        tm = self.telemetry
        if tm is None:
            return
        tm.end(step)
        if self.timer is not None:
            self.timer.detach()
            self.timer = None
        if self.owned:
            tm.flush(timeout=5.0)


def _describe(why: Any) -> str:
    """A short line for the log from the client's ``stop_reason`` (a dict with a summary) or, failing that,
    its ``alerts`` (a list of such dicts)."""
    if not why:
        return "an alert in stop_on fired"
    items = [why] if isinstance(why, dict) else list(why)
    parts = []
    for alert in items[:3]:
        if isinstance(alert, dict):
            parts.append(str(alert.get("summary") or alert.get("alert") or alert))
        else:
            parts.append(str(alert))
    return "; ".join(parts)


def combine_losses(losses: list[Any], how: str) -> Any:
    """An optimizer step's loss from its micro-batch losses: their "mean" (each is a micro-batch's mean) or
    "sum" (each was already divided by the number of micro-batches, as Lightning does). A float, or a
    tensor computed on its device (no host sync: the client reads it once the device is done); None
    without any."""
    if not losses:
        return None
    if len(losses) == 1:
        return losses[0]
    if hasattr(losses[0], "detach"):
        import torch

        stacked = torch.stack([loss.detach().reshape(()).float() for loss in losses])
        return stacked.mean() if how == "mean" else stacked.sum()
    total = math.fsum(float(v) for v in losses)
    return total / len(losses) if how == "mean" else total
