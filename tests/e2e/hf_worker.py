"""One rank of a Hugging Face Trainer run with trainhealth's callback, for tests/e2e/test_hf_callback.py.

Run under torchrun (2 CPU processes, gloo): ``torchrun --nproc_per_node 2 hf_worker.py SPEC_JSON``. The
model is a 1-layer GPT-2 built from a config (no download); the data are random input embeddings and
labels, and ``nan_step``/``nan_rank`` put NaN into that rank's batch of that optimizer step (through the
collator, which sees the batches in the order the Trainer consumes them). Each rank writes what it saw
to ``OUT/rank{R}.json``, then the script ends as docs/huggingface.md says to: exit 3 when trainhealth
stopped the run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from trainhealth.integrations.hf import TrainHealthCallback
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

SEQ, EMBED, VOCAB = 8, 32, 64


class RandomTokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4096

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(i)
        return {"inputs_embeds": torch.randn(SEQ, EMBED, generator=gen),
                "labels": torch.randint(0, VOCAB, (SEQ,), generator=gen)}


class NaNCollator:
    """Stacks the batch; on ``rank`` the micro-batches of optimizer step ``step`` become NaN."""

    def __init__(self, rank: int | None, step: int | None, accumulation: int) -> None:
        self.batches = 0
        self.first, self.last = ((step - 1) * accumulation + 1, step * accumulation) if step else (0, -1)
        self.here = rank == int(os.environ.get("RANK", "0"))

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        self.batches += 1
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        if self.here and self.first <= self.batches <= self.last:
            batch["inputs_embeds"] = torch.full_like(batch["inputs_embeds"], float("nan"))
        return batch


class StepTime(TrainerCallback):
    """Makes each optimizer step take at least ``seconds`` (a real model's step, for the stop's timing)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = Path(spec["out"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=EMBED, vocab_size=VOCAB, n_positions=SEQ,
                                       bos_token_id=0, eos_token_id=0))
    accumulation = spec.get("accumulation", 1)
    args = TrainingArguments(
        output_dir=str(out / "hf"), use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True,
        per_device_train_batch_size=spec.get("batch", 4), gradient_accumulation_steps=accumulation,
        max_steps=spec["steps"], logging_steps=spec.get("logging_steps", 1), learning_rate=spec.get("lr", 1e-3),
        warmup_steps=spec.get("warmup", 0), save_strategy="no", seed=0, dataloader_num_workers=0)
    options = {"stop_on": set(spec["stop_on"])} if spec.get("stop_on") else {}
    callback = TrainHealthCallback(reference_lr=spec.get("reference_lr"),
                                   reference_batch_size=spec.get("reference_batch_size"), **options)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(),
                      data_collator=NaNCollator(spec.get("nan_rank"), spec.get("nan_step"), accumulation),
                      callbacks=[callback, StepTime(spec.get("step_sleep", 0.0))])
    trainer.train()
    tm = callback.telemetry
    result = {"rank": tm.rank, "run": tm.run, "global_step": trainer.state.global_step,
              "stop_step": callback.stop_step, "stop_reason": getattr(tm, "stop_reason", None),
              "log_history": trainer.state.log_history}
    (out / f"rank{tm.rank}.json").write_text(json.dumps(result))
    if callback.stop_step is not None:  # docs/huggingface.md's ending: every rank, after the others
        trainer.accelerator.wait_for_everyone()
        sys.exit(3)


if __name__ == "__main__":
    main()
