"""trainhealth for Lightning: one callback.

    from trainhealth.integrations.lightning import TrainHealthCallback

    trainer = L.Trainer(..., callbacks=[TrainHealthCallback(stop_on={"nan_divergence"})])

What it sends (see docs/lightning.md):

- ``start`` at ``on_train_start``: world size, the per-rank batch of one optimizer step (the train
  DataLoader's batch size x ``accumulate_grad_batches``, so batch_size x world_size is the total batch
  the LR is for), the optimizer's peak LR (its ``initial_lr`` when a scheduler set one, else ``lr``),
  the optimizer's class; ``warmup_steps`` and the reference LR/batch when you give them.
- one ``sample`` per optimizer step: the step's training loss (``training_step``'s, summed over the
  accumulated micro-batches as Lightning scales them), the LR the optimizer used, and the gradients'
  global L2 norm before clipping (computed in ``on_before_optimizer_step`` on the device, read without a
  sync; skipped under sharded strategies, FSDP and DeepSpeed, where a rank holds only a shard of the
  gradients), the AMP loss scale under 16-bit mixed precision.
- ``end`` at ``on_train_end``.

Stopping: after every optimizer step the callback asks the client ``tm.should_stop(trainer.global_step)``;
the client's stop protocol makes the answer the same on every rank at the same step. On yes it sets
``trainer.should_stop``: every rank leaves the fit loop after this step. ``callback.stop_step`` says where.

Imports Lightning only (``lightning.pytorch``, the ``lightning`` package), never transformers.
"""

from __future__ import annotations

from typing import Any, Iterable

from lightning.pytorch import Callback
from trainhealth.trainer.client import Telemetry
from trainhealth.trainer.outbox import LimitedLog

from ._common import Reporter, Reporting, combine_losses, first_lr, guarded, optimizer_name

__all__ = ["TrainHealthCallback"]


class TrainHealthCallback(Reporting, Callback):
    """Reports the fit to the trainhealth sidecar and stops it on an alert in ``stop_on``.

    ``telemetry``: a ``Telemetry`` you made yourself (it keeps its own ``stop_on``); otherwise one is made
    at ``setup`` with the trainer's global rank and world size, ``stop_on`` (alert names; empty: never
    stop) and ``telemetry_options`` (``url``, ``run``, ``token``, ``on_alert``, ...). Without a run name
    from you or the environment, rank 0's is broadcast, so the processes Lightning starts itself agree.
    ``reference_lr`` / ``reference_batch_size``: the LR and total batch your config was tuned for (the
    ``lr_scaling`` detector's reference); ``warmup_steps``, ``config``: for ``start``. ``grad_norm``:
    compute the gradients' norm each optimizer step (one norm over the gradients, on their device)."""

    def __init__(self, telemetry: Telemetry | None = None, *, stop_on: Iterable[str] | None = None,
                 reference_lr: float | None = None, reference_batch_size: int | None = None,
                 warmup_steps: int | None = None, config: dict[str, Any] | None = None,
                 grad_norm: bool = True, **telemetry_options: Any) -> None:
        self.reporter = Reporter(telemetry, stop_on,
                                 {"reference_lr": reference_lr, "reference_batch_size": reference_batch_size,
                                  "warmup_steps": warmup_steps, "config": config}, telemetry_options)
        self._warn = LimitedLog()  # a hook's failure: logged the first time, then at most once a minute
        self.grad_norm = grad_norm
        self._losses: list[Any] = []  # this optimizer step's micro-batch losses
        self._lr: float | None = None
        self._norm: Any = None
        self._last_step = -1  # the global step of the last sample sent

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for ``strategy="ddp_spawn"``: each spawned process makes its own client at setup."""
        state = self.__dict__.copy()
        if self.reporter.owned or self.reporter.timer is not None:
            reporter = Reporter.__new__(Reporter)
            reporter.__dict__.update(self.reporter.__dict__, timer=None)  # hooks stay in their process
            if self.reporter.owned:
                reporter.telemetry = None
            state["reporter"] = reporter
        return state

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # not guarded: a bad setting (URL, run name, stop_on) is the user's to fix, said at once
        strategy = trainer.strategy
        self.reporter.bind(int(trainer.global_rank), int(trainer.world_size),
                           lambda obj: strategy.broadcast(obj, src=0))

    @guarded
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._losses, self._lr, self._norm = [], None, None
        self._last_step = int(trainer.global_step)
        self.reporter.time_steps(pl_module)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        per_device = _batch_size(trainer)
        accumulation = int(trainer.accumulate_grad_batches)
        self.reporter.start(
            world_size=int(trainer.world_size),
            batch_size=per_device * accumulation if per_device is not None else None,
            lr=first_lr(optimizer, "initial_lr") or first_lr(optimizer), optimizer=optimizer_name(optimizer),
            config={"framework": "lightning", "per_device_batch_size": per_device,
                    "accumulate_grad_batches": accumulation, "max_steps": int(trainer.max_steps),
                    "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__})

    # -- every optimizer step -------------------------------------------------------------------------
    @guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.reporter.compute_begins()  # counts from the first micro-batch after the last step

    @guarded
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.reporter.compute_ends()  # the closure (forward, backward, DDP's all-reduce) returned
        self._lr = first_lr(optimizer)  # the LR this step uses (schedulers step after it)
        if self.grad_norm and not _sharded(trainer.strategy):
            self._norm = _total_norm(pl_module)  # before clipping, after AMP's unscale

    @guarded
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and hasattr(loss, "detach"):
            self._losses.append(loss.detach())
        step = int(trainer.global_step)
        if step <= self._last_step:
            return  # a micro-batch of gradient accumulation: the optimizer has not stepped yet
        self._last_step = step
        self._send(trainer, pl_module, step)
        if self._should_stop(step):
            trainer.should_stop = True  # every rank leaves the fit loop after this step

    @guarded
    def _send(self, trainer: Any, pl_module: Any, step: int) -> None:
        how = "sum" if pl_module.automatic_optimization else "mean"  # Lightning divides by the accumulation
        sample: dict[str, Any] = {"loss": combine_losses(self._losses, how), "lr": self._lr,
                                  "grad_norm": self._norm}
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed: torch's GradScaler
        if scaler is not None:
            sample["grad_scale"] = scaler
        self._losses, self._norm = [], None
        self.reporter.step(step, **sample)

    # -- the end --------------------------------------------------------------------------------------
    @guarded
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.reporter.end(int(trainer.global_step))


def _batch_size(trainer: Any) -> int | None:
    """The train DataLoader's batch size (per process), or None (an iterable of batches, several loaders)."""
    loader = trainer.train_dataloader
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size) if isinstance(size, int) else None


def _sharded(strategy: Any) -> bool:
    name = type(strategy).__name__.lower()
    return "fsdp" in name or "deepspeed" in name


def _total_norm(module: Any) -> Any:
    """The global L2 norm of the module's gradients, a tensor on their device (no host sync)."""
    import torch

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
