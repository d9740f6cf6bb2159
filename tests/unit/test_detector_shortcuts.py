"""The run-health detectors' shortcuts (issue 26) give the alert stream of judging everything, every time.

Each detector skips work that cannot change a verdict: straggler skips ticks while bounds on the ranks'
medians show that no rank can be slow for the next samples, rank_stalled skips ticks before the earliest
moment a rank can cross a limit (with an incident open: another rank than those stalled, no record since),
loss_spike/grad_explosion take a written-out way for a value that is not even soft_ratio above a rank's
level. Here each runs against a subclass with the shortcut turned off, on generated jobs that exercise what
the shortcuts must notice: stragglers that come and go (data time, compute while the peers wait, step
intervals), ranks that stop, go silent, end, restart or come back, records out of time order, spikes and
NaN, a config reload that resizes the windows mid-run, batches of 1, 7 and 256, and 400 s after the last
record. Every transition and refresh line must be identical, field for field.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import pytest
from trainhealth.config import default_detector_settings
from trainhealth.detectors.liveness import RankStalled
from trainhealth.detectors.lr_scaling import LrScaling
from trainhealth.detectors.spikes import GradExplosion, LossSpike
from trainhealth.detectors.straggler import Straggler
from trainhealth.pipeline import Pipeline, replay
from trainhealth.record import Record, from_obj

T0 = 1_700_000_000.0


class StragglerEveryTick(Straggler):
    """Judges every tick exactly (no skipped tick, no bounds)."""

    def tick(self, now: float) -> list[Any]:
        self.changed, self.judged = True, None
        return super().tick(now)

    def _quiet(self, *args: Any, **kw: Any) -> bool:
        return False


class RankStalledEveryTick(RankStalled):
    def tick(self, now: float) -> list[Any]:
        self.deadline = -math.inf
        return super().tick(now)


class LossSpikeNoShortcut(LossSpike):
    def update(self, record: Record) -> list[Any]:
        for st in self.ranks.values():
            st.steady = None
        return super().update(record)


class GradExplosionNoShortcut(GradExplosion):
    def update(self, record: Record) -> list[Any]:
        for st in self.ranks.values():
            st.steady = None
        return super().update(record)


class LrScalingNoShortcut(LrScaling):
    """Judges every sampled LR the whole way (no quiet LR)."""

    def _note_quiet(self) -> None:
        self.quiet = -math.inf


def lr_job(seed: int) -> list[Record]:
    """Starts and restarts (batch grown or shrunk, the LR scaled or not, warmups declared or not) and the LR each
    rank samples: warmups applied as declared, not at all, 20x slower, or never stepped; an LR above the
    schedule now and then; no LR, a zero or a NaN LR at times."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    t, step = T0, 0
    for _ in range(rng.randint(1, 4)):
        world = rng.choice([1, 2, 4])
        lr = rng.choice([0.05, 0.1, 0.4, 1.6])
        warm = rng.choice([0, 0, 8, 40])
        start: dict[str, Any] = {"type": "start", "run": "lr", "time": t, "world_size": world, "step": step,
                                 "batch_size": rng.choice([16, 32, 256, 1024]), "lr": lr}
        if warm:
            start["warmup_steps"] = warm
        if rng.random() < 0.3:
            start.update(reference_lr=0.1, reference_batch_size=64)
        if rng.random() < 0.3:
            start["optimizer"] = rng.choice(["AdamW", "SGD", "LAMB"])
        out += [{**start, "rank": r, "time": t + 0.01 * r} for r in range(world)]
        pace = rng.choice([1.0, 0.0, 20.0, None])  # warmup length against the declared one; None: never stepped
        first = step
        if rng.random() < 0.3:
            step += 3 * warm  # resumed past the warmup: its first sample comes late
        for _ in range(rng.randint(20, 160)):
            step += 1
            t += 1.0
            if pace is None:
                now = lr / 3
            elif not warm or not pace:
                now = lr
            else:
                now = lr * min(1.0, (step - first) / (pace * warm) + 1 / 3)
            if rng.random() < 0.03:
                now *= rng.choice([2.0, 5.0, 0.5])
            for r in range(world):
                rec: dict[str, Any] = {"run": "lr", "rank": r, "time": t + 0.01 * r, "step": step}
                roll = rng.random()
                if roll < 0.9:
                    rec["lr"] = now
                elif roll < 0.95:
                    rec["lr"] = rng.choice([0.0, math.nan])
                out.append(rec)
        t += 5.0
    return [from_obj(o) for o in out]


def test_lr_scaling_quiet_samples_give_the_alerts_of_judging_every_lr() -> None:
    fired = 0
    for seed in range(40):
        records = lr_job(seed)
        streams = []
        for det in (LrScaling, LrScalingNoShortcut):
            p = Pipeline(default_detector_settings(), detectors=[det])
            streams.append(repr([dict(a) for a in replay(records, p, max_batch=rng_batch(seed))]))
        assert streams[0] == streams[1], seed
        fired += "'firing'" in streams[1]
    assert fired >= 15  # the jobs do exercise the alert (warmups, samples above the rule), not only quiet runs


def rng_batch(seed: int) -> int:
    return random.Random(seed).choice([1, 7, 256])


def job(seed: int) -> list[Record]:
    rng = random.Random(seed)
    ranks, steps = rng.randint(2, 8), rng.randint(150, 400)
    slow = {r: (rng.randint(0, steps), rng.randint(0, steps), rng.choice([0.1, 0.6, 2.0]),
                rng.choice(["data", "compute", "interval"]))
            for r in rng.sample(range(ranks), rng.choice([0, 1, 1, 2]))}
    spikes: dict[int, float] = {}
    for _ in range(rng.randint(0, 3)):
        k = rng.randint(0, steps)
        v = rng.choice([3.0, 20.0, 1.6, 1e4, math.nan])
        for j in range(k, k + rng.choice([1, 3, 40, 150])):
            spikes[j] = v
    stop = {r: rng.randint(0, steps) for r in rng.sample(range(ranks), rng.randint(0, 1))}
    compute = rng.random() < 0.5
    out: list[dict[str, Any]] = [{"type": "start", "run": "j", "rank": r, "time": T0 + 0.01 * r, "world_size": ranks,
                                  "batch_size": 32, "lr": 0.1} for r in range(ranks)]
    t = T0 + 5.0
    lag: dict[int, float] = {}
    for k in range(1, steps + 1):
        step_time = 0.5 + rng.random() * 0.05 + (rng.choice([40.0, 300.0]) if rng.random() < 0.01 else 0.0)
        t += step_time
        for r in range(ranks):
            if r in stop and k > stop[r]:
                continue
            a, b, extra, kind = slow.get(r, (0, -1, 0.0, ""))
            extra = extra if min(a, b) <= k <= max(a, b) else 0.0
            loss, grad = 2.0 + rng.random() * 0.1, 1.0 + rng.random() * 0.3
            if k in spikes:
                loss, grad = loss * spikes[k], grad * spikes[k]
            if kind == "interval":
                lag[r] = lag.get(r, 0.0) + extra  # it falls behind by that much each step
            late = lag.get(r, 0.0)
            waits = extra if kind == "data" else 0.0
            rec: dict[str, Any] = {"run": "j", "rank": r, "time": t + 0.001 * r + late, "step": k, "loss": loss,
                                   "grad_norm": grad, "step_time_seconds": step_time,
                                   "data_time_seconds": 0.01 + rng.random() * 0.005 + waits}
            if compute:
                rec["compute_seconds"] = 0.3 + rng.random() * 0.02 + (extra if kind == "compute" else 0.0)
                rec["comm_wait_seconds"] = 0.05 + (0.5 if kind != "compute" and any(
                    s[3] == "compute" and min(s[0], s[1]) <= k <= max(s[0], s[1]) for s in slow.values()) else 0.0)
            out.append(rec)
        if rng.random() < 0.004:  # one rank restarts, or ends and trains on
            q = rng.randrange(ranks)
            out.append({"type": rng.choice(["start", "end"]), "run": "j", "rank": q, "time": t + 0.2, "step": k,
                        "world_size": ranks, "batch_size": 32, "lr": 0.1})
    for r in range(ranks):
        beat = T0 + 2.5 + 0.3 * r
        while beat < t + rng.choice([0.0, 200.0]):
            if not (r in stop and beat > T0 + 5.0 + 0.55 * stop[r] and rng.random() < 0.7):
                out.append({"type": "heartbeat", "run": "j", "rank": r, "time": beat, "step": int((beat - T0) / 0.56)})
            beat += 5.0
    out.sort(key=lambda o: o["time"])
    for i in range(0, len(out) - 2, 37):  # a few records arrive late
        out[i], out[i + 2] = out[i + 2], out[i]
    return [from_obj(o) for o in out]


def stream(detectors: list[type], records: list[Record], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    settings = default_detector_settings()
    settings["straggler"] = dataclasses.replace(settings["straggler"], window=rng.choice([5, 8, 20]),
                                                sustain_samples=rng.choice([0, 3, 10]))
    settings["rank_stalled"] = dataclasses.replace(settings["rank_stalled"], floor_seconds=20.0,
                                                   silence_floor_seconds=10.0, startup_seconds=30.0)
    for name in ("loss_spike", "grad_explosion"):
        settings[name] = dataclasses.replace(settings[name], window=30, min_history=8)
    batch, half = rng.choice([1, 7, 256]), len(records) // 2
    p = Pipeline(dict(settings), detectors=detectors)
    out = [dict(a) for a in replay(records[:half], p, max_batch=batch, refreshes=True)]
    resized = dict(settings)
    window = settings["straggler"].window + rng.choice([-2, 3])
    resized["straggler"] = dataclasses.replace(settings["straggler"], window=window)
    resized["loss_spike"] = dataclasses.replace(settings["loss_spike"], window=rng.choice([10, 40]))
    out += [dict(a) for a in p.reconfigure(resized)]
    out += [dict(a) for a in replay(records[half:], p, max_batch=batch, until=400.0, refreshes=True)]
    return out


@pytest.mark.parametrize("fast, slow", [
    ([Straggler], [StragglerEveryTick]),
    ([RankStalled], [RankStalledEveryTick]),
    ([LossSpike, GradExplosion], [LossSpikeNoShortcut, GradExplosionNoShortcut]),
], ids=["straggler", "rank_stalled", "spikes"])
def test_shortcuts_give_the_alerts_of_judging_everything(fast: list[type], slow: list[type]) -> None:
    fired = 0
    for seed in range(16):
        records = job(seed)
        expected = stream(slow, records, seed)
        assert repr(stream(fast, records, seed)) == repr(expected), seed  # repr: a NaN field equals itself
        fired += any(a["state"] == "firing" for a in expected)
    assert fired >= 6  # the jobs do exercise the alerts, not only quiet runs


def test_rank_stalled_open_incident_ticks_judge_again_after_any_record() -> None:
    """Every rank stands at step 10 from 10 s, heartbeating. Rank 3's records stop then (the incident: rank 3
    silent, at 70 s); rank 1's stop from 150 s to 215 s: at 192.5 s every rank is stalled (no limit left to
    cross: the ticks skip), and rank 1 speaks again: silent no more, stuck, the next tick re-pictures it (root
    rank 3 alone), as judging every tick does. (A waiting rank's record only moves its own limit later; a
    stalled rank's may change why it is stalled: the open incident's skipped ticks end at any record.)"""
    from tests import live_traces as lt

    job = lt.ddp_job(4, 10, heartbeat=5.0, until=lt.T0 + 400)
    records = [r for r in job.records if not (r.rank == 3 and r.time >= lt.T0 + 10.2)
               and not (r.rank == 1 and lt.T0 + 150 <= r.time < lt.T0 + 215)]

    def lines(det: type) -> list[dict[str, Any]]:
        detectors = [d for d in Pipeline(default_detector_settings()).detector_classes if d is not RankStalled]
        p = Pipeline(default_detector_settings(), detectors=[*detectors, det])
        return [dict(a) for a in replay(records, p, refreshes=True) if a["alert"] == "rank_stalled"]

    got = lines(RankStalled)
    assert repr(got) == repr(lines(RankStalledEveryTick))
    assert [(a.get("refreshed", False), a["root_ranks"], a["silent_ranks"], a["stuck_ranks"]) for a in got] == [
        (False, [3], [3], []), (True, [1, 3], [3], [0, 1, 2]), (True, [3], [], [0, 1, 2, 3])]
    assert got[2]["last_time"] == pytest.approx(lt.T0 + 218.5)
