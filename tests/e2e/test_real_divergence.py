"""A real divergence: a torch CPU training loop whose LR is 8x the linear-scaling value.

The seed's failure in miniature: the LR was tuned (0.02) for a total batch of 16, the job runs
with a total batch of 2 and keeps it. Linear regression on synthetic data with SGD, batch 2, a
200-step linear warmup: stable at the scaled LR (0.0025), at 0.02 the loss starts climbing once
the warmup passes the stability limit and overflows float32 to inf, then NaN. The records the loop
writes (a .jsonl file, as the flight recorder would keep it) are read and replayed exactly as
``trainhealth replay`` does (replay.read_files, pipeline.replay). Nothing is mocked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from trainhealth.config import default_detector_settings
from trainhealth.pipeline import Pipeline, replay
from trainhealth.replay import ReadStats, read_files

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.e2e

REFERENCE = {"reference_lr": 0.02, "reference_batch_size": 16}  # 8 GPUs x 2, the config's origin
BATCH, WORLD, WARMUP = 2, 1, 200


def train(lr_peak: float, path: Path, steps: int = 600) -> int:
    """Train, writing a start and one sample per step to ``path``; returns the last step."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 32) * 3.0
    y = x @ torch.randn(32, 1) + 0.1 * torch.randn(4096, 1)
    model = torch.nn.Linear(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    lines = [{"type": "start", "run": "real", "rank": 0, "time": 1000.0, "world_size": WORLD,
              "batch_size": BATCH, "lr": lr_peak, "warmup_steps": WARMUP, "optimizer": "SGD",
              **REFERENCE}]
    step = 0
    for step in range(1, steps + 1):
        lr = lr_peak * min(1.0, step / WARMUP)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, x.shape[0], (BATCH,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)  # total norm only
        opt.step()
        lines.append({"run": "real", "rank": 0, "step": step, "time": 1000.0 + 0.05 * step,
                      "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
                      "batch_size": BATCH, "world_size": WORLD})
        if math.isnan(lines[-1]["loss"]):
            break
    # json writes NaN/Infinity tokens, as the client does; the replay reader reads them back as floats
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    return step


def replay_file(path: Path, pipeline: Pipeline | None = None) -> list[dict]:
    stats = ReadStats()
    alerts = list(replay(read_files([str(path)], stats), pipeline or Pipeline(default_detector_settings())))
    assert stats.skipped == 0  # json writes NaN/Infinity tokens, as the client does; every line is read
    return alerts


def test_lr_eight_times_the_scaled_value_diverges_and_alerts_fire_in_order(tmp_path):
    path = tmp_path / "real.jsonl"
    last = train(0.02, path)
    pipeline = Pipeline(default_detector_settings())
    alerts = replay_file(path, pipeline)
    firing = [a for a in alerts if a["state"] == "firing"]
    # two pages: the LR (critical from the start) and the NaN; the rise in between joins the LR's alert
    assert [a["alert"] for a in firing] == ["lr_scaling", "nan_divergence"]
    lr_alert, nan_alert = firing
    assert (lr_alert["severity"], lr_alert["rank"], lr_alert["step"]) == ("critical", None, 0)
    assert lr_alert["summary"].startswith("LR 0.02 is 8.0x the linear-scaling value 0.0025 for total "
                                          "batch 2 (reference LR 0.02 for batch 16)")
    # the early warning (the rise, told inside the LR's alert) comes well before the NaN, which is the real
    # one, at its exact step; its timeline holds the rise
    # a transition once yielded never changes (the book owns the alert); the book's own, refreshed since, says it
    [told] = [a for a in pipeline.book.query(alert="lr_scaling") if a["state"] == "firing"]
    assert (told["fingerprint"], told["started_at"]) == (lr_alert["fingerprint"], lr_alert["started_at"])
    assert "; since then loss jumped to " in told["summary"] or "; since then grad norm jumped to " in \
        told["summary"]
    assert "since then" not in lr_alert["summary"]
    assert told["onset_step"] + 20 < nan_alert["step"]
    assert nan_alert["severity"] == "critical" and (nan_alert["rank"], nan_alert["first_rank"]) == (None, 0)
    (rise,) = nan_alert["timeline"]  # the warmup's gradual LR is no change worth naming; the rise is
    assert rise.endswith(f" rose from step {told['onset_step']} (rank 0)")
    assert "(see lr_scaling)" in nan_alert["summary"]  # it exists here
    lines = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    first_bad = next(o["step"] for o in lines
                     if not (math.isfinite(o["loss"]) and math.isfinite(o["grad_norm"])))
    assert nan_alert["step"] == first_bad <= last


def adamw(lr: float, path: Path, steps: int = 40) -> list[dict]:
    """A small MLP regression with AdamW (as the HF Trainer's default optimizer); records to ``path``."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 32)
    y = x @ torch.randn(32, 1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    lines = [{"type": "start", "run": "adamw", "rank": 0, "time": 1000.0, "world_size": 1, "optimizer": "AdamW"}]
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (8,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        opt.step()
        lines.append({"run": "adamw", "rank": 0, "step": step, "time": 1000.0 + 0.05 * step, "loss": loss.item(),
                      "grad_norm": grad_norm.item(), "lr": lr})
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    return lines[1:]


def test_adamw_exploding_from_step_1_is_told_before_step_20_long_before_any_nan(tmp_path):
    # AdamW at a huge LR moves every weight by ~lr per step: the loss multiplies from the first steps, and
    # the spike detectors have no history yet (20 samples): its absolute growth tells it
    lines = adamw(1.0, tmp_path / "adamw.jsonl")
    assert all(math.isfinite(o["loss"]) for o in lines)  # no NaN ever: only the growth says it
    assert min(o["loss"] for o in lines[1:]) > 10 * lines[0]["loss"]
    alerts = replay_file(tmp_path / "adamw.jsonl")
    first = alerts[0]
    assert (first["alert"], first["state"], first["rank"], first["judged"]) == ("loss_spike", "firing", None, "early")
    assert first["step"] < 20
    assert first["summary"].startswith("loss grew ") and "judged by absolute growth" in first["summary"]
    assert [a["alert"] for a in alerts if a["state"] == "firing"] == ["loss_spike"]  # one incident


def test_the_same_adamw_at_a_sane_lr_stays_quiet(tmp_path):
    lines = adamw(1e-3, tmp_path / "sane.jsonl", steps=200)
    assert lines[-1]["loss"] < lines[0]["loss"]  # it trains
    assert replay_file(tmp_path / "sane.jsonl") == []


def test_the_same_loop_at_the_scaled_lr_trains_and_stays_quiet(tmp_path):
    path = tmp_path / "scaled.jsonl"
    assert train(0.0025, path) == 600
    lines = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    assert lines[-1]["loss"] < 0.1 < lines[0]["loss"]  # it really trained
    assert replay_file(path) == []
