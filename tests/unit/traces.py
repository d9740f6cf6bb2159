"""Generated training traces for detector tests: healthy look-alikes and failures.

A trace is a dict of per-step columns (``loss``, ``grad_norm``, ``lr``,
``grad_scale``; index i is step ``step0 + i``); ``samples`` turns it into
Records of one rank, ``merge`` interleaves ranks the way the pipeline orders
them (step, then time). Every generator takes a seed: the traces are exact.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
from trainhealth.record import Record, from_obj

RUN = "trace"
Trace = dict[str, list[Any]]


def noise(rng: np.random.Generator, n: int, df: float | None) -> np.ndarray:
    """Unit noise: Gaussian, or Student-t with ``df`` degrees of freedom (heavy tails)."""
    return rng.standard_normal(n) if df is None else rng.standard_t(df, n)


def healthy(steps: int = 600, *, seed: int = 0, loss0: float = 2.5, loss_floor: float = 0.3,
            tau: float = 200.0, loss_noise: float = 0.05, df: float | None = None,
            peak_lr: float = 0.1, warmup: int = 0, lr_drops: Sequence[int] = (),
            drop_factor: float = 10.0, loss_drop: float = 0.6, grad0: float = 1.0,
            grad_noise: float = 0.2) -> Trace:
    """A healthy curve: exponential decay to a floor, multiplicative noise (log space),
    linear LR warmup, LR divided by ``drop_factor`` at each of ``lr_drops`` (the loss
    then drops by ``loss_drop``), grad norm growing during warmup then noisy-flat."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=float)
    level = loss_floor + (loss0 - loss_floor) * np.exp(-t / tau)
    lr = np.full(steps, peak_lr)
    if warmup:
        lr[:warmup] = peak_lr * (t[:warmup] + 1) / warmup
    grad = np.full(steps, grad0)
    if warmup:
        grad[:warmup] = grad0 * (0.2 + 0.8 * (t[:warmup] + 1) / warmup)
    for d in lr_drops:
        lr[d:] /= drop_factor
        level[d:] *= loss_drop
    loss = level * np.exp(loss_noise * noise(rng, steps, df))
    grad = grad * np.exp(grad_noise * noise(rng, steps, df))
    return {"loss": loss.tolist(), "grad_norm": grad.tolist(), "lr": lr.tolist(),
            "grad_scale": [None] * steps}


def with_amp(trace: Trace, overflows: Iterable[int], *, init_scale: float = 65536.0,
             growth_interval: int = 2000, logged: str = "after") -> Trace:
    """fp16 dynamic loss scaling as torch's GradScaler does it: an overflow step has an
    infinite grad norm and halves the scale; ``growth_interval`` clean steps double it.
    ``logged`` is when the client read the scale: ``after`` scaler.update() (the drop shows
    in the same sample) or ``before`` (it shows in the next one)."""
    bad = set(overflows)
    n = len(trace["loss"])
    scale, clean = init_scale, 0
    scales, grads = [], list(trace["grad_norm"])
    for i in range(n):
        used = scale
        if i in bad:
            grads[i] = math.inf
            scale, clean = scale / 2, 0
        else:
            clean += 1
            if clean >= growth_interval:
                scale, clean = scale * 2, 0
        scales.append(scale if logged == "after" else used)
    return {**trace, "grad_norm": grads, "grad_scale": scales}


def samples(trace: Trace, rank: int = 0, *, step0: int = 1, t0: float = 1000.0,
            dt: float = 0.5, run: str = RUN) -> list[Record]:
    n = len(trace["loss"])
    out = []
    for i in range(n):
        obj: dict[str, Any] = {"run": run, "rank": rank, "step": step0 + i,
                               "time": t0 + (step0 + i) * dt + rank * 1e-3}
        for name, column in trace.items():
            if column[i] is not None:
                obj[name] = float(column[i])
        out.append(from_obj(obj))
    return out


def start(rank: int = 0, *, time: float = 999.0, run: str = RUN, **fields: Any) -> Record:
    return from_obj({"type": "start", "run": run, "rank": rank, "time": time, **fields})


def merge(*streams: Iterable[Record]) -> list[Record]:
    """Several ranks' records in the pipeline's order: step, then time."""
    records = [r for s in streams for r in s]
    records.sort(key=lambda r: (r.step if r.step is not None else -1, r.time))
    return records


def set_at(trace: Trace, column: str, values: dict[int, float]) -> Trace:
    """A copy with ``column[i] = value`` for each index i (0-based)."""
    col = list(trace[column])
    for i, v in values.items():
        col[i] = v
    return {**trace, column: col}


def scale_from(trace: Trace, column: str, first: int, factors: Sequence[float]) -> Trace:
    """A copy with ``column[first + k] *= factors[k]``: a spike or a blow-up."""
    col = list(trace[column])
    for k, f in enumerate(factors):
        if first + k < len(col):
            col[first + k] = col[first + k] * f
    return {**trace, column: col}


def run_pipeline(*batches: Sequence[Record], **overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Alert transitions of the real pipeline fed these batches in turn (each batch is ordered
    by step, then time, as the sidecar does); ``overrides`` = {detector: {setting: value}}."""
    from trainhealth.config import default_detector_settings
    from trainhealth.pipeline import Pipeline

    settings = default_detector_settings()
    for name, values in overrides.items():
        settings[name] = type(settings[name])(**values)
    pipeline = Pipeline(settings)
    # copies as made: an open alert is refreshed in place later (one incident whose picture sharpens)
    return [dict(a) for batch in batches for a in pipeline.process(list(batch)).alerts]


def only(alerts: list[dict[str, Any]], name: str) -> list[tuple[str, int | None, int]]:
    """(state, rank, step) of one alert's transitions: the exact expectation tests compare."""
    return [(a["state"], a["rank"], a["step"]) for a in alerts if a["alert"] == name]


class SentAlerts:
    """An alert sink (service.AlertSink) that keeps what it is handed: ``sent`` the transitions, ``refreshed``
    the open alerts refreshed in place, each list in the order received."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.refreshed: list[dict[str, Any]] = []

    def __call__(self, alerts: list[Any]) -> None:
        self.sent.extend(alerts)

    def refresh(self, alerts: list[Any]) -> None:
        self.refreshed.extend(alerts)
