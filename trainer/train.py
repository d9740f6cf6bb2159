"""The reference trainer: a small MLP on synthetic data, DDP under torchrun, the seed's LR policy,
telemetry on every step, and each fault trainhealth detects, injectable on purpose.

Usage:
    python -m trainhealth.trainer --steps 50                                  # one process (CPU, or one GPU)
    torchrun --standalone --nproc_per_node 2 -m trainhealth.trainer --steps 200 --step-sleep 0.05
    TRAINHEALTH_URL=http://127.0.0.1:9464 TRAINHEALTH_RUN=demo \\
        torchrun --standalone --nproc_per_node 2 -m trainhealth.trainer \\
        --inject nan-data --inject-rank 1 --inject-step 20
    TRAINHEALTH_OFFLINE=/tmp/demo-{rank}.jsonl python -m trainhealth.trainer --steps 100  # then: trainhealth replay
    torchrun --standalone --nproc_per_node 2 -m trainhealth.trainer --stop-on nan_divergence \
        --inject nan-data --inject-rank 1 --inject-step 20        # every rank stops at the same step, exit 3

Backend: nccl on GPUs, gloo on the CPU. Telemetry goes to TRAINHEALTH_URL (default http://127.0.0.1:9464);
the run is TRAINHEALTH_RUN, else torchrun's TORCHELASTIC_RUN_ID.

The LR policy (Goyal et al.'s linear scaling rule, Detectron's lib/utils/lr_policy.py): the config's LR
(--reference-lr 0.02) was tuned for --gpus-reference 8 GPUs x --reference-batch-per-gpu 2 samples. On W ranks
x --batch-size samples the peak LR is scaled by k = total batch / reference batch, and the schedule
(--reference-max-iter, --reference-lr-steps, where the LR drops by --gamma) is stretched by 1/k, so every
configuration sees the same number of samples (Detectron: 0.02 / 7500 iters on 8 GPUs, 0.0025 / 60000 on 1).
For the first --warmup-steps the LR rises from --warmup-factor (1/3) of its value, linearly or held constant.
--optimizer lars uses Layer-wise Adaptive Rate Scaling. --lr sets the peak LR by hand (no scaling).

Faults (--inject NAME, on rank --inject-rank K, at step --inject-step S; steps count updates from 1):
    lr-unscaled  run the reference config unchanged on this (smaller) total batch: LR and schedule unscaled
    nan-data     rank K's batch for step S holds a NaN and an Inf: its loss at step S is NaN
    gpu-leak     from step S rank K keeps --leak-mb more GPU memory every step until CUDA runs out (the OOM
                 is reported, then raised). Needs a GPU: on the CPU there is no GPU memory, nothing is leaked
    host-leak    from step S rank K keeps --leak-mb more host memory every step
    hang         at step S rank K sleeps --hang-seconds (0: forever) while the others wait in all-reduce
    die          at step S rank K exits at once with os._exit(13): no end record, no flush
    straggler    from step S rank K sleeps --straggler-seconds in data loading every step
    slow-compute from step S rank K sleeps --straggler-seconds inside its forward every step (a slow GPU): every
                 rank's step time stays the same, the others wait for it in the all-reduce
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .client import Telemetry
from .fields import ALERT_NAMES
from .step_timing import StepTimer

log = logging.getLogger("trainhealth.trainer.train")
INJECTIONS = ("lr-unscaled", "nan-data", "gpu-leak", "host-leak", "hang", "die", "straggler", "slow-compute")


@dataclass(kw_only=True, slots=True)
class Config:
    steps: int | None = field(default=None, metadata={"type": int, "help": "stop after N steps (default: "
                                                                            "the scaled schedule's length)"})
    batch_size: int = field(default=2, metadata={"help": "samples per rank per step"})
    gpus_reference: int = field(default=8, metadata={"help": "the GPU count the reference LR was tuned for"})
    reference_batch_per_gpu: int = 2
    reference_lr: float = 0.02
    reference_max_iter: int = 800
    reference_lr_steps: str = field(default="400,533", metadata={"help": "LR drop points, reference steps"})
    lr: float | None = field(default=None, metadata={"type": float, "help": "peak LR by hand (no scaling)"})
    warmup_steps: int = 50
    warmup_method: str = field(default="linear", metadata={"choices": ("linear", "constant")})
    warmup_factor: float = 1.0 / 3.0
    gamma: float = 0.1
    optimizer: str = field(default="sgd", metadata={"choices": ("sgd", "lars")})
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lars_eta: float = 0.001
    amp: bool = field(default=False, metadata={"help": "fp16 autocast + GradScaler (GPU only)"})
    input_dim: int = 32
    input_scale: float = field(default=0.4, metadata={"help": "input std; at 0.4 the scaled LR trains and "
                                                              "the unscaled 8-GPU LR on 1-2 ranks diverges"})
    hidden: int = 64
    step_sleep: float = field(default=0.0, metadata={"help": "seconds of pretend compute per step"})
    log_every: int = 50
    seed: int = 0
    pg_timeout: float = field(default=600.0, metadata={"help": "collective timeout, seconds"})
    inject: str | None = field(default=None, metadata={"type": str, "choices": INJECTIONS})
    inject_rank: int = 0
    inject_step: int = 10
    leak_mb: float = field(default=4.0, metadata={"help": "gpu-leak / host-leak: MB kept per step"})
    hang_seconds: float = 0.0
    straggler_seconds: float = 0.05
    stop_on: str = field(default="", metadata={"help": "comma-separated alert names (e.g. nan_divergence): when "
                                                       "one fires for the run, every rank stops after the same "
                                                       "step and the trainer exits 3"})

    def __post_init__(self) -> None:
        for name in ("batch_size", "gpus_reference", "reference_batch_per_gpu", "reference_max_iter",
                     "input_dim", "hidden", "log_every", "inject_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("reference_lr", "warmup_factor", "gamma", "input_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.stop_on and not set(stop_names(self)) <= ALERT_NAMES:
            bad = sorted(set(stop_names(self)) - ALERT_NAMES)[0]
            raise ValueError(f"stop_on: unknown alert name {bad!r}; known: {', '.join(sorted(ALERT_NAMES))}")
        if self.inject is not None and self.inject not in INJECTIONS:
            raise ValueError(f"inject: must be one of {', '.join(INJECTIONS)}, got {self.inject!r}")
        lr_steps(self)  # validates reference_lr_steps


def stop_names(cfg: Config) -> list[str]:
    return [name.strip() for name in cfg.stop_on.split(",") if name.strip()]


def lr_steps(cfg: Config) -> tuple[int, ...]:
    try:
        points = tuple(int(s) for s in cfg.reference_lr_steps.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"reference_lr_steps: must be comma-separated integers, "
                         f"got {cfg.reference_lr_steps!r}") from None
    if list(points) != sorted(points) or any(p < 1 for p in points):
        raise ValueError(f"reference_lr_steps: must be increasing and >= 1, got {cfg.reference_lr_steps!r}")
    return points


# -----------------------------------------------------------------------------------------------------------
# The LR policy: pure functions of the config and the world size.

@dataclass(frozen=True, slots=True)
class Schedule:
    peak_lr: float
    max_iter: int
    lr_steps: tuple[int, ...]
    total_batch: int
    reference_batch: int


def schedule_for(cfg: Config, world_size: int) -> Schedule:
    """Linear scaling: LR x k, iterations and LR drop points / k, for k = total batch / reference batch."""
    total = world_size * cfg.batch_size
    reference = cfg.gpus_reference * cfg.reference_batch_per_gpu
    k = 1.0 if cfg.inject == "lr-unscaled" else total / reference  # the fault: the config run unchanged
    peak = cfg.lr if cfg.lr is not None else cfg.reference_lr * k
    return Schedule(peak_lr=peak, max_iter=max(1, round(cfg.reference_max_iter / k)),
                    lr_steps=tuple(round(s / k) for s in lr_steps(cfg)), total_batch=total,
                    reference_batch=reference)


def lr_at(it: int, sched: Schedule, cfg: Config) -> float:
    """Detectron's 'steps_with_decay' policy with warmup; ``it`` counts from 0."""
    lr = sched.peak_lr * cfg.gamma ** sum(1 for s in sched.lr_steps if it >= s)
    if it < cfg.warmup_steps:
        if cfg.warmup_method == "constant":
            lr *= cfg.warmup_factor
        else:
            alpha = it / cfg.warmup_steps
            lr *= cfg.warmup_factor * (1 - alpha) + alpha
    return lr


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017): SGD with momentum where each weight matrix's
    update is scaled by eta * |w| / (|g| + weight_decay * |w|); biases take the global LR. The trust ratio
    stays a tensor (torch.where), so no host sync."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                 eta: float = 0.001) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            wd, eta = group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(p.grad)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        eta * w_norm / (g_norm + wd * w_norm), torch.ones_like(w_norm))
                    update = (p.grad + wd * p) * trust
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])


# -----------------------------------------------------------------------------------------------------------
# Model and data: y = x A / input_scale + noise, learned by an MLP. Each rank draws its own batches. The input
# scale sets the curvature: at 0.4 SGD is stable at the linearly scaled LR and diverges within a few hundred
# steps at the unscaled reference LR on one or two ranks (the seed's first failure).

def make_model(cfg: Config) -> nn.Module:
    return nn.Sequential(nn.Linear(cfg.input_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))


def make_batch(gen: torch.Generator, teacher: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(cfg.batch_size, cfg.input_dim, generator=gen) * cfg.input_scale
    y = x @ teacher / cfg.input_scale + 0.1 * torch.randn(cfg.batch_size, 1, generator=gen)
    return x, y


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m trainhealth.trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        if f.default is False:
            parser.add_argument(flag, action="store_true", help=meta.get("help"))
            continue
        parser.add_argument(flag, type=meta.pop("type", type(f.default)), default=f.default,
                            help=meta.pop("help", None) or f"default {f.default!r}", **meta)
    try:
        return Config(**vars(parser.parse_args(argv)))
    except ValueError as exc:
        parser.error(str(exc))
        raise  # pragma: no cover - parser.error exits


# -----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.pg_timeout))
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    master = rank == 0
    injected = cfg.inject is not None and rank == cfg.inject_rank
    if cfg.inject == "gpu-leak" and not use_cuda and master:
        log.warning("--inject gpu-leak needs a GPU; on the CPU nothing is leaked")

    sched = schedule_for(cfg, world)
    n_steps = cfg.steps or sched.max_iter
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts them)
    teacher = torch.randn(cfg.input_dim, 1, generator=torch.Generator().manual_seed(cfg.seed + 12345))
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # each rank draws its own data
    model = make_model(cfg).to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    if cfg.optimizer == "lars":
        optimizer: torch.optim.Optimizer = LARS(model.parameters(), lr=sched.peak_lr, momentum=cfg.momentum,
                                                weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=sched.peak_lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and use_cuda)
    timer = StepTimer(model)  # compute vs waiting in the all-reduce, per step (CPU: wall clock)

    tm = Telemetry(rank=rank, world_size=world, stop_on=stop_names(cfg))
    tm.start(world_size=world, batch_size=cfg.batch_size, lr=sched.peak_lr, reference_lr=cfg.reference_lr,
             reference_batch_size=sched.reference_batch, warmup_steps=cfg.warmup_steps,
             optimizer=cfg.optimizer,
             config={**dataclasses.asdict(cfg), "max_iter": sched.max_iter, "lr_steps": list(sched.lr_steps),
                     "total_batch": sched.total_batch, "device": str(device)})
    if master:
        log.info("run %s: %d ranks x %d = total batch %d (reference %d): peak LR %.6g, %d steps, "
                 "LR drops at %s",
                 tm.run, world, cfg.batch_size, sched.total_batch, sched.reference_batch, sched.peak_lr,
                 n_steps, list(sched.lr_steps))

    leak: list[object] = []
    stopped = False
    for it in range(n_steps):
        step = it + 1  # the step this iteration completes
        faulty = injected and step >= cfg.inject_step
        t0 = time.perf_counter()

        # data (the hang is injected here, as in a deadlocked DataLoader: the heartbeats say "data")
        with tm.phase("data"):
            x, y = make_batch(gen, teacher, cfg)
            if faulty and cfg.inject == "straggler":
                time.sleep(cfg.straggler_seconds)
            if faulty and step == cfg.inject_step and cfg.inject == "nan-data":
                x[0, 0] = float("nan")
                x[-1, -1] = float("inf")
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            data_time = time.perf_counter() - t0

            # faults that stop the rank
            if faulty and step == cfg.inject_step and cfg.inject == "die":
                log.warning("rank %d: dying at step %d (injected)", rank, step)
                os._exit(13)
            if faulty and step == cfg.inject_step and cfg.inject == "hang":
                log.warning("rank %d: hanging at step %d (injected)", rank, step)
                until = time.monotonic() + cfg.hang_seconds if cfg.hang_seconds > 0 else float("inf")
                while time.monotonic() < until:
                    time.sleep(min(1.0, max(0.0, until - time.monotonic())))

        # forward, backward (DDP all-reduces the gradients here), update
        with tm.phase("step"):
            timer.begin()
            lr = lr_at(it, sched, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with tm.oom_guard(step=it):
                with torch.autocast(device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
                    if faulty and cfg.inject == "slow-compute":
                        time.sleep(cfg.straggler_seconds)  # this rank's forward is slow; the others wait
                    loss = F.mse_loss(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                split = timer.end()  # backward and DDP's all-reduce have returned
                scaler.unscale_(optimizer)
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads)  # a tensor: no sync
                scaler.step(optimizer)
                scaler.update()
                if faulty and cfg.inject == "gpu-leak" and use_cuda:
                    leak.append(torch.empty(int(cfg.leak_mb * 2**20), dtype=torch.uint8, device=device))
            if faulty and cfg.inject == "host-leak":
                leak.append(b"\x01" * int(cfg.leak_mb * 2**20))  # bytes written, so the pages are resident
            if cfg.step_sleep:
                time.sleep(cfg.step_sleep)
        # On a GPU this is host time: the host runs ahead of the device, but a few steps at most.
        step_time = time.perf_counter() - t0

        # telemetry: tensors are handed over as they are, read later without a GPU sync
        tm.record(step, loss=loss.detach(), lr=lr, grad_norm=grad_norm, grad_scale=scaler,
                  step_time_seconds=step_time, data_time_seconds=data_time,
                  batch_size=cfg.batch_size, world_size=world, **split)
        if master and (step % cfg.log_every == 0 or step == n_steps):
            # loss.item() is a CPU-GPU sync point: only every log_every steps, for the console
            log.info("step %d/%d: loss %.4f, lr %.6g, %.1f ms", step, n_steps, loss.item(), lr,
                     step_time * 1e3)
        # every rank leaves after the same step: none is left waiting in the next step's all-reduce. The
        # weights are suspect now: a real loop would not checkpoint them, and would keep its last good one.
        if tm.should_stop(step):
            reason = tm.stop_reason or {}
            log.error("rank %d: stopping after step %d: %s (first at step %s on rank %s)", rank, step,
                      reason.get("summary") or reason.get("alert"), reason.get("first_step"), reason.get("rank"))
            stopped = True
            break

    tm.end()
    tm.close()
    if distributed:
        dist.destroy_process_group()
    return 3 if stopped else 0  # non-zero: the scheduler sees the failure


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
