"""What a run's clients hear (monitor/stop_steps.py) and resent batches taken once (monitor/batches.py), through
the Service as the ingest route drives it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from trainhealth.batches import BatchIdError, TakenBatches, parse
from trainhealth.config import Settings
from trainhealth.http.app import create_app
from trainhealth.service import Service

T0 = 1_700_000_000.0


def make() -> Service:
    return Service(Settings(), clock=lambda: T0 + 3600)


def send(service: Service, *records: dict[str, Any], batch_id: str | None = None) -> tuple[int, dict[str, Any]]:
    answer = service.ingest(json.dumps(list(records)).encode(), "application/json", None, batch_id, views=True)
    return answer.status, answer.body


def steps(run: str, ranks: range, first: int, last: int, period: float = 0.05, **extra: Any) -> list[dict]:
    return [{"run": run, "rank": r, "time": T0 + s * period, "step": s, "loss": 1.0, "grad_norm": 1.0, **extra}
            for s in range(first, last + 1) for r in ranks]


def nan(run: str, rank: int, step: int, period: float = 0.05) -> dict[str, Any]:
    return {"run": run, "rank": rank, "time": T0 + step * period, "step": step, "loss": float("nan"),
            "grad_norm": float("nan")}


# -- the stop step --------------------------------------------------------------------------------------

def test_quiet_runs_get_no_view_in_the_ingest_answer():
    service = make()
    status, body = send(service, *steps("quiet", range(2), 1, 20))
    assert status == 200 and "runs" not in body
    # versions start at the sidecar's start (milliseconds): a client's last version from before a restart is older
    epoch = service.stop_steps.epoch
    assert service.stop_steps.view("quiet") == {"version": epoch, "stops": {}, "alerts": [], "alerts_total": 0}


@pytest.mark.parametrize(("period", "lead"), [(0.05, 2), (0.03, 4), (0.5, 2), (0.001, 100)])
def test_the_stop_step_is_far_enough_ahead_for_the_runs_own_step_time(period, lead):
    service = make()
    send(service, *steps("r", range(2), 1, 29, period))
    status, body = send(service, nan("r", 1, 30, period))
    view = body["runs"]["r"]
    assert view["stops"]["nan_divergence"] == {"step": 30 + lead, "alert": "nan_divergence", "rank": 1,
                                               "first_step": 30, "severity": "critical", "confirmed": False}
    # one incident for the run (rank null); the stop names its first rank
    assert [(a["alert"], a["rank"], a["step"]) for a in view["alerts"]] == [("nan_divergence", None, 30)]


def test_a_rank_already_ahead_moves_the_stop_so_nobody_has_passed_it():
    service = make()
    send(service, *steps("r", range(2), 1, 29))
    send(service, *steps("r", [0], 30, 31))  # rank 0 reported step 31 before rank 1's NaN at 30 arrived
    _, body = send(service, nan("r", 1, 30))
    assert body["runs"]["r"]["stops"]["nan_divergence"]["step"] == 33


def test_every_rank_is_told_the_same_stop_and_a_later_alert_never_moves_it_lower():
    service = make()
    send(service, *steps("r", range(2), 1, 29))
    _, first = send(service, nan("r", 1, 30))
    _, second = send(service, nan("r", 0, 30))  # rank 0's NaN (through the all-reduce): the same stop
    one, two = first["runs"]["r"]["stops"]["nan_divergence"], second["runs"]["r"]["stops"]["nan_divergence"]
    assert one["step"] == two["step"] and one["first_step"] == two["first_step"]  # the same stop
    # both ranks' own loss at step 30: the refreshed incident's root is the lowest rank, and the stop says so
    # (the client's stop_reason names the rank the alert names)
    assert (one["rank"], two["rank"]) == (1, 0) == (1, service.book.firing("r")[0]["first_rank"])
    assert second["runs"]["r"]["version"] >= first["runs"]["r"]["version"]  # the same incident, refreshed
    # another alert later, at a much shorter period: its stop is not below the first one
    service.stop_steps.lead.lead_seconds = 0.0
    service.stop_steps.on_alerts([{"run": "r", "alert": "loss_spike", "state": "firing", "rank": 0, "step": 29,
                              "severity": "warning"}])
    stops = service.stop_steps.view("r")["stops"]
    assert stops["loss_spike"]["step"] >= stops["nan_divergence"]["step"] == 32


def test_a_restart_forgets_the_stops():
    service = make()
    send(service, *steps("r", range(2), 1, 29))
    send(service, nan("r", 1, 30))
    assert service.stop_steps.view("r")["stops"]
    send(service, {"type": "start", "run": "r", "rank": 0, "time": T0 + 10, "world_size": 2})
    assert service.stop_steps.view("r")["stops"] == {}


def test_a_restart_whose_start_comes_in_the_same_batch_as_its_samples_forgets_the_stops():
    service = make()
    send(service, *steps("r", range(2), 1, 29))
    send(service, nan("r", 1, 30))
    assert service.stop_steps.view("r")["stops"]
    restarted = {"type": "start", "run": "r", "rank": 0, "time": T0 + 10, "world_size": 2}
    send(service, restarted, *[{"run": "r", "rank": 0, "time": T0 + 10 + s * 0.05, "step": s, "loss": 1.0}
                               for s in range(1, 4)])  # one batch: the client flushes start and samples together
    assert service.stop_steps.view("r")["stops"] == {}


def test_a_run_the_pipeline_forgot_starts_again_without_its_stops():
    service = make()
    send(service, *steps("r", range(2), 1, 29))
    send(service, nan("r", 1, 30))
    assert service.stop_steps.view("r")["stops"]
    service.pipeline.forget("r", "expired")
    send(service, *[{"run": "r", "rank": r, "time": T0 + 100 + s, "step": s, "loss": 1.0}
                    for s in range(1, 4) for r in range(2)])
    assert service.stop_steps.view("r")["stops"] == {}


def test_after_a_sidecar_restart_open_alerts_get_a_stop_again_under_a_newer_version():
    before = make()
    send(before, *steps("r", range(2), 1, 29))
    send(before, nan("r", 1, 30))
    old = before.stop_steps.view("r")
    after = Service(Settings(), clock=lambda: T0 + 3600)
    after.stop_steps.epoch = old["version"] + 1000  # a later start of the process
    after.stop_steps.resume(list(before.book.open.values()))  # what the store put back into the book
    view = after.stop_steps.view("r")
    assert view["version"] > old["version"] and view["stops"]["nan_divergence"]["first_step"] == 30


# -- the long poll --------------------------------------------------------------------------------------

async def _poll_then_nan(service: Service) -> tuple[dict[str, Any], float, float]:
    app = create_app(service)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        first = (await client.get("/v1/runs/r/watch", params={"version": -1})).json()
        assert first["version"] == 0  # not known yet: answered at once
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        waiting = asyncio.create_task(client.get("/v1/runs/r/watch", params={"version": 0, "timeout": 20}))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # it waits for a change
        body = json.dumps(steps("r", range(2), 1, 29) + [nan("r", 1, 30)])
        sent = loop.time()
        plain = await client.post("/v1/ingest", content=body)
        assert plain.status_code == 200 and "runs" not in plain.json()  # only a client that asks hears
        answer = await waiting
        return answer.json(), sent - t0, loop.time() - sent


def test_a_long_poll_answers_as_soon_as_an_alert_fires_for_its_run():
    view, waited, after = asyncio.run(_poll_then_nan(make()))
    assert waited >= 0.2 and after < 2.0
    assert view["stops"]["nan_divergence"]["step"] == 32 and view["alerts"][0]["alert"] == "nan_divergence"


def test_shutdown_answers_every_waiting_poll():
    service = make()
    woken: list[str] = []
    assert service.stop_steps.wait("r", lambda: woken.append("r"))
    service.stop_steps.wake_all()
    assert woken == ["r"] and not service.stop_steps.wait("r", lambda: None)


# -- batches taken once ---------------------------------------------------------------------------------

def test_a_resent_batch_is_answered_duplicate_and_not_ingested_again():
    service = make()
    records = steps("d", range(1), 1, 5)
    assert send(service, *records, batch_id="c1/1") == (200, {"accepted": 5, "rejected": 0, "alerts": 0})
    assert send(service, *records, batch_id="c1/1") == (200, {"accepted": 0, "rejected": 0, "alerts": 0,
                                                              "duplicate": True})
    assert send(service, *records, batch_id="c2/1")[1]["accepted"] == 5  # another client's batch 1
    assert service.stats.accepted == 10 and service.taken.duplicates == 1


def test_a_refused_batch_is_not_taken_so_its_resend_is_judged_again():
    service = make()
    assert send(service, {"run": "d", "rank": -1, "time": T0}, batch_id="c/7")[0] == 400
    assert send(service, *steps("d", range(1), 1, 1), batch_id="c/7")[1]["accepted"] == 1


@pytest.mark.parametrize("bad", ["", "c", "c/", "/1", "c/x", "c d/1", "c/-1", "x" * 65 + "/1", "c/1/2"])
def test_a_bad_batch_id_is_a_400_naming_the_header_and_value(bad):
    status, body = send(make(), *steps("d", range(1), 1, 1), batch_id=bad)
    assert status == 400 and body["error"].startswith("X-Trainhealth-Batch: must be CLIENT/SEQ")
    with pytest.raises(BatchIdError):
        parse(bad)


def test_the_memory_of_taken_batches_is_bounded_per_client_and_in_clients():
    taken = TakenBatches(per_client=3, max_clients=2)
    for seq in range(1, 6):
        taken.take("a", seq)
    assert [taken.taken("a", s) for s in range(1, 6)] == [False, False, True, True, True]
    taken.take("b", 1)
    taken.take("c", 1)  # "a" is the oldest client: forgotten
    assert not taken.taken("a", 5) and taken.taken("b", 1) and taken.taken("c", 1)


def test_a_stop_every_rank_passed_moves_ahead_of_the_run():
    service = make()
    send(service, *steps("r", range(2), 1, 29))
    send(service, nan("r", 1, 30))
    assert service.stop_steps.view("r")["stops"]["nan_divergence"]["step"] == 32
    version = service.stop_steps.version("r")
    send(service, *steps("r", range(2), 31, 32))  # the ranks reached 32 without having heard: still running
    assert service.stop_steps.version("r") == version  # at the stop is not past it
    _, body = send(service, *steps("r", range(2), 33, 33))  # step 33 done: nobody stopped at 32
    assert body["runs"]["r"]["stops"]["nan_divergence"]["step"] == 35
    assert body["runs"]["r"]["stops"]["nan_divergence"]["moved"] == 1


def test_the_long_poll_refuses_a_run_name_no_record_could_carry():
    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(make()))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get("/v1/runs/bad name!/watch")

    answer = asyncio.run(ask())
    assert answer.status_code == 400 and answer.json()["error"].startswith("run: must be 1-128 characters")


def test_a_late_first_start_of_a_slow_rank_is_no_restart():
    service = make()
    send(service, {"type": "start", "run": "r", "rank": 0, "time": T0, "world_size": 2, "batch_size": 2,
                   "lr": 0.02, "reference_lr": 0.02, "reference_batch_size": 16})  # lr_scaling fires at once
    assert service.stop_steps.view("r")["stops"]["lr_scaling"]["step"] == 2
    send(service, *steps("r", [0], 1, 1))
    send(service, {"type": "start", "run": "r", "rank": 1, "time": T0 + 0.01, "world_size": 2, "batch_size": 2,
                   "lr": 0.02})  # rank 1's first start, after rank 0's first sample: not a restart
    assert service.stop_steps.view("r")["stops"]["lr_scaling"]["step"] == 2


def test_the_lead_is_the_configs_stop_section_and_a_reload_applies_it_to_later_stops(tmp_path) -> None:
    """``[stop]`` (docs/config.md): a larger lead_seconds for a slow path to the farthest client; a reload
    changes the stops fixed afterwards, never one already told to the ranks."""
    from trainhealth.config import ConfigError, load

    path = tmp_path / "c.toml"
    path.write_text("[stop]\nlead_seconds = 1.0\n")
    service = Service(load(str(path)), clock=lambda: T0 + 3600, load_settings=lambda: load(str(path)))
    send(service, *steps("r", range(2), 1, 29))
    _, body = send(service, nan("r", 1, 30))
    assert body["runs"]["r"]["stops"]["nan_divergence"]["step"] == 30 + 20  # 1 s of 50 ms steps
    path.write_text("[stop]\nlead_seconds = 0.1\nmax_lead_steps = 3\n")
    assert service.reload() == {"reloaded": True}
    assert service.stop_steps.view("r")["stops"]["nan_divergence"]["step"] == 50  # told: it stays
    send(service, *steps("s", range(2), 1, 29, 0.001))
    _, body = send(service, nan("s", 1, 30, 0.001))
    assert body["runs"]["s"]["stops"]["nan_divergence"]["step"] == 33  # 100 steps of lead, capped at 3
    for text, error in [("lead_seconds = 0", "stop.lead_seconds: must be a positive number, got 0"),
                        ("min_lead_steps = 0", "stop.min_lead_steps: must be an integer >= 1, got 0"),
                        ("min_lead_steps = 5\nmax_lead_steps = 4",
                         "stop.max_lead_steps: must be >= stop.min_lead_steps (5), got 4"),
                        ("lead = 1",
                         "stop.lead: unknown setting (known: lead_seconds, max_lead_steps, min_lead_steps)")]:
        path.write_text(f"[stop]\n{text}\n")
        with pytest.raises(ConfigError) as exc:
            load(str(path))
        assert str(exc.value).startswith(error), (text, str(exc.value))


# -- a confirmed stop: every live rank acked it in time (a partial miss must not strand a rank) ------------

def started(run: str, world: int, ranks: range | list[int] | None = None) -> list[dict[str, Any]]:
    return [{"type": "start", "run": run, "rank": r, "time": T0, "world_size": world}
            for r in (range(world) if ranks is None else ranks)]


def ack(run: str, rank: int, stop: int, checked: int | None) -> dict[str, Any]:
    """The urgent heartbeat a client sends when it adopts a stop (trainer/hearing.py)."""
    said = {"step": stop} if checked is None else {"step": stop, "checked": checked}
    return {"type": "heartbeat", "run": run, "rank": rank, "time": T0 + 1.6, "step": checked or 0, "stop_ack": said}


def nan_run(service: Service, world: int = 2) -> None:
    send(service, *started("r", world))
    send(service, *steps("r", range(world), 1, 29))
    send(service, nan("r", world - 1, 30))
    stop = service.stop_steps.view("r")["stops"]["nan_divergence"]
    assert (stop["step"], stop["confirmed"]) == (32, False)


def stop_of(service: Service) -> tuple[int, bool, int]:
    stop = service.stop_steps.view("r")["stops"]["nan_divergence"]
    return stop["step"], stop["confirmed"], stop.get("moved", 0)


def test_a_stop_is_confirmed_once_every_live_rank_acked_it_in_time():
    service = make()
    nan_run(service)
    version = service.stop_steps.version("r")
    send(service, ack("r", 0, 32, 30))
    assert stop_of(service) == (32, False, 0) and service.stop_steps.version("r") == version  # no answer to wake
    _, body = send(service, ack("r", 1, 32, None))  # rank 1 heard it before its loop asked about any step
    assert body["runs"]["r"]["stops"]["nan_divergence"]["confirmed"] is True
    assert service.stop_steps.version("r") == version + 1  # the long polls answer: the clients hear it
    send(service, *steps("r", range(2), 31, 33))  # the ranks' last samples arriving late move nothing confirmed
    assert stop_of(service) == (32, True, 0)
    send(service, ack("r", 0, 32, 32))  # nor does a rank saying it passed it (its wait timed out): ranks left there
    assert stop_of(service) == (32, True, 0)


def test_a_late_ack_moves_the_stop_at_once_and_the_acks_start_over():
    """The deadlock's interleaving: rank 0 heard stop 32 in time, rank 1 after it had checked step 32 (it is in
    step 33's collectives): nobody may stop at 32; the stop moves ahead of rank 1 before any sample says so."""
    service = make()
    nan_run(service)
    send(service, ack("r", 0, 32, 30))
    _, body = send(service, ack("r", 1, 32, 32))
    assert body["runs"]["r"]["stops"]["nan_divergence"] == {
        "step": 34, "alert": "nan_divergence", "rank": 1, "first_step": 30, "severity": "critical",
        "confirmed": False, "moved": 1}  # max(highest step seen 30, checked 32) + 2 steps of lead
    send(service, ack("r", 1, 32, 30))  # an in-time ack of the old step counts for nothing now
    send(service, ack("r", 0, 34, 32))
    assert stop_of(service) == (34, False, 1)
    send(service, ack("r", 1, 34, 32))
    assert stop_of(service) == (34, True, 1)


def test_a_late_ack_of_a_stop_that_already_moved_past_it_moves_nothing():
    service = make()
    nan_run(service)
    send(service, ack("r", 1, 32, 33))
    assert stop_of(service) == (35, False, 1)
    version = service.stop_steps.version("r")
    send(service, ack("r", 1, 32, 33))  # said again (the client repeats an ack until the stop is confirmed)
    assert stop_of(service) == (35, False, 1) and service.stop_steps.version("r") == version


def test_ended_ranks_need_not_ack_and_an_end_can_complete_the_confirmation():
    service = make()
    nan_run(service, world=3)
    send(service, {"type": "end", "run": "r", "rank": 2, "time": T0 + 1.55, "step": 30, "status": "completed"})
    send(service, ack("r", 0, 32, 30))
    assert stop_of(service) == (32, False, 0)  # rank 1 is live and has not acked
    send(service, ack("r", 1, 32, 31))
    assert stop_of(service) == (32, True, 0)
    other = make()
    nan_run(other)
    send(other, ack("r", 0, 32, 30))
    send(other, {"type": "end", "run": "r", "rank": 1, "time": T0 + 1.55, "step": 30, "status": "failed"})
    assert stop_of(other) == (32, True, 0)  # the one rank left acked: nobody waits for the one that ended


def test_a_rank_of_the_world_never_heard_from_is_not_waited_for():
    # only rank 0 of a world of 2 reports (a job that makes its client on rank 0 alone): rank 1 has no client
    # to hear or ack a stop, and waiting for it would stall rank 0 at every stop; a rank heard from is waited for
    service = make()
    send(service, *started("r", 2, ranks=[0]))
    send(service, *steps("r", [0], 1, 29))
    send(service, nan("r", 0, 30))
    send(service, ack("r", 0, 32, 30))
    assert stop_of(service) == (32, True, 0)
    heard = make()
    send(heard, *started("r", 2, ranks=[0, 1]))
    send(heard, *steps("r", [0], 1, 29))  # rank 1 started and has sent no sample yet: it is waited for
    send(heard, nan("r", 0, 30))
    send(heard, ack("r", 0, 32, 30))
    assert stop_of(heard) == (32, False, 0)
    send(heard, ack("r", 1, 32, None))
    assert stop_of(heard) == (32, True, 0)


def test_a_one_rank_run_confirms_on_its_own_ack_and_without_start_records_the_ranks_seen_count():
    service = make()
    nan_run(service, world=1)
    send(service, ack("r", 0, 32, 31))
    assert stop_of(service) == (32, True, 0)
    seen = make()
    send(seen, *steps("r", range(2), 1, 29))  # no start record: the ranks seen are the world
    send(seen, nan("r", 1, 30))
    send(seen, ack("r", 1, 32, 30))
    assert stop_of(seen) == (32, False, 0)
    send(seen, ack("r", 0, 32, 30))
    assert stop_of(seen) == (32, True, 0)


def test_a_restart_forgets_a_confirmed_stop_and_its_acks():
    service = make()
    nan_run(service)
    send(service, ack("r", 0, 32, 30), ack("r", 1, 32, 30))
    assert stop_of(service) == (32, True, 0)
    send(service, *[{**s, "time": T0 + 10} for s in started("r", 2)])  # the job restarted
    assert service.stop_steps.view("r")["stops"] == {}
    send(service, *steps("r", range(2), 1, 29, 0.05))
    send(service, nan("r", 1, 30))
    assert stop_of(service) == (32, False, 0)  # the same step again, but nobody acked this one


@pytest.mark.parametrize(("said", "field", "reason"), [
    ({"step": -1}, "stop_ack.step", "Expected `int` >= 0"),
    ({"checked": 3}, "stop_ack", "Object missing required field `step`"),
    ({"step": 5, "checked": "3"}, "stop_ack.checked", "Expected `int | null`, got `str`"),
    (5, "stop_ack", "Expected `object | null`, got `int`"),
])
def test_a_bad_stop_ack_is_refused_naming_the_field(said, field, reason):
    status, body = send(make(), {"type": "heartbeat", "run": "r", "rank": 0, "time": T0, "step": 3, "stop_ack": said})
    assert status == 400 and body["errors"][0]["field"] == field and body["errors"][0]["reason"].startswith(reason)


def test_an_ack_from_a_rank_past_the_rank_cap_counts_for_nothing():
    """A record the pipeline refuses (``limits.max_ranks_per_run``) is no rank of the run: its ack neither
    confirms nor moves a stop."""
    settings = Settings()
    settings.limits.max_ranks_per_run = 2
    service = Service(settings, clock=lambda: T0 + 3600)
    send(service, *steps("r", range(2), 1, 29))
    send(service, nan("r", 1, 30))
    status, body = send(service, ack("r", 7, 32, 40))  # refused: 7 would be the run's third rank
    assert status == 429 and body["errors"][0]["field"] == "rank"
    assert stop_of(service) == (32, False, 0)
    send(service, ack("r", 0, 32, 30), ack("r", 1, 32, 30))
    assert stop_of(service) == (32, True, 0)
