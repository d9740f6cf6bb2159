"""trainhealth for the Hugging Face ``transformers`` Trainer: one callback.

    from trainhealth.integrations.hf import TrainHealthCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[TrainHealthCallback(stop_on={"nan_divergence"})])

What it sends (see docs/huggingface.md):

- ``start`` at ``on_train_begin``: world size, the per-rank batch of one optimizer step (per-device batch x
  gradient accumulation, so batch_size x world_size is the total batch the LR is for), the peak LR
  (``args.learning_rate``), warmup steps, the optimizer's class.
- one ``sample`` per optimizer step (``on_step_end``): the step's own training loss, read from the
  model's output by a forward hook (a tensor, read without a device sync; the mean over the step's
  micro-batches), and the LR the optimizer used. On logging steps the same sample also carries what
  the Trainer logged: ``grad_norm`` (before clipping), ``learning_rate``, other numbers into ``metrics``.
  The forward hook matters: the Trainer logs only every ``logging_steps`` (500 by default), and with
  ``logging_nan_inf_filter`` (on by default) it replaces a NaN loss with the running average, so its
  logged loss never shows a divergence.
- ``end`` at ``on_train_end``.

Stopping: at every optimizer step the callback asks the client ``tm.should_stop(state.global_step)``; the
client's stop protocol makes the answer the same on every rank at the same step. On yes it sets
``control.should_training_stop`` (the Trainer leaves its loop after this step on every rank) and clears
``control.should_save`` (no checkpoint of the diverged weights), and ``callback.stop_step`` says where.

Imports ``transformers`` only (never Lightning).
"""

from __future__ import annotations

from typing import Any, Iterable

from trainhealth.trainer.client import Telemetry
from trainhealth.trainer.outbox import LimitedLog
from transformers import TrainerCallback

from ._common import Reporter, Reporting, combine_losses, first_lr, guarded, numbers, optimizer_name

__all__ = ["TrainHealthCallback"]

_LOGGED = ("loss", "learning_rate", "grad_norm")


class TrainHealthCallback(Reporting, TrainerCallback):
    """Reports the Trainer's run to the trainhealth sidecar and stops it on an alert in ``stop_on``.

    ``telemetry``: a ``Telemetry`` you made yourself (it keeps its own ``stop_on``); otherwise one is made
    at ``on_train_begin`` with the rank and world size the Trainer knows, ``stop_on`` (alert names; empty:
    never stop) and ``telemetry_options`` (``url``, ``run``, ``token``, ``on_alert``, ...).
    ``reference_lr`` / ``reference_batch_size``: the LR and total batch your config was tuned for (the
    ``lr_scaling`` detector's reference); ``warmup_steps``, ``config``: override or add to what the
    callback reads from ``TrainingArguments``."""

    def __init__(self, telemetry: Telemetry | None = None, *, stop_on: Iterable[str] | None = None,
                 reference_lr: float | None = None, reference_batch_size: int | None = None,
                 warmup_steps: int | None = None, config: dict[str, Any] | None = None,
                 **telemetry_options: Any) -> None:
        self.reporter = Reporter(telemetry, stop_on,
                                 {"reference_lr": reference_lr, "reference_batch_size": reference_batch_size,
                                  "warmup_steps": warmup_steps, "config": config}, telemetry_options)
        self._warn = LimitedLog()  # a hook's failure: logged the first time, then at most once a minute
        self._losses: list[Any] = []  # this optimizer step's micro-batch losses, from the forward hook
        self._hooked_loss = False  # the model's output carries a loss (then the logged one is not used)
        self._hook: Any = None
        self._per_token = False  # the Trainer passes num_items_in_batch: losses are token sums / group tokens
        self._average_tokens = False
        self._world_size = 1
        self._lr: float | None = None
        self._scaler: Any = None
        self._pending: tuple[int, dict[str, Any]] | None = None  # a logging step's sample, until on_log

    # -- training begins ------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # not guarded: a bad setting (URL, run name, stop_on) is the user's to fix, said at once
        self.reporter.bind(int(args.process_index), int(args.world_size), _broadcast)
        self._begin(args, state, kwargs.get("model"), kwargs.get("optimizer"))

    @guarded
    def _begin(self, args: Any, state: Any, model: Any, optimizer: Any) -> None:
        self._losses, self._pending, self._lr = [], None, None
        self._hooked_loss = False
        self._remove_hook()
        if model is not None and hasattr(model, "register_forward_hook"):
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self.reporter.time_steps(model)
        self._per_token = False
        self._average_tokens = bool(getattr(args, "average_tokens_across_devices", False))
        self._world_size = int(args.world_size)
        per_device = int(state.train_batch_size or args.per_device_train_batch_size)
        accumulation = int(args.gradient_accumulation_steps)
        warmup = args.get_warmup_steps(state.max_steps) if hasattr(args, "get_warmup_steps") else None
        self.reporter.start(
            world_size=int(args.world_size), batch_size=per_device * accumulation, lr=float(args.learning_rate),
            warmup_steps=warmup, optimizer=optimizer_name(optimizer),
            config={"framework": "transformers", "per_device_train_batch_size": per_device,
                    "gradient_accumulation_steps": accumulation, "max_steps": int(state.max_steps),
                    "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                    "max_grad_norm": args.max_grad_norm})

    def _on_forward(self, module: Any, inputs: Any, kwargs: dict[str, Any], output: Any) -> None:
        """The model's forward (a hook: it must never raise): keep a training forward's loss tensor, and
        whether the Trainer had the model normalise it by the accumulation group's token count."""
        try:
            if not module.training:
                return  # evaluation
            loss = getattr(output, "loss", None)
            if loss is None and isinstance(output, dict):
                loss = output.get("loss")
            if loss is not None and hasattr(loss, "detach") and loss.numel() == 1:
                self._losses.append(loss.detach())
                self._per_token = kwargs.get("num_items_in_batch") is not None
                self._hooked_loss = True
        except Exception:  # pragma: no cover - an odd output type: no loss from the hook
            return

    def _step_loss(self) -> Any:
        """This rank's loss for the optimizer step, on the Trainer's own scale (what it adds to the loss it
        logs, before averaging over ranks and steps). A model given ``num_items_in_batch`` returns its
        token-loss sum over the tokens of the whole accumulation group (of every rank, with
        ``average_tokens_across_devices``, for which the Trainer then multiplies by the number of
        processes): the step's loss is the sum over its micro-batches. Otherwise each micro-batch loss is a
        mean, and so is the step's."""
        if not self._per_token:
            return combine_losses(self._losses, "mean")
        total = combine_losses(self._losses, "sum")
        if total is not None and self._average_tokens and self._world_size > 1:
            total = total * self._world_size
        return total

    # -- every optimizer step -------------------------------------------------------------------------
    @guarded
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._send_pending()  # a logging step whose log never came
        self.reporter.compute_begins()

    @guarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.reporter.compute_ends()  # backward and DDP's all-reduce are done (and clipping)

    @guarded
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        self._lr = first_lr(optimizer)  # after optimizer.step(), before the scheduler's: the LR just used
        self._scaler = getattr(optimizer, "scaler", None)  # accelerate's GradScaler under fp16

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        self._sample(step, bool(control.should_log))
        if self._should_stop(step):
            control.should_training_stop = True  # the Trainer leaves its loop after this step
            control.should_save = False  # and does not checkpoint the diverged weights

    @guarded
    def _sample(self, step: int, log_follows: bool) -> None:
        sample = {"loss": self._step_loss(), "lr": self._lr}
        if self._scaler is not None:
            sample["grad_scale"] = self._scaler
        self._losses = []
        if log_follows:  # the Trainer logs this step right after: send the sample with its log
            self._pending = (step, sample)
        else:
            self.reporter.step(step, **sample)

    @guarded
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        if not any(name in logs for name in _LOGGED):
            return  # an evaluation's or the end-of-training summary's log
        step = int(state.global_step)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] != step:
            self.reporter.step(pending[0], **pending[1])
            pending = None
        sample = pending[1] if pending is not None else {}
        if not self._hooked_loss:
            sample["loss"] = logs.get("loss")  # no loss in the model's output: the Trainer's logged one
        if logs.get("learning_rate") is not None:
            sample["lr"] = logs["learning_rate"]
        sample["grad_norm"] = logs.get("grad_norm")
        sample.update(numbers(logs, _LOGGED))  # epoch and the like: into metrics
        self.reporter.step(step, **sample)

    # -- training ends --------------------------------------------------------------------------------
    @guarded
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._send_pending()
        self._remove_hook()
        self.reporter.end(int(state.global_step))

    def _send_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self.reporter.step(pending[0], **pending[1])

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank, over the process group the Trainer (accelerate) set up."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
