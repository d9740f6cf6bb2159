"""A Lightning fit with trainhealth's callback, for tests/e2e/test_lightning_callback.py.

``python lightning_worker.py SPEC_JSON``: ``Trainer(accelerator="cpu", devices=2, strategy="ddp")`` starts
the second process itself (it runs this script again), as a user's script does, so there is no torchrun
and no ``TORCHELASTIC_RUN_ID``. A small MLP regression on random data; ``nan_step``/``nan_rank`` put NaN
into that rank's batch of that optimizer step (through the collate function, which sees the batches in
the order the loop consumes them). Each rank writes what it saw to ``OUT/rank{R}.json``, then the script
ends as docs/lightning.md says to: exit 3 when trainhealth stopped the run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from trainhealth.integrations.lightning import TrainHealthCallback


class MLP(pl.LightningModule):
    def __init__(self, lr: float, warmup: int, step_sleep: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        self.lr, self.warmup, self.step_sleep = lr, warmup, step_sleep

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.step_sleep:
            time.sleep(self.step_sleep)
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        warmup = max(1, self.warmup)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class NaNCollate:
    """Stacks the batch; on ``rank`` the micro-batches of optimizer step ``step`` become NaN."""

    def __init__(self, rank: int | None, step: int | None, accumulation: int) -> None:
        self.batches = 0
        self.first, self.last = ((step - 1) * accumulation + 1, step * accumulation) if step else (0, -1)
        self.here = rank == int(os.environ.get("LOCAL_RANK", "0"))  # one node: the global rank

    def __call__(self, items):
        self.batches += 1
        x = torch.stack([item[0] for item in items])
        y = torch.stack([item[1] for item in items])
        if self.here and self.first <= self.batches <= self.last:
            x = torch.full_like(x, float("nan"))
        return x, y


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = Path(spec["out"])
    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen)
    accumulation = spec.get("accumulation", 1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=spec.get("batch", 4),
        collate_fn=NaNCollate(spec.get("nan_rank"), spec.get("nan_step"), accumulation))
    options = {"stop_on": set(spec["stop_on"])} if spec.get("stop_on") else {}
    callback = TrainHealthCallback(warmup_steps=spec.get("warmup"), reference_lr=spec.get("reference_lr"),
                                   reference_batch_size=spec.get("reference_batch_size"), **options)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=spec["steps"],
                         accumulate_grad_batches=accumulation, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MLP(spec.get("lr", 0.01), spec.get("warmup") or 0, spec.get("step_sleep", 0.0)), loader)
    tm = callback.telemetry
    result = {"rank": trainer.global_rank, "run": tm.run, "client_rank": tm.rank,
              "global_step": trainer.global_step, "stop_step": callback.stop_step,
              "stop_reason": getattr(tm, "stop_reason", None)}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if callback.stop_step is not None:  # docs/lightning.md's ending: every rank, after the others
        trainer.strategy.barrier()
        sys.exit(3)


if __name__ == "__main__":
    main()
