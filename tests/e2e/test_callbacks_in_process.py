"""Both callbacks in one process, with the real frameworks on the CPU and the client writing its records to a
file (its offline mode): the stop plumbing through each framework, hooks that fail, and that importing one
integration never imports the other framework.

The stop here comes from a client that says "stop from step 3" (``StopAt``: ``Telemetry`` with its
``should_stop`` answering from a fixed step): what is tested is how each callback honours the answer
through its framework; the sidecar's stop protocol itself is tested end to end in test_hf_callback.py and
test_lightning_callback.py.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from trainhealth.trainer.client import Telemetry

from tests.e2e.framework_runs import need_module

pytestmark = [pytest.mark.e2e,
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

ROOT = Path(__file__).resolve().parents[2]
INTEGRATIONS = ROOT / "trainer" / "integrations"


class StopAt(Telemetry):
    """A client whose stop step is fixed (the sidecar's part is left out); records go to a file."""

    def __init__(self, path: Path, stop_at: int | None, fail: bool = False) -> None:
        super().__init__(run="inproc", rank=0, world_size=1, offline_path=str(path), flush_seconds=0.05)
        self.stop_at, self.fail, self.asked = stop_at, fail, []

    def should_stop(self, step: int) -> bool:
        self.asked.append(step)
        if self.fail:
            raise RuntimeError("the stop check broke")
        return self.stop_at is not None and step >= self.stop_at

    @property
    def stop_reason(self):
        return {"alert": "nan_divergence", "step": self.stop_at, "summary": "loss became nan"}


def records(tm: Telemetry, path: Path) -> list[dict]:
    tm.close()
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- Hugging Face -------------------------------------------------------------------------------------------
def hf_trainer(tmp_path: Path, callback, steps: int = 8, save_steps: int | None = None):
    torch = need_module("torch")
    transformers = need_module("transformers")

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 256

        def __getitem__(self, i: int):
            gen = torch.Generator().manual_seed(i)
            return {"inputs_embeds": torch.randn(8, 16, generator=gen),
                    "labels": torch.randint(0, 32, (8,), generator=gen)}

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=8, bos_token_id=0, eos_token_id=0))
    save = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {"save_strategy": "no"}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), use_cpu=True, report_to=[], disable_tqdm=True, max_steps=steps,
        per_device_train_batch_size=2, logging_steps=1, learning_rate=1e-3, seed=0, **save)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])


def test_hf_stop_answer_ends_training_after_that_step_without_a_checkpoint_of_it(tmp_path):
    from trainhealth.integrations.hf import TrainHealthCallback

    tm = StopAt(tmp_path / "r.jsonl", stop_at=3)
    callback = TrainHealthCallback(tm)
    trainer = hf_trainer(tmp_path, callback, steps=8, save_steps=1)
    trainer.train()
    assert (trainer.state.global_step, callback.stop_step, tm.asked) == (3, 3, [1, 2, 3])
    # checkpoints of steps 1 and 2 (good), none of step 3: the step the alert stopped
    assert sorted(p.name for p in (tmp_path / "hf").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    recs = records(tm, tmp_path / "r.jsonl")
    assert [r["step"] for r in recs if r["type"] == "sample"] == [1, 2, 3]
    assert recs[-1]["type"] == "end" and recs[-1]["step"] == 3


def test_hf_a_failing_hook_is_logged_and_training_goes_on(tmp_path, caplog):
    from trainhealth.integrations.hf import TrainHealthCallback

    tm = StopAt(tmp_path / "r.jsonl", stop_at=None, fail=True)
    trainer = hf_trainer(tmp_path, TrainHealthCallback(tm), steps=4)
    trainer.train()
    assert trainer.state.global_step == 4 and tm.asked == [1, 2, 3, 4]
    assert "_should_stop failed and was skipped: RuntimeError('the stop check broke')" in caplog.text
    recs = records(tm, tmp_path / "r.jsonl")
    assert [r["step"] for r in recs if r["type"] == "sample"] == [1, 2, 3, 4]


def test_hf_without_a_stop_runs_to_the_end_and_sends_each_step_once(tmp_path):
    from trainhealth.integrations.hf import TrainHealthCallback

    tm = StopAt(tmp_path / "r.jsonl", stop_at=None)
    trainer = hf_trainer(tmp_path, TrainHealthCallback(tm), steps=5)
    trainer.train()
    trainer.evaluate(trainer.train_dataset)  # an evaluation's log is not a training step's
    recs = records(tm, tmp_path / "r.jsonl")
    steps = [r for r in recs if r["type"] == "sample"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all("grad_norm" in r and "loss" in r and "lr" in r for r in steps)
    # each step split into compute (forward, backward) and waiting after it (no collective here: ~0)
    assert all(0 < r["compute_seconds"] < r["step_time_seconds"] for r in steps[1:])
    assert all(r["comm_wait_seconds"] >= 0 for r in steps)
    assert recs[0]["type"] == "start" and recs[0]["optimizer"] == "adamw" and recs[0]["batch_size"] == 2
    assert recs[-1]["type"] == "end"


# -- Lightning ----------------------------------------------------------------------------------------------
def lightning_fit(callback, steps: int, accumulation: int = 1):
    torch = need_module("torch")
    pl = need_module("lightning.pytorch")

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulation,
                         callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MLP(), loader)
    return trainer


def test_lightning_stop_answer_sets_should_stop_after_that_step(tmp_path):
    from trainhealth.integrations.lightning import TrainHealthCallback

    tm = StopAt(tmp_path / "r.jsonl", stop_at=3)
    callback = TrainHealthCallback(tm)
    trainer = lightning_fit(callback, steps=10, accumulation=2)
    assert (trainer.global_step, callback.stop_step, tm.asked) == (3, 3, [1, 2, 3])  # once per optimizer step
    recs = records(tm, tmp_path / "r.jsonl")
    steps = [r for r in recs if r["type"] == "sample"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and r["lr"] == 0.01 for r in steps)
    assert all(r["compute_seconds"] > 0 and r["comm_wait_seconds"] >= 0 for r in steps)  # both micro-batches
    assert recs[0]["batch_size"] == 16 and recs[0]["optimizer"] == "adam" and recs[-1]["type"] == "end"


def test_lightning_a_failing_hook_is_logged_and_training_goes_on(tmp_path, caplog):
    from trainhealth.integrations.lightning import TrainHealthCallback

    tm = StopAt(tmp_path / "r.jsonl", stop_at=None, fail=True)
    trainer = lightning_fit(TrainHealthCallback(tm), steps=4)
    assert trainer.global_step == 4 and tm.asked == [1, 2, 3, 4]
    assert "_should_stop failed and was skipped: RuntimeError('the stop check broke')" in caplog.text


# -- packaging ----------------------------------------------------------------------------------------------
def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name.split(".")[0] for name in names}


def test_each_integration_imports_only_its_own_framework():
    assert imported_modules(INTEGRATIONS / "hf.py") - {"__future__", "typing", "torch", "trainhealth"} == {
        "transformers"}
    assert imported_modules(INTEGRATIONS / "lightning.py") - {"__future__", "typing", "torch", "trainhealth"} == {
        "lightning"}
    assert imported_modules(INTEGRATIONS / "_common.py") & {"transformers", "lightning", "pytorch_lightning"} == set()
    code = ("import sys, trainhealth.integrations, trainhealth.integrations._common; "
            "assert not {'transformers', 'lightning', 'torch'} & set(sys.modules), sorted(sys.modules); "
            "import trainhealth.integrations.hf; "
            "assert not {'lightning', 'pytorch_lightning'} & set(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_lightning_callback_pickles_without_its_client_for_ddp_spawn(tmp_path):
    import pickle

    need_module("lightning.pytorch")
    from trainhealth.integrations.lightning import TrainHealthCallback

    callback = TrainHealthCallback(offline_path=str(tmp_path / "r.jsonl"), run="spawned", start_threads=False)
    callback.reporter.bind(0, 1, None)
    assert callback.telemetry is not None
    copy = pickle.loads(pickle.dumps(callback))  # what ddp_spawn sends to each process
    assert copy.telemetry is None and copy.reporter.telemetry_options["run"] == "spawned"
    assert copy.reporter.bind(1, 2, None).rank == 1  # each spawned process makes its own at setup
    assert callback.telemetry.rank == 0  # the original keeps its own
